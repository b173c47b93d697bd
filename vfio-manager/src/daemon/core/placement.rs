//! Where a new lease goes, by usage: each PF's compute pressure is the mean busy
//! share of its leased VFs (as the guests' agents report it), and a prediction
//! of it `horizon_s` ahead decides the order in which the pool tries PFs:
//! - `pack` (the default): the most leased PF first, so that whole PFs stay free
//!   (to be disabled, or given another VF count), but never one predicted above
//!   `pressure_limit_percent` before the others. With no usage known this is the
//!   pool's address order, PF by PF;
//! - `spread`: the least pressed PF first, then the least leased.
//!
//! The prediction is Holt's linear smoothing (an EWMA with a trend) over samples
//! at irregular times: the level follows the samples with weight `alpha`, the
//! trend (per second) follows the level's changes with weight `beta`, and the
//! forecast is the level plus the trend times the horizon, clamped to 0-100.
//!
//! Priority classes: a `high` request that finds too few free devices takes them
//! from `low` leases whose devices are all idle now (their agents say so), never
//! from busy ones, nor from leases without an agent (`usage::reclaim`).

use std::collections::BTreeMap;

use super::Placement;
use crate::api::ids::Priority;
use crate::api::Request;
use crate::config::PlacementPolicy;

/// A PF's pressure, smoothed, with its trend.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Holt {
    pub level: f64,
    /// Percent per second.
    pub trend: f64,
    at: f64,
}

impl Holt {
    pub fn new(x: f64, at: f64) -> Holt {
        Holt {
            level: x,
            trend: 0.0,
            at,
        }
    }

    /// Takes sample `x` at time `at` (seconds). An older or same-time sample only
    /// moves the level.
    pub fn update(&mut self, x: f64, at: f64, alpha: f64, beta: f64) {
        let dt = at - self.at;
        if dt <= 0.0 {
            self.level = alpha * x + (1.0 - alpha) * self.level;
            return;
        }
        let before = self.level;
        self.level = alpha * x + (1.0 - alpha) * (self.level + self.trend * dt);
        self.trend = beta * (self.level - before) / dt + (1.0 - beta) * self.trend;
        self.at = at;
    }

    /// The pressure `ahead` seconds after the last sample.
    pub fn forecast(&self, ahead: f64) -> f64 {
        (self.level + self.trend * ahead).clamp(0.0, 100.0)
    }
}

impl Placement<'_> {
    fn pressure(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Holt>> {
        self.pressure.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Feeds each PF's mean busy share now into its prediction (after a sample).
    pub fn observe(&self, means: &BTreeMap<String, f64>, at: f64) {
        let cfg = &self.config().placement;
        let mut p = self.pressure();
        for (pf, x) in means {
            p.entry(pf.clone())
                .and_modify(|h| h.update(*x, at, cfg.alpha, cfg.beta))
                .or_insert_with(|| Holt::new(*x, at));
        }
    }

    /// Each PF's predicted pressure `horizon_s` ahead (`vfctl plan`, metrics).
    pub fn predictions(&self) -> BTreeMap<String, f64> {
        let ahead = self.config().placement.horizon_s as f64;
        self.pressure()
            .iter()
            .map(|(pf, h)| (pf.clone(), h.forecast(ahead)))
            .collect()
    }

    /// Every PF with VFs, in the order a new lease should try them.
    pub fn order(&self) -> Vec<String> {
        let devices = self.devices().unwrap_or_default();
        let mut leased: BTreeMap<String, usize> = BTreeMap::new();
        for d in devices.iter().filter(|d| !d.pf.is_empty()) {
            *leased.entry(d.pf.clone()).or_default() += usize::from(!d.lease_id.is_empty());
        }
        let predicted = self.predictions();
        let cfg = &self.config().placement;
        rank(leased, &predicted, cfg.policy, cfg.pressure_limit_percent)
    }

    /// Frees up to `missing` devices for high-priority `req` from idle low-priority
    /// leases; returns what was done, for the log.
    pub fn preempt_for(&self, req: &Request, missing: usize) -> Vec<String> {
        if req.priority.parse::<Priority>().ok() != Some(Priority::High) {
            return Vec::new();
        }
        let mut done = Vec::new();
        for (lease, device) in self.usage().idle_devices(Priority::Low) {
            if done.len() == missing {
                break;
            }
            let fits = self
                .device(&device)
                .and_then(|d| d.pf.parse().ok())
                .and_then(|pf| vf_provisioner::PciFunction::read_ids(&self.sys, &pf))
                .is_some_and(|pf| super::profile_matches(&req.profile, &pf));
            if !fits {
                continue;
            }
            let why = format!("idle, taken for high-priority VM {}", req.vm_name);
            match self.usage().reclaim(&lease, &device, &why) {
                Ok(s) => done.push(format!("{device} of low-priority lease {lease}: {s}")),
                Err(e) => eprintln!("vfio-manager: placement: {device} of lease {lease}: {e}"),
            }
        }
        done
    }
}

/// A proposed move of a leased mdev off a pressed parent (`vfctl plan --rebalance`).
#[derive(Debug, Clone, PartialEq)]
pub struct Move {
    pub lease: String,
    pub device: String,
    pub from: String,
    pub to: String,
    pub from_percent: f64,
    pub to_percent: f64,
}

impl Placement<'_> {
    /// Moves that would relieve parents predicted over `pressure_limit_percent`:
    /// each leased mdev of a migratable driver there, to the least pressed other
    /// parent with room for its type. Passthrough VFs never migrate and are not
    /// proposed. Changes nothing.
    pub fn rebalance(&self) -> Vec<Move> {
        let cfg = &self.config().placement;
        let predicted = self.predictions();
        let p = |parent: &str| predicted.get(parent).copied().unwrap_or(0.0);
        let parents: Vec<_> =
            vf_provisioner::sysfs::dir_names(&mediated_dev::host::mdev_bus(&self.sys))
                .into_iter()
                .filter_map(|n| crate::api::ids::MdevParent::new(&n).ok())
                .map(|n| mediated_dev::host::read_parent(&self.sys, n))
                .collect();
        let mut room: BTreeMap<(String, String), u32> = parents
            .iter()
            .flat_map(|pa| {
                pa.types.iter().map(move |t| {
                    (
                        (pa.name.to_string(), t.id.to_string()),
                        t.available_instances,
                    )
                })
            })
            .collect();
        let mut out = Vec::new();
        for row in self.store().leases().unwrap_or_default() {
            for u in row.devices.iter().filter_map(|h| h.mdev()) {
                let Some(m) = mediated_dev::host::read_mdev(&self.sys, &u) else {
                    continue;
                };
                let from = m.parent.to_string();
                let migrates = m
                    .driver
                    .as_ref()
                    .is_some_and(|d| cfg.migratable_drivers.contains(d));
                if p(&from) <= cfg.pressure_limit_percent || !migrates {
                    continue;
                }
                let to = room
                    .iter()
                    .filter(|((pa, t), n)| **n > 0 && *pa != from && *t == m.type_id.as_str())
                    .map(|((pa, _), _)| pa.clone())
                    .min_by(|a, b| p(a).total_cmp(&p(b)));
                let Some(to) = to.filter(|t| p(t) < p(&from)) else {
                    continue;
                };
                if let Some(n) = room.get_mut(&(to.clone(), m.type_id.to_string())) {
                    *n -= 1;
                }
                out.push(Move {
                    lease: row.id.clone(),
                    device: u.to_string(),
                    from_percent: p(&from),
                    to_percent: p(&to),
                    from,
                    to,
                });
            }
        }
        out
    }
}

/// The PFs in `leased` (PF -> its leased VFs) in the order `policy` tries them.
fn rank(
    leased: BTreeMap<String, usize>,
    predicted: &BTreeMap<String, f64>,
    policy: PlacementPolicy,
    limit: f64,
) -> Vec<String> {
    let p = |pf: &str| predicted.get(pf).copied().unwrap_or(0.0);
    let mut pfs: Vec<(String, usize)> = leased.into_iter().collect();
    match policy {
        PlacementPolicy::Spread => {
            pfs.sort_by(|(a, na), (b, nb)| p(a).total_cmp(&p(b)).then(na.cmp(nb)).then(a.cmp(b)))
        }
        PlacementPolicy::Pack => pfs.sort_by(|(a, na), (b, nb)| {
            (p(a) > limit)
                .cmp(&(p(b) > limit))
                .then(nb.cmp(na))
                .then(a.cmp(b))
        }),
    }
    pfs.into_iter().map(|(pf, _)| pf).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A series sampled every 5 s, as an agent at its default interval sends.
    fn run(series: &[f64]) -> Holt {
        let mut h = Holt::new(series[0], 0.0);
        for (i, x) in series.iter().enumerate().skip(1) {
            h.update(*x, i as f64 * 5.0, 0.5, 0.3);
        }
        h
    }

    #[test]
    fn a_rising_series_is_predicted_higher_a_falling_one_lower_a_flat_one_flat() {
        let rising: Vec<f64> = (0..24).map(|i| 10.0 + 2.0 * i as f64).collect();
        let h = run(&rising);
        assert!(h.trend > 0.3 && h.trend < 0.5, "2 %/5 s is 0.4 %/s: {h:?}");
        assert!(h.forecast(60.0) > 56.0 + 15.0, "{}", h.forecast(60.0));
        let falling: Vec<f64> = rising.iter().rev().copied().collect();
        assert!(run(&falling).forecast(60.0) < 10.0);
        let flat = run(&[40.0; 30]);
        assert!((flat.forecast(300.0) - 40.0).abs() < 1e-9);
        // Clamped: never above 100 or below 0, however steep.
        assert_eq!(run(&[0.0, 50.0, 100.0]).forecast(3600.0), 100.0);
        assert_eq!(run(&[100.0, 50.0, 0.0]).forecast(3600.0), 0.0);
    }

    /// A recorded series: a training job's busy share, 1 Hz, ramping up with
    /// noise (a GPU's epochs): the prediction tracks it within a few percent and
    /// sees the ramp before the level does.
    #[test]
    fn a_noisy_ramp_is_tracked_and_seen_early() {
        let noise = [3.0, -2.0, 4.0, -5.0, 1.0, -1.0, 2.0, -3.0];
        let series: Vec<f64> = (0..60)
            .map(|i| (20.0 + i as f64 + noise[i % noise.len()]).clamp(0.0, 100.0))
            .collect();
        let mut h = Holt::new(series[0], 0.0);
        for (i, x) in series.iter().enumerate().skip(1) {
            h.update(*x, i as f64, 0.5, 0.3);
        }
        assert!((h.level - 79.0).abs() < 6.0, "{h:?}");
        assert!(h.forecast(10.0) > h.level, "the trend says up: {h:?}");
        // Samples out of order or at the same time do not blow the trend up.
        let t = h.trend;
        h.update(90.0, 59.0, 0.5, 0.3);
        h.update(90.0, 59.0, 0.5, 0.3);
        assert_eq!(h.trend, t);
    }

    #[test]
    fn spread_takes_the_least_pressed_and_pack_the_fullest_below_the_limit() {
        let leased: BTreeMap<String, usize> = [
            ("a".into(), 3),
            ("b".into(), 1),
            ("c".into(), 0),
            ("d".into(), 2),
        ]
        .into();
        let predicted: BTreeMap<String, f64> =
            [("a".into(), 95.0), ("b".into(), 20.0), ("d".into(), 50.0)].into();
        assert_eq!(
            rank(leased.clone(), &predicted, PlacementPolicy::Spread, 80.0),
            ["c", "b", "d", "a"]
        );
        assert_eq!(
            rank(leased, &predicted, PlacementPolicy::Pack, 80.0),
            ["d", "b", "c", "a"],
            "a is fullest but predicted over the limit"
        );
    }
}
