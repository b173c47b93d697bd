//! Stream throughput: a large synthetic device state (256 MiB) sent through the
//! whole migration path (save, stream format with checksums, mutual TLS over TCP,
//! load) beside two floors measured in the same run: the same bytes over bare
//! loopback TCP, and over loopback TLS with the same rustls configuration (what the
//! encryption alone costs). The migration reports its progress as the daemon's
//! does (`send_with_progress`: bytes so far, every 64 MiB, which the daemon turns
//! into `MigrationProgress` and `vfctl migrate send` into its bar), so its cost is
//! in the figure. Each with the cores it kept busy (this process's CPU
//! time over the wall time: above 1, the two ends ran at once). Target: >= 0.8x of
//! the TLS floor. `cargo bench -p mediated-dev --bench migration`

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use std::sync::LazyLock;

use mediated_dev::migration::state::STOP_COPY;
use mediated_dev::migration::tls::{test_credentials, Tls};
use mediated_dev::migration::{net, Header, MigState, MigrationDevice};

static TLS: LazyLock<Tls> = LazyLock::new(test_credentials);

const SIZE: usize = 256 << 20;
/// Rounds of each, alternating, so that each pair sees the same machine: the ratio
/// reported is the median of the pairs' ratios (this machine's speed drifts by a
/// third between runs; within a pair it does not).
const ROUNDS: usize = 9;

/// SIZE bytes one way over loopback, then a 3-byte answer back, through whatever
/// `wrap` makes of each end's socket (`true`: the listening end).
fn bare<S: Read + Write + Send + 'static>(wrap: fn(TcpStream, bool) -> S) -> Duration {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let sink = thread::spawn(move || {
        let mut c = wrap(l.accept().unwrap().0, true);
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0;
        while n < SIZE {
            let r = c.read(&mut buf).unwrap();
            assert!(r > 0);
            n += r;
        }
        c.write_all(b"OK\n").unwrap();
        c.flush().unwrap();
    });
    let data = vec![7u8; 1 << 20];
    let start = Instant::now();
    let mut c = wrap(TcpStream::connect(addr).unwrap(), false);
    for _ in 0..SIZE >> 20 {
        c.write_all(&data).unwrap();
    }
    c.flush().unwrap();
    let mut ok = [0u8; 3];
    c.read_exact(&mut ok).unwrap();
    let t = start.elapsed();
    sink.join().unwrap();
    t
}

fn bare_tcp() -> Duration {
    bare(|s, _| s)
}

/// A TLS stream of either side over `s`.
struct Either(Box<dyn ReadWrite + Send>);
trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}
impl Read for Either {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}
impl Write for Either {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

fn bare_tls() -> Duration {
    bare(|s, listening| {
        if listening {
            let c = rustls::ServerConnection::new(TLS.server_config()).unwrap();
            Either(Box::new(rustls::StreamOwned::new(c, s)))
        } else {
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
            let c = rustls::ClientConnection::new(TLS.client_config(), name).unwrap();
            Either(Box::new(rustls::StreamOwned::new(c, s)))
        }
    })
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
        let r = s.spawn(|| net::receive(&dst, &h, &l, &TLS, &net::Limits::default()).unwrap());
        let start = Instant::now();
        let mut reports = Vec::new();
        net::send_with_progress(&src, &h, &addr.to_string(), &TLS, &mut |sent| {
            reports.push((sent, start.elapsed()))
        })
        .unwrap();
        let t = start.elapsed();
        assert_eq!(
            reports.len() as u64,
            SIZE as u64 / net::PROGRESS_EVERY,
            "a report every 64 MiB: {reports:?}"
        );
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
    println!("round  loopback TCP (cores)   loopback TLS (cores)   migration (cores)   vs TLS");
    let mut rounds: Vec<[Duration; 3]> = (0..ROUNDS)
        .map(|i| {
            let (tcp, tcp_cores) = busy(bare_tcp);
            let (tls, tls_cores) = busy(bare_tls);
            let (ours, our_cores) = busy(migration);
            println!(
                "{i:>5} {tcp:>10.2?} ({tcp_cores:.2})   {tls:>10.2?} ({tls_cores:.2})   {ours:>10.2?} ({our_cores:.2})   {:.2}x",
                tls.as_secs_f64() / ours.as_secs_f64()
            );
            [tcp, tls, ours]
        })
        .collect();
    let ratio = |r: &[Duration; 3], floor: usize| r[floor].as_secs_f64() / r[2].as_secs_f64();
    rounds.sort_by(|a, b| ratio(a, 1).total_cmp(&ratio(b, 1)));
    let mid = rounds[ROUNDS / 2];
    println!("stream of 256 MiB          time       GiB/s   (the median round of {ROUNDS} by the TLS ratio)");
    println!(
        "loopback TCP (bare)    {:>10.2?} {:>9.2}",
        mid[0],
        gib(mid[0])
    );
    println!(
        "loopback TLS (bare)    {:>10.2?} {:>9.2}",
        mid[1],
        gib(mid[1])
    );
    println!(
        "migration over TLS     {:>10.2?} {:>9.2}",
        mid[2],
        gib(mid[2])
    );
    println!(
        "throughput ratio: {:.2}x of loopback TLS (target >= 0.8x; rounds ranged {:.2}x to {:.2}x), {:.2}x of bare TCP",
        ratio(&mid, 1),
        ratio(&rounds[0], 1),
        ratio(&rounds[ROUNDS - 1], 1),
        ratio(&mid, 0)
    );
}
