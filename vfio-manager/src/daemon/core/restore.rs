//! The restore and recovery service: at start, operations a crash cut off are
//! settled (a provision undone, a release finished), the table is made to match
//! sysfs, orphans are quarantined, and the configured state is restored. Operators
//! end a quarantine here too.

use std::collections::BTreeSet;

use vf_provisioner::{PciAddress, PciFunction};

use super::{
    addrs_of, failed, moved, not_quarantined, orphan_name, outcome, retry, verdict, Planned,
    Restore, VFIO_PCI,
};
use crate::api::ApiError;

impl Restore<'_> {
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
                    log.push(self.mediated().recover_mdev(op, &i.body));
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
        found.extend(self.mediated().orphan_mdevs()?);
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
            let r = retry(|| self.direct().enable_vfs(&pf.to_string(), Some(n), 0));
            log.push(format!("restore: {pf}: {n} VFs: {}", outcome(&r)));
        }
        for a in self.config.bind.clone() {
            let r = retry(|| self.direct().bind(&a.to_string(), false, 0));
            log.push(format!("restore: {a}: vfio-pci: {}", outcome(&r)));
        }
        // After the VFs: an mdev's parent may be one of them.
        log.extend(self.mediated().start_defined());
        if let Err(e) = self.refresh() {
            log.push(format!("restore: cannot re-read the table: {e}"));
        }
        log
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
            return self.mediated().remove_mdev(&name, false, uid);
        };
        self.direct().run("orphan-free", uid, &a, || {
            Ok(moved(self.guarded.unbind(&a, false, None)?))
        })?;
        self.store().unquarantine(&name).map_err(failed).map(drop)
    }
}
