//! What the kernel shows of a function's health: whether it still answers (its
//! configuration space), and its PCIe error counters (AER, kernel rules 12 and 13,
//! docs/kernel.md).

use std::io::Read;

use crate::address::PciAddress;
use crate::sysfs::Sysfs;

/// Reads the start of `addr`'s configuration space: a function that fell off the
/// bus, or is stuck in a reset, answers all ones. Two dwords: a VF's vendor and
/// device ids may read all ones by themselves (SR-IOV), its command and status
/// never do. `Err`: why it fails the probe.
pub fn probe(sys: &Sysfs, addr: &PciAddress) -> Result<(), String> {
    let mut head = [0u8; 8];
    std::fs::File::open(sys.device_attr(addr, "config"))
        .and_then(|mut f| f.read_exact(&mut head))
        .map_err(|e| format!("its configuration space cannot be read: {e}"))?;
    if head == [0xff; 8] {
        return Err("its configuration space reads all ones: the device does not answer".into());
    }
    Ok(())
}

/// The AER error counts since boot: (correctable, non-fatal, fatal). Zero where the
/// kernel shows none (no AER capability, or AER off).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Aer {
    pub correctable: u64,
    pub nonfatal: u64,
    pub fatal: u64,
}

pub fn aer(sys: &Sysfs, addr: &PciAddress) -> Aer {
    // Each file lists one counter per error type, then a total line.
    let total = |attr: &str, key: &str| {
        std::fs::read_to_string(sys.device_attr(addr, attr))
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
            })
            .unwrap_or(0)
    };
    Aer {
        correctable: total("aer_dev_correctable", "TOTAL_ERR_COR"),
        nonfatal: total("aer_dev_nonfatal", "TOTAL_ERR_NONFATAL"),
        fatal: total("aer_dev_fatal", "TOTAL_ERR_FATAL"),
    }
}
