//! A running VM's mdev, migrated by its VMM (QEMU's VFIO migration) to a second
//! VMM process on this host: the daemon reserves the destination mdev before any
//! state moves, checks that it can take the source's state (type, vendor driver,
//! driver version), and afterwards moves the lease to it under the same id.
//!
//! Intent first (`handover`, body [`Handover`]). The lease moves in one commit;
//! the source goes after it and only then does the intent end. A hand-over a crash
//! cut off is settled at start by who holds which device open (`settle`).

use mediated_dev::host::read_mdev;
use mediated_dev::migration as mig;
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use vf_provisioner::Op;

use super::mediated::uuid_arg;
use super::{failed, outcome, Migration};
use crate::api::ids::{DriverName, Held, LeaseId, MdevTypeId, VmName};
use crate::api::{ApiError, VmMdev};
use crate::daemon::store::{Guards, Intent, LeaseRow};

/// A prepared hand-over.
struct Handover {
    /// The lease's mdev, which the source VMM holds.
    from: Held,
    /// The destination mdev, made (or taken as it was) for the destination VMM.
    to: Held,
}

/// The hand-over intent's body: each mdev's UUID and kind (`Held::to_row`).
#[derive(Serialize, Deserialize)]
struct Record {
    from: String,
    from_kind: String,
    to: String,
    to_kind: String,
}

impl Handover {
    fn record(&self) -> String {
        let r = Record {
            from: self.from.name(),
            from_kind: self.from.kind().into(),
            to: self.to.name(),
            to_kind: self.to.kind().into(),
        };
        serde_json::to_string(&r).expect("serializes")
    }

    fn read(body: &str) -> Option<Handover> {
        let r: Record = serde_json::from_str(body).ok()?;
        Some(Handover {
            from: Held::from_row(&r.from, &r.from_kind, "").ok()?,
            to: Held::from_row(&r.to, &r.to_kind, "").ok()?,
        })
    }
}

impl Migration<'_> {
    /// Reserves destination mdev `dest` (made with the source's type when it does
    /// not exist; a new UUID when empty) for the migration of lease `lease`'s mdev
    /// by its VMM, after checking that it can take the source's state. Returns the
    /// destination's UUID, for the destination VMM's `sysfsdev`.
    pub fn prepare_handover(&self, lease: &str, dest: &str, uid: u32) -> Result<String, ApiError> {
        let r = self.timed("handover-prepare", || {
            self.prepare_checked(lease, dest, uid)
        });
        self.audit_handover(uid, "handover-prepare", lease, &r);
        r
    }

    fn prepare_checked(&self, lease: &str, dest: &str, uid: u32) -> Result<String, ApiError> {
        let row = self.own_lease(lease, uid)?;
        if self.open_handover(&row.id)?.is_some() {
            return Err(ApiError::Refused(format!(
                "lease {}: a migration of it is already prepared; commit or abort it first (`vfctl migrate commit|abort --lease {}`)",
                row.id, row.id
            )));
        }
        let (from, source) = one_mdev(&row)?;
        let source = read_mdev(&self.sys, &source).ok_or_else(|| {
            ApiError::NotFound(format!(
                "mdev {source} of lease {}: gone from sysfs",
                row.id
            ))
        })?;
        let to = match dest {
            "" => Uuid::new_v4(),
            d => uuid_arg(d)?,
        };
        let _claim = self.claims.wait(vec![from.name(), to.to_string()]);
        let to = match read_mdev(&self.sys, &to) {
            Some(m) => {
                self.refuse_taken(&to)?;
                self.refuse_unlike(&source, &m)?;
                Held::KeptMdev(to)
            }
            None => Held::MadeMdev(to),
        };
        let h = Handover { from, to };
        // Intent first: a destination made and then cut off by a crash is removed
        // at start (`settle`: neither held open, or only the source).
        let intent = self
            .store()
            .begin_intent("handover", &row.id, &h.record(), Guards::Kernel)
            .map_err(failed)?;
        if let Held::MadeMdev(u) = h.to {
            if let Err(e) = self.make_one(u, source.type_id.as_str()) {
                let _ = self.store().end_intent(intent);
                return Err(e);
            }
        }
        Ok(h.to.name())
    }

    /// The source VMM has handed the VM over and quit: lease `lease` now holds the
    /// destination mdev, and the source mdev goes (removed if the lease made it).
    pub fn commit_handover(&self, lease: &str, uid: u32) -> Result<String, ApiError> {
        let r = self.timed("handover-commit", || {
            let row = self.own_lease(lease, uid)?;
            let (intent, h) = self.prepared(&row)?;
            if self.held_open(&h.from) {
                return Err(ApiError::Refused(format!(
                    "lease {}: the source mdev {} is still held open (its VMM has not quit); quit the source VMM once the migration completed, then commit",
                    row.id,
                    h.from.name()
                )));
            }
            // The lease follows its VM: never onto a device no VMM runs it on.
            if !self.held_open(&h.to) {
                return Err(ApiError::Refused(format!(
                    "lease {}: no VMM holds the destination mdev {}, so the VM does not run there; if the migration failed, `vfctl migrate abort --lease {}`",
                    row.id,
                    h.to.name(),
                    row.id
                )));
            }
            self.finish(&row.id, intent.id, &h)?;
            Ok(h.to.name())
        });
        self.audit_handover(uid, "handover-commit", lease, &r);
        r
    }

    /// The migration failed or was cancelled and the destination VMM has quit: the
    /// destination mdev goes (removed if it was made for this), the lease is as it
    /// was.
    pub fn abort_handover(&self, lease: &str, uid: u32) -> Result<(), ApiError> {
        let r = self.timed("handover-abort", || {
            let row = self.own_lease(lease, uid)?;
            let (intent, h) = self.prepared(&row)?;
            if self.held_open(&h.to) {
                return Err(ApiError::Refused(format!(
                    "lease {}: the destination mdev {} is still held open; quit the destination VMM first",
                    row.id,
                    h.to.name()
                )));
            }
            self.undo_device(&h.to)?;
            self.store().end_intent(intent.id).map_err(failed)
        });
        self.audit_handover(uid, "handover-abort", lease, &r);
        r
    }

    /// A hand-over a crash cut off: finished if the lease holds the destination
    /// already or only the destination is held open (the VM moved); undone if only
    /// the source is, or neither; left to `commit`/`abort` while both are (the
    /// migration may still run). Returns the line for the log.
    pub fn settle(&self, i: &Intent) -> String {
        let Some(h) = Handover::read(&i.body) else {
            let _ = self.store().end_intent(i.id);
            return format!(
                "recovery: hand-over of lease {} was cut off; its record is unreadable",
                i.lease_id
            );
        };
        let moved = self.store().holder(&h.to.name()).ok().flatten().is_some();
        let (from_open, to_open) = (self.held_open(&h.from), self.held_open(&h.to));
        let what = match (moved, from_open, to_open) {
            (true, ..) | (false, false, true) => outcome(&self.finish(&i.lease_id, i.id, &h)),
            (false, true, true) => {
                "left prepared: both VMMs hold their mdev (commit or abort it)".into()
            }
            _ => {
                let r = self.undo_device(&h.to);
                let _ = self.store().end_intent(i.id);
                format!("undone (the destination removed: {})", outcome(&r))
            }
        };
        format!(
            "recovery: the hand-over of lease {} from {} to {} was cut off; {what}",
            i.lease_id,
            h.from.name(),
            h.to.name()
        )
    }

    /// Moves the lease to the destination (unless it already holds it), removes the
    /// source if the lease made it, and ends the intent.
    fn finish(&self, lease: &str, intent: i64, h: &Handover) -> Result<(), ApiError> {
        let to = h.to.name();
        if self.store().holder(&to).map_err(failed)?.is_none() {
            let reason = format!("migrated by its VMM to {to}");
            self.store()
                .commit_handover(lease, &h.from.name(), &h.to, &reason)
                .map_err(failed)?;
        }
        self.undo_device(&h.from)?;
        self.store().end_intent(intent).map_err(failed)?;
        self.usage().lease_changed(lease);
        Ok(())
    }

    /// Lease `lease`'s prepared hand-over as (source, destination) mdev UUIDs; none
    /// when no migration of it is prepared. Changes nothing.
    pub fn prepared_handover(&self, lease: &str) -> Result<Option<(String, String)>, ApiError> {
        let id = LeaseId::new(lease)?;
        if self.lease_row(id.as_str())?.is_none() {
            return Err(ApiError::NotFound(format!(
                "lease {id}: no such lease; `vfctl leases` lists them"
            )));
        }
        Ok(self
            .open_handover(id.as_str())?
            .map(|(_, h)| (h.from.name(), h.to.name())))
    }

    /// What VM `vm`'s leases hold that its VMM migrates with it: each mdev as
    /// (lease, UUID, type, vendor driver, driver version). Changes nothing.
    pub fn vm_mdevs(&self, vm: &str) -> Result<Vec<VmMdev>, ApiError> {
        let vm = VmName::new(vm)?;
        let rows = self.store().leases().map_err(failed)?;
        let mut out = Vec::new();
        for row in rows.iter().filter(|r| r.request.vm_name == vm.as_str()) {
            for u in row.devices.iter().filter_map(Held::mdev) {
                if let Some(m) = read_mdev(&self.sys, &u) {
                    let h = mig::mdev_header(&self.sys, &m);
                    out.push((
                        row.id.clone(),
                        u.to_string(),
                        h.profile,
                        h.driver,
                        h.driver_version,
                    ));
                }
            }
        }
        if out.is_empty() {
            return Err(ApiError::NotFound(format!(
                "VM {vm}: no lease of it holds an mdev; only mediated devices migrate with a running VM (`vfctl leases`)"
            )));
        }
        Ok(out)
    }

    /// The destination's side of `vfctl migrate check`: whether this host can take
    /// `count` mdevs of `type_id` whose state comes from vendor driver `driver` at
    /// `version`. The driver must be here at that version, and the plan must find
    /// room. Changes nothing.
    pub fn check_incoming(
        &self,
        type_id: &str,
        driver: &str,
        version: &str,
        count: u32,
    ) -> Result<String, ApiError> {
        let type_id = MdevTypeId::new(type_id)?;
        let driver = DriverName::new(driver)?;
        if version.is_empty() || version.len() > 128 || version.chars().any(char::is_control) {
            return Err(ApiError::BadInput(format!(
                "driver version {}: give 1-128 bytes without control characters",
                crate::api::ids::quote(version)
            )));
        }
        if !(1..=64).contains(&count) {
            return Err(ApiError::BadInput(format!(
                "{count} mdevs of {type_id}: ask for 1 to 64"
            )));
        }
        if !self.sys.module_dir(driver.as_str()).exists() {
            return Err(ApiError::Refused(format!(
                "vendor driver {driver} is not loaded on this host; load it (modprobe {driver}) before migrating {type_id} here"
            )));
        }
        let here = mig::driver_version(&self.sys, driver.as_str());
        if here != version {
            return Err(ApiError::Refused(format!(
                "vendor driver {driver} is {here:?} on this host, the state is from {version:?}: {type_id} state cannot load here; migrate to a host with the same version"
            )));
        }
        let want = mediated_dev::plan::Want {
            profile: type_id.to_string(),
            count,
        };
        let plan = mediated_dev::plan(&self.scan_ours(), &[want]);
        if let Some(s) = plan.shortfalls.first() {
            return Err(ApiError::NoDevice(format!(
                "{} of {count} {type_id} do not fit on this host: {}; `vfctl plan {type_id}` there shows why",
                s.missing, s.reason
            )));
        }
        Ok(format!(
            "room for {count} {type_id}, vendor driver {driver} {here}"
        ))
    }

    /// Lease `lease`, which `uid` (root or its maker) may migrate.
    fn own_lease(&self, lease: &str, uid: u32) -> Result<LeaseRow, ApiError> {
        let id = LeaseId::new(lease)?;
        let row = self.lease_row(id.as_str())?.ok_or_else(|| {
            ApiError::NotFound(format!(
                "lease {id}: no such lease; `vfctl leases` lists them"
            ))
        })?;
        if uid != 0 && uid != row.owner {
            return Err(ApiError::PermissionDenied(format!(
                "lease {id} of VM {} was made by uid {}; only that user or root may migrate it",
                row.request.vm_name, row.owner
            )));
        }
        Ok(row)
    }

    fn open_handover(&self, lease: &str) -> Result<Option<(Intent, Handover)>, ApiError> {
        let intents = self.store().intents().map_err(failed)?;
        Ok(intents
            .into_iter()
            .filter(|i| i.op == "handover" && i.lease_id == lease)
            .find_map(|i| Some((Handover::read(&i.body)?, i)))
            .map(|(h, i)| (i, h)))
    }

    fn prepared(&self, row: &LeaseRow) -> Result<(Intent, Handover), ApiError> {
        self.open_handover(&row.id)?.ok_or_else(|| {
            ApiError::NotFound(format!(
                "lease {}: no migration of it is prepared (`vfctl migrate prepare-vm --lease {}`)",
                row.id, row.id
            ))
        })
    }

    /// An existing destination must be free (no lease) and pass the gate as any
    /// migration's device does: not excluded, failed, quarantined or held open.
    fn refuse_taken(&self, to: &Uuid) -> Result<(), ApiError> {
        let name = to.to_string();
        if let Some((lease, vm)) = self.store().holder(&name).map_err(failed)? {
            return Err(ApiError::Refused(format!(
                "mdev {to}: lease {lease} of VM {vm} holds it; name a free mdev or none"
            )));
        }
        self.gate_mdev(Op::Migrate, &name)
            .map_err(|r| ApiError::Refused(r.to_string()))
    }

    /// The destination takes the source's state only if it is the same type under
    /// the same vendor driver and version (checked before any state moves).
    fn refuse_unlike(
        &self,
        source: &mediated_dev::Mdev,
        dest: &mediated_dev::Mdev,
    ) -> Result<(), ApiError> {
        let (want, got) = (
            mig::mdev_header(&self.sys, source),
            mig::mdev_header(&self.sys, dest),
        );
        match mig::incompatible(&got, &want) {
            Some(why) => Err(ApiError::Refused(format!(
                "mdev {}: cannot take the state of {}: {why}; name another destination or none (one is made)",
                dest.uuid, source.uuid
            ))),
            None => Ok(()),
        }
    }

    fn audit_handover<T>(&self, uid: u32, op: &str, lease: &str, r: &Result<T, ApiError>) {
        let lease =
            LeaseId::new(lease).map_or_else(|_| crate::api::ids::quote(lease), |l| l.to_string());
        self.audit
            .record(uid, op, &lease, "", &[], &super::verdict(r));
    }
}

/// The one mdev a lease holds, and its UUID: a VMM migrates a VM whose mediated
/// lease is one mdev.
fn one_mdev(row: &LeaseRow) -> Result<(Held, Uuid), ApiError> {
    match row.devices.as_slice() {
        [h] => h.mdev().map(|u| (h.clone(), u)).ok_or_else(|| {
            ApiError::Refused(format!(
                "lease {}: it holds {}, not an mdev; only a mediated device migrates with its VM",
                row.id,
                h.name()
            ))
        }),
        _ => Err(ApiError::Refused(format!(
            "lease {}: it holds {} devices; a VM migrates here with one mdev",
            row.id,
            row.devices.len()
        ))),
    }
}
