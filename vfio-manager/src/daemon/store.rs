//! Where state is written: the daemon's table in SQLite (WAL). Every write method
//! but the intents' returns only once its transaction is on disk, so a committed transaction survives
//! a crash or power loss. SQLite runs with synchronous=NORMAL (a commit is a write
//! to the log, no fsync) and the log is then synced through [`GroupSync`]: concurrent
//! commits share one fsync instead of queueing one each behind the table's lock.
//! The connection is the store's own; callers share the store, not a lock on it.
//!
//! Crash protocol: an *intent* row is committed before the kernel is touched, and
//! removed in the same transaction that records the result. An intent found at
//! start-up is an operation that was cut off; `Core::recover` settles it.
//! An intent that guards only kernel state (bindings, VFs, mdevs) is committed to
//! the log but not synced: that state outlives a daemon crash, as does the log in
//! the page cache, but not a host crash or power loss, after which the devices come
//! up fresh and there is nothing left to settle. One that guards files which
//! outlive the host (mdevctl definitions) is synced first. The result's commit is
//! synced, and its sync covers the intent written before it.
//! A device is never in two leases: `lease_devices.address` is the primary key.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension, Transaction};

use super::durable::GroupSync;
use crate::api::ids::{Held, LeaseId, RequestId};
use crate::api::{DeviceInfo, Request};

// Tables keyed by text are WITHOUT ROWID: the key's index is the table, one B-tree
// (one log page per commit) fewer each. A table made before keeps its rowid and
// works the same.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS devices (
    address TEXT PRIMARY KEY, id TEXT NOT NULL, pf TEXT NOT NULL, driver TEXT NOT NULL,
    iommu_group INTEGER NOT NULL, numa_node INTEGER NOT NULL, health TEXT NOT NULL,
    provisions INTEGER NOT NULL DEFAULT 0, errors INTEGER NOT NULL DEFAULT 0) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS leases (
    id TEXT PRIMARY KEY, request_id TEXT NOT NULL UNIQUE, vm_name TEXT NOT NULL,
    vm_uuid TEXT NOT NULL, profile TEXT NOT NULL, request TEXT NOT NULL, created_at INTEGER NOT NULL)
    WITHOUT ROWID;
-- `kind` says what the lease holds of the device (`Held`): function, made-mdev,
-- kept-mdev, vgpu; `driver_before` is a whole function's driver before the lease.
CREATE TABLE IF NOT EXISTS lease_devices (
    address TEXT PRIMARY KEY, lease_id TEXT NOT NULL REFERENCES leases(id), driver_before TEXT NOT NULL,
    kind TEXT NOT NULL DEFAULT 'function')
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS released (
    request_id TEXT PRIMARY KEY, lease_id TEXT NOT NULL, released_at INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS released_by_lease ON released(lease_id);
-- Devices found in a state only a lease explains (on vfio-pci with our override, an
-- mdev nobody defined) that no lease holds: never offered until an operator adopts
-- or frees them.
CREATE TABLE IF NOT EXISTS quarantine (
    name TEXT PRIMARY KEY, reason TEXT NOT NULL, since INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS released_by_age ON released(released_at);
-- Devices swapped in a lease that kept its id: the failed one out, its replacement in.
CREATE TABLE IF NOT EXISTS lease_swaps (
    lease_id TEXT NOT NULL, failed TEXT NOT NULL, replacement TEXT NOT NULL,
    reason TEXT NOT NULL, at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS lease_swaps_by_lease ON lease_swaps(lease_id);
-- Each leased device's busy share, downsampled: `span` 60 rows are minute averages,
-- 3600 rows hour averages, each kept for its own retention (`[usage]`).
CREATE TABLE IF NOT EXISTS usage (
    device TEXT NOT NULL, span INTEGER NOT NULL, at INTEGER NOT NULL, lease_id TEXT NOT NULL,
    busy_avg REAL NOT NULL, busy_max REAL NOT NULL, samples INTEGER NOT NULL,
    PRIMARY KEY (device, span, at)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS usage_by_age ON usage(span, at);
-- Each device's health state as last announced (signalled, audited), and since
-- when: a restart announces only what changed while the daemon was down.
CREATE TABLE IF NOT EXISTS health_seen (
    name TEXT PRIMARY KEY, state TEXT NOT NULL, since INTEGER NOT NULL) WITHOUT ROWID;
-- Each device's count of correctable PCIe errors where it changed, for the hourly
-- rate (`degraded_correctable_per_hour`): a restart keeps the last hour's burst.
CREATE TABLE IF NOT EXISTS aer_samples (
    name TEXT NOT NULL, at INTEGER NOT NULL, correctable INTEGER NOT NULL,
    PRIMARY KEY (name, at, correctable)) WITHOUT ROWID;
-- Plain rowids: an intent's id only has to exceed the open ones' (recovery order);
-- AUTOINCREMENT's sequence table would cost a page write per intent.
CREATE TABLE IF NOT EXISTS intents (
    id INTEGER PRIMARY KEY, op TEXT NOT NULL, lease_id TEXT NOT NULL,
    body TEXT NOT NULL, started_at INTEGER NOT NULL);
";

/// A released lease by its request id. Request ids and lease ids are separate
/// namespaces: each is looked up only as what it is.
const RELEASED_REQUEST: &str = "SELECT lease_id FROM released WHERE request_id = ?1";
/// A released lease by its lease id.
const RELEASED_LEASE: &str = "SELECT lease_id FROM released WHERE lease_id = ?1";
/// How many VFs `Store::unleased_vfs` lists at a time.
pub const PAGE: usize = 16;
/// Released request ids older than the retention window.
const FORGET_RELEASED: &str = "DELETE FROM released WHERE released_at < ?1";
const FORGET_SWAPS: &str =
    "DELETE FROM lease_swaps WHERE at < ?1 AND lease_id NOT IN (SELECT id FROM leases)";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Missing, truncated or corrupt: never replaced by an empty table silently.
    #[error("state table {path} is unusable: {detail}. The daemon does not start empty on its own: it would forget the leases while their devices stay on vfio-pci. Restore {path} (with its -wal file) from a backup; or, to start with an empty table, move it aside (mv {path} {path}.bad) and remove {marker}: the devices that leases held are then quarantined as orphans (`vfctl orphans`, then `vfctl orphan adopt|free`)")]
    Unusable {
        path: String,
        marker: String,
        detail: String,
    },
    #[error("state table {path}: {source}")]
    Sql {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("state table {path}: {what}: {source}; check the disk under the state directory")]
    Io {
        path: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// A lease row with its devices and each device's driver before the lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRow {
    pub id: String,
    /// The uid that made it: only it and root may release it.
    pub owner: u32,
    pub request: Request,
    /// In the table's order (by name).
    pub devices: Vec<Held>,
    pub created_at: u64,
}

/// What an operation's intent guards, which decides whether the intent must be on
/// disk before the operation starts (see the module's note).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guards {
    /// Kernel state only: gone after a host crash, so the intent may be too.
    Kernel,
    /// Files that outlive the host as well (mdevctl definitions).
    Files,
}

/// An operation that was started and not recorded as finished.
#[derive(Debug, Clone)]
pub struct Intent {
    pub id: i64,
    pub op: String,
    pub lease_id: String,
    /// JSON: what the operation was about to do (devices and their drivers before).
    pub body: String,
}

/// A minute (or less) of one device's busy samples, for [`Store::add_usage`].
#[derive(Debug, Clone, PartialEq)]
pub struct UsageMinute {
    pub device: String,
    pub lease: String,
    /// Any time within the minute.
    pub at: u64,
    pub avg: f64,
    pub max: f64,
    pub samples: u32,
}

pub struct Store {
    conn: Mutex<Connection>,
    /// The write-ahead log, synced after each write.
    wal: GroupSync,
    path: String,
}

/// Names the table's file in an SQLite error.
fn wrap(path: &str) -> impl Fn(rusqlite::Error) -> StoreError + Copy + '_ {
    move |source| StoreError::Sql {
        path: path.to_string(),
        source,
    }
}

/// Records the drivers sysfs shows now for these functions.
fn set_drivers(tx: &Transaction, drivers: &[(String, String)]) -> rusqlite::Result<()> {
    let mut st = tx.prepare_cached("UPDATE devices SET driver = ?2 WHERE address = ?1")?;
    for (a, d) in drivers {
        st.execute([a, d])?;
    }
    Ok(())
}

/// Takes `failed` out of lease `lease_id` and records the swap (`replacement`
/// empty: none).
fn swap_out(
    tx: &Transaction,
    lease_id: &str,
    failed: &str,
    replacement: &str,
    reason: &str,
) -> rusqlite::Result<()> {
    tx.prepare_cached("DELETE FROM lease_devices WHERE address = ?1 AND lease_id = ?2")?
        .execute([failed, lease_id])?;
    tx.prepare_cached(
        "INSERT INTO lease_swaps (lease_id, failed, replacement, reason, at) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![lease_id, failed, replacement, reason, now() as i64])?;
    Ok(())
}

/// Lease `lease_id` holds `replacement` in place of `failed`, recorded as a swap.
fn swap_in(
    tx: &Transaction,
    lease_id: &str,
    failed: &str,
    replacement: &Held,
    reason: &str,
) -> rusqlite::Result<()> {
    let (addr, kind, before) = replacement.to_row();
    swap_out(tx, lease_id, failed, &addr, reason)?;
    tx.prepare_cached(
        "INSERT INTO lease_devices (address, lease_id, driver_before, kind) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![addr, lease_id, before, kind])?;
    Ok(())
}

fn end_intent(conn: &Connection, id: i64) -> rusqlite::Result<()> {
    conn.prepare_cached("DELETE FROM intents WHERE id = ?1")?
        .execute([id])?;
    Ok(())
}

/// Writes a small file only root may read, synced with its directory entry.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Store {
    /// Opens the table at `path`, creating it the first time. A table that is
    /// missing where one was made (`<path>.id` says so), or that fails SQLite's
    /// integrity check, is refused with how to recover.
    pub fn open(path: &Path) -> Result<Store> {
        let marker = path.with_extension("id");
        let unusable = |detail: String| StoreError::Unusable {
            path: path.display().to_string(),
            marker: marker.display().to_string(),
            detail,
        };
        let size = path.metadata().map(|m| m.len()).ok();
        if marker.exists() && size.unwrap_or(0) == 0 {
            // SQLite would take an empty file for a new, empty table.
            return Err(unusable(format!(
                "it is {}, but {} says one was made here",
                if size.is_some() { "empty" } else { "missing" },
                marker.display()
            )));
        }
        let store = Store::open_checked(path).map_err(|e| match e {
            StoreError::Sql { source, .. } => unusable(source.to_string()),
            e => e,
        })?;
        let check: String = store
            .conn()
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .map_err(|e| unusable(e.to_string()))?;
        if check != "ok" {
            return Err(unusable(format!("SQLite's integrity check says: {check}")));
        }
        if !marker.exists() {
            write_private(&marker, &format!("created {}\n", now())).map_err(|source| {
                StoreError::Io {
                    path: marker.display().to_string(),
                    what: "cannot write the marker",
                    source,
                }
            })?;
        }
        Ok(store)
    }

    fn open_checked(path: &Path) -> Result<Store> {
        let name = path.display().to_string();
        let err = wrap(&name);
        let io = |what| {
            let name = name.clone();
            move |source| StoreError::Io {
                path: name,
                what,
                source,
            }
        };
        let conn = Connection::open(path).map_err(err)?;
        // The table is the daemon's alone: no file locks or shared memory per
        // transaction, and a second daemon on the same state directory fails at
        // start ("database is locked") instead of sharing it.
        conn.pragma_update(None, "locking_mode", "EXCLUSIVE")
            .map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        // Tables made before leases had owners: theirs are root's.
        if conn
            .prepare("SELECT owner_uid FROM leases LIMIT 0")
            .is_err()
        {
            conn.execute_batch(
                "ALTER TABLE leases ADD COLUMN owner_uid INTEGER NOT NULL DEFAULT 0",
            )
            .map_err(err)?;
        }
        // Tables made before the kind had a column spelled it as a marker in
        // `driver_before`.
        if conn
            .prepare("SELECT kind FROM lease_devices LIMIT 0")
            .is_err()
        {
            conn.execute_batch(
                "BEGIN;
                 ALTER TABLE lease_devices ADD COLUMN kind TEXT NOT NULL DEFAULT 'function';
                 UPDATE lease_devices SET kind = CASE driver_before
                     WHEN '@mdev' THEN 'made-mdev' WHEN '@mdev-kept' THEN 'kept-mdev'
                     WHEN '@vgpu' THEN 'vgpu' END, driver_before = ''
                   WHERE driver_before IN ('@mdev', '@mdev-kept', '@vgpu');
                 COMMIT;",
            )
            .map_err(err)?;
        }
        // The log exists from the first transaction on and stays (same file, reused
        // from its start after each checkpoint) while the connection is open. Its
        // directory entry is synced once, so that the log is found after a power loss.
        let wal = File::open(format!("{name}-wal")).map_err(io("cannot open its log"))?;
        // Only root reads the table (every lease, VM and uid is in it).
        for f in [path, Path::new(&format!("{name}-wal"))] {
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600))
                .map_err(io("cannot make it private (mode 0600)"))?;
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io("cannot sync its directory"))?;
        }
        let store = Store {
            conn: Mutex::new(conn),
            wal: GroupSync::new(wal),
            path: name,
        };
        store.synced()?;
        Ok(store)
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
        wrap(&self.path)
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until every transaction committed so far is on disk.
    fn synced(&self) -> Result<()> {
        self.wal.sync().map_err(|source| StoreError::Io {
            path: self.path.clone(),
            what: "cannot sync its log to disk",
            source,
        })
    }

    /// Runs `f` in one transaction, commits, and returns once the commit is on disk.
    fn write<T>(&self, f: impl FnOnce(&Transaction) -> rusqlite::Result<T>) -> Result<T> {
        let r = self.commit(f)?;
        self.synced()?;
        Ok(r)
    }

    /// Runs `f` in one transaction and commits it to the log, not synced: it
    /// survives the daemon, not the host (intents; see the module's note).
    fn commit<T>(&self, f: impl FnOnce(&Transaction) -> rusqlite::Result<T>) -> Result<T> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(self.err())?;
        let r = f(&tx).map_err(self.err())?;
        tx.commit().map_err(self.err())?;
        Ok(r)
    }

    /// Runs `f`, one statement, on its own: SQLite commits a lone statement as its
    /// own transaction (to the log, not synced), without the BEGIN and COMMIT
    /// statements that an explicit transaction parses and runs around it (half of
    /// an intent's cost).
    fn commit_one<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        f(&self.conn()).map_err(self.err())
    }

    /// Records that `op` on `lease_id` is about to touch what `guards` names.
    pub fn begin_intent(
        &self,
        op: &str,
        lease_id: &str,
        body: &str,
        guards: Guards,
    ) -> Result<i64> {
        let id = self.commit_one(|conn| {
            conn.prepare_cached(
                "INSERT INTO intents (op, lease_id, body, started_at) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![op, lease_id, body, now() as i64])?;
            Ok(conn.last_insert_rowid())
        })?;
        if guards == Guards::Files {
            self.synced()?;
        }
        Ok(id)
    }

    pub fn end_intent(&self, id: i64) -> Result<()> {
        self.commit_one(|conn| end_intent(conn, id))
    }

    pub fn intents(&self) -> Result<Vec<Intent>> {
        let conn = self.conn();
        let mut st = conn
            .prepare_cached("SELECT id, op, lease_id, body FROM intents ORDER BY id")
            .map_err(self.err())?;
        let rows = st
            .query_map([], |r| {
                Ok(Intent {
                    id: r.get(0)?,
                    op: r.get(1)?,
                    lease_id: r.get(2)?,
                    body: r.get(3)?,
                })
            })
            .map_err(self.err())?;
        rows.collect::<rusqlite::Result<_>>().map_err(self.err())
    }

    /// Records a lease, the drivers its devices have now, and ends its intent, in
    /// one transaction (one sync to disk).
    pub fn commit_lease(
        &self,
        lease: &LeaseRow,
        intent: i64,
        drivers: &[(String, String)],
    ) -> Result<()> {
        let r = &lease.request;
        let request = serde_json::to_string(r).expect("a request serializes");
        self.write(|tx| {
            tx.prepare_cached(
                "INSERT INTO leases (id, request_id, vm_name, vm_uuid, profile, request, created_at, owner_uid)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![
                lease.id,
                r.request_id,
                r.vm_name,
                r.vm_uuid,
                r.profile,
                request,
                lease.created_at as i64,
                lease.owner
            ])?;
            for held in &lease.devices {
                let (addr, kind, before) = held.to_row();
                tx.prepare_cached(
                    "INSERT INTO lease_devices (address, lease_id, driver_before, kind) VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![addr, lease.id, before, kind])?;
                tx.prepare_cached(
                    "UPDATE devices SET provisions = provisions + 1 WHERE address = ?1",
                )?
                .execute([&addr])?;
                // A lease that adopted a quarantined device ends its quarantine.
                tx.prepare_cached("DELETE FROM quarantine WHERE name = ?1")?
                    .execute([&addr])?;
            }
            end_intent(tx, intent)?;
            set_drivers(tx, drivers)
        })
    }

    /// Removes a lease, remembers its request id as released, records the drivers
    /// its devices went back to, and ends its intent, in one transaction.
    pub fn commit_release(
        &self,
        lease: &LeaseRow,
        intent: Option<i64>,
        drivers: &[(String, String)],
    ) -> Result<()> {
        self.write(|tx| {
            tx.prepare_cached("DELETE FROM lease_devices WHERE lease_id = ?1")?
                .execute([&lease.id])?;
            tx.prepare_cached("DELETE FROM leases WHERE id = ?1")?
                .execute([&lease.id])?;
            tx.prepare_cached(
                "INSERT OR REPLACE INTO released (request_id, lease_id, released_at) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![lease.request.request_id, lease.id, now() as i64])?;
            if let Some(i) = intent {
                end_intent(tx, i)?;
            }
            set_drivers(tx, drivers)
        })
    }

    /// Swaps each device `failed` of lease `lease_id` for its `replacement` (the
    /// lease keeps its id; a whole device swaps with its group), records each swap
    /// (`why` of the replacement) and the drivers now, holds each swapped-out one
    /// back, and ends the intent, in one transaction.
    pub fn commit_swap(
        &self,
        lease_id: &str,
        pairs: &[(String, Held)],
        why: impl Fn(&Held) -> String,
        intent: i64,
        drivers: &[(String, String)],
    ) -> Result<()> {
        self.write(|tx| {
            for (failed, replacement) in pairs {
                let reason = why(replacement);
                swap_in(tx, lease_id, failed, replacement, &reason)?;
                tx.prepare_cached(
                    "UPDATE devices SET provisions = provisions + 1 WHERE address = ?1",
                )?
                .execute([replacement.name()])?;
                // Held back (a failed one already is, with its own reason).
                tx.prepare_cached(
                    "INSERT OR IGNORE INTO quarantine (name, reason, since) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![failed, reason, now() as i64])?;
            }
            end_intent(tx, intent)?;
            set_drivers(tx, drivers)
        })
    }

    /// Lease `lease_id`'s mdev `from` was migrated by its VMM to `to`: the lease
    /// holds `to` in its place, recorded as a swap. The intent stays open until
    /// the source is gone (`Migration::commit_handover`).
    pub fn commit_handover(
        &self,
        lease_id: &str,
        from: &str,
        to: &Held,
        reason: &str,
    ) -> Result<()> {
        self.write(|tx| swap_in(tx, lease_id, from, to, reason))
    }

    /// Lease `lease_id` gave idle device `name` back (reset and returned to the
    /// host): recorded as a swap with no replacement.
    pub fn commit_reclaim(
        &self,
        lease_id: &str,
        name: &str,
        reason: &str,
        intent: i64,
        drivers: &[(String, String)],
    ) -> Result<()> {
        self.write(|tx| {
            swap_out(tx, lease_id, name, "", reason)?;
            end_intent(tx, intent)?;
            set_drivers(tx, drivers)
        })
    }

    /// Lease `lease_id` lets go of device `name`, which vanished; recorded as a
    /// swap with no replacement.
    pub fn let_go(&self, lease_id: &str, name: &str, reason: &str) -> Result<()> {
        self.write(|tx| swap_out(tx, lease_id, name, "", reason))
    }

    /// Adds a minute of a device's busy share, and folds it into its hour; then
    /// forgets minutes older than `minutes_kept_s` and hours older than
    /// `hours_kept_s`. Committed, not synced: a host crash may lose the last
    /// minutes of a series, never a lease.
    pub fn add_usage(&self, m: &UsageMinute, minutes_kept_s: u64, hours_kept_s: u64) -> Result<()> {
        let now = now() as i64;
        self.commit(|tx| {
            let add = "INSERT INTO usage (device, span, at, lease_id, busy_avg, busy_max, samples)
                VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                ON CONFLICT (device, span, at) DO UPDATE SET
                  busy_avg = (busy_avg * samples + excluded.busy_avg * excluded.samples)
                             / (samples + excluded.samples),
                  busy_max = max(busy_max, excluded.busy_max),
                  samples = samples + excluded.samples,
                  lease_id = excluded.lease_id";
            for span in [60i64, 3600] {
                let at = m.at as i64 / span * span;
                tx.prepare_cached(add)?.execute(params![
                    m.device,
                    span,
                    at,
                    m.lease,
                    m.avg,
                    m.max,
                    m.samples as i64
                ])?;
            }
            let forget = "DELETE FROM usage WHERE span = ?1 AND at < ?2";
            tx.prepare_cached(forget)?
                .execute(params![60, now - minutes_kept_s as i64])?;
            tx.prepare_cached(forget)?
                .execute(params![3600, now - hours_kept_s as i64])?;
            Ok(())
        })
    }

    /// A device's series at `span` seconds (60 or 3600) since `since`, oldest
    /// first: (start, average, maximum) busy percent.
    pub fn usage(&self, device: &str, span: u64, since: u64) -> Result<Vec<(u64, f64, f64)>> {
        let conn = self.conn();
        let mut st = conn
            .prepare_cached(
                "SELECT at, busy_avg, busy_max FROM usage WHERE device = ?1 AND span = ?2 AND at >= ?3 ORDER BY at",
            )
            .map_err(self.err())?;
        let rows = st
            .query_map(params![device, span as i64, since as i64], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get(1)?, r.get(2)?))
            })
            .map_err(self.err())?;
        rows.collect::<rusqlite::Result<_>>().map_err(self.err())
    }

    /// The swaps of lease `lease_id`, oldest first: (failed, replacement, reason, at).
    pub fn swaps(&self, lease_id: &str) -> Result<Vec<(String, String, String, u64)>> {
        let conn = self.conn();
        let mut st = conn
            .prepare_cached(
                "SELECT failed, replacement, reason, at FROM lease_swaps WHERE lease_id = ?1 ORDER BY rowid",
            )
            .map_err(self.err())?;
        let rows = st
            .query_map([lease_id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get::<_, i64>(3)? as u64))
            })
            .map_err(self.err())?;
        rows.collect::<rusqlite::Result<_>>().map_err(self.err())
    }

    pub fn leases(&self) -> Result<Vec<LeaseRow>> {
        self.lease_query("ORDER BY created_at, id", [])
    }

    /// The lease with this lease id (an index search).
    pub fn lease(&self, id: &LeaseId) -> Result<Option<LeaseRow>> {
        Ok(self.lease_query("WHERE id = ?1", [id.as_str()])?.pop())
    }

    /// The lease with this request id (an index search).
    pub fn lease_of_request(&self, id: &RequestId) -> Result<Option<LeaseRow>> {
        Ok(self
            .lease_query("WHERE request_id = ?1", [id.as_str()])?
            .pop())
    }

    fn lease_query<P: rusqlite::Params>(&self, filter: &str, p: P) -> Result<Vec<LeaseRow>> {
        let conn = self.conn();
        let mut st = conn
            .prepare_cached(&format!(
                "SELECT id, request, created_at, owner_uid FROM leases {filter}"
            ))
            .map_err(self.err())?;
        let heads: Vec<(String, String, i64, u32)> = st
            .query_map(p, |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .map_err(self.err())?
            .collect::<rusqlite::Result<_>>()
            .map_err(self.err())?;
        let mut dev = conn
            .prepare_cached("SELECT address, kind, driver_before FROM lease_devices WHERE lease_id = ?1 ORDER BY address")
            .map_err(self.err())?;
        heads
            .into_iter()
            .map(|(id, req, created, owner)| {
                let devices = dev
                    .query_map([&id], |r| {
                        let (name, kind, before): (String, String, String) =
                            (r.get(0)?, r.get(1)?, r.get(2)?);
                        Held::from_row(&name, &kind, &before).map_err(|e| {
                            rusqlite::Error::FromSqlConversionFailure(
                                0,
                                rusqlite::types::Type::Text,
                                e.into(),
                            )
                        })
                    })
                    .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
                    .map_err(self.err())?;
                Ok(LeaseRow {
                    id,
                    owner,
                    request: serde_json::from_str(&req).unwrap_or_default(),
                    devices,
                    created_at: created as u64,
                })
            })
            .collect()
    }

    /// The released lease whose request id this was, if any.
    pub fn released_request(&self, id: &RequestId) -> Result<Option<String>> {
        self.released(RELEASED_REQUEST, id.as_str())
    }

    /// Whether lease `id` was released (and is remembered).
    pub fn released_lease(&self, id: &LeaseId) -> Result<bool> {
        Ok(self.released(RELEASED_LEASE, id.as_str())?.is_some())
    }

    fn released(&self, sql: &str, id: &str) -> Result<Option<String>> {
        self.conn()
            .prepare_cached(sql)
            .and_then(|mut st| st.query_row([id], |r| r.get(0)).optional())
            .map_err(self.err())
    }

    /// Forgets the request ids released before `before` (seconds since the epoch):
    /// they may name a new lease again. Returns how many were forgotten.
    pub fn forget_released(&self, before: u64) -> Result<usize> {
        self.write(|tx| {
            // With them, the swaps of leases that are gone.
            tx.prepare_cached(FORGET_SWAPS)?.execute([before as i64])?;
            tx.prepare_cached(FORGET_RELEASED)?.execute([before as i64])
        })
    }

    /// The lease holding `address`, with its VM name.
    pub fn holder(&self, address: &str) -> Result<Option<(String, String)>> {
        self.conn()
            .prepare_cached(
                "SELECT l.id, l.vm_name FROM lease_devices d JOIN leases l ON l.id = d.lease_id
                 WHERE d.address = ?1",
            )
            .and_then(|mut st| {
                st.query_row([address], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
            })
            .map_err(self.err())
    }

    /// Replaces the device table with what sysfs shows, keeping counters and health.
    /// Returns the devices that were present before.
    pub fn sync_devices(&self, seen: &[DeviceInfo]) -> Result<BTreeSet<String>> {
        self.write(|tx| {
            let before = tx
                .prepare_cached("SELECT address FROM devices WHERE health != 'missing'")?
                .query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            let mut upsert = tx.prepare_cached(
                "INSERT INTO devices (address, id, pf, driver, iommu_group, numa_node, health)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT(address) DO UPDATE SET id = ?2, pf = ?3, driver = ?4,
                   iommu_group = ?5, numa_node = ?6,
                   health = CASE WHEN health = 'failed' THEN 'failed' ELSE ?7 END",
            )?;
            for d in seen {
                upsert.execute(params![
                    d.address,
                    d.id,
                    d.pf,
                    d.driver,
                    d.iommu_group,
                    d.numa_node,
                    d.health
                ])?;
            }
            // Those sysfs no longer shows are missing (a failure is kept while the
            // device is there: the upsert above leaves it).
            let seen: BTreeSet<&str> = seen.iter().map(|d| d.address.as_str()).collect();
            let known: Vec<String> = tx
                .prepare_cached("SELECT address FROM devices")?
                .query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            let mut gone =
                tx.prepare_cached("UPDATE devices SET health = 'missing' WHERE address = ?1")?;
            for a in known.iter().filter(|a| !seen.contains(a.as_str())) {
                gone.execute([a])?;
            }
            // A missing device that no lease names is forgotten; a leased one stays
            // visible as `missing` so the operator sees which VM lost it.
            tx.execute(
                "DELETE FROM devices WHERE health = 'missing'
                 AND address NOT IN (SELECT address FROM lease_devices)",
                [],
            )?;
            Ok(before)
        })
    }

    pub fn set_health(&self, address: &str, health: &str, error: bool) -> Result<()> {
        self.write(|tx| {
            tx.prepare_cached(
                "UPDATE devices SET health = ?2, errors = errors + ?3 WHERE address = ?1",
            )?
            .execute(params![address, health, error as i64])?;
            Ok(())
        })
    }

    /// A device's model id and IOMMU group as last read from sysfs.
    pub fn identity(&self, address: &str) -> Result<Option<(String, i64)>> {
        self.conn()
            .prepare_cached("SELECT id, iommu_group FROM devices WHERE address = ?1")
            .and_then(|mut st| {
                st.query_row([address], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
            })
            .map_err(self.err())
    }

    /// A provision's candidates, as (address, PF): up to [`PAGE`] VFs that no
    /// lease holds, by address from after `after` ("" for the start), on NUMA
    /// node `numa` (any if negative), of PF `pf` (any if None). Paged, in the
    /// primary key's order: a provision usually takes the first few, and reading
    /// and sorting every row cost it more than all its other queries together.
    pub fn unleased_vfs(
        &self,
        numa: i32,
        pf: Option<&str>,
        after: &str,
    ) -> Result<Vec<(String, String)>> {
        let conn = self.conn();
        // The page size is written into the statement: SQLite re-prepares one
        // with a bound LIMIT at every step (that was a third of its time here).
        let mut st = conn
            .prepare_cached(&format!(
                "SELECT address, pf FROM devices d
                 WHERE address > ?3 AND pf != '' AND (?2 IS NULL OR pf = ?2)
                   AND health != 'missing' AND (?1 < 0 OR numa_node = ?1)
                   AND NOT EXISTS (SELECT 1 FROM lease_devices l WHERE l.address = d.address)
                   AND NOT EXISTS (SELECT 1 FROM quarantine q WHERE q.name = d.address)
                 ORDER BY address LIMIT {PAGE}"
            ))
            .map_err(self.err())?;
        let rows = st
            .query_map(params![numa, pf, after], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(self.err())?;
        rows.collect::<rusqlite::Result<_>>().map_err(self.err())
    }

    /// Quarantines `name` (a PCI address or an mdev UUID) with `reason`; false if it
    /// already was.
    pub fn quarantine(&self, name: &str, reason: &str) -> Result<bool> {
        self.write(|tx| {
            tx.prepare_cached(
                "INSERT OR IGNORE INTO quarantine (name, reason, since) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![name, reason, now() as i64])
            .map(|n| n == 1)
        })
    }

    /// Lifts `name`'s quarantine (and a failure that put it there: the operator
    /// has looked); false if it was not quarantined.
    pub fn unquarantine(&self, name: &str) -> Result<bool> {
        self.write(|tx| {
            tx.prepare_cached(
                "UPDATE devices SET health = 'ok' WHERE address = ?1 AND health = 'failed'",
            )?
            .execute([name])?;
            tx.prepare_cached("DELETE FROM quarantine WHERE name = ?1")?
                .execute([name])
                .map(|n| n == 1)
        })
    }

    /// Why `name` is held back, if it is, and whether a failure put it there.
    pub fn held_back(&self, name: &str) -> Result<Option<(String, bool)>> {
        self.conn()
            .prepare_cached(
                "SELECT q.reason, COALESCE(d.health = 'failed', 0) FROM quarantine q
                 LEFT JOIN devices d ON d.address = q.name WHERE q.name = ?1",
            )
            .and_then(|mut st| {
                st.query_row([name], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
            })
            .map_err(self.err())
    }

    /// Why `name` is quarantined, if it is.
    pub fn quarantined(&self, name: &str) -> Result<Option<String>> {
        self.conn()
            .prepare_cached("SELECT reason FROM quarantine WHERE name = ?1")
            .and_then(|mut st| st.query_row([name], |r| r.get(0)).optional())
            .map_err(self.err())
    }

    /// Each device's health state as last announced, and since when.
    pub fn health_seen(&self) -> Result<BTreeMap<String, (String, u64)>> {
        let conn = self.conn();
        let mut st = conn
            .prepare_cached("SELECT name, state, since FROM health_seen")
            .map_err(self.err())?;
        let rows = st
            .query_map([], |r| {
                Ok((r.get(0)?, (r.get(1)?, r.get::<_, i64>(2)? as u64)))
            })
            .map_err(self.err())?;
        rows.collect::<rusqlite::Result<_>>().map_err(self.err())
    }

    /// Replaces the announced states with `seen`.
    pub fn set_health_seen(&self, seen: &BTreeMap<String, (String, u64)>) -> Result<()> {
        self.write(|tx| {
            tx.execute("DELETE FROM health_seen", [])?;
            let mut st = tx.prepare_cached(
                "INSERT INTO health_seen (name, state, since) VALUES (?1, ?2, ?3)",
            )?;
            for (name, (state, since)) in seen {
                st.execute(params![name, state, *since as i64])?;
            }
            Ok(())
        })
    }

    /// Every device's samples of its correctable-error count, oldest first.
    pub fn aer_samples(&self) -> Result<Vec<(String, u64, u64)>> {
        let conn = self.conn();
        let mut st = conn
            .prepare_cached(
                "SELECT name, at, correctable FROM aer_samples ORDER BY name, at, correctable",
            )
            .map_err(self.err())?;
        let rows = st
            .query_map([], |r| {
                Ok((
                    r.get(0)?,
                    r.get::<_, i64>(1)? as u64,
                    r.get::<_, i64>(2)? as u64,
                ))
            })
            .map_err(self.err())?;
        rows.collect::<rusqlite::Result<_>>().map_err(self.err())
    }

    /// Replaces `name`'s samples with `samples`.
    pub fn set_aer_samples(&self, name: &str, samples: &[(u64, u64)]) -> Result<()> {
        self.write(|tx| {
            tx.prepare_cached("DELETE FROM aer_samples WHERE name = ?1")?
                .execute([name])?;
            let mut st = tx.prepare_cached(
                "INSERT INTO aer_samples (name, at, correctable) VALUES (?1, ?2, ?3)",
            )?;
            for (at, count) in samples {
                st.execute(params![name, *at as i64, *count as i64])?;
            }
            Ok(())
        })
    }

    /// Every quarantined device: (name, reason, since).
    pub fn quarantine_list(&self) -> Result<Vec<(String, String, u64)>> {
        let conn = self.conn();
        let mut st = conn
            .prepare_cached("SELECT name, reason, since FROM quarantine ORDER BY name")
            .map_err(self.err())?;
        let rows = st
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64))
            })
            .map_err(self.err())?;
        rows.collect::<rusqlite::Result<_>>().map_err(self.err())
    }

    pub fn devices(&self) -> Result<Vec<DeviceInfo>> {
        let conn = self.conn();
        let mut st = conn
            .prepare_cached(
                "SELECT d.address, d.id, d.pf, d.driver, d.iommu_group, d.numa_node,
                        CASE WHEN q.name IS NULL OR d.health = 'failed' THEN d.health ELSE 'quarantined' END,
                        COALESCE(l.id, ''), COALESCE(l.vm_name, ''), d.provisions, d.errors
                 FROM devices d LEFT JOIN lease_devices ld ON ld.address = d.address
                 LEFT JOIN leases l ON l.id = ld.lease_id
                 LEFT JOIN quarantine q ON q.name = d.address ORDER BY d.address",
            )
            .map_err(self.err())?;
        let rows = st
            .query_map([], |r| {
                Ok(DeviceInfo {
                    address: r.get(0)?,
                    id: r.get(1)?,
                    pf: r.get(2)?,
                    driver: r.get(3)?,
                    iommu_group: r.get(4)?,
                    numa_node: r.get(5)?,
                    health: r.get(6)?,
                    lease_id: r.get(7)?,
                    vm_name: r.get(8)?,
                    provisions: r.get::<_, i64>(9)? as u64,
                    errors: r.get::<_, i64>(10)? as u64,
                })
            })
            .map_err(self.err())?;
        rows.collect::<rusqlite::Result<_>>().map_err(self.err())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(store: &Store, sql: &str) -> Vec<String> {
        store
            .conn()
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .unwrap()
            .query_map([0], |r| r.get::<_, String>(3))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    }

    /// Minutes fold into their hour (weighted by samples), and each span is kept
    /// for its own retention.
    #[test]
    fn usage_minutes_fold_into_hours_and_age_out_by_span() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db")).unwrap();
        let hour = now() / 3600 * 3600;
        let m = |at: u64, avg: f64, max: f64, samples: u32| UsageMinute {
            device: "0000:10:00.1".into(),
            lease: "0123456789abcdef".into(),
            at,
            avg,
            max,
            samples,
        };
        let day = 86_400;
        store
            .add_usage(&m(hour + 5, 10.0, 20.0, 3), day, 30 * day)
            .unwrap();
        store
            .add_usage(&m(hour + 65, 50.0, 90.0, 1), day, 30 * day)
            .unwrap();
        // The same minute again adds to it.
        store
            .add_usage(&m(hour + 70, 50.0, 50.0, 1), day, 30 * day)
            .unwrap();
        let minutes = store.usage("0000:10:00.1", 60, 0).unwrap();
        assert_eq!(minutes, [(hour, 10.0, 20.0), (hour + 60, 50.0, 90.0)]);
        let hours = store.usage("0000:10:00.1", 3600, 0).unwrap();
        assert_eq!(hours, [(hour, 26.0, 90.0)], "(3 x 10 + 50 + 50) / 5");
        // Minutes older than their retention go; hours stay.
        store
            .add_usage(&m(hour + 130, 0.0, 0.0, 1), 0, 30 * day)
            .unwrap();
        let minutes = store.usage("0000:10:00.1", 60, 0).unwrap();
        assert!(
            minutes.iter().all(|(at, ..)| *at >= now() - 60),
            "{minutes:?}"
        );
        assert_eq!(store.usage("0000:10:00.1", 3600, 0).unwrap().len(), 1);
        // Pruning searches the age index.
        let p = plan(&store, "DELETE FROM usage WHERE span = 60 AND at < ?1");
        assert!(p.iter().all(|l| !l.starts_with("SCAN")), "{p:?}");
    }

    /// `released` keeps the request ids released within the retention window (days
    /// to months of them), so its lookup (run by every provision) and its pruning
    /// must stay index searches, never scans of the table.
    #[test]
    fn released_lookups_and_pruning_search_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db")).unwrap();
        for sql in [RELEASED_REQUEST, RELEASED_LEASE] {
            let lookup = plan(&store, sql);
            assert!(
                lookup.iter().all(|p| !p.starts_with("SCAN")),
                "query plan: {lookup:?}"
            );
            assert_eq!(lookup.iter().filter(|p| p.starts_with("SEARCH")).count(), 1);
        }
        let prune = plan(&store, FORGET_RELEASED);
        assert!(
            prune.iter().any(|p| p.contains("released_by_age")),
            "query plan: {prune:?}"
        );
    }

    #[test]
    fn forgetting_released_ids_keeps_the_recent_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db")).unwrap();
        let row = |id: &str, at: u64| LeaseRow {
            id: format!("{:016x}", id.as_bytes()[0] as u64 + at),
            owner: 0,
            request: Request {
                request_id: id.into(),
                ..Request::default()
            },
            devices: vec![],
            created_at: at,
        };
        for id in ["old", "new"] {
            store.commit_release(&row(id, 0), None, &[]).unwrap();
        }
        store
            .conn()
            .execute(
                "UPDATE released SET released_at = 1000 WHERE request_id = 'old'",
                [],
            )
            .unwrap();
        let (rid, lid) = (
            |s: &str| RequestId::new(s).unwrap(),
            |s: &str| LeaseId::new(s).unwrap(),
        );
        assert_eq!(store.forget_released(2000).unwrap(), 1);
        assert_eq!(store.released_request(&rid("old")).unwrap(), None);
        assert!(!store
            .released_lease(&lid(&format!("{:016x}", b'o')))
            .unwrap());
        let new = format!("{:016x}", b'n');
        assert_eq!(
            store.released_request(&rid("new")).unwrap(),
            Some(new.clone())
        );
        assert!(store.released_lease(&lid(&new)).unwrap());
        // Separate namespaces: a lease id is not a request id, nor the reverse.
        assert_eq!(store.released_request(&rid(&new)).unwrap(), None);
        assert_eq!(store.forget_released(2000).unwrap(), 0);
    }

    /// Pages of unleased VFs, walked with each page's last address, list every
    /// free VF once, by address; PF and NUMA filters and leases honoured.
    #[test]
    fn unleased_vfs_pages_list_each_free_vf_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db")).unwrap();
        let dev = |address: &str, pf: &str, numa_node: i32| DeviceInfo {
            address: address.into(),
            id: "1ed5:0324".into(),
            pf: pf.into(),
            driver: String::new(),
            iommu_group: -1,
            numa_node,
            health: "ok".into(),
            lease_id: String::new(),
            vm_name: String::new(),
            provisions: 0,
            errors: 0,
        };
        let (a, b, c) = ("0000:01:00.0", "0000:02:00.0", "0000:03:00.0");
        let mut seen = vec![dev(a, "", 0), dev(b, "", 0), dev(c, "", 1)];
        // More than a page in all.
        for (pf, bus) in [(a, 1), (b, 2), (c, 3)] {
            for f in 1..=7 {
                seen.push(dev(&format!("0000:0{bus}:00.{f}"), pf, (bus == 3) as i32));
            }
        }
        store.sync_devices(&seen).unwrap();
        let lease = LeaseRow {
            id: "lease-1".into(),
            owner: 0,
            request: Request {
                request_id: "r1".into(),
                ..Request::default()
            },
            devices: vec![Held::Function {
                address: "0000:03:00.2".parse().unwrap(),
                driver_before: String::new(),
            }],
            created_at: 0,
        };
        let intent = store
            .begin_intent("provision", "lease-1", "{}", Guards::Kernel)
            .unwrap();
        store.commit_lease(&lease, intent, &[]).unwrap();
        let walk = |numa: i32, pf: Option<&str>| {
            let (mut all, mut after) = (Vec::<String>::new(), String::new());
            loop {
                let page = store.unleased_vfs(numa, pf, &after).unwrap();
                all.extend(page.iter().map(|(a, _)| a.clone()));
                match page.last() {
                    Some((a, _)) if page.len() == PAGE => after = a.clone(),
                    _ => return all,
                }
            }
        };
        let vfs = |bus: &[u8]| -> Vec<String> {
            let all = bus
                .iter()
                .flat_map(|b| (1..=7).map(move |f| format!("0000:0{b}:00.{f}")));
            all.filter(|a| a != "0000:03:00.2").collect()
        };
        assert_eq!(walk(-1, None), vfs(&[1, 2, 3]));
        assert_eq!(walk(1, None), vfs(&[3]));
        assert_eq!(walk(-1, Some(b)), vfs(&[2]));
        assert_eq!(walk(1, Some(b)), Vec::<String>::new());
    }

    #[test]
    fn a_table_with_kind_markers_reads_back_as_kinds() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let (u, vf) = ("83b8f4f2-509f-382f-3c1e-e6bfe0fa1001", "0000:af:00.4");
        {
            let store = Store::open(&path).unwrap();
            let lease = LeaseRow {
                id: "00000000000000aa".into(),
                owner: 0,
                request: Request::default(),
                devices: vec![],
                created_at: 1,
            };
            store.commit_lease(&lease, 0, &[]).unwrap();
            // The layout before the kind had a column: markers in driver_before.
            store
                .conn()
                .execute_batch(&format!(
                    "ALTER TABLE lease_devices DROP COLUMN kind;
                     INSERT INTO lease_devices VALUES ('{u}', '00000000000000aa', '@mdev-kept');
                     INSERT INTO lease_devices VALUES ('{vf}', '00000000000000aa', '@vgpu');
                     INSERT INTO lease_devices VALUES ('0000:01:10.0', '00000000000000aa', 'igbvf');"
                ))
                .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let devices = store.leases().unwrap().remove(0).devices;
        assert_eq!(
            devices,
            vec![
                Held::Function {
                    address: "0000:01:10.0".parse().unwrap(),
                    driver_before: "igbvf".into()
                },
                Held::Vgpu(vf.parse().unwrap()),
                Held::KeptMdev(u.parse().unwrap()),
            ]
        );
    }
}
