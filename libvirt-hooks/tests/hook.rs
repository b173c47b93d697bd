//! The hook binary as libvirt runs it (arguments, XML on stdin, exit status, one
//! line on failure), against the real daemon on a real dbus-daemon over a fake host.
//! `libvirt.rs` has the same hook under a real libvirtd.

#[path = "../../vfio-manager/tests/common/mod.rs"]
mod common;

mod run_hook;

use std::process::Command;

use common::{driver, Bus, Daemon};
use run_hook::hook;
use vf_provisioner::layouts;
use vfio_manager::api::{Lease, Request};

const UUID: &str = "4dea22b3-1d52-d8f3-2516-782e98ab3fa0";

/// A domain with lease metadata (profile, count) and `hostdevs` as its slots.
fn domain(profile: &str, count: u32, hostdevs: &[&str]) -> String {
    let devs: String = hostdevs.iter().map(|a| hostdev(a)).collect();
    format!(
        "<domain type='qemu'><name>vm1</name><uuid>{UUID}</uuid>\
         <metadata><vfm:lease xmlns:vfm='http://vfio-manager.org/xmlns/lease/1' profile='{profile}' count='{count}'/></metadata>\
         <memory unit='MiB'>64</memory><os><type arch='x86_64' machine='q35'>hvm</type></os>\
         <devices>{devs}</devices></domain>"
    )
}

fn hostdev(a: &str) -> String {
    let a: vf_provisioner::PciAddress = a.parse().unwrap();
    format!(
        "<hostdev mode='subsystem' type='pci' managed='no'><source>{}</source></hostdev>",
        libvirt_hooks::domain::address_element(a)
    )
}

fn leases_of_vm1(bus: &Bus) -> Vec<Lease> {
    let mut l = bus.client().leases().unwrap();
    l.retain(|l| l.vm_uuid == UUID);
    l
}

fn addrs(l: &Lease) -> Vec<String> {
    l.devices.iter().map(|d| d.address.clone()).collect()
}

fn start() -> (Bus, Daemon) {
    let bus = Bus::open();
    let d = Daemon::start(&bus, layouts::large(2, 2), "", &[]);
    (bus, d)
}

#[test]
fn prepare_leases_started_keeps_and_release_returns() {
    let (bus, d) = start();
    let xml = domain("vf", 2, &[]);
    let r = hook(&bus.address, "prepare", "begin", &xml);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let leases = leases_of_vm1(&bus);
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].vm_name, "vm1");
    let devs = addrs(&leases[0]);
    assert_eq!(devs.len(), 2);
    for a in &devs {
        assert_eq!(driver(&d.root, a).as_deref(), Some("vfio-pci"), "{a}");
    }
    for op in ["start", "started", "reconnect"] {
        let r = hook(&bus.address, op, "begin", &xml);
        assert_eq!(r.code, 0, "{op}: {}", r.stderr);
    }
    assert_eq!(leases_of_vm1(&bus), leases, "no second lease, same devices");
    let r = hook(&bus.address, "stopped", "end", &xml);
    assert_eq!(r.code, 0);
    let r = hook(&bus.address, "release", "end", &xml);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(leases_of_vm1(&bus).is_empty());
    for a in &devs {
        assert_ne!(driver(&d.root, a).as_deref(), Some("vfio-pci"), "{a}");
    }
    // The next start of the same domain gets a lease again.
    assert_eq!(hook(&bus.address, "prepare", "begin", &xml).code, 0);
    assert_eq!(leases_of_vm1(&bus).len(), 1);
}

#[test]
fn hostdevs_of_managed_devices_are_leased_exactly() {
    let (bus, d) = start();
    let xml = format!(
        "<domain type='qemu'><name>vm1</name><uuid>{UUID}</uuid><devices>{}{}</devices></domain>",
        hostdev("0000:11:00.2"),
        hostdev("0000:10:00.1")
    );
    let r = hook(&bus.address, "prepare", "begin", &xml);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let l = leases_of_vm1(&bus);
    assert_eq!(addrs(&l[0]), ["0000:10:00.1", "0000:11:00.2"]);
    assert_eq!(driver(&d.root, "0000:11:00.2").as_deref(), Some("vfio-pci"));
    assert_eq!(hook(&bus.address, "release", "end", &xml).code, 0);
    assert!(leases_of_vm1(&bus).is_empty());
}

#[test]
fn a_gpu_with_its_audio_function_is_leased_and_returned_as_one_unit() {
    let bus = Bus::open();
    let d = Daemon::start(&bus, layouts::domestic_gpu(), "", &[]);
    let (gpu, audio) = ("0000:3b:00.0", "0000:3b:00.1");
    let only_gpu = format!(
        "<domain type='qemu'><name>vm1</name><uuid>{UUID}</uuid><devices>{}</devices></domain>",
        hostdev(gpu)
    );
    // The GPU alone would leave its group's other member to the host: refused,
    // naming it and the fix.
    let r = hook(&bus.address, "prepare", "begin", &only_gpu);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains(audio) && r.stderr.contains("name every function of the group"),
        "{}",
        r.stderr
    );
    assert_eq!(driver(&d.root, gpu).as_deref(), Some("mtgpu"));
    let both = only_gpu.replace("</devices>", &format!("{}</devices>", hostdev(audio)));
    let r = hook(&bus.address, "prepare", "begin", &both);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let l = leases_of_vm1(&bus);
    assert_eq!(addrs(&l[0]), [gpu, audio]);
    for a in [gpu, audio] {
        assert_eq!(driver(&d.root, a).as_deref(), Some("vfio-pci"), "{a}");
    }
    assert_eq!(hook(&bus.address, "release", "end", &both).code, 0);
    assert!(leases_of_vm1(&bus).is_empty());
    assert_eq!(driver(&d.root, gpu).as_deref(), Some("mtgpu"));
    assert_eq!(driver(&d.root, audio).as_deref(), Some("snd_hda_intel"));
}

#[test]
fn a_domain_whose_unmanaged_hostdevs_are_none_of_ours_gets_no_lease() {
    let (bus, d) = start();
    let before = common::vfctl(&bus, &["--output", "json", "list"]);
    // managed='no', but a function the daemon does not manage (and one that is absent).
    let xml = format!(
        "<domain type='qemu'><name>vm1</name><uuid>{UUID}</uuid><devices>{}{}</devices></domain>",
        hostdev("0000:00:02.0"),
        hostdev("0000:7f:1f.7")
    );
    for (op, sub) in [
        ("prepare", "begin"),
        ("started", "begin"),
        ("migrate", "begin"),
    ] {
        let r = hook(&bus.address, op, sub, &xml);
        assert_eq!((r.code, r.stdout.as_str()), (0, ""), "{op}: {}", r.stderr);
    }
    assert!(bus.client().leases().unwrap().is_empty(), "nothing leased");
    assert_eq!(common::vfctl(&bus, &["--output", "json", "list"]), before);
    drop(d);
}

#[test]
fn domains_without_our_devices_pass_untouched_without_the_daemon() {
    let plain = "<domain type='kvm'><name>vm1</name><devices><hostdev mode='subsystem' type='pci' managed='yes'>\
                 <source><address domain='0x0000' bus='0x05' slot='0x00' function='0x0'/></source></hostdev></devices></domain>";
    for (op, sub) in [
        ("prepare", "begin"),
        ("migrate", "begin"),
        ("release", "end"),
    ] {
        let r = hook("unix:path=/nonexistent/bus", op, sub, plain);
        assert_eq!((r.code, r.stdout.as_str()), (0, ""), "{op}: {}", r.stderr);
    }
}

#[test]
fn a_start_without_free_devices_fails_with_one_line_naming_the_domain() {
    let (bus, _d) = start();
    let before = common::vfctl(&bus, &["--output", "json", "list"]);
    let r = hook(&bus.address, "prepare", "begin", &domain("vf", 9, &[]));
    assert_eq!(r.code, 1);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("domain vm1") && r.stderr.contains("no free device"),
        "{}",
        r.stderr
    );
    assert!(leases_of_vm1(&bus).is_empty());
    assert_eq!(common::vfctl(&bus, &["--output", "json", "list"]), before);
    // A device another VM holds is refused by name.
    let other = Request {
        request_id: "other".into(),
        vm_name: "other".into(),
        devices: vec!["0000:10:00.1".into()],
        ..Request::default()
    };
    bus.client().provision(&other).unwrap();
    let xml = format!(
        "<domain type='qemu'><name>vm1</name><uuid>{UUID}</uuid><devices>{}</devices></domain>",
        hostdev("0000:10:00.1")
    );
    let r = hook(&bus.address, "prepare", "begin", &xml);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("0000:10:00.1") && r.stderr.contains("leased to VM other"),
        "{}",
        r.stderr
    );
    // And a daemon that is not there is said so.
    let r = hook("unix:path=/nonexistent/bus", "prepare", "begin", &xml);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("not reachable"), "{}", r.stderr);
}

#[test]
fn an_incoming_domain_is_rewritten_for_the_devices_leased_here() {
    let (bus, _d) = start();
    // The source host's addresses: taken here by another VM.
    let other = Request {
        request_id: "other".into(),
        vm_name: "other".into(),
        devices: vec!["0000:10:00.1".into(), "0000:10:00.2".into()],
        count: 2,
        ..Request::default()
    };
    bus.client().provision(&other).unwrap();
    let xml = domain("vf", 2, &["0000:10:00.1", "0000:10:00.2"]);
    let r = hook(&bus.address, "migrate", "begin", &xml);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let out = libvirt_hooks::domain::Domain::parse(&r.stdout).unwrap();
    let got: Vec<String> = out.hostdevs.iter().map(|h| h.address.to_string()).collect();
    let l = leases_of_vm1(&bus);
    assert_eq!(got, addrs(&l[0]), "the XML names the devices leased here");
    assert!(got.iter().all(|a| a.starts_with("0000:11:")), "{got:?}");
    // prepare, which libvirt runs next, finds that lease.
    assert_eq!(hook(&bus.address, "prepare", "begin", &r.stdout).code, 0);
    assert_eq!(leases_of_vm1(&bus).len(), 1);
    if let Some(v) = validate(&r.stdout) {
        assert!(v.0, "virt-xml-validate refused the rewritten XML: {}", v.1);
    }
}

#[test]
fn reconnect_adopts_devices_a_running_vm_holds_without_a_lease() {
    let (bus, d) = start();
    let xml = format!(
        "<domain type='qemu'><name>vm1</name><uuid>{UUID}</uuid><devices>{}</devices></domain>",
        hostdev("0000:10:00.1")
    );
    // Bound by hand and already in use by a running VM (started before the daemon
    // managed it, or a table that lost its lease).
    assert_eq!(common::vfctl(&bus, &["bind", "0000:10:00.1"]).0, 0);
    let sys = vf_provisioner::Sysfs::open_fake(&d.root).unwrap();
    let f = vf_provisioner::PciFunction::read(&sys, &"0000:10:00.1".parse().unwrap()).unwrap();
    vf_provisioner::fake::hold_group(&d.root, 4242, "qemu-system-x86", f.iommu_group.unwrap())
        .unwrap();
    let r = hook(&bus.address, "prepare", "begin", &xml);
    assert_eq!(r.code, 1, "a new start may not take a device in use");
    assert!(r.stderr.contains("held open"), "{}", r.stderr);
    let r = hook(&bus.address, "reconnect", "begin", &xml);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(addrs(&leases_of_vm1(&bus)[0]), ["0000:10:00.1"]);
}

/// (valid, message) from `virt-xml-validate`, or None (said) where it is absent.
pub fn validate(xml: &str) -> Option<(bool, String)> {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("domain.xml");
    std::fs::write(&f, xml).unwrap();
    match Command::new("virt-xml-validate")
        .arg(&f)
        .arg("domain")
        .output()
    {
        Ok(o) => Some((
            o.status.success(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )),
        Err(_) => {
            eprintln!(
                "SKIPPED validation: virt-xml-validate (Debian libvirt-clients) is not installed"
            );
            None
        }
    }
}

#[test]
fn a_mediated_profile_makes_the_domains_mdevs_with_their_uuids() {
    let bus = Bus::open();
    let d = Daemon::start(&bus, layouts::emulated(), "", &[]);
    let sys = vf_provisioner::Sysfs::open_fake(&d.root).unwrap();
    let m = mediated_dev::Mediator::new(sys.clone());
    // One the operator made already (kept at release), one the lease makes.
    let (kept, made) = (
        "0f2c1d1e-aaaa-4bbb-8ccc-00000000000a",
        "0f2c1d1e-aaaa-4bbb-8ccc-00000000000b",
    );
    m.create(
        &"mtty".parse().unwrap(),
        &"mtty-2".parse().unwrap(),
        Some(kept.parse().unwrap()),
    )
    .unwrap();
    let mdev = |u: &str| {
        format!("<hostdev mode='subsystem' type='mdev' model='vfio-pci' managed='no'><source><address uuid='{u}'/></source></hostdev>")
    };
    let xml = domain("mtty-2", 2, &[]).replace(
        "<devices></devices>",
        &format!("<devices>{}{}</devices>", mdev(kept), mdev(made)),
    );
    let r = hook(&bus.address, "prepare", "begin", &xml);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let leases = leases_of_vm1(&bus);
    assert_eq!(leases.len(), 1);
    let mut got = addrs(&leases[0]);
    got.sort();
    assert_eq!(got, [kept, made]);
    let active = |u: &str| mediated_dev::host::read_mdev(&sys, &u.parse().unwrap()).is_some();
    assert!(
        active(made),
        "the lease made the domain's mdev with its UUID"
    );

    // Another domain naming the leased mdev is refused by UUID.
    let other = xml.replace(UUID, "5dea22b3-1d52-d8f3-2516-782e98ab3fa1");
    let r = hook(&bus.address, "prepare", "begin", &other);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains(kept) || r.stderr.contains(made),
        "{}",
        r.stderr
    );

    let r = hook(&bus.address, "release", "end", &xml);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(leases_of_vm1(&bus).is_empty());
    assert!(!active(made), "the made one is removed");
    assert!(active(kept), "the operator's one stays");
}

#[test]
fn hostile_vm_names_cannot_forge_a_hostdev_in_the_libvirt_output() {
    let (bus, _d) = start();
    // No '/' (libvirt's own rule refuses it), but everything else that XML minds.
    let hostile = "x --><hostdev mode='subsystem' type='pci' managed='no'><source><address bus='0x66' slot='0' function='0'><!-- & \" -";
    let (code, out, err) = common::vfctl(
        &bus,
        &[
            "provision",
            "--vm",
            hostile,
            "--request-id",
            "h1",
            "--format",
            "libvirt",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let xml = format!(
        "<domain type='qemu'><name>vm1</name><memory unit='MiB'>64</memory>\
         <os><type arch='x86_64' machine='q35'>hvm</type></os><devices>{out}</devices></domain>"
    );
    let doc = roxmltree::Document::parse(&xml).unwrap_or_else(|e| panic!("{e}: {xml}"));
    let hostdevs = doc
        .descendants()
        .filter(|n| n.has_tag_name("hostdev"))
        .count();
    assert_eq!(hostdevs, 1, "one leased device, one hostdev:\n{out}");
    if let Some((ok, why)) = validate(&xml) {
        assert!(ok, "virt-xml-validate: {why}\n{xml}");
    }
    // A control character is refused, not escaped into the table.
    let (code, _, err) = common::vfctl(&bus, &["provision", "--vm", "vm\nlease 0 for VM root"]);
    assert_eq!(code, 2, "{err}");
}

/// Process `pid` holds mdev `uuid`'s VFIO group open, as the domain's QEMU does.
fn qemu_holds(bus: &Bus, d: &Daemon, pid: u32, uuid: &str) {
    let m = bus.client().mdevs().unwrap();
    let group = m
        .iter()
        .find(|m| m.uuid == uuid)
        .expect("the mdev")
        .iommu_group;
    vf_provisioner::fake::hold_group(&d.root, pid, "qemu-system-x86", group as u32).unwrap();
}

/// A domain that migrates to a second libvirtd on this host: libvirt runs the
/// destination's `migrate begin`, `prepare begin` and, when a QEMU ends, its
/// `release end`, each with that QEMU's XML.
#[test]
fn a_vm_migrating_between_two_libvirtds_here_keeps_its_lease_on_the_destination_mdev() {
    use vf_provisioner::fake::end_process;
    let bus = Bus::open();
    let d = Daemon::start(&bus, layouts::emulated(), "", &[]);
    let u = "0f2c1d1e-aaaa-4bbb-8ccc-00000000000c";
    let xml = domain("mtty-2", 1, &[]).replace(
        "<devices></devices>",
        &format!("<devices><hostdev mode='subsystem' type='mdev' model='vfio-pci' managed='no'><source><address uuid='{u}'/></source></hostdev></devices>"),
    );
    assert_eq!(hook(&bus.address, "prepare", "begin", &xml).code, 0);
    let lease = leases_of_vm1(&bus).remove(0);
    qemu_holds(&bus, &d, 4300, u);
    let exists = |u: &str| bus.client().mdevs().unwrap().iter().any(|m| m.uuid == u);

    // The destination's QEMU dies before the migration ends: its mdev goes, and
    // the lease stays with the source, which runs on.
    let migrate = |pid| {
        let r = hook(&bus.address, "migrate", "begin", &xml);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let to = libvirt_hooks::domain::Domain::parse(&r.stdout)
            .unwrap()
            .mdev_uuids();
        assert!(
            to.len() == 1 && to[0] != u && exists(&to[0]),
            "a destination mdev of its own: {to:?}"
        );
        assert_eq!(
            r.stdout,
            xml.replace(u, &to[0]),
            "only the mdev's UUID changes"
        );
        assert_eq!(hook(&bus.address, "prepare", "begin", &r.stdout).code, 0);
        qemu_holds(&bus, &d, pid, &to[0]);
        (r.stdout, to[0].clone())
    };
    let (failed_xml, failed) = migrate(4301);
    end_process(&d.root, 4301).unwrap();
    let r = hook(&bus.address, "release", "end", &failed_xml);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!exists(&failed), "the failed destination's mdev is removed");
    assert_eq!(
        leases_of_vm1(&bus),
        std::slice::from_ref(&lease),
        "the lease is unchanged"
    );

    // The migration completes and the source's QEMU ends: the lease moves under
    // its id, the source's mdev goes.
    let (moved_xml, to) = migrate(4302);
    end_process(&d.root, 4300).unwrap();
    let r = hook(&bus.address, "release", "end", &xml);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let now = leases_of_vm1(&bus);
    assert_eq!((now.len(), now[0].id.as_str()), (1, lease.id.as_str()));
    assert_eq!(addrs(&now[0]), std::slice::from_ref(&to));
    assert!(
        !exists(u),
        "the source's mdev, made for the lease, is removed"
    );
    // The source's end seen twice (libvirt retries a hook) changes nothing.
    assert_eq!(hook(&bus.address, "release", "end", &xml).code, 0);
    assert_eq!(leases_of_vm1(&bus), now);

    // The migrated VM stops: its lease ends.
    end_process(&d.root, 4302).unwrap();
    assert_eq!(hook(&bus.address, "release", "end", &moved_xml).code, 0);
    assert!(leases_of_vm1(&bus).is_empty());
    assert!(!exists(&to));
}

/// Hostile or odd incoming XML for a domain whose lease is here: two mdevs (one
/// leased, one not), or a leased mdev's UUID spelled with a control character.
/// Each refused with why; no hand-over is prepared and nothing is made.
#[test]
fn an_incoming_domain_that_names_more_than_its_mdev_is_refused_and_changes_nothing() {
    let bus = Bus::open();
    let _d = Daemon::start(&bus, layouts::emulated(), "", &[]);
    let u = "0f2c1d1e-aaaa-4bbb-8ccc-00000000000d";
    let mdev = |u: &str| {
        format!("<hostdev mode='subsystem' type='mdev' model='vfio-pci' managed='no'><source><address uuid='{u}'/></source></hostdev>")
    };
    let xml = domain("mtty-2", 1, &[]).replace(
        "<devices></devices>",
        &format!("<devices>{}</devices>", mdev(u)),
    );
    assert_eq!(hook(&bus.address, "prepare", "begin", &xml).code, 0);
    let lease = leases_of_vm1(&bus).remove(0);
    let count = || bus.client().mdevs().unwrap().len();
    let before = count();
    let two = xml.replace(
        "</devices>",
        &format!("{}</devices>", mdev("0f2c1d1e-aaaa-4bbb-8ccc-00000000000e")),
    );
    let r = hook(&bus.address, "migrate", "begin", &two);
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(
        r.stderr.contains("vm1") && r.stderr.contains("with 2 mdevs"),
        "{}",
        r.stderr
    );
    // A control character is not XML: refused before the daemon is asked.
    let odd = xml.replace(u, &format!("{u}\u{7}"));
    let r = hook(&bus.address, "migrate", "begin", &odd);
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(r.stderr.contains("does not parse"), "{}", r.stderr);
    assert_eq!(bus.client().prepared_handover(&lease.id).unwrap(), None);
    assert_eq!(count(), before, "nothing made");
    assert_eq!(leases_of_vm1(&bus), [lease]);
}
