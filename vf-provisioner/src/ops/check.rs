//! Host prechecks: what must hold before devices can be passed through, each
//! finding with what to fix.

use serde::Serialize;

use super::group::blocking_members;
use super::Provisioner;
use crate::host::Host;
use crate::sysfs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Error,
}

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub level: Level,
    /// What was checked: "iommu", "vfio", or a device address.
    pub subject: String,
    pub message: String,
    /// What to do about it; empty when nothing is needed.
    pub fix: String,
}

fn finding(
    level: Level,
    subject: impl Into<String>,
    message: impl Into<String>,
    fix: impl Into<String>,
) -> Finding {
    Finding {
        level,
        subject: subject.into(),
        message: message.into(),
        fix: fix.into(),
    }
}

impl Provisioner {
    pub fn check(&self) -> Vec<Finding> {
        let mut out = vec![
            self.check_iommu(),
            self.check_iommu_mode(),
            self.check_interrupt_remapping(),
            self.check_vfio(),
            self.check_kvm(),
        ];
        let host = Host::scan(&self.sys);
        for pf in host.pfs().filter(|f| self.filter.is_managed(f)) {
            out.extend(self.check_device(&host, pf));
        }
        out
    }

    fn check_iommu(&self) -> Finding {
        let count = std::fs::read_dir(self.sys.iommu_groups())
            .map(|d| d.count())
            .unwrap_or(0);
        let units: Vec<String> = std::fs::read_dir(self.sys.root().join("sys/class/iommu"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let cmdline = sysfs::read_opt(&self.sys.proc_dir().join("cmdline")).unwrap_or_default();
        let how: Vec<&str> = cmdline
            .split_whitespace()
            .filter(|w| {
                w.starts_with("intel_iommu=")
                    || w.starts_with("amd_iommu=")
                    || w.starts_with("iommu=")
            })
            .collect();
        if count == 0 {
            return finding(
                Level::Error,
                "iommu",
                "the IOMMU is off: the kernel created no IOMMU groups",
                "enable VT-d/AMD-Vi in firmware and boot with intel_iommu=on iommu=pt (or amd_iommu=on)",
            );
        }
        finding(
            Level::Ok,
            "iommu",
            format!(
                "IOMMU on: {count} groups, units [{}], cmdline [{}]",
                units.join(" "),
                how.join(" ")
            ),
            "",
        )
    }

    /// The kernel's default domain for each group (`type`): `identity` (iommu=pt)
    /// keeps host DMA fast; VFIO gives a VM's groups their own domains either way.
    fn check_iommu_mode(&self) -> Finding {
        let mut modes = std::collections::BTreeMap::<String, usize>::new();
        for e in std::fs::read_dir(self.sys.iommu_groups())
            .into_iter()
            .flatten()
            .flatten()
        {
            let t = sysfs::read_opt(&e.path().join("type")).unwrap_or_else(|| "unknown".into());
            *modes.entry(t).or_default() += 1;
        }
        if modes.is_empty() {
            return finding(
                Level::Warn,
                "iommu-mode",
                "no IOMMU groups to read a mode from",
                "",
            );
        }
        let list: Vec<String> = modes.iter().map(|(m, n)| format!("{n} {m}")).collect();
        let translated = modes.keys().any(|m| m.starts_with("DMA"));
        finding(
            Level::Ok,
            "iommu-mode",
            format!("default domains: {}", list.join(", ")),
            if translated {
                "host DMA is translated; iommu=pt makes it identity (faster) without weakening VFIO"
            } else {
                ""
            },
        )
    }

    /// Interrupt remapping keeps a device from forging interrupts into the host:
    /// the kernel's remapped controllers are named `IR-...` in /proc/interrupts.
    fn check_interrupt_remapping(&self) -> Finding {
        let text = sysfs::read_opt(&self.sys.proc_dir().join("interrupts")).unwrap_or_default();
        if text.is_empty() {
            return finding(
                Level::Warn,
                "irq-remapping",
                "/proc/interrupts cannot be read",
                "",
            );
        }
        if text.contains(" IR-") {
            return finding(
                Level::Ok,
                "irq-remapping",
                "interrupt remapping is on (IR- controllers)",
                "",
            );
        }
        finding(
            Level::Warn,
            "irq-remapping",
            "interrupt remapping is off: a passed-through device could forge interrupts (VFIO then needs allow_unsafe_interrupts)",
            "enable x2APIC/interrupt remapping in firmware; do not boot with intremap=off or nointremap",
        )
    }

    /// A usable `/dev/kvm`, and what it offers, read through KVM's own ioctls.
    fn check_kvm(&self) -> Finding {
        let path = self.sys.root().join("dev/kvm");
        let Some(path_c) = path.to_str().and_then(|p| std::ffi::CString::new(p).ok()) else {
            return finding(Level::Warn, "kvm", "the /dev/kvm path is not valid", "");
        };
        match kvm_ioctls::Kvm::new_with_path(&path_c) {
            Ok(kvm) => {
                use kvm_ioctls::Cap;
                let has = |c| kvm.check_extension(c);
                finding(
                    Level::Ok,
                    "kvm",
                    format!(
                        "/dev/kvm: API {}, {} vCPUs max, irqfd {}, ioeventfd {}, user memory {}",
                        kvm.get_api_version(),
                        kvm.get_max_vcpus(),
                        has(Cap::Irqfd),
                        has(Cap::Ioeventfd),
                        has(Cap::UserMemory),
                    ),
                    "",
                )
            }
            Err(e) => finding(
                Level::Warn,
                "kvm",
                format!(
                    "{} is not usable: {e}; VMs would run without KVM",
                    path.display()
                ),
                "enable virtualization (VT-x/AMD-V) in firmware and load kvm_intel or kvm_amd",
            ),
        }
    }

    fn check_vfio(&self) -> Finding {
        let missing: Vec<&str> = ["vfio", "vfio_iommu_type1"]
            .into_iter()
            .filter(|m| !self.sys.module_dir(m).exists())
            .chain((!self.sys.drivers_dir().join("vfio-pci").exists()).then_some("vfio_pci"))
            .collect();
        if !missing.is_empty() {
            return finding(
                Level::Error,
                "vfio",
                format!("VFIO modules not loaded: {}", missing.join(", ")),
                "modprobe vfio-pci (and add it to /etc/modules-load.d)",
            );
        }
        if !self.sys.dev_vfio().join("vfio").exists() {
            return finding(
                Level::Error,
                "vfio",
                "/dev/vfio/vfio is missing",
                "check that devtmpfs is mounted on /dev",
            );
        }
        finding(
            Level::Ok,
            "vfio",
            "vfio, vfio_pci and vfio_iommu_type1 loaded; /dev/vfio/vfio present",
            "",
        )
    }

    fn check_device(&self, host: &Host, pf: &crate::host::PciFunction) -> Vec<Finding> {
        let subject = pf.address.to_string();
        let mut out = Vec::new();
        match &pf.sriov {
            Some(s) if s.total_vfs == 0 => out.push(finding(
                Level::Warn,
                &subject,
                format!("{} has SR-IOV but sriov_totalvfs is 0", pf.label()),
                "enable SR-IOV for this slot in the firmware setup",
            )),
            Some(s) => out.push(finding(
                Level::Ok,
                &subject,
                format!(
                    "{}: SR-IOV {}/{} VFs enabled, default {}",
                    pf.label(),
                    s.num_vfs,
                    s.total_vfs,
                    self.filter.default_vfs(pf)
                ),
                "",
            )),
            None => out.push(finding(
                Level::Warn,
                &subject,
                format!("{} has no SR-IOV", pf.label()),
                "whole-device passthrough or the mediated (mdev) path only",
            )),
        }
        let vfs = pf.sriov.as_ref().map(|s| s.vfs.clone()).unwrap_or_default();
        for f in std::iter::once(pf.address)
            .chain(vfs)
            .filter_map(|a| host.get(&a))
        {
            if f.iommu_group.is_none() {
                out.push(finding(
                    Level::Error,
                    f.address.to_string(),
                    "no IOMMU group",
                    "enable the IOMMU",
                ));
            } else if let Some(b) = blocking_members(&self.sys, f).first() {
                out.push(finding(
                    Level::Warn,
                    f.address.to_string(),
                    format!(
                        "IOMMU group {} is not viable for VFIO while {} {} stays on {}",
                        f.iommu_group.unwrap_or_default(),
                        b.address,
                        b.label(),
                        b.driver.as_deref().unwrap_or("?")
                    ),
                    format!("bind with --whole-group, or unbind {}", b.address),
                ));
            } else if let Some(others) = group_peers(host, f) {
                out.push(finding(
                    Level::Warn,
                    f.address.to_string(),
                    format!(
                        "IOMMU group {} also holds {others}: they go to a VM together",
                        f.iommu_group.unwrap_or_default()
                    ),
                    "lease the whole group (name every member), or seat the card behind a port with ACS; pcie_acs_override only hides the sharing",
                ));
            }
        }
        out
    }
}

/// The other members of `f`'s IOMMU group, if it has any.
fn group_peers(host: &Host, f: &crate::host::PciFunction) -> Option<String> {
    let members = host.groups.get(&f.iommu_group?)?;
    let others: Vec<String> = members
        .iter()
        .filter(|a| **a != f.address)
        .map(ToString::to_string)
        .collect();
    (!others.is_empty()).then(|| others.join(", "))
}
