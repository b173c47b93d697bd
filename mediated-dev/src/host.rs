//! What the kernel shows of mediated devices: parents under
//! `/sys/class/mdev_bus`, their types, the mdevs on `/sys/bus/mdev/devices`, and
//! NVIDIA's per-VF vGPU attributes (`/sys/bus/pci/devices/<VF>/nvidia/`).

use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;
use uuid::Uuid;
use vf_provisioner::sysfs::{self, read_dec, read_opt};
use vf_provisioner::{PciAddress, Sysfs};

use crate::error::{Error, Result};
use vfio_manager_api::ids::{MdevParent, MdevTypeId};

#[derive(Debug, Clone, Serialize)]
pub struct MdevType {
    /// Directory name, e.g. `mtty-2` or `nvidia-223`.
    pub id: MdevTypeId,
    pub name: String,
    pub description: String,
    pub device_api: String,
    /// Instances that fit now; shrinks as the parent's capacity is used.
    pub available_instances: u32,
    /// Mdevs of this type on this parent.
    pub devices: Vec<Uuid>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Parent {
    /// A PCI address or a virtual device name (`mtty`).
    pub name: MdevParent,
    pub types: Vec<MdevType>,
}

impl Parent {
    pub fn find_type(&self, id: &str) -> Result<&MdevType> {
        self.types
            .iter()
            .find(|t| t.id == *id)
            .ok_or_else(|| Error::NoType {
                parent: self.name.to_string(),
                type_id: id.into(),
                known: self
                    .types
                    .iter()
                    .map(|t| t.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Mdev {
    pub uuid: Uuid,
    pub parent: MdevParent,
    pub type_id: MdevTypeId,
    /// The vendor driver bound to it; `None` if its probe failed (no capacity).
    pub driver: Option<String>,
    pub iommu_group: Option<u32>,
    /// `/sys/bus/mdev/devices/<uuid>` (cloud-hypervisor's `--device path=`).
    pub sysfs_path: PathBuf,
}

/// A vGPU type as NVIDIA lists it per VF (vGPU 17+).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VgpuType {
    pub id: u32,
    pub name: String,
}

/// One VF of an NVIDIA GPU on vGPU 17+.
#[derive(Debug, Clone, Serialize)]
pub struct VgpuSlot {
    pub vf: PciAddress,
    pub pf: Option<PciAddress>,
    /// The type this VF has (`current_vgpu_type`, 0 = none).
    pub current: Option<u32>,
    /// What the VF can take now (`creatable_vgpu_types`).
    pub creatable: Vec<VgpuType>,
    pub iommu_group: Option<u32>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct MdevHost {
    pub parents: Vec<Parent>,
    pub mdevs: Vec<Mdev>,
    pub vgpus: Vec<VgpuSlot>,
}

pub fn mdev_bus(sys: &Sysfs) -> PathBuf {
    sys.root().join("sys/class/mdev_bus")
}

pub fn mdev_devices(sys: &Sysfs) -> PathBuf {
    sys.root().join("sys/bus/mdev/devices")
}

/// Whether an mdev with this UUID exists: one `lstat` of its bus entry, where
/// [`read_mdev`] reads two links.
pub fn mdev_exists(sys: &Sysfs, uuid: &Uuid) -> bool {
    mdev_devices(sys)
        .join(uuid.to_string())
        .symlink_metadata()
        .is_ok()
}

pub fn type_dir(sys: &Sysfs, parent: &MdevParent, type_id: &MdevTypeId) -> PathBuf {
    mdev_bus(sys)
        .join(parent)
        .join("mdev_supported_types")
        .join(type_id)
}

/// Reads one type's directory; `None` if there is none.
fn read_type(dir: &Path, id: MdevTypeId) -> Option<MdevType> {
    let attr = |a: &str| read_opt(&dir.join(a)).unwrap_or_default();
    let available_instances = read_dec(&dir.join("available_instances"))?;
    Some(MdevType {
        name: attr("name"),
        description: attr("description"),
        device_api: attr("device_api"),
        available_instances,
        devices: sysfs::dir_names(&dir.join("devices"))
            .iter()
            .filter_map(|u| u.parse().ok())
            .collect(),
        id,
    })
}

/// Reads one parent and its types (whether it exists is the caller's check).
pub fn read_parent(sys: &Sysfs, name: MdevParent) -> Parent {
    let tdir = mdev_bus(sys).join(&name).join("mdev_supported_types");
    let types = sysfs::dir_names(&tdir)
        .into_iter()
        .filter_map(|id| read_type(&tdir.join(&id), MdevTypeId::try_from(id).ok()?))
        .collect();
    Parent { name, types }
}

/// Reads one mdev; `None` if it does not exist.
pub fn read_mdev(sys: &Sysfs, uuid: &Uuid) -> Option<Mdev> {
    let path = mdev_devices(sys).join(uuid.to_string());
    let type_id = MdevTypeId::try_from(sysfs::link_name(&path.join("mdev_type"))?).ok()?;
    // The bus entry links to the device under its parent (`.../<parent>/<uuid>`), and
    // the parent's name is its mdev_bus entry: a PCI address or the device's name.
    // One readlink; resolving the whole path would stat every component.
    let target = fs::read_link(&path).ok()?;
    let parent = MdevParent::new(target.parent()?.file_name()?.to_str()?).ok()?;
    Some(read_known(sys, uuid, parent, type_id))
}

/// An mdev whose parent and type the caller knows (it has just created it): only
/// what the kernel decided, its driver and IOMMU group, is read.
pub(crate) fn read_known(
    sys: &Sysfs,
    uuid: &Uuid,
    parent: MdevParent,
    type_id: MdevTypeId,
) -> Mdev {
    let path = mdev_devices(sys).join(uuid.to_string());
    Mdev {
        uuid: *uuid,
        parent,
        type_id,
        driver: sysfs::link_name(&path.join("driver")),
        iommu_group: sysfs::link_name(&path.join("iommu_group")).and_then(|g| g.parse().ok()),
        sysfs_path: PathBuf::from("/sys/bus/mdev/devices").join(uuid.to_string()),
    }
}

/// Parses NVIDIA's `creatable_vgpu_types`: a header line, then `ID : name` lines.
pub fn parse_vgpu_types(text: &str) -> Vec<VgpuType> {
    text.lines()
        .filter_map(|l| {
            let (id, name) = l.split_once(':')?;
            Some(VgpuType {
                id: id.trim().parse().ok()?,
                name: name.trim().to_string(),
            })
        })
        .collect()
}

/// Reads one VF's vGPU attributes; `None` if it has none.
pub fn read_vgpu(sys: &Sysfs, vf: &PciAddress) -> Option<VgpuSlot> {
    let dir = sys.device_dir(vf).join("nvidia");
    let current: u32 = read_dec(&dir.join("current_vgpu_type"))?;
    Some(VgpuSlot {
        vf: *vf,
        pf: sysfs::link_name(&sys.device_attr(vf, "physfn")).and_then(|s| s.parse().ok()),
        current: (current != 0).then_some(current),
        creatable: parse_vgpu_types(
            &read_opt(&dir.join("creatable_vgpu_types")).unwrap_or_default(),
        ),
        iommu_group: sysfs::link_name(&sys.device_attr(vf, "iommu_group"))
            .and_then(|g| g.parse().ok()),
    })
}

impl MdevHost {
    pub fn scan(sys: &Sysfs) -> MdevHost {
        let parents = sysfs::dir_names(&mdev_bus(sys))
            .into_iter()
            .filter_map(|n| Some(read_parent(sys, MdevParent::try_from(n).ok()?)))
            .collect();
        let mdevs = sysfs::dir_names(&mdev_devices(sys))
            .iter()
            .filter_map(|u| read_mdev(sys, &u.parse().ok()?))
            .collect();
        let vgpus = sysfs::pci_entries(&sys.pci_devices())
            .iter()
            .filter_map(|a| read_vgpu(sys, a))
            .collect();
        MdevHost {
            parents,
            mdevs,
            vgpus,
        }
    }

    pub fn parent(&self, name: &str) -> Result<&Parent> {
        self.parents
            .iter()
            .find(|p| p.name == *name)
            .ok_or_else(|| Error::NoParent(name.into()))
    }

    pub fn mdev(&self, uuid: &Uuid) -> Option<&Mdev> {
        self.mdevs.iter().find(|m| m.uuid == *uuid)
    }
}
