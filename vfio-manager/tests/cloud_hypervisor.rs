//! `vfctl attach/detach` with the real daemon and bus, against an API socket that
//! answers as cloud-hypervisor's REST API documents (vm.add-device, vm.remove-device,
//! vm.info, vmm.ping). No cloud-hypervisor binary can be installed here; this checks
//! our side of that protocol and the lease flow. The nested-VM test with the real
//! binary is in the emulated host's tier, run where `CLOUD_HYPERVISOR` names one.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::{driver, vfctl, Bus, Daemon};
use serde_json::{json, Value};
use vf_provisioner::layouts;

/// The VM as the API server holds it.
#[derive(Default)]
struct Vm {
    /// Its devices (id -> path).
    devices: Mutex<BTreeMap<String, String>>,
    /// Set: the VMM exits on the next vm.info, unanswered (its socket goes).
    exit_on_info: AtomicBool,
    /// Set: created, not booted. cloud-hypervisor then answers vm.add-device with
    /// 204 and no body, and keeps the device in the configuration for the boot.
    not_booted: AtomicBool,
}

/// Serves cloud-hypervisor's API on `socket` until the socket file is removed.
/// Adding a device whose path contains `fail_path` answers HTTP 500.
fn api_server(socket: &Path, fail_path: Option<&str>) -> Arc<Vm> {
    let listener = UnixListener::bind(socket).unwrap();
    let vm: Arc<Vm> = Arc::default();
    let (v, fail, path) = (vm.clone(), fail_path.map(str::to_string), socket.to_owned());
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            serve(s, &v, fail.as_deref(), &path);
        }
    });
    vm
}

fn serve(s: UnixStream, vm: &Vm, fail: Option<&str>, socket: &Path) {
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut len = 0;
    loop {
        let mut h = String::new();
        r.read_line(&mut h).unwrap();
        if h.trim().is_empty() {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).unwrap();
    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if path == "/api/v1/vm.info" && vm.exit_on_info.load(Ordering::SeqCst) {
        std::fs::remove_file(socket).unwrap();
        return;
    }
    let mut devs = vm.devices.lock().unwrap();
    let (status, answer) = match path.as_str() {
        "/api/v1/vm.add-device" => {
            let p = req["path"].as_str().unwrap().to_string();
            if fail.is_some_and(|f| p.contains(f)) {
                (500, json!("Failed to add VFIO device").to_string())
            } else {
                let id = req["id"].as_str().unwrap().to_string();
                devs.insert(id.clone(), p);
                let bdf = format!("0000:00:{:02x}.0", 5 + devs.len());
                if vm.not_booted.load(Ordering::SeqCst) {
                    (204, String::new())
                } else {
                    (200, json!({ "id": id, "bdf": bdf }).to_string())
                }
            }
        }
        "/api/v1/vm.remove-device" => {
            devs.remove(req["id"].as_str().unwrap());
            (204, String::new())
        }
        "/api/v1/vm.info" => {
            let list: Vec<Value> = devs
                .iter()
                .map(|(id, p)| json!({ "id": id, "path": p }))
                .collect();
            (
                200,
                json!({ "state": if vm.not_booted.load(Ordering::SeqCst) { "Created" } else { "Running" }, "config": { "devices": list } }).to_string(),
            )
        }
        "/api/v1/vmm.ping" => (200, json!({ "version": "v45.0" }).to_string()),
        _ => (404, String::new()),
    };
    let mut w = s;
    let _ = write!(
        w,
        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\n\r\n{answer}",
        answer.len()
    );
}

fn socket(d: &Daemon) -> PathBuf {
    d.dir.path().join("ch.sock")
}

#[test]
fn attach_hot_adds_leased_devices_and_detach_removes_and_releases() {
    let bus = Bus::open();
    let d = Daemon::start(&bus, layouts::large(2, 2), "", &[]);
    let sock = socket(&d);
    let vm = api_server(&sock, None);
    let s = sock.to_str().unwrap();
    let (code, out, err) = vfctl(
        &bus,
        &[
            "-o",
            "json",
            "attach",
            "--ch-socket",
            s,
            "--vm",
            "ch1",
            "--count",
            "2",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let leased: Vec<String> = v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["address"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(leased.len(), 2);
    {
        let devs = vm.devices.lock().unwrap();
        for a in &leased {
            let id = vfio_manager::ch::device_id(a);
            assert_eq!(
                devs.get(&id),
                Some(&format!("/sys/bus/pci/devices/{a}/")),
                "{devs:?}"
            );
            assert_eq!(driver(&d.root, a).as_deref(), Some("vfio-pci"));
        }
    }
    let (code, _, err) = vfctl(&bus, &["detach", "--ch-socket", s, "--vm", "ch1"]);
    assert_eq!(code, 0, "{err}");
    assert!(vm.devices.lock().unwrap().is_empty(), "removed from the VM");
    assert!(bus.client().leases().unwrap().is_empty(), "released");
    for a in &leased {
        assert_ne!(driver(&d.root, a).as_deref(), Some("vfio-pci"));
    }
}

#[test]
fn a_vm_not_yet_booted_takes_the_devices_into_its_configuration() {
    let bus = Bus::open();
    let _d = Daemon::start(&bus, layouts::large(1, 2), "", &[]);
    let sock = socket(&_d);
    let vm = api_server(&sock, None);
    vm.not_booted.store(true, Ordering::SeqCst);
    let s = sock.to_str().unwrap();
    let (code, out, err) = vfctl(&bus, &["attach", "--ch-socket", s, "--vm", "ch1"]);
    assert_eq!(code, 0, "an empty 204 is success: {err}");
    assert!(out.contains("opens it at boot"), "{out}");
    let lease = bus.client().leases().unwrap().remove(0);
    let id = vfio_manager::ch::device_id(&lease.devices[0].address);
    assert!(
        vm.devices.lock().unwrap().contains_key(&id),
        "in the VM's configuration"
    );
    let (code, out, err) = vfctl(
        &bus,
        &["-o", "json", "attach", "--ch-socket", s, "--vm", "ch1"],
    );
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["devices"][0]["bdf"], Value::Null, "{out}");
    let (code, _, err) = vfctl(&bus, &["detach", "--ch-socket", s, "--vm", "ch1"]);
    assert_eq!(code, 0, "{err}");
    assert!(bus.client().leases().unwrap().is_empty());
}

#[test]
fn a_failed_hot_add_removes_what_was_added_and_releases() {
    let bus = Bus::open();
    let d = Daemon::start(&bus, layouts::large(2, 2), "", &[]);
    let sock = socket(&d);
    // The second device (in address order) fails to add.
    let vm = api_server(&sock, Some("0000:10:00.2"));
    let (code, _, err) = vfctl(
        &bus,
        &[
            "attach",
            "--ch-socket",
            sock.to_str().unwrap(),
            "--vm",
            "ch1",
            "--count",
            "2",
        ],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("vm.add-device") && err.contains("HTTP 500") && err.contains("ch.sock"),
        "{err}"
    );
    assert!(
        vm.devices.lock().unwrap().is_empty(),
        "the first device was removed again"
    );
    assert!(
        bus.client().leases().unwrap().is_empty(),
        "and the lease released"
    );
    // No VM at all: said so, nothing leased.
    let (code, _, err) = vfctl(
        &bus,
        &[
            "attach",
            "--ch-socket",
            "/nonexistent/ch.sock",
            "--vm",
            "ch1",
        ],
    );
    assert_ne!(code, 0);
    assert!(err.contains("--api-socket /nonexistent/ch.sock"), "{err}");
    assert!(bus.client().leases().unwrap().is_empty());
}

#[test]
fn watch_releases_when_the_vm_exits() {
    watch_until_exit(false);
}

/// The VMM exits between the watch's liveness check and its device query.
#[test]
fn watch_releases_when_the_vm_exits_while_answering() {
    watch_until_exit(true);
}

fn watch_until_exit(while_answering: bool) {
    let bus = Bus::open();
    let d = Daemon::start(&bus, layouts::large(2, 2), "", &[]);
    let sock = socket(&d);
    let vm = api_server(&sock, None);
    let mut child = std::process::Command::new(&*common::VFCTL)
        .args([
            "attach",
            "--watch",
            "--ch-socket",
            sock.to_str().unwrap(),
            "--vm",
            "ch1",
        ])
        .env("DBUS_SYSTEM_BUS_ADDRESS", &bus.address)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while bus.client().leases().unwrap().is_empty() {
        assert!(t.elapsed().as_secs() < 20, "never attached");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    if while_answering {
        vm.exit_on_info.store(true, Ordering::SeqCst);
    } else {
        // The VMM exits: its API socket goes away.
        std::fs::remove_file(&sock).unwrap();
    }
    let st = child.wait().unwrap();
    assert!(st.success(), "vfctl attach --watch: {st}");
    assert!(
        bus.client().leases().unwrap().is_empty(),
        "released after the VM exited"
    );
}
