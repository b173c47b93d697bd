//! IOMMU group viability and the functions the host must keep.

use std::fs;

use crate::host::{group_members, PciFunction};
use crate::sysfs::{self, Sysfs};

/// Drivers that may stay on a group member while another member is used through
/// VFIO: they do not do DMA on behalf of the host (`driver_managed_dma`).
const VIABLE_DRIVERS: &[&str] = &["pci-stub", "pcieport"];

/// Whether `f`, as it is now, lets its IOMMU group be used through VFIO.
pub(super) fn viable_as_is(f: &PciFunction) -> bool {
    match f.driver.as_deref() {
        None => true,
        Some(d) => d.starts_with("vfio") || VIABLE_DRIVERS.contains(&d),
    }
}

/// The other members of `f`'s IOMMU group, as they are now.
pub(super) fn peers(sys: &Sysfs, f: &PciFunction) -> Vec<PciFunction> {
    let Some(group) = f.iommu_group else {
        return Vec::new();
    };
    group_members(sys, group)
        .iter()
        .filter(|a| **a != f.address)
        .filter_map(|a| PciFunction::read_brief(sys, a))
        .collect()
}

/// The other members of `f`'s group that would keep it from being viable.
pub(super) fn blocking_members(sys: &Sysfs, f: &PciFunction) -> Vec<PciFunction> {
    peers(sys, f)
        .into_iter()
        .filter(|m| !viable_as_is(m))
        .collect()
}

/// Why the host cannot give `f` away, if it cannot: bridges, the boot display,
/// storage with mounted file systems, network interfaces that are up.
pub fn host_critical(sys: &Sysfs, f: &PciFunction) -> Option<String> {
    if f.is_bridge() {
        return Some("it is a PCI bridge".into());
    }
    if f.boot_vga {
        return Some("it is the boot display (boot_vga=1) the host console uses".into());
    }
    if f.class_base() == 0x02 {
        if let Some(ifname) = up_interface(sys, f) {
            return Some(format!(
                "it carries the host network interface {ifname}, which is up"
            ));
        }
    }
    if f.class_base() == 0x01 {
        if let Some(mount) = mounted_block(sys, f) {
            return Some(format!("it holds {mount}, which the host has mounted"));
        }
    }
    None
}

/// An interface the host has brought up (IFF_UP in `flags`). Not `operstate`: that
/// stays "down" without a carrier, yet the host is still using the interface.
fn up_interface(sys: &Sysfs, f: &PciFunction) -> Option<String> {
    const IFF_UP: u32 = 0x1;
    let net = sys.device_attr(&f.address, "net");
    fs::read_dir(net).ok()?.flatten().find_map(|e| {
        let flags = sysfs::read_hex(&e.path().join("flags"))?;
        (flags & IFF_UP != 0).then(|| e.file_name().to_string_lossy().into_owned())
    })
}

fn mounted_block(sys: &Sysfs, f: &PciFunction) -> Option<String> {
    let mounts = fs::read_to_string(sys.proc_dir().join("mounts")).ok()?;
    let needle = format!("/{}/", f.address);
    mounts.lines().find_map(|line| {
        let dev = line.split_whitespace().next()?.strip_prefix("/dev/")?;
        let target = fs::canonicalize(sys.root().join("sys/class/block").join(dev)).ok()?;
        target
            .to_str()?
            .contains(&needle)
            .then(|| format!("/dev/{dev}"))
    })
}
