//! `vfctl`'s daemon mode: each command is one D-Bus call to vfio-managerd on the
//! system bus (`DBUS_SYSTEM_BUS_ADDRESS` is honoured), through the contract's client.

pub use vfio_manager_api::client::{Client, ClientError};

use super::CliError;

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> CliError {
        match e {
            ClientError::Daemon { name, message } => CliError::Daemon { name, message },
            ClientError::Unreachable(m) => CliError::Unreachable(m),
        }
    }
}
