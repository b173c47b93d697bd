//! A strict PCI address: defined with the other typed identities in
//! `vfio_manager_api::ids`, so that every entry parses it the same way.

pub use vfio_manager_api::ids::PciAddress;
