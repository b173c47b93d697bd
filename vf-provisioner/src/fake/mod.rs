//! A fake host for fast tests: a real directory tree shaped like sysfs (so every
//! reader works unchanged) and a [`KernelWrite`] that reacts to writes the way the
//! Linux kernel does. The rules it implements are the ones seen on the real kernel
//! (docs/kernel.md); each
//! has a test in `tests/fake_kernel.rs`. Where the real kernel would block (unbinding a
//! vfio-pci device that a process holds open), the fake fails with `WouldBlock`.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io::{self, ErrorKind};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use serde::{Deserialize, Serialize};

use crate::address::PciAddress;
use crate::sysfs::{self, KernelWrite, FAKE_MARKER};

mod mdev;
pub use mdev::{FakeMdevParent, FakeMdevType, FakeVgpuType};

const DEVICES: &str = "sys/devices/pci0000:00";
const VFIO_PCI: &str = "vfio-pci";

/// A host topology to build a fake tree from. Also serialisable, so layouts can be
/// captured from the emulated host and committed as JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Layout {
    pub name: String,
    pub drivers: Vec<FakeDriver>,
    pub functions: Vec<FakeFunction>,
    /// vfio, vfio_pci and vfio_iommu_type1 loaded (and /dev/vfio/vfio present).
    #[serde(default)]
    pub vfio_loaded: bool,
    /// Name under /sys/class/iommu (e.g. "dmar0"); `None` = IOMMU off.
    #[serde(default)]
    pub iommu: Option<String>,
    #[serde(default)]
    pub cmdline: String,
    /// Mediated-device parents (mtty, NVIDIA before vGPU 17).
    #[serde(default)]
    pub mdev_parents: Vec<FakeMdevParent>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FakeDriver {
    pub name: String,
    /// `vvvv:dddd` ids in the driver's id table.
    #[serde(default)]
    pub ids: Vec<String>,
    /// The driver implements `sriov_configure`.
    #[serde(default)]
    pub sriov_configure: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FakeFunction {
    pub address: PciAddress,
    /// `vvvv:dddd`
    pub id: String,
    /// 24-bit class code in hex, e.g. "030200".
    pub class: String,
    #[serde(default)]
    pub driver: Option<String>,
    #[serde(default = "no_node")]
    pub numa_node: i32,
    #[serde(default)]
    pub iommu_group: Option<u32>,
    #[serde(default)]
    pub reset_methods: Vec<String>,
    #[serde(default)]
    pub boot_vga: bool,
    #[serde(default)]
    pub sriov: Option<FakeSriov>,
}

fn no_node() -> i32 {
    -1
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FakeSriov {
    pub total_vfs: u32,
    pub offset: u32,
    pub stride: u32,
    /// VF device id, hex.
    pub vf_device: String,
    /// VFs enabled when the tree is built (created through the fake kernel).
    #[serde(default)]
    pub num_vfs: u32,
    #[serde(default = "yes")]
    pub drivers_autoprobe: bool,
    /// NVIDIA vGPU 17+: the types each VF offers in `nvidia/creatable_vgpu_types`.
    #[serde(default)]
    pub vgpu_types: Vec<FakeVgpuType>,
}

fn yes() -> bool {
    true
}

pub(crate) fn err(kind: ErrorKind, msg: &str) -> io::Error {
    io::Error::new(kind, msg.to_string())
}

pub(crate) fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// A function's `uevent` as the kernel's `pci_uevent` writes it (no DRIVER line:
/// `attach` adds it): class and ids in upper-case hex, the class without leading
/// zeros (`%04X` of the 24-bit class).
fn uevent(f: &FakeFunction, vendor: &str, device: &str) -> io::Result<String> {
    let class =
        u32::from_str_radix(&f.class, 16).map_err(|_| err(ErrorKind::InvalidData, "bad class"))?;
    Ok(format!(
        "PCI_CLASS={class:04X}\nPCI_ID={}:{}\nPCI_SLOT_NAME={}\n",
        vendor.to_uppercase(),
        device.to_uppercase(),
        f.address
    ))
}

pub(crate) fn write_file(path: &Path, data: &str) -> io::Result<()> {
    match fs::write(path, data) {
        // Almost every write lands in a directory that exists: make it only when not.
        Err(e) if e.kind() == ErrorKind::NotFound => {
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)?;
            }
            fs::write(path, data)
        }
        r => r,
    }
}

impl Layout {
    /// Builds the tree under `root` (which must be empty or absent).
    pub fn build(&self, root: &Path) -> io::Result<()> {
        fs::create_dir_all(root.join("sys/bus/pci/devices"))?;
        fs::create_dir_all(root.join(DEVICES))?;
        fs::create_dir_all(root.join("sys/kernel/iommu_groups"))?;
        fs::create_dir_all(root.join("proc"))?;
        write_file(&root.join(FAKE_MARKER), &format!("{}\n", self.name))?;
        write_file(&root.join("sys/bus/pci/drivers_probe"), "")?;
        write_file(&root.join("proc/cmdline"), &format!("{}\n", self.cmdline))?;
        write_file(&root.join("proc/sys/kernel/osrelease"), "6.12.0-fake\n")?;
        if let Some(iommu) = &self.iommu {
            fs::create_dir_all(root.join("sys/class/iommu").join(iommu))?;
        }
        if self.vfio_loaded {
            for m in ["vfio", "vfio_iommu_type1"] {
                fs::create_dir_all(root.join("sys/module").join(m))?;
            }
            write_file(
                &root.join("sys/module/vfio_pci/parameters/enable_sriov"),
                "N\n",
            )?;
            write_file(&root.join("dev/vfio/vfio"), "")?;
        }
        let mut drivers = self.drivers.clone();
        if self.vfio_loaded && !drivers.iter().any(|d| d.name == VFIO_PCI) {
            drivers.push(FakeDriver {
                name: VFIO_PCI.into(),
                ids: vec![],
                sriov_configure: true,
            });
        }
        for d in &drivers {
            let dir = root.join("sys/bus/pci/drivers").join(&d.name);
            for attr in ["bind", "unbind", "new_id", "remove_id"] {
                write_file(&dir.join(attr), "")?;
            }
            write_file(&dir.join(".fake_ids"), &d.ids.join("\n"))?;
            if d.sriov_configure {
                write_file(&dir.join(".fake_sriov_configure"), "")?;
            }
        }
        let k = FakeKernel::new(root);
        for f in &self.functions {
            k.create_function(f, None)?;
            if let Some(drv) = &f.driver {
                k.attach(&f.address, drv)?;
            }
        }
        for f in &self.functions {
            let Some(s) = &f.sriov else { continue };
            if !s.vgpu_types.is_empty() {
                k.set_vgpu_types(&f.address, &s.vgpu_types)?;
            }
            if s.num_vfs > 0 {
                k.write(
                    &k.dev(&f.address).join("sriov_numvfs"),
                    &format!("{}\n", s.num_vfs),
                )?;
            }
        }
        for p in &self.mdev_parents {
            k.build_mdev_parent(p)?;
        }
        Ok(())
    }

    pub fn from_json(text: &str) -> serde_json::Result<Layout> {
        serde_json::from_str(text)
    }
}

/// The fake kernel. State lives in the tree. Locking follows the kernel's: a write
/// that concerns one function (its attributes, binding it, probing it) holds that
/// function's lock, so writes to different functions run side by side as they do
/// under the kernel's per-device lock; the lock is its IOMMU group's, because the
/// members of a group share `/dev/vfio/N`. Writes that change which functions or
/// mdevs exist, vGPU types or a driver's id table run alone.
pub struct FakeKernel {
    pub(crate) root: PathBuf,
    /// Shared by per-function writes, exclusive for the rest.
    topology: RwLock<()>,
    /// One lock per IOMMU group (or per function without one).
    functions: Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

/// What a write holds while the fake kernel applies it: the topology lock, shared
/// or not, and for a per-function write the function's lock (taken after).
struct Held<'a> {
    _shared: Option<RwLockReadGuard<'a, ()>>,
    _alone: Option<RwLockWriteGuard<'a, ()>>,
    function: Option<Arc<Mutex<()>>>,
}

impl FakeKernel {
    pub fn new(root: &Path) -> Self {
        FakeKernel {
            // Canonical, so that paths resolved through the tree's links share its prefix.
            root: fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf()),
            topology: RwLock::new(()),
            functions: Mutex::new(HashMap::new()),
        }
    }

    /// The locks a write to `parts` (the path under the root) with `data` takes.
    fn hold(&self, parts: &[&str], data: &str) -> Held<'_> {
        let function = match parts {
            ["sys", "bus", "pci", "devices", addr, attr] if *attr != "sriov_numvfs" => {
                addr.parse().ok()
            }
            ["sys", "bus", "pci", "drivers", _, "bind" | "unbind"]
            | ["sys", "bus", "pci", "drivers_probe"] => data.trim().parse().ok(),
            _ => None,
        };
        let Some(a) = function else {
            return Held {
                _shared: None,
                _alone: Some(self.topology.write().unwrap_or_else(|e| e.into_inner())),
                function: None,
            };
        };
        let shared = self.topology.read().unwrap_or_else(|e| e.into_inner());
        let key = self
            .group_of(&a)
            .map_or_else(|| a.to_string(), |g| format!("group {g}"));
        let lock = self
            .functions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default()
            .clone();
        Held {
            _shared: Some(shared),
            _alone: None,
            function: Some(lock),
        }
    }

    fn dev(&self, a: &PciAddress) -> PathBuf {
        self.root.join("sys/bus/pci/devices").join(a.to_string())
    }

    fn real_dev(&self, a: &PciAddress) -> PathBuf {
        self.root.join(DEVICES).join(a.to_string())
    }

    fn driver_dir(&self, d: &str) -> PathBuf {
        self.root.join("sys/bus/pci/drivers").join(d)
    }

    fn read(&self, a: &PciAddress, attr: &str) -> Option<String> {
        sysfs::read_opt(&self.dev(a).join(attr))
    }

    fn read_num<T: std::str::FromStr>(&self, a: &PciAddress, attr: &str, default: T) -> T {
        self.read(a, attr)
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    }

    fn exists(&self, a: &PciAddress) -> bool {
        self.dev(a).join("vendor").exists()
    }

    fn driver_of(&self, a: &PciAddress) -> Option<String> {
        sysfs::link_name(&self.dev(a).join("driver"))
    }

    fn group_of(&self, a: &PciAddress) -> Option<u32> {
        sysfs::link_name(&self.dev(a).join("iommu_group"))?
            .parse()
            .ok()
    }

    fn override_of(&self, a: &PciAddress) -> Option<String> {
        self.read(a, "driver_override").filter(|s| s != "(null)")
    }

    fn create_function(&self, f: &FakeFunction, physfn: Option<&PciAddress>) -> io::Result<()> {
        let dir = self.real_dev(&f.address);
        fs::create_dir_all(&dir)?;
        let (vendor, device) =
            f.id.split_once(':')
                .ok_or_else(|| err(ErrorKind::InvalidData, "bad id"))?;
        write_file(&dir.join("vendor"), &format!("0x{vendor}\n"))?;
        write_file(&dir.join("device"), &format!("0x{device}\n"))?;
        write_file(&dir.join("class"), &format!("0x{}\n", f.class))?;
        fs::write(dir.join("config"), config_space(vendor, device, &f.class))?;
        write_file(&dir.join("uevent"), &uevent(f, vendor, device)?)?;
        write_file(&dir.join("numa_node"), &format!("{}\n", f.numa_node))?;
        write_file(&dir.join("driver_override"), "(null)\n")?;
        if !f.reset_methods.is_empty() {
            write_file(
                &dir.join("reset_method"),
                &format!("{}\n", f.reset_methods.join(" ")),
            )?;
            write_file(&dir.join("reset"), "")?;
        }
        if f.class.starts_with("0300") {
            write_file(
                &dir.join("boot_vga"),
                if f.boot_vga { "1\n" } else { "0\n" },
            )?;
        }
        if let Some(s) = &f.sriov {
            write_file(&dir.join("sriov_totalvfs"), &format!("{}\n", s.total_vfs))?;
            write_file(&dir.join("sriov_numvfs"), "0\n")?;
            write_file(&dir.join("sriov_offset"), &format!("{}\n", s.offset))?;
            write_file(&dir.join("sriov_stride"), &format!("{}\n", s.stride))?;
            write_file(&dir.join("sriov_vf_device"), &format!("{}\n", s.vf_device))?;
            write_file(
                &dir.join("sriov_drivers_autoprobe"),
                if s.drivers_autoprobe { "1\n" } else { "0\n" },
            )?;
        }
        if let Some(pf) = physfn {
            symlink(format!("../{pf}"), dir.join("physfn"))?;
        }
        symlink(
            format!("../../../devices/pci0000:00/{}", f.address),
            self.dev(&f.address),
        )?;
        if let Some(g) = f.iommu_group {
            let gdir = self
                .root
                .join("sys/kernel/iommu_groups")
                .join(g.to_string())
                .join("devices");
            fs::create_dir_all(&gdir)?;
            symlink(
                format!("../../../../devices/pci0000:00/{}", f.address),
                gdir.join(f.address.to_string()),
            )?;
            symlink(
                format!("../../../kernel/iommu_groups/{g}"),
                dir.join("iommu_group"),
            )?;
        }
        Ok(())
    }

    /// Binds without checks (used when building and after the checks passed).
    /// The kernel binds atomically for a writer that dies mid-write; the fake comes
    /// close by making the device's `driver` link, which every reader goes by, last.
    fn attach(&self, a: &PciAddress, driver: &str) -> io::Result<()> {
        let ddir = self.driver_dir(driver);
        if !ddir.is_dir() {
            return Err(errno(libc::ENODEV));
        }
        let back = ddir.join(a.to_string());
        let _ = fs::remove_file(&back); // left by a writer killed mid-detach
        symlink(format!("../../../../devices/pci0000:00/{a}"), back)?;
        if driver == VFIO_PCI {
            if let Some(g) = self.group_of(a) {
                write_file(&self.root.join("dev/vfio").join(g.to_string()), "")?;
            }
        }
        symlink(
            format!("../../../bus/pci/drivers/{driver}"),
            self.real_dev(a).join("driver"),
        )?;
        self.set_uevent_driver(a, Some(driver))
    }

    /// Keeps `uevent`'s DRIVER line in step with the `driver` link, as the kernel's
    /// `dev_uevent` does (it puts the line first, when there is a driver).
    fn set_uevent_driver(&self, a: &PciAddress, driver: Option<&str>) -> io::Result<()> {
        let path = self.real_dev(a).join("uevent");
        let old = sysfs::read_opt(&path).ok_or_else(|| errno(libc::ENOENT))?;
        let rest = old.lines().filter(|l| !l.starts_with("DRIVER="));
        let mut text: String = driver.map_or(String::new(), |d| format!("DRIVER={d}\n"));
        for l in rest {
            text.push_str(l);
            text.push('\n');
        }
        // Replaced whole (the kernel's read is atomic; a reader must never see it
        // half written), from beside the tree where no listing shows it.
        let tmp = self.root.join(".fake-tmp").join(format!("uevent-{a}"));
        write_file(&tmp, &text)?;
        fs::rename(tmp, path)
    }

    fn detach(&self, a: &PciAddress) -> io::Result<()> {
        match self.driver_of(a) {
            Some(driver) => self.detach_from(a, &driver),
            None => Ok(()),
        }
    }

    /// Unbinds `a` from `driver`, the one its link names.
    fn detach_from(&self, a: &PciAddress, driver: &str) -> io::Result<()> {
        if driver == VFIO_PCI {
            if let Some(g) = self.group_of(a) {
                if self.group_held(g) {
                    // The real kernel's vfio-pci remove() waits until the user closes
                    // the device; the caller's write would hang.
                    return Err(err(
                        ErrorKind::WouldBlock,
                        "vfio-pci remove blocks while the group is open",
                    ));
                }
            }
        }
        // The device's link goes first (see `attach`); the driver's may be gone already.
        fs::remove_file(self.real_dev(a).join("driver"))?;
        self.set_uevent_driver(a, None)?;
        match fs::remove_file(self.driver_dir(driver).join(a.to_string())) {
            Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        if driver == VFIO_PCI {
            self.drop_vfio_node(a)?;
        }
        Ok(())
    }

    fn drop_vfio_node(&self, a: &PciAddress) -> io::Result<()> {
        let Some(g) = self.group_of(a) else {
            return Ok(());
        };
        let members = sysfs::pci_entries(
            &self
                .root
                .join("sys/kernel/iommu_groups")
                .join(g.to_string())
                .join("devices"),
        );
        let still_vfio = members
            .iter()
            .any(|m| m != a && self.driver_of(m).as_deref() == Some(VFIO_PCI));
        if !still_vfio {
            let _ = fs::remove_file(self.root.join("dev/vfio").join(g.to_string()));
        }
        Ok(())
    }

    fn group_held(&self, group: u32) -> bool {
        // Reads only: no second fake kernel needed.
        let sys = crate::sysfs::Sysfs::with_kernel(&self.root, Arc::new(sysfs::RealKernel));
        !crate::holders::of_group(&sys, group).is_empty()
    }

    fn driver_ids(&self, driver: &str) -> Vec<String> {
        sysfs::read_opt(&self.driver_dir(driver).join(".fake_ids"))
            .map(|s| s.lines().map(str::to_string).collect())
            .unwrap_or_default()
    }

    fn id_of(&self, a: &PciAddress) -> String {
        let v = self.read(a, "vendor").unwrap_or_default();
        let d = self.read(a, "device").unwrap_or_default();
        format!(
            "{}:{}",
            v.trim_start_matches("0x"),
            d.trim_start_matches("0x")
        )
    }

    /// pci_device_can_probe(): a VF whose PF has autoprobe off probes only with an override.
    fn can_probe(&self, a: &PciAddress) -> bool {
        let Some(pf) = sysfs::link_name(&self.dev(a).join("physfn")).and_then(|s| s.parse().ok())
        else {
            return true;
        };
        self.read(&pf, "sriov_drivers_autoprobe").as_deref() != Some("0")
            || self.override_of(a).is_some()
    }

    /// pci_match_device(): with an override, only that driver; otherwise the id table.
    fn matches(&self, a: &PciAddress, driver: &str) -> bool {
        match self.override_of(a) {
            Some(o) => o == driver,
            None => self.driver_ids(driver).contains(&self.id_of(a)),
        }
    }

    fn all_drivers(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.root.join("sys/bus/pci/drivers"))
            .map(|rd| {
                rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// device_attach(): first matching driver wins. Returns whether one bound.
    /// With an override only that driver can match, so only it is tried.
    fn probe(&self, a: &PciAddress) -> io::Result<bool> {
        if !self.can_probe(a) {
            return Ok(false);
        }
        let candidates = match self.override_of(a) {
            // An override naming no loaded driver matches nothing.
            Some(o) => vec![o]
                .into_iter()
                .filter(|d| self.driver_dir(d).is_dir())
                .collect(),
            None => {
                let id = self.id_of(a);
                let mut all = self.all_drivers();
                all.retain(|d| self.driver_ids(d).contains(&id));
                all
            }
        };
        for d in candidates {
            if d == VFIO_PCI && self.group_of(a).is_none() {
                continue; // vfio-pci probe fails with -EINVAL without an IOMMU group
            }
            self.attach(a, &d)?;
            return Ok(true);
        }
        Ok(false)
    }

    fn parse_addr(data: &str) -> io::Result<PciAddress> {
        data.trim().parse().map_err(|_| errno(libc::ENODEV))
    }

    fn lowest_free_group(&self) -> u32 {
        let used: BTreeSet<u32> = fs::read_dir(self.root.join("sys/kernel/iommu_groups"))
            .map(|rd| {
                rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        (0..)
            .find(|g| !used.contains(g))
            .expect("a free group number")
    }

    fn set_numvfs(&self, pf: &PciAddress, data: &str) -> io::Result<()> {
        let n: u32 = data.trim().parse().map_err(|_| errno(libc::EINVAL))?;
        let cur: u32 = self.read_num(pf, "sriov_numvfs", 0);
        let total: u32 = self.read_num(pf, "sriov_totalvfs", 0);
        if n > total {
            return Err(errno(libc::ERANGE));
        }
        let Some(driver) = self.driver_of(pf) else {
            return Err(errno(libc::ENOENT));
        };
        if n == cur {
            return Ok(());
        }
        if !self
            .driver_dir(&driver)
            .join(".fake_sriov_configure")
            .exists()
        {
            return Err(errno(libc::ENOENT));
        }
        let vfio_pf = driver == VFIO_PCI;
        let enable_sriov = sysfs::read_opt(
            &self
                .root
                .join("sys/module/vfio_pci/parameters/enable_sriov"),
        );
        if vfio_pf && !matches!(enable_sriov.as_deref(), Some("Y" | "1")) {
            return Err(errno(libc::ENOENT));
        }
        if n != 0 && cur != 0 {
            return Err(errno(libc::EBUSY));
        }
        if n == 0 {
            self.remove_vfs(pf, cur)
        } else {
            self.add_vfs(pf, n, vfio_pf)
        }
    }

    fn vf_addr(&self, pf: &PciAddress, i: u32) -> io::Result<PciAddress> {
        let offset: u32 = self.read_num(pf, "sriov_offset", 1);
        let stride: u32 = self.read_num(pf, "sriov_stride", 1);
        pf.offset_by(offset + i * stride)
            .ok_or_else(|| errno(libc::ENOMEM))
    }

    fn add_vfs(&self, pf: &PciAddress, n: u32, vfio_pf: bool) -> io::Result<()> {
        let vendor = self.read(pf, "vendor").unwrap_or_default();
        let class = self.read(pf, "class").unwrap_or_default();
        let vf_device = self.read(pf, "sriov_vf_device").unwrap_or_default();
        let numa_node = self.read_num(pf, "numa_node", -1);
        for i in 0..n {
            let addr = self.vf_addr(pf, i)?;
            let f = FakeFunction {
                address: addr,
                id: format!("{}:{}", vendor.trim_start_matches("0x"), vf_device),
                class: class.trim_start_matches("0x").to_string(),
                driver: None,
                numa_node,
                iommu_group: Some(self.lowest_free_group()),
                reset_methods: vec!["flr".into()],
                boot_vga: false,
                sriov: None,
            };
            self.create_function(&f, Some(pf))?;
            symlink(
                format!("../{addr}"),
                self.real_dev(pf).join(format!("virtfn{i}")),
            )?;
            if vfio_pf {
                write_file(&self.real_dev(&addr).join("driver_override"), "vfio-pci\n")?;
            }
            self.add_vgpu_attrs(pf, &addr)?;
        }
        write_file(&self.real_dev(pf).join("sriov_numvfs"), &format!("{n}\n"))?;
        self.recount_vgpus(pf)?;
        for i in 0..n {
            self.probe(&self.vf_addr(pf, i)?)?;
        }
        Ok(())
    }

    fn remove_vfs(&self, pf: &PciAddress, cur: u32) -> io::Result<()> {
        for i in 0..cur {
            let vf = self.vf_addr(pf, i)?;
            if self.driver_of(&vf).as_deref() == Some(VFIO_PCI)
                && self.group_of(&vf).is_some_and(|g| self.group_held(g))
            {
                return Err(err(
                    ErrorKind::WouldBlock,
                    "VF removal blocks while its VFIO group is open",
                ));
            }
        }
        for i in (0..cur).rev() {
            let vf = self.vf_addr(pf, i)?;
            self.detach(&vf)?;
            if let Some(g) = self.group_of(&vf) {
                let gdir = self
                    .root
                    .join("sys/kernel/iommu_groups")
                    .join(g.to_string());
                fs::remove_file(gdir.join("devices").join(vf.to_string()))?;
                if sysfs::pci_entries(&gdir.join("devices")).is_empty() {
                    fs::remove_dir_all(&gdir)?;
                }
            }
            fs::remove_file(self.dev(&vf))?;
            fs::remove_dir_all(self.real_dev(&vf))?;
            fs::remove_file(self.real_dev(pf).join(format!("virtfn{i}")))?;
        }
        write_file(&self.real_dev(pf).join("sriov_numvfs"), "0\n")
    }

    fn device_write(&self, a: &PciAddress, attr: &str, data: &str) -> io::Result<()> {
        let path = self.real_dev(a).join(attr);
        if !path.exists() {
            return Err(errno(libc::ENOENT));
        }
        match attr {
            "sriov_numvfs" => self.set_numvfs(a, data),
            "sriov_drivers_autoprobe" => match data.trim() {
                "0" | "1" => write_file(&path, &format!("{}\n", data.trim())),
                _ => Err(errno(libc::EINVAL)),
            },
            "driver_override" => {
                let v = data.trim_end_matches('\n');
                write_file(
                    &path,
                    &format!("{}\n", if v.is_empty() { "(null)" } else { v }),
                )
            }
            // A device that stopped answering fails its reset, as the kernel's does.
            "reset" if self.real_dev(a).join(".fake_dead").exists() => Err(errno(libc::EIO)),
            "reset" => {
                let count: u64 =
                    sysfs::read_dec(&self.real_dev(a).join(".fake_resets")).unwrap_or(0);
                write_file(
                    &self.real_dev(a).join(".fake_resets"),
                    &format!("{}\n", count + 1),
                )
            }
            _ => Err(errno(libc::EACCES)),
        }
    }

    fn driver_write(&self, driver: &str, attr: &str, data: &str) -> io::Result<()> {
        match attr {
            "bind" => {
                let a = Self::parse_addr(data)?;
                if !self.exists(&a) || !self.can_probe(&a) || !self.matches(&a, driver) {
                    return Err(errno(libc::ENODEV));
                }
                if self.driver_of(&a).is_some() {
                    return Err(errno(libc::EBUSY));
                }
                if driver == VFIO_PCI && self.group_of(&a).is_none() {
                    return Err(errno(libc::EINVAL));
                }
                self.attach(&a, driver)
            }
            "unbind" => {
                let a = Self::parse_addr(data)?;
                if self.driver_of(&a).as_deref() != Some(driver) {
                    return Err(errno(libc::ENODEV));
                }
                self.detach_from(&a, driver)
            }
            "new_id" => {
                // "vvvv dddd": adds the id and probes every unbound device with it,
                // the reason new_id grabs every function with that id.
                let mut parts = data.split_whitespace();
                let (Some(v), Some(d)) = (parts.next(), parts.next()) else {
                    return Err(errno(libc::EINVAL));
                };
                let mut ids = self.driver_ids(driver);
                ids.push(format!("{v}:{d}"));
                write_file(&self.driver_dir(driver).join(".fake_ids"), &ids.join("\n"))?;
                for a in sysfs::pci_entries(&self.root.join("sys/bus/pci/devices")) {
                    if self.driver_of(&a).is_none()
                        && self.matches(&a, driver)
                        && self.can_probe(&a)
                    {
                        self.attach(&a, driver)?;
                    }
                }
                Ok(())
            }
            _ => Err(errno(libc::EACCES)),
        }
    }
}

impl KernelWrite for FakeKernel {
    fn write(&self, path: &Path, data: &str) -> io::Result<()> {
        let rel = path
            .strip_prefix(&self.root)
            .map_err(|_| errno(libc::ENOENT))?;
        let parts: Vec<&str> = rel.iter().filter_map(|p| p.to_str()).collect();
        let held = self.hold(&parts, data);
        let _function = held
            .function
            .as_ref()
            .map(|l| l.lock().unwrap_or_else(|e| e.into_inner()));
        match parts.as_slice() {
            ["sys", "bus", "pci", "devices", addr, attr] => {
                let a: PciAddress = addr.parse().map_err(|_| errno(libc::ENOENT))?;
                if !self.exists(&a) {
                    return Err(errno(libc::ENOENT));
                }
                self.device_write(&a, attr, data)
            }
            ["sys", "bus", "pci", "drivers", driver, attr] if self.driver_dir(driver).is_dir() => {
                self.driver_write(driver, attr, data)
            }
            ["sys", "bus", "pci", "drivers_probe"] => {
                let a = Self::parse_addr(data)?;
                if !self.exists(&a) {
                    return Err(errno(libc::ENODEV));
                }
                if self.driver_of(&a).is_some() {
                    return Err(errno(libc::EINVAL));
                }
                self.probe(&a).map(|_| ())
            }
            ["sys", "module", "vfio_pci", "parameters", "enable_sriov"] if path.exists() => {
                match data.trim() {
                    "Y" | "y" | "1" => write_file(path, "Y\n"),
                    "N" | "n" | "0" => write_file(path, "N\n"),
                    _ => Err(errno(libc::EINVAL)),
                }
            }
            ["sys", "bus", "pci", "devices", addr, "nvidia", "current_vgpu_type"] => {
                let a: PciAddress = addr.parse().map_err(|_| errno(libc::ENOENT))?;
                if !path.exists() {
                    return Err(errno(libc::ENOENT));
                }
                self.vgpu_write(&a, data)
            }
            ["sys", "bus", "mdev", "drivers", driver, attr] if path.exists() => {
                self.mdev_driver_write(driver, attr, data)
            }
            _ if path.exists() => self.mdev_write(path, data),
            _ => Err(errno(libc::ENOENT)),
        }
    }
}

impl FakeKernel {
    /// `create` under a type directory or `remove` of an mdev, reached by any path.
    fn mdev_write(&self, path: &Path, data: &str) -> io::Result<()> {
        let dir = path
            .parent()
            .and_then(|p| fs::canonicalize(p).ok())
            .ok_or_else(|| errno(libc::ENOENT))?;
        let grandparent = dir.parent().and_then(|p| p.file_name());
        match path.file_name().and_then(|n| n.to_str()) {
            Some("create") if grandparent == Some("mdev_supported_types".as_ref()) => {
                self.mdev_create(&dir, data)
            }
            Some("remove") if dir.join("mdev_type").exists() => self.mdev_remove(&dir, data),
            _ => Err(errno(libc::EACCES)),
        }
    }
}

/// Makes process `pid` (named `comm`) hold VFIO group `group` open, as a VMM would.
pub fn hold_group(root: &Path, pid: u32, comm: &str, group: u32) -> io::Result<()> {
    let dir = root.join("proc").join(pid.to_string());
    write_file(&dir.join("comm"), &format!("{comm}\n"))?;
    fs::create_dir_all(dir.join("fd"))?;
    let fd = dir.join("fd").join(format!("{}", 10 + group));
    let _ = fs::remove_file(&fd);
    symlink(format!("/dev/vfio/{group}"), fd)
}

/// Ends process `pid` (closes everything it held).
pub fn end_process(root: &Path, pid: u32) -> io::Result<()> {
    fs::remove_dir_all(root.join("proc").join(pid.to_string()))
}

/// The first 64 bytes of a function's configuration space, as `config` shows them:
/// vendor and device ids, then the class code; the rest zero.
fn config_space(vendor: &str, device: &str, class: &str) -> Vec<u8> {
    let mut c = vec![0u8; 64];
    let hex = |s: &str| u32::from_str_radix(s, 16).unwrap_or(0);
    c[0..2].copy_from_slice(&(hex(vendor) as u16).to_le_bytes());
    c[2..4].copy_from_slice(&(hex(device) as u16).to_le_bytes());
    c[9..12].copy_from_slice(&hex(class).to_le_bytes()[..3]);
    c
}

/// Makes function `a` (with an AER capability) count `n` correctable errors since
/// boot, as the kernel's `aer_dev_correctable` shows them: one line per error type,
/// then the total.
pub fn count_correctable(root: &Path, a: &PciAddress, n: u64) -> io::Result<()> {
    let dir = root.join(DEVICES).join(a.to_string());
    write_file(
        &dir.join("aer_dev_correctable"),
        &format!("RxErr {n}\nBadTLP 0\nBadDLLP 0\nRollover 0\nTimeout 0\nNonFatalErr 0\nCorrIntErr 0\nHeaderOF 0\nTOTAL_ERR_COR {n}\n"),
    )
}

/// Makes function `a` stop answering, as a device that fell off the bus: its
/// configuration space reads all ones and its reset fails (EIO).
pub fn fail_device(root: &Path, a: &PciAddress) -> io::Result<()> {
    let dir = root.join(DEVICES).join(a.to_string());
    fs::write(dir.join("config"), vec![0xff; 64])?;
    write_file(&dir.join(".fake_dead"), "")
}

/// Makes a function failed by [`fail_device`] answer again, with `id` (vvvv:dddd)
/// and `class`.
pub fn heal_device(root: &Path, a: &PciAddress, id: &str, class: &str) -> io::Result<()> {
    let dir = root.join(DEVICES).join(a.to_string());
    let (vendor, device) = id.split_once(':').unwrap_or((id, "0"));
    fs::write(dir.join("config"), config_space(vendor, device, class))?;
    fs::remove_file(dir.join(".fake_dead"))
}

/// How many times the fake kernel reset a function.
pub fn reset_count(root: &Path, a: &PciAddress) -> u64 {
    sysfs::read_dec(&root.join(DEVICES).join(a.to_string()).join(".fake_resets")).unwrap_or(0)
}

impl Layout {
    /// Captures the topology of a live host as a layout: every function that is not
    /// a VF (VFs are made by the fake kernel from their PF's geometry), the drivers
    /// with the ids of the functions bound to them now (the kernel does not expose
    /// id tables: enable a VF with autoprobe on before capturing so that the VF
    /// driver's id is seen), and whether VFIO and the IOMMU are on.
    pub fn capture(sys: &crate::Sysfs, name: &str) -> Layout {
        let host = crate::Host::scan(sys);
        let mut drivers: Vec<FakeDriver> = fs::read_dir(sys.drivers_dir())
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
            .into_iter()
            .map(|name| FakeDriver {
                name,
                ids: vec![],
                sriov_configure: false,
            })
            .collect();
        drivers.sort_by(|a, b| a.name.cmp(&b.name));
        for f in host.functions.values() {
            let Some(d) = drivers
                .iter_mut()
                .find(|d| Some(&d.name) == f.driver.as_ref())
            else {
                continue;
            };
            if !d.ids.contains(&f.id) && d.name != VFIO_PCI {
                d.ids.push(f.id.clone());
            }
            d.sriov_configure |= f.sriov.as_ref().is_some_and(|s| s.total_vfs > 0);
        }
        drivers
            .iter_mut()
            .filter(|d| d.name == VFIO_PCI)
            .for_each(|d| d.sriov_configure = true);
        let functions = host
            .functions
            .values()
            .filter(|f| !f.is_vf())
            .map(|f| FakeFunction {
                address: f.address,
                id: f.id.clone(),
                class: format!("{:06x}", f.class),
                driver: f.driver.clone(),
                numa_node: f.numa_node.map_or(-1, |n| n as i32),
                iommu_group: f.iommu_group,
                reset_methods: f.reset_methods.clone(),
                boot_vga: f.boot_vga,
                sriov: f.sriov.as_ref().map(|s| FakeSriov {
                    total_vfs: s.total_vfs,
                    offset: s.vf_offset,
                    stride: s.vf_stride,
                    vf_device: format!("{:04x}", s.vf_device_id.unwrap_or(f.device_id)),
                    num_vfs: 0,
                    drivers_autoprobe: s.drivers_autoprobe,
                    vgpu_types: vec![],
                }),
            })
            .collect();
        let iommu = fs::read_dir(sys.root().join("sys/class/iommu"))
            .ok()
            .and_then(|mut rd| rd.next()?.ok()?.file_name().into_string().ok());
        Layout {
            name: name.into(),
            drivers,
            functions,
            vfio_loaded: sys.drivers_dir().join(VFIO_PCI).exists(),
            iommu,
            cmdline: sysfs::read_opt(&sys.proc_dir().join("cmdline")).unwrap_or_default(),
            mdev_parents: mdev::capture(sys.root()),
        }
    }
}
