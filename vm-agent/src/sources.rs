//! Where the guest learns how a device is used, in this order (docs/agent-protocol.md;
//! `Guest::usage` takes each field from the first that gives it):
//! 1. DRM fdinfo (`/proc/*/fdinfo/*`, the kernel's drm-usage-stats): each client's
//!    engine time, summed per device; busy is the busiest engine's share of the
//!    time since the last sample;
//! 2. amdgpu's sysfs: `gpu_busy_percent`, `mem_info_vram_used` / `_total`, hwmon;
//! 3. `nvidia-smi` where it is installed (busy, memory, temperature);
//! 4. a NIC's byte counters (the emulated stand-ins), for a device none of the
//!    above knows: the host turns them into a share of `net_full_bytes_per_s`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;
use std::process::Command;

use crate::protocol::Usage;

fn read_u64(p: &Path) -> Option<u64> {
    fs::read_to_string(p).ok()?.trim().parse().ok()
}

fn sample(address: &str, source: &str) -> Usage {
    Usage {
        address: address.to_string(),
        source: source.into(),
        busy_percent: None,
        bytes: None,
        memory_percent: None,
        temperature_c: None,
    }
}

fn percent(x: f64) -> f32 {
    x.clamp(0.0, 100.0) as f32
}

/// `nvidia-smi`'s view of every GPU, by PCI address.
pub fn nvidia(smi: &Path) -> BTreeMap<String, Usage> {
    let out = Command::new(smi)
        .args([
            "--query-gpu=pci.bus_id,utilization.gpu,memory.used,memory.total,temperature.gpu",
            "--format=csv,noheader,nounits",
        ])
        .output();
    let Ok(out) = out else {
        return BTreeMap::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').map(str::trim).collect();
            let [bus, busy, used, total, temp] = f.as_slice() else {
                return None;
            };
            // nvidia-smi writes an 8-digit domain: 00000000:01:00.0.
            let address = bus.to_ascii_lowercase();
            let address = address.get(address.len().checked_sub(12)?..)?.to_string();
            let num = |s: &str| s.parse::<f64>().ok();
            let mut u = sample(&address, "nvidia-smi");
            u.busy_percent = num(busy).map(percent);
            u.memory_percent = num(used)
                .zip(num(total).filter(|t| *t > 0.0))
                .map(|(u, t)| percent(u / t * 100.0));
            u.temperature_c = num(temp).map(|t| t as f32);
            Some((address, u))
        })
        .collect()
}

/// amdgpu's own counters for the device at `dir` (its sysfs directory).
pub fn amdgpu(dir: &Path, address: &str) -> Option<Usage> {
    let busy = read_u64(&dir.join("gpu_busy_percent"))?;
    let mut u = sample(address, "amdgpu");
    u.busy_percent = Some(percent(busy as f64));
    let used = read_u64(&dir.join("mem_info_vram_used"));
    let total = read_u64(&dir.join("mem_info_vram_total")).filter(|t| *t > 0);
    u.memory_percent = used
        .zip(total)
        .map(|(u, t)| percent(u as f64 / t as f64 * 100.0));
    let hwmon = fs::read_dir(dir.join("hwmon"))
        .ok()
        .and_then(|d| d.flatten().next());
    u.temperature_c = hwmon
        .and_then(|h| read_u64(&h.path().join("temp1_input")))
        .map(|m| m as f32 / 1000.0);
    Some(u)
}

/// Every DRM client's engine time now, summed per (device, engine), in ns.
pub fn drm_engine_ns(proc_dir: &Path) -> BTreeMap<(String, String), u64> {
    let mut seen = BTreeSet::new();
    let mut out: BTreeMap<(String, String), u64> = BTreeMap::new();
    let Ok(pids) = fs::read_dir(proc_dir) else {
        return out;
    };
    for pid in pids.flatten() {
        let Ok(fds) = fs::read_dir(pid.path().join("fdinfo")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(text) = fs::read_to_string(fd.path()) else {
                continue;
            };
            let field = |k: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_string()))
            };
            let (Some(pdev), Some(client)) = (field("drm-pdev:"), field("drm-client-id:")) else {
                continue;
            };
            // One client may hold several fds: counted once.
            if !seen.insert((pdev.clone(), client)) {
                continue;
            }
            for l in text.lines() {
                let Some(rest) = l.strip_prefix("drm-engine-") else {
                    continue;
                };
                let Some((engine, v)) = rest.split_once(':') else {
                    continue;
                };
                let ns = v
                    .trim()
                    .trim_end_matches("ns")
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0);
                let e = out.entry((pdev.clone(), engine.to_string())).or_default();
                *e = e.saturating_add(ns);
            }
        }
    }
    out
}

/// Each device's busiest engine's share of `wall_ns`, from two readings of
/// [`drm_engine_ns`]. A client that went away (its time vanished) counts as idle.
pub fn drm_busy(
    before: &BTreeMap<(String, String), u64>,
    now: &BTreeMap<(String, String), u64>,
    wall_ns: u64,
) -> BTreeMap<String, f32> {
    let mut out: BTreeMap<String, f32> = BTreeMap::new();
    if wall_ns == 0 {
        return out;
    }
    for ((pdev, engine), ns) in now {
        let was = before
            .get(&(pdev.clone(), engine.clone()))
            .copied()
            .unwrap_or(*ns);
        let share = percent(ns.saturating_sub(was) as f64 / wall_ns as f64 * 100.0);
        let e = out.entry(pdev.clone()).or_default();
        *e = e.max(share);
    }
    out
}

/// The bytes a NIC's interfaces moved since boot.
pub fn net(dir: &Path, address: &str) -> Option<Usage> {
    let ifaces = fs::read_dir(dir.join("net")).ok()?;
    let mut bytes = 0u64;
    for i in ifaces.flatten() {
        for f in ["rx_bytes", "tx_bytes"] {
            let p = i.path().join("statistics").join(f);
            bytes = bytes.saturating_add(read_u64(&p).unwrap_or(0));
        }
    }
    let mut u = sample(address, "net");
    u.bytes = Some(bytes);
    Some(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(p: &Path, s: &str) {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, s).unwrap();
    }

    #[test]
    fn nvidia_smi_lines_become_samples_by_address() {
        let t = tempfile::tempdir().unwrap();
        let smi = t.path().join("nvidia-smi");
        write(
            &smi,
            "#!/bin/sh\necho '00000000:3B:00.0, 87, 12000, 16000, 71'\necho 'garbage'\necho '00000000:3C:00.0, [N/A], 0, 0, 40'\n",
        );
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&smi, fs::Permissions::from_mode(0o755)).unwrap();
        let m = nvidia(&smi);
        let u = &m["0000:3b:00.0"];
        assert_eq!(u.busy_percent, Some(87.0));
        assert_eq!(u.memory_percent, Some(75.0));
        assert_eq!(u.temperature_c, Some(71.0));
        let v = &m["0000:3c:00.0"];
        assert_eq!((v.busy_percent, v.memory_percent), (None, None));
        assert!(nvidia(&t.path().join("absent")).is_empty());
    }

    #[test]
    fn amdgpu_reads_busy_vram_and_hwmon() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        write(&d.join("gpu_busy_percent"), "42\n");
        write(&d.join("mem_info_vram_used"), "1073741824\n");
        write(&d.join("mem_info_vram_total"), "4294967296\n");
        write(&d.join("hwmon/hwmon3/temp1_input"), "65000\n");
        let u = amdgpu(d, "0000:03:00.0").unwrap();
        assert_eq!(
            (u.busy_percent, u.memory_percent, u.temperature_c),
            (Some(42.0), Some(25.0), Some(65.0))
        );
        assert!(amdgpu(&d.join("nothing"), "x").is_none());
        // Without hwmon (or VRAM counters): busy alone.
        std::fs::remove_dir_all(d.join("hwmon")).unwrap();
        std::fs::remove_file(d.join("mem_info_vram_total")).unwrap();
        let u = amdgpu(d, "0000:03:00.0").unwrap();
        assert_eq!(
            (u.busy_percent, u.memory_percent, u.temperature_c),
            (Some(42.0), None, None)
        );
    }

    #[test]
    fn drm_fdinfo_engine_time_is_summed_per_client_once_and_becomes_a_share() {
        let t = tempfile::tempdir().unwrap();
        let fdinfo = |pid: u32, fd: u32, client: u32, render: u64| {
            write(
                &t.path().join(format!("{pid}/fdinfo/{fd}")),
                &format!("pos: 0\ndrm-driver: i915\ndrm-pdev: 0000:00:02.0\ndrm-client-id: {client}\ndrm-engine-render: {render} ns\ndrm-engine-video: 10 ns\n"),
            )
        };
        fdinfo(100, 3, 7, 1_000);
        fdinfo(100, 4, 7, 1_000); // the same client again
        fdinfo(200, 5, 8, 2_000);
        write(&t.path().join("300/fdinfo/0"), "pos: 0\nflags: 02\n"); // not DRM
        let before = drm_engine_ns(t.path());
        assert_eq!(before[&("0000:00:02.0".into(), "render".into())], 3_000);
        fdinfo(100, 3, 7, 1_000 + 300_000_000);
        fdinfo(100, 4, 7, 1_000 + 300_000_000);
        let now = drm_engine_ns(t.path());
        let busy = drm_busy(&before, &now, 1_000_000_000);
        assert_eq!(busy["0000:00:02.0"], 30.0);
        // A lying counter cannot exceed 100 %.
        fdinfo(200, 5, 8, u64::MAX / 2);
        let later = drm_busy(&now, &drm_engine_ns(t.path()), 1);
        assert_eq!(later["0000:00:02.0"], 100.0);
    }
}
