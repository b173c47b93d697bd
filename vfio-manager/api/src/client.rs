//! The daemon's client: a zbus proxy of `org.vfiomanager.VfioManager1.Manager`,
//! driven from blocking code (`vfctl`, the hook, tests). Each method is one D-Bus
//! call; the daemon's errors come back as [`ClientError::Daemon`] with the name
//! decoded.

use std::collections::HashMap;

use zbus::zvariant::Value;

use crate::error::ErrorName;
use crate::{
    AgentInfo, DeviceInfo, HealthInfo, Lease, MdevInfo, MigrationInfo, MigrationStats, Request,
    UsageInfo, VmMdev, BUS_NAME,
};

#[zbus::proxy(
    interface = "org.vfiomanager.VfioManager1.Manager",
    default_service = "org.vfiomanager.VfioManager1",
    default_path = "/org/vfiomanager/VfioManager1",
    gen_blocking = false
)]
pub trait Manager {
    fn list_devices(&self) -> zbus::Result<Vec<DeviceInfo>>;
    fn list_leases(&self) -> zbus::Result<Vec<Lease>>;
    fn lease_swaps(&self, lease_id: &str) -> zbus::Result<Vec<(String, String, String, u64)>>;
    fn list_agents(&self) -> zbus::Result<Vec<AgentInfo>>;
    fn usage_now(&self) -> zbus::Result<Vec<UsageInfo>>;
    fn pressure(&self) -> zbus::Result<Vec<(String, f64, u32)>>;
    fn plan_rebalance(&self) -> zbus::Result<Vec<crate::RebalanceMove>>;
    fn usage_history(
        &self,
        device: &str,
        span: u64,
        since: u64,
    ) -> zbus::Result<Vec<(u64, f64, f64)>>;
    fn provision(&self, vm: &str, request: HashMap<&str, Value<'_>>) -> zbus::Result<Lease>;
    fn release(&self, lease: &str) -> zbus::Result<bool>;
    fn release_request(&self, request_id: &str) -> zbus::Result<bool>;
    fn enable_vfs(&self, pf: &str, count: u32) -> zbus::Result<Vec<String>>;
    fn disable_vfs(&self, pf: &str) -> zbus::Result<Vec<String>>;
    fn bind(&self, address: &str, whole_group: bool) -> zbus::Result<Vec<String>>;
    fn unbind(&self, address: &str, whole_group: bool) -> zbus::Result<Vec<String>>;
    fn list_mdevs(&self) -> zbus::Result<Vec<MdevInfo>>;
    fn list_orphans(&self) -> zbus::Result<Vec<(String, String, u64)>>;
    fn adopt_orphan(&self, name: &str) -> zbus::Result<()>;
    fn free_orphan(&self, name: &str) -> zbus::Result<()>;
    fn create_mdev(
        &self,
        parent: &str,
        type_id: &str,
        uuid: &str,
        define: &str,
    ) -> zbus::Result<MdevInfo>;
    fn remove_mdev(&self, uuid: &str, undefine: bool) -> zbus::Result<()>;
    fn migration_check(&self, uuid: &str) -> zbus::Result<MigrationInfo>;
    fn prepare_incoming(&self, uuid: &str, type_id: &str, listen: &str) -> zbus::Result<String>;
    fn migrate_out(&self, uuid: &str, endpoint: &str) -> zbus::Result<MigrationStats>;
    fn health(&self) -> zbus::Result<Vec<HealthInfo>>;
    #[zbus(property)]
    fn restore_status(&self) -> zbus::Result<String>;
    fn quarantine(&self, name: &str, reason: &str) -> zbus::Result<()>;
    fn clear(&self, name: &str) -> zbus::Result<()>;
    fn replace(&self, name: &str, reason: &str) -> zbus::Result<String>;
    fn vm_mdevs(&self, vm: &str) -> zbus::Result<Vec<VmMdev>>;
    fn check_incoming(
        &self,
        type_id: &str,
        driver: &str,
        version: &str,
        count: u32,
    ) -> zbus::Result<String>;
    fn prepare_handover(&self, lease: &str, dest: &str) -> zbus::Result<String>;
    fn commit_handover(&self, lease: &str) -> zbus::Result<String>;
    fn abort_handover(&self, lease: &str) -> zbus::Result<()>;
    fn prepared_handover(&self, lease: &str) -> zbus::Result<(String, String)>;
    fn prepare_incoming_once(
        &self,
        uuid: &str,
        type_id: &str,
        listen: &str,
    ) -> zbus::Result<(String, String)>;
    fn migrate_out_with(
        &self,
        uuid: &str,
        endpoint: &str,
        credentials: &str,
    ) -> zbus::Result<MigrationStats>;
    #[zbus(signal)]
    fn migration_progress(&self, uuid: &str, bytes: u64, expected: u64) -> zbus::Result<()>;
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A typed error from the daemon.
    #[error("{message}")]
    Daemon { name: ErrorName, message: String },
    /// No daemon, no bus, or a reply that does not decode.
    #[error("{0}")]
    Unreachable(String),
}

impl ClientError {
    /// The daemon's error name, if it answered with one.
    pub fn name(&self) -> Option<&ErrorName> {
        match self {
            ClientError::Daemon { name, .. } => Some(name),
            ClientError::Unreachable(_) => None,
        }
    }
}

const HOW_TO_START: &str = "start it with `systemctl start vfio-manager`, or run `vfctl --direct ...` to work on the host without it";

pub struct Client {
    rt: tokio::runtime::Runtime,
    conn: zbus::Connection,
    proxy: ManagerProxy<'static>,
}

type Result<T> = std::result::Result<T, ClientError>;

impl Client {
    /// Connects to the system bus (or `DBUS_SYSTEM_BUS_ADDRESS`).
    pub fn connect() -> Result<Client> {
        Client::connect_to(None)
    }

    /// Connects to the bus at `address`, or the system bus.
    pub fn connect_to(address: Option<&str>) -> Result<Client> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| ClientError::Unreachable(format!("cannot start: {e}")))?;
        let (conn, proxy) = rt
            .block_on(async {
                let conn = match address {
                    Some(a) => zbus::connection::Builder::address(a)?.build().await?,
                    None => zbus::Connection::system().await?,
                };
                let proxy = ManagerProxy::builder(&conn)
                    .cache_properties(zbus::proxy::CacheProperties::No)
                    .build()
                    .await?;
                Ok::<_, zbus::Error>((conn, proxy))
            })
            .map_err(|e| {
                ClientError::Unreachable(match address {
                    Some(a) => format!("cannot connect to the D-Bus bus at {a} ({e})"),
                    None => format!("cannot connect to the D-Bus system bus ({e}); {HOW_TO_START}"),
                })
            })?;
        Ok(Client { rt, conn, proxy })
    }

    fn run<T>(&self, call: impl std::future::Future<Output = zbus::Result<T>>) -> Result<T> {
        self.rt.block_on(call).map_err(from_bus)
    }

    /// `org.freedesktop.DBus.Peer.Ping` to the daemon: one bus round trip, the floor
    /// that the benchmark compares every method with.
    pub fn ping(&self) -> Result<()> {
        let call = self.conn.call_method(
            Some(BUS_NAME),
            crate::MANAGER_PATH,
            Some("org.freedesktop.DBus.Peer"),
            "Ping",
            &(),
        );
        self.run(async { call.await.map(|_| ()) })
    }

    pub fn devices(&self) -> Result<Vec<DeviceInfo>> {
        self.run(self.proxy.list_devices())
    }

    pub fn leases(&self) -> Result<Vec<Lease>> {
        self.run(self.proxy.list_leases())
    }

    /// The devices swapped in a lease: (swapped out, replacement, why, when).
    pub fn lease_swaps(&self, lease_id: &str) -> Result<Vec<(String, String, String, u64)>> {
        self.run(self.proxy.lease_swaps(lease_id))
    }

    pub fn agents(&self) -> Result<Vec<AgentInfo>> {
        self.run(self.proxy.list_agents())
    }

    /// Each PF's predicted pressure (NaN: no usage known) and its place in the
    /// next lease's order.
    pub fn pressure(&self) -> Result<Vec<(String, f64, u32)>> {
        self.run(self.proxy.pressure())
    }

    /// Moves that would relieve pressed GPUs: (lease, mdev, from, to, predicted %
    /// at each).
    pub fn plan_rebalance(&self) -> Result<Vec<crate::RebalanceMove>> {
        self.run(self.proxy.plan_rebalance())
    }

    pub fn usage_now(&self) -> Result<Vec<UsageInfo>> {
        self.run(self.proxy.usage_now())
    }

    /// A device's busy share: (start, average, maximum) per `span` (60 or 3600 s)
    /// since `since`.
    pub fn usage_history(
        &self,
        device: &str,
        span: u64,
        since: u64,
    ) -> Result<Vec<(u64, f64, f64)>> {
        self.run(self.proxy.usage_history(device, span, since))
    }

    pub fn provision(&self, r: &Request) -> Result<Lease> {
        self.run(self.proxy.provision(&r.vm_name, crate::codec::encode(r)))
    }

    /// Releases a lease by its lease id.
    pub fn release(&self, lease: &str) -> Result<bool> {
        self.run(self.proxy.release(lease))
    }

    /// Releases the lease that a request id made.
    pub fn release_request(&self, request_id: &str) -> Result<bool> {
        self.run(self.proxy.release_request(request_id))
    }

    pub fn enable(&self, pf: &str, count: u32) -> Result<Vec<String>> {
        self.run(self.proxy.enable_vfs(pf, count))
    }

    pub fn disable(&self, pf: &str) -> Result<Vec<String>> {
        self.run(self.proxy.disable_vfs(pf))
    }

    pub fn bind(&self, addr: &str, whole_group: bool) -> Result<Vec<String>> {
        self.run(self.proxy.bind(addr, whole_group))
    }

    pub fn unbind(&self, addr: &str, whole_group: bool) -> Result<Vec<String>> {
        self.run(self.proxy.unbind(addr, whole_group))
    }

    /// Quarantined devices: (name, reason, since).
    pub fn orphans(&self) -> Result<Vec<(String, String, u64)>> {
        self.run(self.proxy.list_orphans())
    }

    pub fn adopt_orphan(&self, name: &str) -> Result<()> {
        self.run(self.proxy.adopt_orphan(name))
    }

    pub fn free_orphan(&self, name: &str) -> Result<()> {
        self.run(self.proxy.free_orphan(name))
    }

    pub fn mdevs(&self) -> Result<Vec<MdevInfo>> {
        self.run(self.proxy.list_mdevs())
    }

    /// `define`: empty, `manual` or `auto`.
    pub fn create_mdev(
        &self,
        parent: &str,
        type_id: &str,
        uuid: &str,
        define: &str,
    ) -> Result<MdevInfo> {
        self.run(self.proxy.create_mdev(parent, type_id, uuid, define))
    }

    pub fn remove_mdev(&self, uuid: &str, undefine: bool) -> Result<()> {
        self.run(self.proxy.remove_mdev(uuid, undefine))
    }

    pub fn migration_check(&self, uuid: &str) -> Result<MigrationInfo> {
        self.run(self.proxy.migration_check(uuid))
    }

    pub fn prepare_incoming(&self, uuid: &str, type_id: &str, listen: &str) -> Result<String> {
        self.run(self.proxy.prepare_incoming(uuid, type_id, listen))
    }

    pub fn migrate_out(&self, uuid: &str, endpoint: &str) -> Result<MigrationStats> {
        self.run(self.proxy.migrate_out(uuid, endpoint))
    }

    /// `complete`, or `partial: ...`: what start-up could not bring back.
    pub fn restore_status(&self) -> Result<String> {
        self.run(self.proxy.restore_status())
    }

    pub fn health(&self) -> Result<Vec<HealthInfo>> {
        self.run(self.proxy.health())
    }

    pub fn quarantine(&self, name: &str, reason: &str) -> Result<()> {
        self.run(self.proxy.quarantine(name, reason))
    }

    pub fn clear(&self, name: &str) -> Result<()> {
        self.run(self.proxy.clear(name))
    }

    /// Swaps leased device `name` for a healthy equivalent; returns its address.
    pub fn replace(&self, name: &str, reason: &str) -> Result<String> {
        self.run(self.proxy.replace(name, reason))
    }

    /// VM `vm`'s mdevs: (lease, UUID, type, vendor driver, driver version).
    pub fn vm_mdevs(&self, vm: &str) -> Result<Vec<VmMdev>> {
        self.run(self.proxy.vm_mdevs(vm))
    }

    /// Whether this daemon's host can take `count` mdevs of `type_id` from `driver`
    /// at `version`; the answer says what it has room for.
    pub fn check_incoming(
        &self,
        type_id: &str,
        driver: &str,
        version: &str,
        count: u32,
    ) -> Result<String> {
        self.run(self.proxy.check_incoming(type_id, driver, version, count))
    }

    /// Reserves a destination mdev for lease `lease`'s VM, which its VMM migrates;
    /// returns its UUID.
    pub fn prepare_handover(&self, lease: &str, dest: &str) -> Result<String> {
        self.run(self.proxy.prepare_handover(lease, dest))
    }

    /// Moves lease `lease` to its migrated VM's destination mdev; returns its UUID.
    pub fn commit_handover(&self, lease: &str) -> Result<String> {
        self.run(self.proxy.commit_handover(lease))
    }

    /// Drops lease `lease`'s prepared destination after a failed migration.
    pub fn abort_handover(&self, lease: &str) -> Result<()> {
        self.run(self.proxy.abort_handover(lease))
    }

    /// Lease `lease`'s prepared hand-over as (source, destination) mdev UUIDs, if
    /// one is prepared.
    pub fn prepared_handover(&self, lease: &str) -> Result<Option<(String, String)>> {
        let (from, to) = self.run(self.proxy.prepared_handover(lease))?;
        Ok((!from.is_empty()).then_some((from, to)))
    }

    /// The endpoint and the source's one-time credentials.
    pub fn prepare_incoming_once(
        &self,
        uuid: &str,
        type_id: &str,
        listen: &str,
    ) -> Result<(String, String)> {
        self.run(self.proxy.prepare_incoming_once(uuid, type_id, listen))
    }

    pub fn migrate_out_with(
        &self,
        uuid: &str,
        endpoint: &str,
        credentials: &str,
    ) -> Result<MigrationStats> {
        self.run(self.proxy.migrate_out_with(uuid, endpoint, credentials))
    }

    /// `MigrateOut`, or `MigrateOutWith` given the one-time `credentials`, calling
    /// `progress(bytes sent, bytes the stop will carry)` for each `MigrationProgress`
    /// of `uuid` while it runs.
    pub fn migrate_out_watching(
        &self,
        uuid: &str,
        endpoint: &str,
        credentials: Option<&str>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<MigrationStats> {
        use futures_util::StreamExt;
        let watched = async {
            // A proxy of its own, dropped in here: a proxy that received signals
            // removes its match rules on a task when dropped, which needs the
            // runtime (the client's own proxy is dropped after it).
            let watcher = ManagerProxy::builder(&self.conn)
                .cache_properties(zbus::proxy::CacheProperties::No)
                .build()
                .await?;
            let mut signals = watcher
                .receive_migration_progress_with_args(&[(0, uuid)])
                .await?;
            let call = async {
                match credentials {
                    Some(c) => self.proxy.migrate_out_with(uuid, endpoint, c).await,
                    None => self.proxy.migrate_out(uuid, endpoint).await,
                }
            };
            tokio::pin!(call);
            loop {
                tokio::select! {
                    r = &mut call => return r,
                    Some(s) = signals.next() => {
                        if let Ok(a) = s.args() {
                            progress(a.bytes, a.expected);
                        }
                    }
                }
            }
        };
        self.run(watched)
    }
}

/// Bus errors in one line: the daemon's typed errors keep their name; a missing
/// daemon and a refusal by the bus policy say what to do.
fn from_bus(e: zbus::Error) -> ClientError {
    match e {
        zbus::Error::MethodError(name, desc, _) => {
            let message = desc.unwrap_or_default();
            match name.as_str() {
                "org.freedesktop.DBus.Error.ServiceUnknown" | "org.freedesktop.DBus.Error.NameHasNoOwner" => {
                    ClientError::Unreachable(format!("vfio-managerd is not running on the system bus ({BUS_NAME}); {HOW_TO_START}"))
                }
                "org.freedesktop.DBus.Error.AccessDenied" => ClientError::Daemon {
                    name: ErrorName::PermissionDenied,
                    message: format!("the system bus refused the call ({message}); run as root or as a member of group vfio-manager"),
                },
                n => ClientError::Daemon { name: ErrorName::decode(n), message },
            }
        }
        zbus::Error::Variant(e) => ClientError::Daemon {
            name: ErrorName::Other("BadReply".into()),
            message: format!("the daemon's reply does not decode: {e}; are vfctl and vfio-managerd the same version?"),
        },
        e => ClientError::Unreachable(format!("lost the daemon: {e}; {HOW_TO_START}")),
    }
}
