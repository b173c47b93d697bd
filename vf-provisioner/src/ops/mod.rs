//! The policy layer: every operation that changes the host. Each one checks first
//! (refusing with the device, the cause and the fix, having changed nothing), is
//! bounded by a timeout, and undoes its earlier steps when a later one fails.

pub mod bind;
mod check;
pub mod gate;
mod group;
mod reset;
mod sriov;
mod writers;

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

pub use check::{Finding, Level};
pub use gate::{Facts, Health, Op, Passed, Reason, Refusal, Subject};
pub use group::host_critical;

use crate::address::PciAddress;
use crate::error::{Error, Result};
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

pub struct Provisioner {
    sys: Sysfs,
    filter: DeviceFilter,
    timeouts: Timeouts,
    /// What the daemon knows (leases, health); none in direct mode.
    facts: Option<Arc<dyn Facts>>,
    writers: Arc<writers::Writers>,
}

impl Provisioner {
    pub fn new(sys: Sysfs, filter: DeviceFilter) -> Self {
        Provisioner {
            sys,
            filter,
            timeouts: Timeouts::default(),
            facts: None,
            writers: Arc::default(),
        }
    }

    pub fn with_timeouts(mut self, t: Timeouts) -> Self {
        self.timeouts = t;
        self
    }

    pub fn with_facts(mut self, facts: Arc<dyn Facts>) -> Self {
        self.facts = Some(facts);
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

    /// [`Provisioner::gate`] of function `f`, as an error of this crate.
    fn gated(&self, op: Op, f: &PciFunction) -> Result<()> {
        self.gate(op, Subject::Function(f)).map_err(Error::from)
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
