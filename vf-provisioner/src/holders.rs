//! Which processes hold a VFIO group open, read from `/proc/<pid>/fd` under the root.
//! The kernel lets one process hold a group (kernel rule 10, docs/kernel.md): whoever holds it
//! owns the device, and the device must not be unbound, reset or removed under it.

use std::collections::BTreeMap;
use std::fs;

use serde::Serialize;

use crate::sysfs::{self, Sysfs};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Holder {
    pub pid: u32,
    pub comm: String,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.pid {
            0 => f.write_str(&self.comm),
            pid => write!(f, "{} (pid {pid})", self.comm),
        }
    }
}

/// Every VFIO group number that some process has open, with the processes.
pub fn scan(sys: &Sysfs) -> BTreeMap<u32, Vec<Holder>> {
    let mut out: BTreeMap<u32, Vec<Holder>> = BTreeMap::new();
    let Ok(procs) = fs::read_dir(sys.proc_dir()) else {
        return out;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let mut groups: Vec<u32> = fds
            .flatten()
            .filter_map(|fd| {
                let target = fs::read_link(fd.path()).ok()?;
                target.to_str()?.strip_prefix("/dev/vfio/")?.parse().ok()
            })
            .collect();
        groups.dedup();
        if groups.is_empty() {
            continue;
        }
        let comm = sysfs::read_opt(&entry.path().join("comm")).unwrap_or_default();
        for g in groups {
            let list = out.entry(g).or_default();
            if !list.iter().any(|h| h.pid == pid) {
                list.push(Holder {
                    pid,
                    comm: comm.clone(),
                });
            }
        }
    }
    out
}

/// Holders of one group. Where the group is a real VFIO device node, the kernel is
/// asked first (`opened_by_anyone`): one open instead of a walk over every process,
/// which costs tens of milliseconds on a busy host. The walk then names the holder.
pub fn of_group(sys: &Sysfs, group: u32) -> Vec<Holder> {
    let opened = opened_by_anyone(sys, group);
    if opened == Some(false) {
        return Vec::new();
    }
    let mut held = scan(sys).remove(&group).unwrap_or_default();
    if held.is_empty() && opened == Some(true) {
        // The kernel also refuses a group whose device was opened through its
        // cdev (/dev/vfio/devices/vfioN, iommufd), which the walk does not match.
        held.push(Holder {
            pid: 0,
            comm: "a process that opened the device through /dev/vfio/devices".into(),
        });
    }
    held
}

/// Whether the kernel has group `group` open, asked by opening it: it lets one
/// file hold a group, and answers EBUSY while one does or while a device of the
/// group is open through its cdev (drivers/vfio/group.c). Our open is closed at
/// once; a VMM that opens the group in that instant gets EBUSY, so only checks
/// before taking a device from every VMM (unbind, reset, remove, release) ask.
/// None where the node is not a character device (a fake host) or cannot be
/// opened for another reason. Opened first and checked after (an EBUSY comes only
/// from a device node; an open one is checked through its fd): one path walk.
fn opened_by_anyone(sys: &Sysfs, group: u32) -> Option<bool> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let node = sys.dev_vfio().join(group.to_string());
    match fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&node)
    {
        Ok(f) => f
            .metadata()
            .ok()?
            .file_type()
            .is_char_device()
            .then_some(false),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Some(true),
        Err(_) => None,
    }
}
