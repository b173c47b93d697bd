//! Tables for people, JSON for programs. Every device is shown with its address
//! and `vvvv:dddd` ids beside any name.

use std::io::Write;

use serde::Serialize;
use serde_json::json;
use vf_provisioner::ops::bind::Moved;
use vf_provisioner::{Finding, Host, Level, PciAddress, PciFunction, Provisioner};

use super::{exit, CliError, Output};
use crate::api::{AgentInfo, DeviceInfo, Lease, UsageInfo};

pub struct Renderer<'a> {
    pub out: &'a mut dyn Write,
    pub format: Output,
}

/// What a function is doing now, from the host's point of view.
pub fn state(host: &Host, f: &PciFunction) -> &'static str {
    if !host.holders_of(f).is_empty() {
        "in-use"
    } else if f.on_vfio() {
        "vfio"
    } else if f.driver.is_some() {
        "host"
    } else {
        "unbound"
    }
}

#[derive(Serialize)]
struct Entry<'a> {
    #[serde(flatten)]
    function: &'a PciFunction,
    kind: &'static str,
    state: &'static str,
    holders: &'a [vf_provisioner::holders::Holder],
    #[serde(skip_serializing_if = "Option::is_none")]
    vfs: Option<Vec<Entry<'a>>>,
}

pub(super) type Res = Result<u8, CliError>;

fn io(e: std::io::Error) -> CliError {
    CliError::Output(e)
}

impl Renderer<'_> {
    pub(super) fn json(&mut self, v: &impl Serialize) -> Res {
        serde_json::to_writer_pretty(&mut *self.out, v).map_err(|e| io(e.into()))?;
        writeln!(self.out).map_err(io)?;
        Ok(exit::OK)
    }

    /// Clears a terminal for the next frame (`vfctl top`).
    pub(super) fn clear(&mut self) -> Res {
        self.out.write_all(b"\x1b[H\x1b[2J").map_err(io)?;
        self.out.flush().map_err(io)?;
        Ok(exit::OK)
    }

    /// One line of text output; control characters in it are shown escaped.
    pub(super) fn line(&mut self, s: &str) -> Res {
        writeln!(self.out, "{}", printable(s)).map_err(io)?;
        Ok(exit::OK)
    }

    fn entry<'h>(p: &Provisioner, host: &'h Host, f: &'h PciFunction, with_vfs: bool) -> Entry<'h> {
        let kind = if f.is_vf() {
            "vf"
        } else if p.filter().is_gpu(f) {
            "gpu"
        } else if p.filter().is_managed(f) {
            "managed"
        } else {
            "other"
        };
        let vfs = (with_vfs && f.sriov.is_some()).then(|| {
            let list = f
                .sriov
                .as_ref()
                .map(|s| s.vfs.as_slice())
                .unwrap_or_default();
            list.iter()
                .filter_map(|a| host.get(a))
                .map(|vf| Self::entry(p, host, vf, false))
                .collect()
        });
        Entry {
            function: f,
            kind,
            state: state(host, f),
            holders: host.holders_of(f),
            vfs,
        }
    }

    pub fn list(mut self, p: &Provisioner, host: &Host, all: bool) -> Res {
        let shown: Vec<Entry> = host
            .pfs()
            .filter(|f| {
                all || p.filter().is_gpu(f) || p.filter().is_managed(f) || f.sriov.is_some()
            })
            .map(|f| Self::entry(p, host, f, true))
            .collect();
        if self.format == Output::Json {
            return self.json(&json!({ "devices": shown }));
        }
        let mut rows = vec![[
            "ADDRESS", "ID", "KIND", "DRIVER", "GROUP", "NUMA", "STATE", "NAME",
        ]
        .map(String::from)
        .to_vec()];
        for e in &shown {
            rows.push(row(e, ""));
            for vf in e.vfs.iter().flatten() {
                rows.push(row(vf, "└ "));
            }
        }
        for r in table(&rows) {
            self.line(&r)?;
        }
        Ok(exit::OK)
    }

    pub fn show(mut self, p: &Provisioner, host: &Host, f: &PciFunction) -> Res {
        let e = Self::entry(p, host, f, true);
        if self.format == Output::Json {
            return self.json(&e);
        }
        let opt = |o: Option<String>| o.unwrap_or_else(|| "-".into());
        let mut lines = vec![
            format!("{} {}", f.address, f.label()),
            format!("  kind:            {}", e.kind),
            format!("  class:           {:06x}", f.class),
            format!("  driver:          {}", opt(f.driver.clone())),
            format!("  driver_override: {}", opt(f.driver_override.clone())),
            format!("  state:           {}", e.state),
            format!(
                "  iommu group:     {}",
                opt(f.iommu_group.map(|g| g.to_string()))
            ),
            format!(
                "  numa node:       {}",
                opt(f.numa_node.map(|n| n.to_string()))
            ),
            format!(
                "  reset methods:   {}",
                if f.reset_methods.is_empty() {
                    "-".into()
                } else {
                    f.reset_methods.join(" ")
                }
            ),
        ];
        if let Some(g) = f.iommu_group {
            let members: Vec<String> = host
                .groups
                .get(&g)
                .into_iter()
                .flatten()
                .map(|a| a.to_string())
                .collect();
            lines.push(format!("  group members:   {}", members.join(" ")));
        }
        for h in host.holders_of(f) {
            lines.push(format!("  held open by:    {h}"));
        }
        if let Some(pf) = f.physfn {
            lines.push(format!("  physfn:          {pf}"));
        }
        if let Some(s) = &f.sriov {
            lines.push(format!(
                "  sriov:           {}/{} VFs, autoprobe {}, offset {}, stride {}, VF device {}",
                s.num_vfs,
                s.total_vfs,
                if s.drivers_autoprobe { "on" } else { "off" },
                s.vf_offset,
                s.vf_stride,
                s.vf_device_id.map_or("-".into(), |d| format!("{d:04x}"))
            ));
            for vf in &s.vfs {
                lines.push(format!("    └ {vf}"));
            }
        }
        if !f.mdev_types.is_empty() {
            lines.push(format!("  mdev types:      {}", f.mdev_types.join(" ")));
        }
        for l in lines {
            self.line(&l)?;
        }
        Ok(exit::OK)
    }

    pub fn enabled(mut self, pf: &PciAddress, vfs: &[PciAddress]) -> Res {
        if self.format == Output::Json {
            return self.json(&json!({ "pf": pf, "vfs": vfs }));
        }
        let list: Vec<String> = vfs.iter().map(|v| v.to_string()).collect();
        self.line(&format!(
            "{pf}: {} VFs enabled: {}",
            vfs.len(),
            list.join(" ")
        ))
    }

    pub fn moved(mut self, moved: &[Moved], requested: &str) -> Res {
        if self.format == Output::Json {
            return self.json(&json!({ "moved": moved }));
        }
        if moved.is_empty() {
            return self.line(&format!("{requested}: already there, nothing changed"));
        }
        for m in moved {
            let d = |o: &Option<String>| o.clone().unwrap_or_else(|| "(no driver)".into());
            self.line(&format!("{}: {} -> {}", m.address, d(&m.from), d(&m.to)))?;
        }
        Ok(exit::OK)
    }

    pub fn done(mut self, what: &str) -> Res {
        if self.format == Output::Json {
            return self.json(&json!({ "ok": true, "message": what }));
        }
        self.line(what)
    }

    /// The daemon's table.
    pub fn devices(mut self, devices: &[DeviceInfo]) -> Res {
        if self.format == Output::Json {
            return self.json(&json!({ "devices": devices }));
        }
        let dash = |s: &str| {
            if s.is_empty() {
                "-".to_string()
            } else {
                s.to_string()
            }
        };
        let num = |n: i32| {
            if n < 0 {
                "-".to_string()
            } else {
                n.to_string()
            }
        };
        let mut rows = vec![[
            "ADDRESS", "ID", "PF", "DRIVER", "GROUP", "NUMA", "HEALTH", "LEASE", "VM",
        ]
        .map(String::from)
        .to_vec()];
        rows.extend(devices.iter().map(|d| {
            vec![
                d.address.clone(),
                d.id.clone(),
                dash(&d.pf),
                dash(&d.driver),
                num(d.iommu_group),
                num(d.numa_node),
                d.health.clone(),
                dash(&d.lease_id),
                dash(&d.vm_name),
            ]
        }));
        for l in table(&rows) {
            self.line(&l)?;
        }
        Ok(exit::OK)
    }

    /// The lease's devices as `<hostdev>` elements for a libvirt domain's `<devices>`.
    pub fn libvirt_hostdevs(mut self, lease: &Lease) -> Res {
        self.line(&crate::api::xml::comment(&format!(
            "vfio-manager lease {} for VM {}",
            lease.id, lease.vm_name
        )))?;
        for d in &lease.devices {
            self.line(&d.libvirt_hostdev)?;
        }
        Ok(exit::OK)
    }

    /// A lease hot-added to a cloud-hypervisor VM: each device with its id and guest address.
    pub fn attached(mut self, lease: &Lease, added: &[crate::ch::PciDeviceInfo]) -> Res {
        if self.format == Output::Json {
            let devices: Vec<_> = lease
                .devices
                .iter()
                .zip(added)
                .map(|(d, a)| json!({ "address": d.address, "id": a.id, "bdf": a.bdf }))
                .collect();
            return self
                .json(&json!({ "lease": lease.id, "vm": lease.vm_name, "devices": devices }));
        }
        self.line(&format!("lease {} for VM {}", lease.id, lease.vm_name))?;
        for (d, a) in lease.devices.iter().zip(added) {
            let at = a.bdf.as_ref().map_or_else(
                || "in the VM's configuration (the VM is not booted; it opens it at boot)".into(),
                |b| format!("at {b} in the guest"),
            );
            self.line(&format!("  {} -> {} {at}", d.address, a.id))?;
        }
        Ok(exit::OK)
    }

    /// The lease's devices as cloud-hypervisor `--device` arguments, one per line.
    pub fn ch_devices(mut self, lease: &Lease) -> Res {
        for d in &lease.devices {
            self.line(&format!("--device {}", d.ch_device))?;
        }
        Ok(exit::OK)
    }

    /// The lease's devices as QEMU `-device` arguments, as libvirt passes a
    /// `<hostdev>` to QEMU: a PCI function by `host=`, an mdev by `sysfsdev=`.
    pub fn qemu_devices(mut self, lease: &Lease) -> Res {
        for (i, d) in lease.devices.iter().enumerate() {
            let source = if d.sysfs_path.starts_with("/sys/bus/mdev/") {
                format!("sysfsdev={}", d.sysfs_path.trim_end_matches('/'))
            } else {
                format!("host={}", d.address)
            };
            self.line(&format!("-device vfio-pci,{source},id=hostdev{i}"))?;
        }
        Ok(exit::OK)
    }

    pub fn orphans(mut self, orphans: &[(String, String, u64)]) -> Res {
        if self.format == Output::Json {
            let list: Vec<_> = orphans
                .iter()
                .map(|(n, why, since)| json!({ "name": n, "reason": why, "since": since }))
                .collect();
            return self.json(&json!({ "orphans": list }));
        }
        if orphans.is_empty() {
            return self.line("no orphans");
        }
        let mut rows = vec![vec!["DEVICE".to_string(), "SINCE".into(), "REASON".into()]];
        rows.extend(
            orphans
                .iter()
                .map(|(n, why, since)| vec![n.clone(), since.to_string(), why.clone()]),
        );
        for l in table(&rows) {
            self.line(&l)?;
        }
        Ok(exit::OK)
    }

    /// A lease's swaps: (swapped out, replacement, why, when).
    pub fn swaps(mut self, swaps: &[(String, String, String, u64)]) -> Res {
        if self.format == Output::Json {
            let list: Vec<_> = swaps
                .iter()
                .map(
                    |(out, new, why, at)| json!({ "out": out, "in": new, "reason": why, "at": at }),
                )
                .collect();
            return self.json(&json!({ "swaps": list }));
        }
        if swaps.is_empty() {
            return self.line("no swaps");
        }
        let mut rows = vec![vec![
            "OUT".to_string(),
            "IN".into(),
            "AT".into(),
            "REASON".into(),
        ]];
        rows.extend(swaps.iter().map(|(out, new, why, at)| {
            let new = if new.is_empty() {
                "-".to_string()
            } else {
                new.clone()
            };
            vec![out.clone(), new, at.to_string(), why.clone()]
        }));
        for l in table(&rows) {
            self.line(&l)?;
        }
        Ok(exit::OK)
    }

    pub fn health(mut self, list: &[crate::api::HealthInfo]) -> Res {
        if self.format == Output::Json {
            return self.json(&json!({ "health": list }));
        }
        let mut rows = vec![[
            "DEVICE",
            "STATE",
            "AER COR/NONFATAL/FATAL",
            "SINCE",
            "REASON",
        ]
        .map(String::from)
        .to_vec()];
        rows.extend(list.iter().map(|h| {
            let since = if h.since == 0 {
                "-".into()
            } else {
                h.since.to_string()
            };
            let aer = format!("{}/{}/{}", h.aer_correctable, h.aer_nonfatal, h.aer_fatal);
            vec![
                h.name.clone(),
                h.state.clone(),
                aer,
                since,
                h.reason.clone(),
            ]
        }));
        for l in table(&rows) {
            self.line(&l)?;
        }
        Ok(exit::OK)
    }

    pub fn leases(mut self, leases: &[Lease], agents: &[AgentInfo]) -> Res {
        if self.format == Output::Json {
            return self.json(&json!({ "leases": leases, "agents": agents }));
        }
        if leases.is_empty() {
            return self.line("no leases");
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        for l in leases {
            self.line(&format!(
                "lease {} for VM {} (request {}, profile {})",
                l.id, l.vm_name, l.request_id, l.profile
            ))?;
            let agent = match agents.iter().find(|a| a.lease_id == l.id) {
                None => "none has spoken".to_string(),
                Some(a) => format!(
                    "{} on {} ({}, kernel {}), last heartbeat {} s ago",
                    if a.connected { "connected" } else { "gone" },
                    a.channel,
                    a.agent,
                    a.kernel,
                    now.saturating_sub(a.last_heartbeat)
                ),
            };
            self.line(&format!("  agent: {agent}"))?;
            for d in &l.devices {
                self.line(&format!(
                    "  {}  {}  {}  {}",
                    d.address, d.id, d.vfio_path, d.sysfs_path
                ))?;
            }
        }
        Ok(exit::OK)
    }

    /// `vfctl placement`: the PFs in the order the next lease tries them.
    pub fn pressure(mut self, pfs: &[(String, f64, u32)]) -> Res {
        if self.format == Output::Json {
            let list: Vec<_> = pfs
                .iter()
                .map(|(pf, p, i)| json!({ "pf": pf, "predicted_percent": p, "order": i }))
                .collect();
            return self.json(&json!({ "pfs": list }));
        }
        let mut rows = vec![["ORDER", "PF", "PREDICTED%"].map(String::from).to_vec()];
        rows.extend(pfs.iter().map(|(pf, p, i)| {
            let p = if p.is_nan() {
                "-".to_string()
            } else {
                format!("{p:.1}")
            };
            vec![i.to_string(), pf.clone(), p]
        }));
        for l in table(&rows) {
            self.line(&l)?;
        }
        Ok(exit::OK)
    }

    /// `vfctl plan --rebalance`: (lease, mdev, from, to, predicted % there, here).
    pub fn moves(mut self, moves: &[crate::api::RebalanceMove]) -> Res {
        if self.format == Output::Json {
            let list: Vec<_> = moves
                .iter()
                .map(|(l, d, f, t, pf, pt)| {
                    json!({ "lease": l, "device": d, "from": f, "to": t, "from_percent": pf, "to_percent": pt })
                })
                .collect();
            return self.json(&json!({ "moves": list }));
        }
        if moves.is_empty() {
            return self.line("no moves: no GPU is predicted over the limit with a migratable mdev and a less pressed GPU to take it");
        }
        let mut rows = vec![["LEASE", "MDEV", "FROM", "TO", "FROM%", "TO%"]
            .map(String::from)
            .to_vec()];
        rows.extend(moves.iter().map(|(l, d, f, t, pf, pt)| {
            vec![
                l.clone(),
                d.clone(),
                f.clone(),
                t.clone(),
                format!("{pf:.1}"),
                format!("{pt:.1}"),
            ]
        }));
        for l in table(&rows) {
            self.line(&l)?;
        }
        self.line("(a proposal: `vfctl migrate` moves an mdev's state; nothing was changed)")
    }

    /// `vfctl top`'s table (and `-o json`'s list); a value the guest does not
    /// report is `-` (null).
    pub fn usage(&mut self, usage: &[UsageInfo]) -> Res {
        if self.format == Output::Json {
            return self.json(&json!({ "usage": usage }));
        }
        if usage.is_empty() {
            return self.line("no usage: no lease's agent has reported (vfctl leases shows them)");
        }
        let v = |x: f64| {
            if x.is_nan() {
                "-".to_string()
            } else {
                format!("{x:.1}")
            }
        };
        let mut rows = vec![[
            "LEASE", "VM", "DEVICE", "SOURCE", "BUSY%", "MEM%", "TEMP°C", "AT",
        ]
        .map(String::from)
        .to_vec()];
        rows.extend(usage.iter().map(|u| {
            vec![
                u.lease_id.clone(),
                u.vm_name.clone(),
                u.device.clone(),
                u.source.clone(),
                v(u.busy_percent),
                v(u.memory_percent),
                v(u.temperature_c),
                u.at.to_string(),
            ]
        }));
        for l in table(&rows) {
            self.line(&l)?;
        }
        Ok(exit::OK)
    }

    pub fn check(mut self, findings: &[Finding]) -> Res {
        if self.format == Output::Json {
            return self.json(&json!({ "findings": findings }));
        }
        for f in findings {
            let tag = match f.level {
                Level::Ok => "ok",
                Level::Warn => "WARN",
                Level::Error => "ERROR",
            };
            self.line(&format!("[{tag:>5}] {}: {}", f.subject, f.message))?;
            if !f.fix.is_empty() {
                self.line(&format!("        fix: {}", f.fix))?;
            }
        }
        Ok(exit::OK)
    }
}

fn row(e: &Entry, indent: &str) -> Vec<String> {
    let f = e.function;
    let opt = |o: Option<String>| o.unwrap_or_else(|| "-".into());
    let mut name = f.label();
    if let Some(s) = &f.sriov {
        name.push_str(&format!(" (VFs {}/{})", s.num_vfs, s.total_vfs));
    }
    vec![
        format!("{indent}{}", f.address),
        f.id.clone(),
        e.kind.into(),
        opt(f.driver.clone()),
        opt(f.iommu_group.map(|g| g.to_string())),
        opt(f.numa_node.map(|n| n.to_string())),
        e.state.into(),
        name,
    ]
}

/// Text for a terminal: a control character (which could move the cursor, clear
/// the screen or start a row of its own) is shown escaped, as `\u{1b}`.
pub(super) fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return s.into();
    }
    s.chars()
        .map(|c| match c {
            c if c.is_control() => c.escape_unicode().to_string(),
            c => c.to_string(),
        })
        .collect::<String>()
        .into()
}

/// Left-aligned columns, two spaces apart; the last column is not padded. Cells
/// are made printable first, so that widths count what is shown.
fn table(rows: &[Vec<String>]) -> Vec<String> {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| printable(c).into_owned()).collect())
        .collect();
    let cols = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|r| {
            let cells: Vec<String> = r
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    if i + 1 == cols {
                        c.clone()
                    } else {
                        format!("{c:<w$}", w = widths[i])
                    }
                })
                .collect();
            cells.join("  ")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::LeasedDevice;

    #[test]
    fn control_characters_cannot_forge_rows_or_move_the_cursor() {
        let rows = vec![
            vec!["a\n0000:99:00.0  evil".to_string(), "x".into()],
            vec!["\u{1b}[2J".to_string(), "y\r".into()],
        ];
        let out = table(&rows);
        assert_eq!(out.len(), 2);
        assert!(
            out.iter().all(|l| !l.chars().any(char::is_control)),
            "{out:?}"
        );
        assert!(out[0].starts_with("a\\u{a}0000"), "{out:?}");
        let mut buf = Vec::new();
        let mut r = Renderer {
            out: &mut buf,
            format: Output::Table,
        };
        r.line("vm\n\u{1b}[1A").unwrap();
        assert_eq!(String::from_utf8(buf).unwrap(), "vm\\u{a}\\u{1b}[1A\n");
    }

    #[test]
    fn qemu_arguments_name_a_vf_by_host_and_an_mdev_by_sysfsdev() {
        let lease = Lease {
            id: "l1".into(),
            request_id: "r1".into(),
            vm_name: "vm".into(),
            vm_uuid: String::new(),
            profile: "mixed".into(),
            devices: vec![
                LeasedDevice::new("0000:3b:00.1".parse().unwrap(), "8086:10ca".into(), Some(7)),
                LeasedDevice::mdev(
                    &"5a5a0000-0000-4000-8000-000000000001".parse().unwrap(),
                    "mtty-2".into(),
                    None,
                ),
            ],
            created_at: 0,
        };
        let mut out = Vec::new();
        Renderer {
            out: &mut out,
            format: Output::Table,
        }
        .qemu_devices(&lease)
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "-device vfio-pci,host=0000:3b:00.1,id=hostdev0\n\
             -device vfio-pci,sysfsdev=/sys/bus/mdev/devices/5a5a0000-0000-4000-8000-000000000001,id=hostdev1\n"
        );
    }
}
