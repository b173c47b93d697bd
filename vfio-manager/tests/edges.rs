//! The daemon's edges tried as an attacker would: names that would become paths
//! outside their directory, devices the configuration excludes, one VM's lease
//! reached through another's ids. Each try gets a typed refusal and leaves the host
//! and the table as they were. Real dbus-daemon, real vfio-managerd, fake kernel.

mod common;

use common::*;
use vf_provisioner::fake::Layout;
use vf_provisioner::{layouts, Sysfs};
use vfio_manager::api::Request;

fn capture(d: &Daemon) -> String {
    serde_json::to_string(&Layout::capture(&Sysfs::open_fake(&d.root).unwrap(), "x")).unwrap()
}

fn req(id: &str, vm: &str, profile: &str, count: u32) -> Request {
    Request {
        request_id: id.into(),
        vm_name: vm.into(),
        profile: profile.into(),
        count,
        ..Request::default()
    }
}

#[test]
fn mdev_names_that_would_leave_their_directory_are_bad_input_and_change_nothing() {
    let bus = Bus::open();
    let d = Daemon::start(&bus, layouts::emulated(), "", &[]);
    let c = bus.client();
    let before = capture(&d);
    let escapes = [
        ("../../../../../../tmp/escaped", "mtty-2"),
        ("mtty/..", "mtty-2"),
        ("..", "mtty-2"),
        ("mtty", "../../../../../../../tmp/escaped"),
        ("mtty", "mtty-2/../mtty-1"),
        ("mtty", "mtty-2\n"),
        ("0000:00:03.0/../../../../..", "x"),
    ];
    for (parent, ty) in escapes {
        let e = c.create_mdev(parent, ty, "", "auto").unwrap_err();
        assert_eq!(error_name(&e), "BadInput", "{parent:?} {ty:?}: {e}");
        let (code, _, err) = vfctl(&bus, &["mdev", "create", "--parent", parent, "--type", ty]);
        assert_eq!(code, 2, "vfctl {parent:?} {ty:?}: {err}");
    }
    let huge = "m".repeat(1 << 20);
    let e = c.create_mdev(&huge, "mtty-2", "", "").unwrap_err();
    assert_eq!(error_name(&e), "BadInput");
    assert!(
        e.to_string().len() < 1000,
        "the refusal quotes a bounded part"
    );
    assert_eq!(capture(&d), before, "a refused create changed the host");
    assert!(!d.root.join("tmp/escaped").exists());
    assert!(
        !d.root.join("etc/mdevctl.d").exists()
            || std::fs::read_dir(d.root.join("etc/mdevctl.d"))
                .unwrap()
                .count()
                == 0,
        "no definition was written"
    );
    assert!(c.mdevs().unwrap().is_empty());
}

#[test]
fn an_excluded_pf_covers_its_vfs_for_leases_and_listings() {
    let bus = Bus::open();
    let excluded = "0000:10:00.0";
    let d = Daemon::start(
        &bus,
        layouts::large(2, 2),
        &format!("exclude = [\"{excluded}\"]\n"),
        &[],
    );
    let c = bus.client();
    let listed: Vec<String> = c
        .devices()
        .unwrap()
        .into_iter()
        .map(|d| d.address)
        .collect();
    assert!(
        listed.iter().all(|a| !a.starts_with("0000:10:")),
        "the excluded PF and its VFs are not ours: {listed:?}"
    );
    let before = capture(&d);
    // Named: refused, with the reason.
    let mut named = req("n1", "vm1", "vf", 1);
    named.devices = vec!["0000:10:00.1".into()];
    let e = c.provision(&named).unwrap_err();
    assert_eq!(error_name(&e), "Refused", "{e}");
    assert!(e.to_string().contains("excluded"), "{e}");
    // From the pool: the other PF's two VFs only.
    let e = c.provision(&req("p1", "vm1", "vf", 3)).unwrap_err();
    assert_eq!(error_name(&e), "NoDevice", "{e}");
    assert_eq!(capture(&d), before, "a refused lease changed the host");
    let l = c.provision(&req("p2", "vm1", "vf", 2)).unwrap();
    assert!(
        l.devices.iter().all(|d| d.address.starts_with("0000:11:")),
        "{l:?}"
    );
    // Direct operations refuse it too.
    let e = c.bind("0000:10:00.2", false).unwrap_err();
    assert_eq!(error_name(&e), "Refused", "{e}");
}

#[test]
fn an_excluded_mdev_parent_gets_no_mdev_from_any_path() {
    let bus = Bus::open();
    let parent = "0000:af:00.0";
    let d = Daemon::start(
        &bus,
        layouts::nvidia_mdev(),
        &format!("exclude = [\"{parent}\"]\n"),
        &[],
    );
    let c = bus.client();
    let before = capture(&d);
    let e = c.create_mdev(parent, "nvidia-222", "", "").unwrap_err();
    assert_eq!(error_name(&e), "Refused", "{e}");
    assert!(
        e.to_string().contains(parent) && e.to_string().contains("excluded"),
        "{e}"
    );
    let e = c.provision(&req("m1", "vm1", "nvidia-222", 1)).unwrap_err();
    assert_eq!(error_name(&e), "BadInput", "{e}");
    assert_eq!(capture(&d), before, "a refused request changed the host");
    assert!(c.mdevs().unwrap().is_empty());
    // An mdevctl definition to start at boot on it is not started either.
    let u = uuid::Uuid::new_v4();
    let def = mediated_dev::Definition {
        uuid: u,
        parent: parent.parse().unwrap(),
        config: mediated_dev::mdevctl::Config {
            mdev_type: "nvidia-222".parse().unwrap(),
            start: mediated_dev::Start::Auto,
            attrs: vec![],
        },
    };
    mediated_dev::Store::new(&d.root).write(&def).unwrap();
    let mut d = d;
    d.restart();
    let log = d.log_text();
    assert!(
        log.contains(&format!("mdev {u}")) && log.contains("excluded"),
        "{log}"
    );
    assert!(bus.client().mdevs().unwrap().iter().all(|m| !m.active));
}

#[test]
fn lease_ids_and_request_ids_are_separate_namespaces() {
    let bus = Bus::open();
    let d = Daemon::start(&bus, layouts::large(1, 4), "", &[]);
    let c = bus.client();
    let a = c.provision(&req("a1", "vm-a", "vf", 1)).unwrap();
    // Another VM uses A's lease id as its request id: it gets a lease of its own.
    let b = c.provision(&req(&a.id, "vm-b", "vf", 1)).unwrap();
    assert_ne!(b.id, a.id);
    assert_ne!(b.devices[0].address, a.devices[0].address);
    // Its retry returns its own lease, never A's.
    assert_eq!(c.provision(&req(&a.id, "vm-b", "vf", 1)).unwrap(), b);
    // Releasing by request id ends B's lease only; by lease id, A's only.
    assert!(c.release_request(&a.id).unwrap());
    let left: Vec<String> = c.leases().unwrap().into_iter().map(|l| l.id).collect();
    assert_eq!(left, std::slice::from_ref(&a.id));
    assert_eq!(
        driver(&d.root, &a.devices[0].address).as_deref(),
        Some("vfio-pci")
    );
    assert!(c.release(&a.id).unwrap());
    assert!(c.leases().unwrap().is_empty());
    // A request id where a lease id belongs is malformed, not a lookup.
    assert_eq!(error_name(&c.release("a1").unwrap_err()), "BadInput");
}

#[test]
fn only_the_uid_that_made_a_lease_or_root_releases_it() {
    if !is_root() {
        eprintln!("SKIPPED: running callers as other uids needs root (run the tests as root)");
        return;
    }
    let bus = Bus::open();
    let config = "[daemon]\nallowed_uids = [65534, 1]\n";
    let d = Daemon::start(&bus, layouts::large(1, 2), config, &[]);
    let (code, _, err) = vfctl_as(
        &bus,
        65534,
        &["provision", "--vm", "mine", "--request-id", "n1"],
    );
    assert_eq!(code, 0, "{err}");
    let lease = bus.client().leases().unwrap().remove(0);
    // Another allowed user can neither release it nor reach it through its request id.
    for args in [
        &["release", lease.id.as_str()][..],
        &["release", "--request-id", "n1"],
        &["provision", "--vm", "mine", "--request-id", "n1"],
    ] {
        let (code, _, err) = vfctl_as(&bus, 1, args);
        assert_eq!(code, 3, "{args:?}: {err}");
        assert!(err.contains("uid 65534"), "{args:?}: {err}");
    }
    assert_eq!(bus.client().leases().unwrap(), std::slice::from_ref(&lease));
    assert_eq!(
        driver(&d.root, &lease.devices[0].address).as_deref(),
        Some("vfio-pci")
    );
    // Its maker may; so may root.
    let (code, _, err) = vfctl_as(&bus, 65534, &["release", "--request-id", "n1"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = vfctl_as(
        &bus,
        65534,
        &["provision", "--vm", "other", "--request-id", "n2"],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        bus.client().release_request("n2").unwrap(),
        "root releases any lease"
    );
}

fn mode(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn a_lost_table_is_a_loud_error_and_its_leased_devices_become_quarantined_orphans() {
    let bus = Bus::open();
    let mut d = Daemon::start(&bus, layouts::large(1, 2), "", &[]);
    let c = bus.client();
    let lease = c.provision(&req("l1", "vm1", "vf", 2)).unwrap();
    let (vf, vf2) = (
        lease.devices[0].address.clone(),
        lease.devices[1].address.clone(),
    );
    let db = d.state.join("state.db");
    assert_eq!(mode(&db), 0o600, "the table is root's alone");
    assert_eq!(mode(&d.state) & 0o007, 0, "its directory is not others'");
    assert_eq!(mode(&d.dir.path().join("audit.log")), 0o640);

    // The table is lost (its log too) while the VFs are still leased on vfio-pci.
    d.kill();
    std::fs::remove_file(&db).unwrap();
    let _ = std::fs::remove_file(d.state.join("state.db-wal"));
    let log = d.restart_refused();
    assert!(
        log.contains("is unusable") && log.contains("missing") && log.contains("state.id"),
        "{log}"
    );
    // A truncated table is refused the same way.
    std::fs::write(&db, b"SQLite format 3\0 truncated").unwrap();
    let log = d.restart_refused();
    assert!(log.contains("is unusable"), "{log}");

    // The operator chooses to start empty, as the error says.
    std::fs::remove_file(&db).unwrap();
    std::fs::remove_file(d.state.join("state.id")).unwrap();
    d.restart();
    let c = bus.client();
    assert!(
        d.log_text().contains(&format!("orphan: {vf}")),
        "{}",
        d.log_text()
    );
    let orphans: Vec<String> = c.orphans().unwrap().into_iter().map(|o| o.0).collect();
    assert_eq!(orphans, [vf.clone(), vf2.clone()]);
    // Never offered again, in the pool or by name.
    let e = c.provision(&req("l2", "vm2", "vf", 1)).unwrap_err();
    assert_eq!(error_name(&e), "NoDevice", "{e}");
    let mut named = req("l3", "vm3", "vf", 1);
    named.devices = vec![vf.clone()];
    let e = c.provision(&named).unwrap_err();
    assert!(
        error_name(&e) == "Refused" && e.to_string().contains("quarantined"),
        "{e}"
    );
    // Adopted: offered again as it is. Freed: back on its host driver, then offered.
    c.adopt_orphan(&vf).unwrap();
    assert_eq!(
        c.provision(&req("l4", "vm4", "vf", 1)).unwrap().devices[0].address,
        vf
    );
    c.free_orphan(&vf2).unwrap();
    assert_ne!(driver(&d.root, &vf2).as_deref(), Some("vfio-pci"));
    assert!(c.orphans().unwrap().is_empty());
    assert_eq!(error_name(&c.adopt_orphan(&vf2).unwrap_err()), "NotFound");
    assert_eq!(
        error_name(&c.free_orphan("../../etc").unwrap_err()),
        "BadInput"
    );
    assert_eq!(
        c.provision(&req("l5", "vm5", "vf", 1)).unwrap().devices[0].address,
        vf2
    );
    let audit = d.audit_text();
    for op in ["quarantine", "orphan-adopt", "orphan-free"] {
        assert!(audit.contains(&format!("\"op\":\"{op}\"")), "{op}: {audit}");
    }
}

#[test]
fn a_request_refused_at_the_bus_is_audited_once_and_bounded() {
    let bus = Bus::open();
    let d = Daemon::start(&bus, layouts::large(1, 2), "", &[]);
    let c = bus.client();
    let before = d.audit_text().lines().count();
    let mut r = req("ok-id", "vm\u{1b}[2J", "vf", 1);
    r.request_id = "x".repeat(1 << 20);
    let e = c.provision(&r).unwrap_err();
    assert_eq!(error_name(&e), "BadInput", "{e}");
    let audit = d.audit_text();
    let added: Vec<&str> = audit.lines().skip(before).collect();
    assert_eq!(added.len(), 1, "{added:?}");
    assert!(
        added[0].contains("\"op\":\"provision\"") && added[0].len() < 2048,
        "{}",
        added[0]
    );
}

#[test]
fn one_time_credentials_that_are_not_a_bundle_are_refused_before_anything_moves() {
    let bus = Bus::open();
    let _d = Daemon::start(&bus, layouts::emulated(), "", &[]);
    let c = bus.client();
    let m = c.create_mdev("mtty", "mtty-2", "", "").unwrap();
    // /dev/zero: vfctl reads a bounded part and refuses its NULs (a D-Bus string
    // cannot hold them); a long text file, the daemon refuses by its size.
    let big = _d.dir.path().join("big.pem");
    std::fs::write(&big, "A".repeat(1 << 20)).unwrap();
    for (file, says) in [
        ("/dev/zero", "NUL"),
        (big.to_str().unwrap(), "over 16384 bytes"),
    ] {
        let send = [
            "migrate",
            "send",
            &m.uuid,
            "127.0.0.1:9",
            "--credentials",
            file,
        ];
        let (code, _, err) = vfctl(&bus, &send);
        assert_eq!(code, 2, "{file}: {err}");
        assert!(err.contains(says), "{file}: {err}");
    }
    for bundle in [
        "",
        "-----BEGIN CERTIFICATE-----\n\u{1}\n",
        &"A".repeat(1 << 20),
    ] {
        let e = c
            .migrate_out_with(&m.uuid, "127.0.0.1:9", bundle)
            .unwrap_err();
        assert_eq!(error_name(&e), "BadInput", "{e}");
        assert!(
            e.to_string().contains("one-time migration credentials"),
            "{e}"
        );
        assert!(e.to_string().len() < 1000, "bounded: {e}");
    }
    assert!(
        c.mdevs().unwrap().iter().all(|x| x.active),
        "the mdev is as it was"
    );
}

/// A lease's recovery keys as an attacker would send them: the VMM is a socket the
/// daemon, as root, would later connect to, and a policy it would act on. Each is
/// refused at the request, bounded, and nothing is leased or bound.
#[test]
fn hostile_recovery_keys_are_refused_before_anything_is_leased() {
    let bus = Bus::open();
    let d = Daemon::start(&bus, layouts::large(1, 2), "", &[]);
    let c = bus.client();
    let host = capture(&d);
    let long = format!("ch:/{}", "a".repeat(1 << 20));
    for (on_failure, vmm) in [
        ("", "ch:relative.sock"),
        ("", "ch:/run/../etc/shadow"),
        ("", "ch:/run/a\u{1b}[2Jb"),
        ("", long.as_str()),
        ("", "qemu:///system"),
        // (A NUL cannot cross the bus: D-Bus strings hold none.)
        ("", "libvirt "),
        ("Replace", ""),
        ("replace\n", ""),
        ("x".repeat(1 << 20).as_str(), ""),
    ] {
        let mut r = req("k1", "vm1", "vf", 1);
        r.on_failure = on_failure.into();
        r.vmm = vmm.into();
        let e = c.provision(&r).unwrap_err();
        assert_eq!(error_name(&e), "BadInput", "{on_failure:?} {vmm:?}: {e}");
        let text = e.to_string();
        assert!(text.len() < 1024 && !text.contains('\u{1b}'), "{text}");
    }
    assert!(c.leases().unwrap().is_empty());
    assert_eq!(capture(&d), host, "the host is unchanged");
}

/// A flood of swaps of one leased VF from many clients at once: each either swaps
/// or is refused with a type; the lease ends holding one device, and no function
/// is on vfio-pci that neither a lease holds nor the quarantine explains.
#[test]
fn a_flood_of_replace_calls_leaves_one_device_in_the_lease() {
    let bus = Bus::open();
    let d = Daemon::start(&bus, layouts::large(2, 4), "", &[]);
    let c = bus.client();
    let l = c.provision(&req("f1", "vm1", "vf", 1)).unwrap();
    let dev = l.devices[0].address.clone();
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let (c, dev) = (bus.client(), dev.clone());
            std::thread::spawn(move || c.replace(&dev, "flood").map_err(|e| error_name(&e)))
        })
        .collect();
    let mut swapped = 0;
    for t in threads {
        match t.join().unwrap() {
            Ok(_) => swapped += 1,
            Err(name) => assert!(
                matches!(name.as_str(), "NotFound" | "NoDevice"),
                "a refusal with a type: {name}"
            ),
        }
    }
    assert_eq!(
        swapped, 1,
        "the first swaps; the rest find {dev} no longer leased"
    );
    let now = c.leases().unwrap();
    assert_eq!(now.len(), 1);
    assert_eq!(now[0].devices.len(), 1);
    nothing_stray(&bus, &d.root, "after the flood");
}
