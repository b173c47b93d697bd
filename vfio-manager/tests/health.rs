//! Device health through the daemon: a reset that fails at release holds the
//! device back; an operator's quarantine and clear; `vfctl health`. Real
//! dbus-daemon, real vfio-managerd, fake kernel (whose `fail_device` makes a
//! function stop answering as one that fell off the bus does).

mod common;

use common::*;
use vf_provisioner::{fake, layouts, PciAddress};
use vfio_manager::api::Request;

fn req(id: &str, devices: &[&str]) -> Request {
    Request {
        request_id: id.into(),
        vm_name: "vm1".into(),
        profile: "vf".into(),
        count: devices.len().max(1) as u32,
        devices: devices.iter().map(|d| d.to_string()).collect(),
        ..Request::default()
    }
}

fn state_of(bus: &Bus, name: &str) -> (String, String) {
    let h = bus.client().health().unwrap();
    let i = h.iter().find(|i| i.name == name).expect("listed");
    (i.state.clone(), i.reason.clone())
}

#[test]
fn a_device_whose_reset_fails_at_release_is_held_back_until_it_answers_again() {
    let bus = Bus::open();
    let d = Daemon::start(&bus, layouts::large(1, 2), "", &[]);
    let c = bus.client();
    let vf = "0000:10:00.1";
    let a: PciAddress = vf.parse().unwrap();
    assert_eq!(state_of(&bus, vf).0, "healthy");
    let lease = c.provision(&req("r1", &[vf])).unwrap();
    fake::fail_device(&d.root, &a).unwrap();
    assert!(
        c.release(&lease.id).unwrap(),
        "the release itself goes through"
    );
    let (state, why) = state_of(&bus, vf);
    assert_eq!(state, "failed", "{why}");
    assert!(why.contains("reset"), "{why}");
    // Offered to nobody: named, from the pool, or bound directly.
    let e = c.provision(&req("r2", &[vf])).unwrap_err();
    assert_eq!(error_name(&e), "Refused", "{e}");
    assert!(e.to_string().contains("failed"), "{e}");
    let pool = c.provision(&req("r3", &[])).unwrap();
    assert_ne!(pool.devices[0].address, vf);
    assert_eq!(error_name(&c.bind(vf, false).unwrap_err()), "Refused");
    // Clear probes first: still dead, it stays held back.
    let (code, _, err) = vfctl(&bus, &["clear", vf]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("still fails its probe") && err.contains("all ones"),
        "{err}"
    );
    assert_eq!(state_of(&bus, vf).0, "failed");
    fake::heal_device(&d.root, &a, "1ed5:0324", "030200").unwrap();
    let (code, _, err) = vfctl(&bus, &["clear", vf]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(state_of(&bus, vf).0, "healthy");
    c.provision(&req("r4", &[vf])).unwrap();
    let audit = d.audit_text();
    assert!(
        audit.contains("\"op\":\"quarantine\"") && audit.contains("\"op\":\"clear\""),
        "{audit}"
    );
}

#[test]
fn an_operators_quarantine_holds_a_device_back_and_bad_input_changes_nothing() {
    let bus = Bus::open();
    let _d = Daemon::start(&bus, layouts::large(1, 2), "", &[]);
    let c = bus.client();
    let vf = "0000:10:00.2";
    for (name, reason, want) in [
        (vf, "", "BadInput"),
        (vf, "line\nbreak", "BadInput"),
        (vf, &"x".repeat(1 << 20)[..], "BadInput"),
        ("0000:99:00.0", "gone", "NotFound"),
        ("../../etc", "x", "BadInput"),
    ] {
        let e = c.quarantine(name, reason).unwrap_err();
        assert_eq!(
            error_name(&e),
            want,
            "{name:?} {:?}: {e}",
            &reason[..reason.len().min(20)]
        );
        assert!(e.to_string().len() < 1000, "bounded: {e}");
    }
    // Clear takes the same names: malformed ones are bad input, bounded.
    for (name, want) in [
        ("../../etc", "BadInput"),
        ("0000:10:00.2\n", "BadInput"),
        (&"7".repeat(1 << 20)[..], "BadInput"),
        ("0000:99:00.0", "NotFound"),
    ] {
        let e = c.clear(name).unwrap_err();
        assert_eq!(
            error_name(&e),
            want,
            "{:?}: {e}",
            &name[..name.len().min(20)]
        );
        assert!(e.to_string().len() < 1000, "bounded: {e}");
    }
    assert_eq!(state_of(&bus, vf).0, "healthy", "nothing changed");
    let monitor = Monitor::start(&bus, "member='PropertiesChanged'");
    let (code, out, err) = vfctl(&bus, &["quarantine", vf, "--reason", "fan noise"]);
    assert_eq!(code, 0, "{err}: {out}");
    if let Some(m) = monitor {
        let seen = m.stop(std::time::Duration::from_millis(300));
        assert!(
            seen.contains("device/0000_10_00_2")
                && seen.contains("\"Health\"")
                && seen.contains("quarantined"),
            "PropertiesChanged for its Health: {seen}"
        );
    } else {
        eprintln!("SKIPPED the signal check: dbus-monitor is not installed");
    }
    let (state, why) = state_of(&bus, vf);
    assert_eq!(
        (state.as_str(), why.as_str()),
        ("quarantined", "by an operator: fan noise")
    );
    let e = c.provision(&req("q1", &[vf])).unwrap_err();
    assert!(e.to_string().contains("fan noise"), "{e}");
    assert_eq!(
        error_name(&c.quarantine(vf, "again").unwrap_err()),
        "Refused"
    );
    let (code, out, _) = vfctl(&bus, &["health"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("quarantined") && out.contains("fan noise"),
        "{out}"
    );
    // It answers its probe: clear offers it again.
    c.clear(vf).unwrap();
    assert_eq!(
        error_name(&c.clear(vf).unwrap_err()),
        "NotFound",
        "not held back any more"
    );
    c.provision(&req("q2", &[vf])).unwrap();
}

/// A reboot, as the daemon meets it: the VFs and mdevs are gone until it makes
/// them again. Before READY, the configured VFs are back, a leased VF is on
/// vfio-pci again, and an mdev the lease made is made again with its UUID; the
/// leases are unchanged. A VF the configuration no longer makes is reported, in
/// `RestoreStatus` and the log.
#[test]
fn leases_outlive_a_reboot_and_what_cannot_come_back_is_reported() {
    let bus = Bus::open();
    let config = "manage = [\"8086:10c9\"]\n[[pf]]\naddress = \"0000:01:00.0\"\nvfs = 2\n";
    let mut d = Daemon::start(&bus, layouts::emulated(), config, &[]);
    let c = bus.client();
    c.provision(&req("v1", &["0000:01:10.2"])).unwrap();
    let mdev = c
        .provision(&Request {
            profile: "mtty-2".into(),
            ..req("m1", &[])
        })
        .unwrap();
    let uuid = mdev.devices[0].address.clone();
    // Group numbers change across boots; the leases' devices do not.
    let held = || -> Vec<(String, Vec<String>)> {
        let l = c.leases().unwrap();
        l.into_iter()
            .map(|l| (l.id, l.devices.into_iter().map(|d| d.address).collect()))
            .collect()
    };
    let leases = held();
    d.kill();
    // The reboot: no VFs, no mdevs.
    let sys = vf_provisioner::Sysfs::open_fake(&d.root).unwrap();
    let pf: PciAddress = "0000:01:00.0".parse().unwrap();
    let no_vfs = || {
        sys.write(&pf, &sys.device_attr(&pf, "sriov_numvfs"), "0")
            .unwrap()
    };
    no_vfs();
    let m = mediated_dev::Mediator::new(sys.clone());
    m.remove(&uuid.parse().unwrap()).unwrap();
    assert!(m.scan().mdevs.is_empty());
    d.restart();
    assert_eq!(driver(&d.root, "0000:01:10.2").as_deref(), Some("vfio-pci"));
    assert!(m.scan().mdevs.iter().any(|x| x.uuid.to_string() == uuid));
    assert_eq!(held(), leases);
    assert_eq!(c.restore_status().unwrap(), "complete");
    // Rebooted into a configuration with one VF: the leased second VF is gone.
    d.kill();
    no_vfs();
    std::fs::write(&d.config, config.replace("vfs = 2", "vfs = 1")).unwrap();
    d.restart();
    let status = c.restore_status().unwrap();
    assert!(
        status.starts_with("partial: 1 devices") && status.contains("0000:01:10.2"),
        "{status}"
    );
    assert!(
        d.log_text().contains("restore: partial"),
        "{}",
        d.log_text()
    );
    // Reported, its lease lets it go; the mdev's lease keeps its device.
    let now = held();
    assert!(
        !now.iter()
            .any(|(_, devs)| devs.iter().any(|x| x == "0000:01:10.2")),
        "{now:?}"
    );
    assert!(now.iter().any(|(_, devs)| devs.contains(&uuid)), "{now:?}");
    assert!(
        d.log_text().contains("its lease lets it go"),
        "{}",
        d.log_text()
    );
    assert!(d.audit_text().contains("\"op\":\"let-go\""));
}

/// The periodic probe finds a leased function that stopped answering: failed,
/// held back, audited, and `LeaseDegraded` names its lease.
#[test]
fn a_probe_finds_a_device_that_stopped_answering() {
    let bus = Bus::open();
    let config = "[daemon]\nprobe_interval_s = 1\n";
    let d = Daemon::start(&bus, layouts::large(1, 2), config, &[]);
    let c = bus.client();
    let lease = c.provision(&req("p1", &["0000:10:00.1"])).unwrap();
    let monitor = Monitor::start(&bus, "member='LeaseDegraded'");
    fake::fail_device(&d.root, &"0000:10:00.1".parse().unwrap()).unwrap();
    // Waits (it is no timing assert) for the next probes.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while state_of(&bus, "0000:10:00.1").0 != "failed" {
        assert!(std::time::Instant::now() < deadline, "{}", d.log_text());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (_, why) = state_of(&bus, "0000:10:00.1");
    assert!(why.contains("probe") && why.contains("all ones"), "{why}");
    assert!(d.audit_text().contains("all ones"));
    assert_eq!(
        state_of(&bus, "0000:10:00.2").0,
        "healthy",
        "the others are not touched"
    );
    if let Some(m) = monitor {
        let out = m.stop(std::time::Duration::from_millis(300));
        assert!(
            out.contains(&lease.id),
            "LeaseDegraded names the lease: {out}"
        );
    } else {
        eprintln!("SKIPPED the signal check: dbus-monitor is not installed");
    }
}

/// With `dma_probe`, a leased function is handed out only once memory was mapped
/// for it through its IOMMU. The fake host has no VFIO, so the probe fails here as
/// it would on a host whose IOMMU refuses the mapping: the lease is refused, undone,
/// and the function held back. (It passes in the emulated host, whose daemon
/// probes every lease.)
#[test]
fn a_function_that_fails_the_dma_probe_is_held_back_and_not_handed_out() {
    let bus = Bus::open();
    let d = Daemon::start(
        &bus,
        layouts::large(1, 2),
        "[daemon]\ndma_probe = true\n",
        &[],
    );
    let c = bus.client();
    let vf = "0000:10:00.1";
    let e = c.provision(&req("p1", &[vf])).unwrap_err();
    assert_eq!(error_name(&e), "Failed", "{e}");
    assert!(
        e.to_string().contains("DMA-mapping probe failed") && e.to_string().contains(vf),
        "{e}"
    );
    assert!(c.leases().unwrap().is_empty());
    let (state, why) = state_of(&bus, vf);
    assert_eq!(state, "failed", "{why}");
    assert!(why.contains("DMA-mapping probe"), "{why}");
    assert!(d.audit_text().contains("DMA-mapping probe"));
}

/// Correctable errors over `degraded_correctable_per_hour` make a leased VF degraded
/// by themselves (the periodic probe): `LeaseDegraded` with the reason, its
/// `Health` property changed, an audit line, and the time the state was entered.
/// The VM keeps the device.
#[test]
fn correctable_errors_over_the_threshold_degrade_a_leased_device_and_say_so() {
    let bus = Bus::open();
    let cfg = "[daemon]\nprobe_interval_s = 1\ndegraded_correctable_per_hour = 5\n";
    let mut d = Daemon::start(&bus, layouts::large(1, 2), cfg, &[]);
    let c = bus.client();
    let vf = "0000:10:00.1";
    let a: PciAddress = vf.parse().unwrap();
    // Errors from before the daemon started: its rate starts from what it finds.
    fake::count_correctable(&d.root, &a, 2).unwrap();
    d.restart();
    let lease = c.provision(&req("r1", &[vf])).unwrap();
    assert_eq!(state_of(&bus, vf).0, "healthy");
    let monitor = Monitor::start(&bus, "type='signal'");
    fake::count_correctable(&d.root, &a, 8).unwrap();
    let t0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut state = state_of(&bus, vf);
    for _ in 0..50 {
        if state.0 == "degraded" && d.audit_text().contains("healthy -> degraded") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        state = state_of(&bus, vf);
    }
    assert_eq!(state.0, "degraded", "{state:?}");
    assert!(
        state
            .1
            .contains("6 correctable PCIe errors in the last hour"),
        "{state:?}"
    );
    let i = c
        .health()
        .unwrap()
        .into_iter()
        .find(|i| i.name == vf)
        .unwrap();
    assert!(
        i.since >= t0 - 1 && i.since <= t0 + 6,
        "entered at {} (now {t0})",
        i.since
    );
    let audit = d.audit_text();
    let line = audit
        .lines()
        .find(|l| l.contains("healthy -> degraded"))
        .expect(&audit);
    assert!(
        line.contains("\"op\":\"health\"") && line.contains(vf),
        "{line}"
    );
    if let Some(m) = monitor {
        std::thread::sleep(std::time::Duration::from_millis(1200));
        let seen = m.stop(std::time::Duration::from_millis(300));
        assert!(
            seen.contains("LeaseDegraded") && seen.contains(&lease.id),
            "LeaseDegraded: {seen}"
        );
        assert!(
            seen.contains("device/0000_10_00_1") && seen.contains("\"Health\""),
            "PropertiesChanged: {seen}"
        );
        assert_eq!(
            seen.matches("member=LeaseDegraded").count(),
            1,
            "once per change: {seen}"
        );
    } else {
        eprintln!("SKIPPED the signal check: dbus-monitor is not installed");
    }
    assert_eq!(
        c.leases().unwrap()[0].devices[0].address,
        vf,
        "the VM keeps it"
    );
    // A restart keeps the burst and the state it caused: still degraded, since
    // the same time, and not announced again.
    d.restart();
    let (state, reason) = state_of(&bus, vf);
    assert_eq!(state, "degraded", "after a restart: {reason}");
    let after = c
        .health()
        .unwrap()
        .into_iter()
        .find(|x| x.name == vf)
        .unwrap();
    assert_eq!(
        after.since, i.since,
        "entered when it was, not at the restart"
    );
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert_eq!(
        d.audit_text().matches("healthy -> degraded").count(),
        1,
        "announced once, not again at the restart"
    );
    // The counters start again from zero (a host reboot): so does the rate.
    fake::count_correctable(&d.root, &a, 0).unwrap();
    assert_eq!(state_of(&bus, vf).0, "healthy");
}
