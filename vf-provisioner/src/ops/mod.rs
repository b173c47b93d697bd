//! The policy layer: every operation that changes the host. Each one checks first
//! (refusing with the device, the cause and the fix, having changed nothing), is
//! bounded by a timeout, and undoes its earlier steps when a later one fails.

pub mod bind;
mod check;
mod group;
mod reset;
mod sriov;
mod writers;

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

pub use check::{Finding, Level};
pub use group::host_critical;

use crate::address::PciAddress;
use crate::error::{Error, Result};
use crate::holders;
use crate::host::PciFunction;
use crate::sysfs::Sysfs;
use crate::vendors::DeviceFilter;

/// Bounds for the kernel writes that can take long or hang.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Enabling or disabling VFs (igb: 0.5 s to enable 4, 2 s to disable, under TCG).
    pub sriov: Duration,
    /// Binding one function and seeing its driver link appear.
    pub bind: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            sriov: Duration::from_secs(30),
            bind: Duration::from_secs(10),
        }
    }
}

/// Who else has a claim on a device (the daemon's lease table). Direct mode has none.
pub trait LeaseCheck: Send + Sync {
    /// A description of the lease holding `addr`, e.g. `VM web-1`.
    fn lease_of(&self, addr: &PciAddress) -> Option<String>;
}

pub struct Provisioner {
    sys: Sysfs,
    filter: DeviceFilter,
    timeouts: Timeouts,
    leases: Option<Arc<dyn LeaseCheck>>,
    writers: Arc<writers::Writers>,
}

impl Provisioner {
    pub fn new(sys: Sysfs, filter: DeviceFilter) -> Self {
        Provisioner {
            sys,
            filter,
            timeouts: Timeouts::default(),
            leases: None,
            writers: Arc::default(),
        }
    }

    pub fn with_timeouts(mut self, t: Timeouts) -> Self {
        self.timeouts = t;
        self
    }

    pub fn with_leases(mut self, leases: Arc<dyn LeaseCheck>) -> Self {
        self.leases = Some(leases);
        self
    }

    pub fn sysfs(&self) -> &Sysfs {
        &self.sys
    }

    pub fn filter(&self) -> &DeviceFilter {
        &self.filter
    }

    fn function(&self, addr: &PciAddress) -> Result<PciFunction> {
        PciFunction::read(&self.sys, addr).ok_or(Error::NoSuchDevice(*addr))
    }

    /// What a move between drivers needs of `addr` (see `PciFunction::read_brief`).
    fn brief(&self, addr: &PciAddress) -> Result<PciFunction> {
        PciFunction::read_brief(&self.sys, addr).ok_or(Error::NoSuchDevice(*addr))
    }

    /// The PF that decides whether `f` is ours (itself for a PF): ids and class.
    fn owner_pf(&self, f: &PciFunction) -> Result<PciFunction> {
        match f.physfn {
            Some(pf) => PciFunction::read_ids(&self.sys, &pf).ok_or(Error::NoSuchDevice(pf)),
            None => Ok(f.clone()),
        }
    }

    fn require_managed(&self, f: &PciFunction) -> Result<()> {
        let pf = self.owner_pf(f)?;
        if self.filter.is_excluded(f) || !self.filter.is_managed(&pf) {
            return Err(Error::refused(
                f.address,
                format!("{} is not a GPU and is not listed under `manage` in the configuration (or is excluded)", pf.label()),
                format!("add \"{}\" or \"{}\" to `manage` in /etc/vfio-manager/config.toml to manage it", pf.id, pf.address),
            ));
        }
        Ok(())
    }

    /// Why `f` must not be touched now: its VFIO group is open, or it is leased.
    fn busy(&self, f: &PciFunction) -> Option<String> {
        if f.on_vfio() {
            if let Some(g) = f.iommu_group {
                let held = holders::of_group(&self.sys, g);
                if let Some(h) = held.first() {
                    return Some(format!("its VFIO group {g} is held open by {h}"));
                }
            }
        }
        let lease = self.leases.as_ref()?.lease_of(&f.address)?;
        Some(format!("it is leased to {lease}"))
    }

    fn refuse_if_busy(&self, f: &PciFunction, action: &str) -> Result<()> {
        match self.busy(f) {
            Some(why) => Err(Error::refused(
                f.address,
                format!("cannot {action}: {why}"),
                "stop the VM or release the device first (`vfctl leases` shows owners)",
            )),
            None => Ok(()),
        }
    }

    /// A kernel write that may block (the kernel waits on VFIO users, device locks),
    /// bounded by `timeout`. A write that times out keeps running in its thread: the
    /// kernel gives no way to cancel it.
    fn write_bounded(
        &self,
        dev: &PciAddress,
        attr: &str,
        data: &str,
        timeout: Duration,
        hint: &str,
    ) -> Result<()> {
        let sys = self.sys.clone();
        let (dev2, path, data2) = (*dev, self.sys.device_attr(dev, attr), data.to_string());
        match self
            .writers
            .run(timeout, move || sys.write(&dev2, &path, &data2))
        {
            Some(r) => r,
            None => Err(Error::Timeout {
                device: *dev,
                what: format!("writing {data:?} to {attr}"),
                timeout,
                hint: hint.to_string(),
            }),
        }
    }
}

/// Polls `done` every few milliseconds until it holds or `timeout` passes.
fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(2));
    }
}
