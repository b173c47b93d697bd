//! The mediated devices service: mdevs made and removed on request or for a lease
//! (mdev types, NVIDIA vGPU types per VF), and definitions started at boot; and the
//! mediated steps every service uses (make, unmake, the gate's view of an mdev). The
//! same intent protocol as the PCI path: an intent is written before the kernel is
//! touched, and a cut-off operation is settled at start-up (a create is undone, a
//! remove is finished).

use std::sync::MutexGuard;

use crate::api::ids::{quote, Held};
use mediated_dev::host::{mdev_exists, read_mdev, read_vgpu};
use mediated_dev::plan::Target;
use mediated_dev::{
    parse_uuid, Definition, MdevHost, MdevParent, MdevTypeId, Mediator, Start, Store, Want,
};

use serde::{Deserialize, Serialize};
use uuid::Uuid;
use vf_provisioner::{Op, PciFunction, Refusal, Subject};

use super::{failed, Core, Mediated};
use crate::api::{ApiError, LeasedDevice, MdevInfo, Request};
use crate::daemon::store::{Guards, LeaseRow};

pub use crate::api::codec::is_mediated;

/// What an mdev intent records: what recovery does if the operation is cut off.
#[derive(Serialize, Deserialize)]
pub(super) struct MdevIntent {
    pub(super) uuid: Uuid,
    pub(super) remove_mdev: bool,
    pub(super) remove_definition: bool,
}

pub(super) fn uuid_arg(s: &str) -> Result<Uuid, ApiError> {
    Ok(parse_uuid(s)?)
}

impl Core {
    pub(super) fn mediator(&self) -> Mediator {
        Mediator::new(self.sys.clone())
    }

    /// mdevctl's definitions under this host's root.
    pub(super) fn definitions(&self) -> Store {
        Store::new(self.sys.root())
    }

    /// Mediated changes run one at a time: two creates on one parent would race for
    /// its capacity (the kernel would refuse one, but a plan made before must hold).
    pub(super) fn mediating(&self) -> MutexGuard<'_, ()> {
        self.mediating.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The gate's verdict on an mdev on parent `p`, a PCI function (named parents
    /// such as `mtty` have no function for it to judge).
    pub(super) fn parent_refused(&self, p: &MdevParent) -> Option<Refusal> {
        self.function_refused(Op::MdevCreate, &p.as_str().parse().ok()?)
    }

    /// The mediated host as this daemon may use it: parents and vGPU VFs that the
    /// gate refuses are left out, so no plan places a device on them.
    pub(super) fn scan_ours(&self) -> MdevHost {
        let mut host = self.mediator().scan();
        host.parents
            .retain(|p| self.parent_refused(&p.name).is_none());
        host.vgpus
            .retain(|v| self.function_refused(Op::Vgpu, &v.vf).is_none());
        host
    }

    /// The gate's verdict on `op` of mdev `name`; one that does not exist passes
    /// (nothing to protect; the kernel's answer then says it is gone).
    pub(super) fn gate_mdev(&self, op: Op, name: &str) -> Result<(), Refusal> {
        let Some(m) = name.parse().ok().and_then(|u| read_mdev(&self.sys, &u)) else {
            return Ok(());
        };
        let parent = m
            .parent
            .as_str()
            .parse()
            .ok()
            .and_then(|a| PciFunction::read_brief(&self.sys, &a));
        let subject = Subject::Mdev {
            uuid: name,
            group: m.iommu_group,
            parent: parent.as_ref(),
        };
        self.guarded.gate(op, subject)
    }

    /// Who leases it, filled in.
    pub(super) fn leased(&self, mut info: MdevInfo) -> MdevInfo {
        if let Ok(Some((lease, vm))) = self.store().holder(&info.uuid) {
            (info.lease_id, info.vm_name) = (lease, vm);
        }
        info
    }

    pub(super) fn make(&self, target: &Target, uuid: Option<Uuid>) -> Result<(), ApiError> {
        let m = self.mediator();
        match target {
            Target::Mdev { parent, type_id } => {
                m.create(parent, type_id, uuid)?;
            }
            Target::Vgpu { vf, type_id } => {
                m.set_vgpu(vf, &type_id.to_string())?;
            }
        }
        Ok(())
    }

    /// Where one device of mediated `profile` would go (as a lease's is placed:
    /// where there is room, on a parent or VF the gate allows). The caller holds
    /// `mediating()` until it has made it.
    pub(super) fn plan_one(&self, profile: &str) -> Result<Target, ApiError> {
        let plan = mediated_dev::plan(
            &self.scan_ours(),
            &[Want {
                profile: profile.into(),
                count: 1,
            }],
        );
        let why = plan
            .shortfalls
            .first()
            .map_or_else(String::new, |s| format!(" ({})", s.reason));
        plan.placements.into_iter().next().map(|p| p.target).ok_or_else(|| {
            ApiError::NoDevice(format!(
                "no parent or VF here has room for {profile:?}{why}; `vfctl plan {profile}` shows why"
            ))
        })
    }

    /// Makes one mdev of `type_id` named `uuid` wherever the plan finds room (for
    /// an incoming migration, or a lease's mdev after a reboot).
    pub(super) fn make_one(&self, uuid: Uuid, type_id: &str) -> Result<(), ApiError> {
        let _one = self.mediating();
        match self.plan_one(type_id) {
            Ok(t @ Target::Mdev { .. }) => self.make(&t, Some(uuid)),
            Ok(Target::Vgpu { .. }) => Err(ApiError::NoDevice(format!(
                "mdev {uuid}: {type_id:?} is a VF's vGPU type, not an mdev type"
            ))),
            Err(e) => Err(ApiError::NoDevice(format!("mdev {uuid}: {e}"))),
        }
    }

    /// Undoes what a lease made of a mediated device: removes the mdev it made,
    /// clears the vGPU type it set; leaves an mdev it took as it was.
    pub(super) fn unmake(&self, held: &Held) -> Result<(), ApiError> {
        let m = self.mediator();
        let r = match held {
            Held::MadeMdev(uuid) if read_mdev(&self.sys, uuid).is_some() => m.remove(uuid),
            Held::Vgpu(vf) => m.clear_vgpu(vf),
            Held::MadeMdev(_) | Held::KeptMdev(_) | Held::Function { .. } => Ok(()),
        };
        r.map_err(ApiError::from)
    }

    /// A device of a lease as the VMMs take it.
    pub(super) fn held_view(&self, held: &Held) -> LeasedDevice {
        match held {
            Held::Function { address, .. } => {
                let name = address.to_string();
                let (id, group) = self
                    .store()
                    .identity(&name)
                    .ok()
                    .flatten()
                    .unwrap_or_default();
                LeasedDevice::new(*address, id, u32::try_from(group).ok())
            }
            Held::Vgpu(vf) => {
                let slot = read_vgpu(&self.sys, vf);
                let id = slot
                    .as_ref()
                    .and_then(|s| s.current)
                    .map_or_else(String::new, |t| format!("vgpu-{t}"));
                LeasedDevice::new(*vf, id, slot.and_then(|s| s.iommu_group))
            }
            Held::MadeMdev(uuid) | Held::KeptMdev(uuid) => {
                let m = read_mdev(&self.sys, uuid);
                LeasedDevice::mdev(
                    uuid,
                    m.as_ref()
                        .map(|m| m.type_id.to_string())
                        .unwrap_or_default(),
                    m.and_then(|m| m.iommu_group),
                )
            }
        }
    }
}

impl Mediated<'_> {
    /// Active mdevs, then defined ones that are not active.
    pub fn mdevs(&self) -> Result<Vec<MdevInfo>, ApiError> {
        let (defs, _) = self.definitions().list();
        let all = crate::api::mdev_infos(&self.mediator().scan(), &defs);
        Ok(all.into_iter().map(|i| self.leased(i)).collect())
    }

    /// Creates an mdev (a fresh UUID when `uuid` is empty). `define`: `manual` or
    /// `auto` also writes its definition (first: a crash between the two leaves a
    /// definition to start, never an mdev nobody recorded); empty writes none.
    pub fn create_mdev(
        &self,
        parent: &str,
        type_id: &str,
        uuid: &str,
        define: &str,
        uid: u32,
    ) -> Result<MdevInfo, ApiError> {
        let parent = MdevParent::new(parent)?;
        let type_id = MdevTypeId::new(type_id)?;
        let (uuid, fresh) = if uuid.is_empty() {
            (Uuid::new_v4(), true)
        } else {
            (uuid_arg(uuid)?, false)
        };
        if let Some(r) = self.parent_refused(&parent) {
            let e = ApiError::Refused(format!("mdev parent {r}"));
            return self.audited("mdev-create", uid, &uuid.to_string(), Err(e));
        }
        let start = match define {
            "" => None,
            "manual" => Some(Start::Manual),
            "auto" => Some(Start::Auto),
            d => {
                return Err(ApiError::BadInput(format!(
                    "mdev {uuid}: define \"{}\": use \"\", \"manual\" or \"auto\"",
                    quote(d)
                )));
            }
        };
        let def = start.map(|start| Definition {
            uuid,
            parent: parent.clone(),
            config: mediated_dev::mdevctl::Config {
                mdev_type: type_id.clone(),
                start,
                attrs: vec![],
            },
        });
        // An mdev already there is not this create's to undo (a fresh UUID is not).
        let undo = MdevIntent {
            uuid,
            remove_mdev: fresh || !mdev_exists(&self.sys, &uuid),
            remove_definition: def.is_some(),
        };
        self.mdev_op("mdev-create", undo, uid, || {
            if let Some(d) = &def {
                self.definitions().write(d)?;
            }
            let made = self.mediator().create(&parent, &type_id, Some(uuid));
            if made.is_err() && def.is_some() {
                let _ = self.definitions().remove(&uuid);
            }
            let info = crate::api::mdev_info(Some(&made?), def.as_ref());
            Ok(info.expect("an active mdev has an info"))
        })
    }

    /// Removes an mdev (refused while leased or held open); `undefine` also deletes
    /// its definition.
    pub fn remove_mdev(&self, uuid: &str, undefine: bool, uid: u32) -> Result<(), ApiError> {
        let uuid = uuid_arg(uuid)?;
        if let Err(r) = self.gate_mdev(Op::MdevRemove, &uuid.to_string()) {
            let e = ApiError::Refused(r.to_string());
            return self.audited("mdev-remove", uid, &uuid.to_string(), Err(e));
        }
        let undo = MdevIntent {
            uuid,
            remove_mdev: true,
            remove_definition: undefine,
        };
        self.mdev_op("mdev-remove", undo, uid, || {
            // Without `undefine` the kernel's answer says whether it existed.
            let active = !undefine || mdev_exists(&self.sys, &uuid);
            if active {
                self.mediator().remove(&uuid)?;
            }
            if undefine && !self.definitions().remove(&uuid)? && !active {
                return Err(mediated_dev::Error::NoMdev(uuid).into());
            }
            let name = uuid.to_string();
            if self.store().quarantined(&name).map_err(failed)?.is_some() {
                self.store().unquarantine(&name).map_err(failed)?;
            }
            Ok(())
        })
    }

    /// One direct mdev operation: serialized, recorded as an intent, audited.
    pub(super) fn mdev_op<T>(
        &self,
        op: &str,
        undo: MdevIntent,
        uid: u32,
        f: impl FnOnce() -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let uuid = undo.uuid;
        let body = serde_json::to_string(&undo).expect("serializes");
        let r = self.timed(op, || {
            let _one = self.mediating();
            let guards = if undo.remove_definition {
                Guards::Files
            } else {
                Guards::Kernel
            };
            let intent = self
                .store()
                .begin_intent(op, "", &body, guards)
                .map_err(failed)?;
            let r = f();
            let _ = self.store().end_intent(intent);
            r
        });
        self.audited(op, uid, &uuid.to_string(), r)
    }

    /// Settles an mdev operation a crash cut off: a create is undone (its caller
    /// never got the device), a remove is finished, a device created for an
    /// incoming migration is removed (the kernel reset its state when the dead
    /// daemon's fd closed).
    pub(super) fn recover_mdev(&self, op: &str, body: &str) -> String {
        let Ok(i) = serde_json::from_str::<MdevIntent>(body) else {
            return format!("recovery: {op} with an unreadable record {body:?}; left as is");
        };
        let r = if i.remove_mdev && read_mdev(&self.sys, &i.uuid).is_some() {
            self.mediator().remove(&i.uuid)
        } else {
            Ok(())
        };
        if i.remove_definition {
            let _ = self.definitions().remove(&i.uuid);
        }
        format!(
            "recovery: {op} of {} was cut off; settled: {}",
            i.uuid,
            super::outcome(&r)
        )
    }

    /// Starts every `auto` definition (boot), as mdevctl's udev rule would.
    pub fn start_defined(&self) -> Vec<String> {
        let _one = self.mediating();
        let veto = |d: &Definition| self.parent_refused(&d.parent).map(|r| r.to_string());
        self.mediator()
            .start_auto(&self.definitions(), &veto)
            .into_iter()
            .map(|(uuid, r)| format!("restore: mdev {uuid}: {}", super::outcome(&r)))
            .collect()
    }

    /// A new lease of `req.count` devices of a mediated profile: planned on the
    /// whole host first (nothing is changed unless all fit), then made one by one;
    /// a failure undoes what was made.
    pub(super) fn provision_mediated(
        &self,
        req: &Request,
        owner: u32,
    ) -> Result<LeaseRow, ApiError> {
        let _one = self.mediating();
        let host = self.scan_ours();
        let kept = self.named_mdevs(req, &host)?;
        let want = Want {
            profile: req.profile.clone(),
            count: req.count - kept.len() as u32,
        };
        if host.parents.is_empty() && host.vgpus.is_empty() {
            return Err(ApiError::BadInput(format!(
                "profile {:?} for VM {}: not `vf` nor a PF model id vvvv:dddd, and this host offers no mediated devices (no mdev parent, no VF with vGPU types) for it to name",
                req.profile, req.vm_name
            )));
        }
        let plan = if want.count == 0 {
            mediated_dev::Plan::default()
        } else {
            mediated_dev::plan(&host, &[want])
        };
        if let Some(s) = plan.shortfalls.first() {
            return Err(ApiError::NoDevice(format!(
                "VM {}: {} of {} {:?} do not fit: {}; release a lease or remove an mdev (`vfctl mdev list`), `vfctl plan` shows what fits",
                req.vm_name, s.missing, req.count, req.profile, s.reason
            )));
        }
        // Named mdevs that do not exist yet are made with their names.
        let mut fresh = req
            .devices
            .iter()
            .filter_map(|d| uuid_arg(d).ok())
            .filter(|u| !kept.contains(u));
        let mut planned: Vec<Held> = plan
            .placements
            .iter()
            .map(|p| match &p.target {
                Target::Mdev { .. } => Held::MadeMdev(fresh.next().unwrap_or_else(Uuid::new_v4)),
                Target::Vgpu { vf, .. } => Held::Vgpu(*vf),
            })
            .collect();
        if fresh.next().is_some() {
            return Err(ApiError::BadInput(format!(
                "VM {}: profile {:?} is not an mdev type; only mdevs are named by UUID",
                req.vm_name, req.profile
            )));
        }
        planned.extend(kept.iter().map(|u| Held::KeptMdev(*u)));
        self.pool()
            .new_lease(req, owner, planned.clone(), plan.placements.len(), |i| {
                self.make(&plan.placements[i].target, planned[i].mdev())
            })
    }

    /// Of the mdevs `req` names, those that exist: each must be of the profile's
    /// type, not leased, and not held open unless adopted.
    fn named_mdevs(&self, req: &Request, host: &MdevHost) -> Result<Vec<Uuid>, ApiError> {
        let mut kept = Vec::new();
        for d in &req.devices {
            let u = uuid_arg(d)?;
            let Some(m) = host.mdev(&u) else { continue };
            let name = host
                .parent(m.parent.as_str())
                .ok()
                .and_then(|p| p.find_type(m.type_id.as_str()).ok())
                .map(|t| t.name.clone())
                .unwrap_or_default();
            let refuse = |why: String| {
                ApiError::Refused(format!(
                    "mdev {u}: cannot lease it to VM {}: {why}",
                    req.vm_name
                ))
            };
            if m.type_id != req.profile.as_str() && name != req.profile {
                return Err(refuse(format!(
                    "it is a {} ({name}), not {:?}; remove it or name another UUID",
                    m.type_id, req.profile
                )));
            }
            let op = Op::Lease {
                adopt: req.adopt,
                whole_group: false,
            };
            self.gate_mdev(op, &u.to_string())
                .map_err(|r| super::refused_for(&req.vm_name, r))?;
            kept.push(u);
        }
        Ok(kept)
    }

    /// Active mdevs that no lease holds and no definition names (see
    /// `Core::quarantine_orphans`).
    pub(super) fn orphan_mdevs(&self) -> Result<Vec<(String, &'static str)>, ApiError> {
        let (defs, _) = self.definitions().list();
        let mut found = Vec::new();
        for m in self.mediator().scan().mdevs {
            let name = m.uuid.to_string();
            let known = defs.iter().any(|d| d.uuid == m.uuid)
                || self.store().holder(&name).map_err(failed)?.is_some();
            if !known {
                found.push((
                    name,
                    "an active mdev that no lease holds and no definition names",
                ));
            }
        }
        Ok(found)
    }
}
