//! Function reset through the kernel's `reset` attribute.

use super::{Op, Provisioner};
use crate::address::PciAddress;
use crate::error::{Error, Result};
use crate::host::{read_reset_methods, PciFunction};

impl Provisioner {
    /// Resets `addr` with the methods the kernel offers (`reset_method`). Refused when
    /// there is none, and while a process holds its VFIO group or it is leased: a reset
    /// under a running VM destroys the guest's device state.
    pub fn reset(&self, addr: &PciAddress) -> Result<()> {
        self.reset_function(&self.brief(addr)?)
    }

    /// [`Provisioner::reset`] of `f` as its caller has just read it.
    pub fn reset_function(&self, f: &PciFunction) -> Result<()> {
        let addr = &f.address;
        self.gated(Op::Reset, f)?;
        if read_reset_methods(&self.sys.device_dir(addr)).is_empty() {
            return Err(Error::refused(
                *addr,
                "the kernel offers no reset method for it (reset_method is empty)",
                "reset its parent bus or power-cycle the slot",
            ));
        }
        self.write_bounded(
            addr,
            "reset",
            "1",
            self.timeouts.bind,
            "a reset waits for the device lock; is something using the device?",
        )
    }
}
