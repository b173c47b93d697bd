//! The policy layer for mediated devices: each operation checks first (refusing
//! with the device, the cause and the fix, having changed nothing), writes, then
//! verifies what the kernel did within a timeout, undoing its write if the result is
//! not what was asked.

use std::io;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use uuid::Uuid;
use vf_provisioner::sysfs;
use vf_provisioner::{holders, PciAddress, Sysfs};

use crate::error::{Error, Result};
use crate::host::{self, read_mdev, read_vgpu, Mdev, MdevHost, VgpuSlot, VgpuType};
use vfio_manager_api::ids::{MdevParent, MdevTypeId};

pub struct Mediator {
    sys: Sysfs,
    timeout: Duration,
}

/// One sentence on what an errno means for an mdev or vGPU write.
fn explain(attr: &str, e: &io::Error) -> String {
    match (attr, e.raw_os_error()) {
        ("create", Some(libc::EEXIST)) => "an mdev with this UUID exists already".into(),
        ("create", Some(libc::EINVAL)) => "the kernel did not accept the UUID".into(),
        ("create", Some(libc::ENOSPC | libc::EUSERS)) => {
            "no capacity left on the parent (another writer took it); the kernel deleted the new device".into()
        }
        ("current_vgpu_type", Some(libc::EBUSY)) => {
            "the VF has a type already or is in use; clear it when no VM holds it".into()
        }
        ("current_vgpu_type", Some(libc::EINVAL)) => {
            "the type is not creatable on this VF now".into()
        }
        (_, Some(libc::EACCES | libc::EPERM)) => "permission denied; run as root".into(),
        (_, Some(libc::ENOENT)) => {
            "the attribute does not exist (device gone or driver unloaded)".into()
        }
        _ => e.to_string(),
    }
}

fn held_by(sys: &Sysfs, group: Option<u32>) -> Option<String> {
    let holders = holders::of_group(sys, group?);
    (!holders.is_empty()).then(|| {
        holders
            .iter()
            .map(|h| h.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    })
}

impl Mediator {
    pub fn new(sys: Sysfs) -> Self {
        Mediator {
            sys,
            timeout: Duration::from_secs(10),
        }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn sysfs(&self) -> &Sysfs {
        &self.sys
    }

    pub fn scan(&self) -> MdevHost {
        MdevHost::scan(&self.sys)
    }

    fn write(&self, device: impl std::fmt::Display, path: &Path, data: &str) -> Result<()> {
        self.sys
            .write_attr(path, data)
            .map_err(|source| Error::KernelWrite {
                device: device.to_string(),
                path: path.to_path_buf(),
                data: data.trim_end().into(),
                explanation: explain(
                    path.file_name().and_then(|n| n.to_str()).unwrap_or(""),
                    &source,
                ),
                source,
            })
    }

    /// Polls until `done` holds or the timeout passes.
    fn wait(&self, device: &str, what: &str, mut done: impl FnMut() -> bool) -> Result<()> {
        let start = Instant::now();
        let mut pause = Duration::from_micros(200);
        while !done() {
            if start.elapsed() > self.timeout {
                return Err(Error::Timeout {
                    device: device.into(),
                    what: what.into(),
                    timeout: self.timeout,
                });
            }
            thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Creates an mdev of `type_id` on `parent` (a fresh UUID unless given) and
    /// waits until its vendor driver has bound it.
    pub fn create(
        &self,
        parent: &MdevParent,
        type_id: &MdevTypeId,
        uuid: Option<Uuid>,
    ) -> Result<Mdev> {
        let uuid = uuid.unwrap_or_else(Uuid::new_v4);
        // Nothing is read first: the kernel refuses a missing parent or type
        // (ENOENT), a UUID in use (EEXIST) and a full type (the vendor's probe fails
        // with ENOSPC, or the core's count with EUSERS; it deletes the new device,
        // as the mdev scenarios show on 6.12), and changes nothing. Each refusal is
        // explained from what is read only then: a read costs ~0.3 ms under TCG,
        // a tenth of the kernel's own work here.
        let create = host::type_dir(&self.sys, parent, type_id).join("create");
        let device = format!("{parent} type {type_id}");
        if let Err(e) = self.write(&device, &create, &format!("{uuid}\n")) {
            return Err(self.why_not_created(&device, parent, type_id, &uuid, e));
        }
        let mut made = None;
        let bound = self.wait(&uuid.to_string(), "binding its vendor driver", || {
            made = Some(host::read_known(
                &self.sys,
                &uuid,
                parent.clone(),
                type_id.clone(),
            ))
            .filter(|m| m.driver.is_some());
            made.is_some()
        });
        if let Err(e) = bound {
            // Undo: an unbound mdev is useless and cannot be bound again (rule 6).
            let _ = self.remove_unchecked(&uuid);
            return Err(Error::NotBound {
                device: uuid.to_string(),
                detail: e.to_string(),
            });
        }
        made.ok_or(Error::NoMdev(uuid))
    }

    /// The refusal a failed create write of `device` (`parent type type_id`)
    /// stands for, named from what is there now.
    fn why_not_created(
        &self,
        device: &str,
        parent: &MdevParent,
        type_id: &MdevTypeId,
        uuid: &Uuid,
        e: Error,
    ) -> Error {
        let errno = match &e {
            Error::KernelWrite { source, .. } => source.raw_os_error(),
            _ => None,
        };
        match errno {
            Some(libc::ENOENT) if !host::mdev_bus(&self.sys).join(parent).exists() => {
                Error::NoParent(parent.to_string())
            }
            Some(libc::ENOENT) => {
                let p = host::read_parent(&self.sys, parent.clone());
                p.find_type(type_id.as_str()).err().unwrap_or(e)
            }
            Some(libc::EEXIST) => match read_mdev(&self.sys, uuid) {
                Some(m) => Error::refused(
                    device,
                    format!(
                        "UUID {} is in use by an mdev of type {} on {}",
                        m.uuid, m.type_id, m.parent
                    ),
                    "pick another UUID, or leave it out to get a fresh one",
                ),
                None => e,
            },
            Some(libc::ENOSPC | libc::EUSERS) => self.full(device, parent, type_id),
            _ => e,
        }
    }

    /// Why a type has no room, with the types of the parent that do.
    fn full(&self, device: &str, parent: &MdevParent, type_id: &MdevTypeId) -> Error {
        let p = host::read_parent(&self.sys, parent.clone());
        let in_use = p.find_type(type_id.as_str()).map_or(0, |t| t.devices.len());
        let room: Vec<String> = p
            .types
            .iter()
            .filter(|o| o.available_instances > 0)
            .map(|o| format!("{} ({} free)", o.id, o.available_instances))
            .collect();
        Error::refused(
            device,
            format!("no instance of this type fits ({in_use} in use)"),
            if room.is_empty() {
                format!("remove an mdev from {parent} (`vfctl mdev list`)")
            } else {
                format!(
                    "remove an mdev from {parent}, or use a type with room: {}",
                    room.join(", ")
                )
            },
        )
    }

    /// Removes an mdev, refusing while a process (a VMM) holds its VFIO group.
    pub fn remove(&self, uuid: &Uuid) -> Result<()> {
        // Only its group is read (who may hold it): without the link it has no
        // driver, so nothing holds it, or it does not exist.
        let dir = host::mdev_devices(&self.sys).join(uuid.to_string());
        let group = sysfs::link_name(&dir.join("iommu_group")).and_then(|g| g.parse().ok());
        if group.is_none() && !dir.exists() {
            return Err(Error::NoMdev(*uuid));
        }
        if let Some(who) = held_by(&self.sys, group) {
            return Err(Error::refused(
                uuid,
                format!("its VFIO group {} is open by {who}", group.unwrap_or(0)),
                "stop or detach it from the VM first; removing it would block until then",
            ));
        }
        self.remove_unchecked(uuid)
    }

    fn remove_unchecked(&self, uuid: &Uuid) -> Result<()> {
        let path = host::mdev_devices(&self.sys)
            .join(uuid.to_string())
            .join("remove");
        // The kernel has deleted the device when the write returns (the mdev core
        // unregisters it inside the write), so nothing is polled after it.
        self.write(uuid, &path, "1\n")
    }

    fn vgpu_slot(&self, vf: &PciAddress) -> Result<VgpuSlot> {
        read_vgpu(&self.sys, vf).ok_or_else(|| {
            Error::refused(
                vf,
                "it has no nvidia/current_vgpu_type (not a VF of an NVIDIA GPU on vGPU 17+ with kernel 6.8+)",
                "enable VFs on the GPU with the NVIDIA vGPU host driver loaded, or use `vfctl mdev` for mdev-based vGPU",
            )
        })
    }

    /// Gives a VF a vGPU type (by id or name) on NVIDIA vGPU 17+.
    pub fn set_vgpu(&self, vf: &PciAddress, wanted: &str) -> Result<VgpuType> {
        let slot = self.vgpu_slot(vf)?;
        if let Some(cur) = slot.current {
            return Err(Error::refused(
                vf,
                format!("it has vGPU type {cur} already"),
                format!("clear it first with `vfctl vgpu clear {vf}`"),
            ));
        }
        let Some(t) = slot
            .creatable
            .iter()
            .find(|t| t.id.to_string() == wanted || t.name == wanted)
        else {
            let fits: Vec<String> = slot
                .creatable
                .iter()
                .map(|t| format!("{} ({})", t.name, t.id))
                .collect();
            return Err(Error::refused(
                vf,
                format!("vGPU type {wanted:?} is not creatable on it now (other VFs' types limit what fits)"),
                if fits.is_empty() {
                    "no type fits on this GPU now; clear a type on another VF or use another GPU".into()
                } else {
                    format!("pick one that fits now: {}; `vfctl plan` places several", fits.join(", "))
                },
            ));
        };
        self.refuse_if_held(vf, slot.iommu_group)?;
        let path = self.sys.device_dir(vf).join("nvidia/current_vgpu_type");
        self.write(vf, &path, &format!("{}\n", t.id))?;
        self.wait(&vf.to_string(), "setting the vGPU type", || {
            read_vgpu(&self.sys, vf).is_some_and(|s| s.current == Some(t.id))
        })?;
        Ok(t.clone())
    }

    /// Clears a VF's vGPU type (writes 0).
    pub fn clear_vgpu(&self, vf: &PciAddress) -> Result<()> {
        let slot = self.vgpu_slot(vf)?;
        if slot.current.is_none() {
            return Ok(());
        }
        self.refuse_if_held(vf, slot.iommu_group)?;
        let path = self.sys.device_dir(vf).join("nvidia/current_vgpu_type");
        self.write(vf, &path, "0\n")
    }

    fn refuse_if_held(&self, vf: &PciAddress, group: Option<u32>) -> Result<()> {
        match held_by(&self.sys, group) {
            Some(who) => Err(Error::refused(
                vf,
                format!("its VFIO group is open by {who}"),
                "stop or detach it from the VM first",
            )),
            None => Ok(()),
        }
    }
}

/// What starting one definition did.
#[derive(Debug)]
pub enum Started {
    Created(Mdev),
    AlreadyActive(Uuid),
}

impl Mediator {
    /// Starts a defined mdev (mdevctl's `start -u`): creates it with its UUID and
    /// writes its attributes in order; an mdev already active with the same type is
    /// left alone. A failed attribute write removes the new mdev again.
    pub fn start(&self, def: &crate::mdevctl::Definition) -> Result<Started> {
        if let Some(m) = read_mdev(&self.sys, &def.uuid) {
            if m.parent == def.parent && m.type_id == def.config.mdev_type {
                return Ok(Started::AlreadyActive(m.uuid));
            }
            return Err(Error::refused(
                def.uuid,
                format!(
                    "an mdev with this UUID is active as {} on {}",
                    m.type_id, m.parent
                ),
                "remove it, or change the definition",
            ));
        }
        let m = self.create(&def.parent, &def.config.mdev_type, Some(def.uuid))?;
        let dir = host::mdev_devices(&self.sys).join(m.uuid.to_string());
        for (name, value) in def.config.attrs.iter().flatten() {
            // A name from a file becomes a path under the new mdev: one component only.
            if let Err(e) = vfio_manager_api::ids::check_mdev_attribute(name).map_err(Error::from) {
                let _ = self.remove_unchecked(&m.uuid);
                return Err(e);
            }
            let value = value
                .as_str()
                .map_or_else(|| value.to_string(), str::to_string);
            if let Err(e) = self.write(m.uuid, &dir.join(name), &value) {
                let _ = self.remove_unchecked(&m.uuid);
                return Err(e);
            }
        }
        Ok(Started::Created(m))
    }

    /// Starts every definition marked `auto` (boot). One failure does not stop the rest.
    /// `veto`: the caller's policy, asked first for each (why not, or `None`).
    pub fn start_auto(
        &self,
        store: &crate::mdevctl::Store,
        veto: &dyn Fn(&crate::mdevctl::Definition) -> Option<String>,
    ) -> Vec<(Uuid, Result<Started>)> {
        let (defs, _) = store.list();
        let start = |d: &crate::mdevctl::Definition| match veto(d) {
            Some(why) => Err(Error::refused(d.uuid, why, "it is not started")),
            None => self.start(d),
        };
        defs.iter()
            .filter(|d| d.config.start == crate::mdevctl::Start::Auto)
            .map(|d| (d.uuid, start(d)))
            .collect()
    }
}
