//! The health service: each managed function's state (healthy, degraded, failed,
//! quarantined, gone) with its reason, from the table (failures, quarantine,
//! vanished functions) and the kernel (AER counters); and an operator's quarantine
//! and clear. The gate refuses failed and quarantined devices to every caller.

use std::collections::BTreeMap;

use mediated_dev::host::mdev_exists;
use vf_provisioner::health::{aer, probe, Aer};
use vf_provisioner::PciAddress;

use super::{device_name, failed, Health};
use crate::api::ids::{parse_uuid, quote};
use crate::api::{ApiError, HealthInfo};

/// The longest reason an operator may give.
const MAX_REASON: usize = 256;

impl Health<'_> {
    /// Every managed function, then every held-back device the table lists that is
    /// not one (an mdev); each state since when it was entered.
    pub fn list(&self) -> Result<Vec<HealthInfo>, ApiError> {
        let seen = self
            .announced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        self.list_dated(&seen)
    }

    fn list_undated(&self) -> Result<Vec<HealthInfo>, ApiError> {
        let held = self.store().quarantine_list().map_err(failed)?;
        let mut out = Vec::new();
        for d in self.devices()? {
            let a: Option<PciAddress> = d.address.parse().ok();
            let counts = a.map(|a| aer(&self.sys, &a)).unwrap_or_default();
            // The table's health says failed, quarantined or missing; the
            // quarantine list says why and since when.
            let hold = held.iter().find(|(n, ..)| *n == d.address);
            let recovering = self.recovering().get(&d.address).cloned();
            let (state, reason, since) = match (d.health.as_str(), hold) {
                ("failed", Some((_, why, since))) => ("failed", why.clone(), *since),
                (_, Some((_, why, since))) => ("quarantined", why.clone(), *since),
                ("missing", None) => ("gone", "it is gone from sysfs".into(), 0),
                (_, None) if recovering.is_some() => {
                    ("degraded", recovering.unwrap_or_default(), 0)
                }
                (_, None) => self.by_errors(self.per_hour(&d.address, counts.correctable)),
            };
            out.push(info(&d.address, state, reason, since, counts));
        }
        for (name, why, since) in held {
            if !out.iter().any(|i| i.name == name) {
                out.push(info(&name, "quarantined", why, since, Aer::default()));
            }
        }
        Ok(out)
    }

    /// The devices whose state changed since the last call, as they are now: each
    /// change audited (`health`, with the reason). A state without a time of its
    /// own (degraded, healthy again, gone) is dated by the change.
    pub fn transitions(&self) -> Result<Vec<HealthInfo>, ApiError> {
        let now = crate::daemon::store::now();
        let mut changed = Vec::new();
        let mut seen = self.announced.lock().unwrap_or_else(|e| e.into_inner());
        let list = self.list_dated(&seen)?;
        for i in list.iter() {
            let before = seen
                .get(&i.name)
                .map_or("healthy".into(), |(s, _)| s.clone());
            if before == i.state {
                continue;
            }
            let since = if i.since > 0 { i.since } else { now };
            seen.insert(i.name.clone(), (i.state.clone(), since));
            let what = match i.reason.as_str() {
                "" => format!("{before} -> {}", i.state),
                why => format!("{before} -> {}: {why}", i.state),
            };
            self.audit
                .record(0, "health", "", "", std::slice::from_ref(&i.name), &what);
            changed.push(HealthInfo { since, ..i.clone() });
        }
        let before = seen.len();
        seen.retain(|name, _| list.iter().any(|i| i.name == *name));
        if !changed.is_empty() || seen.len() != before {
            self.store().set_health_seen(&seen).map_err(failed)?;
        }
        Ok(changed)
    }

    /// At start-up: the states announced before the restart, and the last hour's
    /// error counts, as the table kept them; a device the table has no announced
    /// state for takes its state now as announced (one held back was announced
    /// when it happened).
    pub fn prime(&self) {
        let now = crate::daemon::store::now();
        let store = self.store();
        let mut counts = self.aer_seen.lock().unwrap_or_else(|e| e.into_inner());
        for (name, at, count) in store.aer_samples().unwrap_or_default() {
            counts.entry(name).or_default().push_back((at, count));
        }
        drop(counts);
        let kept = store.health_seen().unwrap_or_default();
        let mut seen = self.announced.lock().unwrap_or_else(|e| e.into_inner());
        for i in self.list_undated().unwrap_or_default() {
            let since = if i.since > 0 { i.since } else { now };
            let before = kept.get(&i.name).cloned();
            seen.insert(i.name, before.unwrap_or((i.state, since)));
        }
    }

    /// [`Health::list`], each state without a time of its own dated by its
    /// announcement.
    fn list_dated(
        &self,
        seen: &BTreeMap<String, (String, u64)>,
    ) -> Result<Vec<HealthInfo>, ApiError> {
        let mut list = self.list_undated()?;
        for i in list.iter_mut().filter(|i| i.since == 0) {
            if let Some((_, since)) = seen.get(&i.name).filter(|(s, _)| *s == i.state) {
                i.since = *since;
            }
        }
        Ok(list)
    }

    fn recovering(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.recovering.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Follows the kernel's PCIe error recovery (its `change` uevents, kernel rule
    /// 12, docs/kernel.md) for function `name`: degraded while it runs, failed (held
    /// back) when it fails, as before when it succeeds. A failure reported for a
    /// bridge (6.12 reports it for the function) fails every function of ours below
    /// it. `DEVICE_ONLINE` says nothing more: the kernel sends 0 with BEGIN_RECOVERY
    /// too.
    pub fn on_error_event(&self, name: &str, event: &str) {
        let Ok(a) = name.parse::<PciAddress>() else {
            return;
        };
        let name = a.to_string();
        eprintln!("vfio-manager: {name}: the kernel's PCIe error recovery: {event}");
        match event {
            "FAILED_RECOVERY" => {
                for f in self.at_or_below(&name) {
                    self.recovering().remove(&f);
                    let why = match f == name {
                        true => format!("the kernel's PCIe error recovery ended in {event}"),
                        false => format!(
                            "the kernel's PCIe error recovery below {name} ended in {event}"
                        ),
                    };
                    self.mark_failed(&f, &why);
                }
            }
            "SUCCESSFUL_RECOVERY" => {
                self.recovering().remove(&name);
            }
            "BEGIN_RECOVERY" if self.device(&name).is_some() => {
                let why = format!("PCIe error recovery in progress ({event})");
                self.recovering().insert(name, why);
            }
            _ => {}
        }
    }

    /// The functions we manage that are `name` or sit below it (it is a bridge
    /// above them in sysfs's device tree).
    fn at_or_below(&self, name: &str) -> Vec<String> {
        let devices = self.devices().unwrap_or_default();
        devices
            .into_iter()
            .filter(|d| d.health != "missing")
            .map(|d| d.address)
            .filter(|d| {
                let Ok(a) = d.parse::<PciAddress>() else {
                    return false;
                };
                let path = std::fs::canonicalize(self.sys.device_dir(&a)).unwrap_or_default();
                d == name || path.components().any(|c| c.as_os_str() == name)
            })
            .collect()
    }

    /// Reads every managed function's configuration space; one that answers all
    /// ones (or cannot be read) has failed and is held back. Returns how many
    /// failed now.
    pub fn probe_all(&self) -> Result<usize, ApiError> {
        let mut failed_now = 0;
        for d in self.devices()? {
            // Gone, or already held back (the table's health says so).
            if d.health != "ok" {
                continue;
            }
            let Ok(a) = d.address.parse::<PciAddress>() else {
                continue;
            };
            self.per_hour(&d.address, aer(&self.sys, &a).correctable);
            if let Err(why) = probe(&self.sys, &a) {
                self.mark_failed(&d.address, &format!("its probe failed: {why}"));
                failed_now += 1;
            }
        }
        Ok(failed_now)
    }

    /// Records `count` correctable errors of `name` now and returns how many it
    /// had in the last hour (since the daemon first looked, if that is later).
    fn per_hour(&self, name: &str, count: u64) -> u64 {
        const HOUR: u64 = 3600;
        // Samples kept within an hour; more are thinned out after the oldest.
        const MOST: usize = 720;
        let now = crate::daemon::store::now();
        let mut seen = self.aer_seen.lock().unwrap_or_else(|e| e.into_inner());
        let samples = seen.entry(name.to_string()).or_default();
        // A count below the last one: the counters started again (a host reboot).
        if samples.back().is_some_and(|(_, c)| count < *c) {
            samples.clear();
        }
        let last = samples.back().map(|(_, c)| *c);
        // A sample per 10 s at most, however often `Health` is called, and one at
        // each change of the count, which is kept across a restart.
        if last.is_none_or(|c| c != count) || samples.back().is_some_and(|(t, _)| now >= t + 10) {
            samples.push_back((now, count));
        }
        while samples.len() > 1 && samples[1].0 + HOUR <= now {
            samples.pop_front();
        }
        if samples.len() > MOST {
            samples.remove(1);
        }
        if last.is_some_and(|c| c != count) {
            // Only where the count changed: the rate is the same from those alone.
            let changes: Vec<(u64, u64)> = samples
                .iter()
                .enumerate()
                .filter(|(i, (_, c))| *i == 0 || samples[i - 1].1 != *c)
                .map(|(_, s)| *s)
                .collect();
            if let Err(e) = self.store().set_aer_samples(name, &changes) {
                eprintln!("vfio-manager: {name}: cannot keep its error counts: {e}");
            }
        }
        count.saturating_sub(samples[0].1)
    }

    /// Healthy or degraded, by the rate of correctable errors:
    /// `degraded_correctable_per_hour` in an hour. An uncorrectable one is the
    /// kernel's to recover from, and its verdict is the state (`on_error_event`):
    /// degraded while it recovers, failed if it could not, healthy if it did.
    fn by_errors(&self, per_hour: u64) -> (&'static str, String, u64) {
        let limit = self.config().daemon.degraded_correctable_per_hour;
        if per_hour >= limit {
            let why = format!(
                "{per_hour} correctable PCIe errors in the last hour (degraded_correctable_per_hour = {limit})"
            );
            ("degraded", why, 0)
        } else {
            ("healthy", String::new(), 0)
        }
    }

    /// Holds a device back with the operator's reason: the gate then offers it to
    /// nobody. A leased device keeps its lease; it is held back from its release on.
    pub fn quarantine(&self, name: &str, reason: &str, uid: u32) -> Result<(), ApiError> {
        self.audited_as_given(
            "quarantine",
            uid,
            name,
            self.quarantine_checked(name, reason),
        )
    }

    fn quarantine_checked(&self, name: &str, reason: &str) -> Result<(), ApiError> {
        let name = self.known(name)?;
        let why = operator_reason(&name, reason)?;
        match self.store().quarantine(&name, &why).map_err(failed)? {
            true => Ok(()),
            false => Err(ApiError::Refused(format!(
                "{name} is already held back; `vfctl health` says why"
            ))),
        }
    }

    /// Ends a device's quarantine or failure after probing it again: a function
    /// whose configuration space still does not answer stays held back.
    pub fn clear(&self, name: &str, uid: u32) -> Result<(), ApiError> {
        self.audited_as_given("clear", uid, name, self.clear_checked(name))
    }

    /// [`Core::audited`] of `name` as given: escaped and bounded when it is not a
    /// device name.
    fn audited_as_given(
        &self,
        op: &str,
        uid: u32,
        name: &str,
        r: Result<(), ApiError>,
    ) -> Result<(), ApiError> {
        let shown = device_name(name).unwrap_or_else(|_| quote(name));
        self.audited(op, uid, &shown, r)
    }

    fn clear_checked(&self, name: &str) -> Result<(), ApiError> {
        let name = self.known(name)?;
        if self.store().quarantined(&name).map_err(failed)?.is_none() {
            return Err(ApiError::NotFound(format!(
                "{name} is not held back; `vfctl health` lists the devices that are"
            )));
        }
        if let Ok(a) = name.parse::<PciAddress>() {
            probe(&self.sys, &a).map_err(|why| {
                ApiError::Refused(format!(
                    "{name}: it still fails its probe: {why}; it stays held back (reset its slot, or remove it)"
                ))
            })?;
        }
        self.store().unquarantine(&name).map_err(failed).map(drop)
    }

    /// `name` in the table's form, if it names a function we manage or an mdev
    /// that exists or is held back.
    fn known(&self, name: &str) -> Result<String, ApiError> {
        let name = device_name(name)?;
        let managed = self.devices()?.iter().any(|d| d.address == name);
        let mdev = parse_uuid(&name).is_ok_and(|u| mdev_exists(&self.sys, &u));
        let held = self.store().quarantined(&name).map_err(failed)?.is_some();
        if managed || mdev || held {
            return Ok(name);
        }
        Err(ApiError::NotFound(format!(
            "{name}: not a device this daemon manages; `vfctl list` and `vfctl mdev list` show them"
        )))
    }
}

/// An operator's reason for holding device `name` back, checked: 1 to
/// [`MAX_REASON`] bytes without control characters.
pub fn operator_reason(name: &str, reason: &str) -> Result<String, ApiError> {
    if reason.is_empty() || reason.len() > MAX_REASON || reason.chars().any(char::is_control) {
        return Err(ApiError::BadInput(format!(
            "{}: reason \"{}\": give 1 to {MAX_REASON} bytes of text without control characters",
            quote(name),
            quote(reason)
        )));
    }
    Ok(format!("by an operator: {reason}"))
}

fn info(name: &str, state: &str, reason: String, since: u64, c: Aer) -> HealthInfo {
    HealthInfo {
        name: name.to_string(),
        state: state.to_string(),
        reason,
        since,
        aer_correctable: c.correctable,
        aer_nonfatal: c.nonfatal,
        aer_fatal: c.fatal,
    }
}
