//! The daemon with real parts: a real dbus-daemon per test, the real vfio-managerd
//! binary, SQLite on disk, SIGKILL. The host is the fake kernel (the emulated host
//! runs the same daemon on the real kernel: tests/real-kernel).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use vf_provisioner::layouts;
use vf_provisioner::sysfs::link_name;
use vfio_manager::api::{self, Lease, Request};

fn req(id: &str, vm: &str, count: u32) -> Request {
    Request {
        request_id: id.into(),
        vm_name: vm.into(),
        vm_uuid: String::new(),
        profile: "vf".into(),
        count,
        numa_node: -1,
        ..Request::default()
    }
}

fn addrs(l: &Lease) -> Vec<String> {
    l.devices.iter().map(|d| d.address.clone()).collect()
}

#[test]
fn a_lease_is_idempotent_and_its_release_returns_the_devices() {
    let bus = Bus::open();
    let d = Daemon::start(&bus, layouts::large(2, 4), "", &[]);
    let c = bus.client();
    let l = c.provision(&req("r1", "web-1", 2)).unwrap();
    assert_eq!(l.devices.len(), 2);
    for a in addrs(&l) {
        assert_eq!(driver(&d.root, &a).as_deref(), Some("vfio-pci"), "{a}");
    }
    assert!(l.devices[0]
        .sysfs_path
        .ends_with(&format!("{}/", l.devices[0].address)));
    assert!(l.devices[0].vfio_path.starts_with("/dev/vfio/"));
    assert_eq!(
        l.devices[0].ch_device,
        format!("path=/sys/bus/pci/devices/{}/", l.devices[0].address)
    );
    let a: vf_provisioner::PciAddress = l.devices[0].address.parse().unwrap();
    assert_eq!(
        l.devices[0].libvirt_hostdev,
        format!("<hostdev mode=\"subsystem\" type=\"pci\" managed=\"no\"><source><address domain=\"0x0000\" bus=\"0x{:02x}\" slot=\"0x00\" function=\"0x{:x}\"/></source></hostdev>", a.bus, a.function)
    );
    // The same request id: the same lease, nothing new bound.
    assert_eq!(c.provision(&req("r1", "web-1", 2)).unwrap(), l);
    // The same id with other parameters is a mistake, not a second lease.
    assert_eq!(
        error_name(&c.provision(&req("r1", "web-1", 3)).unwrap_err()),
        "BadInput"
    );
    let table = c.devices().unwrap();
    let leased: Vec<_> = table.iter().filter(|d| d.lease_id == l.id).collect();
    assert_eq!(leased.len(), 2);
    assert!(leased
        .iter()
        .all(|d| d.vm_name == "web-1" && d.driver == "vfio-pci"));

    assert!(c.release(&l.id).unwrap());
    for a in addrs(&l) {
        assert_eq!(
            driver(&d.root, &a).as_deref(),
            Some("mtgpu"),
            "{a} back on its driver"
        );
    }
    // Releasing again is not an error; the request id cannot come back.
    assert!(!c.release_request("r1").unwrap());
    assert!(!c.release(&l.id).unwrap());
    assert_eq!(
        error_name(&c.provision(&req("r1", "web-1", 2)).unwrap_err()),
        "BadInput"
    );
    assert_eq!(
        error_name(&c.release("0123456789abcdef").unwrap_err()),
        "NotFound"
    );
    assert_eq!(
        error_name(&c.release_request("no-such-request").unwrap_err()),
        "NotFound"
    );
    // A request id is not a lease id.
    assert_eq!(error_name(&c.release("r1").unwrap_err()), "BadInput");
    assert!(c.leases().unwrap().is_empty());
    let audit = d.audit_text();
    assert!(
        audit.contains("\"op\":\"provision\"") && audit.contains("\"op\":\"release\""),
        "{audit}"
    );
}

/// A released request id is refused for `released_retention_days` (90 by default),
/// then forgotten at the next start (or hourly prune) and free to name a new lease.
#[test]
fn released_request_ids_are_forgotten_after_their_retention() {
    let bus = Bus::open();
    let mut d = Daemon::start(&bus, layouts::large(1, 2), "", &[]);
    let c = bus.client();
    for id in ["old", "recent"] {
        let l = c.provision(&req(id, "vm-r", 1)).unwrap();
        assert!(c.release(&l.id).unwrap());
    }
    d.stop();
    // Age one of them past the window while the daemon is down.
    let db = rusqlite::Connection::open(d.state.join("state.db")).unwrap();
    let aged = db
        .execute(
            "UPDATE released SET released_at = released_at - 91 * 86400 WHERE request_id = 'old'",
            [],
        )
        .unwrap();
    assert_eq!(aged, 1);
    drop(db);
    d.restart();
    assert!(
        d.log_text()
            .contains("forgot 1 request ids released over 90 days ago"),
        "{}",
        d.log_text()
    );
    let again = c.provision(&req("old", "vm-r", 1)).unwrap();
    assert_eq!(
        again.request_id, "old",
        "a new lease under the forgotten id"
    );
    assert_eq!(
        error_name(&c.provision(&req("recent", "vm-r", 1)).unwrap_err()),
        "BadInput",
        "the recent one is still refused"
    );
}

/// Preferred PFs are taken first, in the order given; NUMA narrows the choice;
/// the table's candidates come in pages, and a page whose every VF is refused
/// (here held open by a VMM) does not end the search.
#[test]
fn preferences_numa_and_refusals_pick_the_devices() {
    let bus = Bus::open();
    let d = Daemon::start(&bus, layouts::large(6, 4), "", &[]);
    let c = bus.client();
    // More than a page of the table's candidates.
    let held = (0x10..=0x13)
        .flat_map(|b| (1..=4).map(move |f| format!("0000:{b:02x}:00.{f}")))
        .chain(["0000:14:00.1".to_string()]);
    for (pid, a) in (5000..).zip(held) {
        c.bind(&a, false).unwrap();
        let link = d
            .root
            .join("sys/bus/pci/devices")
            .join(&a)
            .join("iommu_group");
        let group = link_name(&link).unwrap().parse().unwrap();
        vf_provisioner::fake::hold_group(&d.root, pid, "qemu-system-x86", group).unwrap();
    }
    let first = c.provision(&req("p1", "vm-a", 1)).unwrap();
    assert_eq!(addrs(&first), ["0000:14:00.2"], "past 17 refused ones");
    let mut preferring = req("p2", "vm-b", 4);
    preferring.pfs = vec!["15:00.0".into(), "0000:14:00.0".into()];
    let l = c.provision(&preferring).unwrap();
    assert_eq!(
        addrs(&l),
        [
            "0000:15:00.1",
            "0000:15:00.2",
            "0000:15:00.3",
            "0000:15:00.4"
        ]
    );
    let mut near = req("p3", "vm-c", 1);
    near.pfs = vec!["15:00.0".into()];
    near.numa_node = 0;
    assert_eq!(addrs(&c.provision(&near).unwrap()), ["0000:14:00.3"]);
    let e = c.provision(&req("p4", "vm-d", 2)).unwrap_err();
    assert_eq!(error_name(&e), "NoDevice", "{e}");
    let e = e.to_string();
    assert!(
        e.contains("1 free (17 more unleased but unfit: held open"),
        "{e}"
    );
    drop(d);
}

#[test]
fn bad_requests_get_typed_errors_and_change_nothing() {
    let bus = Bus::open();
    let d = Daemon::start(&bus, layouts::large(1, 2), "", &[]);
    let c = bus.client();
    let before = vf_provisioner::fake::Layout::capture(
        &vf_provisioner::Sysfs::open_fake(&d.root).unwrap(),
        "x",
    );
    let mut bad_profile = req("b1", "vm", 1);
    bad_profile.profile = "gpu-please".into();
    let mut bad_uuid = req("b2", "vm", 1);
    bad_uuid.vm_uuid = "not-a-uuid".into();
    let mut bad_pf = req("b3", "vm", 1);
    bad_pf.pfs = vec!["../../etc".into()];
    for (r, want) in [
        (req("b0", "vm", 0), "BadInput"),
        (req("b4", "vm", 1000), "BadInput"),
        (req("b5", "", 1), "BadInput"),
        (bad_profile, "BadInput"),
        (bad_uuid, "BadInput"),
        (bad_pf, "BadInput"),
        (req("b6", "vm", 3), "NoDevice"),
    ] {
        let e = c.provision(&r).unwrap_err();
        assert_eq!(error_name(&e), want, "{r:?}: {e}");
    }
    let e = c.provision(&req("b7", "vm", 3)).unwrap_err().to_string();
    assert!(
        e.contains("3 wanted") && e.contains("2 free") && e.contains("vfctl leases"),
        "{e}"
    );
    assert_eq!(
        error_name(&c.bind("0000:99:00.0", false).unwrap_err()),
        "NotFound"
    );
    assert_eq!(error_name(&c.enable("zz", 2).unwrap_err()), "BadInput");
    let after = vf_provisioner::fake::Layout::capture(
        &vf_provisioner::Sysfs::open_fake(&d.root).unwrap(),
        "x",
    );
    assert_eq!(
        serde_json::to_string(&before).unwrap(),
        serde_json::to_string(&after).unwrap(),
        "a refused request changed the host"
    );
    assert!(c.leases().unwrap().is_empty());
}

#[test]
fn a_device_held_open_is_never_reclaimed_and_leased_devices_refuse_direct_changes() {
    let bus = Bus::open();
    let d = Daemon::start(&bus, layouts::large(1, 2), "", &[]);
    let c = bus.client();
    let l = c.provision(&req("h1", "vm-h", 1)).unwrap();
    let a = l.devices[0].address.clone();
    let group: u32 = l.devices[0]
        .vfio_path
        .trim_start_matches("/dev/vfio/")
        .parse()
        .unwrap();
    // A VMM opens the group; release must refuse and leave everything as it is.
    vf_provisioner::fake::hold_group(&d.root, 4242, "qemu-system-x86", group).unwrap();
    let e = c.release(&l.id).unwrap_err();
    assert_eq!(error_name(&e), "Refused");
    assert!(
        e.to_string().contains("qemu-system-x86 (pid 4242)") && e.to_string().contains(&a),
        "{e}"
    );
    assert_eq!(driver(&d.root, &a).as_deref(), Some("vfio-pci"));
    vf_provisioner::fake::end_process(&d.root, 4242).unwrap();
    // Direct requests cannot take a leased device away either.
    let e = c.unbind(&a, false).unwrap_err();
    assert_eq!(error_name(&e), "Refused");
    assert!(e.to_string().contains("vm-h"), "{e}");
    assert_eq!(
        error_name(&c.disable("0000:10:00.0").unwrap_err()),
        "Refused"
    );
    assert!(c.release(&l.id).unwrap());
    assert_eq!(
        vf_provisioner::fake::reset_count(&d.root, &a.parse().unwrap()),
        1,
        "released devices are reset"
    );
}

#[test]
fn sixty_four_concurrent_clients_never_share_a_device() {
    let bus = Arc::new(Bus::open());
    // 48 VFs for 64 clients: 16 must be told there is none left.
    let _d = Daemon::start(&bus, layouts::large(6, 8), "", &[]);
    let handles: Vec<_> = (0..64)
        .map(|i| {
            let bus = bus.clone();
            std::thread::spawn(move || {
                bus.client()
                    .provision(&req(&format!("c{i}"), &format!("vm-{i}"), 1))
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let leases: Vec<&Lease> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    let refused: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(leases.len(), 48);
    assert!(
        refused.iter().all(|e| error_name(e) == "NoDevice"),
        "{refused:?}"
    );
    let devices: BTreeSet<String> = leases.iter().flat_map(|l| addrs(l)).collect();
    assert_eq!(devices.len(), 48, "a device was given twice");
    assert_eq!(bus.client().leases().unwrap().len(), 48);
}

#[test]
fn a_non_privileged_caller_is_refused_by_the_daemon_and_by_the_bus_policy() {
    if !is_root() {
        eprintln!("SKIPPED: running a caller as another uid needs root (run the tests as root)");
        return;
    }
    let run_as_nobody = |bus: &Bus, args: &[&str]| {
        let (code, out, err) = vfctl_as(bus, 65534, args);
        (code, err, out)
    };
    // A permissive bus: the daemon's own check refuses.
    let bus = Bus::open();
    let d = Daemon::start(&bus, layouts::large(1, 2), "", &[]);
    let (code, err, _) = run_as_nobody(&bus, &["provision", "--vm", "intruder"]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("uid 65534 may not provision devices") && err.contains("vfio-manager"),
        "{err}"
    );
    let (code, _, out) = run_as_nobody(&bus, &["list"]);
    assert_eq!(code, 0, "reading is allowed");
    assert!(out.contains("0000:10:00.1"));
    assert!(!d.audit_text().contains("\"result\":\"ok\""));
    drop(d);
    // The project's policy file on the bus: the bus itself refuses.
    let bus = Bus::with_project_policy();
    let _d = Daemon::start(&bus, layouts::large(1, 2), "", &[]);
    let (code, err, _) = run_as_nobody(&bus, &["provision", "--vm", "intruder"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("the system bus refused the call"), "{err}");
    for reading in [
        &["leases"][..],
        &["list"],
        &["mdev", "list"],
        &["swaps", "0123456789abcdef"],
    ] {
        let (code, err, _) = run_as_nobody(&bus, reading);
        assert_eq!(code, 0, "{reading:?}: {err}");
    }
    let (code, err, _) = vfctl(&bus, &["provision", "--vm", "root-vm"]);
    assert_eq!(code, 0, "root may: {err}");
}

#[test]
fn sigkill_at_random_points_loses_and_doubles_nothing() {
    let seed = crash_seed();
    let bus = Bus::open();
    let mut d = Daemon::start(&bus, layouts::large(3, 4), "", &[]);
    let root = d.root.clone();
    let c = bus.client();
    let mut rng = Rng(seed);
    // What the client was told, and believes.
    let mut held: BTreeMap<String, Lease> = BTreeMap::new();
    let mut kills = 0;
    let mut next_id = 0;
    // The killer: a thread that SIGKILLs the daemon's pid after a random delay.
    let ops = 220;
    for op in 0..ops {
        let kill_after = (rng.below(3) == 0).then(|| Duration::from_micros(rng.below(4000)));
        let killer = kill_after.map(|after| d.kill_after(after));
        let release = !held.is_empty() && rng.below(2) == 0;
        let (key, request) = if release {
            let k = held
                .keys()
                .nth(rng.below(held.len() as u64) as usize)
                .unwrap()
                .clone();
            (k, None)
        } else {
            next_id += 1;
            let r = req(
                &format!("op{next_id}"),
                &format!("vm-{op}"),
                1 + rng.below(2) as u32,
            );
            (r.request_id.clone(), Some(r))
        };
        // Retry the same request until the daemon gives a definite answer.
        let mut restarts = 0;
        loop {
            let answer = match &request {
                Some(r) => c.provision(r).map(Some),
                None => c.release_request(&key).map(|_| None),
            };
            match answer {
                Ok(Some(l)) => {
                    held.insert(l.request_id.clone(), l);
                    break;
                }
                Ok(None) => {
                    held.remove(&key);
                    break;
                }
                Err(e) if error_name(&e) == "NoDevice" => break,
                Err(e)
                    if matches!(
                        error_name(&e).as_str(),
                        "BadInput" | "Refused" | "NotFound" | "PermissionDenied"
                    ) =>
                {
                    panic!("op {op}: unexpected refusal {e}; log:\n{}", d.log_text())
                }
                Err(e) => {
                    // A failure that outlives restarts is a bug, not a crash.
                    assert!(
                        restarts < 10,
                        "op {op}: {e} after {restarts} restarts; log:\n{}",
                        d.log_text()
                    );
                    d.restart_after(killer.as_ref());
                    kills += 1;
                    restarts += 1;
                }
            }
        }
        kills += d.reap(killer) as u32;
    }
    d.restart();
    eprintln!(
        "{ops} operations, {kills} daemon kills, {} leases held at the end",
        held.len()
    );
    assert!(
        kills >= 20,
        "the test must really kill the daemon (killed {kills} times)"
    );
    let leases: BTreeMap<String, Lease> = c
        .leases()
        .unwrap()
        .into_iter()
        .map(|l| (l.request_id.clone(), l))
        .collect();
    assert_eq!(
        leases.keys().collect::<Vec<_>>(),
        held.keys().collect::<Vec<_>>(),
        "leases lost or invented (seed {seed})"
    );
    for (k, l) in &held {
        assert_eq!(
            addrs(&leases[k]),
            addrs(l),
            "lease {k} changed devices (seed {seed})"
        );
    }
    let leased: Vec<String> = leases.values().flat_map(addrs).collect();
    let unique: BTreeSet<&String> = leased.iter().collect();
    assert_eq!(
        unique.len(),
        leased.len(),
        "a device is in two leases (seed {seed})"
    );
    // The table equals sysfs: leased devices on vfio-pci, the rest back on mtgpu.
    for dev in c.devices().unwrap() {
        let now = driver(&root, &dev.address).unwrap_or_default();
        assert_eq!(
            dev.driver, now,
            "{}: table says {:?}, sysfs {:?} (seed {seed})",
            dev.address, dev.driver, now
        );
        if dev.pf.is_empty() {
            continue;
        }
        let want = if unique.contains(&dev.address) {
            "vfio-pci"
        } else {
            "mtgpu"
        };
        assert_eq!(
            now,
            want,
            "{} (seed {seed}); log:\n{}",
            dev.address,
            d.log_text()
        );
    }
}

#[test]
fn boot_restores_the_configured_state_and_tells_systemd_it_is_ready() {
    use std::os::unix::net::UnixDatagram;
    let bus = Bus::open();
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let root = dir.path().join("host");
    layouts::emulated().build(&root).unwrap();
    let cfg = dir.path().join("config.toml");
    std::fs::write(
        &cfg,
        "manage = [\"8086:10c9\", \"1b36:0010\"]\nbind = [\"0000:01:10.2\"]\n[[pf]]\naddress = \"0000:01:00.0\"\nvfs = 3\n[[pf]]\naddress = \"0000:02:00.0\"\nvfs = 2\n",
    )
    .unwrap();
    let mut child = std::process::Command::new(&*DAEMON)
        .arg("--fake-kernel")
        .arg("--root")
        .arg(&root)
        .arg("--config")
        .arg(&cfg)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--audit-log")
        .arg(dir.path().join("audit.log"))
        .arg("--bus-address")
        .arg(&bus.address)
        .arg("--no-uevents")
        .env("NOTIFY_SOCKET", &sock_path)
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("READY=1 within 30 s");
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(msg.contains("READY=1"), "{msg}");
    // By READY the configured state is there: VFs, and the binding.
    let num = |pf: &str| {
        std::fs::read_to_string(
            root.join("sys/bus/pci/devices")
                .join(pf)
                .join("sriov_numvfs"),
        )
        .unwrap()
    };
    assert_eq!(num("0000:01:00.0").trim(), "3");
    assert_eq!(num("0000:02:00.0").trim(), "2");
    assert_eq!(driver(&root, "0000:01:10.2").as_deref(), Some("vfio-pci"));
    assert_eq!(
        driver(&root, "0000:01:10.0"),
        None,
        "autoprobe was off: no driver took the others"
    );
    assert!(bus
        .client()
        .devices()
        .unwrap()
        .iter()
        .any(|d| d.address == "0000:02:00.2"));
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    let n = sock.recv(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
}

#[test]
fn drift_behind_the_daemons_back_is_repaired_at_start_and_logged() {
    let bus = Bus::open();
    let mut d = Daemon::start(&bus, layouts::large(1, 2), "", &[]);
    let c = bus.client();
    let l = c.provision(&req("d1", "vm-d", 1)).unwrap();
    let a = l.devices[0].address.clone();
    d.kill();
    // Someone unbinds the leased VF by hand while the daemon is down.
    let sys = vf_provisioner::Sysfs::open_fake(&d.root).unwrap();
    let addr: vf_provisioner::PciAddress = a.parse().unwrap();
    sys.write(&addr, &sys.driver_attr("vfio-pci", "unbind"), &a)
        .unwrap();
    assert_eq!(driver(&d.root, &a), None);
    d.restart();
    assert_eq!(driver(&d.root, &a).as_deref(), Some("vfio-pci"));
    let log = d.log_text();
    assert!(
        log.contains(&format!("drift: {a} of lease {}", l.id)) && log.contains("rebound: ok"),
        "{log}"
    );
    assert_eq!(c.leases().unwrap(), vec![l]);
}

#[test]
fn metrics_are_valid_prometheus_text() {
    let bus = Bus::open();
    let listen = free_listen_address();
    let d = Daemon::start(
        &bus,
        layouts::large(1, 3),
        "",
        &["--metrics-listen", &listen],
    );
    let c = bus.client();
    c.provision(&req("m1", "vm-m", 2)).unwrap();
    let _ = c.provision(&req("m2", "vm-m", 2)).unwrap_err();
    let body = http_get(&listen, "/metrics");
    assert!(
        body.contains("vfio_manager_devices{state=\"leased\"} 2"),
        "{body}"
    );
    assert!(body.contains("vfio_manager_leases 1"));
    // Health as `vfctl health` has it: 1 PF and 3 VFs, healthy; AER counts per device.
    assert!(
        body.contains("vfio_manager_device_health{state=\"healthy\"} 4")
            && body.contains("vfio_manager_device_health{state=\"failed\"} 0"),
        "{body}"
    );
    assert!(
        body.contains("vfio_manager_aer_errors{device=\"0000:10:00.1\",severity=\"nonfatal\"} 0"),
        "{body}"
    );
    assert!(body.contains("vfio_manager_operation_duration_seconds_count{op=\"provision\"} 2"));
    assert!(body
        .contains("vfio_manager_operation_errors_total{op=\"provision\",error=\"no_device\"} 1"));
    assert!(http_get(&listen, "/other").contains("only GET /metrics"));
    let promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let Ok(mut p) = promtool else {
        eprintln!("SKIPPED the promtool half: promtool (Debian package prometheus) is not installed; `make deps` installs it");
        return;
    };
    use std::io::Write;
    p.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let o = p.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    drop(d);
}

/// A flood of idle connections (far past the endpoint's limit, each holding a
/// socket open without a byte) neither changes a D-Bus answer while it lasts nor
/// closes the endpoint: after it, and after a slow drip, a scrape is answered.
#[test]
fn a_flood_of_idle_connections_leaves_metrics_and_dbus_answering() {
    let bus = Bus::open();
    let listen = free_listen_address();
    let d = Daemon::start(
        &bus,
        layouts::large(1, 2),
        "",
        &["--metrics-listen", &listen],
    );
    // Fewer descriptors than the flood has connections, as on a host with the
    // common limit of 1024 under a bigger flood.
    let limit = libc::rlimit {
        rlim_cur: 256,
        rlim_max: 256,
    };
    // SAFETY: prlimit(2) on our own child's pid, with a valid rlimit and no old value.
    let r = unsafe {
        libc::prlimit(
            d.pid() as i32,
            libc::RLIMIT_NOFILE,
            &limit,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(r, 0, "prlimit: {}", std::io::Error::last_os_error());
    let c = bus.client();
    let before = c.devices().unwrap();
    let flood: Vec<std::net::TcpStream> = (0..400)
        .filter_map(|_| std::net::TcpStream::connect(&listen).ok())
        .collect();
    assert!(flood.len() > 100, "the flood connected: {}", flood.len());
    for _ in 0..20 {
        assert_eq!(
            c.devices().unwrap(),
            before,
            "a D-Bus answer changed under the flood"
        );
    }
    c.provision(&req("f1", "vm-f", 1)).unwrap();
    // A slow drip: one byte a second never finishes its headers in time.
    let mut drip = std::net::TcpStream::connect(&listen).unwrap();
    std::thread::spawn(move || {
        use std::io::Write;
        for _ in 0..30 {
            if drip.write_all(b"G").is_err() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    });
    drop(flood);
    let body = http_get(&listen, "/metrics");
    assert!(
        body.contains("vfio_manager_devices{state=\"leased\"} 1"),
        "{body}"
    );
    assert!(
        d.log_text().len() < 64 << 10,
        "the flood did not flood the log"
    );
}

/// A loopback HOST:PORT nobody listens on now.
fn free_listen_address() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let get = || -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect(addr)?;
        // In two segments, as a request may come: the daemon must read up to the
        // blank line before it answers.
        s.set_nodelay(true)?;
        let request = format!("GET {path} HTTP/1.0\r\n\r\n");
        let (first, rest) = request.split_at(8);
        s.write_all(first.as_bytes())?;
        std::thread::sleep(std::time::Duration::from_millis(20));
        s.write_all(rest.as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    };
    // Seen once under a loaded machine: a connection reset before the request was
    // written. A scraper retries; so does this.
    let out = (0..5)
        .find_map(|_| {
            get()
                .map_err(|e| {
                    eprintln!("GET {path}: {e}; retrying");
                    std::thread::sleep(std::time::Duration::from_millis(100))
                })
                .ok()
        })
        .expect("GET succeeds within 5 tries");
    // The body only: promtool reads exposition text, not HTTP.
    out.split_once("\r\n\r\n")
        .map_or(out.clone(), |(_, body)| body.to_string())
}

#[test]
fn vfctl_talks_to_the_daemon_and_says_how_to_start_it_when_absent() {
    let bus = Bus::open();
    let d = Daemon::start(&bus, layouts::large(1, 2), "", &[]);
    let (code, out, err) = vfctl(
        &bus,
        &[
            "provision",
            "--vm",
            "db-1",
            "--count",
            "2",
            "--request-id",
            "v1",
            "-o",
            "json",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = v["leases"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(v["leases"][0]["devices"].as_array().unwrap().len(), 2);
    let (_, out, _) = vfctl(&bus, &["leases"]);
    assert!(out.contains(&format!("lease {id} for VM db-1")), "{out}");
    let (code, out, _) = vfctl(&bus, &["list"]);
    assert_eq!(code, 0);
    assert!(
        out.lines().next().unwrap().starts_with("ADDRESS") && out.contains("db-1"),
        "{out}"
    );
    let (code, _, err) = vfctl(&bus, &["provision", "--vm", "db-2", "--count", "1"]);
    assert_eq!(code, 3, "no device left: refused");
    assert!(err.contains("no free device for VM db-2"), "{err}");
    let (code, _, err) = vfctl(&bus, &["unbind", "0000:10:00.1"]);
    assert_eq!(code, 3, "{err}");
    let (code, out, _) = vfctl(&bus, &["release", &id]);
    assert_eq!(code, 0);
    assert!(out.contains("released"));
    let (code, out, err) = vfctl(&bus, &["provision", "--vm", "q", "--format", "qemu"]);
    assert_eq!(code, 0, "{err}");
    let vf = out
        .trim()
        .strip_prefix("-device vfio-pci,host=")
        .unwrap_or_default();
    assert!(
        vf.starts_with("0000:10:") && vf.ends_with(",id=hostdev0"),
        "QEMU's -device argument as libvirt passes it: {out}"
    );
    drop(d);
    let (code, _, err) = vfctl(&bus, &["leases"]);
    assert_eq!(code, 1);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("vfio-managerd is not running") && err.contains("--direct"),
        "{err}"
    );
}

#[test]
fn the_api_is_introspectable_with_busctl() {
    let bus = Bus::open();
    let _d = Daemon::start(&bus, layouts::large(1, 1), "", &[]);
    const DEVICE: &str = "/org/vfiomanager/VfioManager1/device/0000_10_00_1";
    let Some(text) = busctl(&bus, &["introspect", api::BUS_NAME, api::MANAGER_PATH]) else {
        eprintln!("SKIPPED: busctl (Debian package systemd) is not installed");
        return;
    };
    let device = busctl(&bus, &["introspect", api::BUS_NAME, DEVICE]).unwrap();
    // docs/dbus-api.md lists every member of our two interfaces with its signature.
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/dbus-api.md"))
        .unwrap();
    let members = [&*text, &*device]
        .into_iter()
        .flat_map(our_members)
        .collect::<Vec<_>>();
    assert!(members.len() > 25, "{members:?}");
    for (name, kind, sig, out) in members {
        let row = match kind.as_str() {
            "method" => format!("| `{name}` | `{sig}` | `{out}` |"),
            _ => format!("| `{name}` | `{sig}` |"),
        };
        assert!(
            doc.contains(&row),
            "docs/dbus-api.md lacks the {kind} row {row}"
        );
    }
    // State properties announce no change (a caching proxy must not cache them).
    let flags = |name: &str| {
        device
            .lines()
            .find(|l| l.starts_with(&format!(".{name} ")))
            .map(|l| l.split_whitespace().last().unwrap_or("").to_string())
    };
    assert_eq!(flags("Driver").as_deref(), Some("-"), "{device}");
    assert_eq!(flags("Address").as_deref(), Some("const"), "{device}");
    let driver = busctl(
        &bus,
        &[
            "get-property",
            api::BUS_NAME,
            DEVICE,
            api::DEVICE_IFACE,
            "Driver",
        ],
    );
    assert_eq!(driver.unwrap().trim(), "s \"mtgpu\"");
}

/// busctl's output for `args` on `bus`; None if busctl is not installed.
fn busctl(bus: &Bus, args: &[&str]) -> Option<String> {
    let o = std::process::Command::new("busctl")
        .arg(format!("--address={}", bus.address))
        .args(args)
        .output()
        .ok()?;
    assert!(
        o.status.success(),
        "busctl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Some(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// (name, kind, signature, result) of each member of our interfaces in busctl's
/// introspect table.
fn our_members(table: &str) -> Vec<(String, String, String, String)> {
    let mut ours = false;
    let mut out = Vec::new();
    for line in table.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            [iface, "interface", ..] => ours = iface.starts_with("org.vfiomanager."),
            [name, kind, sig, result, ..] if ours && name.starts_with('.') => out.push((
                name[1..].to_string(),
                kind.to_string(),
                sig.to_string(),
                result.to_string(),
            )),
            _ => {}
        }
    }
    out
}

#[test]
fn signals_announce_leases_and_devices() {
    let bus = Bus::open();
    let d = Daemon::start(&bus, layouts::emulated(), "manage = [\"8086:10c9\"]\n", &[]);
    let rule = "type='signal',interface='org.vfiomanager.VfioManager1.Manager'";
    let monitor = Monitor::start(&bus, rule).expect("dbus-monitor (Debian package dbus-bin)");
    let c = bus.client();
    // No VFs yet: the lease enables them, and they are announced.
    let l = c.provision(&req("s1", "vm-s", 1)).unwrap();
    c.release(&l.id).unwrap();
    c.disable("0000:01:00.0").unwrap();
    let text = monitor.stop(Duration::from_millis(300));
    for (member, arg) in [
        ("DeviceAdded", "0000:01:10.0"),
        ("LeaseCreated", l.id.as_str()),
        ("LeaseReleased", l.id.as_str()),
        ("DeviceRemoved", "0000:01:10.0"),
    ] {
        let at = text
            .find(&format!("member={member}"))
            .unwrap_or_else(|| panic!("no {member} in:\n{text}"));
        assert!(text[at..].contains(arg), "{member} without {arg}:\n{text}");
    }
    drop(d);
}
