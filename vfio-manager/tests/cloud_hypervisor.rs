//! `vfctl attach/detach` with the real daemon and bus, against an API socket that
//! answers as cloud-hypervisor's REST API documents (vm.add-device, vm.remove-device,
//! vm.info, vmm.ping). No cloud-hypervisor binary can be installed here; this checks
//! our side of that protocol and the lease flow. The nested-VM test with the real
//! binary is in the emulated host's tier, run where `CLOUD_HYPERVISOR` names one.

#[path = "common/ch.rs"]
mod ch;
mod common;

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use ch::api_server;
use common::{driver, vfctl, Bus, Daemon};
use serde_json::Value;
use vf_provisioner::layouts;

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
