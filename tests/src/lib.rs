//! Helpers shared by the integration tests: one test body runs against a fake host
//! (default) or against the real kernel of the emulated host (`VFM_REAL_KERNEL=1`,
//! run inside the guest by `tests/real-kernel/run.sh`).

use std::fs::File;
use std::path::{Path, PathBuf};

use vf_provisioner::{
    fake, layouts, DeviceConfig, DeviceFilter, PciAddress, PciFunction, Provisioner, Sysfs,
};

/// The emulated host's topology (QEMU command line in tests/real-kernel/run.sh);
/// the fake layout `emulated` has the same addresses.
pub const IGB: &str = "0000:01:00.0";
pub const NVME: &str = "0000:02:00.0";
/// A multifunction slot: two e1000e functions in one IOMMU group.
pub const MF0: &str = "0000:03:00.0";
pub const MF1: &str = "0000:03:00.1";

/// The configuration the tests use: the stand-in PFs and the slot's first function.
pub const CONFIG: &str = "manage = [\"8086:10c9\", \"1b36:0010\", \"0000:03:00.0\"]";

pub struct Env {
    pub root: PathBuf,
    pub real: bool,
    _tmp: Option<tempfile::TempDir>,
}

impl Env {
    pub fn new() -> Env {
        if std::env::var_os("VFM_REAL_KERNEL").is_some() {
            return Env {
                root: "/".into(),
                real: true,
                _tmp: None,
            };
        }
        let tmp = tempfile::tempdir().expect("tempdir");
        layouts::emulated().build(tmp.path()).expect("fake host");
        Env {
            root: tmp.path().to_path_buf(),
            real: false,
            _tmp: Some(tmp),
        }
    }

    pub fn sys(&self) -> Sysfs {
        Sysfs::open_as(&self.root, !self.real).expect("sysfs root")
    }

    pub fn provisioner(&self) -> Provisioner {
        let cfg = DeviceConfig::parse(CONFIG, Path::new("test")).expect("config");
        Provisioner::new(self.sys(), DeviceFilter::new(&cfg))
    }

    pub fn func(&self, a: &str) -> PciFunction {
        PciFunction::read(&self.sys(), &addr(a)).unwrap_or_else(|| panic!("{a} missing"))
    }

    pub fn driver(&self, a: &str) -> Option<String> {
        self.func(a).driver
    }

    /// Brings the network interface of function `a` up or down, as the host's
    /// network configuration would. Returns the interface name.
    pub fn set_link(&self, a: &str, up: bool) -> String {
        let net = self.root.join("sys/bus/pci/devices").join(a).join("net");
        if !self.real {
            let dir = net.join("eth0");
            std::fs::create_dir_all(&dir).expect("fake net dir");
            std::fs::write(dir.join("flags"), if up { "0x1003\n" } else { "0x1002\n" })
                .expect("fake flags");
            return "eth0".into();
        }
        let name = std::fs::read_dir(&net)
            .expect("a netdev")
            .flatten()
            .next()
            .expect("one netdev")
            .file_name();
        let name = name.to_string_lossy().into_owned();
        let state = if up { "up" } else { "down" };
        let ok = std::process::Command::new("ip")
            .args(["link", "set", "dev", &name, state])
            .status()
            .expect("ip");
        assert!(ok.success(), "ip link set {name} {state}");
        name
    }

    /// Holds VFIO group `group` open as a VMM would, until the guard drops.
    pub fn hold(&self, group: u32) -> Hold {
        if self.real {
            let f = File::options()
                .read(true)
                .write(true)
                .open(format!("/dev/vfio/{group}"))
                .expect("open VFIO group");
            return Hold::Real(f);
        }
        fake::hold_group(&self.root, 4242, "qemu-system-x86", group).expect("fake holder");
        Hold::Fake(self.root.clone())
    }
}

impl Default for Env {
    fn default() -> Self {
        Env::new()
    }
}

pub enum Hold {
    Real(#[allow(dead_code)] File),
    Fake(PathBuf),
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Hold::Fake(root) = self {
            let _ = fake::end_process(root, 4242);
        }
    }
}

pub fn addr(s: &str) -> PciAddress {
    s.parse().expect("address")
}

/// Returns the emulated host to its boot state (no VFs, host drivers) when dropped,
/// so that tests sharing the real kernel do not see each other's changes.
pub struct Restore<'a>(pub &'a Env);

impl Drop for Restore<'_> {
    fn drop(&mut self) {
        let p = self.0.provisioner();
        for pf in [IGB, NVME, MF0] {
            let _ = p.disable_vfs(&addr(pf));
            let _ = p.unbind(&addr(pf), true, None);
        }
    }
}
