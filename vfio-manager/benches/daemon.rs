//! `make bench`: provision/release round trips through the real bus with 32
//! concurrent clients, beside `org.freedesktop.DBus.Peer.Ping` to the same daemon on
//! the same bus, same concurrency, same run. Prints p50/p99 and the ratio.
//! Usage: cargo bench -p vfio-manager --bench daemon [-- ROUNDS]   (default 20 per client)

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use vf_provisioner::layouts;
use vfio_manager::api::Request;

static CLIENTS: std::sync::LazyLock<usize> = std::sync::LazyLock::new(|| {
    std::env::var("CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32)
});

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Runs `op(client, thread, round)` from CLIENTS threads at once; returns sorted latencies.
fn measure(
    bus: &Arc<common::Bus>,
    rounds: usize,
    op: fn(&vfio_manager::cli::client::Client, usize, usize),
) -> Vec<Duration> {
    let start = Arc::new(Barrier::new(*CLIENTS));
    let threads: Vec<_> = (0..*CLIENTS)
        .map(|t| {
            let (bus, start) = (bus.clone(), start.clone());
            std::thread::spawn(move || {
                let c = bus.client();
                start.wait();
                (0..rounds)
                    .map(|r| {
                        let t0 = Instant::now();
                        op(&c, t, r);
                        t0.elapsed()
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut all: Vec<Duration> = threads
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    all.sort();
    all
}

fn provision_release(c: &vfio_manager::cli::client::Client, t: usize, r: usize) {
    let req = Request {
        request_id: format!("bench-{t}-{r}"),
        vm_name: format!("bench-{t}"),
        vm_uuid: String::new(),
        profile: "vf".into(),
        count: 1,
        numa_node: -1,
        ..Request::default()
    };
    let lease = c.provision(&req).expect("provision");
    c.release(&lease.id).expect("release");
}

fn ping(c: &vfio_manager::cli::client::Client, _: usize, _: usize) {
    c.ping().expect("ping");
}

fn main() {
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(20);
    let bus = Arc::new(common::Bus::open());
    // 16 PFs x 4 VFs: every client can hold one while the others do.
    let _d = common::Daemon::start(&bus, layouts::large(16, 4), "", &[]);
    measure(&bus, 2, ping); // warm connections and caches
    let pings = measure(&bus, rounds, ping);
    let trips = measure(&bus, rounds, provision_release);
    let pings2 = measure(&bus, rounds, ping);
    println!("vfio-managerd over a real dbus-daemon, fake host (16 PFs x 4 VFs), {} concurrent clients, {rounds} rounds each", *CLIENTS);
    println!("{:<44} {:>10} {:>10}", "operation", "p50", "p99");
    for (name, v) in [
        ("Peer.Ping (bus round trip, before)", &pings),
        ("Provision + Release (2 calls, 2 commits)", &trips),
        ("Peer.Ping (bus round trip, after)", &pings2),
    ] {
        println!("{name:<44} {:>10.2?} {:>10.2?}", pct(v, 0.5), pct(v, 0.99));
    }
    let ping_p99 = pct(&pings, 0.99).max(pct(&pings2, 0.99));
    println!(
        "ratio p99 round trip / p99 Ping: {:.2}x (target <= 3x per call: {:.2}x per call)",
        pct(&trips, 0.99).as_secs_f64() / ping_p99.as_secs_f64(),
        pct(&trips, 0.99).as_secs_f64() / 2.0 / ping_p99.as_secs_f64()
    );
}
