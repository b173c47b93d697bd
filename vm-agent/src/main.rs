//! `vm-agent`: runs in a Linux guest (from its systemd unit, or an initramfs) and
//! reports to the host's vfio-managerd over virtio-vsock: a hello (the devices the
//! guest sees and their drivers; again whenever they change), then a heartbeat and
//! a usage sample each interval;
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
    /// Speak on this path instead of vsock: a virtio-serial port (for guests
    /// without vsock: /dev/virtio-ports/org.vfiomanager.agent.0), or a Unix socket
    /// (tests, and hosts that relay one).
    #[arg(long)]
    channel: Option<PathBuf>,
}

/// The virtio-serial port the agent uses when the guest has no vsock and it has one.
const SERIAL_PORT: &str = "dev/virtio-ports/org.vfiomanager.agent.0";

/// A connection to the host, whatever carries it.
trait Channel: std::io::Read + std::io::Write + AsRawFd {}
impl<T: std::io::Read + std::io::Write + AsRawFd> Channel for T {}

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
        if let Err(e) = connect(&a).and_then(|mut s| serve(&g, &mut *s, every)) {
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

/// The channel: `--channel`, else vsock, else the virtio-serial port if the guest
/// has one.
fn connect(a: &Args) -> Result<Box<dyn Channel>, String> {
    let open = |p: &std::path::Path| -> Result<Box<dyn Channel>, String> {
        let is_socket = std::fs::metadata(p).map(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_socket()
        });
        match is_socket {
            Ok(true) => {
                std::os::unix::net::UnixStream::connect(p).map(|s| Box::new(s) as Box<dyn Channel>)
            }
            _ => std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(p)
                .map(|f| Box::new(f) as Box<dyn Channel>),
        }
        .map_err(|e| format!("opening {}: {e}", p.display()))
    };
    if let Some(p) = &a.channel {
        return open(p);
    }
    match vsock::VsockStream::connect_with_cid_port(HOST_CID, a.port) {
        Ok(s) => Ok(Box::new(s)),
        Err(e) => {
            let serial = a.root.join(SERIAL_PORT);
            match serial.exists() {
                true => open(&serial),
                false => Err(format!(
                    "connecting to the host (vsock {HOST_CID}:{}): {e}; no virtio-serial port either",
                    a.port
                )),
            }
        }
    }
}

/// One connection to the host, until it ends.
fn serve(g: &Guest, s: &mut dyn Channel, every: Duration) -> Result<(), String> {
    let err = |e: ProtocolError| e.to_string();
    let mut said = hello(g);
    protocol::write(s, &said).map_err(err)?;
    let mut seq = 0;
    loop {
        if !readable(s, every)? {
            // A device came or went (hot-plug, a host's unplug): hello again.
            let now = hello(g);
            if now != said {
                protocol::write(s, &now).map_err(err)?;
                said = now;
            }
            seq += 1;
            protocol::write(s, &Message::Heartbeat { seq }).map_err(err)?;
            protocol::write(s, &Message::Usage { samples: g.usage() }).map_err(err)?;
            continue;
        }
        let answer = match protocol::read(s).map_err(err)? {
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
        protocol::write(s, &answer).map_err(err)?;
    }
}

/// Whether the host sent something within `wait` (a whole frame is then read
/// blocking: a timeout never cuts one).
fn readable(s: &dyn Channel, wait: Duration) -> Result<bool, String> {
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
