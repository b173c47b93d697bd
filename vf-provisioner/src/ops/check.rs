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
        let mut out = vec![self.check_iommu(), self.check_vfio()];
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
            }
        }
        out
    }
}
