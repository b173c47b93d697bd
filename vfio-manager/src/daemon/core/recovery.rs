//! The recovery service: what happens to a lease when one of its devices fails,
//! kept apart from how the failure was found (`health`). The lease's policy
//! (`on_failure`, `RecoveryConfig::policy`) says `notify` (the bus layer signals
//! `LeaseDegraded`; nothing here) or `replace`:
//!
//! 1. a healthy equivalent is chosen: for a VF, like a pool VF (a VF of the same PF
//!    model, on the failed one's NUMA node first, passed by the gate); for a whole
//!    device, another whose IOMMU group has the same functions, all free (the lease's
//!    functions of the failed one's group swap as one unit); for an mdev, a new one
//!    of the lease's profile where there is room;
//! 2. the swap's intent is written;
//! 3. the replacement is made usable: bound to vfio-pci (and probed), or created;
//! 4. the VM's manager plugs it in, then unplugs the failed one (`vmm`); a VM the
//!    daemon cannot reach gets it through the `LeaseRecovered` signal;
//! 5. the lease, keeping its id, holds the replacement instead, and the swap is
//!    recorded, in one commit that ends the intent.
//!
//! The failed device stays held back (it was when it failed). A swap cut off by a
//! crash is settled at start: kept if the VM already holds the replacement open,
//! undone otherwise.

use mediated_dev::plan::Target;
use serde::{Deserialize, Serialize};
use vf_provisioner::PciAddress;

use super::{device_name, failed, Guards, Recovery};
use crate::api::ids::{Held, OnFailure, Vmm};
use crate::api::{ApiError, Request};
use crate::daemon::store::{Intent, LeaseRow};
use crate::vmm::{reach, Hotplug};

/// A finished swap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Swap {
    pub lease: String,
    pub vm: String,
    pub failed: String,
    pub replacement: String,
    /// What the VM's manager did: `plugged by libvirt`, or why it did not.
    pub vm_side: String,
}

/// What a swap's intent records, for recovery: the device swapped out and its
/// replacement, and for a whole device the rest of its IOMMU group, swapped with it.
#[derive(Serialize, Deserialize)]
struct SwapIntent {
    failed: String,
    /// The replacement as the table's columns (`Held::to_row`).
    replacement: String,
    driver_before: String,
    kind: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    with: Vec<SwapIntent>,
}

/// A device swapped out, and its replacement.
type Pair<'a> = (&'a Held, Held);

impl SwapIntent {
    fn new(pairs: &[Pair<'_>]) -> SwapIntent {
        let one = |(old, new): &Pair<'_>| {
            let (replacement, kind, driver_before) = new.to_row();
            SwapIntent {
                failed: old.name(),
                replacement,
                driver_before,
                kind: kind.to_string(),
                with: Vec::new(),
            }
        };
        SwapIntent {
            with: pairs[1..].iter().map(one).collect(),
            ..one(&pairs[0])
        }
    }

    /// Each (swapped out, replacement) it records, the failed device first.
    fn pairs(&self) -> Option<Vec<(String, Held)>> {
        std::iter::once(self)
            .chain(&self.with)
            .map(|s| {
                let new = Held::from_row(&s.replacement, &s.kind, &s.driver_before).ok()?;
                Some((s.failed.clone(), new))
            })
            .collect()
    }
}

impl Recovery<'_> {
    /// What the policy of the lease holding `name` does now that it failed: `None`
    /// when no lease holds it or the policy is `notify`.
    pub fn after_failure(&self, name: &str, why: &str) -> Option<Result<Swap, ApiError>> {
        let (lease, _) = self.holder(name)?;
        let row = self.lease_row(&lease).ok()??;
        if self.config().recovery.policy(&row.request) != OnFailure::Replace {
            return None;
        }
        Some(self.replace(name, why, 0))
    }

    /// Swaps device `name` of its lease for a healthy equivalent (policy `replace`,
    /// or an operator's `vfctl replace`). Audited.
    pub fn replace(&self, name: &str, why: &str, uid: u32) -> Result<Swap, ApiError> {
        let r = self.timed("replace", || {
            let _shared = self.shared();
            self.replace_shared(name, why, uid)
        });
        let shown = device_name(name).unwrap_or_else(|_| crate::api::ids::quote(name));
        self.audit
            .record(uid, "replace", "", "", &[shown], &swap_verdict(&r));
        r
    }

    fn replace_shared(&self, name: &str, why: &str, uid: u32) -> Result<Swap, ApiError> {
        let name = device_name(name)?;
        let not_leased = || {
            ApiError::NotFound(format!(
                "{name}: no lease holds it; only a leased device is replaced (`vfctl leases`)"
            ))
        };
        let (lease, _) = self.holder(&name).ok_or_else(not_leased)?;
        let row = self.lease_row(&lease)?.ok_or_else(not_leased)?;
        // A release or another swap of the same lease waits for this one.
        let _claim = self.claims.wait(super::addrs_of(&row));
        let row = self.lease_row(&lease)?.ok_or_else(not_leased)?;
        if uid != 0 && uid != row.owner {
            return Err(ApiError::PermissionDenied(format!(
                "{name}: lease {} of VM {} was made by uid {}; only that user or root may swap its devices",
                row.id, row.request.vm_name, row.owner
            )));
        }
        let old = row
            .devices
            .iter()
            .find(|h| h.name() == name)
            .ok_or_else(not_leased)?;
        match old {
            Held::Function { address, .. } => self.swap_in(&row, *address, why),
            Held::MadeMdev(_) | Held::KeptMdev(_) => self.swap_mdev(&row, old, why),
            Held::Vgpu(_) => self.swap_vgpu(&row, old, why),
        }
    }

    /// Another VF given the lease's vGPU type (placed as a lease's is) in place of
    /// VF `old`. The planner stays locked until the swap ends, so that no lease
    /// takes the planned VF meanwhile (an undo would clear that lease's type).
    fn swap_vgpu(&self, row: &LeaseRow, old: &Held, why: &str) -> Result<Swap, ApiError> {
        let _one = self.mediating();
        let target = self.plan_one(&row.request.profile)?;
        let Target::Vgpu { vf, .. } = target else {
            return Err(ApiError::NoDevice(format!(
                "{}: {:?} fits only as an mdev now, not on a VF; stop its VM and lease another",
                old.name(),
                row.request.profile
            )));
        };
        let make = || self.make(&target, None);
        self.swap(row, vec![(old, Held::Vgpu(vf))], make, why)
    }

    /// A new mdev of the lease's profile (placed as a lease's is: where there is
    /// room, on a parent the gate allows) in place of mdev `old`.
    fn swap_mdev(&self, row: &LeaseRow, old: &Held, why: &str) -> Result<Swap, ApiError> {
        let uuid = uuid::Uuid::new_v4();
        let profile = row.request.profile.clone();
        let make = || self.make_one(uuid, &profile);
        self.swap(row, vec![(old, Held::MadeMdev(uuid))], make, why)
    }

    /// The swaps of lease `lease` (`LeaseSwaps`): (swapped out, replacement,
    /// reason, when), oldest first.
    pub fn swaps(&self, lease: &str) -> Result<Vec<(String, String, String, u64)>, ApiError> {
        let id = crate::api::ids::LeaseId::new(lease)?;
        self.store().swaps(id.as_str()).map_err(failed)
    }

    /// A vanished function of lease `lease`, whose policy is `replace`: swapped for
    /// an equivalent as a failed one is. `None` when the policy is `notify`.
    pub fn replace_vanished(
        &self,
        lease: &str,
        gone: PciAddress,
    ) -> Option<Result<Swap, ApiError>> {
        let row = self.lease_row(lease).ok()??;
        if self.config().recovery.policy(&row.request) != OnFailure::Replace {
            return None;
        }
        let r = self.swap_in(&row, gone, "it is gone from the host");
        let vm = &row.request.vm_name;
        let verdict = swap_verdict(&r);
        self.audit
            .record(0, "replace", lease, vm, &[gone.to_string()], &verdict);
        Some(r)
    }

    /// Leases an equivalent of function `broken` and swaps it into `row` (steps 1-5):
    /// for a VF another VF, for a whole device another whole device with the same
    /// functions, its IOMMU group swapped as one unit.
    fn swap_in(&self, row: &LeaseRow, broken: PciAddress, why: &str) -> Result<Swap, ApiError> {
        let old = row
            .devices
            .iter()
            .find(|h| h.pci() == Some(broken))
            .ok_or_else(|| {
                ApiError::NotFound(format!("{broken}: lease {} does not hold it", row.id))
            })?;
        let me = self.device(&broken.to_string());
        if me.as_ref().is_some_and(|d| d.pf.is_empty()) {
            return self.swap_group(row, broken, why);
        }
        let pool = self.pool();
        let mut tried = Err(ApiError::NoDevice(String::new()));
        for want in self.equivalents(&row.request, broken)? {
            tried = pool.choose(&want);
            if tried.is_ok() {
                break;
            }
        }
        let (chosen, _spare) =
            tried.map_err(|e| ApiError::NoDevice(format!("{broken}: no replacement: {e}")))?;
        self.swap_chosen(row, vec![old], &chosen, why)
    }

    /// Whole device `broken` and the other functions of its IOMMU group that lease
    /// `row` holds, for another whole device whose group has the same functions
    /// (vendor:device, in address order), all free; on `broken`'s NUMA node first.
    fn swap_group(&self, row: &LeaseRow, broken: PciAddress, why: &str) -> Result<Swap, ApiError> {
        let table = self.devices()?;
        let group = |g: i32| -> Vec<&crate::api::DeviceInfo> {
            table
                .iter()
                .filter(|d| g >= 0 && d.iommu_group == g && d.pf.is_empty())
                .collect()
        };
        let me = table.iter().find(|d| d.address == broken.to_string());
        let (mine, node) = me.map_or((-1, -1), |d| (d.iommu_group, d.numa_node));
        let members = group(mine);
        let olds: Vec<&Held> = members
            .iter()
            .filter_map(|d| row.devices.iter().find(|h| h.name() == d.address))
            .collect();
        let ids: Vec<&str> = members.iter().map(|d| d.id.as_str()).collect();
        let mut candidates: Vec<Vec<&crate::api::DeviceInfo>> = table
            .iter()
            .filter(|d| d.pf.is_empty() && d.iommu_group >= 0 && d.iommu_group != mine)
            .map(|d| d.iommu_group)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .map(group)
            .filter(|g| g.iter().map(|d| d.id.as_str()).eq(ids.iter().copied()))
            .filter(|g| g.iter().all(|d| d.health == "ok" && d.lease_id.is_empty()))
            .collect();
        candidates.sort_by_key(|g| g[0].numa_node != node);
        let mut tried = format!(
            "no free whole device with the functions {}",
            ids.join(" + ")
        );
        for g in candidates {
            let want = Request {
                vm_name: row.request.vm_name.clone(),
                profile: row.request.profile.clone(),
                devices: g.iter().map(|d| d.address.clone()).collect(),
                count: g.len() as u32,
                ..Request::default()
            };
            match self.pool().choose(&want) {
                Ok((chosen, _claim)) => return self.swap_chosen(row, olds, &chosen, why),
                Err(e) => tried = e.to_string(),
            }
        }
        Err(ApiError::NoDevice(format!(
            "{broken}: no replacement for the whole device (its IOMMU group {mine}: {}): {tried}",
            olds.iter().map(|h| h.name()).collect::<Vec<_>>().join(", ")
        )))
    }

    /// Swaps `olds` for the functions `chosen` (gated and claimed), in order: each
    /// bound to vfio-pci and probed.
    fn swap_chosen(
        &self,
        row: &LeaseRow,
        olds: Vec<&Held>,
        chosen: &[vf_provisioner::ops::Passed],
        why: &str,
    ) -> Result<Swap, ApiError> {
        let news = chosen.iter().map(|p| {
            let f = p.function();
            Held::Function {
                address: f.address,
                driver_before: f.driver.clone().unwrap_or_default(),
            }
        });
        let mut pairs: Vec<Pair<'_>> = olds.into_iter().zip(news).collect();
        // The failed one first: the swap is named after it.
        pairs.sort_by_key(|(old, _)| !self.failed_or_held(&old.name()));
        let make = || {
            for p in chosen {
                let a = p.function().address;
                self.raw.bind_passed(p).map_err(|e| {
                    self.mark_failed(&a.to_string(), &e.to_string());
                    ApiError::from(e)
                })?;
            }
            chosen
                .iter()
                .try_for_each(|p| self.probe_dma(&p.function().address))
        };
        self.swap(row, pairs, make, why)
    }

    /// Whether the table holds `name` back (failed or quarantined).
    fn failed_or_held(&self, name: &str) -> bool {
        matches!(self.store().held_back(name), Ok(Some(_)))
    }

    /// What a replacement of VF `broken` may be, best first: a VF of the same PF
    /// model on its NUMA node, then (when the lease did not ask for a node) on any.
    /// From the table: a failed function may not answer for its attributes, and a
    /// vanished one has none.
    fn equivalents(&self, req: &Request, broken: PciAddress) -> Result<Vec<Request>, ApiError> {
        let me = self.device(&broken.to_string());
        let model = me
            .as_ref()
            .filter(|d| !d.pf.is_empty())
            .and_then(|d| self.device(&d.pf))
            .map(|pf| pf.id)
            .ok_or_else(|| {
                ApiError::Refused(format!(
                    "{broken}: not a VF of a PF we manage, and not a whole device either; stop its VM and lease another"
                ))
            })?;
        let want = |numa_node: i32| Request {
            vm_name: req.vm_name.clone(),
            profile: model.clone(),
            count: 1,
            numa_node,
            ..Request::default()
        };
        let node = me.map_or(-1, |d| d.numa_node);
        let near = if node >= 0 { node } else { req.numa_node };
        let mut out = vec![want(near)];
        if req.numa_node < 0 && near >= 0 {
            out.push(want(-1));
        }
        Ok(out)
    }

    /// Steps 2-5 of the module's list for each pair: the intent, `make` (the
    /// replacements made usable: functions bound and probed, an mdev created), the
    /// VM's side, the commit.
    fn swap(
        &self,
        row: &LeaseRow,
        pairs: Vec<Pair<'_>>,
        make: impl FnOnce() -> Result<(), ApiError>,
        why: &str,
    ) -> Result<Swap, ApiError> {
        let body = serde_json::to_string(&SwapIntent::new(&pairs)).expect("serializes");
        let intent = self
            .store()
            .begin_intent("swap", &row.id, &body, Guards::Kernel)
            .map_err(failed)?;
        let undo = |e: ApiError| {
            for (_, new) in pairs.iter().rev() {
                let _ = self.undo_device(new);
            }
            let _ = self.store().end_intent(intent);
            e
        };
        make().map_err(undo)?;
        let vmm: Vmm = row.request.vmm.parse().unwrap_or(Vmm::Other);
        let hands = reach(&vmm, &row.request.vm_name, &self.config().recovery);
        let vm_side = match &hands {
            Some(h) => self.plug_swap(h.as_ref(), &pairs).map_err(undo)?,
            None => {
                "no VMM to reach: whoever runs the VM plugs it (LeaseRecovered names it)".into()
            }
        };
        let done: Vec<(String, Held)> = pairs.iter().map(|(o, n)| (o.name(), n.clone())).collect();
        let names: Vec<String> = pairs.iter().map(|(_, n)| n.name()).collect();
        let drivers = self.drivers_now(&names);
        let reason = |new: &Held| format!("replaced in lease {} by {}: {why}", row.id, new.name());
        self.store()
            .commit_swap(&row.id, &done, reason, intent, &drivers)
            .map_err(failed)?;
        self.usage().lease_changed(&row.id);
        Ok(Swap {
            lease: row.id.clone(),
            vm: row.request.vm_name.clone(),
            failed: pairs[0].0.name(),
            replacement: pairs[0].1.name(),
            vm_side,
        })
    }

    /// Plugs the replacements into the VM, then unplugs the devices swapped out, then
    /// runs the VM again if its VMM stopped it on the failed device's error. A failed
    /// plug undoes the swap (the VM keeps what it had); a failed unplug or restart
    /// does not (the VM has both, or stays stopped; the swapped-out one stays held
    /// back).
    fn plug_swap(&self, h: &dyn Hotplug, pairs: &[Pair<'_>]) -> Result<String, ApiError> {
        let list = |f: fn(&Pair<'_>) -> String| pairs.iter().map(f).collect::<Vec<_>>().join(" + ");
        let (by, gone, came) = (h.name(), list(|p| p.0.name()), list(|p| p.1.name()));
        for (i, (_, new)) in pairs.iter().enumerate() {
            if let Err(e) = h.plug(&self.held_view(new)) {
                for (_, plugged) in pairs[..i].iter().rev() {
                    let _ = h.unplug(&self.held_view(plugged));
                }
                return Err(ApiError::Failed(format!(
                    "{gone}: {by} could not take its replacement {}: {e}; the VM keeps the failed device",
                    new.name()
                )));
            }
        }
        let stuck: Vec<String> = pairs
            .iter()
            .filter_map(|(old, _)| {
                let e = h.unplug(&self.held_view(old)).err()?;
                Some(format!("{}: {e}", old.name()))
            })
            .collect();
        let swapped = match stuck.is_empty() {
            true => format!("{by} plugged {came} and unplugged {gone}"),
            false => format!(
                "{by} plugged {came} but could not unplug {}; it stays held back",
                stuck.join("; ")
            ),
        };
        Ok(match h.restart_if_stopped() {
            Ok(None) => swapped,
            Ok(Some(done)) => format!("{swapped}; {done}"),
            Err(e) => format!("{swapped}; the VM, stopped by its VMM, could not be run again: {e}"),
        })
    }

    /// Settles a swap that a crash cut off: kept if the VM holds the replacement
    /// open (its manager plugged it), undone otherwise. Returns the line for the log.
    pub fn settle(&self, i: &Intent) -> String {
        let pairs = serde_json::from_str::<SwapIntent>(&i.body)
            .ok()
            .and_then(|s| s.pairs());
        let Some(pairs) = pairs.filter(|p| !p.is_empty()) else {
            let _ = self.store().end_intent(i.id);
            return format!(
                "recovery: swap in lease {} was cut off; its record is unreadable",
                i.lease_id
            );
        };
        let (failed, new) = (&pairs[0].0, &pairs[0].1);
        let leased = self.store().holder(failed).ok().flatten();
        let what = match (self.held_open(new), leased) {
            (true, Some((lease, _))) if lease == i.lease_id => {
                let names: Vec<String> = pairs.iter().map(|(_, n)| n.name()).collect();
                let drivers = self.drivers_now(&names);
                let reason = |n: &Held| {
                    format!(
                        "replaced in lease {} by {} (finished at start-up)",
                        i.lease_id,
                        n.name()
                    )
                };
                match self
                    .store()
                    .commit_swap(&i.lease_id, &pairs, reason, i.id, &drivers)
                {
                    Ok(()) => {
                        "kept: the VM holds the replacement, and now so does the lease".into()
                    }
                    Err(e) => format!("could not be kept: {e}"),
                }
            }
            _ => {
                let r = pairs
                    .iter()
                    .rev()
                    .try_for_each(|(_, n)| match n.driver_before() {
                        super::VFIO_PCI => Ok(()),
                        _ => self.undo_device(n),
                    });
                let _ = self.store().end_intent(i.id);
                // A failed device's policy runs again once the daemon is up (an
                // operator's swap is the operator's to ask again).
                if matches!(self.store().held_back(failed), Ok(Some((_, true)))) {
                    self.note_failure(failed, "its swap was cut off by a restart");
                }
                format!(
                    "undone (the replacement removed or back to its driver: {})",
                    super::outcome(&r)
                )
            }
        };
        format!(
            "recovery: the swap of {failed} for {} in lease {} was cut off; {what}",
            new.name(),
            i.lease_id
        )
    }
}

/// A swap's outcome for the audit log.
fn swap_verdict(r: &Result<Swap, ApiError>) -> String {
    match r {
        Ok(s) => format!(
            "ok: replaced by {} in lease {} ({})",
            s.replacement, s.lease, s.vm_side
        ),
        Err(e) => e.to_string(),
    }
}
