//! Enabling and disabling VFs through `sriov_numvfs`.

use super::{wait_until, Op, Provisioner, Subject};
use crate::address::PciAddress;
use crate::error::{Error, Result};
use crate::host::{PciFunction, Sriov};

const DISABLE_HINT: &str = "the kernel may be waiting for a process to close a VF's VFIO device";

impl Provisioner {
    /// Enables `count` VFs on `pf` (the vendor default when `None`) and returns them.
    /// VFs come up with no driver: autoprobe is off around the write so that no host
    /// driver grabs them. An N -> M change goes through 0 and is refused while any VF
    /// is open or leased; the same count again is a no-op.
    pub fn enable_vfs(&self, pf: &PciAddress, count: Option<u32>) -> Result<Vec<PciAddress>> {
        let f = self.sriov_pf(pf)?;
        let s = f.sriov.as_ref().expect("checked by sriov_pf");
        let n = count.unwrap_or_else(|| self.filter.default_vfs(&f));
        self.check_enable(&f, s, n)?;
        if s.num_vfs == n {
            return Ok(s.vfs.clone());
        }
        if s.num_vfs != 0 {
            self.refuse_busy_vfs(
                &f,
                s,
                &format!("change the VF count from {} to {n}", s.num_vfs),
            )?;
            self.write_numvfs(&f, 0)?;
            return self
                .enable_from_zero(&f, n)
                .or_else(|e| self.roll_back_enable(&f, s.num_vfs, e));
        }
        self.enable_from_zero(&f, n)
    }

    /// Disables every VF on `pf`, refused while any VF is open or leased.
    pub fn disable_vfs(&self, pf: &PciAddress) -> Result<()> {
        let f = self.sriov_pf(pf)?;
        let s = f.sriov.as_ref().expect("checked by sriov_pf");
        if s.num_vfs == 0 {
            return Ok(());
        }
        self.refuse_busy_vfs(&f, s, "disable VFs")?;
        self.write_numvfs(&f, 0)
    }

    fn sriov_pf(&self, pf: &PciAddress) -> Result<PciFunction> {
        let f = self.function(pf)?;
        if let Some(parent) = f.physfn {
            return Err(Error::refused(
                *pf,
                "it is a VF; VFs are enabled on their PF",
                format!("use its PF {parent}"),
            ));
        }
        self.gated(Op::Sriov, &f)?;
        let Some(s) = &f.sriov else {
            return Err(Error::refused(
                *pf,
                format!("{} has no SR-IOV capability", f.label()),
                "use the mediated (mdev) path for this device",
            ));
        };
        if s.total_vfs == 0 {
            return Err(Error::refused(
                *pf,
                "SR-IOV is present but sriov_totalvfs is 0",
                "enable SR-IOV for this slot in the firmware (BIOS) setup and reboot",
            ));
        }
        Ok(f)
    }

    fn check_enable(&self, f: &PciFunction, s: &Sriov, n: u32) -> Result<()> {
        if n == 0 {
            return Err(Error::InvalidInput {
                what: "VF count",
                input: "0".into(),
                reason: format!("to remove the VFs of {} use `vfctl disable`", f.address),
            });
        }
        if n > s.total_vfs {
            return Err(Error::refused(
                f.address,
                format!(
                    "{n} VFs requested but the device supports at most {}",
                    s.total_vfs
                ),
                format!("ask for {} or fewer", s.total_vfs),
            ));
        }
        match f.driver.as_deref() {
            None => Err(Error::refused(
                f.address,
                "the PF has no driver, and only the PF's driver can create VFs",
                "load the vendor's PF driver (or `vfctl unbind` it back to its host driver)",
            )),
            Some("vfio-pci") if !self.vfio_pci_enable_sriov() => Err(Error::refused(
                f.address,
                "the PF is bound to vfio-pci, which creates VFs only with enable_sriov=Y",
                "echo Y > /sys/module/vfio_pci/parameters/enable_sriov, or return the PF to its host driver",
            )),
            _ => Ok(()),
        }
    }

    fn vfio_pci_enable_sriov(&self) -> bool {
        matches!(
            crate::sysfs::read_opt(&self.sys.vfio_pci_enable_sriov()).as_deref(),
            Some("Y" | "1")
        )
    }

    fn refuse_busy_vfs(&self, f: &PciFunction, s: &Sriov, action: &str) -> Result<()> {
        for vf in &s.vfs {
            let Some(vff) = PciFunction::read_brief(&self.sys, vf) else {
                continue;
            };
            if let Err(r) = self.gate(Op::Along, Subject::Function(&vff)) {
                return Err(Error::refused(
                    f.address,
                    format!("cannot {action}: VF {vf} is in use ({})", r.reason),
                    r.reason.fix(r.op, &vf.to_string()),
                ));
            }
        }
        Ok(())
    }

    fn enable_from_zero(&self, f: &PciFunction, n: u32) -> Result<Vec<PciAddress>> {
        let autoprobe_path = self.sys.device_attr(&f.address, "sriov_drivers_autoprobe");
        let autoprobe = f.sriov.as_ref().is_some_and(|s| s.drivers_autoprobe);
        if autoprobe {
            self.sys.write(&f.address, &autoprobe_path, "0")?;
        }
        let result = self.write_numvfs(f, n);
        let restored = if autoprobe {
            self.sys.write(&f.address, &autoprobe_path, "1")
        } else {
            Ok(())
        };
        if let Err(e) = result.and(restored) {
            return self.roll_back_enable(f, 0, e);
        }
        let vfs = self
            .function(&f.address)?
            .sriov
            .map(|s| s.vfs)
            .unwrap_or_default();
        Ok(vfs)
    }

    /// Writes `n` and waits until the kernel lists exactly `n` VFs.
    fn write_numvfs(&self, f: &PciFunction, n: u32) -> Result<()> {
        let hint = if n == 0 {
            DISABLE_HINT
        } else {
            "the PF driver did not finish creating VFs"
        };
        self.write_bounded(
            &f.address,
            "sriov_numvfs",
            &n.to_string(),
            self.timeouts.sriov,
            hint,
        )?;
        let listed = || {
            crate::host::read_sriov(&self.sys.device_dir(&f.address)).is_some_and(|s| {
                s.vfs.len() == n as usize && s.vfs.iter().all(|v| self.sys.device_dir(v).exists())
            })
        };
        if !wait_until(self.timeouts.sriov, listed) {
            return Err(Error::Timeout {
                device: f.address,
                what: format!("waiting for {n} VFs to appear"),
                timeout: self.timeouts.sriov,
                hint: hint.into(),
            });
        }
        Ok(())
    }

    /// Returns the PF to `previous` VFs after a failed change, keeping the first error.
    fn roll_back_enable<T>(&self, f: &PciFunction, previous: u32, cause: Error) -> Result<T> {
        let undo = self.write_numvfs(f, 0).and_then(|_| match previous {
            0 => Ok(()),
            n => self.write_numvfs(f, n),
        });
        match undo {
            Ok(()) => Err(cause),
            Err(e) => Err(Error::RollbackFailed {
                device: f.address,
                what: "changing the VF count".into(),
                rollback: e.to_string(),
                source: Box::new(cause),
            }),
        }
    }
}
