//! `vfctl`'s daemon mode: each command is one D-Bus call to vfio-managerd on the
//! system bus (`DBUS_SYSTEM_BUS_ADDRESS` is honoured).

use std::collections::HashMap;

use serde::de::DeserializeOwned;
use serde::Serialize;
use zbus::zvariant::{DynamicType, Value};

use super::CliError;
use crate::api::{
    self, ApiError, DeviceInfo, Lease, MdevInfo, MigrationInfo, MigrationStats, Request,
};

pub struct Client {
    rt: tokio::runtime::Runtime,
    conn: zbus::Connection,
}

const HOW_TO_START: &str = "start it with `systemctl start vfio-manager`, or run `vfctl --direct ...` to work on the host without it";

impl Client {
    /// Connects to the system bus (or `DBUS_SYSTEM_BUS_ADDRESS`).
    pub fn connect() -> Result<Client, CliError> {
        Client::connect_to(None)
    }

    /// Connects to the bus at `address`, or the system bus.
    pub fn connect_to(address: Option<&str>) -> Result<Client, CliError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| CliError::Unreachable(format!("cannot start: {e}")))?;
        let conn = rt
            .block_on(async {
                match address {
                    Some(a) => zbus::connection::Builder::address(a)?.build().await,
                    None => zbus::Connection::system().await,
                }
            })
            .map_err(|e| {
                CliError::Unreachable(format!(
                    "cannot connect to the D-Bus system bus ({e}); {HOW_TO_START}"
                ))
            })?;
        Ok(Client { rt, conn })
    }

    fn call<B, R>(&self, method: &str, body: &B) -> Result<R, CliError>
    where
        B: Serialize + DynamicType,
        R: DeserializeOwned + zbus::zvariant::Type,
    {
        let reply = self.rt.block_on(self.conn.call_method(
            Some(api::BUS_NAME),
            api::MANAGER_PATH,
            Some(api::MANAGER_IFACE),
            method,
            body,
        ));
        let msg = reply.map_err(from_bus)?;
        msg.body()
            .deserialize::<R>()
            .map_err(|e| CliError::Daemon { name: "BadReply".into(), message: format!("the daemon's reply to {method} does not decode: {e}; are vfctl and vfio-managerd the same version?") })
    }

    /// `org.freedesktop.DBus.Peer.Ping` to the daemon: one bus round trip, the floor
    /// that the benchmark compares every method with.
    pub fn ping(&self) -> Result<(), CliError> {
        let reply = self.rt.block_on(self.conn.call_method(
            Some(api::BUS_NAME),
            api::MANAGER_PATH,
            Some("org.freedesktop.DBus.Peer"),
            "Ping",
            &(),
        ));
        reply.map(|_| ()).map_err(from_bus)
    }

    pub fn devices(&self) -> Result<Vec<DeviceInfo>, CliError> {
        self.call("ListDevices", &())
    }

    pub fn leases(&self) -> Result<Vec<Lease>, CliError> {
        self.call("ListLeases", &())
    }

    pub fn provision(&self, r: &Request) -> Result<Lease, CliError> {
        let mut opts: HashMap<&str, Value> = HashMap::new();
        opts.insert("request_id", r.request_id.as_str().into());
        opts.insert("profile", r.profile.as_str().into());
        opts.insert("count", r.count.into());
        opts.insert("numa_node", r.numa_node.into());
        if !r.vm_uuid.is_empty() {
            opts.insert("vm_uuid", r.vm_uuid.as_str().into());
        }
        if !r.pfs.is_empty() {
            opts.insert("pfs", r.pfs.clone().into());
        }
        if !r.devices.is_empty() {
            opts.insert("devices", r.devices.clone().into());
        }
        if r.adopt {
            opts.insert("adopt", true.into());
        }
        self.call("Provision", &(r.vm_name.as_str(), opts))
    }

    pub fn release(&self, lease: &str) -> Result<bool, CliError> {
        self.call("Release", &(lease,))
    }

    pub fn enable(&self, pf: &str, count: u32) -> Result<Vec<String>, CliError> {
        self.call("EnableVfs", &(pf, count))
    }

    pub fn disable(&self, pf: &str) -> Result<Vec<String>, CliError> {
        self.call("DisableVfs", &(pf,))
    }

    pub fn bind(&self, addr: &str, whole_group: bool) -> Result<Vec<String>, CliError> {
        self.call("Bind", &(addr, whole_group))
    }

    pub fn unbind(&self, addr: &str, whole_group: bool) -> Result<Vec<String>, CliError> {
        self.call("Unbind", &(addr, whole_group))
    }

    pub fn mdevs(&self) -> Result<Vec<MdevInfo>, CliError> {
        self.call("ListMdevs", &())
    }

    /// `define`: empty, `manual` or `auto`.
    pub fn create_mdev(
        &self,
        parent: &str,
        type_id: &str,
        uuid: &str,
        define: &str,
    ) -> Result<MdevInfo, CliError> {
        self.call("CreateMdev", &(parent, type_id, uuid, define))
    }

    pub fn remove_mdev(&self, uuid: &str, undefine: bool) -> Result<(), CliError> {
        self.call("RemoveMdev", &(uuid, undefine))
    }

    pub fn migration_check(&self, uuid: &str) -> Result<MigrationInfo, CliError> {
        self.call("MigrationCheck", &(uuid,))
    }

    pub fn prepare_incoming(
        &self,
        uuid: &str,
        type_id: &str,
        listen: &str,
    ) -> Result<String, CliError> {
        self.call("PrepareIncoming", &(uuid, type_id, listen))
    }

    pub fn migrate_out(&self, uuid: &str, endpoint: &str) -> Result<MigrationStats, CliError> {
        self.call("MigrateOut", &(uuid, endpoint))
    }
}

/// Bus errors in one line: the daemon's typed errors keep their name; a missing
/// daemon and a refusal by the bus policy say what to do.
fn from_bus(e: zbus::Error) -> CliError {
    match e {
        zbus::Error::MethodError(name, desc, _) => {
            let message = desc.unwrap_or_default();
            match name.as_str() {
                "org.freedesktop.DBus.Error.ServiceUnknown" | "org.freedesktop.DBus.Error.NameHasNoOwner" => {
                    CliError::Unreachable(format!("vfio-managerd is not running on the system bus ({}); {HOW_TO_START}", api::BUS_NAME))
                }
                "org.freedesktop.DBus.Error.AccessDenied" => CliError::Daemon {
                    name: "PermissionDenied".into(),
                    message: format!("the system bus refused the call ({message}); run as root or as a member of group vfio-manager"),
                },
                n => CliError::Daemon { name: ApiError::short_name(n).to_string(), message },
            }
        }
        e => CliError::Unreachable(format!("lost the daemon: {e}; {HOW_TO_START}")),
    }
}
