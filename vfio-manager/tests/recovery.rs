//! Recovery: a leased VF that fails is swapped for a healthy one in the running VM
//! when its lease's policy says `replace`. Real dbus-daemon and vfio-managerd on the
//! fake kernel (`fail_device` makes a function answer all ones, as one that fell
//! off the bus does; the periodic probe finds it), and an API socket that answers
//! as cloud-hypervisor's does. The libvirt side runs against a real libvirtd in
//! `libvirt-hooks/tests/libvirt.rs` and, with a nested guest, in the emulated host.

#[path = "common/ch.rs"]
mod ch;
mod common;

use std::time::Duration;

use common::*;
use vf_provisioner::{fake, layouts};
use vfio_manager::api::{Lease, Request};
use vfio_manager::ch::device_id;

const REPLACE: &str = "[daemon]\nprobe_interval_s = 1\n[recovery]\non_failure = \"replace\"\n";

fn req(id: &str, devices: &[&str], vmm: &str) -> Request {
    Request {
        request_id: id.into(),
        vm_name: "vm1".into(),
        count: devices.len().max(1) as u32,
        devices: devices.iter().map(|d| d.to_string()).collect(),
        vmm: vmm.into(),
        ..Request::default()
    }
}

fn lease(bus: &Bus, id: &str) -> Option<Lease> {
    bus.client()
        .leases()
        .unwrap()
        .into_iter()
        .find(|l| l.id == id)
}

fn names(l: &Lease) -> Vec<String> {
    l.devices.iter().map(|d| d.address.clone()).collect()
}

/// A VM behind an API socket that answers as cloud-hypervisor's, given devices by
/// `vfctl attach --vm vm1` and `want` (its other arguments); returns the VM and the
/// lease.
fn attached(bus: &Bus, d: &Daemon, want: &[&str]) -> (std::sync::Arc<ch::Vm>, Lease) {
    let sock = d.dir.path().join("ch.sock");
    let vm = ch::api_server(&sock, None);
    let mut args = vec![
        "attach",
        "--ch-socket",
        sock.to_str().unwrap(),
        "--vm",
        "vm1",
    ];
    args.extend_from_slice(want);
    let (code, _, err) = vfctl(bus, &args);
    assert_eq!(code, 0, "{err}");
    (vm, bus.client().leases().unwrap().remove(0))
}

fn health(bus: &Bus, name: &str) -> (String, String) {
    let h = bus.client().health().unwrap();
    let i = h.into_iter().find(|i| i.name == name).expect("listed");
    (i.state, i.reason)
}

#[test]
fn a_failed_vf_is_swapped_into_the_running_vm_on_its_numa_node() {
    let bus = Bus::open();
    // PFs 10 and 12 on NUMA node 0, 11 on node 1.
    let d = Daemon::start(&bus, layouts::large(3, 2), REPLACE, &[]);
    let (failed, kept) = ("0000:10:00.1", "0000:10:00.2");
    let (vm, before) = attached(&bus, &d, &["--device", failed, "--device", kept]);
    let monitor = Monitor::start(&bus, "member='LeaseRecovered'");
    fake::fail_device(&d.root, &failed.parse().unwrap()).unwrap();
    wait_for(&d, "the swap", || {
        lease(&bus, &before.id).is_some_and(|l| !names(&l).contains(&failed.to_string()))
    });
    let after = lease(&bus, &before.id).unwrap();
    let new = names(&after).into_iter().find(|n| n != kept).unwrap();
    assert_eq!(
        after.devices.len(),
        2,
        "the lease keeps its id and its size: {after:?}"
    );
    assert!(
        new.starts_with("0000:12:00."),
        "a VF on node 0 (not 11, node 1): {new}"
    );
    assert_eq!(driver(&d.root, &new).as_deref(), Some("vfio-pci"));
    // The VM has the replacement and not the failed one.
    let devs = vm.devices.lock().unwrap().clone();
    assert!(devs.contains_key(&device_id(&new)), "{devs:?}");
    assert!(!devs.contains_key(&device_id(failed)), "{devs:?}");
    assert!(devs.contains_key(&device_id(kept)), "{devs:?}");
    let (state, why) = health(&bus, failed);
    assert_eq!(state, "failed", "held back: {why}");
    let audit = d.audit_text();
    assert!(
        audit.contains("\"op\":\"replace\"") && audit.contains(&new),
        "{audit}"
    );
    // A failed device is never handed out again.
    let e = bus
        .client()
        .provision(&req("again", &[failed], ""))
        .unwrap_err();
    assert_eq!(error_name(&e), "Refused", "{e}");
    match monitor {
        Some(m) => {
            let out = m.stop(Duration::from_millis(300));
            for s in [after.id.as_str(), failed, new.as_str()] {
                assert!(out.contains(s), "LeaseRecovered names {s}: {out}");
            }
        }
        None => eprintln!("SKIPPED the signal check: dbus-monitor is not installed"),
    }
    // Released as one: the replacement goes back to its driver.
    assert!(bus.client().release(&after.id).unwrap());
    assert_ne!(driver(&d.root, &new).as_deref(), Some("vfio-pci"));
}

#[test]
fn without_a_replacement_or_when_the_vm_refuses_it_the_lease_is_unchanged() {
    let bus = Bus::open();
    let d = Daemon::start(&bus, layouts::large(1, 2), REPLACE, &[]);
    let sock = d.dir.path().join("ch.sock");
    let (failed, spare) = ("0000:10:00.1", "0000:10:00.2");
    // The VM refuses every device on its API (HTTP 500).
    let _vm = ch::api_server(&sock, Some("0000:10:00.2"));
    let c = bus.client();
    let vmm = format!("ch:{}", sock.display());
    let l = c.provision(&req("r1", &[failed], &vmm)).unwrap();
    let e = c.replace(failed, "flaky").unwrap_err();
    assert_eq!(error_name(&e), "Failed", "{e}");
    assert!(
        e.to_string().contains("could not take its replacement"),
        "{e}"
    );
    assert_eq!(names(&lease(&bus, &l.id).unwrap()), [failed]);
    assert_ne!(
        driver(&d.root, spare).as_deref(),
        Some("vfio-pci"),
        "undone"
    );
    assert_eq!(health(&bus, spare).0, "healthy");
    assert_eq!(
        health(&bus, failed).0,
        "healthy",
        "a refused swap holds nothing back"
    );
    // Now nothing is free: the failure is signalled, the lease keeps its device.
    let other = c.provision(&req("r2", &[spare], "")).unwrap();
    let monitor = Monitor::start(&bus, "member='LeaseDegraded'");
    fake::fail_device(&d.root, &failed.parse().unwrap()).unwrap();
    wait_for(&d, "the failure", || health(&bus, failed).0 == "failed");
    if let Some(m) = monitor {
        let out = m.stop(Duration::from_millis(500));
        assert!(
            out.contains("not replaced") && out.contains("no replacement"),
            "{out}"
        );
    }
    assert_eq!(names(&lease(&bus, &l.id).unwrap()), [failed]);
    assert_eq!(names(&lease(&bus, &other.id).unwrap()), [spare]);
}

#[test]
fn an_operator_replaces_a_leased_vf_and_bad_requests_change_nothing() {
    let bus = Bus::open();
    let d = Daemon::start(&bus, layouts::large(1, 3), "", &[]);
    let c = bus.client();
    let (old, free) = ("0000:10:00.1", "0000:10:00.3");
    // No VMM named: the replacement is leased and named; the VM's owner plugs it.
    let l = c.provision(&req("r1", &[old], "")).unwrap();
    let monitor = Monitor::start(&bus, "member='LeaseRecovered'");
    let long = "x".repeat(300);
    for (name, reason, want) in [
        (old, "", "BadInput"),
        (old, long.as_str(), "BadInput"),
        (old, "a\nb", "BadInput"),
        ("../../etc", "why", "BadInput"),
        (free, "why", "NotFound"),
        ("0000:10:00.0", "why", "NotFound"),
    ] {
        let e = c.replace(name, reason).unwrap_err();
        assert_eq!(error_name(&e), want, "{name:?} {reason:?}: {e}");
        assert!(!e.to_string().contains('\n'));
    }
    assert_eq!(
        names(&lease(&bus, &l.id).unwrap()),
        [old],
        "nothing changed"
    );
    let (code, _, err) = vfctl_as(&bus, 1, &["replace", old, "--reason", "mine now"]);
    assert_ne!(code, 0, "only the lease's owner or root: {err}");
    let (code, out, err) = vfctl(&bus, &["replace", old, "--reason", "fan noise"]);
    assert_eq!(code, 0, "{err}");
    let now = names(&lease(&bus, &l.id).unwrap());
    assert_eq!(now.len(), 1);
    assert!(out.contains(&now[0]) && now[0] != old, "{out}");
    let (state, why) = health(&bus, old);
    assert_eq!(state, "quarantined");
    assert!(why.contains("fan noise") && why.contains(&l.id), "{why}");
    // The lease records it.
    let swaps = c.lease_swaps(&l.id).unwrap();
    assert_eq!(swaps.len(), 1, "{swaps:?}");
    assert_eq!(
        (swaps[0].0.as_str(), swaps[0].1.as_str()),
        (old, now[0].as_str())
    );
    assert!(swaps[0].2.contains("fan noise"), "{swaps:?}");
    let (code, out, err) = vfctl(&bus, &["swaps", &l.id]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(old) && out.contains(&now[0]), "{out}");
    assert_eq!(error_name(&c.lease_swaps("../x").unwrap_err()), "BadInput");
    if let Some(m) = monitor {
        let out = m.stop(Duration::from_millis(300));
        assert!(out.contains("no VMM to reach"), "{out}");
    }
    drop(d);
}

/// A leased VF that vanished while the daemon was down (its PF's VFs disabled
/// behind its back) is replaced at start when its lease says `replace`: an
/// equivalent is plugged into the running VM, and the lease keeps its id.
#[test]
fn a_vanished_vf_is_replaced_in_the_running_vm() {
    let bus = Bus::open();
    let mut d = Daemon::start(&bus, layouts::large(2, 2), REPLACE, &[]);
    let gone = "0000:10:00.1";
    let (vm, before) = attached(&bus, &d, &["--device", gone]);
    d.kill();
    let sys = vf_provisioner::Sysfs::open_fake(&d.root).unwrap();
    let pf: vf_provisioner::PciAddress = "0000:10:00.0".parse().unwrap();
    sys.write(&pf, &sys.device_attr(&pf, "sriov_numvfs"), "0")
        .unwrap();
    d.restart();
    let after = lease(&bus, &before.id).expect("the lease keeps its id");
    let now = names(&after);
    assert_eq!(now.len(), 1, "{now:?}");
    // Its NUMA node first: the pool enables the idle PF's VFs again for it (PF 11
    // is on node 1).
    assert!(
        now[0].starts_with("0000:10:00.") && now[0] != gone,
        "{now:?}"
    );
    assert_eq!(
        health(&bus, gone).0,
        "quarantined",
        "the vanished VF, back with its PF's VFs, is held back"
    );
    assert_eq!(driver(&d.root, &now[0]).as_deref(), Some("vfio-pci"));
    let devs = vm.devices.lock().unwrap().clone();
    assert!(devs.contains_key(&device_id(&now[0])), "{devs:?}");
    assert!(d.log_text().contains("replaced by"), "{}", d.log_text());
    assert!(d.audit_text().contains("\"op\":\"replace\""));
}

/// An operator's `Replace` of `before`'s first device in the VM behind the API
/// socket: the lease keeps its id and holds the replacement alone, and the VM has the
/// replacement and not the old device. Returns (old, new, the lease after).
fn replaced_in_vm(bus: &Bus, vm: &ch::Vm, before: &Lease, why: &str) -> (String, String, Lease) {
    let old = before.devices[0].address.clone();
    let new = bus.client().replace(&old, why).unwrap();
    assert_ne!(new, old);
    let after = lease(bus, &before.id).expect("the lease keeps its id");
    assert_eq!(names(&after), std::slice::from_ref(&new));
    let devs = vm.devices.lock().unwrap().clone();
    assert!(
        devs.contains_key(&device_id(&new)) && !devs.contains_key(&device_id(&old)),
        "{devs:?}"
    );
    (old, new, after)
}

/// A leased mdev swapped for a new one of the lease's profile in the running VM:
/// the lease keeps its id, the VM (cloud-hypervisor's API) has the new mdev and not
/// the old, which is held back until freed; the release removes the new one.
#[test]
fn a_leased_mdev_is_swapped_for_a_new_one_of_its_profile() {
    let bus = Bus::open();
    let d = Daemon::start(&bus, layouts::emulated(), "", &[]);
    let (vm, before) = attached(&bus, &d, &["--profile", "mtty-2"]);
    let c = bus.client();
    let (old, new, after) = replaced_in_vm(&bus, &vm, &before, "its parent logs errors");
    let mdevs = c.mdevs().unwrap();
    assert!(mdevs.iter().any(|m| m.uuid == new && m.active), "{mdevs:?}");
    assert_eq!(health(&bus, &old).0, "quarantined");
    assert!(c.release(&after.id).unwrap());
    let mdevs = c.mdevs().unwrap();
    assert!(
        !mdevs.iter().any(|m| m.uuid == new),
        "the release removes what the swap made"
    );
    c.free_orphan(&old).unwrap();
    assert!(
        c.mdevs().unwrap().is_empty(),
        "freed, the old one is removed"
    );
}

/// A VF leased with a vGPU type (NVIDIA's per-VF vGPU) swapped for another VF given
/// the same type, in the running VM: the lease keeps its id, the VM has the new VF
/// and not the old, which is held back with its type until freed; freeing clears
/// its type, the release clears the new one's.
#[test]
fn a_vf_with_a_vgpu_type_is_swapped_for_another_of_that_type() {
    let bus = Bus::open();
    let config = "[[pf]]\naddress = \"0000:ca:00.0\"\nvfs = 4\n";
    let d = Daemon::start(&bus, layouts::nvidia_dc(), config, &[]);
    let (vm, before) = attached(&bus, &d, &["--profile", "NVIDIA A100D-20C"]);
    let c = bus.client();
    let (old, new, after) = replaced_in_vm(&bus, &vm, &before, "its ECC counts climb");
    let typed = |vf: &str| {
        let sys = vf_provisioner::Sysfs::open_fake(&d.root).unwrap();
        let a = vf.parse().unwrap();
        mediated_dev::host::read_vgpu(&sys, &a).and_then(|s| s.current)
    };
    assert_eq!(typed(&new), typed(&old), "the same type, set on the new VF");
    assert!(typed(&new).is_some());
    assert_eq!(health(&bus, &old).0, "quarantined");
    c.free_orphan(&old).unwrap();
    assert_eq!(typed(&old), None, "freed, the old VF's type is cleared");
    assert!(c.release(&after.id).unwrap());
    assert_eq!(typed(&new), None, "the release clears the new VF's type");
}

/// A GPU slice whose GPU fails moves to the healthy GPU: the probe finds the
/// parent answering all ones, its leased mdev fails with it, and the lease's
/// `replace` swaps in a new mdev of the profile on the other parent, in the VM.
#[test]
fn a_failed_gpus_leased_mdev_moves_to_a_healthy_gpu() {
    let bus = Bus::open();
    let d = Daemon::start(&bus, two_t4s(), REPLACE, &[]);
    let (vm, before) = attached(&bus, &d, &["--profile", "GRID T4-2Q"]);
    let c = bus.client();
    let old = before.devices[0].address.clone();
    let parent_of = |u: &str| {
        let m = c.mdevs().unwrap();
        m.into_iter().find(|m| m.uuid == u).map(|m| m.parent)
    };
    let sick = parent_of(&old).unwrap();
    fake::fail_device(&d.root, &sick.parse().unwrap()).unwrap();
    wait_for(&d, "the slice moved", || {
        lease(&bus, &before.id).is_some_and(|l| names(&l) != [old.clone()])
    });
    let new = names(&lease(&bus, &before.id).unwrap()).remove(0);
    let healthy = parent_of(&new).unwrap();
    assert_ne!(healthy, sick, "placed on the healthy GPU");
    let devs = vm.devices.lock().unwrap().clone();
    assert!(
        devs.contains_key(&device_id(&new)) && !devs.contains_key(&device_id(&old)),
        "{devs:?}"
    );
    assert_eq!(health(&bus, &sick).0, "failed");
    let (state, why) = health(&bus, &old);
    assert_eq!(state, "quarantined");
    assert!(why.contains(&sick), "{why}");
}

/// SIGKILL at random points of swaps: after each restart exactly one lease holds
/// the device the VM was told about, no function is on vfio-pci that neither a
/// lease holds nor the quarantine explains, and the lease keeps its size.
#[test]
fn sigkill_during_swaps_loses_and_doubles_nothing() {
    let seed = crash_seed();
    let mut rng = Rng(seed);
    let bus = Bus::open();
    let mut d = Daemon::start(&bus, layouts::large(2, 4), "", &[]);
    let c = bus.client();
    let mut cut = 0;
    for round in 0..20 {
        let l = c
            .provision(&req(&format!("k{round}"), &[], ""))
            .unwrap_or_else(|e| panic!("round {round}: {e}; log:\n{}", d.log_text()));
        let dev = l.devices[0].address.clone();
        let killer = d.kill_after(Duration::from_micros(rng.below(6000)));
        match c.replace(&dev, "crash test") {
            Ok(_) => {}
            Err(e)
                if matches!(
                    error_name(&e).as_str(),
                    "BadInput" | "Refused" | "NotFound" | "PermissionDenied" | "NoDevice"
                ) =>
            {
                panic!("round {round}: {e}; log:\n{}", d.log_text())
            }
            // Cut off (the bus says the daemon went, or the call failed midway).
            Err(_) => {
                cut += 1;
                d.restart_after(Some(&killer))
            }
        }
        // Restarted if it was killed between calls.
        d.reap(Some(killer));
        let ctx = format!("round {round} (seed {seed})");
        let now = survived(&bus, &d, &l.id, &ctx);
        assert_eq!(now.devices.len(), 1, "{ctx}: {now:?}");
        end_round(&bus, &d, &now, &ctx);
    }
    let settled = d.log_text().matches("the swap of").count();
    eprintln!("{cut} swaps cut off; {settled} settled at start-up (seed {seed})");
}

/// After a round a crash may have cut off: the lease, which outlives it, with
/// every device on vfio-pci.
fn survived(bus: &Bus, d: &Daemon, id: &str, ctx: &str) -> Lease {
    let now = lease(bus, id).expect("the lease outlives the crash");
    for a in names(&now) {
        assert_eq!(
            driver(&d.root, &a).as_deref(),
            Some("vfio-pci"),
            "{ctx}: {a}"
        );
    }
    now
}

/// Nothing stray, then lease `l` released and what the round's swap held back
/// offered again for the next round.
fn end_round(bus: &Bus, d: &Daemon, l: &Lease, ctx: &str) {
    let back = nothing_stray(bus, &d.root, ctx);
    let c = bus.client();
    assert!(c.release(&l.id).unwrap());
    for name in back {
        let _ = c.free_orphan(&name).or_else(|_| c.clear(&name));
    }
}

/// Two Moore Threads GPUs, each with its HDMI audio function in its IOMMU group
/// (3b:00.0/.1 in group 20, 5e:00.0/.1 in group 21, on NUMA node 0).
fn two_gpus_with_audio() -> vf_provisioner::fake::Layout {
    let mut l = layouts::domestic_gpu();
    let mut second: Vec<_> = l
        .functions
        .iter()
        .filter(|f| f.address.to_string().starts_with("0000:3b:"))
        .cloned()
        .collect();
    for f in &mut second {
        let a = f.address.to_string().replace("0000:3b:", "0000:5e:");
        f.address = a.parse().unwrap();
        f.iommu_group = Some(21);
    }
    l.functions.extend(second);
    l
}

/// A whole GPU leased with its HDMI audio function fails: the daemon swaps the
/// whole IOMMU group for the other GPU and its audio function, in the running VM
/// (both plugged, both old ones unplugged); the lease keeps its id, the failed GPU
/// and its companion are held back; the release returns the new pair.
#[test]
fn a_failed_whole_gpu_is_swapped_with_its_audio_function_for_another_gpu() {
    let bus = Bus::open();
    let d = Daemon::start(&bus, two_gpus_with_audio(), REPLACE, &[]);
    let (gpu, audio) = ("0000:3b:00.0", "0000:3b:00.1");
    let (gpu2, audio2) = ("0000:5e:00.0", "0000:5e:00.1");
    let (vm, before) = attached(&bus, &d, &["--device", gpu, "--device", audio]);
    assert_eq!(names(&before), [gpu, audio]);
    let monitor = Monitor::start(&bus, "member='LeaseRecovered'");
    fake::fail_device(&d.root, &gpu.parse().unwrap()).unwrap();
    wait_for(&d, "the swap", || {
        lease(&bus, &before.id).is_some_and(|l| !names(&l).contains(&gpu.to_string()))
    });
    let after = lease(&bus, &before.id).unwrap();
    assert_eq!(
        names(&after),
        [gpu2, audio2],
        "the other GPU with its audio function"
    );
    for a in [gpu2, audio2] {
        assert_eq!(driver(&d.root, a).as_deref(), Some("vfio-pci"), "{a}");
    }
    let devs = vm.devices.lock().unwrap().clone();
    for a in [gpu2, audio2] {
        assert!(devs.contains_key(&device_id(a)), "plugged {a}: {devs:?}");
    }
    for a in [gpu, audio] {
        assert!(!devs.contains_key(&device_id(a)), "unplugged {a}: {devs:?}");
    }
    assert_eq!(health(&bus, gpu).0, "failed");
    let (state, why) = health(&bus, audio);
    assert_eq!(state, "quarantined", "held back with its group: {why}");
    let swaps = bus.client().lease_swaps(&after.id).unwrap();
    let pairs: Vec<(&str, &str)> = swaps.iter().map(|s| (s.0.as_str(), s.1.as_str())).collect();
    assert_eq!(pairs, [(gpu, gpu2), (audio, audio2)]);
    if let Some(m) = monitor {
        let out = m.stop(Duration::from_millis(300));
        assert!(
            out.contains(gpu) && out.contains(gpu2),
            "LeaseRecovered names the GPUs: {out}"
        );
    }
    // No third GPU: a second failure finds no replacement and says why.
    let e = bus.client().replace(gpu2, "test").unwrap_err();
    assert_eq!(error_name(&e), "NoDevice", "{e}");
    assert!(e.to_string().contains("whole device"), "{e}");
    assert_eq!(
        names(&lease(&bus, &after.id).unwrap()),
        [gpu2, audio2],
        "unchanged"
    );
    assert!(bus.client().release(&after.id).unwrap());
    assert_eq!(driver(&d.root, gpu2).as_deref(), Some("mtgpu"));
    assert_eq!(driver(&d.root, audio2).as_deref(), Some("snd_hda_intel"));
}

/// The daemon SIGKILLed at random points of whole-GPU swaps: after each restart the
/// lease holds one whole group (the old pair or the new one, never a mix), both on
/// vfio-pci, and no function is left on vfio-pci unleased and not held back.
#[test]
fn sigkill_during_whole_device_swaps_leaves_one_whole_group() {
    let seed = crash_seed();
    let mut rng = Rng(seed);
    let bus = Bus::open();
    let mut d = Daemon::start(&bus, two_gpus_with_audio(), "", &[]);
    let pairs = [
        ["0000:3b:00.0", "0000:3b:00.1"],
        ["0000:5e:00.0", "0000:5e:00.1"],
    ];
    let mut cut = 0;
    for round in 0..10 {
        let c = bus.client();
        let free = pairs[round % 2];
        let l = c
            .provision(&req(&format!("g{round}"), &free, ""))
            .unwrap_or_else(|e| panic!("round {round}: {e}; log:\n{}", d.log_text()));
        let killer = d.kill_after(Duration::from_micros(rng.below(8000)));
        if let Err(e) = c.replace(free[0], "crash test") {
            let name = error_name(&e);
            assert!(
                !matches!(
                    name.as_str(),
                    "BadInput" | "Refused" | "NotFound" | "NoDevice"
                ),
                "round {round}: {e}; log:\n{}",
                d.log_text()
            );
            cut += 1;
            d.restart_after(Some(&killer));
        }
        d.reap(Some(killer));
        let ctx = format!("round {round} (seed {seed})");
        let now = survived(&bus, &d, &l.id, &ctx);
        let held = names(&now);
        assert!(
            pairs.iter().any(|p| held == p),
            "{ctx}: one whole group, got {held:?}"
        );
        end_round(&bus, &d, &now, &ctx);
    }
    let settled = d.log_text().matches("the swap of").count();
    eprintln!("{cut} whole-device swaps cut off; {settled} settled at start-up (seed {seed})");
}
