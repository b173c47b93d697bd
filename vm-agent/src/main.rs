//! `vm-agent`: runs in a Linux guest (from its systemd unit, or an initramfs) and
//! reports to the host's vfio-managerd over virtio-vsock: a hello (the devices the
//! guest sees and their drivers), then a heartbeat and a usage sample each interval;
//! it answers the host's `report-now` and `let-go`. It changes nothing in the guest
//! but a `let-go`, which unbinds the named device's driver. When the host is not
//! there it tries again each interval.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use vm_agent::protocol::{self, Message, ProtocolError};
use vm_agent::Guest;

/// The host's CID (VMADDR_CID_HOST).
const HOST_CID: u32 = 2;

#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// The host's vsock port the daemon listens on.
    #[arg(long, default_value_t = 22086)]
    port: u32,
    /// Seconds between heartbeats and usage samples.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    interval_s: u64,
    /// Print the hello's frame body and exit (what the host would be told).
    #[arg(long)]
    once: bool,
    /// Read sysfs and procfs under this root (tests).
    #[arg(long, default_value = "/")]
    root: PathBuf,
}

fn main() {
    let a = Args::parse();
    let g = Guest::new(&a.root);
    if a.once {
        match protocol::body(&hello(&g)) {
            Ok(b) => println!("{}", String::from_utf8_lossy(&b)),
            Err(e) => eprintln!("vm-agent: {e}"),
        }
        return;
    }
    let every = Duration::from_secs(a.interval_s);
    loop {
        if let Err(e) = serve(&g, a.port, every) {
            eprintln!("vm-agent: {e}; trying again in {}s", a.interval_s);
        }
        std::thread::sleep(every);
    }
}

fn hello(g: &Guest) -> Message {
    Message::Hello {
        agent: format!("vm-agent {}", env!("CARGO_PKG_VERSION")),
        kernel: g.kernel(),
        devices: g.devices(),
    }
}

/// One connection to the host, until it ends.
fn serve(g: &Guest, port: u32, every: Duration) -> Result<(), String> {
    let mut s = vsock::VsockStream::connect_with_cid_port(HOST_CID, port)
        .map_err(|e| format!("connecting to the host (vsock {HOST_CID}:{port}): {e}"))?;
    let err = |e: ProtocolError| e.to_string();
    protocol::write(&mut s, &hello(g)).map_err(err)?;
    let mut seq = 0;
    loop {
        if !readable(&s, every)? {
            seq += 1;
            protocol::write(&mut s, &Message::Heartbeat { seq }).map_err(err)?;
            protocol::write(&mut s, &Message::Usage { samples: g.usage() }).map_err(err)?;
            continue;
        }
        let answer = match protocol::read(&mut s).map_err(err)? {
            Message::ReportNow => Message::Usage { samples: g.usage() },
            Message::LetGo { address } => {
                let r = g.let_go(&address);
                Message::LetGoDone {
                    address,
                    ok: r.is_ok(),
                    detail: r.unwrap_or_else(|e| e),
                }
            }
            other => {
                return Err(format!(
                    "the host sent {other:?}, which only an agent sends"
                ))
            }
        };
        protocol::write(&mut s, &answer).map_err(err)?;
    }
}

/// Whether the host sent something within `wait` (a whole frame is then read
/// blocking: a timeout never cuts one).
fn readable(s: &impl AsRawFd, wait: Duration) -> Result<bool, String> {
    let mut p = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = wait.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: `p` is one valid pollfd for the whole call, and the count says one.
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    match n {
        n if n < 0 => Err(format!("poll: {}", std::io::Error::last_os_error())),
        0 => Ok(false),
        _ => Ok(true),
    }
}
