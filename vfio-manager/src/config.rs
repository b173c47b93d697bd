//! The desired state, `/etc/vfio-manager/config.toml`: which devices are ours, how many
//! VFs each PF gets, which functions are bound to vfio-pci, and the daemon's settings.
//! Every error names the file, line and column (`vfctl config check FILE`).
//!
//! ```toml
//! manage = ["8086:10c9"]            # PFs to manage besides GPUs (ids or addresses)
//! exclude = ["0000:3b:00.0"]        # never touched
//! bind = ["0000:01:10.0"]           # bound to vfio-pci at boot
//! [[pf]]
//! address = "0000:01:00.0"
//! vfs = 4                           # enabled at boot (autoprobe off)
//! [daemon]
//! allowed_group = "vfio-manager"    # may call mutating methods (root always may)
//! metrics_listen = "127.0.0.1:9477" # Prometheus text on HTTP; or metrics_textfile
//! audit_log = "/var/log/vfio-manager/audit.log"
//! state_dir = "/var/lib/vfio-manager"
//! released_retention_days = 90     # a released request id is refused this long; 0: for ever
//! degraded_correctable_per_hour = 100 # correctable PCIe errors (AER) in an hour that make a device degraded
//! probe_interval_s = 30             # read each managed function's config space this often; 0: never
//! dma_probe = false                 # map memory for each leased function through its IOMMU first
//! [recovery]                        # when a leased device fails (a request's on_failure wins)
//! on_failure = "notify"             # notify: hold it back, signal; replace: swap in a healthy one
//! profiles = { "8086:10ca" = "replace" } # per profile
//! virsh = "virsh"                   # libvirt's client, for swaps in libvirt domains
//! libvirt_uri = "qemu:///system"
//! [migration]                       # mutual TLS; these are the defaults (libvirt's PKI)
//! ca = "/etc/pki/CA/cacert.pem"
//! server_cert = "/etc/pki/libvirt/servercert.pem"   # presented when receiving
//! server_key = "/etc/pki/libvirt/private/serverkey.pem"
//! client_cert = "/etc/pki/libvirt/clientcert.pem"   # presented when sending
//! client_key = "/etc/pki/libvirt/private/clientkey.pem"
//! deadline_s = 600                  # a whole incoming migration, handshake to verdict
//! max_state_mib = 65536             # the most an incoming migration may send
//! [usage]                           # in-guest agents (vm-agent); these are the defaults
//! vsock_port = 22086                # agents connect to the host (CID 2) on this port
//! net_full_bytes_per_s = 125000000  # a NIC moving this much is 100 % busy
//! busy_alert_percent = 90           # UsageAlert when busy stays above this ...
//! busy_alert_for_s = 300            # ... this long
//! memory_alert_percent = [75, 85, 95] # warning, high, critical
//! temperature_alert_c = 80
//! hysteresis = 5                    # an alert clears this far below its threshold
//! idle_below_percent = 5            # a lease whose devices all stay below this ...
//! idle_for_s = 1800                 # ... this long is idle
//! on_idle = "notify"                # notify, unplug (let go, detach, return to the pool), release-on-stop
//! profiles = { "8086:10ca" = "unplug" } # per profile (a request's on_idle wins)
//! let_go_timeout_s = 10             # the agent's time to unbind its driver before the unplug
//! minutes_kept_h = 24               # minute averages kept; then hour averages ...
//! hours_kept_d = 30                 # ... kept this many days
//! [placement]                       # where new leases go; these are the defaults
//! policy = "pack"                   # pack: fullest PF below the limit first (whole PFs stay free); spread: least pressed first
//! pressure_limit_percent = 80       # pack tries a PF predicted above this last
//! alpha = 0.5                       # the pressure prediction's smoothing (Holt: level ...
//! beta = 0.3                        # ... and trend) ...
//! horizon_s = 300                   # ... this far ahead
//! migratable_drivers = ["mtty"]     # mdev drivers whose devices migrate live (plan --rebalance)
//! ```

use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;
use vf_provisioner::vendors::{is_selector, GpuVendor};
use vf_provisioner::{DeviceConfig, PciAddress};

use crate::api::ids::{OnFailure, OnIdle};
use crate::api::Request;

pub const DEFAULT_PATH: &str = "/etc/vfio-manager/config.toml";

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct Raw {
    gpu: Vec<GpuVendor>,
    manage: Vec<Spanned<String>>,
    exclude: Vec<Spanned<String>>,
    bind: Vec<Spanned<String>>,
    pf: Vec<RawPf>,
    daemon: RawDaemon,
    migration: RawMigration,
    recovery: RawRecovery,
    usage: RawUsage,
    placement: RawPlacement,
}

/// `[placement]`: where new leases go, by predicted pressure.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawPlacement {
    policy: Spanned<String>,
    pressure_limit_percent: f64,
    alpha: Spanned<f64>,
    beta: Spanned<f64>,
    horizon_s: u64,
    migratable_drivers: Vec<String>,
}

impl Default for RawPlacement {
    fn default() -> Self {
        let p = PlacementConfig::default();
        RawPlacement {
            policy: Spanned::new(0..0, "pack".into()),
            pressure_limit_percent: p.pressure_limit_percent,
            alpha: Spanned::new(0..0, p.alpha),
            beta: Spanned::new(0..0, p.beta),
            horizon_s: p.horizon_s,
            migratable_drivers: p.migratable_drivers,
        }
    }
}

/// `[usage]`: the in-guest agents, alert thresholds and idle reclamation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawUsage {
    vsock_port: u32,
    net_full_bytes_per_s: u64,
    busy_alert_percent: f64,
    busy_alert_for_s: u64,
    memory_alert_percent: [f64; 3],
    temperature_alert_c: f64,
    hysteresis: f64,
    idle_below_percent: f64,
    idle_for_s: u64,
    on_idle: Spanned<String>,
    profiles: BTreeMap<String, Spanned<String>>,
    let_go_timeout_s: u64,
    minutes_kept_h: u64,
    hours_kept_d: u64,
}

impl Default for RawUsage {
    fn default() -> Self {
        let u = UsageConfig::default();
        RawUsage {
            vsock_port: u.vsock_port,
            net_full_bytes_per_s: u.net_full_bytes_per_s,
            busy_alert_percent: u.busy_alert_percent,
            busy_alert_for_s: u.busy_alert_for_s,
            memory_alert_percent: u.memory_alert_percent,
            temperature_alert_c: u.temperature_alert_c,
            hysteresis: u.hysteresis,
            idle_below_percent: u.idle_below_percent,
            idle_for_s: u.idle_for_s,
            on_idle: Spanned::new(0..0, u.on_idle.to_string()),
            profiles: BTreeMap::new(),
            let_go_timeout_s: u.let_go_timeout_s,
            minutes_kept_h: u.minutes_kept_h,
            hours_kept_d: u.hours_kept_d,
        }
    }
}

/// `[recovery]`: what a lease asks for when one of its devices fails.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawRecovery {
    on_failure: Option<Spanned<String>>,
    profiles: BTreeMap<String, Spanned<String>>,
    virsh: Option<PathBuf>,
    libvirt_uri: Option<String>,
}

/// `[migration]`: mutual TLS for the device state stream (libvirt's PKI layout by
/// default) and what a destination allows one source.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawMigration {
    ca: Option<PathBuf>,
    server_cert: Option<PathBuf>,
    server_key: Option<PathBuf>,
    client_cert: Option<PathBuf>,
    client_key: Option<PathBuf>,
    deadline_s: Option<u64>,
    max_state_mib: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPf {
    address: Spanned<String>,
    vfs: Spanned<u32>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawDaemon {
    allowed_group: Option<String>,
    allowed_uids: Vec<u32>,
    metrics_listen: Option<Spanned<String>>,
    metrics_textfile: Option<PathBuf>,
    audit_log: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    released_retention_days: Option<u32>,
    degraded_correctable_per_hour: Option<u64>,
    probe_interval_s: Option<Spanned<u64>>,
    dma_probe: Option<bool>,
}

/// The validated configuration.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub devices: DeviceConfig,
    /// PFs and their VF counts, restored at boot in this order.
    pub pfs: Vec<(PciAddress, u32)>,
    /// Functions bound to vfio-pci at boot, after the VFs exist.
    pub bind: Vec<PciAddress>,
    pub daemon: DaemonConfig,
    pub migration: MigrationConfig,
    pub recovery: RecoveryConfig,
    pub usage: UsageConfig,
    pub placement: PlacementConfig,
}

/// `spread` (least pressed PF first) or `pack` (fullest PF below the limit first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlacementPolicy {
    Spread,
    Pack,
}

/// Where new leases go (`daemon::core::placement`).
#[derive(Debug, Clone)]
pub struct PlacementConfig {
    pub policy: PlacementPolicy,
    /// `pack` tries a PF predicted above this last.
    pub pressure_limit_percent: f64,
    /// Holt's smoothing weights: the level's and the trend's (0-1).
    pub alpha: f64,
    pub beta: f64,
    /// How far ahead the pressure is predicted.
    pub horizon_s: u64,
    /// mdev vendor drivers whose devices migrate (VFIO migration v2) while a VM
    /// runs: `vfctl plan --rebalance` proposes moves for their mdevs only.
    pub migratable_drivers: Vec<String>,
}

impl Default for PlacementConfig {
    fn default() -> Self {
        PlacementConfig {
            policy: PlacementPolicy::Pack,
            pressure_limit_percent: 80.0,
            alpha: 0.5,
            beta: 0.3,
            horizon_s: 300,
            // Seen migrating on the real kernel (docs/kernel.md); a vendor's
            // driver is added where its release notes say it migrates.
            migratable_drivers: vec!["mtty".into()],
        }
    }
}

/// The in-guest agents, what usage raises an alert, and what idle devices cost
/// their lease. The defaults follow GPU operations practice: busy above 90 %
/// for 5 minutes, memory at 75/85/95 %, above 80 °C.
#[derive(Debug, Clone)]
pub struct UsageConfig {
    /// The vsock port agents connect to (on the host, CID 2).
    pub vsock_port: u32,
    /// A NIC moving this many bytes a second counts as 100 % busy (the emulated
    /// stand-ins report bytes, not a busy share).
    pub net_full_bytes_per_s: u64,
    pub busy_alert_percent: f64,
    /// How long busy must stay above its threshold to raise the alert.
    pub busy_alert_for_s: u64,
    /// warning, high, critical.
    pub memory_alert_percent: [f64; 3],
    pub temperature_alert_c: f64,
    /// An alert clears this far below its threshold (percent or °C).
    pub hysteresis: f64,
    /// Every device of a lease below this busy share for `idle_for_s` makes the
    /// lease idle.
    pub idle_below_percent: f64,
    pub idle_for_s: u64,
    pub on_idle: OnIdle,
    /// Per profile; a request's own `on_idle` comes first.
    pub profiles: BTreeMap<String, OnIdle>,
    /// How long an agent has to let go of a device before it is unplugged anyway.
    pub let_go_timeout_s: u64,
    /// Minute averages are kept this many hours, hour averages this many days.
    pub minutes_kept_h: u64,
    pub hours_kept_d: u64,
}

impl Default for UsageConfig {
    fn default() -> Self {
        UsageConfig {
            vsock_port: 22086,
            net_full_bytes_per_s: 125_000_000,
            busy_alert_percent: 90.0,
            busy_alert_for_s: 300,
            memory_alert_percent: [75.0, 85.0, 95.0],
            temperature_alert_c: 80.0,
            hysteresis: 5.0,
            idle_below_percent: 5.0,
            idle_for_s: 1800,
            on_idle: OnIdle::Notify,
            profiles: BTreeMap::new(),
            let_go_timeout_s: 10,
            minutes_kept_h: 24,
            hours_kept_d: 30,
        }
    }
}

impl UsageConfig {
    /// The idle action for a lease made by `req`: its own, else its profile's,
    /// else the default. A request's was checked when it was made.
    pub fn on_idle(&self, req: &Request) -> OnIdle {
        req.on_idle
            .parse()
            .ok()
            .or_else(|| self.profiles.get(&req.profile).copied())
            .unwrap_or(self.on_idle)
    }
}

/// What the daemon does when a leased device fails, and how it reaches libvirt.
#[derive(Debug, Clone)]
pub struct RecoveryConfig {
    pub on_failure: OnFailure,
    /// Per profile; a request's own `on_failure` comes first.
    pub profiles: BTreeMap<String, OnFailure>,
    pub virsh: PathBuf,
    pub libvirt_uri: String,
}

impl Default for RecoveryConfig {
    fn default() -> Self {
        RecoveryConfig {
            on_failure: OnFailure::Notify,
            profiles: BTreeMap::new(),
            virsh: "virsh".into(),
            libvirt_uri: "qemu:///system".into(),
        }
    }
}

impl RecoveryConfig {
    /// The policy for a lease made by `req`: its own, else its profile's, else the
    /// default. A request's was checked when it was made.
    pub fn policy(&self, req: &Request) -> OnFailure {
        req.on_failure
            .parse()
            .ok()
            .or_else(|| self.profiles.get(&req.profile).copied())
            .unwrap_or(self.on_failure)
    }
}

#[derive(Debug, Clone)]
pub struct MigrationConfig {
    pub tls: mediated_dev::migration::tls::Files,
    pub limits: mediated_dev::migration::net::Limits,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        MigrationConfig {
            tls: mediated_dev::migration::tls::Files::libvirt(),
            limits: mediated_dev::migration::net::Limits::default(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct DaemonConfig {
    pub allowed_group: String,
    pub allowed_uids: Vec<u32>,
    pub metrics_listen: Option<SocketAddr>,
    pub metrics_textfile: Option<PathBuf>,
    pub audit_log: PathBuf,
    pub state_dir: PathBuf,
    /// How long a released lease's request id is remembered, and refused if sent
    /// again (idempotency); after that the table forgets it and it may name a new
    /// lease. 0 remembers every one (the table then grows with every lease).
    pub released_retention_days: u32,
    /// Correctable PCIe errors (AER) within an hour that make a device degraded
    /// (after an uncorrectable one, the kernel's recovery decides).
    pub degraded_correctable_per_hour: u64,
    /// How often every managed function's configuration space is read (a device
    /// that answers all ones has failed); 0: never.
    pub probe_interval_s: u64,
    /// Before a leased function is handed out, map memory for it through its IOMMU
    /// and unmap it (VFIO, real kernels only); one that fails is held back.
    pub dma_probe: bool,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            allowed_group: "vfio-manager".into(),
            allowed_uids: Vec::new(),
            metrics_listen: None,
            metrics_textfile: None,
            audit_log: "/var/log/vfio-manager/audit.log".into(),
            state_dir: "/var/lib/vfio-manager".into(),
            released_retention_days: 90,
            degraded_correctable_per_hour: 100,
            probe_interval_s: 30,
            dma_probe: false,
        }
    }
}

/// A configuration error at a place in the file.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl Config {
    /// Loads `path`; a missing file is the empty configuration (GPUs only, nothing
    /// restored at boot).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(e) => Err(ConfigError {
                file: path.display().to_string(),
                line: 0,
                column: 0,
                message: format!("cannot read: {e}"),
            }),
        }
    }

    /// Loads `path`, which must exist (`vfctl config check`).
    pub fn load_required(path: &Path) -> Result<Config, ConfigError> {
        if !path.exists() {
            return Err(ConfigError {
                file: path.display().to_string(),
                line: 0,
                column: 0,
                message: "no such file".into(),
            });
        }
        Config::load(path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let at = |span: Option<Range<usize>>, message: String| {
            let (line, column) = span.map_or((0, 0), |s| line_col(text, s.start));
            ConfigError {
                file: path.display().to_string(),
                line,
                column,
                message,
            }
        };
        let raw: Raw = toml::from_str(text)
            .map_err(|e| at(e.span(), e.message().trim_end().replace('\n', " ")))?;
        for s in raw.manage.iter().chain(&raw.exclude) {
            if !is_selector(s.get_ref()) {
                return Err(at(
                    Some(s.span()),
                    format!("{:?} is not a device selector: use vvvv:dddd or a PCI address such as 0000:3b:00.0", s.get_ref()),
                ));
            }
        }
        let address = |s: &Spanned<String>| {
            s.get_ref()
                .parse::<PciAddress>()
                .map_err(|e| at(Some(s.span()), e.to_string()))
        };
        let mut pfs: Vec<(PciAddress, u32)> = Vec::new();
        for pf in &raw.pf {
            let a = address(&pf.address)?;
            if pfs.iter().any(|(p, _)| *p == a) {
                return Err(at(
                    Some(pf.address.span()),
                    format!("PF {a} is listed twice; keep one [[pf]] entry per PF"),
                ));
            }
            if *pf.vfs.get_ref() > 256 {
                return Err(at(
                    Some(pf.vfs.span()),
                    format!("{} VFs for {a}: a PF has at most 256", pf.vfs.get_ref()),
                ));
            }
            pfs.push((a, *pf.vfs.get_ref()));
        }
        let bind = raw.bind.iter().map(address).collect::<Result<_, _>>()?;
        if let Some(p) = raw
            .daemon
            .probe_interval_s
            .as_ref()
            .filter(|p| *p.get_ref() > 86_400)
        {
            return Err(at(
                Some(p.span()),
                format!(
                    "probe_interval_s = {}: at most 86400 (a day); 0 turns the probe off",
                    p.get_ref()
                ),
            ));
        }
        let metrics_listen = match &raw.daemon.metrics_listen {
            Some(s) => Some(s.get_ref().parse::<SocketAddr>().map_err(|e| {
                at(
                    Some(s.span()),
                    format!(
                        "metrics_listen {:?}: {e}; use HOST:PORT such as 127.0.0.1:9477",
                        s.get_ref()
                    ),
                )
            })?),
            None => None,
        };
        let policy = |s: &Spanned<String>| {
            s.get_ref()
                .parse::<OnFailure>()
                .map_err(|e| at(Some(s.span()), e.to_string()))
        };
        let rr = raw.recovery;
        let r = RecoveryConfig::default();
        let recovery = RecoveryConfig {
            on_failure: rr.on_failure.as_ref().map_or(Ok(r.on_failure), policy)?,
            profiles: rr
                .profiles
                .iter()
                .map(|(k, v)| Ok((k.clone(), policy(v)?)))
                .collect::<Result<_, ConfigError>>()?,
            virsh: rr.virsh.unwrap_or(r.virsh),
            libvirt_uri: rr.libvirt_uri.unwrap_or(r.libvirt_uri),
        };
        let ru = raw.usage;
        let on_idle = |s: &Spanned<String>| {
            s.get_ref()
                .parse::<OnIdle>()
                .map_err(|e| at(Some(s.span()), e.to_string()))
        };
        let usage = UsageConfig {
            vsock_port: ru.vsock_port,
            net_full_bytes_per_s: ru.net_full_bytes_per_s.max(1),
            busy_alert_percent: ru.busy_alert_percent,
            busy_alert_for_s: ru.busy_alert_for_s,
            memory_alert_percent: ru.memory_alert_percent,
            temperature_alert_c: ru.temperature_alert_c,
            hysteresis: ru.hysteresis.max(0.0),
            idle_below_percent: ru.idle_below_percent,
            idle_for_s: ru.idle_for_s,
            on_idle: on_idle(&ru.on_idle)?,
            profiles: ru
                .profiles
                .iter()
                .map(|(k, v)| Ok((k.clone(), on_idle(v)?)))
                .collect::<Result<_, ConfigError>>()?,
            let_go_timeout_s: ru.let_go_timeout_s,
            minutes_kept_h: ru.minutes_kept_h.max(1),
            hours_kept_d: ru.hours_kept_d,
        };
        let rp = raw.placement;
        let weight = |w: &Spanned<f64>, name: &str| match *w.get_ref() {
            v if v > 0.0 && v <= 1.0 => Ok(v),
            v => Err(at(
                Some(w.span()),
                format!("[placement] {name} = {v}: a weight above 0, at most 1"),
            )),
        };
        let placement = PlacementConfig {
            policy: match rp.policy.get_ref().as_str() {
                "spread" => PlacementPolicy::Spread,
                "pack" => PlacementPolicy::Pack,
                other => {
                    return Err(at(
                        Some(rp.policy.span()),
                        format!("placement policy {other:?}: give spread or pack"),
                    ))
                }
            },
            pressure_limit_percent: rp.pressure_limit_percent,
            alpha: weight(&rp.alpha, "alpha")?,
            beta: weight(&rp.beta, "beta")?,
            horizon_s: rp.horizon_s,
            migratable_drivers: rp.migratable_drivers,
        };
        let d = DaemonConfig::default();
        let m = MigrationConfig::default();
        let rm = raw.migration;
        let migration = MigrationConfig {
            tls: mediated_dev::migration::tls::Files {
                ca: rm.ca.unwrap_or(m.tls.ca),
                server_cert: rm.server_cert.unwrap_or(m.tls.server_cert),
                server_key: rm.server_key.unwrap_or(m.tls.server_key),
                client_cert: rm.client_cert.unwrap_or(m.tls.client_cert),
                client_key: rm.client_key.unwrap_or(m.tls.client_key),
            },
            limits: mediated_dev::migration::net::Limits {
                deadline: rm
                    .deadline_s
                    .map_or(m.limits.deadline, std::time::Duration::from_secs),
                max_bytes: rm
                    .max_state_mib
                    .map_or(m.limits.max_bytes, |mib| mib.saturating_mul(1 << 20)),
                ..m.limits
            },
        };
        Ok(Config {
            migration,
            recovery,
            usage,
            placement,
            devices: DeviceConfig {
                gpu: raw.gpu,
                manage: raw.manage.into_iter().map(Spanned::into_inner).collect(),
                exclude: raw.exclude.into_iter().map(Spanned::into_inner).collect(),
            },
            pfs,
            bind,
            daemon: DaemonConfig {
                allowed_group: raw.daemon.allowed_group.unwrap_or(d.allowed_group),
                allowed_uids: raw.daemon.allowed_uids,
                metrics_listen,
                metrics_textfile: raw.daemon.metrics_textfile,
                audit_log: raw.daemon.audit_log.unwrap_or(d.audit_log),
                state_dir: raw.daemon.state_dir.unwrap_or(d.state_dir),
                released_retention_days: raw
                    .daemon
                    .released_retention_days
                    .unwrap_or(d.released_retention_days),
                degraded_correctable_per_hour: raw
                    .daemon
                    .degraded_correctable_per_hour
                    .unwrap_or(d.degraded_correctable_per_hour),
                probe_interval_s: raw
                    .daemon
                    .probe_interval_s
                    .map_or(d.probe_interval_s, Spanned::into_inner),
                dma_probe: raw.daemon.dma_probe.unwrap_or(d.dma_probe),
            },
        })
    }
}

/// 1-based line and column of byte `offset`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Config::parse(text, Path::new("c.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_probe_interval_past_a_day_is_refused_where_it_stands() {
        for n in ["86401", "9223372036854775807"] {
            let e = err(&format!("[daemon]\nprobe_interval_s = {n}\n"));
            assert!(
                e.starts_with("c.toml:2:") && e.contains("at most 86400"),
                "{e}"
            );
        }
    }

    #[test]
    fn the_recovery_policy_is_the_requests_then_its_profiles_then_the_default() {
        let c = Config::parse(
            "[recovery]\non_failure = \"notify\"\nprofiles = { \"8086:10ca\" = \"replace\" }\n",
            Path::new("c.toml"),
        )
        .unwrap();
        let req = |profile: &str, on_failure: &str| Request {
            profile: profile.into(),
            on_failure: on_failure.into(),
            ..Request::default()
        };
        let r = &c.recovery;
        assert_eq!(r.policy(&req("vf", "")), OnFailure::Notify);
        assert_eq!(r.policy(&req("8086:10ca", "")), OnFailure::Replace);
        assert_eq!(r.policy(&req("8086:10ca", "notify")), OnFailure::Notify);
        assert_eq!(r.policy(&req("vf", "replace")), OnFailure::Replace);
        let e = err("[recovery]\nprofiles = { vf = \"swap\" }\n");
        assert!(
            e.starts_with("c.toml:2:") && e.contains("give notify or replace"),
            "{e}"
        );
    }

    #[test]
    fn errors_name_the_line_and_column() {
        assert_eq!(
            err("manage = [\"8086:10c9\"]\n\n[[pf]]\naddress = \"0000:01:00.x\"\nvfs = 4\n"),
            "c.toml:4:11: invalid PCI address \"0000:01:00.x\": function must be a single digit 0-7; expected dddd:bb:dd.f or bb:dd.f, e.g. 0000:3b:00.0"
        );
        assert!(err("bind = [\"01:10.0\"]\nmanage = [\"nvidia\"]\n")
            .starts_with("c.toml:2:11: \"nvidia\" is not a device selector"));
        assert!(
            err("[[pf]]\naddress = \"01:00.0\"\nvfs = 400\n").starts_with("c.toml:3:7: 400 VFs")
        );
        assert!(err("[daemon]\nmetrics_listen = \"localhost\"\n")
            .starts_with("c.toml:2:18: metrics_listen"));
        assert!(
            err("bnid = []\n").starts_with("c.toml:1:1: unknown field `bnid`"),
            "{}",
            err("bnid = []\n")
        );
        assert!(err(
            "[[pf]]\naddress = \"01:00.0\"\nvfs = 1\n[[pf]]\naddress = \"0000:01:00.0\"\nvfs = 2\n"
        )
        .starts_with("c.toml:5:11: PF 0000:01:00.0 is listed twice"));
        assert!(err("[daemon]\nreleased_retention_days = -1\n").starts_with("c.toml:2:27: "));
    }

    /// `[usage]` and `[placement]`: every bad value is named with its place, and a
    /// good file keeps its values.
    #[test]
    fn usage_and_placement_refuse_bad_values_and_keep_good_ones() {
        for (text, want) in [
            (
                "[usage]\non_idle = \"evict\"\n",
                "c.toml:2:11: invalid on_idle",
            ),
            (
                "[usage]\nprofiles = { vf = \"unplug\\n\" }\n",
                "c.toml:2:19: invalid on_idle",
            ),
            (
                "[usage]\nidle_fro_s = 3\n",
                "c.toml:2:1: unknown field `idle_fro_s`",
            ),
            ("[usage]\nvsock_port = -1\n", "c.toml:2:14: "),
            (
                "[placement]\npolicy = \"random\"\n",
                "c.toml:2:10: placement policy \"random\"",
            ),
            (
                "[placement]\nalpha = 0.0\n",
                "c.toml:2:9: [placement] alpha = 0",
            ),
            (
                "[placement]\nbeta = 2.5\n",
                "c.toml:2:8: [placement] beta = 2.5",
            ),
        ] {
            let e = err(text);
            assert!(e.starts_with(want), "{text:?}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
        let c = Config::parse(
            "[usage]\non_idle = \"unplug\"\nidle_for_s = 3\nprofiles = { \"8086:10ca\" = \"release-on-stop\" }\n[placement]\npolicy = \"spread\"\nmigratable_drivers = []\n",
            Path::new("c.toml"),
        )
        .unwrap();
        assert_eq!((c.usage.on_idle, c.usage.idle_for_s), (OnIdle::Unplug, 3));
        assert_eq!(c.usage.profiles["8086:10ca"], OnIdle::ReleaseOnStop);
        assert_eq!(c.placement.policy, PlacementPolicy::Spread);
        assert!(c.placement.migratable_drivers.is_empty());
        assert_eq!(Config::default().placement.policy, PlacementPolicy::Pack);
    }

    #[test]
    fn a_full_file_parses_in_order() {
        let c = Config::parse(
            "manage = [\"8086:10c9\"]\nbind = [\"01:10.0\", \"01:10.2\"]\n[[pf]]\naddress = \"01:00.0\"\nvfs = 4\n[[pf]]\naddress = \"02:00.0\"\nvfs = 3\n[daemon]\nmetrics_listen = \"127.0.0.1:9477\"\nallowed_uids = [1000]\n",
            Path::new("c.toml"),
        )
        .unwrap();
        assert_eq!(c.pfs.len(), 2);
        assert_eq!(c.pfs[1].1, 3);
        assert_eq!(c.bind[1].to_string(), "0000:01:10.2");
        assert_eq!(c.daemon.allowed_uids, vec![1000]);
        assert_eq!(c.devices.manage, vec!["8086:10c9".to_string()]);
        assert_eq!(c.daemon.released_retention_days, 90, "the default");
        let kept = Config::parse(
            "[daemon]\nreleased_retention_days = 0\n",
            Path::new("c.toml"),
        );
        assert_eq!(kept.unwrap().daemon.released_retention_days, 0);
    }
}
