//! The recovery service: what happens to a lease when one of its devices fails,
//! kept apart from how the failure was found (`health`). The lease's policy
//! (`on_failure`, `RecoveryConfig::policy`) says `notify` (the bus layer signals
//! `LeaseDegraded`; nothing here) or `replace`:
//!
//! 1. a healthy equivalent is chosen: for a VF, like a pool VF (a VF of the same PF
//!    model, on the failed one's NUMA node first, passed by the gate); for an mdev,
//!    a new one of the lease's profile where there is room;
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

/// What a swap's intent records, for recovery.
#[derive(Serialize, Deserialize)]
struct SwapIntent {
    failed: String,
    /// The replacement as the table's columns (`Held::to_row`).
    replacement: String,
    driver_before: String,
    kind: String,
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
        self.swap(row, old, Held::Vgpu(vf), || self.make(&target, None), why)
    }

    /// A new mdev of the lease's profile (placed as a lease's is: where there is
    /// room, on a parent the gate allows) in place of mdev `old`.
    fn swap_mdev(&self, row: &LeaseRow, old: &Held, why: &str) -> Result<Swap, ApiError> {
        let uuid = uuid::Uuid::new_v4();
        let profile = row.request.profile.clone();
        let make = || self.make_one(uuid, &profile);
        self.swap(row, old, Held::MadeMdev(uuid), make, why)
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

    /// Leases an equivalent of function `broken` and swaps it into `row` (steps 1-5).
    fn swap_in(&self, row: &LeaseRow, broken: PciAddress, why: &str) -> Result<Swap, ApiError> {
        let old = row
            .devices
            .iter()
            .find(|h| h.pci() == Some(broken))
            .ok_or_else(|| {
                ApiError::NotFound(format!("{broken}: lease {} does not hold it", row.id))
            })?;
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
        let f = chosen[0].function();
        let new = Held::Function {
            address: f.address,
            driver_before: f.driver.clone().unwrap_or_default(),
        };
        let make = || {
            self.raw.bind_passed(&chosen[0]).map_err(|e| {
                self.mark_failed(&f.address.to_string(), &e.to_string());
                ApiError::from(e)
            })?;
            self.probe_dma(&f.address)
        };
        self.swap(row, old, new, make, why)
    }

    /// What a replacement of `broken` may be, best first: a VF of the same PF model
    /// on its NUMA node, then (when the lease did not ask for a node) on any. From
    /// the table: a failed function may not answer for its attributes, and a
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
                    "{broken}: not a VF of a PF we manage: a whole device has no equivalent to swap in; stop its VM and lease another"
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

    /// Steps 2-5 of the module's list: the intent, `make` (the replacement made
    /// usable: a function bound and probed, an mdev created), the VM's side, the
    /// commit.
    fn swap(
        &self,
        row: &LeaseRow,
        old: &Held,
        new: Held,
        make: impl FnOnce() -> Result<(), ApiError>,
        why: &str,
    ) -> Result<Swap, ApiError> {
        let (name, kind, before) = new.to_row();
        let body = SwapIntent {
            failed: old.name(),
            replacement: name.clone(),
            driver_before: before,
            kind: kind.to_string(),
        };
        let body = serde_json::to_string(&body).expect("serializes");
        let intent = self
            .store()
            .begin_intent("swap", &row.id, &body, Guards::Kernel)
            .map_err(failed)?;
        let undo = |e: ApiError| {
            let _ = self.undo_device(&new);
            let _ = self.store().end_intent(intent);
            e
        };
        make().map_err(undo)?;
        let vmm: Vmm = row.request.vmm.parse().unwrap_or(Vmm::Other);
        let hands = reach(&vmm, &row.request.vm_name, &self.config().recovery);
        let vm_side = match &hands {
            Some(h) => self.plug_swap(h.as_ref(), old, &new).map_err(undo)?,
            None => {
                "no VMM to reach: whoever runs the VM plugs it (LeaseRecovered names it)".into()
            }
        };
        let reason = format!("replaced in lease {} by {name}: {why}", row.id);
        let drivers = self.drivers_now(std::slice::from_ref(&name));
        self.store()
            .commit_swap(&row.id, &old.name(), &new, &reason, intent, &drivers)
            .map_err(failed)?;
        self.usage().lease_changed(&row.id);
        Ok(Swap {
            lease: row.id.clone(),
            vm: row.request.vm_name.clone(),
            failed: old.name(),
            replacement: name,
            vm_side,
        })
    }

    /// Plugs the replacement into the VM, then unplugs the failed one. A failed
    /// plug undoes the swap (the VM keeps what it had); a failed unplug does not
    /// (the VM has both; the failed one stays held back).
    fn plug_swap(&self, h: &dyn Hotplug, old: &Held, new: &Held) -> Result<String, ApiError> {
        let (by, gone, came) = (h.name(), old.name(), new.name());
        h.plug(&self.held_view(new)).map_err(|e| {
            ApiError::Failed(format!(
                "{gone}: {by} could not take its replacement {came}: {e}; the VM keeps the failed device"
            ))
        })?;
        Ok(match h.unplug(&self.held_view(old)) {
            Ok(()) => format!("{by} plugged {came} and unplugged {gone}"),
            Err(e) => {
                format!("{by} plugged {came} but could not unplug {gone}: {e}; it stays held back")
            }
        })
    }

    /// Settles a swap that a crash cut off: kept if the VM holds the replacement
    /// open (its manager plugged it), undone otherwise. Returns the line for the log.
    pub fn settle(&self, i: &Intent) -> String {
        let parsed = serde_json::from_str::<SwapIntent>(&i.body)
            .ok()
            .and_then(|s| {
                Some((
                    Held::from_row(&s.replacement, &s.kind, &s.driver_before).ok()?,
                    s,
                ))
            });
        let Some((new, s)) = parsed else {
            let _ = self.store().end_intent(i.id);
            return format!(
                "recovery: swap in lease {} was cut off; its record is unreadable",
                i.lease_id
            );
        };
        let leased = self.store().holder(&s.failed).ok().flatten();
        let what = match (self.held_open(&new), leased) {
            (true, Some((lease, _))) if lease == i.lease_id => {
                let drivers = self.drivers_now(std::slice::from_ref(&s.replacement));
                let reason = format!(
                    "replaced in lease {} by {} (finished at start-up)",
                    i.lease_id, s.replacement
                );
                match self.store().commit_swap(
                    &i.lease_id,
                    &s.failed,
                    &new,
                    &reason,
                    i.id,
                    &drivers,
                ) {
                    Ok(()) => {
                        "kept: the VM holds the replacement, and now so does the lease".into()
                    }
                    Err(e) => format!("could not be kept: {e}"),
                }
            }
            _ => {
                let r = match new.driver_before() {
                    super::VFIO_PCI => Ok(()),
                    _ => self.undo_device(&new),
                };
                let _ = self.store().end_intent(i.id);
                // A failed device's policy runs again once the daemon is up (an
                // operator's swap is the operator's to ask again).
                if matches!(self.store().held_back(&s.failed), Ok(Some((_, true)))) {
                    self.note_failure(&s.failed, "its swap was cut off by a restart");
                }
                format!(
                    "undone (the replacement removed or back to its driver: {})",
                    super::outcome(&r)
                )
            }
        };
        format!(
            "recovery: the swap of {} for {} in lease {} was cut off; {what}",
            s.failed, s.replacement, i.lease_id
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
