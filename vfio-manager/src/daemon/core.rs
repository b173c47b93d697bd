//! Where policy decides: leases, the pool, boot restore and crash recovery. Every
//! change to the host is written as an intent before the kernel is touched and
//! committed after (see `store`). Lease operations run side by side, each on the
//! devices it claimed (a GPU reset can take a second; other VMs should not wait for
//! it); operations that change which functions exist run alone (`ops` lock).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vf_provisioner::ops::Passed;
use vf_provisioner::sysfs::link_name;
use vf_provisioner::{
    DeviceFilter, Facts, Health, Host, Op, PciAddress, PciFunction, Provisioner, Refusal, Subject,
    Sysfs,
};

mod mediated;

pub use mediated::{is_mediated, Incoming};

use super::audit::Audit;
use super::metrics::Metrics;
use super::store::{self, now, Guards, LeaseRow, Store};
use crate::api::ids::{Held, LeaseId, RequestId};
use crate::api::{ApiError, DeviceInfo, Lease, Request};
use crate::config::Config;

const VFIO_PCI: &str = "vfio-pci";
pub use crate::api::codec::MAX_COUNT;

pub struct Core {
    sys: Sysfs,
    /// The kernel steps of a lease's own devices, after the gate passed them (it
    /// knows no leases, so a release may return what its lease holds).
    raw: Provisioner,
    /// The gate with what the table knows (leases, health), and the direct
    /// requests (enable, bind, ...), which ask it themselves.
    guarded: Provisioner,
    store: Arc<Store>,
    /// Shared by lease operations, exclusive for the rest (enable, bind, recovery).
    ops: RwLock<()>,
    /// Devices and request ids that lease operations in flight are working on.
    claims: Claims,
    /// Enabling VFs on idle PFs for a short provision, one at a time.
    enabling: Mutex<()>,
    /// Mediated changes, one at a time (see `mediated`).
    mediating: Mutex<()>,
    /// Devices that failed since the bus layer last looked, with why.
    failures: Mutex<Vec<(String, String)>>,
    /// Functions that appeared and vanished, not yet published.
    changes: Mutex<(Vec<String>, Vec<String>)>,
    config: Config,
    pub audit: Audit,
    pub metrics: Metrics,
}

/// Names (device addresses, `request ID`) held by operations in flight.
#[derive(Default)]
struct Claims {
    held: Mutex<BTreeSet<String>>,
    freed: Condvar,
}

impl Claims {
    fn held(&self) -> MutexGuard<'_, BTreeSet<String>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn none(&self) -> Claim<'_> {
        Claim {
            claims: self,
            names: Vec::new(),
        }
    }

    /// Waits until no one holds any of `names`, then holds them all.
    fn wait(&self, names: Vec<String>) -> Claim<'_> {
        let mut held = self.held();
        while names.iter().any(|n| held.contains(n)) {
            held = self.freed.wait(held).unwrap_or_else(|e| e.into_inner());
        }
        held.extend(names.iter().cloned());
        Claim {
            claims: self,
            names,
        }
    }
}

/// Names held until dropped.
struct Claim<'a> {
    claims: &'a Claims,
    names: Vec<String>,
}

impl Claim<'_> {
    /// Holds `name` too, unless someone else holds it.
    fn try_add(&mut self, name: &str) -> bool {
        let added = self.claims.held().insert(name.to_string());
        if added {
            self.names.push(name.to_string());
        }
        added
    }

    fn remove_last(&mut self) {
        if let Some(n) = self.names.pop() {
            self.claims.held().remove(&n);
            self.claims.freed.notify_all();
        }
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut held = self.claims.held();
        for n in &self.names {
            held.remove(n);
        }
        self.claims.freed.notify_all();
    }
}

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

/// What `Core::free_for` has found so far: the VFs taken (and claimed), and the
/// PFs read on the way.
struct Picker<'a> {
    pfs: BTreeMap<String, Option<PciFunction>>,
    free: Vec<Passed>,
    claim: Claim<'a>,
}

/// What a provision intent was about to do, for recovery.
#[derive(Serialize, Deserialize)]
struct Planned {
    /// Each device as the table's columns (`Held::to_row`).
    devices: Vec<(String, String, String)>,
}

impl Planned {
    fn new(devices: &[Held]) -> Planned {
        let row = |h: &Held| {
            let (name, kind, before) = h.to_row();
            (name, kind.to_string(), before)
        };
        Planned {
            devices: devices.iter().map(row).collect(),
        }
    }

    /// An intent's record; one written before the kind had its own field spelled
    /// it as a marker in the driver.
    fn read(body: &str) -> Vec<Held> {
        if let Ok(p) = serde_json::from_str::<Planned>(body) {
            let held = p.devices.iter().map(|(n, k, b)| Held::from_row(n, k, b));
            return held.filter_map(Result::ok).collect();
        }
        let old: Vec<(String, String)> = serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|v| serde_json::from_value(v.get("devices")?.clone()).ok())
            .unwrap_or_default();
        old.iter()
            .filter_map(|(n, m)| Held::from_marker(n, m).ok())
            .collect()
    }
}

/// What the table knows, for the gate.
struct TableFacts(Arc<Store>);

impl Facts for TableFacts {
    fn lease_of(&self, name: &str) -> Option<String> {
        let (id, vm) = self.0.holder(name).ok().flatten()?;
        Some(format!("VM {vm} (lease {id})"))
    }

    fn health(&self, name: &str) -> Option<Health> {
        // A table that cannot be read holds a device back: it is never offered blind.
        match self.0.held_back(name) {
            Ok(None) => None,
            Ok(Some((why, true))) => Some(Health::Failed(why)),
            Ok(Some((why, false))) => Some(Health::Quarantined(why)),
            Err(e) => Some(Health::Failed(format!("the state table cannot say: {e}"))),
        }
    }
}

fn failed(e: impl std::fmt::Display) -> ApiError {
    ApiError::Failed(e.to_string())
}

impl Core {
    pub fn open(sys: Sysfs, config: Config, audit: Audit) -> Result<Core, ApiError> {
        let dir = &config.daemon.state_dir;
        super::own_dir(dir, 0o700)
            .and_then(|()| {
                // The state directory is the daemon's alone: nobody else reads it.
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(dir)?.permissions().mode();
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode & 0o7770))
            })
            .map_err(|e| failed(format!("state directory {}: {e}", dir.display())))?;
        let store = Arc::new(Store::open(&dir.join("state.db")).map_err(failed)?);
        let filter = DeviceFilter::new(&config.devices);
        Ok(Core {
            raw: Provisioner::new(sys.clone(), filter.clone()),
            guarded: Provisioner::new(sys.clone(), filter)
                .with_facts(Arc::new(TableFacts(store.clone()))),
            sys,
            store,
            ops: RwLock::new(()),
            claims: Claims::default(),
            enabling: Mutex::new(()),
            mediating: Mutex::new(()),
            failures: Mutex::new(Vec::new()),
            changes: Mutex::new((Vec::new(), Vec::new())),
            config,
            audit,
            metrics: Metrics::default(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    fn store(&self) -> &Store {
        &self.store
    }

    fn lease_row(&self, id: &str) -> Result<Option<LeaseRow>, ApiError> {
        self.store().lease(&LeaseId::new(id)?).map_err(failed)
    }

    /// For operations that may change which functions exist or bypass the leases.
    fn exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.ops.write().unwrap_or_else(|e| e.into_inner())
    }

    /// For lease operations, which meet only in `claims`.
    fn shared(&self) -> RwLockReadGuard<'_, ()> {
        self.ops.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` as operation `op`, recording its latency and outcome.
    fn timed<T>(&self, op: &str, f: impl FnOnce() -> Result<T, ApiError>) -> Result<T, ApiError> {
        let start = Instant::now();
        let r = f();
        self.metrics.observe(op, start.elapsed(), r.as_ref().err());
        r
    }

    // ---- reading -------------------------------------------------------------

    pub fn devices(&self) -> Result<Vec<DeviceInfo>, ApiError> {
        self.store().devices().map_err(failed)
    }

    pub fn device(&self, address: &str) -> Option<DeviceInfo> {
        self.devices()
            .ok()?
            .into_iter()
            .find(|d| d.address == address)
    }

    pub fn leases(&self) -> Result<Vec<Lease>, ApiError> {
        let rows = self.store().leases().map_err(failed)?;
        Ok(rows.iter().map(|r| self.lease_view(r)).collect())
    }

    fn lease_view(&self, row: &LeaseRow) -> Lease {
        let devices = row
            .devices
            .iter()
            .map(|held| self.held_view(held))
            .collect();
        Lease {
            id: row.id.clone(),
            request_id: row.request.request_id.clone(),
            vm_name: row.request.vm_name.clone(),
            vm_uuid: row.request.vm_uuid.clone(),
            profile: row.request.profile.clone(),
            devices,
            created_at: row.created_at,
        }
    }

    /// The functions we manage as sysfs shows them: managed PFs, their VFs, GPUs.
    fn scan(&self) -> Vec<DeviceInfo> {
        let host = Host::scan(&self.sys);
        host.functions
            .values()
            .filter(|f| self.raw.config_refusal(f).is_none())
            .map(|f| DeviceInfo {
                address: f.address.to_string(),
                id: f.id.clone(),
                pf: f.physfn.map_or_else(String::new, |p| p.to_string()),
                driver: f.driver.clone().unwrap_or_default(),
                iommu_group: f.iommu_group.map_or(-1, |g| g as i32),
                numa_node: f.numa_node.map_or(-1, |n| n as i32),
                health: "ok".into(),
                lease_id: String::new(),
                vm_name: String::new(),
                provisions: 0,
                errors: 0,
            })
            .collect()
    }

    /// The functions that appeared and vanished since the last call (a lock and a
    /// swap: the bus's threads call it).
    pub fn take_changes(&self) -> (Vec<String>, Vec<String>) {
        std::mem::take(&mut *self.changes.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The driver each of these functions has now, for the table: an operation's
    /// commit records what it moved (a whole re-read is for topology changes).
    fn drivers_now(&self, addrs: &[String]) -> Vec<(String, String)> {
        addrs
            .iter()
            .filter_map(|a| {
                let dir = self.sys.device_dir(&a.parse().ok()?);
                dir.exists().then(|| {
                    (
                        a.clone(),
                        link_name(&dir.join("driver")).unwrap_or_default(),
                    )
                })
            })
            .collect()
    }

    /// Re-reads sysfs into the table, noting what appeared and vanished for
    /// `take_changes`.
    pub fn refresh(&self) -> Result<(), ApiError> {
        let seen = self.scan();
        let before = self.store().sync_devices(&seen).map_err(failed)?;
        let after: BTreeSet<String> = seen.into_iter().map(|d| d.address).collect();
        let mut changes = self.changes.lock().unwrap_or_else(|e| e.into_inner());
        changes.0.extend(after.difference(&before).cloned());
        changes.1.extend(before.difference(&after).cloned());
        Ok(())
    }

    /// [`Core::refresh`], logging a failure (the table then stays as it was).
    pub fn refresh_or_log(&self) {
        if let Err(e) = self.refresh() {
            eprintln!("vfio-manager: cannot re-read the table: {e}");
        }
    }

    // ---- leases --------------------------------------------------------------

    pub fn provision(&self, req: Request, uid: u32) -> Result<(Lease, bool), ApiError> {
        crate::api::codec::check(&req)?;
        let r = self.timed("provision", || {
            let _shared = self.shared();
            // The same request id twice at once: the second waits and gets the first's lease.
            let _same = self
                .claims
                .wait(vec![format!("request {}", req.request_id)]);
            self.provision_claimed(&req, uid)
        });
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
        let released = self.store().released_request(&rid).map_err(failed)?;
        if let Some(lease) = released {
            return Err(ApiError::BadInput(format!(
                "request id {:?} was used by lease {lease}, which has been released; use a new request id",
                req.request_id
            )));
        }
        if is_mediated(&req.profile) {
            let row = self.provision_mediated(req, uid)?;
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
            self.raw.bind_passed(&chosen[i]).map(|_| ()).map_err(|e| {
                self.mark_failed(&chosen[i].function().address.to_string(), &e.to_string());
                e.into()
            })
        })?;
        Ok((self.lease_view(&row), true))
    }

    /// Records a new lease of `devices` (each with its driver before the lease, or
    /// what the lease makes of it) for `req`: the intent first, then `step(i)` for
    /// each of the first `steps` devices; a failed step undoes the ones before it, and
    /// the lease is committed only when all have passed.
    fn new_lease(
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

    /// Undoes what a lease did to one device: removes what it made, or returns a
    /// whole function to its driver before the lease.
    fn undo_device(&self, held: &Held) -> Result<(), ApiError> {
        match held {
            Held::Function {
                address,
                driver_before,
            } => self
                .return_device(address, driver_before)
                .map_err(ApiError::from),
            mediated => self.unmake(mediated),
        }
    }

    /// Free functions for `req`, claimed, enabling VFs on managed PFs that have none
    /// if short.
    fn choose(&self, req: &Request) -> Result<(Vec<Passed>, Claim<'_>), ApiError> {
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
        for p in req.pfs.iter().map(|p| normalize(p)) {
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
        match f.map(|f| self.guarded.gate_function(Op::Lease { adopt: false }, f)) {
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
            let op = Op::Lease { adopt: req.adopt };
            let passed = self.guarded.gate_function(op, f);
            taken.push(passed.map_err(|r| refused_for(&req.vm_name, r))?);
        }
        Ok((taken, claim))
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

    /// Resets each device of `row` and returns it to its driver before the lease.
    /// Failures are recorded on the device and do not stop the release.
    fn return_all(&self, row: &LeaseRow) {
        for held in &row.devices {
            let addr = &held.name();
            let Held::Function {
                address: a,
                driver_before: before,
            } = held
            else {
                if let Err(e) = self.unmake(held) {
                    eprintln!("vfio-manager: {addr}: could not undo it: {e}");
                    self.mark_failed(addr, &e.to_string());
                }
                continue;
            };
            let Some(f) = PciFunction::read_brief(&self.sys, a) else {
                if self.sys.device_dir(a).exists() {
                    self.mark_failed(addr, "its sysfs entry cannot be read");
                }
                continue; // gone: reconcile marks it missing
            };
            if let Err(e) = self.raw.reset_function(&f) {
                if e.kind() != vf_provisioner::Kind::Refused {
                    eprintln!("vfio-manager: {addr}: reset on release failed: {e}");
                }
            }
            if let Err(e) = self.raw.return_function(&f, driver_before(before)) {
                eprintln!("vfio-manager: {addr}: could not return it to {before:?}: {e}");
                self.mark_failed(addr, &e.to_string());
            }
        }
    }

    fn return_device(&self, a: &PciAddress, before: &str) -> Result<(), vf_provisioner::Error> {
        self.raw.return_to(a, driver_before(before)).map(|_| ())
    }

    /// The gate's verdict on `op` of a lease's device; one that is gone passes (there is nothing left to protect).
    fn gate_held(&self, op: Op, held: &Held) -> Result<(), Refusal> {
        match (held.pci(), held.mdev()) {
            (Some(a), _) => match PciFunction::read_brief(&self.sys, &a) {
                Some(f) => self.guarded.gate(op, Subject::Function(&f)),
                None => Ok(()),
            },
            (_, Some(u)) => self.gate_mdev(op, &u.to_string()),
            (None, None) => Ok(()),
        }
    }

    /// Whether the configuration keeps us off PCI function `a` for `op` (a parent
    /// of mdevs, a VF for a vGPU type), read now: the pool's table does not list
    /// them.
    fn function_refused(&self, op: Op, a: &PciAddress) -> Option<Refusal> {
        let f = PciFunction::read_brief(&self.sys, a)?;
        self.guarded.gate(op, Subject::Function(&f)).err()
    }

    /// Records a failure on `addr` and holds it back: the gate offers it to nobody
    /// until an operator frees or adopts it (`vfctl orphan`).
    fn mark_failed(&self, addr: &str, why: &str) {
        let _ = self.store().set_health(addr, "failed", true);
        let why = format!("failed: {why}");
        if let Ok(true) = self.store().quarantine(addr, &why) {
            self.audit
                .record(0, "quarantine", "", "", &[addr.to_string()], &why);
        }
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((addr.to_string(), why.to_string()));
    }

    pub fn take_failures(&self) -> Vec<(String, String)> {
        std::mem::take(&mut *self.failures.lock().unwrap_or_else(|e| e.into_inner()))
    }

    // ---- direct requests (through the guarded provisioner) -----------------------

    pub fn enable_vfs(
        &self,
        pf: &str,
        count: Option<u32>,
        uid: u32,
    ) -> Result<Vec<String>, ApiError> {
        let pf: PciAddress = pf.parse()?;
        self.direct("enable", uid, &pf, || {
            Ok(self
                .guarded
                .enable_vfs(&pf, count)?
                .iter()
                .map(ToString::to_string)
                .collect())
        })
    }

    pub fn disable_vfs(&self, pf: &str, uid: u32) -> Result<Vec<String>, ApiError> {
        let pf: PciAddress = pf.parse()?;
        self.direct("disable", uid, &pf, || {
            self.guarded.disable_vfs(&pf)?;
            Ok(vec![pf.to_string()])
        })
    }

    pub fn bind(&self, addr: &str, whole_group: bool, uid: u32) -> Result<Vec<String>, ApiError> {
        let a: PciAddress = addr.parse()?;
        self.direct("bind", uid, &a, || {
            Ok(moved(self.guarded.bind_vfio(&a, whole_group)?))
        })
    }

    pub fn unbind(&self, addr: &str, whole_group: bool, uid: u32) -> Result<Vec<String>, ApiError> {
        let a: PciAddress = addr.parse()?;
        self.direct("unbind", uid, &a, || {
            Ok(moved(self.guarded.unbind(&a, whole_group, None)?))
        })
    }

    /// Quarantined devices: (name, reason, since).
    pub fn orphans(&self) -> Result<Vec<(String, String, u64)>, ApiError> {
        self.store().quarantine_list().map_err(failed)
    }

    /// Ends a quarantine and offers the device again as it is: the operator's word
    /// that no lost lease uses it.
    pub fn adopt_orphan(&self, name: &str, uid: u32) -> Result<(), ApiError> {
        let name = orphan_name(name)?;
        let r = match self.store().unquarantine(&name).map_err(failed)? {
            true => Ok(()),
            false => Err(not_quarantined(&name)),
        };
        self.audit
            .record(uid, "orphan-adopt", "", "", &[name], &verdict(&r));
        r
    }

    /// Returns a quarantined function to its host driver, or removes a quarantined
    /// mdev, then ends its quarantine. Refused while a VMM holds it open.
    pub fn free_orphan(&self, name: &str, uid: u32) -> Result<(), ApiError> {
        let name = orphan_name(name)?;
        if self.store().quarantined(&name).map_err(failed)?.is_none() {
            return Err(not_quarantined(&name));
        }
        let Ok(a) = name.parse::<PciAddress>() else {
            // Removing an mdev ends its quarantine.
            return self.remove_mdev(&name, false, uid);
        };
        self.direct("orphan-free", uid, &a, || {
            Ok(moved(self.guarded.unbind(&a, false, None)?))
        })?;
        self.store().unquarantine(&name).map_err(failed).map(drop)
    }

    /// One direct operation: serialized, recorded as an intent, audited, and the
    /// table re-read after it.
    fn direct(
        &self,
        op: &str,
        uid: u32,
        dev: &PciAddress,
        f: impl FnOnce() -> Result<Vec<String>, ApiError>,
    ) -> Result<Vec<String>, ApiError> {
        let r = self.timed(op, || {
            let _alone = self.exclusive();
            let intent = self
                .store()
                .begin_intent(op, "", &dev.to_string(), Guards::Kernel)
                .map_err(failed)?;
            let r = f();
            let _ = self.store().end_intent(intent);
            r
        });
        let outcome = verdict(&r);
        let changed = r
            .as_ref()
            .map_or_else(|_| vec![dev.to_string()], Clone::clone);
        self.audit.record(uid, op, "", "", &changed, &outcome);
        r
    }

    // ---- start-up ------------------------------------------------------------------

    /// Settles operations that a crash cut off, then makes the table match sysfs.
    /// Returns one line per repair or drift, for the log.
    pub fn recover(&self) -> Result<Vec<String>, ApiError> {
        let _alone = self.exclusive();
        let mut log = Vec::new();
        let intents = self.store().intents().map_err(failed)?;
        for i in intents {
            match i.op.as_str() {
                "provision" => {
                    for held in Planned::read(&i.body) {
                        let addr = held.name();
                        let leased = self.store().holder(&addr).map_err(failed)?.is_some();
                        if leased || held.driver_before() == VFIO_PCI {
                            continue;
                        }
                        let r = self.undo_device(&held);
                        log.push(format!(
                            "recovery: provision of lease {} was cut off; {} {addr} undone: {}",
                            i.lease_id,
                            held.kind(),
                            outcome(&r)
                        ));
                    }
                    self.store().end_intent(i.id).map_err(failed)?;
                }
                "release" => {
                    match self.lease_row(&i.lease_id)? {
                        Some(row) => {
                            self.return_all(&row);
                            let drivers = self.drivers_now(&addrs_of(&row));
                            self.store()
                                .commit_release(&row, Some(i.id), &drivers)
                                .map_err(failed)?;
                            log.push(format!("recovery: finished the release of lease {} (VM {}) that was cut off", row.id, row.request.vm_name));
                        }
                        None => self.store().end_intent(i.id).map_err(failed)?,
                    }
                }
                op if op.starts_with("mdev-") => {
                    log.push(self.recover_mdev(op, &i.body));
                    self.store().end_intent(i.id).map_err(failed)?;
                }
                op => {
                    log.push(format!(
                        "recovery: {op} on {} was cut off; the table is re-read from sysfs",
                        i.body
                    ));
                    self.store().end_intent(i.id).map_err(failed)?;
                }
            }
        }
        log.extend(self.reconcile()?);
        Ok(log)
    }

    /// Leased devices must be on vfio-pci: rebinds those that are not (drift from a
    /// manual change or a crash) and marks vanished ones `missing`.
    fn reconcile(&self) -> Result<Vec<String>, ApiError> {
        let mut log = Vec::new();
        self.refresh()?;
        for row in self.store().leases().map_err(failed)? {
            for held in &row.devices {
                let addr = &held.name();
                let gone = || {
                    format!(
                        "drift: {addr} of lease {} (VM {}) is gone from sysfs; marked missing",
                        row.id, row.request.vm_name
                    )
                };
                // An mdev is there or gone: it cannot be rebound (kernel rule 6, docs/kernel.md).
                if let Some(uuid) = held.mdev() {
                    if !mediated_dev::host::mdev_exists(&self.sys, &uuid) {
                        log.push(gone());
                    }
                    continue;
                }
                let f = held.pci().and_then(|a| PciFunction::read(&self.sys, &a));
                match f {
                    None => log.push(gone()),
                    Some(f) if !f.on_vfio() => {
                        let r = self.raw.bind_vfio(&f.address, false).map(|_| ());
                        if let Err(e) = &r {
                            self.mark_failed(addr, &e.to_string());
                        }
                        log.push(format!("drift: {addr} of lease {} (VM {}) was on {:?}, not vfio-pci; rebound: {}", row.id, row.request.vm_name, f.driver, outcome(&r)));
                    }
                    Some(_) => {}
                }
            }
        }
        self.refresh()?;
        log.extend(self.quarantine_orphans()?);
        Ok(log)
    }

    /// Functions on vfio-pci with our `driver_override` (not in `bind`) and mdevs
    /// that nobody defined, which no lease holds: a lease the table lost (a missing
    /// WAL, a restored backup) would explain them, so they are quarantined and never
    /// offered until an operator adopts or frees them (`vfctl orphan`).
    fn quarantine_orphans(&self) -> Result<Vec<String>, ApiError> {
        let bound: BTreeSet<String> = self.config.bind.iter().map(ToString::to_string).collect();
        let mut found = Vec::new();
        for d in self.devices()? {
            if d.driver != VFIO_PCI || !d.lease_id.is_empty() || bound.contains(&d.address) {
                continue;
            }
            let ours = d
                .address
                .parse()
                .ok()
                .and_then(|a| PciFunction::read_brief(&self.sys, &a))
                .is_some_and(|f| f.driver_override.as_deref() == Some(VFIO_PCI));
            if ours {
                found.push((
                    d.address,
                    "on vfio-pci with our driver_override and no lease",
                ));
            }
        }
        found.extend(self.orphan_mdevs()?);
        let mut log = Vec::new();
        for (name, why) in found {
            if self.store().quarantine(&name, why).map_err(failed)? {
                self.audit
                    .record(0, "quarantine", "", "", std::slice::from_ref(&name), why);
                log.push(format!(
                    "orphan: {name}: {why}; quarantined: `vfctl orphan adopt {name}` offers it again as it is, `vfctl orphan free {name}` returns it to the host"
                ));
            }
        }
        Ok(log)
    }

    /// Brings the host to the configured state: VFs first (autoprobe off), then
    /// bindings, then the mdevs defined `auto` in mdevctl's files. Each step is retried a few times; what still fails is reported.
    pub fn restore_desired(&self) -> Vec<String> {
        let mut log = Vec::new();
        for (pf, n) in self.config.pfs.clone() {
            let r = retry(|| self.enable_vfs(&pf.to_string(), Some(n), 0));
            log.push(format!("restore: {pf}: {n} VFs: {}", outcome(&r)));
        }
        for a in self.config.bind.clone() {
            let r = retry(|| self.bind(&a.to_string(), false, 0));
            log.push(format!("restore: {a}: vfio-pci: {}", outcome(&r)));
        }
        // After the VFs: an mdev's parent may be one of them.
        log.extend(self.start_defined());
        if let Err(e) = self.refresh() {
            log.push(format!("restore: cannot re-read the table: {e}"));
        }
        log
    }

    /// Whether `uid` may change the host: root, the configured uids, members of the
    /// configured group.
    pub fn allowed(&self, uid: u32) -> bool {
        let d = &self.config.daemon;
        uid == 0 || d.allowed_uids.contains(&uid) || super::auth::in_group(uid, &d.allowed_group)
    }
}

/// A quarantined device's name: a PCI address or an mdev UUID, in the table's form.
fn orphan_name(s: &str) -> Result<String, ApiError> {
    match s.parse::<PciAddress>() {
        Ok(a) => Ok(a.to_string()),
        Err(_) => Ok(crate::api::ids::parse_uuid(s)
            .map_err(|_| {
                crate::api::ids::IdError::new(
                    "device",
                    s,
                    "give a PCI address (dddd:bb:dd.f) or an mdev UUID",
                )
            })?
            .to_string()),
    }
}

fn not_quarantined(name: &str) -> ApiError {
    ApiError::NotFound(format!(
        "{name} is not quarantined; `vfctl orphans` lists the devices that are"
    ))
}

/// An operation's outcome for the audit log and signals: `ok` or the error.
pub fn verdict<T>(r: &Result<T, ApiError>) -> String {
    r.as_ref().map_or_else(ToString::to_string, |_| "ok".into())
}

fn retry<T>(mut f: impl FnMut() -> Result<T, ApiError>) -> Result<T, ApiError> {
    let mut last = None;
    for attempt in 0..3 {
        match f() {
            Ok(v) => return Ok(v),
            // Refusals and bad input will not change by retrying.
            Err(e @ (ApiError::Refused(_) | ApiError::BadInput(_) | ApiError::NotFound(_))) => {
                return Err(e)
            }
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(200 << attempt));
    }
    Err(last.expect("three attempts"))
}

fn outcome<T, E: std::fmt::Display>(r: &Result<T, E>) -> String {
    r.as_ref()
        .map_or_else(|e| format!("failed: {e}"), |_| "ok".into())
}

fn moved(m: Vec<vf_provisioner::ops::bind::Moved>) -> Vec<String> {
    m.iter().map(|m| m.address.to_string()).collect()
}

/// The driver a device had before its lease, as the table records it ("": none).
fn driver_before(before: &str) -> Option<&str> {
    (!before.is_empty()).then_some(before)
}

fn addrs_of(row: &LeaseRow) -> Vec<String> {
    row.devices.iter().map(Held::name).collect()
}

fn addresses(l: &Lease) -> Vec<String> {
    l.devices.iter().map(|d| d.address.clone()).collect()
}

fn normalize(s: &str) -> String {
    s.parse::<PciAddress>()
        .map_or_else(|_| s.to_string(), |a| a.to_string())
}

/// A gate refusal of a device a request named, for VM `vm`.
fn refused_for(vm: &str, r: Refusal) -> ApiError {
    ApiError::Refused(format!(
        "VM {vm}: {r}; or pick another device (`vfctl list`)"
    ))
}

fn profile_matches(profile: &str, pf: &PciFunction) -> bool {
    profile == "vf" || profile == pf.id
}

/// A lease id: 16 hex digits from the kernel's random source.
pub fn new_id() -> String {
    // A v4 UUID's first 8 bytes are random (getrandom, no file to open).
    let b = uuid::Uuid::new_v4().into_bytes();
    let n = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
    format!("{n:016x}")
}
