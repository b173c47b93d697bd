//! The in-guest agent: tells the host which PCI devices the guest sees (with their
//! drivers) and how much each moves, and lets go of a device when the host asks.
//! It speaks [`protocol`] over virtio-vsock to the host (CID 2). What it reads is
//! under an injected root, so that tests run it on a tree of files.

pub mod protocol;
pub mod sources;

use std::fs;
use std::path::{Path, PathBuf};

use protocol::{GuestDevice, Usage};
use vfio_manager_api::ids::PciAddress;

/// Engine time per (device, engine) at an instant: DRM fdinfo's last reading.
type DrmReading = (
    std::time::Instant,
    std::collections::BTreeMap<(String, String), u64>,
);

/// The guest's sysfs, under `root` (`/` in a guest).
pub struct Guest {
    root: PathBuf,
    /// `nvidia-smi`, where the guest has it.
    pub nvidia_smi: Option<PathBuf>,
    drm_last: std::sync::Mutex<Option<DrmReading>>,
}

fn read_trim(p: &Path) -> Option<String> {
    fs::read_to_string(p).ok().map(|s| s.trim().to_string())
}

fn link_name(p: &Path) -> Option<String> {
    Some(
        fs::read_link(p)
            .ok()?
            .file_name()?
            .to_string_lossy()
            .into_owned(),
    )
}

impl Guest {
    pub fn new(root: impl Into<PathBuf>) -> Guest {
        let root = root.into();
        let nvidia_smi = ["usr/bin/nvidia-smi", "bin/nvidia-smi"]
            .iter()
            .map(|p| root.join(p))
            .find(|p| p.exists());
        Guest {
            root,
            nvidia_smi,
            drm_last: Default::default(),
        }
    }

    fn devices_dir(&self) -> PathBuf {
        self.root.join("sys/bus/pci/devices")
    }

    /// The kernel release (`uname -r`), as procfs has it.
    pub fn kernel(&self) -> String {
        read_trim(&self.root.join("proc/sys/kernel/osrelease")).unwrap_or_default()
    }

    /// Every PCI function, in address order, with its ids and driver.
    pub fn devices(&self) -> Vec<GuestDevice> {
        let Ok(entries) = fs::read_dir(self.devices_dir()) else {
            return Vec::new();
        };
        let mut out: Vec<GuestDevice> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let address = name.parse::<PciAddress>().ok()?.to_string();
                let dir = e.path();
                let hex = |f: &str| {
                    read_trim(&dir.join(f)).map(|v| v.trim_start_matches("0x").to_string())
                };
                Some(GuestDevice {
                    id: format!("{}:{}", hex("vendor")?, hex("device")?),
                    driver: link_name(&dir.join("driver")).unwrap_or_default(),
                    address,
                })
            })
            .collect();
        out.sort_by(|a, b| a.address.cmp(&b.address));
        out.truncate(protocol::MAX_DEVICES);
        out
    }

    /// A sample for each device whose usage the guest can tell. Each field comes
    /// from the first source that gives it, in this order (`sources`): DRM fdinfo
    /// engine time, amdgpu's sysfs, nvidia-smi; a device none of them knows, by
    /// its NIC's byte counters. `source` names the one that gave the busy share.
    pub fn usage(&self) -> Vec<Usage> {
        let nvidia = self
            .nvidia_smi
            .as_deref()
            .map(sources::nvidia)
            .unwrap_or_default();
        let drm = self.drm_busy();
        let mut out = Vec::new();
        for d in self.devices() {
            let dir = self.devices_dir().join(&d.address);
            let drm = drm.get(&d.address).map(|b| Usage {
                address: d.address.clone(),
                source: "drm-fdinfo".into(),
                busy_percent: Some(*b),
                bytes: None,
                memory_percent: None,
                temperature_c: None,
            });
            let found = [
                drm,
                sources::amdgpu(&dir, &d.address),
                nvidia.get(&d.address).cloned(),
            ]
            .into_iter()
            .flatten()
            .reduce(|mut u, next| {
                u.memory_percent = u.memory_percent.or(next.memory_percent);
                u.temperature_c = u.temperature_c.or(next.temperature_c);
                if u.busy_percent.is_none() {
                    (u.busy_percent, u.source) = (next.busy_percent, next.source);
                }
                u
            })
            .or_else(|| sources::net(&dir, &d.address));
            out.extend(found);
        }
        out.truncate(protocol::MAX_DEVICES);
        out
    }

    /// Each DRM device's busy share since the last call (none the first time).
    fn drm_busy(&self) -> std::collections::BTreeMap<String, f32> {
        let now = sources::drm_engine_ns(&self.root.join("proc"));
        let t = std::time::Instant::now();
        let mut last = self.drm_last.lock().unwrap_or_else(|e| e.into_inner());
        let busy = match last.take() {
            Some((at, before)) => {
                sources::drm_busy(&before, &now, t.duration_since(at).as_nanos() as u64)
            }
            None => Default::default(),
        };
        *last = Some((t, now));
        busy
    }

    /// Unbinds the guest driver of the device at `address` (the host's `let-go`).
    /// Returns what happened, for `let-go-done`.
    pub fn let_go(&self, address: &str) -> Result<String, String> {
        let a: PciAddress = address.parse().map_err(|e| format!("{e}"))?;
        let dir = self.devices_dir().join(a.to_string());
        let Some(driver) = link_name(&dir.join("driver")) else {
            return Ok(format!("{a} has no driver here"));
        };
        fs::write(dir.join("driver/unbind"), a.to_string())
            .map(|()| format!("{a} unbound from {driver}"))
            .map_err(|e| format!("{a}: unbinding {driver}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest tree: an igbvf VF with one interface, a bridge without a driver, and
    /// an entry that is not an address.
    fn guest() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        let devs = t.path().join("sys/bus/pci/devices");
        let vf = devs.join("0000:04:00.0");
        fs::create_dir_all(vf.join("net/eth0/statistics")).unwrap();
        fs::write(vf.join("vendor"), "0x8086\n").unwrap();
        fs::write(vf.join("device"), "0x10ca\n").unwrap();
        fs::write(vf.join("net/eth0/statistics/rx_bytes"), "1000\n").unwrap();
        fs::write(vf.join("net/eth0/statistics/tx_bytes"), "24\n").unwrap();
        let drv = t.path().join("sys/bus/pci/drivers/igbvf");
        fs::create_dir_all(&drv).unwrap();
        fs::write(drv.join("unbind"), "").unwrap();
        std::os::unix::fs::symlink(&drv, vf.join("driver")).unwrap();
        let br = devs.join("0000:00:01.0");
        fs::create_dir_all(&br).unwrap();
        fs::write(br.join("vendor"), "0x1b36\n").unwrap();
        fs::write(br.join("device"), "0x000c\n").unwrap();
        fs::create_dir_all(devs.join("not-an-address")).unwrap();
        fs::create_dir_all(t.path().join("proc/sys/kernel")).unwrap();
        fs::write(t.path().join("proc/sys/kernel/osrelease"), "6.12.0-test\n").unwrap();
        t
    }

    #[test]
    fn the_hello_lists_devices_with_ids_and_drivers_and_usage_counts_bytes() {
        let t = guest();
        let g = Guest::new(t.path());
        assert_eq!(g.kernel(), "6.12.0-test");
        let d = g.devices();
        assert_eq!(d.len(), 2);
        assert_eq!(
            d[1],
            GuestDevice {
                address: "0000:04:00.0".into(),
                id: "8086:10ca".into(),
                driver: "igbvf".into()
            }
        );
        assert_eq!(d[0].driver, "");
        let u = g.usage();
        assert_eq!(u.len(), 1);
        assert_eq!(u[0].bytes, Some(1024));
    }

    /// Each field from the first source that gives it: busy and VRAM from
    /// amdgpu's sysfs, the temperature from nvidia-smi; a NIC by its bytes.
    #[test]
    fn usage_takes_each_field_from_the_first_source_that_gives_it() {
        use std::os::unix::fs::PermissionsExt;
        let t = guest();
        let gpu = t.path().join("sys/bus/pci/devices/0000:05:00.0");
        fs::create_dir_all(&gpu).unwrap();
        fs::write(gpu.join("vendor"), "0x1002\n").unwrap();
        fs::write(gpu.join("device"), "0x73bf\n").unwrap();
        fs::write(gpu.join("gpu_busy_percent"), "42\n").unwrap();
        fs::write(gpu.join("mem_info_vram_used"), "1\n").unwrap();
        fs::write(gpu.join("mem_info_vram_total"), "4\n").unwrap();
        let smi = t.path().join("usr/bin/nvidia-smi");
        fs::create_dir_all(smi.parent().unwrap()).unwrap();
        fs::write(&smi, "#!/bin/sh\necho '00000000:05:00.0, 90, 3, 4, 70'\n").unwrap();
        fs::set_permissions(&smi, fs::Permissions::from_mode(0o755)).unwrap();
        let u = Guest::new(t.path()).usage();
        let g = u.iter().find(|u| u.address == "0000:05:00.0").unwrap();
        assert_eq!(g.source, "amdgpu");
        assert_eq!(
            (g.busy_percent, g.memory_percent, g.temperature_c),
            (Some(42.0), Some(25.0), Some(70.0))
        );
        let nic = u.iter().find(|u| u.address == "0000:04:00.0").unwrap();
        assert_eq!((nic.source.as_str(), nic.bytes), ("net", Some(1024)));
    }

    #[test]
    fn let_go_unbinds_and_refuses_what_is_not_an_address() {
        let t = guest();
        let g = Guest::new(t.path());
        assert_eq!(
            g.let_go("0000:04:00.0").unwrap(),
            "0000:04:00.0 unbound from igbvf"
        );
        let unbind = t.path().join("sys/bus/pci/drivers/igbvf/unbind");
        assert_eq!(fs::read_to_string(unbind).unwrap(), "0000:04:00.0");
        assert!(g.let_go("0000:00:01.0").unwrap().contains("no driver"));
        for hostile in ["../../../etc/passwd", "0000:04:00.0/../x", ""] {
            assert!(g.let_go(hostile).is_err(), "{hostile}");
        }
    }
}
