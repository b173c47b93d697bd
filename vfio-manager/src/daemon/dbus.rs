//! Where requests enter the daemon: the D-Bus objects. Each method checks the
//! caller, decodes its arguments, runs the policy (`Core`) off the bus thread and
//! emits the signals that follow. Names and types are in `crate::api`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use zbus::message::Header;
use zbus::names::BusName;
use zbus::object_server::SignalEmitter;
use zbus::zvariant::OwnedValue;
use zbus::{fdo, interface, Connection};

use super::core::{verdict, Core, LeaseRef, Prepared, Swap};
use crate::api::ids::{IdError, LeaseId, RequestId};
use crate::api::{
    self, ApiError, DeviceInfo, HealthInfo, Lease, MdevInfo, MigrationInfo, MigrationStats,
};

/// Runs blocking policy code (sysfs writes, SQLite) off the bus's async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Failed(format!("internal error: {e}")))?
}

pub struct Manager {
    pub core: Arc<Core>,
    bus: fdo::DBusProxy<'static>,
    /// Unique bus names are never reused while the bus runs: the uid of each is
    /// asked once.
    uids: Mutex<HashMap<String, u32>>,
}

impl Manager {
    pub async fn new(core: Arc<Core>, conn: &Connection) -> zbus::Result<Manager> {
        let bus = fdo::DBusProxy::builder(conn)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await?;
        Ok(Manager {
            core,
            bus,
            uids: Mutex::new(HashMap::new()),
        })
    }

    /// The caller's uid, if it may change the host.
    /// `PrepareIncoming` and `PrepareIncomingOnce`: reserve, listen, and receive in
    /// the background.
    async fn prepare(
        &self,
        hdr: &Header<'_>,
        emitter: SignalEmitter<'_>,
        uuid: String,
        type_id: String,
        listen: String,
        one_time: bool,
    ) -> Result<Prepared, ApiError> {
        let uid = self.authorize(hdr, "receive migrations").await?;
        let core = self.core.clone();
        let (prepared, incoming) = blocking(move || {
            core.migration()
                .prepare_incoming(&uuid, &type_id, &listen, one_time, uid)
        })
        .await?;
        let core = self.core.clone();
        let emitter = emitter.to_owned();
        tokio::spawn(async move {
            let uuid = incoming.uuid.to_string();
            let r = blocking(move || core.migration().receive(incoming)).await;
            let _ = Manager::migration_finished(&emitter, &uuid, "incoming", &verdict(&r)).await;
        });
        Ok(prepared)
    }

    /// `MigrateOut` and `MigrateOutWith`.
    async fn send_out(
        &self,
        hdr: &Header<'_>,
        emitter: SignalEmitter<'_>,
        uuid: String,
        endpoint: String,
        one_time: Option<String>,
    ) -> Result<MigrationStats, ApiError> {
        let uid = self.authorize(hdr, "migrate devices").await?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let progress = {
            let (emitter, uuid) = (emitter.to_owned(), uuid.clone());
            tokio::spawn(async move {
                while let Some((bytes, expected)) = rx.recv().await {
                    let _ = Manager::migration_progress(&emitter, &uuid, bytes, expected).await;
                }
            })
        };
        let core = self.core.clone();
        let u = uuid.clone();
        let r = blocking(move || {
            core.migration()
                .migrate_out(&u, &endpoint, one_time.as_deref(), uid, &mut |b, e| {
                    let _ = tx.send((b, e));
                })
        })
        .await;
        let _ = progress.await;
        let _ = Manager::migration_finished(&emitter, &uuid, "outgoing", &verdict(&r)).await;
        r
    }

    async fn authorize(&self, hdr: &Header<'_>, what: &str) -> Result<u32, ApiError> {
        let sender = hdr
            .sender()
            .ok_or_else(|| ApiError::PermissionDenied("a message without a sender".into()))?
            .to_owned();
        let cached = self
            .uids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(sender.as_str())
            .copied();
        let uid = match cached {
            Some(u) => u,
            None => {
                let u = self
                    .bus
                    .get_connection_unix_user(BusName::Unique(sender.clone()))
                    .await
                    .map_err(|e| {
                        ApiError::PermissionDenied(format!("cannot tell who {sender} is: {e}"))
                    })?;
                self.uids
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(sender.to_string(), u);
                u
            }
        };
        if self.core.allowed(uid) {
            return Ok(uid);
        }
        Err(ApiError::PermissionDenied(format!(
            "uid {uid} may not {what}: only root, the uids in `allowed_uids` and members of group {:?} may change devices; run as root or add the user to that group",
            self.core.config().daemon.allowed_group
        )))
    }

    /// Release and ReleaseRequest: the caller's check, then the release by `which`.
    async fn release_lease(
        &self,
        hdr: &Header<'_>,
        conn: &Connection,
        emitter: &SignalEmitter<'_>,
        which: Result<LeaseRef, IdError>,
    ) -> Result<bool, ApiError> {
        let uid = self.authorize(hdr, "release leases").await?;
        let which = which?;
        let core = self.core.clone();
        let r = blocking(move || core.pool().release(&which, uid)).await;
        if let Ok(Some(l)) = &r {
            let _ = Manager::lease_released(emitter, &l.id, &l.vm_name).await;
        }
        self.after(conn, emitter).await;
        r.map(|l| l.is_some())
    }

    /// After an operation: failed devices get a signal, the table's added and
    /// removed devices get their objects and signals.
    async fn after(&self, conn: &Connection, emitter: &SignalEmitter<'_>) {
        announce_failures(&self.core, conn, emitter).await;
        let (added, removed) = self.core.take_changes();
        publish(&self.core, conn, &added, &removed).await;
    }

    /// A change to device `name`'s health (quarantine, clear): check the caller,
    /// run `op` with their uid off the bus thread, announce the new `Health` (and
    /// any other change since the last look: `announce_health`).
    async fn health_op(
        &self,
        hdr: &Header<'_>,
        conn: &Connection,
        what: &str,
        name: String,
        op: impl FnOnce(&Core, &str, u32) -> Result<(), ApiError> + Send + 'static,
    ) -> Result<(), ApiError> {
        let uid = self.authorize(hdr, what).await?;
        let (core, n) = (self.core.clone(), name.clone());
        blocking(move || op(&core, &n, uid)).await?;
        match SignalEmitter::new(conn, api::MANAGER_PATH) {
            Ok(emitter) => announce_health(&self.core, conn, &emitter).await,
            Err(_) => health_changed(conn, &name).await,
        }
        Ok(())
    }

    /// A direct request (enable, disable, bind, unbind): check the caller, run `op`
    /// with their uid off the bus thread, publish what changed.
    async fn direct(
        &self,
        hdr: &Header<'_>,
        conn: &Connection,
        emitter: &SignalEmitter<'_>,
        what: &str,
        op: impl FnOnce(&Core, u32) -> Result<Vec<String>, ApiError> + Send + 'static,
    ) -> Result<Vec<String>, ApiError> {
        let uid = self.authorize(hdr, what).await?;
        let core = self.core.clone();
        let r = blocking(move || {
            let r = op(&core, uid);
            // It may have changed which functions exist (VFs enabled or disabled).
            core.refresh_or_log();
            r
        })
        .await;
        self.after(conn, emitter).await;
        r
    }
}

/// Devices that failed since the last look: `DeviceFailed` for each,
/// `LeaseDegraded` for the lease holding it, and its `Health` property changed.
/// Then the lease's recovery policy: with `replace`, `LeaseRecovered` names the
/// device swapped in, or a second `LeaseDegraded` says why there is none.
pub async fn announce_failures(core: &Arc<Core>, conn: &Connection, emitter: &SignalEmitter<'_>) {
    for f in core.take_failures() {
        let _ = Manager::device_failed(emitter, &f.device, &f.why).await;
        health_changed(conn, &f.device).await;
        let Some(lease) = f.lease else {
            continue;
        };
        let _ = Manager::lease_degraded(emitter, &lease, &f.device, &f.why).await;
        let swap = match f.recovered {
            // A vanished function: its policy ran already, and a let-go says so.
            Some(done) => done.ok().map(Ok),
            None => {
                let c = core.clone();
                let (a, w) = (f.device.clone(), f.why.clone());
                blocking(move || Ok(c.recovery().after_failure(&a, &w)))
                    .await
                    .unwrap_or_else(|e| Some(Err(e)))
            }
        };
        match swap {
            Some(Ok(s)) => recovered(emitter, &s).await,
            Some(Err(e)) => {
                let why = format!("it was not replaced: {e}");
                let _ = Manager::lease_degraded(emitter, &lease, &f.device, &why).await;
            }
            None => {}
        }
    }
}

/// Health states that changed since the last look (`Health::transitions`): each
/// device's `Health` property changed, and `LeaseDegraded` for a leased device that
/// became degraded (it still works, and the VM keeps it). Failures are announced
/// by `announce_failures`.
pub async fn announce_health(core: &Arc<Core>, conn: &Connection, emitter: &SignalEmitter<'_>) {
    let c = core.clone();
    let Ok(changed) = blocking(move || c.health().transitions()).await else {
        return;
    };
    for i in changed {
        health_changed(conn, &i.name).await;
        if i.state != "degraded" {
            continue;
        }
        if let Some((lease, _)) = core.holder(&i.name) {
            let _ = Manager::lease_degraded(emitter, &lease, &i.name, &i.reason).await;
        }
    }
}

async fn recovered(emitter: &SignalEmitter<'_>, s: &Swap) {
    let _ =
        Manager::lease_recovered(emitter, &s.lease, &s.failed, &s.replacement, &s.vm_side).await;
}

/// `PropertiesChanged` for device `addr`'s `Health` (a function we publish).
pub async fn health_changed(conn: &Connection, addr: &str) {
    let Ok(addr) = addr.parse::<api::ids::PciAddress>() else {
        return; // an mdev: no object of its own
    };
    let path = api::device_path(&addr.to_string());
    if let Ok(iface) = conn
        .object_server()
        .interface::<_, DeviceObject>(path)
        .await
    {
        let _ = iface
            .get()
            .await
            .health_changed(iface.signal_emitter())
            .await;
    }
}

/// Adds and removes device objects and signals the change.
pub async fn publish(core: &Arc<Core>, conn: &Connection, added: &[String], removed: &[String]) {
    let server = conn.object_server();
    let Ok(emitter) = SignalEmitter::new(conn, api::MANAGER_PATH) else {
        return;
    };
    for a in added {
        let _ = server
            .at(
                api::device_path(a),
                DeviceObject {
                    core: core.clone(),
                    address: a.clone(),
                },
            )
            .await;
        let _ = Manager::device_added(&emitter, a).await;
    }
    for a in removed {
        let _ = server.remove::<DeviceObject, _>(api::device_path(a)).await;
        let _ = Manager::device_removed(&emitter, a).await;
    }
}

#[interface(name = "org.vfiomanager.VfioManager1.Manager")]
impl Manager {
    /// The daemon's version.
    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").to_string()
    }

    /// `complete`, or `partial: ` and the devices of leases that start-up could
    /// not bring back (after a reboot: an mdev or vGPU type that could not be made
    /// again, a VF that no longer exists).
    #[zbus(property(emits_changed_signal = "const"))]
    fn restore_status(&self) -> String {
        self.core.restore().status()
    }

    /// Every managed function with its driver, group, health and lease.
    async fn list_devices(&self) -> Result<Vec<DeviceInfo>, ApiError> {
        let core = self.core.clone();
        blocking(move || core.devices()).await
    }

    async fn list_leases(&self) -> Result<Vec<Lease>, ApiError> {
        let core = self.core.clone();
        blocking(move || core.leases()).await
    }

    /// The devices swapped in a lease, oldest first: (swapped out, replacement,
    /// why, when).
    async fn lease_swaps(
        &self,
        lease_id: String,
    ) -> Result<Vec<(String, String, String, u64)>, ApiError> {
        let core = self.core.clone();
        blocking(move || core.recovery().swaps(&lease_id)).await
    }

    /// The leases' in-guest agents (vm-agent): connected or not, what they said.
    async fn list_agents(&self) -> Result<Vec<api::AgentInfo>, ApiError> {
        let core = self.core.clone();
        blocking(move || Ok(core.usage().agent_infos())).await
    }

    /// Each leased device's latest usage sample, as its guest's agent reported it.
    async fn usage_now(&self) -> Result<Vec<api::UsageInfo>, ApiError> {
        let core = self.core.clone();
        blocking(move || Ok(core.usage().now())).await
    }

    /// Each PF's predicted compute pressure (`[placement] horizon_s` ahead), and
    /// its place in the order the next lease tries PFs (0: first).
    async fn pressure(&self) -> Result<Vec<(String, f64, u32)>, ApiError> {
        let core = self.core.clone();
        blocking(move || {
            let p = core.placement();
            let predicted = p.predictions();
            Ok(p.order()
                .into_iter()
                .enumerate()
                .map(|(i, pf)| {
                    let v = predicted.get(&pf).copied().unwrap_or(f64::NAN);
                    (pf, v, i as u32)
                })
                .collect())
        })
        .await
    }

    /// The moves that would relieve mdev parents predicted over the limit, for
    /// migratable mdevs only: (lease, mdev, from, to, predicted % at each).
    /// Changes nothing.
    async fn plan_rebalance(&self) -> Result<Vec<api::RebalanceMove>, ApiError> {
        let core = self.core.clone();
        blocking(move || {
            Ok(core
                .placement()
                .rebalance()
                .into_iter()
                .map(|m| {
                    (
                        m.lease,
                        m.device,
                        m.from,
                        m.to,
                        m.from_percent,
                        m.to_percent,
                    )
                })
                .collect())
        })
        .await
    }

    /// Device `device`'s busy share, (start, average, maximum) per `span` seconds
    /// (60: minutes, 3600: hours) since `since` (seconds since the epoch).
    async fn usage_history(
        &self,
        device: String,
        span: u64,
        since: u64,
    ) -> Result<Vec<(u64, f64, f64)>, ApiError> {
        if span != 60 && span != 3600 {
            return Err(ApiError::BadInput(format!(
                "span {span} for {}: give 60 (minute averages) or 3600 (hour averages)",
                api::ids::quote(&device)
            )));
        }
        let core = self.core.clone();
        blocking(move || core.usage().history(&device, span, since)).await
    }

    /// Leases devices to VM `vm` and binds them to vfio-pci (or creates its mdevs).
    /// `request` keys: request_id (s, idempotency key), vm_uuid (s), profile (s:
    /// `vf`, `vvvv:dddd`, an mdev type or vGPU type), count (u), numa_node (i), pfs
    /// (as: preferred PFs), devices (as: exactly these functions), adopt (b).
    async fn provision(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
        vm: String,
        request: HashMap<String, OwnedValue>,
    ) -> Result<Lease, ApiError> {
        let uid = self.authorize(&hdr, "provision devices").await?;
        let vm_quoted = api::ids::quote(&vm);
        let req = api::codec::decode(vm, request, super::core::new_id).inspect_err(|e| {
            // Refused before Core, which audits the rest: recorded here, once.
            self.core
                .audit
                .record(uid, "provision", "", &vm_quoted, &[], &e.to_string());
        })?;
        let core = self.core.clone();
        let r = blocking(move || core.pool().provision(req, uid)).await;
        if let Ok((lease, true)) = &r {
            let devs: Vec<String> = lease.devices.iter().map(|d| d.address.clone()).collect();
            let _ = Manager::lease_created(&emitter, &lease.id, &lease.vm_name, devs).await;
        }
        self.after(conn, &emitter).await;
        r.map(|(lease, _)| lease)
    }

    /// Releases a lease by its lease id: resets its devices and returns them to
    /// their drivers before the lease. Returns false if it was already released.
    /// Only root and the uid that made the lease may release it.
    async fn release(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
        lease: String,
    ) -> Result<bool, ApiError> {
        let which = LeaseId::new(&lease).map(LeaseRef::Lease);
        self.release_lease(&hdr, conn, &emitter, which).await
    }

    /// Releases the lease that request id `request_id` made, as `Release` does.
    async fn release_request(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
        request_id: String,
    ) -> Result<bool, ApiError> {
        let which = RequestId::new(&request_id).map(LeaseRef::Request);
        self.release_lease(&hdr, conn, &emitter, which).await
    }

    /// Enables `count` VFs on `pf` (0: the vendor's default). Returns the VFs.
    async fn enable_vfs(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
        pf: String,
        count: u32,
    ) -> Result<Vec<String>, ApiError> {
        self.direct(&hdr, conn, &emitter, "enable VFs", move |c, uid| {
            c.direct()
                .enable_vfs(&pf, (count > 0).then_some(count), uid)
        })
        .await
    }

    async fn disable_vfs(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
        pf: String,
    ) -> Result<Vec<String>, ApiError> {
        self.direct(&hdr, conn, &emitter, "disable VFs", move |c, uid| {
            c.direct().disable_vfs(&pf, uid)
        })
        .await
    }

    /// Binds a function (and with `whole_group` its group) to vfio-pci.
    async fn bind(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
        address: String,
        whole_group: bool,
    ) -> Result<Vec<String>, ApiError> {
        self.direct(&hdr, conn, &emitter, "bind devices", move |c, uid| {
            c.direct().bind(&address, whole_group, uid)
        })
        .await
    }

    async fn unbind(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
        address: String,
        whole_group: bool,
    ) -> Result<Vec<String>, ApiError> {
        self.direct(&hdr, conn, &emitter, "unbind devices", move |c, uid| {
            c.direct().unbind(&address, whole_group, uid)
        })
        .await
    }

    /// Devices quarantined as orphans (a state only a lost lease explains): name,
    /// reason, since (seconds since the epoch).
    async fn list_orphans(&self) -> Result<Vec<(String, String, u64)>, ApiError> {
        let core = self.core.clone();
        blocking(move || core.restore().orphans()).await
    }

    /// Offers a quarantined device again as it is.
    async fn adopt_orphan(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        name: String,
    ) -> Result<(), ApiError> {
        let uid = self.authorize(&hdr, "adopt orphans").await?;
        let core = self.core.clone();
        blocking(move || core.restore().adopt_orphan(&name, uid)).await
    }

    /// Returns a quarantined function to its host driver (removes a quarantined
    /// mdev) and ends its quarantine.
    async fn free_orphan(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
        name: String,
    ) -> Result<(), ApiError> {
        self.direct(&hdr, conn, &emitter, "free orphans", move |c, uid| {
            c.restore().free_orphan(&name, uid).map(|()| Vec::new())
        })
        .await
        .map(drop)
    }

    /// Every managed function's health (and held-back mdevs): state, reason, since,
    /// PCIe error counts.
    async fn health(&self) -> Result<Vec<HealthInfo>, ApiError> {
        let core = self.core.clone();
        blocking(move || core.health().list()).await
    }

    /// Holds a device back with the operator's reason (1-256 bytes, no control
    /// characters): it is leased, bound and given mdevs to nobody until cleared.
    async fn quarantine(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        name: String,
        reason: String,
    ) -> Result<(), ApiError> {
        self.health_op(&hdr, conn, "quarantine devices", name, move |c, n, uid| {
            c.health().quarantine(n, &reason, uid)
        })
        .await
    }

    /// Swaps leased function `name` for a healthy equivalent (a VF of the same PF
    /// model, on its NUMA node first) in the running VM, through the VMM its lease
    /// names; the lease keeps its id, and `name` is held back with `reason`.
    /// Returns the replacement's address; `LeaseRecovered` says what the VMM did.
    async fn replace(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
        name: String,
        reason: String,
    ) -> Result<String, ApiError> {
        let uid = self.authorize(&hdr, "replace devices").await?;
        let core = self.core.clone();
        let r = blocking(move || {
            let why = super::core::operator_reason(&name, &reason)?;
            core.recovery().replace(&name, &why, uid)
        })
        .await;
        if let Ok(s) = &r {
            recovered(&emitter, s).await;
            health_changed(conn, &s.failed).await;
        }
        self.after(conn, &emitter).await;
        r.map(|s| s.replacement)
    }

    /// Probes a held-back device again and, if it answers, offers it again.
    async fn clear(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        name: String,
    ) -> Result<(), ApiError> {
        self.health_op(&hdr, conn, "clear devices", name, |c, n, uid| {
            c.health().clear(n, uid)
        })
        .await
    }

    /// Active and defined mediated devices, with the lease holding each.
    async fn list_mdevs(&self) -> Result<Vec<MdevInfo>, ApiError> {
        let core = self.core.clone();
        blocking(move || core.mediated().mdevs()).await
    }

    /// Creates an mdev of `type_id` on `parent` (`uuid` empty: a fresh one) and
    /// waits for its vendor driver. `define`: `manual` or `auto` also writes its
    /// mdevctl definition (`auto` ones are started when the daemon starts).
    async fn create_mdev(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        parent: String,
        type_id: String,
        uuid: String,
        define: String,
    ) -> Result<MdevInfo, ApiError> {
        let uid = self.authorize(&hdr, "create mdevs").await?;
        let core = self.core.clone();
        blocking(move || {
            core.mediated()
                .create_mdev(&parent, &type_id, &uuid, &define, uid)
        })
        .await
    }

    /// Removes an mdev (refused while leased or held by a VMM); `undefine` also
    /// deletes its definition.
    async fn remove_mdev(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        uuid: String,
        undefine: bool,
    ) -> Result<(), ApiError> {
        let uid = self.authorize(&hdr, "remove mdevs").await?;
        let core = self.core.clone();
        blocking(move || core.mediated().remove_mdev(&uuid, undefine, uid)).await
    }

    /// Migration preflight: whether the mdev can migrate now (its driver offers
    /// VFIO migration v2, it runs, no VMM holds it), and as what.
    async fn migration_check(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        uuid: String,
    ) -> Result<MigrationInfo, ApiError> {
        // It opens the device's VFIO file: not for anyone who can reach the bus.
        self.authorize(&hdr, "check migrations").await?;
        let core = self.core.clone();
        blocking(move || core.migration().migration_check(&uuid)).await
    }

    /// What VM `vm`'s leases hold that its VMM migrates with it: each mdev as
    /// (lease, UUID, type, vendor driver, driver version).
    async fn vm_mdevs(
        &self,
        vm: String,
    ) -> Result<Vec<(String, String, String, String, String)>, ApiError> {
        let core = self.core.clone();
        blocking(move || core.migration().vm_mdevs(&vm)).await
    }

    /// The destination's side of `vfctl migrate check`: whether this host can take
    /// `count` mdevs of `type_id` whose state comes from vendor driver `driver` at
    /// `version` (the driver here at that version, room in the plan).
    async fn check_incoming(
        &self,
        type_id: String,
        driver: String,
        version: String,
        count: u32,
    ) -> Result<String, ApiError> {
        let core = self.core.clone();
        blocking(move || {
            core.migration()
                .check_incoming(&type_id, &driver, &version, count)
        })
        .await
    }

    /// `PrepareIncoming` for a running VM whose VMM migrates it to a second VMM on
    /// this host: reserves destination mdev `dest` (made with the source's type when
    /// absent; a new UUID when empty) for lease `lease`'s mdev, after checking it
    /// can take the source's state. Returns the destination's UUID.
    async fn prepare_handover(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
        lease: String,
        dest: String,
    ) -> Result<String, ApiError> {
        let uid = self.authorize(&hdr, "migrate leases").await?;
        let core = self.core.clone();
        let r = blocking(move || core.migration().prepare_handover(&lease, &dest, uid)).await;
        self.after(conn, &emitter).await;
        r
    }

    /// After the VMM's migration completed and the source VMM quit: the lease holds
    /// the destination mdev under the same id; the source goes. Returns the
    /// destination's UUID.
    async fn commit_handover(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
        lease: String,
    ) -> Result<String, ApiError> {
        let uid = self.authorize(&hdr, "migrate leases").await?;
        let core = self.core.clone();
        let r = blocking(move || core.migration().commit_handover(&lease, uid)).await;
        self.after(conn, &emitter).await;
        r
    }

    /// Lease `lease`'s prepared hand-over: (source, destination) mdev UUIDs, both
    /// empty when none is prepared. The libvirt hook asks it at `release end` to
    /// tell a migrated VM's end from a stop.
    async fn prepared_handover(&self, lease: String) -> Result<(String, String), ApiError> {
        let core = self.core.clone();
        let r = blocking(move || core.migration().prepared_handover(&lease)).await?;
        Ok(r.unwrap_or_default())
    }

    /// After a failed or cancelled migration, once the destination VMM quit: the
    /// destination mdev goes; the lease is unchanged.
    async fn abort_handover(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
        lease: String,
    ) -> Result<(), ApiError> {
        let uid = self.authorize(&hdr, "migrate leases").await?;
        let core = self.core.clone();
        let r = blocking(move || core.migration().abort_handover(&lease, uid)).await;
        self.after(conn, &emitter).await;
        r
    }

    /// Destination side: reserves mdev `uuid` (created as `type_id` if absent) and
    /// listens on `listen` (HOST:PORT; port 0 picks one) for one source, which must
    /// present a certificate of the configured PKI. Returns the endpoint for the
    /// source's `MigrateOut`; `MigrationFinished` tells the end.
    async fn prepare_incoming(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
        uuid: String,
        type_id: String,
        listen: String,
    ) -> Result<String, ApiError> {
        let p = self.prepare(&hdr, emitter, uuid, type_id, listen, false);
        Ok(p.await?.endpoint)
    }

    /// `PrepareIncoming` with credentials made for this one migration instead of
    /// the PKI's: returns the endpoint and the source's credentials (PEM: the
    /// migration's CA, the source's certificate and key; a secret), which only
    /// `MigrateOutWith` on the source accepts.
    async fn prepare_incoming_once(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
        uuid: String,
        type_id: String,
        listen: String,
    ) -> Result<(String, String), ApiError> {
        let p = self.prepare(&hdr, emitter, uuid, type_id, listen, true);
        let p = p.await?;
        Ok((p.endpoint, p.bundle.unwrap_or_default()))
    }

    /// Source side: streams the mdev's state to a destination's endpoint, emitting
    /// `MigrationProgress`. On success the source stays stopped (its VM moved); on
    /// any failure it runs again.
    async fn migrate_out(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
        uuid: String,
        endpoint: String,
    ) -> Result<MigrationStats, ApiError> {
        self.send_out(&hdr, emitter, uuid, endpoint, None).await
    }

    /// `MigrateOut` with the credentials the destination's `PrepareIncomingOnce`
    /// returned.
    async fn migrate_out_with(
        &self,
        #[zbus(header)] hdr: Header<'_>,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
        uuid: String,
        endpoint: String,
        credentials: String,
    ) -> Result<MigrationStats, ApiError> {
        self.send_out(&hdr, emitter, uuid, endpoint, Some(credentials))
            .await
    }

    /// `expected`: what the device said the stop will carry (0: it did not say).
    #[zbus(signal)]
    pub async fn migration_progress(
        emitter: &SignalEmitter<'_>,
        uuid: &str,
        bytes: u64,
        expected: u64,
    ) -> zbus::Result<()>;
    /// `result`: `ok` or the error.
    #[zbus(signal)]
    pub async fn migration_finished(
        emitter: &SignalEmitter<'_>,
        uuid: &str,
        direction: &str,
        result: &str,
    ) -> zbus::Result<()>;
    #[zbus(signal)]
    pub async fn device_added(emitter: &SignalEmitter<'_>, address: &str) -> zbus::Result<()>;
    #[zbus(signal)]
    pub async fn device_removed(emitter: &SignalEmitter<'_>, address: &str) -> zbus::Result<()>;
    #[zbus(signal)]
    pub async fn device_failed(
        emitter: &SignalEmitter<'_>,
        address: &str,
        reason: &str,
    ) -> zbus::Result<()>;
    /// A device of lease `lease_id` failed (a failed reset, PCIe error recovery
    /// that failed, a probe that found it not answering): it is held back.
    #[zbus(signal)]
    pub async fn lease_degraded(
        emitter: &SignalEmitter<'_>,
        lease_id: &str,
        device: &str,
        reason: &str,
    ) -> zbus::Result<()>;
    /// Device `failed` of lease `lease_id` was swapped for `replacement`: the lease
    /// holds it now and keeps its id. `vm_side` says what the VM's manager did
    /// (plugged it, or that nobody could: then whoever runs the VM plugs it).
    #[zbus(signal)]
    pub async fn lease_recovered(
        emitter: &SignalEmitter<'_>,
        lease_id: &str,
        failed: &str,
        replacement: &str,
        vm_side: &str,
    ) -> zbus::Result<()>;
    /// Lease `lease_id`'s agent said hello: `agent` is its name and version,
    /// `kernel` the guest's.
    #[zbus(signal)]
    pub async fn agent_connected(
        emitter: &SignalEmitter<'_>,
        lease_id: &str,
        vm_name: &str,
        agent: &str,
        kernel: &str,
    ) -> zbus::Result<()>;
    /// Lease `lease_id`'s agent is gone (`why`: closed, or dropped for what it sent).
    #[zbus(signal)]
    pub async fn agent_lost(
        emitter: &SignalEmitter<'_>,
        lease_id: &str,
        vm_name: &str,
        why: &str,
    ) -> zbus::Result<()>;
    /// A usage threshold crossed (`[usage]`): `metric` busy, memory or
    /// temperature; `level` high (memory: warning, high, critical), or ok when it
    /// clears (with hysteresis).
    #[zbus(signal)]
    pub async fn usage_alert(
        emitter: &SignalEmitter<'_>,
        lease_id: &str,
        device: &str,
        metric: &str,
        level: &str,
        value: f64,
    ) -> zbus::Result<()>;
    /// Every device of lease `lease_id` stayed idle past the threshold; `action`
    /// is its `on_idle`, `detail` what came of it.
    #[zbus(signal)]
    pub async fn lease_idle(
        emitter: &SignalEmitter<'_>,
        lease_id: &str,
        vm_name: &str,
        action: &str,
        detail: &str,
    ) -> zbus::Result<()>;
    #[zbus(signal)]
    pub async fn lease_created(
        emitter: &SignalEmitter<'_>,
        lease_id: &str,
        vm_name: &str,
        devices: Vec<String>,
    ) -> zbus::Result<()>;
    #[zbus(signal)]
    pub async fn lease_released(
        emitter: &SignalEmitter<'_>,
        lease_id: &str,
        vm_name: &str,
    ) -> zbus::Result<()>;
}

/// One managed function; its properties are read from the table when asked.
pub struct DeviceObject {
    core: Arc<Core>,
    address: String,
}

impl DeviceObject {
    fn info(&self) -> fdo::Result<DeviceInfo> {
        self.core.device(&self.address).ok_or_else(|| {
            fdo::Error::UnknownObject(format!("{} is no longer managed", self.address))
        })
    }
}

/// Identity properties are constant for the object's life. State properties are
/// read fresh on every Get and announce no change themselves (EmitsChangedSignal
/// false: a caching client must not cache them); the Manager's signals say when
/// to read again (LeaseCreated, LeaseReleased, DeviceFailed, DeviceAdded/Removed).
#[interface(name = "org.vfiomanager.VfioManager1.Device")]
impl DeviceObject {
    #[zbus(property(emits_changed_signal = "const"))]
    fn address(&self) -> String {
        self.address.clone()
    }
    #[zbus(property(emits_changed_signal = "const"))]
    fn id(&self) -> fdo::Result<String> {
        Ok(self.info()?.id)
    }
    #[zbus(property(emits_changed_signal = "const"))]
    fn physical_function(&self) -> fdo::Result<String> {
        Ok(self.info()?.pf)
    }
    #[zbus(property(emits_changed_signal = "false"))]
    fn driver(&self) -> fdo::Result<String> {
        Ok(self.info()?.driver)
    }
    #[zbus(property(emits_changed_signal = "false"))]
    fn iommu_group(&self) -> fdo::Result<i32> {
        Ok(self.info()?.iommu_group)
    }
    #[zbus(property(emits_changed_signal = "const"))]
    fn numa_node(&self) -> fdo::Result<i32> {
        Ok(self.info()?.numa_node)
    }
    /// Changes are signalled (`PropertiesChanged`): a failure, a quarantine, a clear.
    #[zbus(property)]
    fn health(&self) -> fdo::Result<String> {
        Ok(self.info()?.health)
    }
    #[zbus(property(emits_changed_signal = "false"))]
    fn lease_id(&self) -> fdo::Result<String> {
        Ok(self.info()?.lease_id)
    }
    #[zbus(property(emits_changed_signal = "false"))]
    fn vm_name(&self) -> fdo::Result<String> {
        Ok(self.info()?.vm_name)
    }
}

/// The addresses the table holds now (unique, in order), for the first publication.
pub fn all_addresses(core: &Core) -> Vec<String> {
    core.devices()
        .map(|d| d.into_iter().map(|d| d.address).collect())
        .unwrap_or_default()
}
