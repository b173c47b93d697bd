//! Moving functions between vfio-pci and their host drivers, the reliable way the
//! kernel allows (kernel rule 3, docs/kernel.md): `driver_override`, unbind, `drivers_probe`,
//! then verify the `driver` link.

use super::gate::{Op, Passed};
use super::group::{blocking_members, peers};
use std::time::Duration;

use super::{wait_until, Provisioner};
use crate::address::PciAddress;
use crate::error::{Error, Result};
use crate::host::PciFunction;

pub const VFIO_PCI: &str = "vfio-pci";

/// What a bind or unbind did, for reporting.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Moved {
    pub address: PciAddress,
    pub from: Option<String>,
    pub to: Option<String>,
    /// `driver_override` before the move, restored if the move is undone.
    #[serde(skip)]
    override_before: Option<String>,
}

impl Provisioner {
    /// Binds `addr` to vfio-pci. Refused if its IOMMU group would not be viable,
    /// naming the member in the way, unless `whole_group` asks to bind the other
    /// members too. Host-critical functions are never taken.
    pub fn bind_vfio(&self, addr: &PciAddress, whole_group: bool) -> Result<Vec<Moved>> {
        let f = self.brief(addr)?;
        self.gated(Op::Bind { whole_group }, &f)?;
        let mut todo = vec![f];
        todo.extend(blocking_members(&self.sys, &todo[0]));
        self.move_all(&todo, Target::Driver(VFIO_PCI))
    }

    /// Returns `addr` (and, with `whole_group`, the other vfio-bound members of its
    /// group) from vfio-pci to a host driver: `driver` if given, otherwise the one the
    /// kernel matches by id. Refused while the group is open or leased.
    pub fn unbind(
        &self,
        addr: &PciAddress,
        whole_group: bool,
        driver: Option<&str>,
    ) -> Result<Vec<Moved>> {
        let f = self.brief(addr)?;
        self.gated(Op::Unbind, &f)?;
        let mut todo = vec![f.clone()];
        if whole_group {
            todo.extend(
                peers(&self.sys, &f)
                    .into_iter()
                    .filter(PciFunction::on_vfio),
            );
        }
        for m in &todo[1..] {
            self.gated(Op::Along, m)?;
        }
        self.move_all(&todo, driver.map_or(Target::HostMatch, Target::Driver))
    }

    /// Puts `addr` back on exactly `driver` (or on none) with `driver_override`
    /// cleared: how a released device returns to where it was before its lease.
    /// Refused while its VFIO group is open or it is leased.
    pub fn return_to(&self, addr: &PciAddress, driver: Option<&str>) -> Result<Vec<Moved>> {
        self.return_function(&self.brief(addr)?, driver)
    }

    /// [`Provisioner::return_to`] of `f` as its caller has just read it.
    pub fn return_function(&self, f: &PciFunction, driver: Option<&str>) -> Result<Vec<Moved>> {
        self.gated(Op::Return, f)?;
        let target = driver.map_or(Target::NoDriver, Target::Driver);
        let moved = self.move_all(std::slice::from_ref(f), target)?;
        if driver != Some(VFIO_PCI) {
            self.write_override(&f.address, None)?;
        }
        Ok(moved)
    }

    /// Binds a function the gate has passed for a lease or a bind, as its caller
    /// has just read it and holds it against every other change it makes: the
    /// daemon asks the gate while it picks candidates, and binds later.
    pub fn bind_passed(&self, p: &Passed) -> Result<Vec<Moved>> {
        debug_assert!(matches!(
            p.op,
            Op::Lease { .. } | Op::Bind { whole_group: false }
        ));
        self.move_all(std::slice::from_ref(&p.f), Target::Driver(VFIO_PCI))
    }

    /// Moves every function in `todo`; on failure, moves the ones already done back.
    fn move_all(&self, todo: &[PciFunction], target: Target) -> Result<Vec<Moved>> {
        let mut done: Vec<Moved> = Vec::new();
        for f in todo {
            if target.already(f) {
                continue;
            }
            match self.move_one(f, target) {
                Ok(m) => done.push(m),
                Err(e) => return self.undo_moves(&done, e),
            }
        }
        Ok(done)
    }

    fn undo_moves(&self, done: &[Moved], cause: Error) -> Result<Vec<Moved>> {
        let mut failures = Vec::new();
        for m in done.iter().rev() {
            let target = m.from.as_deref().map_or(Target::NoDriver, Target::Driver);
            let back = PciFunction::read_brief(&self.sys, &m.address)
                .ok_or(Error::NoSuchDevice(m.address))
                .and_then(|f| self.move_one(&f, target))
                .and_then(|_| self.write_override(&m.address, m.override_before.as_deref()));
            if let Err(e) = back {
                failures.push(format!("{}: {e}", m.address));
            }
        }
        if failures.is_empty() {
            return Err(cause);
        }
        Err(Error::RollbackFailed {
            device: done[0].address,
            what: "moving the group between drivers".into(),
            rollback: failures.join("; "),
            source: Box::new(cause),
        })
    }

    /// Moves one function to `target`; if the new driver does not take it, the old
    /// driver is put back.
    fn move_one(&self, f: &PciFunction, target: Target) -> Result<Moved> {
        let a = f.address;
        let over = if let Target::Driver(d) = target {
            d
        } else {
            ""
        };
        self.write_override(&a, Some(over))?;
        if let Some(cur) = &f.driver {
            if let Err(e) = self
                .sys
                .write(&a, &self.sys.driver_attr(cur, "unbind"), &a.to_string())
            {
                let _ = self.restore_override(f);
                return Err(e);
            }
        }
        let now = match target {
            Target::NoDriver => None,
            _ => self.probe(f, target),
        };
        let moved = Moved {
            address: a,
            from: f.driver.clone(),
            to: now.clone(),
            override_before: f.driver_override.clone(),
        };
        match target {
            Target::Driver(d) if now.as_deref() != Some(d) => {}
            _ => return Ok(moved),
        }
        let _ = self.restore_override(f);
        if let Some(old) = &f.driver {
            let _ = self.probe(f, Target::Driver(old));
        }
        Err(Error::Timeout {
            device: a,
            what: format!("binding to {over}"),
            timeout: self.timeouts.bind,
            hint: format!(
                "is its module loaded? (modprobe {})",
                over.replace('-', "_")
            ),
        })
    }

    fn restore_override(&self, f: &PciFunction) -> Result<()> {
        self.write_override(&f.address, f.driver_override.as_deref())
    }

    fn write_override(&self, a: &PciAddress, value: Option<&str>) -> Result<()> {
        self.sys.write(
            a,
            &self.sys.device_attr(a, "driver_override"),
            &format!("{}\n", value.unwrap_or("")),
        )
    }

    /// `drivers_probe` and wait for the driver link.
    fn probe(&self, f: &PciFunction, target: Target) -> Option<String> {
        let a = f.address;
        let link = || crate::sysfs::link_name(&self.sys.device_attr(&a, "driver"));
        self.drivers_probe(&a);
        let mut now = link();
        if now.is_none() && matches!(target, Target::HostMatch) {
            self.probe_past_autoprobe(f);
            now = link();
        }
        // Drivers with asynchronous probe (nvme) bind a little after the write returns.
        let timeout = match target {
            Target::Driver(_) => self.timeouts.bind,
            _ => self.timeouts.bind.min(Duration::from_secs(2)),
        };
        let wanted = |l: &Option<String>| match target {
            Target::Driver(d) => l.as_deref() == Some(d),
            _ => l.is_some(),
        };
        if !wanted(&now) {
            wait_until(timeout, || {
                now = link();
                wanted(&now)
            });
        }
        now
    }

    /// With no override a VF whose PF has autoprobe off cannot probe: autoprobe is
    /// turned on around a second probe. It is read only after a probe found no
    /// driver: it is off only while VFs are being enabled.
    fn probe_past_autoprobe(&self, f: &PciFunction) {
        let Some(pf) = f.physfn else { return };
        let path = self.sys.device_attr(&pf, "sriov_drivers_autoprobe");
        if crate::sysfs::read_opt(&path).as_deref() != Some("0") {
            return;
        }
        let _ = self.sys.write(&pf, &path, "1");
        self.drivers_probe(&f.address);
        let _ = self.sys.write(&pf, &path, "0");
    }

    /// Asks the kernel to probe `a`; whether a driver took it is read from its link.
    fn drivers_probe(&self, a: &PciAddress) {
        let _ = self.sys.write(a, &self.sys.drivers_probe(), &a.to_string());
    }
}

/// Where `move_one` sends a function.
#[derive(Debug, Clone, Copy)]
enum Target<'a> {
    /// This driver, through `driver_override`.
    Driver(&'a str),
    /// Whatever host driver the kernel matches by id (override cleared).
    HostMatch,
    /// No driver at all.
    NoDriver,
}

impl Target<'_> {
    fn already(&self, f: &PciFunction) -> bool {
        match self {
            Target::Driver(d) => f.driver.as_deref() == Some(d),
            Target::HostMatch => f.driver.is_some() && !f.on_vfio(),
            Target::NoDriver => f.driver.is_none(),
        }
    }
}
