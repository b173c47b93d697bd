//! Prometheus text exposition: devices by state, leases, operation latency
//! histograms and errors. Served on HTTP (`metrics_listen`) and/or written to a
//! textfile for node_exporter (`metrics_textfile`).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

use crate::api::{AgentInfo, ApiError, DeviceInfo, HealthInfo, UsageInfo};

/// Upper bounds, seconds: sysfs writes take microseconds on a fake host and up to
/// seconds on hardware (disabling VFs).
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

#[derive(Default)]
pub struct Metrics {
    latency: Mutex<BTreeMap<String, Histogram>>,
    errors: Mutex<BTreeMap<(String, &'static str), u64>>,
}

fn error_name(e: &ApiError) -> &'static str {
    match e {
        ApiError::ZBus(_) => "bus",
        ApiError::BadInput(_) => "bad_input",
        ApiError::Refused(_) => "refused",
        ApiError::NotFound(_) => "not_found",
        ApiError::NoDevice(_) => "no_device",
        ApiError::PermissionDenied(_) => "permission_denied",
        ApiError::Failed(_) => "failed",
    }
}

impl Metrics {
    pub fn observe(&self, op: &str, took: Duration, error: Option<&ApiError>) {
        let s = took.as_secs_f64();
        {
            let mut l = self.latency.lock().unwrap_or_else(|e| e.into_inner());
            let h = l.entry(op.to_string()).or_default();
            if h.counts.is_empty() {
                h.counts = vec![0; BUCKETS.len()];
            }
            for (i, b) in BUCKETS.iter().enumerate() {
                if s <= *b {
                    h.counts[i] += 1;
                }
            }
            h.sum += s;
            h.count += 1;
        }
        if let Some(e) = error {
            let mut errs = self.errors.lock().unwrap_or_else(|e| e.into_inner());
            *errs.entry((op.to_string(), error_name(e))).or_default() += 1;
        }
    }

    /// The exposition text for the current table.
    pub fn render(&self, devices: &[DeviceInfo], health: &[HealthInfo], leases: usize) -> String {
        let mut o = String::new();
        render_health(&mut o, health);
        let mut by_state: BTreeMap<&str, u64> =
            ["free", "leased", "missing", "failed", "quarantined"]
                .iter()
                .map(|s| (*s, 0))
                .collect();
        for d in devices {
            let state = match (d.health.as_str(), d.lease_id.is_empty()) {
                ("missing", _) => "missing",
                ("failed", _) => "failed",
                ("quarantined", _) => "quarantined",
                (_, false) => "leased",
                _ => "free",
            };
            *by_state.entry(state).or_default() += 1;
        }
        let _ = writeln!(o, "# HELP vfio_manager_devices Managed PCI functions by state.\n# TYPE vfio_manager_devices gauge");
        for (s, n) in by_state {
            let _ = writeln!(o, "vfio_manager_devices{{state=\"{s}\"}} {n}");
        }
        let _ = writeln!(o, "# HELP vfio_manager_leases Leases held by VMs.\n# TYPE vfio_manager_leases gauge\nvfio_manager_leases {leases}");
        let _ = writeln!(o, "# HELP vfio_manager_operation_duration_seconds Time to carry out an operation, including kernel writes.\n# TYPE vfio_manager_operation_duration_seconds histogram");
        for (op, h) in self
            .latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            for (b, c) in BUCKETS.iter().zip(&h.counts) {
                let _ = writeln!(
                    o,
                    "vfio_manager_operation_duration_seconds_bucket{{op=\"{op}\",le=\"{b}\"}} {c}"
                );
            }
            let _ = writeln!(
                o,
                "vfio_manager_operation_duration_seconds_bucket{{op=\"{op}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                o,
                "vfio_manager_operation_duration_seconds_sum{{op=\"{op}\"}} {}",
                h.sum
            );
            let _ = writeln!(
                o,
                "vfio_manager_operation_duration_seconds_count{{op=\"{op}\"}} {}",
                h.count
            );
        }
        let _ = writeln!(o, "# HELP vfio_manager_operation_errors_total Operations that ended in an error, by kind.\n# TYPE vfio_manager_operation_errors_total counter");
        for ((op, kind), n) in self.errors.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(
                o,
                "vfio_manager_operation_errors_total{{op=\"{op}\",error=\"{kind}\"}} {n}"
            );
        }
        o
    }
}

/// Each device's health as a count per state, and the kernel's AER counts per
/// device (since boot, as sysfs keeps them).
/// A label value as the exposition format quotes it.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Per lease and per device: the agents and the latest usage they reported.
pub fn render_usage(o: &mut String, agents: &[AgentInfo], usage: &[UsageInfo]) {
    let _ = writeln!(o, "# HELP vfio_manager_agent_connected Whether a lease's in-guest agent is connected.\n# TYPE vfio_manager_agent_connected gauge");
    for a in agents {
        let _ = writeln!(
            o,
            "vfio_manager_agent_connected{{lease=\"{}\",vm=\"{}\"}} {}",
            a.lease_id,
            label(&a.vm_name),
            u8::from(a.connected)
        );
    }
    let _ = writeln!(o, "# HELP vfio_manager_agent_heartbeat_timestamp_seconds When a lease's agent last sent a heartbeat.\n# TYPE vfio_manager_agent_heartbeat_timestamp_seconds gauge");
    for a in agents {
        let _ = writeln!(
            o,
            "vfio_manager_agent_heartbeat_timestamp_seconds{{lease=\"{}\"}} {}",
            a.lease_id, a.last_heartbeat
        );
    }
    let mut lease: BTreeMap<(&str, &str), (f64, u32)> = BTreeMap::new();
    for (name, help, pick) in [
        ("busy_percent", "busy share", 0),
        ("memory_percent", "memory in use, percent", 1),
        ("temperature_celsius", "temperature", 2),
    ] {
        let _ = writeln!(o, "# HELP vfio_manager_device_{name} A leased device's {help}, as its guest's agent reported it.\n# TYPE vfio_manager_device_{name} gauge");
        for u in usage {
            let v = [u.busy_percent, u.memory_percent, u.temperature_c][pick];
            if v.is_nan() {
                continue;
            }
            if pick == 0 {
                let e = lease.entry((&u.lease_id, &u.vm_name)).or_default();
                *e = (e.0 + v, e.1 + 1);
            }
            let _ = writeln!(
                o,
                "vfio_manager_device_{name}{{device=\"{}\",lease=\"{}\",vm=\"{}\"}} {v}",
                label(&u.device),
                u.lease_id,
                label(&u.vm_name)
            );
        }
    }
    let _ = writeln!(o, "# HELP vfio_manager_lease_busy_percent A lease's devices' mean busy share.\n# TYPE vfio_manager_lease_busy_percent gauge");
    for ((l, vm), (sum, n)) in lease {
        let _ = writeln!(
            o,
            "vfio_manager_lease_busy_percent{{lease=\"{l}\",vm=\"{}\"}} {}",
            label(vm),
            sum / f64::from(n)
        );
    }
}

fn render_health(o: &mut String, health: &[HealthInfo]) {
    let mut by_state: BTreeMap<&str, u64> =
        ["healthy", "degraded", "failed", "quarantined", "gone"]
            .iter()
            .map(|s| (*s, 0))
            .collect();
    for h in health {
        *by_state.entry(h.state.as_str()).or_default() += 1;
    }
    let _ = writeln!(o, "# HELP vfio_manager_device_health Managed devices by health (`vfctl health`).\n# TYPE vfio_manager_device_health gauge");
    for (s, n) in by_state {
        let _ = writeln!(o, "vfio_manager_device_health{{state=\"{s}\"}} {n}");
    }
    let _ = writeln!(o, "# HELP vfio_manager_aer_errors PCIe errors the kernel counted for a device since boot (AER).\n# TYPE vfio_manager_aer_errors gauge");
    for h in health
        .iter()
        .filter(|h| h.name.parse::<crate::api::ids::PciAddress>().is_ok())
    {
        for (severity, n) in [
            ("correctable", h.aer_correctable),
            ("nonfatal", h.aer_nonfatal),
            ("fatal", h.aer_fatal),
        ] {
            let _ = writeln!(
                o,
                "vfio_manager_aer_errors{{device=\"{}\",severity=\"{severity}\"}} {n}",
                h.name
            );
        }
    }
}

#[cfg(test)]
mod usage_tests {
    use super::*;

    #[test]
    fn usage_gauges_quote_hostile_vm_names_and_skip_what_the_guest_does_not_say() {
        let u = |busy: f64| UsageInfo {
            lease_id: "0123456789abcdef".into(),
            vm_name: "vm \"x\"\\ \n{}".into(),
            device: "0000:10:00.1".into(),
            source: "net".into(),
            busy_percent: busy,
            memory_percent: f64::NAN,
            temperature_c: f64::NAN,
            at: 1,
        };
        let mut o = String::new();
        render_usage(&mut o, &[], &[u(40.0), u(60.0)]);
        assert!(o.contains(r#"vm="vm \"x\"\\ \n{}""#), "{o}");
        assert!(
            o.contains("vfio_manager_lease_busy_percent{lease=\"0123456789abcdef\""),
            "{o}"
        );
        assert!(o.contains("} 50\n"), "the lease's mean: {o}");
        assert!(
            !o.contains("vfio_manager_device_memory_percent{"),
            "NaN is not exported: {o}"
        );
        assert!(o.lines().all(|l| !l.contains('\n')));
    }

    /// The shipped alert rules are valid (promtool, Debian package prometheus).
    #[test]
    fn the_alert_rules_pass_promtool() {
        let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/dist/vfio-manager.rules.yml");
        match std::process::Command::new("promtool").args(["check", "rules", rules]).output() {
            Ok(o) => assert!(o.status.success(), "{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)),
            Err(_) => eprintln!("SKIPPED: promtool (Debian package prometheus) is not installed; `make deps` installs it"),
        }
    }
}
