//! The recovery service: what happens to a lease when one of its devices fails,
//! kept apart from how the failure was found (`health`). The lease's policy
//! (`on_failure`, `RecoveryConfig::policy`) says `notify` (the bus layer signals
//! `LeaseDegraded`; nothing here) or `replace`:
//!
//! 1. a healthy equivalent is chosen like a pool VF (a VF of the same PF model, on
//!    the failed one's NUMA node first) and passed by the gate;
//! 2. the swap's intent is written;
//! 3. the replacement is bound to vfio-pci;
//! 4. the VM's manager plugs it in, then unplugs the failed one (`vmm`); a VM the
//!    daemon cannot reach gets it through the `LeaseRecovered` signal;
//! 5. the lease, keeping its id, holds the replacement instead, and the swap is
//!    recorded, in one commit that ends the intent.
//!
//! The failed device stays held back (it was when it failed). A swap cut off by a
//! crash is settled at start: kept if the VM already holds the replacement open,
//! undone otherwise.

use serde::{Deserialize, Serialize};
use vf_provisioner::ops::Passed;
use vf_provisioner::{holders, PciAddress, PciFunction};

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
    replacement: String,
    driver_before: String,
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
        let a: PciAddress = name.parse()?;
        let name = a.to_string();
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
        if !row
            .devices
            .iter()
            .any(|h| matches!(h, Held::Function { address, .. } if *address == a))
        {
            return Err(not_leased());
        }
        self.swap_in(&row, a, why)
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

    /// Leases an equivalent of `broken` and swaps it into `row` (steps 1-5).
    fn swap_in(&self, row: &LeaseRow, broken: PciAddress, why: &str) -> Result<Swap, ApiError> {
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
        self.swap(row, broken, &chosen[0], why)
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

    /// Steps 2-5 of the module's list: intent, bind, the VM's side, commit.
    fn swap(
        &self,
        row: &LeaseRow,
        broken: PciAddress,
        chosen: &Passed,
        why: &str,
    ) -> Result<Swap, ApiError> {
        let new = chosen.function();
        let held = Held::Function {
            address: new.address,
            driver_before: new.driver.clone().unwrap_or_default(),
        };
        let body = SwapIntent {
            failed: broken.to_string(),
            replacement: new.address.to_string(),
            driver_before: held.driver_before().to_string(),
        };
        let body = serde_json::to_string(&body).expect("serializes");
        let intent = self
            .store()
            .begin_intent("swap", &row.id, &body, Guards::Kernel)
            .map_err(failed)?;
        let undo = |e: ApiError| {
            let _ = self.undo_device(&held);
            let _ = self.store().end_intent(intent);
            e
        };
        if let Err(e) = self.raw.bind_passed(chosen) {
            self.mark_failed(&new.address.to_string(), &e.to_string());
            return Err(undo(e.into()));
        }
        self.probe_dma(&new.address).map_err(undo)?;
        let vmm: Vmm = row.request.vmm.parse().unwrap_or(Vmm::Other);
        let hands = reach(&vmm, &row.request.vm_name, &self.config().recovery);
        let vm_side = match &hands {
            Some(h) => self.plug_swap(h.as_ref(), broken, &held).map_err(undo)?,
            None => {
                "no VMM to reach: whoever runs the VM plugs it (LeaseRecovered names it)".into()
            }
        };
        let reason = format!("replaced in lease {} by {}: {why}", row.id, new.address);
        let drivers = self.drivers_now(&[new.address.to_string()]);
        self.store()
            .commit_swap(
                &row.id,
                &broken.to_string(),
                &held,
                &reason,
                intent,
                &drivers,
            )
            .map_err(failed)?;
        Ok(Swap {
            lease: row.id.clone(),
            vm: row.request.vm_name.clone(),
            failed: broken.to_string(),
            replacement: new.address.to_string(),
            vm_side,
        })
    }

    /// Plugs the replacement into the VM, then unplugs the failed one. A failed
    /// plug undoes the swap (the VM keeps what it had); a failed unplug does not
    /// (the VM has both; the failed one stays held back).
    fn plug_swap(
        &self,
        h: &dyn Hotplug,
        broken: PciAddress,
        new: &Held,
    ) -> Result<String, ApiError> {
        let view = |held: &Held| self.held_view(held);
        let old = Held::Function {
            address: broken,
            driver_before: String::new(),
        };
        let by = h.name();
        h.plug(&view(new)).map_err(|e| {
            ApiError::Failed(format!(
                "{broken}: {by} could not take its replacement {}: {e}; the VM keeps the failed device",
                new.name()
            ))
        })?;
        Ok(match h.unplug(&view(&old)) {
            Ok(()) => format!("{by} plugged {} and unplugged {broken}", new.name()),
            Err(e) => format!(
                "{by} plugged {} but could not unplug {broken}: {e}; it stays held back",
                new.name()
            ),
        })
    }

    /// Settles a swap that a crash cut off: kept if the VM holds the replacement
    /// open (its manager plugged it), undone otherwise. Returns the line for the log.
    pub fn settle(&self, i: &Intent) -> String {
        let Ok(s) = serde_json::from_str::<SwapIntent>(&i.body) else {
            return format!(
                "recovery: swap in lease {} was cut off; its record is unreadable",
                i.lease_id
            );
        };
        let (Ok(new), Ok(old)) = (
            s.replacement.parse::<PciAddress>(),
            s.failed.parse::<PciAddress>(),
        ) else {
            return format!(
                "recovery: swap in lease {} was cut off; its record names no devices",
                i.lease_id
            );
        };
        let held = Held::Function {
            address: new,
            driver_before: s.driver_before.clone(),
        };
        let open = PciFunction::read_brief(&self.sys, &new)
            .and_then(|f| f.iommu_group)
            .is_some_and(|g| !holders::of_group(&self.sys, g).is_empty());
        let leased = self.store().holder(&s.failed).ok().flatten();
        let what = match (open, leased) {
            (true, Some((lease, _))) if lease == i.lease_id => {
                let drivers = self.drivers_now(std::slice::from_ref(&s.replacement));
                let reason = format!(
                    "replaced in lease {} by {new} (finished at start-up)",
                    i.lease_id
                );
                match self.store().commit_swap(
                    &i.lease_id,
                    &s.failed,
                    &held,
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
                let r = match s.driver_before.as_str() {
                    super::VFIO_PCI => Ok(()),
                    _ => self.undo_device(&held),
                };
                let _ = self.store().end_intent(i.id);
                // A failed device's policy runs again once the daemon is up (an
                // operator's swap is the operator's to ask again).
                if matches!(self.store().held_back(&s.failed), Ok(Some((_, true)))) {
                    self.note_failure(&s.failed, "its swap was cut off by a restart");
                }
                format!(
                    "undone (the replacement back to its driver: {})",
                    super::outcome(&r)
                )
            }
        };
        format!(
            "recovery: the swap of {old} for {new} in lease {} was cut off; {what}",
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
