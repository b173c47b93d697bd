//! How leased devices are used, as the guests' agents (vm-agent) tell it, and what
//! follows: alerts with hysteresis, and idle leases' devices reclaimed.
//!
//! Trust: a connection's lease is known by its channel alone (`AgentChannel`: the
//! vsock CID, the socket), never by what the guest says. A guest's samples reach
//! only its own lease's devices: each host device is paired with the guest device
//! of the same PCI id, in address order (libvirt and cloud-hypervisor give a
//! VM's devices guest addresses in the order of its XML or arguments); a sample for
//! any other guest address is ignored. Rates are computed on the host's clock.
//!
//! Reclaiming (`on_idle = unplug`) is, like a swap, written as an intent first:
//! 1. the transport has asked the agent to let go (its driver unbound);
//! 2. the `reclaim` intent;
//! 3. the VMM unplugs the device (libvirt, cloud-hypervisor), and closes it (the
//!    return waits up to 10 s for no process to hold its group open);
//! 4. the device is reset and returned to the host, and the lease records it as a
//!    swap with no replacement (`vfctl swaps`), in one transaction.
//!
//! A crash between 2 and 4 is settled at start: if the VM still holds the device's
//! group open, the reclaim is dropped (the lease keeps it); else it is finished.

use std::collections::BTreeMap;

use mediated_dev::host::read_mdev;
use vf_provisioner::Op;
use vm_agent::protocol::{GuestDevice, Usage as Sample};

use super::{addrs_of, failed, Usage};
use crate::api::ids::{AgentChannel, Held, LeaseId, OnIdle, Priority, Vmm};
use crate::api::{AgentInfo, ApiError, UsageInfo};
use crate::daemon::store::{Guards, Intent, LeaseRow, UsageMinute};
use crate::vmm::reach;

/// What the daemon knows of one lease's agent.
#[derive(Debug, Clone, Default)]
pub struct Agent {
    pub lease: String,
    pub vm: String,
    pub channel: String,
    pub connected: bool,
    /// The agent's own words (`vm-agent 0.1.0`) and the guest kernel.
    pub agent: String,
    pub kernel: String,
    pub since: u64,
    pub last_heartbeat: u64,
    /// What the guest lists, as it said it.
    pub guest: Vec<GuestDevice>,
    /// Each host device of the lease, and the guest address paired with it.
    pub pairs: BTreeMap<String, String>,
    /// Each paired host device's PF (placement's pressure), and the lease's idle
    /// policy: read once per pairing, not per sample.
    pf_of: BTreeMap<String, String>,
    on_idle: Option<OnIdle>,
    /// The lease's devices changed (a swap, a reclaim): paired again at the next
    /// sample.
    stale: bool,
    pub devices: BTreeMap<String, DeviceUsage>,
    /// Since when every device has been below the idle threshold.
    idle_since: Option<f64>,
    idle_told: bool,
    /// Idle with `release-on-stop`: the lease ends when the VM stops.
    pub release_on_stop: bool,
}

/// One leased device's usage now.
#[derive(Debug, Clone, Default)]
pub struct DeviceUsage {
    pub source: String,
    pub busy: Option<f64>,
    pub memory: Option<f64>,
    pub temperature: Option<f64>,
    /// When the last sample came (seconds since the epoch).
    pub at: u64,
    last_bytes: Option<(f64, u64)>,
    busy_above_since: Option<f64>,
    /// Each metric's raised level (`busy` → `high`).
    alerts: BTreeMap<&'static str, &'static str>,
    /// The minute being gathered: (its start, sum, max, samples).
    minute: Option<(u64, f64, f64, u32)>,
}

/// What a sample set off.
#[derive(Debug, Clone, PartialEq)]
pub enum UsageEvent {
    /// A threshold crossed: `level` is `ok` when an alert clears.
    Alert {
        lease: String,
        vm: String,
        device: String,
        metric: &'static str,
        level: &'static str,
        value: f64,
    },
    /// Every device of the lease idle past the threshold; `action` is the
    /// lease's policy.
    Idle {
        lease: String,
        vm: String,
        devices: Vec<String>,
        action: OnIdle,
    },
}

/// A `reclaim` intent's body.
#[derive(serde::Serialize, serde::Deserialize)]
struct ReclaimIntent {
    device: String,
    kind: String,
    driver_before: String,
}

impl Usage<'_> {
    /// The lease (id, VM) whose agent speaks on `channel`.
    pub fn lease_of(&self, channel: &AgentChannel) -> Option<(String, String)> {
        let rows = self.store().leases().ok()?;
        rows.into_iter()
            .find(|r| r.request.agent.parse::<AgentChannel>().ok().as_ref() == Some(channel))
            .map(|r| (r.id, r.request.vm_name))
    }

    /// Every lease's agent channel (the transport listens on, or connects to, the
    /// Unix ones).
    pub fn channels(&self) -> Vec<AgentChannel> {
        let rows = self.store().leases().unwrap_or_default();
        let mut out: Vec<AgentChannel> = rows
            .iter()
            .filter_map(|r| r.request.agent.parse().ok())
            .filter(|c| *c != AgentChannel::None)
            .collect();
        out.sort();
        out.dedup();
        out
    }

    fn row(&self, lease: &str) -> Option<LeaseRow> {
        let id = LeaseId::new(lease).ok()?;
        self.store().lease(&id).ok().flatten()
    }

    fn agents_mut(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Agent>> {
        self.agents.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An agent's hello: who it is and what the guest sees. Returns each of the
    /// lease's devices the guest has, for the log: `HOST as GUEST (DRIVER)`.
    pub fn hello(
        &self,
        lease: &str,
        channel: &AgentChannel,
        agent: &str,
        kernel: &str,
        guest: Vec<GuestDevice>,
    ) -> Vec<String> {
        let row = self.row(lease);
        let pairs = row
            .as_ref()
            .map_or_else(BTreeMap::new, |r| self.pair(r, &guest));
        let seen = pairs
            .iter()
            .map(|(h, g)| {
                let driver = guest
                    .iter()
                    .find(|d| &d.address == g)
                    .map(|d| d.driver.as_str());
                format!(
                    "{h} as {g} ({})",
                    driver.filter(|d| !d.is_empty()).unwrap_or("no driver")
                )
            })
            .collect();
        let pf_of = self.pfs_of(&pairs);
        let on_idle = row
            .as_ref()
            .map(|r| self.config().usage.on_idle(&r.request));
        let now = crate::daemon::store::now();
        let mut agents = self.agents_mut();
        let a = agents.entry(lease.to_string()).or_default();
        *a = Agent {
            lease: lease.to_string(),
            vm: row.map(|r| r.request.vm_name).unwrap_or_default(),
            channel: channel.to_string(),
            connected: true,
            agent: agent.to_string(),
            kernel: kernel.to_string(),
            since: now,
            last_heartbeat: now,
            guest,
            pairs,
            pf_of,
            on_idle,
            ..Agent::default()
        };
        seen
    }

    fn pfs_of(&self, pairs: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        pairs
            .keys()
            .filter_map(|h| Some((h.clone(), self.pressure_key(h)?)))
            .collect()
    }

    /// Lease `lease`'s devices changed: its agent's pairs are made again from its
    /// hello at the next sample (a device the guest did not list then is paired
    /// once the agent says hello again).
    pub fn lease_changed(&self, lease: &str) {
        if let Some(a) = self.agents_mut().get_mut(lease) {
            a.stale = true;
        }
    }

    /// Pairs `lease`'s agent again if its lease changed.
    fn repair(&self, lease: &str) {
        let guest = match self.agents_mut().get(lease) {
            Some(a) if a.stale => a.guest.clone(),
            _ => return,
        };
        let pairs = self
            .row(lease)
            .map(|r| self.pair(&r, &guest))
            .unwrap_or_default();
        let pf_of = self.pfs_of(&pairs);
        if let Some(a) = self.agents_mut().get_mut(lease) {
            a.devices.retain(|h, _| pairs.contains_key(h));
            a.pairs = pairs;
            a.pf_of = pf_of;
            a.stale = false;
        }
    }

    /// Each host device of `row` with the guest device of the same PCI id, both
    /// in address order.
    fn pair(&self, row: &LeaseRow, guest: &[GuestDevice]) -> BTreeMap<String, String> {
        let mut taken = vec![false; guest.len()];
        let mut out = BTreeMap::new();
        for held in &row.devices {
            let Some(id) = self.guest_id(held) else {
                continue;
            };
            if let Some(i) = (0..guest.len()).find(|&i| !taken[i] && guest[i].id == id) {
                taken[i] = true;
                out.insert(held.name(), guest[i].address.clone());
            }
        }
        out
    }

    /// The PCI id a guest sees for `held`: a function's own; an mdev's parent's
    /// when the parent is a PCI function (a vGPU shows its GPU's id). An mdev of a
    /// virtual parent (`mtty`) has none to pair by.
    fn guest_id(&self, held: &Held) -> Option<String> {
        let a = match (held.pci(), held.mdev()) {
            (Some(a), _) => a,
            (_, Some(u)) => read_mdev(&self.sys, &u)?.parent.as_str().parse().ok()?,
            _ => return None,
        };
        let f = vf_provisioner::PciFunction::read_ids(&self.sys, &a)?;
        Some(f.id)
    }

    /// Where `device`'s pressure counts: a VF's PF, an mdev's parent.
    pub(super) fn pressure_key(&self, device: &str) -> Option<String> {
        match device.parse::<uuid::Uuid>() {
            Ok(u) => Some(read_mdev(&self.sys, &u)?.parent.to_string()),
            Err(_) => Some(self.device(device)?.pf).filter(|pf| !pf.is_empty()),
        }
    }

    pub fn heartbeat(&self, lease: &str) {
        if let Some(a) = self.agents_mut().get_mut(lease) {
            a.last_heartbeat = crate::daemon::store::now();
        }
    }

    /// The agent's connection ended; what it said stays, marked not connected.
    /// True when the lease is to end if its VM stopped (`release_if_stopped`).
    pub fn lost(&self, lease: &str) -> bool {
        let mut agents = self.agents_mut();
        let Some(a) = agents.get_mut(lease) else {
            return false;
        };
        a.connected = false;
        a.release_on_stop
    }

    /// Marks an idle lease to end when its VM stops.
    pub fn release_on_stop(&self, lease: &str) {
        if let Some(a) = self.agents_mut().get_mut(lease) {
            a.release_on_stop = true;
        }
    }

    /// Releases idle `lease` (`release-on-stop`) if no process holds any of its
    /// devices open: its VM stopped. An agent that merely restarted leaves it be.
    pub fn release_if_stopped(&self, lease: &str) -> Option<String> {
        let row = self.row(lease)?;
        if row.devices.iter().any(|h| self.held_open(h)) {
            return None;
        }
        let id = LeaseId::new(lease).ok()?;
        let r = self.pool().release(&super::LeaseRef::Lease(id), 0);
        Some(format!(
            "lease {lease} of VM {} was idle and its VM stopped (release-on-stop): {}",
            row.request.vm_name,
            super::verdict(&r)
        ))
    }

    /// Forgets the agents of leases that are gone (released).
    pub fn forget_released(&self) {
        let live: Vec<String> = self
            .store()
            .leases()
            .unwrap_or_default()
            .into_iter()
            .map(|r| r.id)
            .collect();
        self.agents_mut().retain(|l, _| live.contains(l));
    }

    pub fn agents(&self) -> Vec<Agent> {
        self.agents_mut().values().cloned().collect()
    }

    /// The agents as `ListAgents` shows them.
    pub fn agent_infos(&self) -> Vec<AgentInfo> {
        self.agents()
            .into_iter()
            .map(|a| AgentInfo {
                devices: a.pairs.iter().map(|(h, g)| format!("{h}={g}")).collect(),
                lease_id: a.lease,
                vm_name: a.vm,
                channel: a.channel,
                connected: a.connected,
                agent: a.agent,
                kernel: a.kernel,
                since: a.since,
                last_heartbeat: a.last_heartbeat,
            })
            .collect()
    }

    /// Each leased device's latest sample (`UsageNow`).
    pub fn now(&self) -> Vec<UsageInfo> {
        let nan = |v: Option<f64>| v.unwrap_or(f64::NAN);
        let mut out = Vec::new();
        for a in self.agents_mut().values() {
            for (dev, d) in &a.devices {
                out.push(UsageInfo {
                    lease_id: a.lease.clone(),
                    vm_name: a.vm.clone(),
                    device: dev.clone(),
                    source: d.source.clone(),
                    busy_percent: nan(d.busy),
                    memory_percent: nan(d.memory),
                    temperature_c: nan(d.temperature),
                    at: d.at,
                });
            }
        }
        out
    }

    /// The guest address paired with host device `device` of `lease`.
    pub fn guest_address(&self, lease: &str, device: &str) -> Option<String> {
        self.agents_mut().get(lease)?.pairs.get(device).cloned()
    }

    /// Takes a usage message of `lease`'s agent at `now` (seconds since the epoch,
    /// the host's clock): updates each paired device, writes finished minutes to
    /// the table, and returns the alerts and the idle verdict it sets off.
    pub fn sample(&self, lease: &str, samples: &[Sample], now: f64) -> Vec<UsageEvent> {
        let cfg = &self.config().usage;
        self.repair(lease);
        let mut events = Vec::new();
        let mut minutes = Vec::new();
        {
            let mut agents = self.agents_mut();
            let Some(a) = agents.get_mut(lease) else {
                return events;
            };
            let by_guest: BTreeMap<&str, &str> = a
                .pairs
                .iter()
                .map(|(h, g)| (g.as_str(), h.as_str()))
                .collect();
            for s in samples {
                let Some(host) = by_guest.get(s.address.as_str()).map(|h| h.to_string()) else {
                    continue;
                };
                let d = a.devices.entry(host.clone()).or_default();
                let busy = busy_of(d, s, now, cfg.net_full_bytes_per_s);
                d.source = s.source.clone();
                d.busy = busy;
                d.memory = s.memory_percent.map(f64::from);
                d.temperature = s.temperature_c.map(f64::from);
                d.at = now as u64;
                if let Some(m) = gather(d, now, lease, &host) {
                    minutes.push(m);
                }
                for (metric, level, value) in alerts(d, now, cfg) {
                    events.push(UsageEvent::Alert {
                        lease: lease.to_string(),
                        vm: a.vm.clone(),
                        device: host.clone(),
                        metric,
                        level,
                        value,
                    });
                }
            }
            if let Some(action) = a.on_idle {
                events.extend(idle(a, now, cfg, action));
            }
        }
        self.placement().observe(&self.pf_means(), now);
        for m in minutes {
            if let Err(e) =
                self.store()
                    .add_usage(&m, cfg.minutes_kept_h * 3600, cfg.hours_kept_d * 86_400)
            {
                eprintln!("vfio-manager: {}: cannot record its usage: {e}", m.device);
            }
        }
        events
    }

    /// Each PF's mean busy share over its leased VFs that report one.
    fn pf_means(&self) -> BTreeMap<String, f64> {
        let mut sums: BTreeMap<String, (f64, u32)> = BTreeMap::new();
        for a in self.agents_mut().values() {
            for (dev, u) in &a.devices {
                if let (Some(pf), Some(b)) = (a.pf_of.get(dev), u.busy) {
                    let e = sums.entry(pf.clone()).or_default();
                    *e = (e.0 + b, e.1 + 1);
                }
            }
        }
        sums.into_iter()
            .map(|(pf, (s, n))| (pf, s / f64::from(n)))
            .collect()
    }

    /// The devices of connected leases of `priority` whose devices are all idle
    /// now (below `idle_below_percent`), as (lease, device).
    pub fn idle_devices(&self, priority: Priority) -> Vec<(String, String)> {
        let rows = self.store().leases().unwrap_or_default();
        let agents = self.agents_mut();
        rows.into_iter()
            .filter(|r| r.request.priority.parse::<Priority>().ok() == Some(priority))
            .filter(|r| {
                agents
                    .get(&r.id)
                    .is_some_and(|a| a.connected && a.idle_since.is_some())
            })
            .flat_map(|r| {
                let id = r.id.clone();
                r.devices.into_iter().map(move |h| (id.clone(), h.name()))
            })
            .collect()
    }

    /// A device's series: minute (`span` 60) or hour (3600) averages since `since`.
    pub fn history(
        &self,
        device: &str,
        span: u64,
        since: u64,
    ) -> Result<Vec<(u64, f64, f64)>, ApiError> {
        self.store().usage(device, span, since).map_err(failed)
    }

    /// Takes idle device `device` out of lease `lease` (the agent has let go): the
    /// VMM unplugs it, then it is reset and returned to the host, and the lease
    /// records it. Steps 2-4 of the module's list.
    pub fn reclaim(&self, lease: &str, device: &str, why: &str) -> Result<String, ApiError> {
        let r = self.timed("reclaim", || {
            let _shared = self.shared();
            self.reclaim_shared(lease, device, why)
        });
        let vm = self
            .agents_mut()
            .get(lease)
            .map(|a| a.vm.clone())
            .unwrap_or_default();
        self.audit.record(
            0,
            "reclaim",
            lease,
            &vm,
            &[device.to_string()],
            &super::verdict(&r),
        );
        r
    }

    fn reclaim_shared(&self, lease: &str, device: &str, why: &str) -> Result<String, ApiError> {
        let _claim = self.claims.wait(vec![device.to_string()]);
        let row = self
            .row(lease)
            .ok_or_else(|| ApiError::NotFound(format!("no lease {lease}")))?;
        let held = row
            .devices
            .iter()
            .find(|h| h.name() == device)
            .cloned()
            .ok_or_else(|| {
                ApiError::NotFound(format!("{device} is not in lease {lease} any more"))
            })?;
        let vmm: Vmm = row.request.vmm.parse().unwrap_or(Vmm::Other);
        let Some(hands) = reach(&vmm, &row.request.vm_name, &self.config().recovery) else {
            return Err(ApiError::Refused(format!(
                "{device} of lease {lease} (VM {}) is idle, but the lease names no VMM to unplug it from; give the request a vmm (libvirt, ch:SOCKET)",
                row.request.vm_name
            )));
        };
        let (name, kind, before) = held.to_row();
        let body = serde_json::to_string(&ReclaimIntent {
            device: name,
            kind: kind.to_string(),
            driver_before: before,
        })
        .expect("serializes");
        let intent = self
            .store()
            .begin_intent("reclaim", lease, &body, Guards::Kernel)
            .map_err(failed)?;
        let refused = |e: ApiError| {
            let _ = self.store().end_intent(intent);
            e
        };
        hands.unplug(&self.held_view(&held)).map_err(|e| {
            refused(ApiError::Failed(format!(
                "{device} of lease {lease}: {} could not unplug it: {e}; the VM keeps it",
                hands.name()
            )))
        })?;
        // The VMM closes the device after it answers: the return waits for that.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.held_open(&held) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        self.gate_held(Op::Return, &held).map_err(|r| {
            refused(ApiError::Refused(format!(
                "lease {lease}: {} unplugged it, but {r}; the lease keeps it until released",
                hands.name()
            )))
        })?;
        self.finish_reclaim(&row, &held, why, intent)?;
        Ok(format!(
            "{} unplugged {device}; it is back in the pool",
            hands.name()
        ))
    }

    /// Step 4: the device reset and returned, and the lease's record.
    fn finish_reclaim(
        &self,
        row: &LeaseRow,
        held: &Held,
        why: &str,
        intent: i64,
    ) -> Result<(), ApiError> {
        let one = LeaseRow {
            devices: vec![held.clone()],
            ..row.clone()
        };
        self.return_all(&one);
        let drivers = self.drivers_now(&addrs_of(&one));
        let reason = format!("reclaimed from lease {}: {why}", row.id);
        self.store()
            .commit_reclaim(&row.id, &held.name(), &reason, intent, &drivers)
            .map_err(failed)?;
        self.lease_changed(&row.id);
        Ok(())
    }

    /// Settles a reclaim a crash cut off (the module's note).
    pub fn settle(&self, i: &Intent) -> String {
        let parsed = serde_json::from_str::<ReclaimIntent>(&i.body)
            .ok()
            .and_then(|r| Held::from_row(&r.device, &r.kind, &r.driver_before).ok());
        let row = self.row(&i.lease_id);
        let (Some(held), Some(row)) = (parsed, row) else {
            let _ = self.store().end_intent(i.id);
            return format!(
                "usage: a reclaim in lease {} was cut off; its lease or record is gone",
                i.lease_id
            );
        };
        if self.held_open(&held) {
            let _ = self.store().end_intent(i.id);
            return format!(
                "usage: the reclaim of {} from lease {} was cut off before the VM let go; the lease keeps it",
                held.name(),
                i.lease_id
            );
        }
        match self.finish_reclaim(&row, &held, "idle (finished at start)", i.id) {
            Ok(()) => format!(
                "usage: the reclaim of {} from lease {} was cut off after the VM let go; finished",
                held.name(),
                i.lease_id
            ),
            Err(e) => format!("usage: finishing the reclaim of {}: {e}", held.name()),
        }
    }
}

/// A sample's busy share: the source's own, else (a NIC) its byte rate since the
/// last sample over `full` bytes a second. A counter that went back (the guest
/// rebooted, or lies) starts again.
fn busy_of(d: &mut DeviceUsage, s: &Sample, now: f64, full: u64) -> Option<f64> {
    if let Some(b) = s.busy_percent {
        return Some(f64::from(b).clamp(0.0, 100.0));
    }
    let bytes = s.bytes?;
    let last = d.last_bytes.replace((now, bytes));
    let (t0, b0) = last?;
    let dt = now - t0;
    if dt <= 0.0 || bytes < b0 {
        return None;
    }
    Some(((bytes - b0) as f64 / dt / full as f64 * 100.0).clamp(0.0, 100.0))
}

/// Adds the busy share to the minute being gathered; returns the minute before
/// when this sample starts a new one.
fn gather(d: &mut DeviceUsage, now: f64, lease: &str, device: &str) -> Option<UsageMinute> {
    let busy = d.busy?;
    let minute = now as u64 / 60 * 60;
    match &mut d.minute {
        Some((m, sum, max, n)) if *m == minute => {
            *sum += busy;
            *max = max.max(busy);
            *n += 1;
            None
        }
        slot => {
            let done = slot.replace((minute, busy, busy, 1));
            done.map(|(at, sum, max, n)| UsageMinute {
                device: device.to_string(),
                lease: lease.to_string(),
                at,
                avg: sum / f64::from(n),
                max,
                samples: n,
            })
        }
    }
}

/// The alerts `d`'s values raise or clear now.
fn alerts(
    d: &mut DeviceUsage,
    now: f64,
    cfg: &crate::config::UsageConfig,
) -> Vec<(&'static str, &'static str, f64)> {
    let mut out = Vec::new();
    let h = cfg.hysteresis;
    if let Some(b) = d.busy {
        let above = b > cfg.busy_alert_percent;
        let since = match above {
            true => *d.busy_above_since.get_or_insert(now),
            false => {
                d.busy_above_since = None;
                now
            }
        };
        let level = match () {
            _ if above && now - since >= cfg.busy_alert_for_s as f64 => Some("high"),
            _ if b < cfg.busy_alert_percent - h => Some("ok"),
            _ => None, // within the band, or not sustained yet: as it was
        };
        out.extend(step(&mut d.alerts, "busy", level, b));
    }
    if let Some(m) = d.memory {
        let [w, hi, c] = cfg.memory_alert_percent;
        let level = [(c, "critical"), (hi, "high"), (w, "warning")]
            .into_iter()
            .find(|(t, _)| m >= *t)
            .map(|(_, l)| l);
        let raised = d.alerts.get("memory").copied();
        // Down a level (or to ok) only once below that level's threshold by h.
        let level = match (level, raised) {
            (l, Some(r)) if rank(l) < rank(Some(r)) && m >= threshold_of(r, cfg) - h => Some(r),
            (None, _) => Some("ok"),
            (l, _) => l,
        };
        out.extend(step(&mut d.alerts, "memory", level, m));
    }
    if let Some(t) = d.temperature {
        let level = match () {
            _ if t > cfg.temperature_alert_c => Some("high"),
            _ if t < cfg.temperature_alert_c - h => Some("ok"),
            _ => None,
        };
        out.extend(step(&mut d.alerts, "temperature", level, t));
    }
    out
}

fn rank(level: Option<&str>) -> u8 {
    match level {
        Some("critical") => 3,
        Some("high") => 2,
        Some("warning") => 1,
        _ => 0,
    }
}

fn threshold_of(level: &str, cfg: &crate::config::UsageConfig) -> f64 {
    let [w, h, c] = cfg.memory_alert_percent;
    match level {
        "critical" => c,
        "high" => h,
        _ => w,
    }
}

/// Moves `metric` to `level` (None: stays); an event when it changed (`ok`
/// only after a raised level).
fn step(
    raised: &mut BTreeMap<&'static str, &'static str>,
    metric: &'static str,
    level: Option<&'static str>,
    value: f64,
) -> Option<(&'static str, &'static str, f64)> {
    let level = level?;
    let was = raised.get(metric).copied().unwrap_or("ok");
    if level == was {
        return None;
    }
    match level {
        "ok" => raised.remove(metric),
        l => raised.insert(metric, l),
    };
    Some((metric, level, value))
}

/// The idle verdict: every paired device below the threshold for `idle_for_s`,
/// told once per idle spell.
fn idle(
    a: &mut Agent,
    now: f64,
    cfg: &crate::config::UsageConfig,
    action: OnIdle,
) -> Option<UsageEvent> {
    let all_idle = !a.pairs.is_empty()
        && a.pairs.keys().all(|h| {
            a.devices
                .get(h)
                .and_then(|d| d.busy)
                .is_some_and(|b| b < cfg.idle_below_percent)
        });
    if !all_idle {
        a.idle_since = None;
        a.idle_told = false;
        return None;
    }
    let since = *a.idle_since.get_or_insert(now);
    if a.idle_told || now - since < cfg.idle_for_s as f64 {
        return None;
    }
    a.idle_told = true;
    Some(UsageEvent::Idle {
        lease: a.lease.clone(),
        vm: a.vm.clone(),
        devices: a.pairs.keys().cloned().collect(),
        action,
    })
}
