//! vfio-manager's contract with everything outside the daemon: the typed
//! identities every entry checks ([`ids`]), and with the `dbus` feature the names
//! and types that cross the bus, the typed errors, the one `a{sv}` request codec
//! and the client. `vfctl`, the libvirt hook and the tests depend on this crate,
//! not on the daemon.
//!
//! Bus name `org.vfiomanager.VfioManager1` (the `1` is the API version; an
//! incompatible change gets a new name). Objects:
//! - `/org/vfiomanager/VfioManager1`: interface `org.vfiomanager.VfioManager1.Manager`;
//! - `/org/vfiomanager/VfioManager1/device/<dddd_bb_dd_f>`: interface
//!   `org.vfiomanager.VfioManager1.Device`, one per managed function.

pub mod ids;

#[cfg(feature = "dbus")]
pub mod client;
#[cfg(feature = "dbus")]
pub mod codec;
#[cfg(feature = "dbus")]
mod error;
#[cfg(feature = "dbus")]
mod types;
#[cfg(feature = "dbus")]
pub mod xml;

#[cfg(feature = "dbus")]
pub use error::{error_chain, ApiError, ErrorName};
#[cfg(feature = "dbus")]
pub use types::*;
