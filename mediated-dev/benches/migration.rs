//! Stream throughput: a large synthetic device state (256 MiB) sent through the whole migration path (save, stream format with checksums,
//! TCP, load) beside the bare loopback TCP throughput of the same bytes, measured in
//! the same run, each with the cores it kept busy (this process's CPU time over the
//! wall time: above 1, the two ends ran at once). Target: >= 0.8x of loopback. `cargo bench -p mediated-dev --bench migration`

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use mediated_dev::migration::state::STOP_COPY;
use mediated_dev::migration::{net, Header, MigState, MigrationDevice};

const SIZE: usize = 256 << 20;
/// Rounds of each, alternating, so that each pair sees the same machine: the ratio
/// reported is the median of the pairs' ratios (this machine's speed drifts by a
/// third between runs; within a pair it does not).
const ROUNDS: usize = 9;

fn bare_tcp() -> Duration {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let sink = thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0;
        while n < SIZE {
            let r = c.read(&mut buf).unwrap();
            assert!(r > 0);
            n += r;
        }
        c.write_all(b"OK\n").unwrap();
    });
    let data = vec![7u8; 1 << 20];
    let start = Instant::now();
    let mut c = TcpStream::connect(addr).unwrap();
    for _ in 0..SIZE >> 20 {
        c.write_all(&data).unwrap();
    }
    let mut ok = [0u8; 3];
    c.read_exact(&mut ok).unwrap();
    let t = start.elapsed();
    sink.join().unwrap();
    t
}

fn header() -> Header {
    Header {
        device_kind: "mdev".into(),
        profile: "synthetic".into(),
        driver: "memory".into(),
        driver_version: "1".into(),
        flags: 0,
        size_hint: SIZE as u64,
    }
}

/// A device whose state is SIZE bytes of a repeating pattern (source) or that
/// counts what it is given without keeping it (destination: the stream's CRCs,
/// checked by the loader, vouch for the bytes), so that the time measured is the
/// migration path's, not a device simulation's.
struct Synthetic {
    state: Mutex<(MigState, usize, u64)>,
    pattern: Vec<u8>,
}

impl Synthetic {
    fn new() -> Self {
        Synthetic {
            state: Mutex::new((MigState::Running, 0, 0)),
            pattern: (0..1 << 20).map(|i| (i * 7) as u8).collect(),
        }
    }
}

impl MigrationDevice for Synthetic {
    fn name(&self) -> &str {
        "synthetic"
    }
    fn flags(&self) -> io::Result<Option<u64>> {
        Ok(Some(STOP_COPY))
    }
    fn state(&self) -> io::Result<MigState> {
        Ok(self.state.lock().unwrap().0)
    }
    fn set_state(&self, to: MigState) -> io::Result<()> {
        let mut s = self.state.lock().unwrap();
        if to == MigState::StopCopy || to == MigState::Resuming {
            s.1 = 0;
            s.2 = 0;
        }
        s.0 = to;
        Ok(())
    }
    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut s = self.state.lock().unwrap();
        let n = buf.len().min(self.pattern.len()).min(SIZE - s.1);
        buf[..n].copy_from_slice(&self.pattern[..n]);
        s.1 += n;
        Ok(n)
    }
    fn write(&self, data: &[u8]) -> io::Result<()> {
        let mut s = self.state.lock().unwrap();
        s.1 += data.len();
        s.2 += 1;
        Ok(())
    }
    fn precopy_info(&self) -> io::Result<(u64, u64)> {
        Ok((0, 0))
    }
    fn reset(&self) -> io::Result<()> {
        Ok(())
    }
}

fn migration() -> Duration {
    let (src, dst) = (Synthetic::new(), Synthetic::new());
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let h = header();
    let t = thread::scope(|s| {
        let r = s.spawn(|| net::receive(&dst, &h, &l).unwrap());
        let start = Instant::now();
        net::send(&src, &h, addr).unwrap();
        let t = start.elapsed();
        r.join().unwrap();
        t
    });
    let got = *dst.state.lock().unwrap();
    assert_eq!(
        (got.0, got.1),
        (MigState::Running, SIZE),
        "all of the state arrived, CRC-checked"
    );
    t
}

/// CPU time of this process so far (every thread, user and kernel).
fn cpu_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Runs `f`, returning its wall time and the cores it kept busy on average.
fn busy(f: fn() -> Duration) -> (Duration, f64) {
    let c0 = cpu_now();
    let t = f();
    (t, (cpu_now() - c0).as_secs_f64() / t.as_secs_f64())
}

fn main() {
    let gib = |d: Duration| SIZE as f64 / d.as_secs_f64() / (1u64 << 30) as f64;
    println!("pair  loopback (cores busy)   migration (cores busy)   ratio");
    let mut pairs: Vec<(Duration, Duration)> = (0..ROUNDS)
        .map(|i| {
            let (raw, raw_cores) = busy(bare_tcp);
            let (ours, our_cores) = busy(migration);
            println!(
                "{i:>4} {raw:>10.2?} ({raw_cores:.2})   {ours:>10.2?} ({our_cores:.2})     {:.2}x",
                raw.as_secs_f64() / ours.as_secs_f64()
            );
            (raw, ours)
        })
        .collect();
    let ratio = |(raw, ours): &(Duration, Duration)| raw.as_secs_f64() / ours.as_secs_f64();
    pairs.sort_by(|a, b| ratio(a).total_cmp(&ratio(b)));
    let (raw, ours) = pairs[ROUNDS / 2];
    println!(
        "stream of 256 MiB        time       GiB/s   (the median pair of {ROUNDS}, alternating)"
    );
    println!("loopback TCP (bare)  {:>10.2?} {:>9.2}", raw, gib(raw));
    println!("migration over TCP   {:>10.2?} {:>9.2}", ours, gib(ours));
    println!(
        "throughput ratio: {:.2}x of loopback (target >= 0.8x; pairs ranged {:.2}x to {:.2}x)",
        ratio(&pairs[ROUNDS / 2]),
        ratio(&pairs[0]),
        ratio(&pairs[ROUNDS - 1])
    );
}
