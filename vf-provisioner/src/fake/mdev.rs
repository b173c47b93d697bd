//! The fake kernel's mediated devices: the mdev bus (parents, types, create,
//! remove, the vendor driver's bind) and NVIDIA's per-VF vGPU attributes (vGPU 17+
//! on kernel 6.8+). Rules, each seen on the real kernel (docs/kernel.md) or taken
//! from the vendor's documentation where no hardware exists here:
//! - `create` takes a lowercase UUID; a UUID in use fails with EEXIST;
//! - creating beyond `available_instances`: the vendor driver's probe fails, the
//!   kernel deletes the new device and the write fails with the probe's error
//!   (mtty: ENOSPC; seen on 6.12, `mdev_device_create` -> `out_del`);
//! - an mdev gets its own IOMMU group and, once bound, a `/dev/vfio/N` node;
//! - `remove` blocks while its group is open (the fake fails with `WouldBlock`);
//! - after an unbind, `bind` fails with ENODEV (rule 6);
//! - types on one parent draw from one capacity (mtty: 24 ports; `mtty-2` takes
//!   two), and NVIDIA time-sliced types with different framebuffer sizes never
//!   share a GPU (`available_instances` of the others drops to 0);
//! - NVIDIA vGPU 17+: a VF's `nvidia/creatable_vgpu_types` lists the types that fit
//!   now; `current_vgpu_type` takes one of them, `0` clears it, a VF that has a type
//!   must be cleared first (EBUSY), a type that is not creatable gives EINVAL, and
//!   every other VF's list shrinks as types are taken.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, ErrorKind};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{err, errno, write_file, FakeKernel};
use crate::address::PciAddress;
use crate::sysfs;

/// A mediated-device parent: a PCI function (NVIDIA before vGPU 17) or a virtual
/// device such as the `mtty` sample.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FakeMdevParent {
    /// A PCI address, or the name of a virtual device (`mtty`).
    pub parent: String,
    /// The vendor driver on the mdev bus that binds its devices.
    pub driver: String,
    /// Capacity the types draw from.
    pub units: u32,
    pub types: Vec<FakeMdevType>,
    /// The driver module's `version` (`/sys/module/DRIVER/version`; mtty: `0.1`),
    /// if it declares one.
    #[serde(default)]
    pub version: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FakeMdevType {
    /// Directory name under `mdev_supported_types` (`mtty-2`, `nvidia-222`).
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default = "vfio_pci_api")]
    pub device_api: String,
    /// Units of the parent's capacity one instance takes.
    pub units: u32,
    /// Types with different groups never share a parent (NVIDIA framebuffer size).
    #[serde(default)]
    pub group: Option<String>,
}

fn vfio_pci_api() -> String {
    "vfio-pci".into()
}

/// A vGPU type offered per VF on NVIDIA vGPU 17+.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FakeVgpuType {
    pub id: u32,
    pub name: String,
    pub framebuffer_mib: u32,
    /// Instances one GPU holds of this type.
    pub max_instances: u32,
}

const VGPU_TYPES: &str = ".fake_vgpu_types";

/// `path` relative to the root's top, as a link placed at `link` (also relative)
/// must spell it.
fn relative(link: &Path, target: &Path) -> PathBuf {
    let depth = link.parent().map_or(0, |p| p.components().count());
    let mut out = PathBuf::new();
    for _ in 0..depth {
        out.push("..");
    }
    out.join(target)
}

fn valid_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups.iter().all(|g| {
            g.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        })
}

impl FakeKernel {
    fn link(&self, link: &Path, target: &Path) -> io::Result<()> {
        let abs = self.root.join(link);
        if let Some(p) = abs.parent() {
            fs::create_dir_all(p)?;
        }
        symlink(relative(link, target), abs)
    }

    fn rel<'a>(&self, p: &'a Path) -> io::Result<&'a Path> {
        p.strip_prefix(&self.root).map_err(|_| errno(libc::ENOENT))
    }

    /// Builds a parent, its types and its mdev driver.
    pub(crate) fn build_mdev_parent(&self, p: &FakeMdevParent) -> io::Result<()> {
        let pdir = match p.parent.parse::<PciAddress>() {
            Ok(a) => PathBuf::from("sys/devices/pci0000:00").join(a.to_string()),
            Err(_) => PathBuf::from("sys/devices/virtual")
                .join(&p.driver)
                .join(&p.parent),
        };
        let abs = self.root.join(&pdir);
        write_file(&abs.join(".fake_units"), &format!("{}\n", p.units))?;
        write_file(&abs.join(".fake_mdev_driver"), &p.driver)?;
        for t in &p.types {
            let tdir = abs.join("mdev_supported_types").join(&t.id);
            fs::create_dir_all(tdir.join("devices"))?;
            write_file(&tdir.join("name"), &format!("{}\n", t.name))?;
            write_file(&tdir.join("description"), &format!("{}\n", t.description))?;
            write_file(&tdir.join("device_api"), &format!("{}\n", t.device_api))?;
            write_file(&tdir.join("create"), "")?;
            write_file(&tdir.join(".fake_units"), &format!("{}\n", t.units))?;
            if let Some(g) = &t.group {
                write_file(&tdir.join(".fake_group"), g)?;
            }
        }
        self.link(&Path::new("sys/class/mdev_bus").join(&p.parent), &pdir)?;
        // The vendor driver is a loaded module (kernel rule 15).
        let module = self.root.join("sys/module").join(&p.driver);
        fs::create_dir_all(&module)?;
        if let Some(v) = &p.version {
            write_file(&module.join("version"), &format!("{v}\n"))?;
        }
        let ddir = self.root.join("sys/bus/mdev/drivers").join(&p.driver);
        for attr in ["bind", "unbind"] {
            write_file(&ddir.join(attr), "")?;
        }
        fs::create_dir_all(self.root.join("sys/bus/mdev/devices"))?;
        self.recount(&abs)
    }

    fn bound(&self, dev: &Path) -> bool {
        dev.join("driver").exists()
    }

    /// Rewrites every type's `available_instances` from what its parent holds.
    fn recount(&self, pdir: &Path) -> io::Result<()> {
        let units: u32 = sysfs::read_dec(&pdir.join(".fake_units")).unwrap_or(0);
        let types = pdir.join("mdev_supported_types");
        let mut used = 0;
        let mut groups = BTreeSet::new();
        for t in sysfs::dir_names(&types) {
            let tdir = types.join(&t);
            let n = sysfs::dir_names(&tdir.join("devices"))
                .iter()
                .filter(|u| self.bound(&pdir.join(u)))
                .count() as u32;
            used += n * sysfs::read_dec::<u32>(&tdir.join(".fake_units")).unwrap_or(1);
            if n > 0 {
                groups.extend(sysfs::read_opt(&tdir.join(".fake_group")));
            }
        }
        for t in sysfs::dir_names(&types) {
            let tdir = types.join(&t);
            let cost: u32 = sysfs::read_dec(&tdir.join(".fake_units")).unwrap_or(1);
            let group = sysfs::read_opt(&tdir.join(".fake_group"));
            let blocked = group.is_some_and(|g| groups.iter().any(|x| *x != g));
            let free = if blocked {
                0
            } else {
                (units - used.min(units)) / cost.max(1)
            };
            write_file(&tdir.join("available_instances"), &format!("{free}\n"))?;
        }
        Ok(())
    }

    fn new_group(&self, dev_rel: &Path, name: &str) -> io::Result<u32> {
        let g = self.lowest_free_group();
        let gdir = PathBuf::from("sys/kernel/iommu_groups").join(g.to_string());
        self.link(&gdir.join("devices").join(name), dev_rel)?;
        self.link(&dev_rel.join("iommu_group"), &gdir)?;
        Ok(g)
    }

    /// A write to `<parent>/mdev_supported_types/<type>/create`.
    pub(crate) fn mdev_create(&self, tdir: &Path, data: &str) -> io::Result<()> {
        let uuid = data.trim();
        if !valid_uuid(uuid) {
            return Err(errno(libc::EINVAL));
        }
        let bus = PathBuf::from("sys/bus/mdev/devices").join(uuid);
        if self.root.join(&bus).symlink_metadata().is_ok() {
            return Err(errno(libc::EEXIST));
        }
        let pdir = tdir
            .parent()
            .and_then(Path::parent)
            .ok_or_else(|| errno(libc::ENOENT))?;
        // The vendor driver's probe decides from the capacity itself, not from what
        // a reader saw in available_instances a moment ago; on failure the kernel
        // deletes the device again and the write fails.
        self.recount(pdir)?;
        if sysfs::read_dec::<u32>(&tdir.join("available_instances")).unwrap_or(0) == 0 {
            return Err(errno(libc::ENOSPC));
        }
        let type_id = tdir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let dev = self.rel(pdir)?.join(uuid);
        // A create cut off before its bus link (below) left a directory that no
        // reader sees; for the kernel, whose write is not cut, it never existed.
        match fs::remove_dir_all(self.root.join(&dev)) {
            Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        fs::create_dir_all(self.root.join(&dev))?;
        write_file(&self.root.join(&dev).join("remove"), "")?;
        symlink(
            Path::new("../mdev_supported_types").join(type_id),
            self.root.join(&dev).join("mdev_type"),
        )?;
        // The kernel's write is one step a killed writer cannot cut; the fake's
        // are many, and the daemon that runs it may be killed between two. The bus
        // link, what every reader finds an mdev by, comes first: a device cut off
        // after it is an unbound mdev (as rule 11 leaves one) that `remove` takes
        // away; one cut off before it is invisible.
        self.link(&bus, &dev)?;
        symlink(
            Path::new("../../..").join(uuid),
            tdir.join("devices").join(uuid),
        )?;
        let group = self.new_group(&dev, uuid)?;
        let driver = sysfs::read_opt(&pdir.join(".fake_mdev_driver")).unwrap_or_default();
        let drv = PathBuf::from("sys/bus/mdev/drivers").join(&driver);
        self.link(&drv.join(uuid), &dev)?;
        self.link(&dev.join("driver"), &drv)?;
        write_file(&self.root.join("dev/vfio").join(group.to_string()), "")?;
        self.recount(pdir)
    }

    fn mdev_group(&self, dev: &Path) -> Option<u32> {
        sysfs::link_name(&dev.join("iommu_group"))?.parse().ok()
    }

    fn mdev_unbind(&self, dev: &Path) -> io::Result<()> {
        let Some(driver) = sysfs::link_name(&dev.join("driver")) else {
            return Ok(());
        };
        let group = self.mdev_group(dev);
        if group.is_some_and(|g| self.group_held(g)) {
            return Err(err(
                ErrorKind::WouldBlock,
                "mdev release blocks while its group is open",
            ));
        }
        let uuid = dev.file_name().unwrap_or_default();
        fs::remove_file(dev.join("driver"))?;
        let _ = fs::remove_file(
            self.root
                .join("sys/bus/mdev/drivers")
                .join(driver)
                .join(uuid),
        );
        if let Some(g) = group {
            let _ = fs::remove_file(self.root.join("dev/vfio").join(g.to_string()));
        }
        Ok(())
    }

    /// A write to `<mdev>/remove`.
    pub(crate) fn mdev_remove(&self, dev: &Path, data: &str) -> io::Result<()> {
        if data.trim() != "1" {
            return Err(errno(libc::EINVAL));
        }
        self.mdev_unbind(dev)?;
        let uuid = dev.file_name().unwrap_or_default().to_owned();
        let tdir = fs::canonicalize(dev.join("mdev_type"))?;
        // Missing where a create was cut off before it (see `mdev_create`).
        match fs::remove_file(tdir.join("devices").join(&uuid)) {
            Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        fs::remove_file(self.root.join("sys/bus/mdev/devices").join(&uuid))?;
        if let Some(g) = self.mdev_group(dev) {
            fs::remove_dir_all(
                self.root
                    .join("sys/kernel/iommu_groups")
                    .join(g.to_string()),
            )?;
        }
        fs::remove_dir_all(dev)?;
        self.recount(dev.parent().ok_or_else(|| errno(libc::ENOENT))?)
    }

    /// A write to `/sys/bus/mdev/drivers/<driver>/{bind,unbind}`.
    pub(crate) fn mdev_driver_write(&self, driver: &str, attr: &str, data: &str) -> io::Result<()> {
        let dev = self.root.join("sys/bus/mdev/devices").join(data.trim());
        match attr {
            "unbind" if sysfs::link_name(&dev.join("driver")).as_deref() == Some(driver) => {
                let real = fs::canonicalize(&dev)?;
                self.mdev_unbind(&real)?;
                self.recount(real.parent().ok_or_else(|| errno(libc::ENOENT))?)
            }
            // An mdev cannot be bound again once unbound (kernel rule 6, docs/kernel.md).
            "unbind" | "bind" => Err(errno(libc::ENODEV)),
            _ => Err(errno(libc::EACCES)),
        }
    }

    /// Records a PF's vGPU type table (vGPU 17+) when the layout is built.
    pub(crate) fn set_vgpu_types(&self, pf: &PciAddress, types: &[FakeVgpuType]) -> io::Result<()> {
        let json = serde_json::to_string(types).map_err(io::Error::other)?;
        write_file(&self.real_dev(pf).join(VGPU_TYPES), &json)
    }

    fn vgpu_types(&self, pf: &PciAddress) -> Vec<FakeVgpuType> {
        sysfs::read_opt(&self.real_dev(pf).join(VGPU_TYPES))
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default()
    }

    /// Gives a new VF of a vGPU-capable PF its `nvidia/` attributes.
    pub(crate) fn add_vgpu_attrs(&self, pf: &PciAddress, vf: &PciAddress) -> io::Result<()> {
        if self.vgpu_types(pf).is_empty() {
            return Ok(());
        }
        let dir = self.real_dev(vf).join("nvidia");
        write_file(&dir.join("current_vgpu_type"), "0\n")?;
        write_file(&dir.join("creatable_vgpu_types"), "")
    }

    fn vfs_of(&self, pf: &PciAddress) -> Vec<PciAddress> {
        sysfs::dir_names(&self.real_dev(pf))
            .iter()
            .filter(|n| n.starts_with("virtfn"))
            .filter_map(|n| sysfs::link_name(&self.real_dev(pf).join(n))?.parse().ok())
            .collect()
    }

    fn current_vgpu(&self, vf: &PciAddress) -> u32 {
        self.read_num(vf, "nvidia/current_vgpu_type", 0)
    }

    /// Rewrites every VF's `creatable_vgpu_types` from the types the others hold.
    pub(crate) fn recount_vgpus(&self, pf: &PciAddress) -> io::Result<()> {
        let types = self.vgpu_types(pf);
        let vfs = self.vfs_of(pf);
        let taken: Vec<&FakeVgpuType> = vfs
            .iter()
            .filter_map(|vf| {
                let cur = self.current_vgpu(vf);
                types.iter().find(|t| t.id == cur)
            })
            .collect();
        let fits = |t: &FakeVgpuType| {
            taken.iter().all(|x| x.framebuffer_mib == t.framebuffer_mib)
                && (taken.iter().filter(|x| x.id == t.id).count() as u32) < t.max_instances
        };
        for vf in vfs {
            let mut text = String::from("ID    : vGPU Name\n");
            if self.current_vgpu(&vf) == 0 {
                for t in types.iter().filter(|t| fits(t)) {
                    text.push_str(&format!("{:<5} : {}\n", t.id, t.name));
                }
            }
            write_file(
                &self.real_dev(&vf).join("nvidia/creatable_vgpu_types"),
                &text,
            )?;
        }
        Ok(())
    }

    /// A write to `<VF>/nvidia/current_vgpu_type`.
    pub(crate) fn vgpu_write(&self, vf: &PciAddress, data: &str) -> io::Result<()> {
        let id: u32 = data.trim().parse().map_err(|_| errno(libc::EINVAL))?;
        if self.group_of(vf).is_some_and(|g| self.group_held(g)) {
            return Err(errno(libc::EBUSY));
        }
        let cur = self.current_vgpu(vf);
        if id != 0 {
            if cur != 0 {
                return Err(errno(libc::EBUSY));
            }
            let listed = self
                .read(vf, "nvidia/creatable_vgpu_types")
                .unwrap_or_default();
            let creatable = listed
                .lines()
                .skip(1)
                .any(|l| l.split(':').next().map(str::trim) == Some(&id.to_string()));
            if !creatable {
                return Err(errno(libc::EINVAL));
            }
        }
        write_file(
            &self.real_dev(vf).join("nvidia/current_vgpu_type"),
            &format!("{id}\n"),
        )?;
        let pf = sysfs::link_name(&self.dev(vf).join("physfn"))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| errno(libc::ENODEV))?;
        self.recount_vgpus(&pf)
    }
}

/// The mdev parents of a live host, for [`crate::fake::Layout::capture`]. The kernel
/// shows only how many instances of each type fit now, so capture with no mdev
/// created: the parent's capacity is then the largest count, and a type's cost the
/// capacity over its count (mtty: 24 ports; `mtty-1` 24 fit, `mtty-2` 12).
pub(crate) fn capture(root: &Path) -> Vec<FakeMdevParent> {
    let bus = root.join("sys/class/mdev_bus");
    sysfs::dir_names(&bus)
        .into_iter()
        .filter_map(|parent| {
            let pdir = fs::canonicalize(bus.join(&parent)).ok()?;
            let driver = match parent.parse::<PciAddress>() {
                Ok(_) => sysfs::link_name(&pdir.join("driver"))?,
                Err(_) => pdir.parent()?.file_name()?.to_str()?.to_string(),
            };
            let tdir = pdir.join("mdev_supported_types");
            let counts: Vec<(String, u32)> = sysfs::dir_names(&tdir)
                .into_iter()
                .map(|t| {
                    let n = sysfs::read_dec(&tdir.join(&t).join("available_instances"));
                    (t, n.unwrap_or(0))
                })
                .collect();
            let units = counts.iter().map(|c| c.1).max().unwrap_or(0);
            let types = counts
                .into_iter()
                .map(|(id, n)| {
                    let attr =
                        |a: &str| sysfs::read_opt(&tdir.join(&id).join(a)).unwrap_or_default();
                    FakeMdevType {
                        name: attr("name"),
                        description: attr("description"),
                        device_api: attr("device_api"),
                        units: units.checked_div(n).unwrap_or(units.max(1)),
                        group: None,
                        id,
                    }
                })
                .collect();
            let version = sysfs::read_opt(&root.join("sys/module").join(&driver).join("version"));
            Some(FakeMdevParent {
                parent,
                driver,
                units,
                types,
                version,
            })
        })
        .collect()
}
