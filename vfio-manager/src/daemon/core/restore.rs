//! The restore and recovery service: at start, operations a crash cut off are
//! settled (a provision undone, a release finished), the table is made to match
//! sysfs, orphans are quarantined, and the configured state is restored. Operators
//! end a quarantine here too.

use std::collections::BTreeSet;

use mediated_dev::host::{mdev_exists, read_vgpu};
use vf_provisioner::{PciAddress, PciFunction};

use super::{
    addrs_of, device_name, failed, moved, not_quarantined, outcome, retry, Planned, Restore,
    VFIO_PCI,
};
use crate::api::ids::Held;
use crate::api::ApiError;
use crate::daemon::store::LeaseRow;

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
                "swap" => log.push(self.recovery().settle(&i)),
                "reclaim" => log.push(self.usage().settle(&i)),
                "handover" => log.push(self.migration().settle(&i)),
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

    /// Every lease's devices as the lease made them, then orphans quarantined.
    fn reconcile(&self) -> Result<Vec<String>, ApiError> {
        let (mut log, _) = self.restore_leases()?;
        log.extend(self.quarantine_orphans()?);
        Ok(log)
    }

    /// Brings every lease's devices back to what the lease made of them: a
    /// function on vfio-pci (rebound after drift), an mdev it made (made again
    /// with its UUID, as after a reboot), a VF's vGPU type (set again). Returns the
    /// log and the devices that could not be brought back (gone, or failing).
    pub fn restore_leases(&self) -> Result<(Vec<String>, Vec<String>), ApiError> {
        let (mut log, mut lost) = (Vec::new(), Vec::new());
        self.refresh()?;
        for row in self.store().leases().map_err(failed)? {
            for held in &row.devices {
                match self.restore_held(&row, held) {
                    Ok(None) => {}
                    Ok(Some(line)) => log.push(line),
                    Err(line) => {
                        lost.push(format!("{} (lease {})", held.name(), row.id));
                        log.push(line);
                    }
                }
            }
        }
        self.refresh()?;
        Ok((log, lost))
    }

    /// Every leased function that is gone from sysfs (hot-removed, or its PF's VFs
    /// disabled behind the daemon's back): with its lease's policy `replace`, an
    /// equivalent is swapped in; otherwise (or when none can be) the lease lets it
    /// go and keeps the rest. Each is reported (`LeaseDegraded`, `LeaseRecovered`).
    /// Returns a line for the log each.
    pub fn let_go_of_vanished(&self) -> Vec<String> {
        let _shared = self.shared();
        let gone: Vec<String> = self
            .devices()
            .unwrap_or_default()
            .into_iter()
            .filter(|d| d.health == "missing" && !d.lease_id.is_empty())
            .map(|d| d.address)
            .collect();
        let mut log = Vec::new();
        for name in gone {
            let (Some((lease, vm)), Ok(a)) = (self.holder(&name), name.parse::<PciAddress>())
            else {
                continue;
            };
            let _claim = self.claims.wait(vec![name.clone()]);
            let gone_why = "it is gone from the host (hot-removed, or its PF's VFs disabled behind the daemon's back)";
            let not_replaced = match self.recovery().replace_vanished(&lease, a) {
                Some(Ok(s)) => {
                    log.push(format!(
                        "{name} of lease {lease} (VM {vm}): {gone_why}; replaced by {} ({})",
                        s.replacement, s.vm_side
                    ));
                    self.note_vanished(&name, gone_why, &lease, Ok(s));
                    continue;
                }
                Some(Err(e)) => format!("; not replaced: {e}"),
                None => String::new(),
            };
            let why = format!("{gone_why}; its lease lets it go{not_replaced}");
            let r = self.store().let_go(&lease, &name, &why).map_err(failed);
            self.audit.record(
                0,
                "let-go",
                &lease,
                &vm,
                std::slice::from_ref(&name),
                &outcome(&r),
            );
            self.note_vanished(&name, &why, &lease, Err(why.clone()));
            log.push(format!(
                "{name} of lease {lease} (VM {vm}): {why}: {}",
                outcome(&r)
            ));
        }
        log
    }

    /// Start-up's last pass, after the configured state is back (a lease's VFs
    /// exist again only then): every lease's devices restored, and what could not
    /// be kept for [`Restore::status`].
    pub fn finish(&self) -> Result<Vec<String>, ApiError> {
        let (log, lost) = self.restore_leases()?;
        *self.unrestored.lock().unwrap_or_else(|e| e.into_inner()) = lost;
        Ok(log)
    }

    /// `complete`, or `partial: ` and the devices of leases start-up could not
    /// bring back (for systemd's STATUS= and the D-Bus property).
    pub fn status(&self) -> String {
        let lost = self.unrestored.lock().unwrap_or_else(|e| e.into_inner());
        match lost.len() {
            0 => "complete".into(),
            n => format!(
                "partial: {n} devices of leases not restored ({}); see the log",
                lost.iter().take(8).cloned().collect::<Vec<_>>().join(", ")
            ),
        }
    }

    /// One device of a lease: `Ok(Some)` when it had to be restored, `Err` when it
    /// cannot be (each with its line for the log).
    fn restore_held(&self, row: &LeaseRow, held: &Held) -> Result<Option<String>, String> {
        let name = held.name();
        let who = format!("lease {} (VM {})", row.id, row.request.vm_name);
        let profile = row.request.profile.as_str();
        let gone = || format!("drift: {name} of {who} is gone from sysfs; marked missing");
        let done = |what: &str, r: Result<(), ApiError>| match r {
            Ok(()) => Ok(Some(format!("restore: {name} of {who}: {what}"))),
            Err(e) => Err(format!("restore: {name} of {who}: cannot be {what}: {e}")),
        };
        match held {
            // An mdev is there or gone: it cannot be rebound (kernel rule 6,
            // docs/kernel.md); one the lease made is made again.
            Held::MadeMdev(u) if !mdev_exists(&self.sys, u) => done(
                &format!("made again as {profile}"),
                self.make_one(*u, profile),
            ),
            Held::KeptMdev(u) if !mdev_exists(&self.sys, u) => Err(gone()),
            Held::MadeMdev(_) | Held::KeptMdev(_) => Ok(None),
            Held::Vgpu(vf) => match read_vgpu(&self.sys, vf) {
                None => Err(gone()),
                Some(slot) if slot.current.is_some() => Ok(None),
                Some(_) => {
                    let r = self.mediator().set_vgpu(vf, profile).map(drop);
                    done(
                        &format!("given vGPU type {profile} again"),
                        r.map_err(ApiError::from),
                    )
                }
            },
            Held::Function { address, .. } => match PciFunction::read(&self.sys, address) {
                None => Err(gone()),
                Some(f) if f.on_vfio() => Ok(None),
                Some(f) => {
                    let r = self.raw.bind_vfio(address, false).map(drop);
                    let line = format!(
                        "drift: {name} of {who} was on {:?}, not vfio-pci; rebound: {}",
                        f.driver,
                        outcome(&r)
                    );
                    match r {
                        Ok(()) => Ok(Some(line)),
                        Err(e) => {
                            self.mark_failed(&name, &e.to_string());
                            Err(line)
                        }
                    }
                }
            },
        }
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
        let pfs = &self.config.pfs;
        let results = self.direct().enable_each(pfs);
        let mut log: Vec<String> = pfs
            .iter()
            .zip(&results)
            .map(|((pf, n), r)| format!("restore: {pf}: {n} VFs: {}", outcome(r)))
            .collect();
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
        let name = device_name(name)?;
        let r = match self.store().unquarantine(&name).map_err(failed)? {
            true => Ok(()),
            false => Err(not_quarantined(&name)),
        };
        self.audited("orphan-adopt", uid, &name, r)
    }

    /// Returns a quarantined function to its host driver, or removes a quarantined
    /// mdev, then ends its quarantine. Refused while a VMM holds it open.
    pub fn free_orphan(&self, name: &str, uid: u32) -> Result<(), ApiError> {
        let name = device_name(name)?;
        if self.store().quarantined(&name).map_err(failed)?.is_none() {
            return Err(not_quarantined(&name));
        }
        let Ok(a) = name.parse::<PciAddress>() else {
            // Removing an mdev ends its quarantine.
            return self.mediated().remove_mdev(&name, false, uid);
        };
        // A VF a swap took away with its vGPU type stays on its vendor's driver:
        // freeing it clears the type. Any other function leaves vfio-pci.
        let vgpu = read_vgpu(&self.sys, &a).is_some_and(|s| s.current.is_some());
        self.direct().run("orphan-free", uid, &a, || match vgpu {
            true => self.unmake(&Held::Vgpu(a)).map(|()| vec![name.clone()]),
            false => Ok(moved(self.guarded.unbind(&a, false, None)?)),
        })?;
        self.store().unquarantine(&name).map_err(failed).map(drop)
    }
}
