//! The kernel floor for `vfctl list`: reads the same sysfs files for every PCI
//! function and prints them as JSON, with nothing else (no names, no policy).
//! Usage: bare-list ROOT

use std::fs;
use std::path::Path;

fn read(p: &Path) -> Option<String> {
    fs::read_to_string(p).ok().map(|s| s.trim_end().to_string())
}

fn link(p: &Path) -> Option<String> {
    Some(
        fs::read_link(p)
            .ok()?
            .file_name()?
            .to_string_lossy()
            .into_owned(),
    )
}

fn main() {
    let root = std::env::args().nth(1).expect("usage: bare-list ROOT");
    let devices = Path::new(&root).join("sys/bus/pci/devices");
    let mut out = Vec::new();
    let mut entries: Vec<_> = fs::read_dir(&devices)
        .expect("sysfs")
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for d in entries {
        let mut obj = serde_json::Map::new();
        obj.insert(
            "address".into(),
            d.file_name().unwrap().to_string_lossy().into(),
        );
        // The identity (ids and class) from `uevent`, one read, as vfctl reads it.
        for attr in [
            "uevent",
            "driver_override",
            "numa_node",
            "reset_method",
            "boot_vga",
            "sriov_totalvfs",
            "sriov_numvfs",
            "sriov_drivers_autoprobe",
            "sriov_offset",
            "sriov_stride",
            "sriov_vf_device",
        ] {
            obj.insert(attr.into(), read(&d.join(attr)).into());
        }
        for l in ["driver", "iommu_group", "physfn"] {
            obj.insert(l.into(), link(&d.join(l)).into());
        }
        let n: u32 = read(&d.join("sriov_numvfs"))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let vfs: Vec<Option<String>> = (0..n)
            .map(|i| link(&d.join(format!("virtfn{i}"))))
            .collect();
        obj.insert("vfs".into(), vfs.into());
        let mdev: Vec<String> = fs::read_dir(d.join("mdev_supported_types"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        obj.insert("mdev_types".into(), mdev.into());
        out.push(serde_json::Value::Object(obj));
    }
    serde_json::to_writer_pretty(std::io::stdout().lock(), &out).unwrap();
    println!();
}
