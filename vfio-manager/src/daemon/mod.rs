//! The vfio-manager daemon. Start-up order: load the desired state, open the table,
//! settle what a crash cut off, restore the desired state, take the bus name, tell
//! systemd it is ready; then serve D-Bus, follow uevents and export metrics until
//! SIGTERM.
//!
//! Layout: requests enter in [`dbus`] (the guests' agents in `agents`); policy decides in [`core`]; state is
//! written in [`store`] (and [`audit`]); the kernel is touched only through
//! `vf_provisioner`.

mod agents;
pub mod audit;
mod auth;
pub mod core;
pub mod dbus;
mod durable;
mod http;
pub mod metrics;
mod notify;
pub mod store;
pub mod uevent;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use vf_provisioner::Sysfs;
use zbus::Connection;

use self::core::Core;
use crate::api;
use crate::config::{self, Config};

#[derive(Parser, Debug)]
#[command(
    name = "vfio-managerd",
    version,
    about = "The vfio-manager host service: owns the GPUs' VFs, their vfio-pci binding and their leases to VMs",
    long_about = "The vfio-manager host service. At start it settles operations a crash cut off, \
        brings the host to the configured state (enables VFs, binds functions to vfio-pci: this changes \
        the host), then serves the D-Bus API on the system bus as org.vfiomanager.VfioManager1 and tells \
        systemd it is ready (Type=notify). Stops on SIGTERM."
)]
pub struct Options {
    /// Root of /sys, /dev and /proc (a fake host tree in tests).
    #[arg(long, default_value = "/")]
    root: PathBuf,
    /// The root is a tree made by `vfctl fake-host`: writes go to the fake kernel
    /// (tests and demos).
    #[arg(long)]
    fake_kernel: bool,
    #[arg(long, default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    /// Overrides `state_dir` of the configuration (the SQLite table lives there).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Overrides `audit_log` of the configuration.
    #[arg(long)]
    audit_log: Option<PathBuf>,
    /// Overrides `metrics_listen` (HOST:PORT) of the configuration.
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// D-Bus address to serve on instead of the system bus (DBUS_SYSTEM_BUS_ADDRESS
    /// is honoured too).
    #[arg(long)]
    bus_address: Option<String>,
    /// Do not follow kernel uevents (a fake host has none).
    #[arg(long)]
    no_uevents: bool,
}

/// Makes `dir` (and its parents) if absent, with `mode` on the last. An existing
/// one that anyone may write to is refused: whoever can replace a file there could
/// forge the state or the audit trail.
pub(crate) fn own_dir(dir: &std::path::Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)?;
    let meta = std::fs::metadata(dir)?;
    if meta.permissions().mode() & 0o002 != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{} is writable by everyone; give the daemon a directory of its own (chmod o-w, or another path)",
                dir.display()
            ),
        ));
    }
    Ok(())
}

pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let opts = match Options::try_parse_from(args) {
        Ok(o) => o,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vfio-managerd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vfio-managerd: {e}");
            notify::notify(&format!("STATUS=failed: {e}"));
            ExitCode::FAILURE
        }
    }
}

async fn run(opts: Options) -> Result<(), String> {
    let mut cfg = Config::load(&opts.config).map_err(|e| e.to_string())?;
    if let Some(d) = opts.state_dir {
        cfg.daemon.state_dir = d;
    }
    if let Some(a) = opts.audit_log {
        cfg.daemon.audit_log = a;
    }
    if let Some(m) = opts.metrics_listen {
        cfg.daemon.metrics_listen = Some(m);
    }
    let sys = Sysfs::open_as(&opts.root, opts.fake_kernel).map_err(|e| e.to_string())?;
    let audit = audit::Audit::open(Some(&cfg.daemon.audit_log)).map_err(|e| {
        format!(
            "cannot open the audit log {}: {e}",
            cfg.daemon.audit_log.display()
        )
    })?;
    let core = Arc::new(Core::open(sys, cfg, audit).map_err(|e| e.to_string())?);

    let c = core.clone();
    let startup = tokio::task::spawn_blocking(move || {
        let mut log = c.restore().recover().map_err(|e| e.to_string())?;
        log.extend(c.pool().forget_released());
        log.extend(c.restore().restore_desired());
        log.extend(c.restore().finish().map_err(|e| e.to_string())?);
        // Named in RestoreStatus above; let go (and signalled) once serving.
        log.extend(c.restore().let_go_of_vanished());
        c.health().prime();
        Ok::<_, String>(log)
    });
    for line in startup.await.map_err(|e| e.to_string())?? {
        eprintln!("vfio-manager: {line}");
    }

    let builder = match &opts.bus_address {
        Some(a) => zbus::connection::Builder::address(a.as_str()),
        None => zbus::connection::Builder::system(),
    }
    .map_err(|e| format!("cannot reach the D-Bus system bus: {e}"))?;
    let conn = builder.build().await.map_err(|e| {
        format!("cannot connect to the D-Bus system bus: {e}; is dbus-daemon running?")
    })?;
    let manager = dbus::Manager::new(core.clone(), &conn)
        .await
        .map_err(|e| e.to_string())?;
    conn.object_server()
        .at(api::MANAGER_PATH, manager)
        .await
        .map_err(|e| e.to_string())?;
    core.take_changes(); // start-up's changes are all in the first publication
    dbus::publish(&core, &conn, &dbus::all_addresses(&core), &[]).await;
    if !opts.no_uevents {
        follow_uevents(core.clone(), conn.clone());
    }
    tokio::spawn(forget_released_hourly(core.clone()));
    tokio::spawn(agents::serve(core.clone(), conn.clone()));
    tokio::spawn(probe_periodically(core.clone(), conn.clone()));
    if let Some(addr) = core.config().daemon.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen for metrics on {addr}: {e}"))?;
        tokio::spawn(http::serve(core.clone(), listener));
    }
    if let Some(path) = core.config().daemon.metrics_textfile.clone() {
        tokio::spawn(write_textfile(core.clone(), path));
    }
    // The name last: a client that sees it finds everything up.
    conn.request_name_with_flags(api::BUS_NAME, zbus::fdo::RequestNameFlags::DoNotQueue.into())
        .await
        .map_err(|e| format!("cannot own {}: {e}; is another vfio-managerd running, and does the bus policy (vfio-manager.conf) let this user own it?", api::BUS_NAME))?;

    eprintln!(
        "vfio-manager: ready on {} ({} devices)",
        api::BUS_NAME,
        core.devices().map_or(0, |d| d.len())
    );
    let restore = core.restore().status();
    if restore != "complete" {
        eprintln!("vfio-manager: restore: {restore}");
    }
    notify::notify(&format!("READY=1\nSTATUS=serving; restore {restore}"));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    notify::notify("STOPPING=1");
    eprintln!("vfio-manager: stopping");
    Ok(())
}

/// Prunes the released request ids past their retention every hour (a daemon
/// that runs for months must not keep them all).
async fn forget_released_hourly(core: Arc<Core>) {
    let mut hourly = tokio::time::interval(Duration::from_secs(3600));
    hourly.tick().await; // the first tick is now; start-up has pruned already
    loop {
        hourly.tick().await;
        let c = core.clone();
        if let Ok(Some(line)) =
            tokio::task::spawn_blocking(move || c.pool().forget_released()).await
        {
            eprintln!("vfio-manager: {line}");
        }
    }
}

/// The PCIe error recovery events among `events`: each function's health follows
/// them, and a failure is announced.
async fn follow_errors(core: &Arc<Core>, conn: &Connection, events: &[uevent::Uevent]) {
    let errors: Vec<_> = events
        .iter()
        .filter(|e| e.subsystem == "pci")
        .filter_map(|e| Some((e.device().to_string(), e.error_event.clone()?, e.at)))
        .collect();
    if errors.is_empty() {
        return;
    }
    let c = core.clone();
    let _ = tokio::task::spawn_blocking(move || {
        for (dev, event, at) in errors {
            c.health().on_error_event(&dev, &event);
            // The reaction time, uevent to held back (`make bench-real-kernel`).
            if event == "FAILED_RECOVERY" {
                let ms = at.elapsed().as_secs_f64() * 1e3;
                eprintln!("vfio-manager: {dev}: {event} handled {ms:.1} ms after its uevent");
            }
        }
    })
    .await;
    if let Ok(emitter) = zbus::object_server::SignalEmitter::new(conn, api::MANAGER_PATH) {
        dbus::announce_failures(core, conn, &emitter).await;
        dbus::announce_health(core, conn, &emitter).await;
    }
}

/// Reads every managed function's configuration space every `probe_interval_s`;
/// one that stopped answering is held back and announced, and so is every other
/// change of health state (degraded by its rate of correctable errors, healthy
/// again).
async fn probe_periodically(core: Arc<Core>, conn: Connection) {
    let every = core.config().daemon.probe_interval_s;
    if every == 0 {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_secs(every));
    tick.tick().await;
    loop {
        tick.tick().await;
        let c = core.clone();
        let failed = tokio::task::spawn_blocking(move || c.health().probe_all()).await;
        let Ok(emitter) = zbus::object_server::SignalEmitter::new(&conn, api::MANAGER_PATH) else {
            continue;
        };
        if let Ok(Ok(n)) = failed {
            if n > 0 {
                dbus::announce_failures(&core, &conn, &emitter).await;
            }
        }
        dbus::announce_health(&core, &conn, &emitter).await;
    }
}

/// Reads uevents on a thread; a burst (enabling 4 VFs is ~20 events) with a PCI
/// event in it is settled with one re-read of sysfs. The kernel's PCIe error
/// recovery events are not held back for the burst: a failure is acted on at once
/// (`make bench-real-kernel` prints the time from the uevent to the device held back).
fn follow_uevents(core: Arc<Core>, conn: Connection) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    if let Err(e) = uevent::follow(move |ev| tx.send(ev).is_ok()) {
        eprintln!("vfio-manager: not following uevents ({e}); the table is re-read after each operation only");
        return;
    }
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            // A burst is gathered for 50 ms; a PCIe error is followed at once.
            if first.error_event.is_none() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let mut events = vec![first];
            while let Ok(ev) = rx.try_recv() {
                events.push(ev);
            }
            let pci = events.iter().any(|e| e.subsystem == "pci");
            follow_errors(&core, &conn, &events).await;
            // The table holds PCI functions: an mdev's events (and its VFIO
            // group's) change no row, and a re-read costs a read of every
            // function's attributes (tens of milliseconds under emulation).
            if !pci {
                continue;
            }
            let c = core.clone();
            let changes = tokio::task::spawn_blocking(move || {
                let _ = c.refresh();
                for line in c.restore().let_go_of_vanished() {
                    eprintln!("vfio-manager: {line}");
                }
                c.take_changes()
            });
            if let Ok((added, removed)) = changes.await {
                dbus::publish(&core, &conn, &added, &removed).await;
            }
            if let Ok(emitter) = zbus::object_server::SignalEmitter::new(&conn, api::MANAGER_PATH) {
                dbus::announce_failures(&core, &conn, &emitter).await;
            }
        }
    });
}

fn exposition(core: &Core) -> String {
    let devices = core.devices().unwrap_or_default();
    let health = core.health().list().unwrap_or_default();
    let leases = core.leases().map_or(0, |l| l.len());
    let mut text = core.metrics.render(&devices, &health, leases);
    let usage = core.usage();
    metrics::render_usage(&mut text, &usage.agent_infos(), &usage.now());
    text
}

/// A minimal HTTP/1.0 responder: `GET /metrics` only.
/// Rewrites the textfile (atomically: temp file and rename) every few seconds.
async fn write_textfile(core: Arc<Core>, path: PathBuf) {
    loop {
        let c = core.clone();
        let text = tokio::task::spawn_blocking(move || exposition(&c))
            .await
            .unwrap_or_default();
        let tmp = path.with_extension("prom.tmp");
        if let Err(e) = std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, &path)) {
            eprintln!(
                "vfio-manager: cannot write metrics to {}: {e}",
                path.display()
            );
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}
