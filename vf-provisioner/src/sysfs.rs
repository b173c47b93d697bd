//! The raw layer: every path under one injected root, and the one seam through
//! which this crate writes to the kernel. Reads go straight to the files; writes go
//! through [`KernelWrite`] so that the fake kernel can apply the kernel's rules.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::address::PciAddress;
use crate::error::{Error, Result};
use crate::fake::FakeKernel;

/// The hardware seam: the kernel's reaction to a sysfs write.
pub trait KernelWrite: Send + Sync {
    fn write(&self, path: &Path, data: &str) -> io::Result<()>;
}

/// The real kernel: one `write(2)` on an existing attribute. `create(false)` so that a
/// typo in a path fails instead of creating a file.
pub struct RealKernel;

impl KernelWrite for RealKernel {
    fn write(&self, path: &Path, data: &str) -> io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(false)
            .truncate(false)
            .open(path)?;
        f.write_all(data.as_bytes())
    }
}

/// Marker file at the root of a fake host tree (see [`crate::fake`]): the fake
/// kernel is opened only on a tree that carries it.
pub const FAKE_MARKER: &str = ".vfio-manager-fake-host";

/// A host's sysfs, devfs and procfs under one root (`/` in production).
#[derive(Clone)]
pub struct Sysfs {
    root: PathBuf,
    kernel: Arc<dyn KernelWrite>,
}

impl Sysfs {
    /// Opens the host under `root`; its writes go to the real kernel.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        Sysfs::open_as(root, false)
    }

    /// Opens a tree built by [`crate::fake::Layout`], whose writes the fake kernel
    /// answers. Chosen by the caller, never by what is found on the host; the tree
    /// must carry the fake's marker, so that the fake never writes a real `/sys`.
    pub fn open_fake(root: impl Into<PathBuf>) -> Result<Self> {
        Sysfs::open_as(root, true)
    }

    /// [`Sysfs::open`] or, with `fake`, [`Sysfs::open_fake`].
    pub fn open_as(root: impl Into<PathBuf>, fake: bool) -> Result<Self> {
        let root = root.into();
        let pci = root.join("sys/bus/pci/devices");
        if !pci.is_dir() {
            return Err(Error::NotSysfs { root, missing: pci });
        }
        let marker = root.join(FAKE_MARKER);
        let kernel: Arc<dyn KernelWrite> = match fake {
            true if root != Path::new("/") && marker.exists() => Arc::new(FakeKernel::new(&root)),
            true => {
                return Err(Error::NotSysfs {
                    root,
                    missing: marker,
                })
            }
            false => Arc::new(RealKernel),
        };
        Ok(Sysfs { root, kernel })
    }

    /// Opens the host under `root` with a given kernel (tests inject faults this way).
    pub fn with_kernel(root: impl Into<PathBuf>, kernel: Arc<dyn KernelWrite>) -> Self {
        Sysfs {
            root: root.into(),
            kernel,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The kernel this host's writes go to (a bench wraps it to time each write).
    pub fn kernel(&self) -> Arc<dyn KernelWrite> {
        self.kernel.clone()
    }

    pub fn pci_devices(&self) -> PathBuf {
        self.root.join("sys/bus/pci/devices")
    }

    pub fn device_dir(&self, addr: &PciAddress) -> PathBuf {
        self.root.join("sys/bus/pci/devices").join(addr.to_string())
    }

    pub fn device_attr(&self, addr: &PciAddress, attr: &str) -> PathBuf {
        self.device_dir(addr).join(attr)
    }

    pub fn drivers_dir(&self) -> PathBuf {
        self.root.join("sys/bus/pci/drivers")
    }

    pub fn driver_attr(&self, driver: &str, attr: &str) -> PathBuf {
        self.drivers_dir().join(driver).join(attr)
    }

    pub fn drivers_probe(&self) -> PathBuf {
        self.root.join("sys/bus/pci/drivers_probe")
    }

    pub fn iommu_groups(&self) -> PathBuf {
        self.root.join("sys/kernel/iommu_groups")
    }

    pub fn dev_vfio(&self) -> PathBuf {
        self.root.join("dev/vfio")
    }

    pub fn proc_dir(&self) -> PathBuf {
        self.root.join("proc")
    }

    pub fn module_dir(&self, module: &str) -> PathBuf {
        self.root.join("sys/module").join(module)
    }

    pub fn vfio_pci_enable_sriov(&self) -> PathBuf {
        self.module_dir("vfio_pci").join("parameters/enable_sriov")
    }

    /// One raw write through the kernel seam, for callers that explain errors
    /// themselves (mediated devices, whose names are not PCI addresses).
    pub fn write_attr(&self, path: &Path, data: &str) -> io::Result<()> {
        self.kernel.write(path, data)
    }

    /// Writes `data` to a kernel attribute of `device`, explaining the errno.
    pub fn write(&self, device: &PciAddress, path: &Path, data: &str) -> Result<()> {
        self.kernel
            .write(path, data)
            .map_err(|source| Error::KernelWrite {
                device: *device,
                path: path.to_path_buf(),
                data: data.trim_end().to_string(),
                explanation: explain_errno(path, &source),
                source,
            })
    }
}

/// One sentence on what an errno means for the attribute written.
fn explain_errno(path: &Path, e: &io::Error) -> String {
    let attr = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    match (attr, e.raw_os_error()) {
        ("sriov_numvfs", Some(libc::EBUSY)) => "VFs are already enabled; the count only goes 0 -> N or N -> 0".into(),
        ("sriov_numvfs", Some(libc::ENOMEM)) => {
            "the kernel could not assign MMIO space for the VFs; enable SR-IOV and above-4G decoding in firmware or boot with pci=realloc".into()
        }
        ("sriov_numvfs", Some(libc::ENOENT)) => {
            "the PF's driver cannot configure SR-IOV (no driver bound, or vfio-pci without enable_sriov=Y)".into()
        }
        ("sriov_numvfs", Some(libc::ERANGE | libc::EINVAL)) => "the count exceeds sriov_totalvfs".into(),
        ("bind" | "drivers_probe", Some(libc::ENODEV)) => {
            "no driver accepted the device (driver_override unset, autoprobe off, or ids not matched)".into()
        }
        ("drivers_probe", Some(libc::EINVAL)) => "the device already has a driver".into(),
        ("unbind", Some(libc::ENODEV)) => "the device is not bound to that driver".into(),
        (_, Some(libc::EACCES | libc::EPERM)) => "permission denied; run as root".into(),
        (_, Some(libc::ENOENT)) => "the attribute does not exist (module not loaded or device gone)".into(),
        _ => e.to_string(),
    }
}

/// Reads a sysfs attribute as trimmed text; `None` if it does not exist.
pub fn read_opt(path: &Path) -> Option<String> {
    read_file(fs::File::open(path).ok()?)
}

/// open, one read, close: the kernel hands over an attribute (at most a page) in one
/// read, and a short read of a regular file is its end, so this skips the `statx` and
/// the second read that `fs::read_to_string` spends on every file. Attributes are
/// read a dozen times per device per operation, so this is most of a lease's syscalls.
fn read_file(f: fs::File) -> Option<String> {
    // Straight into the string's buffer: a zeroed bounce buffer of a page per read
    // was a tenth of the daemon's instructions on the fake host.
    let mut buf = Vec::with_capacity(4096);
    loop {
        let room = buf.capacity() - buf.len();
        match rustix::io::read(&f, rustix::buffer::spare_capacity(&mut buf)) {
            Ok(n) if n < room => break,
            Ok(_) => buf.reserve(4096),
            Err(rustix::io::Errno::INTR) => {}
            Err(_) => return None,
        }
    }
    let s = String::from_utf8(buf).ok()?;
    Some(s.trim_end().to_string())
}

/// A directory held open (`O_PATH`), whose entries are then read by name relative to
/// it. A path like `/sys/bus/pci/devices/ADDR/attr` is a walk of a dozen components
/// through the bus's symlink on every open or readlink; through the held directory
/// each read walks one name. Measured in the emulated host (`make bench-real-kernel`
/// prints it): a readlink 143 -> 74 µs, an attribute read 289 -> 193 µs, for one
/// open of the directory (96 µs with its close); a bind's five reads of one
/// function cost ~0.3 ms less.
pub struct Dir(std::os::fd::OwnedFd);

impl Dir {
    pub fn open(path: &Path) -> Option<Dir> {
        use rustix::fs::{Mode, OFlags};
        let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
        rustix::fs::open(path, flags, Mode::empty()).ok().map(Dir)
    }

    /// Like [`read_opt`], for the entry `name`.
    pub fn read(&self, name: &str) -> Option<String> {
        use rustix::fs::{Mode, OFlags};
        let flags = OFlags::RDONLY | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(&self.0, name, flags, Mode::empty()).ok()?;
        read_file(fs::File::from(fd))
    }

    /// Like [`link_name`], for the entry `name`.
    pub fn link_name(&self, name: &str) -> Option<String> {
        let target = rustix::fs::readlinkat(&self.0, name, Vec::new()).ok()?;
        last_name(Path::new(target.to_str().ok()?))
    }
}

/// Reads a hex attribute such as `vendor` (`0x8086`).
pub fn read_hex(path: &Path) -> Option<u32> {
    let s = read_opt(path)?;
    u32::from_str_radix(s.trim_start_matches("0x"), 16).ok()
}

pub fn read_dec<T: std::str::FromStr>(path: &Path) -> Option<T> {
    read_opt(path)?.parse().ok()
}

/// The last component of a symlink's target (`driver` -> `../../bus/pci/drivers/igb`).
pub fn link_name(path: &Path) -> Option<String> {
    last_name(&fs::read_link(path).ok()?)
}

fn last_name(target: &Path) -> Option<String> {
    target.file_name()?.to_str().map(str::to_string)
}

/// Names of a directory's entries, sorted; empty if it cannot be read.
pub fn dir_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

/// Entries of a directory whose names parse as PCI addresses, sorted.
pub fn pci_entries(dir: &Path) -> Vec<PciAddress> {
    let mut out: Vec<PciAddress> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect(),
        Err(_) => Vec::new(),
    };
    out.sort();
    out
}
