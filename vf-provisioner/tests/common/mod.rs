#![allow(dead_code)]

use std::path::Path;

use vf_provisioner::fake::Layout;
use vf_provisioner::{DeviceConfig, DeviceFilter, PciAddress, PciFunction, Provisioner, Sysfs};

pub fn build(layout: Layout) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    layout.build(dir.path()).unwrap();
    dir
}

pub fn sys(root: &Path) -> Sysfs {
    Sysfs::open_fake(root).unwrap()
}

pub fn a(s: &str) -> PciAddress {
    s.parse().unwrap()
}

pub fn func(root: &Path, addr: &str) -> PciFunction {
    PciFunction::read(&sys(root), &a(addr)).unwrap()
}

pub fn driver(root: &Path, addr: &str) -> Option<String> {
    func(root, addr).driver
}

/// A provisioner that manages the emulated host's NIC and NVMe PFs too.
pub fn provisioner(root: &Path) -> Provisioner {
    let cfg = DeviceConfig::parse(
        "manage = [\"8086:10c9\", \"1b36:0010\"]",
        Path::new("test.toml"),
    )
    .unwrap();
    Provisioner::new(sys(root), DeviceFilter::new(&cfg))
}

/// A raw sysfs write through the fake kernel, returning the errno on failure.
pub fn write(root: &Path, rel: &str, data: &str) -> Result<(), i32> {
    let s = sys(root);
    let dev = a("0000:00:00.0");
    s.write(&dev, &root.join(rel), data).map_err(|e| match e {
        vf_provisioner::Error::KernelWrite { source, .. } => source.raw_os_error().unwrap_or(-1),
        other => panic!("unexpected {other}"),
    })
}
