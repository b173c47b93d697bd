//! A running VM's leased mdev migrated by its VMM to a second VMM on this host
//! (`vfctl migrate prepare-vm|commit|abort`): the daemon reserves the destination
//! before any state moves, hands the lease over under the same id, and settles a
//! hand-over a crash cut off by who holds which mdev open. Real dbus-daemon and
//! vfio-managerd on the fake kernel, VMMs stood in for by `fake::hold_group`; the
//! emulated host migrates a real nested VM the same way (tests/real-kernel).

mod common;

use common::*;
use vf_provisioner::fake::{end_process, hold_group};
use vf_provisioner::layouts;
use vfio_manager::api::client::Client;
use vfio_manager::api::{Lease, Request};

const SOURCE_VMM: u32 = 4100;
const DEST_VMM: u32 = 4101;

/// A lease of one mtty-2 mdev for VM `vm-ID`.
fn mtty_lease(bus: &Bus, id: &str) -> Lease {
    let req = Request {
        request_id: id.into(),
        vm_name: format!("vm-{id}"),
        profile: "mtty-2".into(),
        count: 1,
        ..Request::default()
    };
    bus.client().provision(&req).unwrap()
}

/// A lease of one mtty-2 mdev, its VM running in a VMM that holds it open.
fn running(bus: &Bus, d: &Daemon) -> (Lease, String) {
    let lease = mtty_lease(bus, "mig");
    let source = lease.devices[0].address.clone();
    hold(bus, d, SOURCE_VMM, &source);
    (lease, source)
}

/// Process `pid` holds mdev `uuid`'s VFIO group open, as a VMM does.
fn hold(bus: &Bus, d: &Daemon, pid: u32, uuid: &str) {
    let group = mdev(&bus.client(), uuid).expect("the mdev").iommu_group;
    hold_group(&d.root, pid, "qemu-system-x86", group as u32).unwrap();
}

fn mdev(c: &Client, uuid: &str) -> Option<vfio_manager::api::MdevInfo> {
    c.mdevs().unwrap().into_iter().find(|m| m.uuid == uuid)
}

fn devices(c: &Client, lease: &str) -> Vec<String> {
    let l = c.leases().unwrap().into_iter().find(|l| l.id == lease);
    l.expect("the lease")
        .devices
        .into_iter()
        .map(|d| d.address)
        .collect()
}

#[test]
fn a_migrated_vms_lease_moves_to_the_destination_under_the_same_id() {
    let bus = Bus::open();
    let d = Daemon::start(&bus, layouts::emulated(), "", &[]);
    let c = bus.client();
    let (lease, source) = running(&bus, &d);
    let dest = c.prepare_handover(&lease.id, "").unwrap();
    let m = mdev(&c, &dest).expect("the destination is made");
    // The migration never started and the source quit: no VM runs on the
    // destination, and the lease does not move there.
    end_process(&d.root, SOURCE_VMM).unwrap();
    let e = c.commit_handover(&lease.id).unwrap_err();
    assert!(
        e.to_string().contains("no VMM holds the destination"),
        "{e}"
    );
    hold(&bus, &d, SOURCE_VMM, &source);
    assert_eq!((m.type_id.as_str(), m.lease_id.as_str()), ("mtty-2", ""));
    let e = c.prepare_handover(&lease.id, "").unwrap_err();
    assert_eq!(
        error_name(&e),
        "Refused",
        "one prepared migration per lease: {e}"
    );
    // The destination VMM takes it; the source VMM still runs.
    hold(&bus, &d, DEST_VMM, &dest);
    let e = c.commit_handover(&lease.id).unwrap_err();
    assert!(e.to_string().contains("still held open"), "{e}");
    assert_eq!(devices(&c, &lease.id), [source.as_str()]);
    // The migration completed and the source VMM quit.
    end_process(&d.root, SOURCE_VMM).unwrap();
    assert_eq!(c.commit_handover(&lease.id).unwrap(), dest);
    assert_eq!(
        devices(&c, &lease.id),
        [dest.as_str()],
        "same lease, the destination"
    );
    assert!(
        mdev(&c, &source).is_none(),
        "the source the lease made is removed"
    );
    let swaps = c.lease_swaps(&lease.id).unwrap();
    assert_eq!(
        (swaps[0].0.as_str(), swaps[0].1.as_str()),
        (source.as_str(), dest.as_str())
    );
    assert!(
        c.health().unwrap().iter().all(|h| h.name != source),
        "nothing held back"
    );
    let e = c.commit_handover(&lease.id).unwrap_err();
    assert_eq!(error_name(&e), "NotFound", "{e}");
}

#[test]
fn a_failed_migration_removes_the_destination_and_leaves_the_lease() {
    let bus = Bus::open();
    let d = Daemon::start(&bus, layouts::emulated(), "", &[]);
    let c = bus.client();
    let (lease, source) = running(&bus, &d);
    let dest = c.prepare_handover(&lease.id, "").unwrap();
    hold(&bus, &d, DEST_VMM, &dest);
    let e = c.abort_handover(&lease.id).unwrap_err();
    assert!(
        e.to_string().contains("quit the destination VMM first"),
        "{e}"
    );
    end_process(&d.root, DEST_VMM).unwrap();
    c.abort_handover(&lease.id).unwrap();
    assert!(
        mdev(&c, &dest).is_none(),
        "the destination made for it is removed"
    );
    assert_eq!(devices(&c, &lease.id), [source.as_str()]);
    assert!(mdev(&c, &source).is_some());
}

/// Refused before any state moves, with nothing changed: a destination of another
/// type, one another lease holds, a lease that is not one mdev, bad names.
#[test]
fn a_destination_that_cannot_take_the_state_is_refused_first() {
    let bus = Bus::open();
    let d = Daemon::start(&bus, layouts::emulated(), "", &[]);
    let c = bus.client();
    let (lease, source) = running(&bus, &d);
    let other = c.create_mdev("mtty", "mtty-1", "", "").unwrap().uuid;
    let e = c.prepare_handover(&lease.id, &other).unwrap_err();
    assert_eq!(error_name(&e), "Refused", "{e}");
    assert!(e.to_string().contains("mtty-1"), "names the mismatch: {e}");
    let taken = mtty_lease(&bus, "other").devices[0].address.clone();
    let e = c.prepare_handover(&lease.id, &taken).unwrap_err();
    assert!(e.to_string().contains("holds it"), "{e}");
    // One the gate holds back (an operator's quarantine) is refused as well.
    let held = c.create_mdev("mtty", "mtty-2", "", "").unwrap().uuid;
    c.quarantine(&held, "suspect").unwrap();
    let e = c.prepare_handover(&lease.id, &held).unwrap_err();
    assert_eq!(error_name(&e), "Refused", "{e}");
    assert!(e.to_string().contains("quarantined"), "{e}");
    let huge = "a".repeat(1 << 20);
    for (lease_id, want) in [
        ("../x", "BadInput"),
        ("0123456789abcdef", "NotFound"),
        (huge.as_str(), "BadInput"),
    ] {
        let e = c.prepare_handover(lease_id, "").unwrap_err();
        assert_eq!(error_name(&e), want, "{lease_id}: {e}");
        // The hook's read of a hand-over refuses the same, and short.
        let e = c.prepared_handover(lease_id).unwrap_err();
        assert_eq!(error_name(&e), want, "PreparedHandover {lease_id:.20}: {e}");
        assert!(e.to_string().len() < 1000, "bounded: {e:.200}");
    }
    let e = c.prepared_handover("0123\n456789abcdef").unwrap_err();
    assert_eq!(error_name(&e), "BadInput", "a control character: {e}");
    assert_eq!(
        c.prepared_handover(&lease.id).unwrap(),
        None,
        "none prepared"
    );
    let e = c.prepare_handover(&lease.id, "not-a-uuid\n").unwrap_err();
    assert_eq!(error_name(&e), "BadInput", "{e}");
    let mdevs: Vec<String> = c.mdevs().unwrap().into_iter().map(|m| m.uuid).collect();
    assert_eq!(mdevs.len(), 4, "nothing made: {mdevs:?}");
    assert_eq!(devices(&c, &lease.id), [source]);
    // Nothing was left prepared: a good destination is taken now.
    c.prepare_handover(&lease.id, "").unwrap();
}

/// SIGKILL between prepare and commit: at start the daemon settles the hand-over
/// by who holds which mdev open, and exactly one lease holds the VM's device.
#[test]
fn a_handover_cut_off_by_sigkill_is_settled_at_start() {
    let bus = Bus::open();
    let mut d = Daemon::start(&bus, layouts::emulated(), "", &[]);
    let c = bus.client();
    let (lease, source) = running(&bus, &d);
    // Only the destination is held: the VM moved. The lease follows it.
    let dest = c.prepare_handover(&lease.id, "").unwrap();
    hold(&bus, &d, DEST_VMM, &dest);
    end_process(&d.root, SOURCE_VMM).unwrap();
    d.restart();
    let c = bus.client();
    assert_eq!(devices(&c, &lease.id), [dest.as_str()]);
    assert!(mdev(&c, &source).is_none());
    // Only the source is held: the migration never happened. Undone.
    end_process(&d.root, DEST_VMM).unwrap();
    hold(&bus, &d, SOURCE_VMM, &dest);
    let second = c.prepare_handover(&lease.id, "").unwrap();
    d.restart();
    let c = bus.client();
    assert_eq!(devices(&c, &lease.id), [dest.as_str()]);
    assert!(mdev(&c, &second).is_none(), "the destination is removed");
    // Both held: the migration may still run; left for commit or abort.
    let third = c.prepare_handover(&lease.id, "").unwrap();
    hold(&bus, &d, DEST_VMM, &third);
    d.restart();
    let c = bus.client();
    assert_eq!(devices(&c, &lease.id), [dest.as_str()]);
    end_process(&d.root, SOURCE_VMM).unwrap();
    assert_eq!(c.commit_handover(&lease.id).unwrap(), third);
    let holders: Vec<String> = c
        .leases()
        .unwrap()
        .into_iter()
        .flat_map(|l| l.devices)
        .map(|d| d.address)
        .collect();
    assert_eq!(holders, [third], "exactly one lease holds the VM's device");
}

/// `vfctl migrate check --vm NAME --to DEST` asks the destination's daemon (here on
/// a second bus, as on a second host) whether it can take the VM's mdevs: room for
/// them, their vendor driver at the same version. Bad destinations are refused
/// before anything is reached; nothing changes on either side.
#[test]
fn migrate_check_asks_the_destination_for_room_and_the_driver() {
    let (bus, there) = (Bus::open(), Bus::open());
    let _d = Daemon::start(&bus, layouts::emulated(), "", &[]);
    let _e = Daemon::start(&there, layouts::emulated(), "", &[]);
    let lease = mtty_lease(&bus, "mig");
    let (code, out, err) = vfctl(
        &bus,
        &["migrate", "check", "--vm", "vm-mig", "--to", &there.address],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("VM vm-mig can migrate to")
            && out.contains("room for 1 mtty-2, vendor driver mtty"),
        "{out}"
    );
    // The destination fills up.
    let c = there.client();
    let fill = |i: usize| Request {
        request_id: format!("fill-{i}"),
        vm_name: "filler".into(),
        profile: "mtty-2".into(),
        count: 1,
        ..Request::default()
    };
    let taken = (0..64)
        .take_while(|i| c.provision(&fill(*i)).is_ok())
        .count();
    assert!((1..64).contains(&taken), "{taken} mtty-2 fit");
    let (code, _, err) = vfctl(
        &bus,
        &["migrate", "check", "--vm", "vm-mig", "--to", &there.address],
    );
    assert_eq!(code, 3, "no room: {err}");
    assert!(err.contains("do not fit on this host"), "{err}");
    let e = c
        .check_incoming("mtty-2", "mtty", "0.0-other", 1)
        .unwrap_err();
    assert_eq!(error_name(&e), "Refused", "another driver version: {e}");
    let e = c
        .check_incoming("mtty-2", "no-such-driver", "1", 1)
        .unwrap_err();
    assert!(e.to_string().contains("not loaded"), "{e}");
    let huge = "1".repeat(1 << 20);
    for (ty, driver, version, n) in [
        ("mtty-2", "mtty", huge.as_str(), 1),
        (huge.as_str(), "mtty", "1", 1),
        ("../x", "mtty", "1", 1),
        ("mtty-2", "a/b", "1", 1),
        ("mtty-2", "mtty", "1\n2", 1),
        ("mtty-2", "mtty", "1", 0),
    ] {
        let e = c.check_incoming(ty, driver, version, n).unwrap_err();
        assert_eq!(
            error_name(&e),
            "BadInput",
            "{ty} {driver} {version:?} {n}: {e}"
        );
    }
    for to in ["-oProxyCommand=x", "host name", "a,b", ""] {
        let (code, _, err) = vfctl(&bus, &["migrate", "check", "--vm", "vm-mig", "--to", to]);
        assert_eq!(code, 2, "{to:?} is refused as input: {err}");
    }
    let (code, _, err) = vfctl(
        &bus,
        &[
            "migrate",
            "check",
            "--vm",
            "no-such-vm",
            "--to",
            &there.address,
        ],
    );
    assert_eq!(code, 2, "an unknown VM: {err}");
    assert!(err.contains("no lease of it holds an mdev"), "{err}");
    // A destination nobody answers at: said so, exit 1.
    let (code, _, err) = vfctl(
        &bus,
        &[
            "migrate",
            "check",
            "--vm",
            "vm-mig",
            "--to",
            "unix:path=/nonexistent/bus",
        ],
    );
    assert_eq!(code, 1, "an unreachable destination: {err}");
    assert!(
        err.contains("not reachable") || err.contains("cannot reach"),
        "{err}"
    );
    assert_eq!(devices(&bus.client(), &lease.id).len(), 1);
    assert_eq!(
        c.leases().unwrap().len(),
        taken,
        "the destination is unchanged"
    );
}

/// `vfctl migrate plan --vm NAME`: what of a VM's leases moves with it (its mdev)
/// and what does not (a passed-through VF), and a prepared hand-over; changes
/// nothing.
#[test]
fn migrate_plan_shows_what_moves_with_the_vm_and_what_does_not() {
    let bus = Bus::open();
    let config = "manage = [\"8086:10c9\"]\n[[pf]]\naddress = \"0000:01:00.0\"\nvfs = 1\n";
    let d = Daemon::start(&bus, layouts::emulated(), config, &[]);
    let c = bus.client();
    let (lease, source) = running(&bus, &d);
    let vf = Request {
        request_id: "vf".into(),
        vm_name: "vm-mig".into(),
        profile: "8086:10c9".into(),
        count: 1,
        ..Request::default()
    };
    let vf = c.provision(&vf).unwrap();
    let (code, out, err) = vfctl(&bus, &["migrate", "plan", "--vm", "vm-mig"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("1 of 2 devices move with it; it cannot live-migrate as it is"),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "mdev {source} (mtty-2, vendor driver mtty 0.1): moves"
        )),
        "{out}"
    );
    let vf_line = format!("lease {}: {}", vf.id, vf.devices[0].address);
    assert!(
        out.contains(&vf_line) && out.contains("does not move"),
        "{out}"
    );

    let dest = c.prepare_handover(&lease.id, "").unwrap();
    let (code, out, err) = vfctl(
        &bus,
        &["--output", "json", "migrate", "plan", "--vm", "vm-mig"],
    );
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["prepared"][0]["from"], source.as_str());
    assert_eq!(v["prepared"][0]["to"], dest.as_str());
    let moves: Vec<bool> = v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["moves"].as_bool().unwrap())
        .collect();
    assert_eq!(moves.iter().filter(|m| **m).count(), 1, "{out}");

    // Unknown and hostile VM names: exit 2, nothing changed.
    let before = (c.leases().unwrap(), c.mdevs().unwrap());
    for vm in [
        "no-such-vm",
        "../x",
        "vm\nlease 0 for VM root",
        &"v".repeat(100_000),
    ] {
        let (code, out, err) = vfctl(&bus, &["migrate", "plan", "--vm", vm]);
        assert_eq!(code, 2, "{vm:.40}: {out}{err:.200}");
        assert!(
            err.len() < 4096,
            "the refusal stays short: {} bytes",
            err.len()
        );
    }
    assert_eq!((c.leases().unwrap(), c.mdevs().unwrap()), before);
}
