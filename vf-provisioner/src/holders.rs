//! Which processes hold a VFIO group open, read from `/proc/<pid>/fd` under the root.
//! The kernel lets one process hold a group (REAL-KERNEL rule 10): whoever holds it
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
        write!(f, "{} (pid {})", self.comm, self.pid)
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

/// Holders of one group.
pub fn of_group(sys: &Sysfs, group: u32) -> Vec<Holder> {
    scan(sys).remove(&group).unwrap_or_default()
}
