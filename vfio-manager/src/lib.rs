//! vfio-manager: the host service (`vfio-managerd`) and its `vfctl` CLI.
//!
//! Where to look, in the order a request travels:
//! - requests enter in [`daemon::dbus`] (the D-Bus API, contract in [`api`]) or in
//!   [`cli`] (`vfctl`, which calls the daemon or, with `--direct`, the host);
//! - policy decides in [`daemon::core`] (leases, pool, restore, recovery), reading
//!   the desired state from [`config`];
//! - state is written in [`daemon::store`] (SQLite) and [`daemon::audit`];
//! - the kernel is touched only through the `vf_provisioner` crate.

pub mod api;
pub mod ch;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod vmm;

pub use vfio_manager_api::error_chain;
