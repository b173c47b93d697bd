//! The pool and leases service: a request is answered from the pool (free VFs,
//! enabling VFs on idle PFs when short) or with the devices it names, each passed
//! by the gate; the lease is an intent first, then the kernel, then the commit. A
//! release gives every device back as it was before the lease.

use std::collections::BTreeMap;

use vf_provisioner::ops::Passed;
use vf_provisioner::{Host, Op, PciAddress, PciFunction};

use super::{
    addresses, addrs_of, failed, is_mediated, new_id, normalize, now, profile_matches, refused_for,
    store, Claim, Guards, LeaseRow, Planned, Pool,
};
use crate::api::ids::{Held, LeaseId, RequestId};
use crate::api::{ApiError, Lease, Request};

/// How a release names its lease: two namespaces, never mixed.
#[derive(Debug, Clone)]
pub enum LeaseRef {
    Lease(LeaseId),
    /// The lease a request id made.
    Request(RequestId),
}

impl std::fmt::Display for LeaseRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LeaseRef::Lease(id) => write!(f, "lease {id}"),
            LeaseRef::Request(id) => write!(f, "lease of request id {id}"),
        }
    }
}

/// What `Pool::free_for` has found so far: the VFs taken (and claimed), and the
/// PFs read on the way.
struct Picker<'a> {
    pfs: BTreeMap<String, Option<PciFunction>>,
    free: Vec<Passed>,
    claim: Claim<'a>,
}

impl Pool<'_> {
    pub fn provision(&self, req: Request, uid: u32) -> Result<(Lease, bool), ApiError> {
        crate::api::codec::check(&req)?;
        let once = || {
            self.timed("provision", || {
                let _shared = self.shared();
                // The same request id twice at once: the second waits and gets the first's lease.
                let mut names = vec![format!("request {}", req.request_id)];
                if !req.agent.is_empty() {
                    // Two requests naming one agent channel at once: checked in turn.
                    names.push(format!("agent {}", req.agent));
                }
                let _same = self.claims.wait(names);
                self.provision_claimed(&req, uid)
            })
        };
        let mut r = once();
        // A high-priority request short of devices takes idle low-priority ones.
        if matches!(r, Err(ApiError::NoDevice(_))) {
            let freed = self.placement().preempt_for(&req, req.count as usize);
            for line in &freed {
                eprintln!("vfio-manager: placement: {line}");
            }
            if !freed.is_empty() {
                r = once();
            }
        }
        match &r {
            Ok((lease, true)) => self.audit.record(
                uid,
                "provision",
                &lease.id,
                &req.vm_name,
                &addresses(lease),
                "ok",
            ),
            Ok(_) => {}
            Err(e) => self
                .audit
                .record(uid, "provision", "", &req.vm_name, &[], &e.to_string()),
        }
        r
    }

    /// A lease's agent channel names one VM: another VM's lease naming it would be
    /// told that VM's usage, and could ask its guest to let go of a device.
    fn agent_channel_free(&self, req: &Request) -> Result<(), ApiError> {
        use crate::api::ids::AgentChannel;
        let ch = match req.agent.parse::<AgentChannel>() {
            Ok(AgentChannel::None) | Err(_) => return Ok(()),
            Ok(ch) => ch,
        };
        match self.usage().lease_of(&ch) {
            Some((lease, vm)) if vm != req.vm_name => Err(ApiError::Refused(format!(
                "VM {}: agent channel {ch} is lease {lease}'s, of VM {vm}; give each VM its own vsock CID or socket",
                req.vm_name
            ))),
            _ => Ok(()),
        }
    }

    /// Returns the lease and whether it is new (false: the request id's earlier lease).
    fn provision_claimed(&self, req: &Request, uid: u32) -> Result<(Lease, bool), ApiError> {
        let rid = RequestId::new(&req.request_id)?;
        if let Some(old) = self.store().lease_of_request(&rid).map_err(failed)? {
            if uid != 0 && uid != old.owner {
                return Err(ApiError::PermissionDenied(format!(
                    "request id {rid} names a lease of another user (uid {}); use a request id of your own",
                    old.owner
                )));
            }
            if old.request != *req {
                return Err(ApiError::BadInput(format!(
                    "request id {rid} already names lease {} for VM {} with other parameters; use a new request id",
                    old.id, old.request.vm_name
                )));
            }
            return Ok((self.lease_view(&old), false));
        }
        self.agent_channel_free(req)?;
        let released = self.store().released_request(&rid).map_err(failed)?;
        if let Some(lease) = released {
            return Err(ApiError::BadInput(format!(
                "request id {:?} was used by lease {lease}, which has been released; use a new request id",
                req.request_id
            )));
        }
        if is_mediated(&req.profile) {
            let row = self.mediated().provision_mediated(req, uid)?;
            return Ok((self.lease_view(&row), true));
        }
        let (chosen, _claim) = self.choose(req)?;
        let planned: Vec<Held> = chosen
            .iter()
            .map(Passed::function)
            .map(|f| Held::Function {
                address: f.address,
                driver_before: f.driver.clone().unwrap_or_default(),
            })
            .collect();
        // `choose` has just read each one and passed it through the gate, and holds it.
        let row = self.new_lease(req, uid, planned, chosen.len(), |i| {
            let a = chosen[i].function().address;
            self.raw.bind_passed(&chosen[i]).map_err(|e| {
                self.mark_failed(&a.to_string(), &e.to_string());
                ApiError::from(e)
            })?;
            // A running VM adopting its devices holds them open: no probe.
            match req.adopt {
                true => Ok(()),
                false => self.probe_dma(&a),
            }
        })?;
        Ok((self.lease_view(&row), true))
    }

    /// Records a new lease of `devices` (each with its driver before the lease, or
    /// what the lease makes of it) for `req`: the intent first, then `step(i)` for
    /// each of the first `steps` devices; a failed step undoes the ones before it, and
    /// the lease is committed only when all have passed.
    pub(super) fn new_lease(
        &self,
        req: &Request,
        owner: u32,
        devices: Vec<Held>,
        steps: usize,
        mut step: impl FnMut(usize) -> Result<(), ApiError>,
    ) -> Result<LeaseRow, ApiError> {
        let lease_id = new_id();
        let body = serde_json::to_string(&Planned::new(&devices)).expect("serializes");
        let intent = self
            .store()
            .begin_intent("provision", &lease_id, &body, Guards::Kernel)
            .map_err(failed)?;
        for i in 0..steps {
            if let Err(e) = step(i) {
                for held in devices[..i].iter().rev() {
                    let _ = self.undo_device(held);
                }
                let _ = self.store().end_intent(intent);
                return Err(e);
            }
        }
        let mut row = LeaseRow {
            id: lease_id,
            owner,
            request: req.clone(),
            devices,
            created_at: now(),
        };
        // In the order the table returns them, so that every answer lists them alike.
        row.devices.sort_by_key(Held::name);
        let drivers = self.drivers_now(&addrs_of(&row));
        self.store()
            .commit_lease(&row, intent, &drivers)
            .map_err(failed)?;
        Ok(row)
    }

    /// Free functions for `req`, claimed, enabling VFs on managed PFs that have none
    /// if short.
    pub(super) fn choose(&self, req: &Request) -> Result<(Vec<Passed>, Claim<'_>), ApiError> {
        if !req.devices.is_empty() {
            return self.take_named(req);
        }
        let (mut free, mut n, mut claim) = self.free_for(req)?;
        if free.len() < req.count as usize {
            drop(claim);
            self.enable_idle_pfs(req);
            (free, n, claim) = self.free_for(req)?;
        }
        if free.len() < req.count as usize {
            let unfit = match n.saturating_sub(free.len()) {
                0 => String::new(),
                k => format!(" ({k} more unleased but unfit: held open, in a shared IOMMU group, needed by the host, of another profile or taken by a concurrent request)"),
            };
            return Err(ApiError::NoDevice(format!(
                "no free device for VM {}: {} wanted with profile {:?}{}, {} free{unfit}; release a lease (`vfctl leases`), enable more VFs (`vfctl enable PF --vfs N`) or manage another PF in the configuration",
                req.vm_name,
                req.count,
                req.profile,
                if req.numa_node >= 0 { format!(" on NUMA node {}", req.numa_node) } else { String::new() },
                free.len()
            )));
        }
        Ok((free, claim))
    }

    /// Up to `req.count` VFs that match `req`, are not leased, not held open, alone
    /// in their IOMMU group and not needed by the host; preferred PFs first. The
    /// table names the candidates (kept true by uevents and after every change);
    /// each chosen one is claimed, then checked against sysfs itself. Also returns how
    /// many candidates it looked at: every one the table has when it found too few.
    fn free_for(&self, req: &Request) -> Result<(Vec<Passed>, usize, Claim<'_>), ApiError> {
        let mut preferred: Vec<String> = Vec::new();
        // The request's own PFs first, then the placement policy's order.
        let order = self.placement().order();
        for p in req.pfs.iter().map(|p| normalize(p)).chain(order) {
            if !preferred.contains(&p) {
                preferred.push(p);
            }
        }
        let want = req.count as usize;
        let mut pick = Picker {
            pfs: BTreeMap::new(),
            free: Vec::new(),
            claim: self.claims.none(),
        };
        let mut seen = 0;
        // Each preferred PF's VFs, then everyone else's.
        for pass in preferred.iter().map(Some).chain([None]) {
            let mut after = String::new();
            while pick.free.len() < want {
                let rows = self
                    .store()
                    .unleased_vfs(req.numa_node, pass.map(String::as_str), &after)
                    .map_err(failed)?;
                for (addr, pf) in &rows {
                    if pick.free.len() == want {
                        break;
                    }
                    if pass.is_none() && preferred.contains(pf) {
                        continue;
                    }
                    seen += 1;
                    self.pick(req, addr, pf, &mut pick);
                }
                match rows.last() {
                    Some((last, _)) if rows.len() == store::PAGE => after = last.clone(),
                    _ => break,
                }
            }
        }
        Ok((pick.free, seen, pick.claim))
    }

    /// Takes VF `addr` of `pf` into `pick` if it is free for `req`. Claimed first,
    /// checked after: whoever claims a device second skips it (and reads nothing
    /// for it).
    fn pick(&self, req: &Request, addr: &str, pf: &str, pick: &mut Picker<'_>) {
        if !pick.claim.try_add(addr) {
            return;
        }
        let pf = pick
            .pfs
            .entry(pf.to_string())
            .or_insert_with(|| PciFunction::read_ids(&self.sys, &pf.parse().ok()?));
        let pf = pf.as_ref().filter(|pf| profile_matches(&req.profile, pf));
        let f = pf.and_then(|_| PciFunction::read_brief(&self.sys, &addr.parse().ok()?));
        let op = Op::Lease {
            adopt: false,
            whole_group: false,
        };
        match f.map(|f| self.guarded.gate_function(op, f)) {
            Some(Ok(passed)) => pick.free.push(passed),
            _ => pick.claim.remove_last(),
        }
    }

    /// Exactly the functions `req.devices` names, claimed, each checked like a pool VF.
    fn take_named(&self, req: &Request) -> Result<(Vec<Passed>, Claim<'_>), ApiError> {
        let mut claim = self.claims.none();
        let mut taken = Vec::new();
        for a in &req.devices {
            let addr: PciAddress = a.parse()?;
            let refuse = |why: String| {
                ApiError::Refused(format!(
                    "{addr}: cannot lease it to VM {}: {why}; pick another device (`vfctl list`) or release its lease",
                    req.vm_name
                ))
            };
            if !claim.try_add(&addr.to_string()) {
                return Err(refuse("another request is taking it right now".into()));
            }
            let f = PciFunction::read_brief(&self.sys, &addr).ok_or_else(|| {
                ApiError::NotFound(format!(
                    "{addr}: no such PCI function; `vfctl list` shows the devices"
                ))
            })?;
            let pf = match f.physfn {
                Some(p) => PciFunction::read_ids(&self.sys, &p)
                    .ok_or_else(|| refuse(format!("its PF {p} is gone")))?,
                None => f.clone(),
            };
            if !profile_matches(&req.profile, &pf) {
                return Err(refuse(format!(
                    "its PF is a {}, not profile {:?}",
                    pf.id, req.profile
                )));
            }
            let op = Op::Lease {
                adopt: req.adopt,
                whole_group: self.group_named(&f, req),
            };
            let passed = self.guarded.gate_function(op, f);
            taken.push(passed.map_err(|r| refused_for(&req.vm_name, r))?);
        }
        Ok((taken, claim))
    }

    /// Whether `req` names every other member of `f`'s IOMMU group too: then the
    /// lease takes the group as one unit (a GPU with its HDMI audio function).
    fn group_named(&self, f: &PciFunction, req: &Request) -> bool {
        let Some(g) = f.iommu_group else {
            return false;
        };
        let named: Vec<PciAddress> = req.devices.iter().filter_map(|d| d.parse().ok()).collect();
        vf_provisioner::host::group_members(&self.sys, g)
            .iter()
            .all(|m| named.contains(m))
    }

    fn enable_idle_pfs(&self, req: &Request) {
        let _one = self.enabling.lock().unwrap_or_else(|e| e.into_inner());
        let host = Host::scan(&self.sys);
        let filter = self.raw.filter();
        for pf in host.pfs() {
            let idle = pf
                .sriov
                .as_ref()
                .is_some_and(|s| s.num_vfs == 0 && s.total_vfs > 0);
            if idle && filter.is_managed(pf) && profile_matches(&req.profile, pf) {
                match self.raw.enable_vfs(&pf.address, None) {
                    Ok(vfs) => eprintln!(
                        "vfio-manager: enabled {} VFs on {} for VM {}",
                        vfs.len(),
                        pf.address,
                        req.vm_name
                    ),
                    Err(e) => {
                        eprintln!("vfio-manager: could not enable VFs on {}: {e}", pf.address)
                    }
                }
            }
        }
        self.refresh_or_log();
    }

    /// Forgets the request ids released longer ago than `released_retention_days`
    /// (none where that is 0), so that the table does not grow with every lease for
    /// ever. Returns a line for the log when it forgot some or failed.
    pub fn forget_released(&self) -> Option<String> {
        let days = self.config().daemon.released_retention_days;
        if days == 0 {
            return None;
        }
        let before = now().saturating_sub(u64::from(days) * 86_400);
        match self.store().forget_released(before) {
            Ok(0) => None,
            Ok(n) => Some(format!(
                "forgot {n} request ids released over {days} days ago (released_retention_days); they may name new leases"
            )),
            Err(e) => Some(format!("cannot forget old released request ids: {e}")),
        }
    }

    /// Releases a lease, if `uid` is root or made it. `Ok(None)`: it was already
    /// released.
    pub fn release(&self, which: &LeaseRef, uid: u32) -> Result<Option<Lease>, ApiError> {
        let r = self.timed("release", || {
            let _shared = self.shared();
            self.release_shared(which, uid)
        });
        let id = which.to_string();
        let id = id.as_str();
        match &r {
            Ok(Some(l)) => {
                self.audit
                    .record(uid, "release", &l.id, &l.vm_name, &addresses(l), "ok")
            }
            Ok(None) => {}
            Err(e) => self
                .audit
                .record(uid, "release", id, "", &[], &e.to_string()),
        }
        r
    }

    fn release_shared(&self, which: &LeaseRef, uid: u32) -> Result<Option<Lease>, ApiError> {
        let find = || match which {
            LeaseRef::Lease(id) => self.store().lease(id),
            LeaseRef::Request(id) => self.store().lease_of_request(id),
        };
        let row = find().map_err(failed)?;
        // Another release of the same lease may be in flight: wait for its devices,
        // then look again.
        let _claim = row.as_ref().map(|r| self.claims.wait(addrs_of(r)));
        let row = match row {
            Some(_) => find().map_err(failed)?,
            None => None,
        };
        let Some(row) = row else {
            let released = match which {
                LeaseRef::Lease(id) => self.store().released_lease(id),
                LeaseRef::Request(id) => self.store().released_request(id).map(|l| l.is_some()),
            };
            if released.map_err(failed)? {
                return Ok(None);
            }
            return Err(ApiError::NotFound(format!(
                "no {which}; `vfctl leases` lists them"
            )));
        };
        if uid != 0 && uid != row.owner {
            return Err(ApiError::PermissionDenied(format!(
                "lease {} of VM {} was made by uid {}; only that user or root may release it",
                row.id, row.request.vm_name, row.owner
            )));
        }
        for held in &row.devices {
            self.gate_held(Op::Return, held).map_err(|r| {
                ApiError::Refused(format!(
                    "lease {} of VM {}: {r}, then release",
                    row.id, row.request.vm_name
                ))
            })?;
        }
        let view = self.lease_view(&row);
        let intent = self
            .store()
            .begin_intent("release", &row.id, "{}", Guards::Kernel)
            .map_err(failed)?;
        self.return_all(&row);
        let drivers = self.drivers_now(&addrs_of(&row));
        self.store()
            .commit_release(&row, Some(intent), &drivers)
            .map_err(failed)?;
        Ok(Some(view))
    }
}
