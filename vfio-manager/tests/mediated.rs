//! The mediated path through the daemon: mdevs created, removed and listed over
//! D-Bus, `auto` definitions started at boot, leases of mdev and vGPU profiles,
//! and recovery of a mediated provision a crash cut off. Real dbus-daemon, real
//! vfio-managerd, the fake kernel (the emulated host runs the same on mtty:
//! tests/real-kernel).

mod common;

use common::*;
use mediated_dev::{MdevHost, Mediator};
use vf_provisioner::{layouts, Sysfs};
use vfio_manager::api::Request;

const MTTY_2: &str = "mtty-2";

fn host(d: &Daemon) -> MdevHost {
    MdevHost::scan(&Sysfs::open_fake(&d.root).unwrap())
}

fn free(d: &Daemon, ty: &str) -> u32 {
    let h = host(d);
    h.parent("mtty")
        .unwrap()
        .find_type(ty)
        .unwrap()
        .available_instances
}

fn req(id: &str, profile: &str, count: u32) -> Request {
    Request {
        request_id: id.into(),
        vm_name: format!("vm-{id}"),
        profile: profile.into(),
        count,
        ..Request::default()
    }
}

#[test]
fn mdevs_are_created_listed_and_removed_through_the_daemon() {
    let bus = Bus::open();
    let d = Daemon::start(&bus, layouts::emulated(), "", &[]);
    let before = free(&d, MTTY_2);
    let u = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001";
    let (code, out, err) = vfctl(
        &bus,
        &[
            "mdev", "create", "--parent", "mtty", "--type", MTTY_2, "--uuid", u,
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), u);
    assert_eq!(free(&d, MTTY_2), before - 1);
    let (_, list, _) = vfctl(&bus, &["mdev", "list"]);
    assert!(list.contains(u) && list.contains(MTTY_2), "{list}");

    // The same UUID again: refused, named, nothing changed.
    let (code, _, err) = vfctl(
        &bus,
        &[
            "mdev", "create", "--parent", "mtty", "--type", MTTY_2, "--uuid", u,
        ],
    );
    assert_eq!(code, 3, "{err}");
    assert!(err.contains(u) && err.contains("in use"), "{err}");
    assert_eq!(free(&d, MTTY_2), before - 1);

    let (code, _, err) = vfctl(&bus, &["mdev", "remove", u]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(free(&d, MTTY_2), before);
    let (code, _, err) = vfctl(&bus, &["mdev", "remove", u]);
    assert_eq!(code, 2, "removing it twice: {err}");
    assert!(d.audit_text().contains("mdev-create"), "audited");
}

#[test]
fn auto_definitions_are_started_when_the_daemon_starts() {
    let bus = Bus::open();
    let mut d = Daemon::start(&bus, layouts::emulated(), "", &[]);
    let u = "0f2c1d1e-aaaa-4bbb-8ccc-000000000001";
    let (code, _, err) = vfctl(
        &bus,
        &[
            "mdev", "create", "--parent", "mtty", "--type", "mtty-1", "--uuid", u, "--define",
            "--auto",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let def = d.root.join("etc/mdevctl.d/mtty").join(u);
    assert!(def.exists(), "definition written in mdevctl's place");
    // Gone by hand (as after a reboot), then the daemon starts again.
    d.stop();
    Mediator::new(Sysfs::open_fake(&d.root).unwrap())
        .remove(&u.parse().unwrap())
        .unwrap();
    d.restart();
    let m = host(&d);
    let active = m.mdev(&u.parse().unwrap()).expect("started at boot");
    assert_eq!(active.type_id, "mtty-1");
    assert!(d.log_text().contains(&format!("restore: mdev {u}: ok")));
    // remove --undefine takes both.
    let (code, _, err) = vfctl(&bus, &["mdev", "remove", u, "--undefine"]);
    assert_eq!(code, 0, "{err}");
    assert!(!def.exists() && host(&d).mdevs.is_empty());
}

#[test]
fn a_lease_of_an_mdev_profile_creates_them_and_its_release_removes_them() {
    let bus = Bus::open();
    let mut d = Daemon::start(&bus, layouts::emulated(), "", &[]);
    let c = bus.client();
    let before = free(&d, MTTY_2);
    let lease = c.provision(&req("m1", MTTY_2, 3)).unwrap();
    assert_eq!(lease.devices.len(), 3);
    assert_eq!(free(&d, MTTY_2), before - 3);
    let h = host(&d);
    for dev in &lease.devices {
        let m = h
            .mdev(&dev.address.parse().unwrap())
            .expect("an active mdev");
        assert_eq!(m.type_id, MTTY_2);
        assert!(
            dev.libvirt_hostdev.contains("type=\"mdev\"")
                && dev.libvirt_hostdev.contains(&dev.address),
            "{}",
            dev.libvirt_hostdev
        );
        assert_eq!(
            dev.ch_device,
            format!("path=/sys/bus/mdev/devices/{}/", dev.address)
        );
        assert_eq!(
            dev.vfio_path,
            format!("/dev/vfio/{}", m.iommu_group.unwrap())
        );
    }
    // Leased mdevs show their VM and refuse a direct removal.
    let (_, list, _) = vfctl(&bus, &["mdev", "list"]);
    assert!(list.contains("vm-m1"), "{list}");
    let u = &lease.devices[0].address;
    let e = c.remove_mdev(u, false).unwrap_err();
    assert_eq!(error_name(&e), "Refused", "{e}");
    assert!(e.to_string().contains("vm-m1"), "{e}");
    // The same request id again: the same lease, nothing new made.
    assert_eq!(c.provision(&req("m1", MTTY_2, 3)).unwrap(), lease);
    assert_eq!(free(&d, MTTY_2), before - 3);
    // A restart finds the leased mdevs where they are; one removed behind the
    // daemon's back is reported gone, by its UUID.
    d.restart();
    assert!(
        !d.log_text().contains("gone from sysfs"),
        "{}",
        d.log_text()
    );
    d.kill();
    let gone = &lease.devices[2].address;
    let remove = format!("sys/bus/mdev/devices/{gone}/remove");
    Sysfs::open_fake(&d.root)
        .unwrap()
        .write_attr(&d.root.join(remove), "1")
        .unwrap();
    d.restart();
    // As after a reboot: an mdev the lease made is made again, with its UUID.
    assert!(
        d.log_text().contains(&format!("restore: {gone} of lease")),
        "{}",
        d.log_text()
    );
    assert!(host(&d).mdevs.iter().any(|m| &m.uuid.to_string() == gone));

    assert!(c.release_request("m1").unwrap());
    assert_eq!(free(&d, MTTY_2), before);
    assert!(host(&d).mdevs.is_empty());
}

#[test]
fn a_profile_that_does_not_fit_is_refused_and_changes_nothing() {
    let bus = Bus::open();
    let d = Daemon::start(&bus, layouts::emulated(), "", &[]);
    let c = bus.client();
    let before = free(&d, MTTY_2);
    let e = c.provision(&req("big", MTTY_2, before + 1)).unwrap_err();
    assert_eq!(error_name(&e), "NoDevice", "{e}");
    assert!(e.to_string().contains("do not fit"), "{e}");
    assert!(host(&d).mdevs.is_empty(), "nothing made");
    let e = c.provision(&req("odd", "no-such-type", 1)).unwrap_err();
    assert_eq!(error_name(&e), "NoDevice", "{e}");
    assert!(c.leases().unwrap().is_empty());
}

#[test]
fn a_lease_of_a_vgpu_profile_sets_vf_types_and_its_release_clears_them() {
    let bus = Bus::open();
    let config = "[[pf]]\naddress = \"0000:ca:00.0\"\nvfs = 4\n";
    let d = Daemon::start(&bus, layouts::nvidia_dc(), config, &[]);
    let c = bus.client();
    let lease = c.provision(&req("g1", "NVIDIA A100D-20C", 2)).unwrap();
    assert_eq!(lease.devices.len(), 2);
    let h = host(&d);
    for dev in &lease.devices {
        let slot = h
            .vgpus
            .iter()
            .find(|s| s.vf.to_string() == dev.address)
            .expect("a VF with vGPU attributes");
        assert!(slot.current.is_some(), "{} has its type", dev.address);
        assert!(
            dev.libvirt_hostdev.contains("type=\"pci\""),
            "the VF itself"
        );
    }
    // 2 x 20 GiB of 80: two more 20C fit, a 40C does not mix with 20C.
    let e = c.provision(&req("g2", "NVIDIA A100D-40C", 1)).unwrap_err();
    assert_eq!(error_name(&e), "NoDevice", "{e}");
    assert!(c.release_request("g1").unwrap());
    assert!(
        host(&d).vgpus.iter().all(|s| s.current.is_none()),
        "types cleared"
    );
    c.provision(&req("g3", "NVIDIA A100D-40C", 2)).unwrap();
}

#[test]
fn a_mediated_provision_cut_off_by_a_crash_is_undone_at_start() {
    let bus = Bus::open();
    let mut d = Daemon::start(&bus, layouts::emulated(), "", &[]);
    let before = free(&d, MTTY_2);
    d.kill();
    // The state a SIGKILL leaves between making an mdev and committing its lease:
    // the intent row (as versions before the kind had its own field wrote it: a
    // marker where the driver goes), and the mdev on the host.
    let u = uuid::Uuid::new_v4();
    Mediator::new(Sysfs::open_fake(&d.root).unwrap())
        .create(&"mtty".parse().unwrap(), &MTTY_2.parse().unwrap(), Some(u))
        .unwrap();
    let db = rusqlite::Connection::open(d.state.join("state.db")).unwrap();
    db.execute(
        "INSERT INTO intents (op, lease_id, body, started_at) VALUES ('provision', 'cut', ?1, 0)",
        [format!(r#"{{"devices":[["{u}","@mdev"]]}}"#)],
    )
    .unwrap();
    // And a direct create cut off after its write.
    let v = uuid::Uuid::new_v4();
    Mediator::new(Sysfs::open_fake(&d.root).unwrap())
        .create(
            &"mtty".parse().unwrap(),
            &"mtty-1".parse().unwrap(),
            Some(v),
        )
        .unwrap();
    db.execute(
        "INSERT INTO intents (op, lease_id, body, started_at) VALUES ('mdev-create', '', ?1, 0)",
        [format!(
            r#"{{"uuid":"{v}","remove_mdev":true,"remove_definition":false}}"#
        )],
    )
    .unwrap();
    drop(db);
    d.restart();
    assert!(host(&d).mdevs.is_empty(), "log:\n{}", d.log_text());
    assert_eq!(free(&d, MTTY_2), before);
    let log = d.log_text();
    assert!(log.contains(&format!("{u} undone: ok")), "{log}");
    assert!(
        log.contains(&format!("mdev-create of {v} was cut off")),
        "{log}"
    );
}

#[test]
fn migration_of_an_mdev_the_fake_host_cannot_open_is_refused_by_name() {
    // The fake kernel has no VFIO ioctls: the daemon's preflight fails and says
    // which device and why (the state moves on the real kernel: tests/real-kernel).
    let bus = Bus::open();
    let _d = Daemon::start(&bus, layouts::emulated(), "", &[]);
    let (code, _, err) = vfctl(
        &bus,
        &["migrate", "check", "83b8f4f2-509f-382f-3c1e-e6bfe0fa1009"],
    );
    assert_eq!(code, 2, "no such mdev: {err}");
    assert!(
        err.contains("83b8f4f2-509f-382f-3c1e-e6bfe0fa1009"),
        "{err}"
    );
    let (code, _, err) = vfctl(
        &bus,
        &[
            "migrate",
            "receive",
            "83b8f4f2-509f-382f-3c1e-e6bfe0fa1009",
            "--listen",
            "127.0.0.1:0",
        ],
    );
    assert_eq!(code, 2, "absent and no type to create: {err}");
    assert!(err.contains("give the type"), "{err}");
    // No TLS credentials on this host: refused before anything is made or heard.
    let (code, _, err) = vfctl(
        &bus,
        &[
            "migrate",
            "receive",
            "83b8f4f2-509f-382f-3c1e-e6bfe0fa1009",
            "--type",
            MTTY_2,
            "--listen",
            "127.0.0.1:0",
        ],
    );
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("/etc/pki/CA/cacert.pem") && err.contains("mutual TLS"),
        "{err}"
    );
    assert!(host(&_d).mdevs.is_empty(), "nothing was made for it");
}

/// One step of the crash test, repeated until the daemon gives a definite answer.
enum Step {
    Provision(Box<Request>),
    Release(String),
    Create(String),
    Remove(String),
}

#[test]
fn sigkill_during_mediated_operations_loses_doubles_and_leaks_nothing() {
    use std::collections::{BTreeMap, BTreeSet};
    use std::time::Duration;
    let seed = crash_seed();
    let bus = Bus::open();
    let mut d = Daemon::start(&bus, layouts::emulated(), "", &[]);
    let c = bus.client();
    let mut rng = Rng(seed);
    // mtty counts ports: an mtty-1 takes one, an mtty-2 two.
    let ports = free(&d, "mtty-1");
    // What the client was told: leases of mtty-2 by request id, and the mtty-1
    // mdevs it made itself.
    let mut held: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut made: BTreeSet<String> = BTreeSet::new();
    let (mut kills, mut next) = (0, 0);
    let ops = 120;
    for op in 0..ops {
        next += 1;
        let step = match rng.below(4) {
            0 | 1 if held.len() < 4 => Step::Provision(Box::new(req(
                &format!("m{next}"),
                MTTY_2,
                1 + rng.below(2) as u32,
            ))),
            0..=2 if !held.is_empty() => Step::Release(
                held.keys()
                    .nth(rng.below(held.len() as u64) as usize)
                    .unwrap()
                    .clone(),
            ),
            _ if made.len() < 4 || made.is_empty() => {
                Step::Create(format!("0f2c1d1e-aaaa-4bbb-8ccc-{next:012}"))
            }
            _ => Step::Remove(
                made.iter()
                    .nth(rng.below(made.len() as u64) as usize)
                    .unwrap()
                    .clone(),
            ),
        };
        let killer =
            (rng.below(3) == 0).then(|| d.kill_after(Duration::from_micros(rng.below(6000))));
        let (mut retried, mut restarts) = (false, 0);
        loop {
            let answer = match &step {
                Step::Provision(r) => c.provision(r).map(|l| {
                    let devs = l.devices.iter().map(|x| x.address.clone()).collect();
                    held.insert(l.request_id, devs);
                }),
                Step::Release(k) => c.release_request(k).map(|_| {
                    held.remove(k);
                }),
                Step::Create(u) => c.create_mdev("mtty", "mtty-1", u, "").map(|_| {
                    made.insert(u.clone());
                }),
                Step::Remove(u) => c.remove_mdev(u, false).map(|_| {
                    made.remove(u);
                }),
            };
            let Err(e) = answer else { break };
            match (error_name(&e).as_str(), &step) {
                ("NoDevice", Step::Provision(_)) => break,
                // Done before the crash, the answer lost: the retry finds it done.
                ("Refused", Step::Create(u))
                    if retried && host(&d).mdev(&u.parse().unwrap()).is_some() =>
                {
                    made.insert(u.clone());
                    break;
                }
                ("NotFound", Step::Remove(u)) if retried => {
                    made.remove(u);
                    break;
                }
                ("BadInput" | "Refused" | "NotFound" | "PermissionDenied" | "NoDevice", _) => {
                    panic!(
                        "op {op}: unexpected refusal {e} (seed {seed}); log:\n{}",
                        d.log_text()
                    )
                }
                _ => {
                    // A failure that outlives restarts is a bug, not a crash.
                    assert!(
                        restarts < 10,
                        "op {op}: {e} after {restarts} restarts (seed {seed}); log:\n{}",
                        d.log_text()
                    );
                    d.restart_after(killer.as_ref());
                    kills += 1;
                    restarts += 1;
                    retried = true;
                }
            }
        }
        kills += d.reap(killer) as u32;
    }
    d.restart();
    eprintln!(
        "{ops} operations, {kills} daemon kills, {} leases and {} mdevs held at the end",
        held.len(),
        made.len()
    );
    assert!(
        kills >= 15,
        "the test must really kill the daemon (killed {kills} times)"
    );
    let leases: BTreeMap<String, Vec<String>> = c
        .leases()
        .unwrap()
        .into_iter()
        .map(|l| {
            (
                l.request_id,
                l.devices.into_iter().map(|x| x.address).collect(),
            )
        })
        .collect();
    assert_eq!(
        leases, held,
        "leases lost, invented or changed (seed {seed})"
    );
    let leased: Vec<&String> = leases.values().flatten().collect();
    let on_host: BTreeMap<String, String> = host(&d)
        .mdevs
        .iter()
        .map(|m| (m.uuid.to_string(), m.type_id.to_string()))
        .collect();
    let mut want: BTreeMap<String, String> = made
        .iter()
        .map(|u| (u.clone(), "mtty-1".to_string()))
        .collect();
    want.extend(leased.iter().map(|u| (u.to_string(), MTTY_2.to_string())));
    assert_eq!(
        want.len(),
        made.len() + leased.len(),
        "an mdev counted twice (seed {seed})"
    );
    assert_eq!(
        on_host,
        want,
        "the host's mdevs are what the client holds, nothing leaked (seed {seed}); log:\n{}",
        d.log_text()
    );
    assert_eq!(
        free(&d, "mtty-1"),
        ports - made.len() as u32 - 2 * leased.len() as u32,
        "every port a removed mdev held is free again (seed {seed})"
    );
}
