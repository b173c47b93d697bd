//! The host model: what the kernel shows about every PCI function, read from sysfs.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::address::PciAddress;
use crate::holders::{self, Holder};
use crate::names;
use crate::sysfs::{self, Sysfs};

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PciFunction {
    pub address: PciAddress,
    /// `vvvv:dddd`, always shown beside the names.
    pub id: String,
    pub vendor_id: u16,
    pub device_id: u16,
    pub vendor_name: Option<String>,
    pub device_name: Option<String>,
    /// 24-bit class code, e.g. 0x030200 (JSON: "030200").
    #[serde(serialize_with = "class_hex")]
    pub class: u32,
    pub driver: Option<String>,
    pub driver_override: Option<String>,
    pub numa_node: Option<u32>,
    pub iommu_group: Option<u32>,
    pub reset_methods: Vec<String>,
    pub boot_vga: bool,
    pub sriov: Option<Sriov>,
    pub physfn: Option<PciAddress>,
    pub mdev_types: Vec<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Sriov {
    pub total_vfs: u32,
    pub num_vfs: u32,
    pub drivers_autoprobe: bool,
    pub vf_offset: u32,
    pub vf_stride: u32,
    pub vf_device_id: Option<u16>,
    /// The VFs the kernel lists now (`virtfnN` links), in index order.
    pub vfs: Vec<PciAddress>,
}

impl PciFunction {
    /// Reads one function. `None` if it does not exist.
    pub fn read(sys: &Sysfs, addr: &PciAddress) -> Option<PciFunction> {
        let mut f = PciFunction::read_brief(sys, addr)?;
        let dir = sys.device_dir(addr);
        f.numa_node =
            sysfs::read_dec::<i32>(&dir.join("numa_node")).and_then(|n| u32::try_from(n).ok());
        f.reset_methods = read_reset_methods(&dir);
        // A VF has no SR-IOV capability of its own.
        f.sriov = if f.is_vf() { None } else { read_sriov(&dir) };
        f.mdev_types = sysfs::dir_names(&dir.join("mdev_supported_types"));
        Some(f)
    }

    /// Reads only what deciding on and moving a function between drivers needs: ids,
    /// class, driver, `driver_override`, IOMMU group, PF and `boot_vga`. `numa_node`,
    /// `reset_methods`, `sriov` and `mdev_types` are left empty. Each attribute read
    /// is a few syscalls (a quarter of a millisecond each on an emulated host), and a
    /// bind reads the VF and its PF: so they are read through one directory fd. The
    /// driver is the `driver` link, not uevent's DRIVER line: the link is what the
    /// kernel and every other reader go by.
    pub fn read_brief(sys: &Sysfs, addr: &PciAddress) -> Option<PciFunction> {
        let dir = sysfs::Dir::open(&sys.device_dir(addr))?;
        let mut f = PciFunction::with_ids(addr, parse_identity(&dir.read("uevent")?)?);
        f.driver = dir.link_name("driver");
        f.driver_override = dir
            .read("driver_override")
            .filter(|s| s != "(null)" && !s.is_empty());
        f.iommu_group = dir.link_name("iommu_group").and_then(|g| g.parse().ok());
        f.physfn = dir.link_name("physfn").and_then(|s| s.parse().ok());
        // The kernel has the attribute on VGA functions only (`pci_is_vga`). A VF is
        // never the boot display: firmware chose that before any VF existed.
        f.boot_vga =
            f.class >> 8 == 0x0300 && !f.is_vf() && dir.read("boot_vga").as_deref() == Some("1");
        Some(f)
    }

    /// Reads only the identity: ids and class, what decides whether a function (a
    /// VF's PF) is ours to manage. Every other field is left empty.
    pub fn read_ids(sys: &Sysfs, addr: &PciAddress) -> Option<PciFunction> {
        let uevent = sysfs::read_opt(&sys.device_attr(addr, "uevent"))?;
        Some(PciFunction::with_ids(addr, parse_identity(&uevent)?))
    }

    fn with_ids(addr: &PciAddress, (vendor_id, device_id, class): (u16, u16, u32)) -> Self {
        let (vendor_name, device_name) = names::lookup(vendor_id, device_id);
        PciFunction {
            address: *addr,
            id: format!("{vendor_id:04x}:{device_id:04x}"),
            vendor_id,
            device_id,
            vendor_name,
            device_name,
            class,
            driver: None,
            driver_override: None,
            numa_node: None,
            iommu_group: None,
            reset_methods: Vec::new(),
            boot_vga: false,
            sriov: None,
            physfn: None,
            mdev_types: Vec::new(),
        }
    }

    pub fn is_vf(&self) -> bool {
        self.physfn.is_some()
    }

    pub fn class_base(&self) -> u8 {
        (self.class >> 16) as u8
    }

    pub fn is_bridge(&self) -> bool {
        self.class_base() == 0x06
    }

    pub fn on_vfio(&self) -> bool {
        self.driver
            .as_deref()
            .is_some_and(|d| d.starts_with("vfio"))
    }

    /// A short human name: "Vendor Device" where known, always with the ids.
    pub fn label(&self) -> String {
        match (&self.vendor_name, &self.device_name) {
            (Some(v), Some(d)) => format!("{v} {d} [{}]", self.id),
            (Some(v), None) => format!("{v} [{}]", self.id),
            _ => format!("[{}]", self.id),
        }
    }
}

fn class_hex<S: serde::Serializer>(class: &u32, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("{class:06x}"))
}

/// Vendor, device and class from the function's `uevent` (`PCI_ID=8086:10CA`,
/// `PCI_CLASS=20000`, as the kernel's `pci_uevent` writes them): one read instead of
/// three (`vendor`, `device`, `class`), and the identity is what every decision on a
/// function starts with.
fn parse_identity(uevent: &str) -> Option<(u16, u16, u32)> {
    let (mut id, mut class) = (None, None);
    for line in uevent.lines() {
        if let Some(v) = line.strip_prefix("PCI_ID=") {
            let (vendor, device) = v.split_once(':')?;
            id = Some((
                u16::from_str_radix(vendor, 16).ok()?,
                u16::from_str_radix(device, 16).ok()?,
            ));
        } else if let Some(c) = line.strip_prefix("PCI_CLASS=") {
            class = u32::from_str_radix(c, 16).ok();
        }
    }
    let (vendor, device) = id?;
    Some((vendor, device, class?))
}

/// The reset methods the kernel offers (`reset_method`), in its order.
pub fn read_reset_methods(dir: &std::path::Path) -> Vec<String> {
    sysfs::read_opt(&dir.join("reset_method"))
        .map(|s| s.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default()
}

pub(crate) fn read_sriov(dir: &std::path::Path) -> Option<Sriov> {
    let total_vfs = sysfs::read_dec(&dir.join("sriov_totalvfs"))?;
    let num_vfs = sysfs::read_dec(&dir.join("sriov_numvfs")).unwrap_or(0);
    let vfs = (0..num_vfs)
        .filter_map(|i| {
            sysfs::link_name(&dir.join(format!("virtfn{i}")))?
                .parse()
                .ok()
        })
        .collect();
    Some(Sriov {
        total_vfs,
        num_vfs,
        drivers_autoprobe: sysfs::read_opt(&dir.join("sriov_drivers_autoprobe")).as_deref()
            != Some("0"),
        vf_offset: sysfs::read_dec(&dir.join("sriov_offset")).unwrap_or(0),
        vf_stride: sysfs::read_dec(&dir.join("sriov_stride")).unwrap_or(0),
        vf_device_id: sysfs::read_hex(&dir.join("sriov_vf_device")).map(|d| d as u16),
        vfs,
    })
}

/// Members of IOMMU group `group`, sorted.
pub fn group_members(sys: &Sysfs, group: u32) -> Vec<PciAddress> {
    sysfs::pci_entries(&sys.iommu_groups().join(group.to_string()).join("devices"))
}

/// A snapshot of every PCI function, IOMMU group and VFIO group holder.
#[derive(Debug, Clone, Serialize)]
pub struct Host {
    pub functions: BTreeMap<PciAddress, PciFunction>,
    pub groups: BTreeMap<u32, Vec<PciAddress>>,
    /// VFIO groups held open, by group number.
    pub holders: BTreeMap<u32, Vec<Holder>>,
}

impl Host {
    pub fn scan(sys: &Sysfs) -> Host {
        let functions: BTreeMap<_, _> = sysfs::pci_entries(&sys.pci_devices())
            .iter()
            .filter_map(|a| Some((*a, PciFunction::read(sys, a)?)))
            .collect();
        let mut groups: BTreeMap<u32, Vec<PciAddress>> = BTreeMap::new();
        for f in functions.values() {
            if let Some(g) = f.iommu_group {
                groups.entry(g).or_default().push(f.address);
            }
        }
        // Only a group bound to vfio can be held open: skip the /proc walk otherwise.
        let holders = if functions.values().any(PciFunction::on_vfio) {
            holders::scan(sys)
        } else {
            BTreeMap::new()
        };
        Host {
            functions,
            groups,
            holders,
        }
    }

    pub fn get(&self, addr: &PciAddress) -> Option<&PciFunction> {
        self.functions.get(addr)
    }

    pub fn holders_of(&self, f: &PciFunction) -> &[Holder] {
        f.iommu_group
            .and_then(|g| self.holders.get(&g))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// The physical functions, each with its VFs, in address order.
    pub fn pfs(&self) -> impl Iterator<Item = &PciFunction> {
        self.functions.values().filter(|f| !f.is_vf())
    }
}
