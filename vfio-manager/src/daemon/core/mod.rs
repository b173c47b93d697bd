//! The daemon's work, in services that share one context (`Core`: the host, the
//! table, the locks, the audit log) and that tests build without D-Bus
//! (`Core::open`, then `core.pool()` ...):
//! - [`Pool`] (`pool.rs`): the pool and leases, provision and release;
//! - [`Direct`] (`direct.rs`): enable, disable, bind, unbind;
//! - [`Restore`] (`restore.rs`): boot restore, crash recovery, reconcile, orphans;
//! - [`Mediated`] (`mediated.rs`): mdevs made and removed, mediated leases;
//! - [`Migration`] (`migration.rs`): device state between two daemons;
//! - [`Health`] (`health.rs`): device health, an operator's quarantine and clear;
//! - [`Recovery`] (`recovery.rs`): a failed device of a lease swapped for a healthy one;
//! - [`Usage`] (`usage.rs`): what the guests' agents say: usage, alerts, idle reclaim;
//! - [`Placement`] (`placement.rs`): where new leases go, by predicted pressure.
//!
//! None of them decides whether a device may be touched: they ask the gate
//! (`vf_provisioner::ops::gate`). Every change to the host is written as an intent
//! before the kernel is touched and committed after (see `store`). Lease operations
//! run side by side, each on the devices it claimed (a GPU reset can take a second;
//! other VMs should not wait for it); operations that change which functions exist
//! run alone (`ops` lock).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use mediated_dev::host::{read_mdev, read_vgpu};
use serde::{Deserialize, Serialize};
use vf_provisioner::sysfs::link_name;
use vf_provisioner::{
    holders, DeviceFilter, Facts, Host, Op, PciAddress, PciFunction, Provisioner, Refusal, Subject,
    Sysfs,
};

mod direct;
mod handover;
mod health;
mod mediated;
mod migration;
mod placement;
mod pool;
mod recovery;
mod restore;
mod usage;

pub use health::operator_reason;
pub use mediated::is_mediated;
pub use migration::{Incoming, Prepared};
pub use pool::LeaseRef;
pub use recovery::Swap;
pub use usage::{Agent, DeviceUsage, UsageEvent};

/// Declares a service: a view of the context for one concern, reading the shared
/// state through `Deref`.
macro_rules! services {
    ($($(#[$doc:meta])* $name:ident => $get:ident;)*) => {$(
        $(#[$doc])*
        pub struct $name<'c>(&'c Core);

        impl std::ops::Deref for $name<'_> {
            type Target = Core;
            fn deref(&self) -> &Core {
                self.0
            }
        }

        impl Core {
            pub fn $get(&self) -> $name<'_> {
                $name(self)
            }
        }
    )*};
}

services! {
    /// The pool and leases.
    Pool => pool;
    /// Direct requests: enable, disable, bind, unbind.
    Direct => direct;
    /// Start-up: restore, recovery, reconcile, orphans.
    Restore => restore;
    /// Mediated devices.
    Mediated => mediated;
    /// Device state between two daemons.
    Migration => migration;
    /// Device health, quarantine and clear.
    Health => health;
    /// A lease's devices swapped when they fail.
    Recovery => recovery;
    /// How leased devices are used (the guests' agents): alerts, idle reclaim.
    Usage => usage;
    /// Where new leases go, by predicted pressure; priority classes.
    Placement => placement;
}

use super::audit::Audit;
use super::metrics::Metrics;
use super::store::{self, now, Guards, LeaseRow, Store};
use crate::api::ids::{Held, LeaseId};
use crate::api::{ApiError, DeviceInfo, Lease};
use crate::config::Config;

const VFIO_PCI: &str = "vfio-pci";
pub use crate::api::codec::MAX_COUNT;

pub struct Core {
    sys: Sysfs,
    /// The kernel steps of a lease's own devices, after the gate passed them (it
    /// knows no leases, so a release may return what its lease holds).
    raw: Provisioner,
    /// The gate with what the table knows (leases, health), and the direct
    /// requests (enable, bind, ...), which ask it themselves.
    guarded: Provisioner,
    store: Arc<Store>,
    /// Shared by lease operations, exclusive for the rest (enable, bind, recovery).
    ops: RwLock<()>,
    /// Devices and request ids that lease operations in flight are working on.
    claims: Claims,
    /// Enabling VFs on idle PFs for a short provision, one at a time.
    enabling: Mutex<()>,
    /// Mediated changes, one at a time (see `mediated`).
    mediating: Mutex<()>,
    /// Devices that failed (or vanished) since the bus layer last looked.
    failures: Mutex<Vec<Failure>>,
    /// Functions that appeared and vanished, not yet published.
    changes: Mutex<(Vec<String>, Vec<String>)>,
    /// Devices of leases that start-up could not bring back (`Restore::status`).
    unrestored: Mutex<Vec<String>>,
    /// Functions in the kernel's PCIe error recovery now, with what it said.
    recovering: Mutex<BTreeMap<String, String>>,
    /// Each function's correctable error count as sampled in the last hour (time,
    /// count), oldest first: the rate the `degraded` threshold is about.
    aer_seen: Mutex<BTreeMap<String, std::collections::VecDeque<(u64, u64)>>>,
    /// Each device's health state as last announced, and since when (`Health::
    /// transitions`): a `degraded` by error rate has no record of its own.
    announced: Mutex<BTreeMap<String, (String, u64)>>,
    /// Each lease's agent, by lease id (`usage`).
    agents: Mutex<BTreeMap<String, Agent>>,
    /// Each PF's predicted pressure (`placement`).
    pressure: Mutex<BTreeMap<String, placement::Holt>>,
    config: Config,
    pub audit: Audit,
    pub metrics: Metrics,
}

/// A device that failed or vanished, for the bus layer's signals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub device: String,
    pub why: String,
    /// The lease that held it when it failed.
    pub lease: Option<String>,
    /// What its lease's policy already did about it (a vanished function's swap).
    pub recovered: Option<Result<Swap, String>>,
}

/// Names (device addresses, `request ID`) held by operations in flight.
#[derive(Default)]
struct Claims {
    held: Mutex<BTreeSet<String>>,
    freed: Condvar,
}

impl Claims {
    fn held(&self) -> MutexGuard<'_, BTreeSet<String>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn none(&self) -> Claim<'_> {
        Claim {
            claims: self,
            names: Vec::new(),
        }
    }

    /// Waits until no one holds any of `names`, then holds them all.
    fn wait(&self, names: Vec<String>) -> Claim<'_> {
        let mut held = self.held();
        while names.iter().any(|n| held.contains(n)) {
            held = self.freed.wait(held).unwrap_or_else(|e| e.into_inner());
        }
        held.extend(names.iter().cloned());
        Claim {
            claims: self,
            names,
        }
    }
}

/// Names held until dropped.
struct Claim<'a> {
    claims: &'a Claims,
    names: Vec<String>,
}

impl Claim<'_> {
    /// Holds `name` too, unless someone else holds it.
    fn try_add(&mut self, name: &str) -> bool {
        let added = self.claims.held().insert(name.to_string());
        if added {
            self.names.push(name.to_string());
        }
        added
    }

    fn remove_last(&mut self) {
        if let Some(n) = self.names.pop() {
            self.claims.held().remove(&n);
            self.claims.freed.notify_all();
        }
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut held = self.claims.held();
        for n in &self.names {
            held.remove(n);
        }
        self.claims.freed.notify_all();
    }
}

/// What a provision intent was about to do, for recovery.
#[derive(Serialize, Deserialize)]
struct Planned {
    /// Each device as the table's columns (`Held::to_row`).
    devices: Vec<(String, String, String)>,
}

impl Planned {
    fn new(devices: &[Held]) -> Planned {
        let row = |h: &Held| {
            let (name, kind, before) = h.to_row();
            (name, kind.to_string(), before)
        };
        Planned {
            devices: devices.iter().map(row).collect(),
        }
    }

    /// An intent's record; one written before the kind had its own field spelled
    /// it as a marker in the driver.
    fn read(body: &str) -> Vec<Held> {
        if let Ok(p) = serde_json::from_str::<Planned>(body) {
            let held = p.devices.iter().map(|(n, k, b)| Held::from_row(n, k, b));
            return held.filter_map(Result::ok).collect();
        }
        let old: Vec<(String, String)> = serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|v| serde_json::from_value(v.get("devices")?.clone()).ok())
            .unwrap_or_default();
        old.iter()
            .filter_map(|(n, m)| Held::from_marker(n, m).ok())
            .collect()
    }
}

/// What the table knows, for the gate.
struct TableFacts(Arc<Store>);

impl Facts for TableFacts {
    fn lease_of(&self, name: &str) -> Option<String> {
        let (id, vm) = self.0.holder(name).ok().flatten()?;
        Some(format!("VM {vm} (lease {id})"))
    }

    fn health(&self, name: &str) -> Option<vf_provisioner::Health> {
        // A table that cannot be read holds a device back: it is never offered blind.
        match self.0.held_back(name) {
            Ok(None) => None,
            Ok(Some((why, true))) => Some(vf_provisioner::Health::Failed(why)),
            Ok(Some((why, false))) => Some(vf_provisioner::Health::Quarantined(why)),
            Err(e) => Some(vf_provisioner::Health::Failed(format!(
                "the state table cannot say: {e}"
            ))),
        }
    }
}

fn failed(e: impl std::fmt::Display) -> ApiError {
    ApiError::Failed(e.to_string())
}

impl Core {
    pub fn open(sys: Sysfs, config: Config, audit: Audit) -> Result<Core, ApiError> {
        let dir = &config.daemon.state_dir;
        super::own_dir(dir, 0o700)
            .and_then(|()| {
                // The state directory is the daemon's alone: nobody else reads it.
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(dir)?.permissions().mode();
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode & 0o7770))
            })
            .map_err(|e| failed(format!("state directory {}: {e}", dir.display())))?;
        let store = Arc::new(Store::open(&dir.join("state.db")).map_err(failed)?);
        let filter = DeviceFilter::new(&config.devices);
        Ok(Core {
            raw: Provisioner::new(sys.clone(), filter.clone()),
            guarded: Provisioner::new(sys.clone(), filter)
                .with_facts(Arc::new(TableFacts(store.clone()))),
            sys,
            store,
            ops: RwLock::new(()),
            claims: Claims::default(),
            enabling: Mutex::new(()),
            mediating: Mutex::new(()),
            failures: Mutex::new(Vec::new()),
            changes: Mutex::new((Vec::new(), Vec::new())),
            unrestored: Mutex::new(Vec::new()),
            recovering: Mutex::new(BTreeMap::new()),
            aer_seen: Mutex::new(BTreeMap::new()),
            announced: Mutex::new(BTreeMap::new()),
            agents: Mutex::new(BTreeMap::new()),
            pressure: Mutex::new(BTreeMap::new()),
            config,
            audit,
            metrics: Metrics::default(),
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    fn store(&self) -> &Store {
        &self.store
    }

    fn lease_row(&self, id: &str) -> Result<Option<LeaseRow>, ApiError> {
        self.store().lease(&LeaseId::new(id)?).map_err(failed)
    }

    /// For operations that may change which functions exist or bypass the leases.
    fn exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.ops.write().unwrap_or_else(|e| e.into_inner())
    }

    /// For lease operations, which meet only in `claims`.
    fn shared(&self) -> RwLockReadGuard<'_, ()> {
        self.ops.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` as operation `op`, recording its latency and outcome.
    fn timed<T>(&self, op: &str, f: impl FnOnce() -> Result<T, ApiError>) -> Result<T, ApiError> {
        let start = Instant::now();
        let r = f();
        self.metrics.observe(op, start.elapsed(), r.as_ref().err());
        r
    }

    // ---- reading -------------------------------------------------------------

    pub fn devices(&self) -> Result<Vec<DeviceInfo>, ApiError> {
        self.store().devices().map_err(failed)
    }

    pub fn device(&self, address: &str) -> Option<DeviceInfo> {
        self.devices()
            .ok()?
            .into_iter()
            .find(|d| d.address == address)
    }

    pub fn leases(&self) -> Result<Vec<Lease>, ApiError> {
        let rows = self.store().leases().map_err(failed)?;
        Ok(rows.iter().map(|r| self.lease_view(r)).collect())
    }

    fn lease_view(&self, row: &LeaseRow) -> Lease {
        let devices = row
            .devices
            .iter()
            .map(|held| self.held_view(held))
            .collect();
        Lease {
            id: row.id.clone(),
            request_id: row.request.request_id.clone(),
            vm_name: row.request.vm_name.clone(),
            vm_uuid: row.request.vm_uuid.clone(),
            profile: row.request.profile.clone(),
            devices,
            created_at: row.created_at,
        }
    }

    /// The functions we manage as sysfs shows them: managed PFs, their VFs, GPUs.
    fn scan(&self) -> Vec<DeviceInfo> {
        let host = Host::scan(&self.sys);
        host.functions
            .values()
            .filter(|f| self.raw.config_refusal(f).is_none())
            .map(|f| DeviceInfo {
                address: f.address.to_string(),
                id: f.id.clone(),
                pf: f.physfn.map_or_else(String::new, |p| p.to_string()),
                driver: f.driver.clone().unwrap_or_default(),
                iommu_group: f.iommu_group.map_or(-1, |g| g as i32),
                numa_node: f.numa_node.map_or(-1, |n| n as i32),
                health: "ok".into(),
                lease_id: String::new(),
                vm_name: String::new(),
                provisions: 0,
                errors: 0,
            })
            .collect()
    }

    /// The functions that appeared and vanished since the last call (a lock and a
    /// swap: the bus's threads call it).
    pub fn take_changes(&self) -> (Vec<String>, Vec<String>) {
        std::mem::take(&mut *self.changes.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The driver each of these functions has now, for the table: an operation's
    /// commit records what it moved (a whole re-read is for topology changes).
    fn drivers_now(&self, addrs: &[String]) -> Vec<(String, String)> {
        addrs
            .iter()
            .filter_map(|a| {
                let dir = self.sys.device_dir(&a.parse().ok()?);
                dir.exists().then(|| {
                    (
                        a.clone(),
                        link_name(&dir.join("driver")).unwrap_or_default(),
                    )
                })
            })
            .collect()
    }

    /// Re-reads sysfs into the table, noting what appeared and vanished for
    /// `take_changes`.
    pub fn refresh(&self) -> Result<(), ApiError> {
        let seen = self.scan();
        let before = self.store().sync_devices(&seen).map_err(failed)?;
        let after: BTreeSet<String> = seen.into_iter().map(|d| d.address).collect();
        let mut changes = self.changes.lock().unwrap_or_else(|e| e.into_inner());
        changes.0.extend(after.difference(&before).cloned());
        changes.1.extend(before.difference(&after).cloned());
        Ok(())
    }

    /// [`Core::refresh`], logging a failure (the table then stays as it was).
    pub fn refresh_or_log(&self) {
        if let Err(e) = self.refresh() {
            eprintln!("vfio-manager: cannot re-read the table: {e}");
        }
    }

    // ---- steps on a lease's devices, shared by the services ------------------

    /// Undoes what a lease did to one device: removes what it made, or returns a
    /// whole function to its driver before the lease.
    /// Whether a process holds `held`'s VFIO group open (a VMM that took it).
    pub(super) fn held_open(&self, held: &Held) -> bool {
        let group = match held {
            Held::Function { address, .. } => {
                PciFunction::read_brief(&self.sys, address).and_then(|f| f.iommu_group)
            }
            Held::MadeMdev(u) | Held::KeptMdev(u) => {
                read_mdev(&self.sys, u).and_then(|m| m.iommu_group)
            }
            Held::Vgpu(vf) => read_vgpu(&self.sys, vf).and_then(|s| s.iommu_group),
        };
        group.is_some_and(|g| !holders::of_group(&self.sys, g).is_empty())
    }

    fn undo_device(&self, held: &Held) -> Result<(), ApiError> {
        match held {
            Held::Function {
                address,
                driver_before,
            } => self
                .return_device(address, driver_before)
                .map_err(ApiError::from),
            mediated => self.unmake(mediated),
        }
    }

    /// Resets each device of `row` and returns it to its driver before the lease.
    /// Failures are recorded on the device and do not stop the release. The resets
    /// run side by side (a function reset waits about 100 ms for the device; a
    /// release of N should cost one), the returns one after another (a VF's return
    /// may turn its PF's autoprobe on around its probe).
    fn return_all(&self, row: &LeaseRow) {
        let mut functions = Vec::new();
        for held in &row.devices {
            let addr = held.name();
            let Held::Function {
                address: a,
                driver_before,
            } = held
            else {
                if let Err(e) = self.unmake(held) {
                    eprintln!("vfio-manager: {addr}: could not undo it: {e}");
                    self.mark_failed(&addr, &e.to_string());
                }
                continue;
            };
            match PciFunction::read_brief(&self.sys, a) {
                Some(f) => functions.push((f, driver_before.as_str())),
                // Gone: reconcile marks it missing.
                None if !self.sys.device_dir(a).exists() => {}
                None => self.mark_failed(&addr, "its sysfs entry cannot be read"),
            }
        }
        match functions.as_slice() {
            [(f, _)] => self.reset_on_release(f),
            many => std::thread::scope(|s| {
                for (f, _) in many {
                    s.spawn(|| self.reset_on_release(f));
                }
            }),
        }
        for (f, before) in &functions {
            if let Err(e) = self.raw.return_function(f, driver_before(before)) {
                let addr = f.address;
                eprintln!("vfio-manager: {addr}: could not return it to {before:?}: {e}");
                self.mark_failed(&addr.to_string(), &e.to_string());
            }
        }
    }

    /// A reset the kernel ran and that failed holds the device back (one it
    /// refuses, for want of a method, says nothing about the device).
    fn reset_on_release(&self, f: &PciFunction) {
        if let Err(e) = self.raw.reset_function(f) {
            if e.kind() != vf_provisioner::Kind::Refused {
                let addr = f.address;
                eprintln!("vfio-manager: {addr}: reset on release failed: {e}");
                self.mark_failed(
                    &addr.to_string(),
                    &format!("its reset on release failed: {e}"),
                );
            }
        }
    }

    fn return_device(&self, a: &PciAddress, before: &str) -> Result<(), vf_provisioner::Error> {
        self.raw.return_to(a, driver_before(before)).map(|_| ())
    }

    /// The gate's verdict on `op` of a lease's device; one that is gone passes (there is nothing left to protect).
    fn gate_held(&self, op: Op, held: &Held) -> Result<(), Refusal> {
        match (held.pci(), held.mdev()) {
            (Some(a), _) => match PciFunction::read_brief(&self.sys, &a) {
                Some(f) => self.guarded.gate(op, Subject::Function(&f)),
                None => Ok(()),
            },
            (_, Some(u)) => self.gate_mdev(op, &u.to_string()),
            (None, None) => Ok(()),
        }
    }

    /// Whether the configuration keeps us off PCI function `a` for `op` (a parent
    /// of mdevs, a VF for a vGPU type), read now: the pool's table does not list
    /// them.
    fn function_refused(&self, op: Op, a: &PciAddress) -> Option<Refusal> {
        let f = PciFunction::read_brief(&self.sys, a)?;
        self.guarded.gate(op, Subject::Function(&f)).err()
    }

    /// Records a failure on `addr` and holds it back: the gate offers it to nobody
    /// until an operator clears it (`vfctl clear`, which probes it first) or frees
    /// it (`vfctl orphan free`).
    fn mark_failed(&self, addr: &str, why: &str) {
        let _ = self.store().set_health(addr, "failed", true);
        if let Ok(true) = self.store().quarantine(addr, why) {
            self.audit
                .record(0, "quarantine", "", "", &[addr.to_string()], why);
        }
        self.note_failure(addr, why);
        self.fail_leased_mdevs_of(addr, why);
    }

    /// The mdevs that leases hold on parent `parent` fail with it (held back and
    /// announced), so that each lease's policy may move them to a healthy parent.
    fn fail_leased_mdevs_of(&self, parent: &str, why: &str) {
        let leases = self.store().leases().unwrap_or_default();
        let mdevs = leases
            .iter()
            .flat_map(|l| l.devices.iter())
            .filter_map(Held::mdev);
        for u in mdevs {
            let on_it = read_mdev(&self.sys, &u).is_some_and(|m| m.parent.as_str() == parent);
            if on_it {
                let why = format!("its parent {parent} failed: {why}");
                let name = u.to_string();
                if let Ok(true) = self.store().quarantine(&name, &why) {
                    self.audit
                        .record(0, "quarantine", "", "", std::slice::from_ref(&name), &why);
                }
                self.note_failure(&name, &why);
            }
        }
    }

    /// Queues `addr`'s failure for the bus layer (signals, then the lease's policy),
    /// with the lease holding it now.
    fn note_failure(&self, addr: &str, why: &str) {
        let lease = self.holder(addr).map(|(id, _)| id);
        self.queue(addr, why, lease, None);
    }

    /// Queues a vanished function of `lease` with what its policy did about it.
    fn note_vanished(&self, addr: &str, why: &str, lease: &str, r: Result<Swap, String>) {
        self.queue(addr, why, Some(lease.to_string()), Some(r));
    }

    fn queue(
        &self,
        addr: &str,
        why: &str,
        lease: Option<String>,
        recovered: Option<Result<Swap, String>>,
    ) {
        let f = Failure {
            device: addr.to_string(),
            why: why.to_string(),
            lease,
            recovered,
        };
        self.failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(f);
    }

    /// The DMA-mapping probe of leased function `a`, freshly bound to vfio-pci, when
    /// the configuration asks for it (`dma_probe`): one that fails is held back.
    fn probe_dma(&self, a: &PciAddress) -> Result<(), ApiError> {
        if !self.config.daemon.dma_probe {
            return Ok(());
        }
        let r = vf_provisioner::vfio::OpenDevice::open(&self.sys, a).and_then(|d| d.dma_probe());
        r.map_err(|e| {
            let why = format!("its DMA-mapping probe failed: {e}");
            self.mark_failed(&a.to_string(), &why);
            ApiError::Failed(format!(
                "{a}: {why}; it is held back (`vfctl health`); ask again for another device"
            ))
        })
    }

    /// `r`, written to the audit log as operation `op` of `uid` on device `name`.
    fn audited<T>(
        &self,
        op: &str,
        uid: u32,
        name: &str,
        r: Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        self.audit
            .record(uid, op, "", "", &[name.to_string()], &verdict(&r));
        r
    }

    /// The lease holding device `name` and its VM, if one does.
    pub fn holder(&self, name: &str) -> Option<(String, String)> {
        self.store().holder(name).ok().flatten()
    }

    pub fn take_failures(&self) -> Vec<Failure> {
        std::mem::take(&mut *self.failures.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Whether `uid` may change the host: root, the configured uids, members of the
    /// configured group.
    pub fn allowed(&self, uid: u32) -> bool {
        let d = &self.config.daemon;
        uid == 0 || d.allowed_uids.contains(&uid) || super::auth::in_group(uid, &d.allowed_group)
    }
}

/// A device's name as the table writes it: a PCI address or an mdev UUID.
fn device_name(s: &str) -> Result<String, ApiError> {
    match s.parse::<PciAddress>() {
        Ok(a) => Ok(a.to_string()),
        Err(_) => Ok(crate::api::ids::parse_uuid(s)
            .map_err(|_| {
                crate::api::ids::IdError::new(
                    "device",
                    s,
                    "give a PCI address (dddd:bb:dd.f) or an mdev UUID",
                )
            })?
            .to_string()),
    }
}

fn not_quarantined(name: &str) -> ApiError {
    ApiError::NotFound(format!(
        "{name} is not quarantined; `vfctl orphans` lists the devices that are"
    ))
}

/// An operation's outcome for the audit log and signals: `ok` or the error.
pub fn verdict<T>(r: &Result<T, ApiError>) -> String {
    r.as_ref().map_or_else(ToString::to_string, |_| "ok".into())
}

fn retry<T>(mut f: impl FnMut() -> Result<T, ApiError>) -> Result<T, ApiError> {
    let mut last = None;
    for attempt in 0..3 {
        match f() {
            Ok(v) => return Ok(v),
            // Refusals and bad input will not change by retrying.
            Err(e @ (ApiError::Refused(_) | ApiError::BadInput(_) | ApiError::NotFound(_))) => {
                return Err(e)
            }
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(200 << attempt));
    }
    Err(last.expect("three attempts"))
}

fn outcome<T, E: std::fmt::Display>(r: &Result<T, E>) -> String {
    r.as_ref()
        .map_or_else(|e| format!("failed: {e}"), |_| "ok".into())
}

fn moved(m: Vec<vf_provisioner::ops::bind::Moved>) -> Vec<String> {
    m.iter().map(|m| m.address.to_string()).collect()
}

/// The driver a device had before its lease, as the table records it ("": none).
fn driver_before(before: &str) -> Option<&str> {
    (!before.is_empty()).then_some(before)
}

fn addrs_of(row: &LeaseRow) -> Vec<String> {
    row.devices.iter().map(Held::name).collect()
}

fn addresses(l: &Lease) -> Vec<String> {
    l.devices.iter().map(|d| d.address.clone()).collect()
}

fn normalize(s: &str) -> String {
    s.parse::<PciAddress>()
        .map_or_else(|_| s.to_string(), |a| a.to_string())
}

/// A gate refusal of a device a request named, for VM `vm`.
fn refused_for(vm: &str, r: Refusal) -> ApiError {
    ApiError::Refused(format!(
        "VM {vm}: {r}; or pick another device (`vfctl list`)"
    ))
}

fn profile_matches(profile: &str, pf: &PciFunction) -> bool {
    profile == "vf" || profile == pf.id
}

/// A lease id: 16 hex digits from the kernel's random source.
pub fn new_id() -> String {
    // A v4 UUID's first 8 bytes are random (getrandom, no file to open).
    let b = uuid::Uuid::new_v4().into_bytes();
    let n = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
    format!("{n:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Request;

    /// A context on a fake host with `manage` the igb stand-in, and no bus.
    fn core(dir: &std::path::Path) -> Core {
        vf_provisioner::layouts::emulated().build(dir).unwrap();
        let text = format!(
            "manage = [\"8086:10c9\"]\n[daemon]\nstate_dir = \"{}\"\n",
            dir.join("state").display()
        );
        let config = Config::parse(&text, std::path::Path::new("test")).unwrap();
        Core::open(
            Sysfs::open_fake(dir).unwrap(),
            config,
            Audit::open(None).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn each_service_runs_on_the_context_alone() {
        let dir = tempfile::tempdir().unwrap();
        let core = core(dir.path());
        assert!(core.restore().recover().unwrap().is_empty());
        let vfs = core
            .direct()
            .enable_vfs("0000:01:00.0", Some(2), 0)
            .unwrap();
        let req = Request {
            request_id: "r1".into(),
            vm_name: "vm".into(),
            profile: "vf".into(),
            count: 1,
            ..Request::default()
        };
        let (lease, new) = core.pool().provision(req, 0).unwrap();
        assert!(new && vfs.contains(&lease.devices[0].address));
        let mdev = core
            .mediated()
            .create_mdev("mtty", "mtty-2", "", "", 0)
            .unwrap();
        // Migration asks the gate, then the kernel: the fake has no VFIO to open.
        assert!(core.migration().migration_check(&mdev.uuid).is_err());
        core.mediated().remove_mdev(&mdev.uuid, false, 0).unwrap();
        let id = LeaseRef::Lease(lease.id.parse().unwrap());
        assert!(core.pool().release(&id, 0).unwrap().is_some());
        core.direct().disable_vfs("0000:01:00.0", 0).unwrap();
        assert!(core.leases().unwrap().is_empty());
        assert!(core.mediated().mdevs().unwrap().is_empty());
    }

    #[test]
    fn health_follows_the_kernels_error_recovery_events() {
        let dir = tempfile::tempdir().unwrap();
        let core = core(dir.path());
        core.restore().recover().unwrap();
        core.direct()
            .enable_vfs("0000:01:00.0", Some(1), 0)
            .unwrap();
        core.refresh().unwrap();
        let vf = "0000:01:10.0";
        let state = || {
            let list = core.health().list().unwrap();
            let i = list.into_iter().find(|i| i.name == vf).unwrap();
            (i.state, i.reason)
        };
        assert_eq!(state().0, "healthy");
        // As the kernel sends them (pci_uevent_ers): BEGIN_RECOVERY comes with
        // DEVICE_ONLINE=0 too, and is no failure.
        core.health().on_error_event(vf, "BEGIN_RECOVERY");
        assert_eq!(state().0, "degraded", "{:?}", state());
        core.health().on_error_event(vf, "SUCCESSFUL_RECOVERY");
        assert_eq!(state().0, "healthy");
        core.health().on_error_event(vf, "BEGIN_RECOVERY");
        core.health().on_error_event(vf, "FAILED_RECOVERY");
        let (s, why) = state();
        assert_eq!(s, "failed");
        assert!(why.contains("FAILED_RECOVERY"), "{why}");
        let req = Request {
            request_id: "r".into(),
            vm_name: "vm".into(),
            devices: vec![vf.into()],
            ..Request::default()
        };
        let e = core.pool().provision(req, 0).unwrap_err();
        assert!(matches!(e, ApiError::Refused(_)), "{e}");
        assert_eq!(core.take_failures().len(), 1, "announced once");
        // A failed recovery reported on a bridge that is not ours (in this flat
        // fake tree, above none of ours): nothing is held back, the bridge least.
        core.health()
            .on_error_event("0000:00:02.0", "FAILED_RECOVERY");
        assert!(core.take_failures().is_empty());
        let held = core.store().quarantine_list().unwrap();
        assert!(!held.iter().any(|(n, ..)| n == "0000:00:02.0"), "{held:?}");
    }

    #[test]
    fn correctable_errors_make_a_device_degraded_by_their_rate_not_their_total() {
        let dir = tempfile::tempdir().unwrap();
        let core = core(dir.path());
        core.direct()
            .enable_vfs("0000:01:00.0", Some(1), 0)
            .unwrap();
        core.refresh().unwrap();
        let vf = "0000:01:10.0";
        let aer = dir
            .path()
            .join("sys/bus/pci/devices")
            .join(vf)
            .join("aer_dev_correctable");
        let count = |n: u64| {
            std::fs::write(&aer, format!("RxErr 0\nBadTLP {n}\nTOTAL_ERR_COR {n}\n")).unwrap()
        };
        let state = || {
            let list = core.health().list().unwrap();
            let i = list.into_iter().find(|i| i.name == vf).unwrap();
            (i.state, i.reason, i.aer_correctable)
        };
        // Thousands since boot, before the daemon looked: not a rate.
        count(5000);
        assert_eq!(state().0, "healthy");
        count(5099);
        assert_eq!(state().0, "healthy", "99 in the hour");
        count(5100);
        let (s, why, total) = state();
        assert_eq!((s.as_str(), total), ("degraded", 5100), "{why}");
        assert!(
            why.contains("100 correctable PCIe errors in the last hour"),
            "{why}"
        );
    }
}
