//! `make bench`: the hook's run time as libvirt sees it (exec to exit), for a domain
//! with nothing of ours and for one with a lease, beside exec of a trivial binary
//! (`/bin/true`) in the same run. Target: <= 10 ms on the fake host.
//! Usage: cargo bench -p libvirt-hooks --bench hook [-- RUNS]   (default 200)

#[path = "../../vfio-manager/tests/common/mod.rs"]
mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vf_provisioner::layouts;

const HOOK: &str = env!("CARGO_BIN_EXE_vfio-manager-hook");
const UUID: &str = "4dea22b3-1d52-d8f3-2516-782e98ab3fa0";

fn time_exec(cmd: &str, args: &[&str], bus: &str, stdin: &str) -> Duration {
    let t = Instant::now();
    let mut child = Command::new(cmd)
        .args(args)
        .env("DBUS_SYSTEM_BUS_ADDRESS", bus)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    assert!(child.wait().unwrap().success(), "{cmd} {args:?} failed");
    t.elapsed()
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(200);
    let bus = common::Bus::open();
    let _d = common::Daemon::start(&bus, layouts::large(4, 4), "", &[]);
    let plain =
        "<domain type='kvm'><name>plain</name><devices><disk type='file'/></devices></domain>";
    let ours = format!(
        "<domain type='qemu'><name>vm1</name><uuid>{UUID}</uuid><metadata>\
         <vfm:lease xmlns:vfm='http://vfio-manager.org/xmlns/lease/1' profile='vf' count='1'/></metadata><devices/></domain>"
    );
    let hook = |op: &'static str, sub: &'static str, xml: String| {
        move |bus: &str| time_exec(HOOK, &["vm", op, sub, "-"], bus, &xml)
    };
    // The lease that `started` finds.
    time_exec(HOOK, &["vm1", "prepare", "begin", "-"], &bus.address, &ours);
    type Case = (&'static str, Box<dyn Fn(&str) -> Duration>);
    let cases: Vec<Case> = vec![
        (
            "exec /bin/true (floor)",
            Box::new(|b: &str| time_exec("/bin/true", &[], b, "")),
        ),
        (
            "hook, domain without our devices",
            Box::new(hook("prepare", "begin", plain.to_string())),
        ),
        (
            "hook started, domain with a lease",
            Box::new(hook("started", "begin", ours.clone())),
        ),
    ];
    println!("vfio-manager-hook as libvirt runs it (exec to exit), {runs} runs each, fake host");
    println!("{:<40} {:>10} {:>10} {:>8}", "case", "p50", "p99", "p50 x");
    let mut floor = None;
    for (name, f) in &cases {
        f(&bus.address); // warm
        let mut v: Vec<Duration> = (0..runs).map(|_| f(&bus.address)).collect();
        let (p50, p99) = (pct(&mut v, 0.5), pct(&mut v, 0.99));
        let base = *floor.get_or_insert(p50);
        println!(
            "{name:<40} {p50:>10.2?} {p99:>10.2?} {:>7.1}x",
            p50.as_secs_f64() / base.as_secs_f64()
        );
    }
    // prepare + release: a lease made and given back, per start/stop of a domain.
    let mut v: Vec<Duration> = (0..runs.min(50))
        .map(|_| {
            time_exec(HOOK, &["vm1", "release", "end", "-"], &bus.address, &ours)
                + time_exec(HOOK, &["vm1", "prepare", "begin", "-"], &bus.address, &ours)
        })
        .collect();
    println!(
        "{:<40} {:>10.2?} {:>10.2?}   (target <= 10 ms per hook run on the fake host)",
        "hook release end + prepare begin",
        pct(&mut v, 0.5),
        pct(&mut v, 0.99)
    );
}
