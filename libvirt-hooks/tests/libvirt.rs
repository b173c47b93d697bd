//! The hook under a real libvirtd (Debian's, from bookworm-backports): TCG domains
//! on this machine, the daemon on a fake host over a private bus. Needs root and
//! a machine where no other libvirtd runs (the hook must be in
//! /etc/libvirt/hooks/qemu.d before libvirtd starts); otherwise it says why and skips.
//! The first libvirtd start probes QEMU's capabilities (~50 s here, cached after).

#[path = "../../vfio-manager/tests/common/mod.rs"]
mod common;
mod run_hook;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{driver, Bus, Daemon};
use vf_provisioner::layouts;
use vfio_manager::api::Lease;

const HOOK: &str = env!("CARGO_BIN_EXE_vfio-manager-hook");
/// Where `make install` puts the hook (libvirt >= 6.5 runs every script there,
/// each a filter for the next).
const HOOKS_DIR: &str = "/etc/libvirt/hooks/qemu.d";
const QEMU_DIR: &str = "/etc/libvirt/qemu";

fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (libvirtd's system instance runs the hooks)".into());
    }
    if Command::new("libvirtd").arg("--version").output().is_err() {
        return Some(
            "libvirtd is not installed (`make deps` installs it from bookworm-backports)".into(),
        );
    }
    let running = Command::new("pgrep").args(["-x", "libvirtd"]).status();
    if running.is_ok_and(|s| s.success()) {
        return Some(
            "a libvirtd already runs here; the test starts its own with the hook installed first"
                .into(),
        );
    }
    None
}

/// libvirtd and virtlogd started by hand (no systemd here), with the hook wrapper
/// installed and `domains` defined; all undone on drop.
struct Libvirt {
    calls: PathBuf,
    saved_hook: Option<Vec<u8>>,
    _dir: tempfile::TempDir,
}

impl Libvirt {
    /// The domains are written into libvirt's configuration directory before it
    /// starts: `virsh define` here re-probes QEMU each time (~50 s; this machine's
    /// /dev/kvm exists but cannot run guests), start-up probes once.
    fn start(bus: &Bus, domains: &[(String, String)]) -> Libvirt {
        for (name, xml) in domains {
            std::fs::write(Path::new(QEMU_DIR).join(format!("{name}.xml")), xml).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let calls = dir.path().join("calls.log");
        let hook = Path::new(HOOKS_DIR).join("vfio-manager");
        let saved_hook = std::fs::read(&hook).ok();
        std::fs::create_dir_all(HOOKS_DIR).unwrap();
        // The wrapper records each call, then runs the hook on the test's bus
        // (libvirt gives hooks a clean environment).
        let wrapper = format!(
            "#!/bin/sh\necho \"$1 $2 $3\" >> {}\nDBUS_SYSTEM_BUS_ADDRESS='{}' exec {HOOK} \"$@\"\n",
            calls.display(),
            bus.address
        );
        std::fs::write(&hook, wrapper).unwrap();
        run("chmod", &["0755", hook.to_str().unwrap()]);
        run("virtlogd", &["-d"]);
        run("libvirtd", &["-d"]);
        let deadline = Instant::now() + Duration::from_secs(240);
        while !virsh(&["domstate", "hook-a"]).0 {
            assert!(
                Instant::now() < deadline,
                "libvirtd did not load its domains in 240 s"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        Libvirt {
            calls,
            saved_hook,
            _dir: dir,
        }
    }

    fn calls(&self) -> String {
        std::fs::read_to_string(&self.calls).unwrap_or_default()
    }
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        for d in ["hook-a", "hook-b", "hook-c"] {
            let _ = virsh(&["destroy", d]);
            let _ = virsh(&["undefine", d]);
            let _ = std::fs::remove_file(Path::new(QEMU_DIR).join(format!("{d}.xml")));
        }
        let _ = Command::new("pkill").args(["-x", "libvirtd"]).status();
        let _ = Command::new("pkill").args(["-x", "virtlogd"]).status();
        let hook = Path::new(HOOKS_DIR).join("vfio-manager");
        match &self.saved_hook {
            Some(b) => std::fs::write(&hook, b).unwrap(),
            None => std::fs::remove_file(&hook).unwrap(),
        }
    }
}

fn run(cmd: &str, args: &[&str]) {
    let st = Command::new(cmd).args(args).status().unwrap();
    assert!(st.success(), "{cmd} {args:?}: {st}");
}

/// (success, stdout, stderr) of `virsh -c qemu:///system ARGS`, bounded.
fn virsh(args: &[&str]) -> (bool, String, String) {
    let t = Instant::now();
    let o = Command::new("timeout")
        .args(["180", "virsh", "-c", "qemu:///system"])
        .args(args)
        .output()
        .unwrap();
    eprintln!("virsh {args:?}: {:.1?}", t.elapsed());
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn domain(name: &str, uuid: &str, devices: &str, count: u32) -> (String, String) {
    let xml = format!(
        "<domain type='qemu'><name>{name}</name><uuid>{uuid}</uuid>\
         <metadata><vfm:lease xmlns:vfm='http://vfio-manager.org/xmlns/lease/1' profile='vf' count='{count}'/></metadata>\
         <memory unit='MiB'>64</memory><os><type arch='x86_64' machine='q35'>hvm</type></os>\
         <features><acpi/></features><devices><emulator>/usr/bin/qemu-system-x86_64</emulator>{devices}</devices></domain>"
    );
    (name.to_string(), xml)
}

fn leases_of(bus: &Bus, uuid: &str) -> Vec<Lease> {
    let mut l = bus.client().leases().unwrap();
    l.retain(|l| l.vm_uuid == uuid);
    l
}

const UUID_A: &str = "4dea22b3-1d52-d8f3-2516-782e98ab3fa0";
const UUID_B: &str = "4dea22b3-1d52-d8f3-2516-782e98ab3fa1";
const UUID_C: &str = "4dea22b3-1d52-d8f3-2516-782e98ab3fa2";

#[test]
fn libvirtd_runs_the_hook_and_leases_follow_the_domain() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED libvirt tier: {why}");
        return;
    }
    let bus = Bus::open();
    let d = Daemon::start(&bus, layouts::large(2, 2), "", &[]);
    // C: a hostdev this machine's kernel does not have.
    let hostdev = "<hostdev mode='subsystem' type='pci' managed='no'><source>\
                   <address domain='0x0000' bus='0x10' slot='0x00' function='0x1'/></source></hostdev>";
    let lv = Libvirt::start(
        &bus,
        &[
            domain("hook-a", UUID_A, "", 1),
            domain("hook-b", UUID_B, "", 9),
            domain("hook-c", UUID_C, hostdev, 1),
        ],
    );
    let tmp = tempfile::tempdir().unwrap();

    // A: lease metadata; start leases a VF, the domain runs (TCG), destroy releases.
    let (ok, _, err) = virsh(&["start", "hook-a"]);
    assert!(ok, "start hook-a: {err}\nhook calls:\n{}", lv.calls());
    let l = leases_of(&bus, UUID_A);
    assert_eq!(l.len(), 1, "one lease for the running domain");
    assert_eq!(l[0].vm_name, "hook-a");
    let vf = l[0].devices[0].address.clone();
    assert_eq!(driver(&d.root, &vf).as_deref(), Some("vfio-pci"));

    // A swap goes through libvirt (the hook named it as the lease's VMM). This
    // machine's kernel has no such VF: libvirt refuses the replacement, and the
    // lease and the spare are as they were.
    let e = bus
        .client()
        .replace(&vf, "a swap through libvirt")
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("virsh attach-device of domain hook-a"),
        "{e}"
    );
    assert_eq!(leases_of(&bus, UUID_A)[0].devices[0].address, vf);
    let on_vfio = |a: &str| driver(&d.root, a).as_deref() == Some("vfio-pci");
    assert_eq!(
        bus.client()
            .devices()
            .unwrap()
            .iter()
            .filter(|f| on_vfio(&f.address))
            .count(),
        1,
        "the replacement went back"
    );

    // The migrate filter on the XML libvirt itself wrote, with a hostdev slot added.
    let (_, live, _) = virsh(&["dumpxml", "hook-a"]);
    let slot = "<hostdev mode='subsystem' type='pci' managed='no'><source>\
                <address domain='0x0000' bus='0x42' slot='0x00' function='0x1'/></source></hostdev></devices>";
    let incoming = live.replace("</devices>", slot).replace(UUID_A, UUID_C);
    let out = filter(&bus, "migrate", &incoming);
    assert!(out.contains("bus=\"0x1"), "rewritten to a VF here: {out}");
    let f = tmp.path().join("incoming.xml");
    std::fs::write(&f, &out).unwrap();
    let o = Command::new("virt-xml-validate")
        .arg(&f)
        .arg("domain")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "virt-xml-validate: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    filter(&bus, "release", &incoming);
    assert!(leases_of(&bus, UUID_C).is_empty());

    // save + restore: released with the saved domain, leased again by restore.
    let image = tmp.path().join("a.save");
    let (ok, _, err) = virsh(&["save", "hook-a", image.to_str().unwrap()]);
    assert!(ok, "save: {err}");
    assert!(leases_of(&bus, UUID_A).is_empty(), "released when saved");
    let (ok, _, err) = virsh(&["restore", image.to_str().unwrap()]);
    assert!(ok, "restore: {err}\nhook calls:\n{}", lv.calls());
    assert_eq!(leases_of(&bus, UUID_A).len(), 1, "leased again on restore");
    let (ok, _, err) = virsh(&["destroy", "hook-a"]);
    assert!(ok, "destroy: {err}");
    assert!(leases_of(&bus, UUID_A).is_empty(), "released on destroy");
    assert_ne!(driver(&d.root, &vf).as_deref(), Some("vfio-pci"));

    // B: more than there is: libvirt refuses the start with our one line.
    let (ok, _, err) = virsh(&["start", "hook-b"]);
    assert!(!ok, "a start without free devices must fail");
    assert!(
        err.contains("vfio-manager") && err.contains("no free device"),
        "{err}"
    );
    assert!(leases_of(&bus, UUID_B).is_empty());

    // C: libvirt fails the start after prepare (no such device on this machine's
    // kernel), and the release hook gives the lease back.
    let (ok, _, _) = virsh(&["start", "hook-c"]);
    assert!(!ok, "there is no VFIO on this machine");
    assert!(
        leases_of(&bus, UUID_C).is_empty(),
        "released after the failed start"
    );

    let calls = lv.calls();
    for op in [
        "hook-a prepare begin",
        "hook-a start begin",
        "hook-a started begin",
        "hook-a stopped end",
        "hook-a release end",
        "hook-a restore begin",
        "hook-b prepare begin",
        "hook-c prepare begin",
        "hook-c release end",
    ] {
        assert!(
            calls.contains(op),
            "libvirt never ran `{op}`; calls:\n{calls}"
        );
    }
}

/// Runs the hook as libvirt would for `op` and returns what it printed.
fn filter(bus: &Bus, op: &str, xml: &str) -> String {
    let sub = if op == "release" { "end" } else { "begin" };
    let r = run_hook::hook(&bus.address, op, sub, xml);
    assert_eq!(r.code, 0, "hook {op}: {}", r.stderr);
    r.stdout
}
