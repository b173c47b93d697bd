//! mediated-dev: the mediated path. Where a VF cannot be passed through whole (or a
//! VM must migrate), devices are mediated: mdev types on a parent (the kernel's
//! `mtty` sample, NVIDIA before vGPU 17) or vGPU types chosen per VF (NVIDIA vGPU
//! 17+).
//!
//! Layers, from the kernel up:
//! - [`host`]: what the kernel shows (parents, types, mdevs, per-VF vGPU slots),
//!   read under the same injected root as `vf-provisioner`;
//! - [`ops`]: the policy layer, [`Mediator`]: checks, refusals, the write through
//!   `vf-provisioner`'s kernel seam, verification and rollback;
//! - [`mdevctl`]: persistent definitions in mdevctl's own files;
//! - [`plan`]: the dry run that places several requested types before any write;
//! - [`migration`]: device state out of one device and into another (VFIO
//!   migration v2), in a checksummed stream, locally or over TCP.

pub mod error;
pub mod host;
pub mod mdevctl;
pub mod migration;
pub mod ops;
pub mod plan;

pub use error::{Error, Kind, Result};
pub use host::{Mdev, MdevHost, MdevType, Parent, VgpuSlot, VgpuType};
pub use mdevctl::{Definition, Start, Store};
pub use ops::Mediator;
pub use plan::{plan, Plan, Want};
pub use vfio_manager_api::ids::{parse_uuid, MdevParent, MdevTypeId};
