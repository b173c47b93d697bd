//! The guests' agents: the real `vm-agent` binary, reading a guest's sysfs from a
//! tree of files, speaks to a real vfio-managerd (fake kernel, real dbus-daemon)
//! over a lease's `unix:` channel, as it would through cloud-hypervisor's vsock
//! socket. Usage rises and falls with the guest's byte counters, a sustained high
//! share raises UsageAlert, and an idle lease with `on_idle = unplug` loses its
//! device: the agent unbinds the guest driver, the VM (behind an API socket that
//! answers as cloud-hypervisor's) loses it, and it returns to the host. Hostile
//! peers are dropped and named in the log, and change nothing.

#[path = "common/ch.rs"]
mod ch;
mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use vf_provisioner::layouts;
use vfio_manager::ch::device_id;

const CONFIG: &str = "[usage]
net_full_bytes_per_s = 10000
busy_alert_percent = 50
busy_alert_for_s = 0
idle_below_percent = 5
idle_for_s = 2
let_go_timeout_s = 5
";

/// The agent binary, built once per test process: cargo builds another package's
/// binary only when asked (`cargo test` here would otherwise run a stale one).
static AGENT: std::sync::LazyLock<PathBuf> = std::sync::LazyLock::new(|| {
    let ok = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "-p", "vm-agent", "--bin", "vm-agent"])
        .status()
        .unwrap();
    assert!(ok.success(), "cargo build -p vm-agent");
    VFCTL.parent().unwrap().join("vm-agent")
});

fn agent_bin() -> PathBuf {
    AGENT.clone()
}

/// A guest's sysfs: the leased VF at guest address 0000:00:04.0 with `id`, bound
/// to igbvf, with one interface; a bridge with no driver.
fn guest(dir: &Path, id: &str) -> PathBuf {
    let (vendor, device) = id.split_once(':').unwrap();
    let vf = dir.join("sys/bus/pci/devices/0000:00:04.0");
    std::fs::create_dir_all(vf.join("net/eth0/statistics")).unwrap();
    std::fs::write(vf.join("vendor"), format!("0x{vendor}\n")).unwrap();
    std::fs::write(vf.join("device"), format!("0x{device}\n")).unwrap();
    let drv = dir.join("sys/bus/pci/drivers/igbvf");
    std::fs::create_dir_all(&drv).unwrap();
    std::fs::write(drv.join("unbind"), "").unwrap();
    std::os::unix::fs::symlink(&drv, vf.join("driver")).unwrap();
    let br = dir.join("sys/bus/pci/devices/0000:00:00.0");
    std::fs::create_dir_all(&br).unwrap();
    std::fs::write(br.join("vendor"), "0x8086\n").unwrap();
    std::fs::write(br.join("device"), "0x29c0\n").unwrap();
    std::fs::create_dir_all(dir.join("proc/sys/kernel")).unwrap();
    std::fs::write(dir.join("proc/sys/kernel/osrelease"), "6.12.0-guest\n").unwrap();
    vf.join("net/eth0/statistics/rx_bytes")
}

/// Adds `per_tick` bytes to the counter every 100 ms until stopped.
fn traffic(counter: PathBuf, per_tick: u64) -> Arc<AtomicBool> {
    let on = Arc::new(AtomicBool::new(true));
    let o = on.clone();
    std::thread::spawn(move || {
        let mut n = 0u64;
        while o.load(Ordering::SeqCst) {
            n += per_tick;
            let tmp = counter.with_extension("tmp");
            std::fs::write(&tmp, format!("{n}\n")).unwrap();
            std::fs::rename(&tmp, &counter).unwrap();
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    on
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_agent(channel: &Path, root: &Path) -> Agent {
    let child = Command::new(agent_bin())
        .arg("--channel")
        .arg(channel)
        .arg("--root")
        .arg(root)
        .args(["--interval-s", "1"])
        .spawn()
        .unwrap();
    Agent(child)
}

/// A frame as the protocol writes one: the length, then the body.
fn frame(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

/// Device `dev`'s PCI id, as the daemon lists it.
fn id_of(bus: &Bus, dev: &str) -> String {
    let devices = bus.client().devices().unwrap();
    devices.into_iter().find(|i| i.address == dev).unwrap().id
}

/// A VM named `vm` behind an API socket that answers as cloud-hypervisor's, given
/// `dev` by `vfctl attach` with its agent on a `unix:` channel and `extra`
/// arguments; returns the VM, the lease and the agent's socket, once the daemon
/// listens there.
fn attached_with_agent(
    bus: &Bus,
    d: &Daemon,
    vm: &str,
    dev: &str,
    extra: &[&str],
) -> (Arc<ch::Vm>, vfio_manager::api::Lease, PathBuf) {
    let sock = d.dir.path().join(format!("{vm}.api.sock"));
    let agent_sock = d.dir.path().join(format!("{vm}.vsock_22086"));
    let hypervisor = ch::api_server(&sock, None);
    let agent_arg = format!("unix:{}", agent_sock.display());
    let mut args = vec!["attach", "--ch-socket", sock.to_str().unwrap(), "--vm", vm];
    args.extend(["--device", dev, "--agent", &agent_arg]);
    args.extend_from_slice(extra);
    let (code, _, err) = vfctl(bus, &args);
    assert_eq!(code, 0, "{err}");
    let lease = bus
        .client()
        .leases()
        .unwrap()
        .into_iter()
        .find(|l| l.vm_name == vm)
        .unwrap();
    wait_for(d, "the daemon listening for the agent", || {
        agent_sock.exists()
    });
    (hypervisor, lease, agent_sock)
}

#[test]
fn an_agent_reports_usage_alerts_follow_and_an_idle_device_is_unplugged_and_returned() {
    let bus = Bus::open();
    let d = Daemon::start(&bus, layouts::large(1, 2), CONFIG, &[]);
    let dev = "0000:10:00.1";
    let id = id_of(&bus, dev);
    let (vm, lease, agent_sock) =
        attached_with_agent(&bus, &d, "vm1", dev, &["--on-idle", "unplug"]);
    let monitor = Monitor::start(&bus, "interface='org.vfiomanager.VfioManager1.Manager'");

    // Nobody speaks for a lease on another's channel: a peer that lies and one
    // that floods are dropped, named, and change nothing.
    for (i, (what, bytes)) in
        [
            ("too long", (1u32 << 30).to_be_bytes().to_vec()),
            ("not JSON", frame(b"\x00\x01garbage")),
            (
                "before its hello",
                frame(br#"{"v":1,"type":"heartbeat","seq":1}"#),
            ),
            (
                "host's message",
                frame(br#"{"v":1,"type":"hello","agent":"x","kernel":"k","devices":[]}"#)
                    .into_iter()
                    .chain(frame(
                        br#"{"v":1,"type":"let-go","address":"0000:00:04.0"}"#,
                    ))
                    .collect(),
            ),
            (
                "flood",
                std::iter::once(frame(
                    br#"{"v":1,"type":"hello","agent":"x","kernel":"k","devices":[]}"#,
                ))
                .chain((0..60).map(|i| {
                    frame(format!(r#"{{"v":1,"type":"heartbeat","seq":{i}}}"#).as_bytes())
                }))
                .flatten()
                .collect(),
            ),
            // A slow drip: a length, then nothing (held open below).
            ("slow drip", 100u32.to_be_bytes().to_vec()),
        ]
        .into_iter()
        .enumerate()
    {
        let mut s = UnixStream::connect(&agent_sock).unwrap();
        s.write_all(&bytes).unwrap();
        if what != "slow drip" {
            let _ = s.shutdown(std::net::Shutdown::Write);
        }
        wait_for(&d, what, || d.log_text().matches("dropped").count() > i);
    }
    // A pile of idle connections: two are served, the rest dropped.
    let pile: Vec<UnixStream> = (0..5)
        .map(|_| UnixStream::connect(&agent_sock).unwrap())
        .collect();
    wait_for(&d, "the pile dropped", || {
        d.log_text().matches("connections open already").count() >= 3
    });
    drop(pile);
    let log = d.log_text();
    assert!(
        log.contains("VM vm1 (lease"),
        "dropped peers are named by VM: {log}"
    );
    for why in [
        "more than 50 frames in 10 s",
        "a frame of 100 bytes did not arrive in 10 s",
        "a frame of 1073741824 bytes",
        "not a message",
        "before its hello",
        "only the host sends",
    ] {
        assert!(log.contains(why), "{why}: {log}");
    }

    // A peer that lies about what it uses: samples for a device the lease does
    // not hold in the guest reach nothing.
    // The pile's connections close as the daemon notices: until then it refuses a
    // third ("2 connections open already"), and the liar calls again.
    let hello = br#"{"v":1,"type":"hello","agent":"x","kernel":"k","devices":[]}"#;
    let lie = br#"{"v":1,"type":"usage","samples":[{"address":"0000:99:00.0","source":"net","busy_percent":100.0,"bytes":null}]}"#;
    let mut liar = UnixStream::connect(&agent_sock).unwrap();
    let mut refused = d.log_text().matches("connections open already").count();
    liar.write_all(&[frame(hello), frame(lie)].concat())
        .unwrap();
    wait_for(&d, "the liar's hello", || {
        let log = d.log_text();
        if log.matches("connections open already").count() > refused {
            refused += 1;
            liar = UnixStream::connect(&agent_sock).unwrap();
            let _ = liar.write_all(&[frame(hello), frame(lie)].concat());
        }
        log.matches("connected: x").count() >= 3
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        bus.client().usage_now().unwrap().is_empty(),
        "a lie reaches no device"
    );
    drop(liar);

    let root = tempfile::tempdir().unwrap();
    let counter = guest(root.path(), &id);
    let busy = traffic(counter, 2000); // 20 kB/s: over net_full_bytes_per_s
    let _agent = start_agent(&agent_sock, root.path());
    wait_for(&d, "the agent's hello", || {
        bus.client()
            .agents()
            .unwrap()
            .iter()
            .any(|a| a.connected && a.lease_id == lease.id)
    });
    let a = bus.client().agents().unwrap().remove(0);
    assert_eq!(
        a.devices,
        [format!("{dev}=0000:00:04.0")],
        "paired by PCI id: {a:?}"
    );
    assert_eq!(a.kernel, "6.12.0-guest");
    wait_for(&d, "usage above the alert", || {
        bus.client()
            .usage_now()
            .unwrap()
            .iter()
            .any(|u| u.device == dev && u.busy_percent > 50.0)
    });
    let (code, out, _) = vfctl(&bus, &["top", "--once"]);
    assert_eq!(code, 0);
    assert!(
        out.contains(dev) && out.contains("net") && out.contains("vm1"),
        "{out}"
    );

    // Quiet: usage falls, the lease goes idle, and its device is unplugged.
    busy.store(false, Ordering::SeqCst);
    wait_for(&d, "the lease reclaimed", || {
        bus.client()
            .leases()
            .unwrap()
            .iter()
            .all(|l| l.devices.is_empty())
    });
    let unbound =
        std::fs::read_to_string(root.path().join("sys/bus/pci/drivers/igbvf/unbind")).unwrap();
    assert_eq!(unbound, "0000:00:04.0", "the agent let go first");
    // Logged once the reclaim returns, just after its commit.
    wait_for(&d, "the let-go logged", || {
        d.log_text()
            .contains("the guest let go (0000:00:04.0 unbound from igbvf)")
    });
    assert!(
        !vm.devices.lock().unwrap().contains_key(&device_id(dev)),
        "the VM lost it"
    );
    assert_ne!(
        driver(&d.root, dev).as_deref(),
        Some("vfio-pci"),
        "back to the host"
    );
    let swaps = bus.client().lease_swaps(&lease.id).unwrap();
    assert!(
        swaps
            .iter()
            .any(|(out, new, why, _)| out == dev && new.is_empty() && why.contains("idle")),
        "the lease records it: {swaps:?}"
    );
    // Audited just after the table's commit.
    wait_for(&d, "the reclaim audited", || {
        d.audit_text().contains("\"op\":\"reclaim\"")
    });
    // The guest lost it: its agent says hello again without it.
    std::fs::remove_dir_all(root.path().join("sys/bus/pci/devices/0000:00:04.0")).unwrap();
    wait_for(&d, "the agent's new hello", || {
        d.log_text().contains("says hello again: vm-agent")
    });
    assert!(
        d.log_text().contains("sees none of the lease's devices"),
        "{}",
        d.log_text()
    );
    // Offered again: a new request gets it.
    let again = bus.client().provision(&vfio_manager::api::Request {
        request_id: "again".into(),
        vm_name: "vm2".into(),
        devices: vec![dev.into()],
        ..Default::default()
    });
    assert!(again.is_ok(), "{again:?}");
    match monitor {
        Some(m) => {
            let out = m.stop(Duration::from_millis(300));
            for s in [
                "AgentConnected",
                "UsageAlert",
                "\"high\"",
                "LeaseIdle",
                "unplug",
            ] {
                assert!(out.contains(s), "{s} in the signals: {out}");
            }
        }
        None => eprintln!("SKIPPED the signal check: dbus-monitor is not installed"),
    }
}

#[test]
fn bad_agent_channels_and_policies_are_refused_at_the_request() {
    let bus = Bus::open();
    let d = Daemon::start(&bus, layouts::large(1, 2), CONFIG, &[]);
    for (key, value) in [
        ("--agent", "cid:2"),
        ("--agent", "unix:relative.sock"),
        ("--agent", "unix:/run/../etc/passwd"),
        ("--agent", "tcp:1.2.3.4:5"),
        ("--agent", &format!("unix:/{}", "a".repeat(200))),
    ] {
        let (code, _, err) = vfctl(&bus, &["provision", "--vm", "vm1", key, value]);
        assert_ne!(code, 0, "{value} accepted");
        assert!(err.contains("invalid agent"), "{value}: {err}");
    }
    // One VM's channel is not another's.
    let (code, _, err) = vfctl(&bus, &["provision", "--vm", "vm1", "--agent", "cid:7"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = vfctl(&bus, &["provision", "--vm", "intruder", "--agent", "cid:7"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("agent channel cid:7 is lease") && err.contains("of VM vm1"),
        "{err}"
    );
    let (code, _, err) = vfctl(&bus, &["provision", "--vm", "vm1", "--agent", "cid:7"]);
    assert_eq!(code, 0, "the same VM may hold two leases: {err}");
    for l in bus.client().leases().unwrap() {
        bus.client().release(&l.id).unwrap();
    }
    let (code, _, _) = vfctl(&bus, &["provision", "--vm", "vm1", "--on-idle", "evict"]);
    assert_ne!(code, 0);
    assert!(
        bus.client().leases().unwrap().is_empty(),
        "nothing was leased"
    );
    let e = bus
        .client()
        .usage_history("0000:10:00.1", 7, 0)
        .unwrap_err();
    assert_eq!(error_name(&e), "BadInput", "{e}");
    // A megabyte device name is a lookup that finds nothing.
    let mega = "x".repeat(1 << 20);
    assert!(bus.client().usage_history(&mega, 60, 0).unwrap().is_empty());
    // The keys straight over D-Bus (no CLI to check them first): each refused as
    // BadInput, bounded, and nothing leased.
    let hostile = [
        ("agent", format!("unix:/{}", "a".repeat(1 << 20))),
        ("agent", "serial:/run/a\u{1b}[2Jb".to_string()),
        ("agent", "cid:3\n".to_string()),
        ("on_idle", "unplug\t".to_string()), // (a NUL cannot cross D-Bus at all)
        ("priority", "urgent".to_string()),
        ("priority", "h".repeat(1 << 20)),
    ];
    for (key, value) in hostile {
        let mut req = vfio_manager::api::Request {
            request_id: "hostile".into(),
            vm_name: "vm1".into(),
            ..Default::default()
        };
        match key {
            "agent" => req.agent = value,
            "on_idle" => req.on_idle = value,
            _ => req.priority = value,
        }
        let e = bus.client().provision(&req).unwrap_err();
        assert_eq!(error_name(&e), "BadInput", "{key}: {e}");
        assert!(
            e.to_string().len() < 1000 && !e.to_string().contains('\u{1b}'),
            "{e}"
        );
    }
    assert!(
        bus.client().leases().unwrap().is_empty(),
        "nothing was leased"
    );
    drop(d);
}

/// Placement by predicted pressure, and priority classes, with two VMs' real
/// agents: `pack` fills the PF with leases unless its VFs' guests keep it busy; a
/// `high` request takes an idle `low` lease's device, never a busy one.
#[test]
fn placement_avoids_a_pressed_pf_and_high_priority_takes_only_idle_low_devices() {
    let bus = Bus::open();
    let config = format!("{CONFIG}idle_for_s = 3600\n[placement]\npolicy = \"pack\"\n")
        .replace("idle_for_s = 2\n", "");
    let d = Daemon::start(&bus, layouts::large(2, 2), &config, &[]);
    let low_dev = "0000:10:00.1";
    let id = id_of(&bus, low_dev);
    let (vm, low, agent_sock) =
        attached_with_agent(&bus, &d, "low", low_dev, &["--priority", "low"]);
    let root = tempfile::tempdir().unwrap();
    let busy = traffic(guest(root.path(), &id), 2000);
    let _agent = start_agent(&agent_sock, root.path());
    wait_for(&d, "PF 10 predicted busy", || {
        let p = bus.client().pressure().unwrap();
        p.iter().any(|(pf, v, _)| pf == "0000:10:00.0" && *v > 80.0)
    });
    let (code, out, _) = vfctl(&bus, &["placement"]);
    assert_eq!(code, 0);
    assert!(
        out.lines()
            .nth(1)
            .is_some_and(|l| l.contains("0000:11:00.0")),
        "PF 11 first: {out}"
    );

    let lease = |vm: &str, priority: &str| {
        bus.client().provision(&vfio_manager::api::Request {
            request_id: vm.into(),
            vm_name: vm.into(),
            priority: priority.into(),
            ..Default::default()
        })
    };
    // pack would take PF 10 (it has a lease); it is predicted over the limit.
    let b = lease("b", "").unwrap();
    assert!(b.devices[0].address.starts_with("0000:11:00."), "{b:?}");
    lease("c", "").unwrap();
    lease("d", "").unwrap();
    // Full. Busy: nobody takes the low lease's device.
    let e = lease("e", "high").unwrap_err();
    assert_eq!(error_name(&e), "NoDevice", "{e}");
    busy.store(false, Ordering::SeqCst);
    wait_for(&d, "the low lease idle", || {
        bus.client()
            .usage_now()
            .unwrap()
            .iter()
            .any(|u| u.device == low_dev && u.busy_percent < 5.0)
    });
    std::thread::sleep(Duration::from_millis(1500)); // a second idle sample
    let e = lease("f", "normal").unwrap_err();
    assert_eq!(error_name(&e), "NoDevice", "only high takes: {e}");
    let has = |id: &str| {
        bus.client()
            .leases()
            .unwrap()
            .into_iter()
            .find(|l| l.id == id)
            .unwrap()
    };
    assert_eq!(has(&low.id).devices.len(), 1);
    let g = lease("g", "high").unwrap();
    assert_eq!(g.devices[0].address, low_dev, "{g:?}");
    assert!(has(&low.id).devices.is_empty(), "the low lease gave it up");
    assert!(
        !vm.devices.lock().unwrap().contains_key(&device_id(low_dev)),
        "its VM lost it"
    );
    let swaps = bus.client().lease_swaps(&low.id).unwrap();
    assert!(
        swaps
            .iter()
            .any(|(_, _, why, _)| why.contains("high-priority VM g")),
        "{swaps:?}"
    );
}

/// A virtio-serial port as QEMU makes one: QEMU binds the host side's socket (the
/// daemon connects to it, `serial:` channel) and the guest's port is a character
/// device. Here the guest side is a second socket the agent opens with
/// `--channel`, and the test relays bytes between the two, as QEMU does.
#[test]
fn an_agent_on_a_virtio_serial_port_reaches_the_daemon() {
    use std::os::unix::net::UnixListener;
    let bus = Bus::open();
    let d = Daemon::start(&bus, layouts::large(1, 2), CONFIG, &[]);
    let dev = "0000:10:00.1";
    let id = id_of(&bus, dev);
    let host_side = d.dir.path().join("vm1.agent.sock");
    let guest_side = d.dir.path().join("guest-port.sock");
    let qemu = UnixListener::bind(&host_side).unwrap();
    let port = UnixListener::bind(&guest_side).unwrap();
    std::thread::spawn(move || {
        let (daemon, _) = qemu.accept().unwrap();
        let (guest, _) = port.accept().unwrap();
        let relay = |mut from: UnixStream, mut to: UnixStream| {
            std::thread::spawn(move || std::io::copy(&mut from, &mut to))
        };
        relay(daemon.try_clone().unwrap(), guest.try_clone().unwrap());
        relay(guest, daemon);
    });
    let agent = format!("serial:{}", host_side.display());
    let (code, _, err) = vfctl(
        &bus,
        &[
            "provision",
            "--vm",
            "vm1",
            "--device",
            dev,
            "--agent",
            &agent,
        ],
    );
    assert_eq!(code, 0, "{err}");
    let root = tempfile::tempdir().unwrap();
    guest(root.path(), &id);
    let _agent = start_agent(&guest_side, root.path());
    wait_for(&d, "the agent's hello through the serial port", || {
        bus.client()
            .agents()
            .unwrap()
            .iter()
            .any(|a| a.connected && a.channel == agent)
    });
    let a = bus.client().agents().unwrap().remove(0);
    assert_eq!(a.devices, [format!("{dev}=0000:00:04.0")], "{a:?}");
}

/// `on_idle = release-on-stop`: an idle lease ends when its VM stops (its agent
/// leaves and nothing holds its devices open), not before.
#[test]
fn an_idle_lease_with_release_on_stop_ends_when_its_vm_stops() {
    let bus = Bus::open();
    let d = Daemon::start(&bus, layouts::large(1, 2), CONFIG, &[]);
    let dev = "0000:10:00.1";
    let id = id_of(&bus, dev);
    let agent_sock = d.dir.path().join("vm1.vsock_22086");
    let agent = format!("unix:{}", agent_sock.display());
    let (code, _, err) = vfctl(
        &bus,
        &[
            "provision",
            "--vm",
            "vm1",
            "--device",
            dev,
            "--agent",
            &agent,
            "--on-idle",
            "release-on-stop",
        ],
    );
    assert_eq!(code, 0, "{err}");
    wait_for(&d, "the daemon listening for the agent", || {
        agent_sock.exists()
    });
    let root = tempfile::tempdir().unwrap();
    guest(root.path(), &id);
    let agent = start_agent(&agent_sock, root.path());
    wait_for(&d, "the lease idle", || {
        d.log_text().contains("on_idle is release-on-stop")
    });
    assert_eq!(
        bus.client().leases().unwrap().len(),
        1,
        "idle alone ends nothing"
    );
    drop(agent); // the VM stops: its agent's connection goes
    wait_for(&d, "the lease released", || {
        bus.client().leases().unwrap().is_empty()
    });
    assert_ne!(driver(&d.root, dev).as_deref(), Some("vfio-pci"));
    assert!(
        d.log_text()
            .contains("was idle and its VM stopped (release-on-stop): ok"),
        "{}",
        d.log_text()
    );
}

/// A reclaim cut off by SIGKILL after the VM let go (its VMM slow to answer) is
/// finished at start: the device is back on the host, the lease records it, and
/// nothing is left on vfio-pci that no lease holds.
#[test]
fn a_reclaim_cut_off_by_sigkill_is_finished_at_start() {
    let bus = Bus::open();
    let mut d = Daemon::start(&bus, layouts::large(1, 2), CONFIG, &[]);
    let dev = "0000:10:00.1";
    let id = id_of(&bus, dev);
    let (vm, lease, agent_sock) =
        attached_with_agent(&bus, &d, "vm1", dev, &["--on-idle", "unplug"]);
    vm.remove_delay_ms.store(60_000, Ordering::SeqCst);
    let root = tempfile::tempdir().unwrap();
    guest(root.path(), &id);
    let _agent = start_agent(&agent_sock, root.path());
    // Idle: the VM has dropped the device and the daemon waits for its answer.
    wait_for(&d, "the VM dropping the device", || {
        !vm.devices.lock().unwrap().contains_key(&device_id(dev))
    });
    d.restart();
    let log = d.log_text();
    assert!(
        log.contains("the reclaim of 0000:10:00.1 from lease"),
        "{log}"
    );
    assert!(log.contains("after the VM let go; finished"), "{log}");
    let l = bus
        .client()
        .leases()
        .unwrap()
        .into_iter()
        .find(|l| l.id == lease.id)
        .unwrap();
    assert!(l.devices.is_empty(), "{l:?}");
    assert_ne!(driver(&d.root, dev).as_deref(), Some("vfio-pci"));
    nothing_stray(&bus, &d.root, "after the cut-off reclaim");
}

/// `vfctl plan --rebalance`: a GPU slice (an mdev) whose guest keeps its GPU over
/// the limit is proposed to move to the other GPU, only when its vendor driver
/// is one that migrates (`[placement] migratable_drivers`). Nothing changes.
#[test]
fn plan_rebalance_proposes_moving_a_migratable_slice_off_a_pressed_gpu() {
    let bus = Bus::open();
    let config = format!("{CONFIG}[placement]\nmigratable_drivers = [\"nvidia-vgpu-vfio\"]\n");
    let d = Daemon::start(&bus, two_t4s(), &config, &[]);
    let agent_sock = d.dir.path().join("vm1.vsock_22086");
    let agent = format!("unix:{}", agent_sock.display());
    let (code, out, err) = vfctl(
        &bus,
        &[
            "provision",
            "--vm",
            "vm1",
            "--profile",
            "GRID T4-2Q",
            "--agent",
            &agent,
            "-o",
            "json",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let uuid = out
        .split('"')
        .skip_while(|s| *s != "address")
        .nth(2)
        .unwrap()
        .to_string();
    let from = bus
        .client()
        .mdevs()
        .unwrap()
        .into_iter()
        .find(|m| m.uuid == uuid)
        .unwrap()
        .parent;
    let (code, out, _) = vfctl(&bus, &["plan", "--rebalance"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("no moves"), "no usage yet: {out}");
    // The guest sees its vGPU with the GPU's PCI id, busy (amdgpu-style counters).
    wait_for(&d, "the daemon listening for the agent", || {
        agent_sock.exists()
    });
    let root = tempfile::tempdir().unwrap();
    let gpu = root.path().join("sys/bus/pci/devices/0000:00:05.0");
    std::fs::create_dir_all(&gpu).unwrap();
    std::fs::write(gpu.join("vendor"), "0x10de\n").unwrap();
    std::fs::write(gpu.join("device"), "0x1eb8\n").unwrap();
    std::fs::write(gpu.join("gpu_busy_percent"), "97\n").unwrap();
    let _agent = start_agent(&agent_sock, root.path());
    wait_for(&d, "a move proposed", || {
        !bus.client().plan_rebalance().unwrap().is_empty()
    });
    let moves = bus.client().plan_rebalance().unwrap();
    let (_, dev, f, to, fp, tp) = &moves[0];
    assert_eq!(
        (dev.as_str(), f.as_str()),
        (uuid.as_str(), from.as_str()),
        "{moves:?}"
    );
    assert_ne!(to, f);
    assert!(*fp > 80.0 && *tp < *fp, "{moves:?}");
    let (code, out, _) = vfctl(&bus, &["plan", "--rebalance"]);
    assert_eq!(code, 0);
    assert!(
        out.contains(&uuid) && out.contains("nothing was changed"),
        "{out}"
    );
    let m = bus
        .client()
        .mdevs()
        .unwrap()
        .into_iter()
        .find(|m| m.uuid == uuid)
        .unwrap();
    assert_eq!(m.parent, from, "a plan moves nothing");
    let (code, _, err) = vfctl(&bus, &["--direct", "plan", "--rebalance"]);
    assert_ne!(code, 0);
    assert!(err.contains("without --direct"), "{err}");
}
