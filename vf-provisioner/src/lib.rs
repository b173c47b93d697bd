//! vf-provisioner: the host model and every kernel-facing PCI / SR-IOV / IOMMU /
//! driver-binding operation, under an injectable root (`/` in production, a temp
//! dir in tests).
//!
//! Layers, from the kernel up:
//! - [`sysfs`]: paths under the root, raw reads, and the one write seam
//!   ([`sysfs::KernelWrite`]: the real kernel, or [`fake::FakeKernel`]);
//! - [`host`], [`holders`]: what the kernel shows (functions, groups, VFIO users);
//! - [`ops`]: the policy layer, [`Provisioner`]: checks, refusals, bounded writes,
//!   rollback;
//! - [`vendors`]: which devices are ours (GPU classes, vendor table, configuration).

pub mod address;
pub mod error;
pub mod fake;
pub mod health;
pub mod holders;
pub mod host;
pub mod layouts;
mod names;
pub mod ops;
pub mod sysfs;
pub mod vendors;
pub mod vfio;

pub use address::PciAddress;
pub use error::{Error, Kind, Result};
pub use host::{Host, PciFunction, Sriov};
pub use ops::{Facts, Finding, Health, Level, Op, Provisioner, Reason, Refusal, Subject, Timeouts};
pub use sysfs::Sysfs;
pub use vendors::{DeviceConfig, DeviceFilter};
