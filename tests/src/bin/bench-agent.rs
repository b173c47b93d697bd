//! `make bench`: what the agents cost and how fast usage reaches the host, in one
//! run: real dbus-daemon, vfio-managerd on a fake host, and AGENTS real vm-agent
//! processes at 1 Hz, each reading a guest tree of files and speaking over its
//! lease's `unix:` channel (cloud-hypervisor's vsock socket).
//! - the agent's CPU per second of guest time, beside the floor: reading the same
//!   files bare, in-process;
//! - the daemon's CPU per sample ingested (usage and heartbeat frames);
//! - the time from a change of utilisation in the guest to the host's UsageAlert
//!   (UsageNow over the threshold), p50 and max over TRIALS.
//!
//! Usage: bench-agent [AGENTS] [SECONDS] [TRIALS]   (defaults 8 20 5)

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vfio_manager::api::client::Client;
use vfio_manager::api::Request;

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// CPU seconds process `pid`'s threads have run so far: the scheduler's nanosecond
/// counts (`/proc/PID/task/*/schedstat`; the tick counts of `stat` are 10 ms coarse).
fn cpu_s(pid: u32) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum::<u64>() as f64
        / 1e9
}

fn bus(dir: &Path) -> (Kill, String) {
    let conf = dir.join("bus.conf");
    std::fs::write(
        &conf,
        format!(
            "<busconfig><type>system</type><listen>unix:path={}/bus</listen><auth>EXTERNAL</auth>\
             <policy context=\"default\"><allow user=\"*\"/><allow own=\"*\"/><allow send_destination=\"*\"/>\
             <allow receive_type=\"method_call\"/><allow receive_type=\"method_return\"/>\
             <allow receive_type=\"error\"/><allow receive_type=\"signal\"/></policy></busconfig>\n",
            dir.display()
        ),
    )
    .unwrap();
    let mut child = Command::new("dbus-daemon")
        .arg(format!("--config-file={}", conf.display()))
        .args(["--nofork", "--nopidfile", "--print-address=1"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("dbus-daemon (make deps installs it)");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (Kill(child), line.trim().to_string())
}

/// A guest tree with one NIC VF of `id`; returns its byte counter.
fn guest(dir: &Path, id: &str) -> PathBuf {
    let (vendor, device) = id.split_once(':').unwrap();
    let vf = dir.join("sys/bus/pci/devices/0000:00:04.0");
    std::fs::create_dir_all(vf.join("net/eth0/statistics")).unwrap();
    std::fs::write(vf.join("vendor"), format!("0x{vendor}\n")).unwrap();
    std::fs::write(vf.join("device"), format!("0x{device}\n")).unwrap();
    std::fs::create_dir_all(dir.join("proc/sys/kernel")).unwrap();
    std::fs::write(dir.join("proc/sys/kernel/osrelease"), "6.12.0\n").unwrap();
    let c = vf.join("net/eth0/statistics/rx_bytes");
    std::fs::write(&c, "0\n").unwrap();
    c
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numbers"))
        .collect();
    let agents = *args.first().unwrap_or(&8) as usize;
    let seconds = *args.get(1).unwrap_or(&20);
    let trials = *args.get(2).unwrap_or(&5) as usize;
    let bin = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let dir = tempfile::tempdir().unwrap();
    let (_bus, address) = bus(dir.path());
    let root = dir.path().join("host");
    vf_provisioner::layouts::large(1, agents as u32)
        .build(&root)
        .unwrap();
    let cfg = dir.path().join("config.toml");
    std::fs::write(
        &cfg,
        "[usage]\nnet_full_bytes_per_s = 10000\nbusy_alert_percent = 50\nbusy_alert_for_s = 0\n",
    )
    .unwrap();
    let daemon = Kill(
        Command::new(bin.join("vfio-managerd"))
            .args(["--fake-kernel", "--no-uevents", "--root"])
            .arg(&root)
            .arg("--config")
            .arg(&cfg)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--audit-log")
            .arg(dir.path().join("audit.log"))
            .args(["--bus-address", &address])
            .stderr(Stdio::null())
            .spawn()
            .expect("vfio-managerd: cargo build --release -p vfio-manager"),
    );
    let c = (0..100)
        .find_map(|_| {
            std::thread::sleep(Duration::from_millis(50));
            Client::connect_to(Some(&address))
                .ok()
                .filter(|c| c.leases().is_ok())
        })
        .expect("the daemon came up");
    let devices = c.devices().unwrap();
    let vfs: Vec<_> = devices
        .iter()
        .filter(|d| !d.pf.is_empty())
        .take(agents)
        .collect();
    let mut procs = Vec::new();
    let mut counters = Vec::new();
    for (i, vf) in vfs.iter().enumerate() {
        let sock = dir.path().join(format!("a{i}.sock"));
        c.provision(&Request {
            request_id: format!("r{i}"),
            vm_name: format!("vm{i}"),
            devices: vec![vf.address.clone()],
            agent: format!("unix:{}", sock.display()),
            ..Request::default()
        })
        .unwrap();
        let g = dir.path().join(format!("guest{i}"));
        counters.push(guest(&g, &vf.id));
        while !sock.exists() {
            std::thread::sleep(Duration::from_millis(50));
        }
        let p = Command::new(bin.join("vm-agent"))
            .arg("--channel")
            .arg(&sock)
            .arg("--root")
            .arg(&g)
            .args(["--interval-s", "1"])
            .stderr(Stdio::null())
            .spawn()
            .expect("vm-agent: cargo build --release -p vm-agent");
        procs.push(Kill(p));
    }
    while c.agents().unwrap().iter().filter(|a| a.connected).count() < agents {
        std::thread::sleep(Duration::from_millis(50));
    }

    // Steady state: CPU over SECONDS.
    let pids: Vec<u32> = procs.iter().map(|p| p.0.id()).collect();
    let (a0, d0) = (
        pids.iter().map(|p| cpu_s(*p)).sum::<f64>(),
        cpu_s(daemon.0.id()),
    );
    std::thread::sleep(Duration::from_secs(seconds));
    let (a1, d1) = (
        pids.iter().map(|p| cpu_s(*p)).sum::<f64>(),
        cpu_s(daemon.0.id()),
    );
    let agent_share = (a1 - a0) / (agents as f64 * seconds as f64) * 100.0;
    // Each agent sends a heartbeat and a usage frame a second.
    let frames = (agents as u64 * seconds * 2) as f64;
    // The floor: the same files read bare, once a second's worth per agent.
    let t = Instant::now();
    let reads = 1000;
    for _ in 0..reads {
        for c in &counters {
            let _ = std::fs::read_to_string(c);
            let _ = std::fs::read_to_string(c.with_file_name("tx_bytes"));
        }
        let _ = std::fs::read_dir(dir.path().join("guest0/sys/bus/pci/devices")).map(|d| d.count());
    }
    let floor_ms = t.elapsed().as_secs_f64() * 1e3 / reads as f64 / agents as f64;
    let agent_ms = (a1 - a0) * 1e3 / (agents as f64 * seconds as f64);
    println!("{agents} agents at 1 Hz for {seconds} s");
    println!(
        "{:<52} {:>10.3} ms/s ({agent_share:.2} % of a CPU)",
        "vm-agent CPU per guest second", agent_ms
    );
    println!(
        "{:<52} {:>10.3} ms/s",
        "bare reads of the same files (floor)", floor_ms
    );
    println!(
        "ratio agent/floor: {:.1}x (the agent also encodes, writes and polls)",
        agent_ms / floor_ms
    );
    println!(
        "{:<52} {:>10.1} µs ({} frames)",
        "vfio-managerd CPU per frame ingested",
        (d1 - d0) * 1e6 / frames,
        frames
    );

    // Change to alert: counters jump, UsageNow crosses the threshold.
    let mut lat = Vec::new();
    let dev = vfs[0].address.clone();
    for trial in 0..trials {
        // Idle first: the counter still, until the host says under the threshold.
        while c
            .usage_now()
            .unwrap()
            .iter()
            .any(|u| u.device == dev && (u.busy_percent.is_nan() || u.busy_percent >= 50.0))
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        let t0 = Instant::now();
        let on = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (o, counter) = (on.clone(), counters[0].clone());
        let base = 1_000_000_000 * (trial as u64 + 1);
        let writer = std::thread::spawn(move || {
            let mut n = base;
            while o.load(std::sync::atomic::Ordering::SeqCst) {
                n += 5000;
                std::fs::write(&counter, format!("{n}\n")).unwrap();
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        while !c
            .usage_now()
            .unwrap()
            .iter()
            .any(|u| u.device == dev && u.busy_percent > 50.0)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        lat.push(t0.elapsed());
        on.store(false, std::sync::atomic::Ordering::SeqCst);
        writer.join().unwrap();
    }
    lat.sort();
    println!(
        "{:<52} p50 {:>8.0?}  max {:>8.0?} ({trials} trials; the agent samples once a second)",
        "guest utilisation change -> host UsageAlert",
        lat[lat.len() / 2],
        lat[lat.len() - 1]
    );
}
