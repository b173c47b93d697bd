//! Device state between two hosts over TCP, inside mutual TLS ([`super::tls`]):
//! only a peer whose certificate the CA signed is heard, and nothing crosses the
//! network in the clear. The source streams (see [`super::stream`]), then waits
//! for the destination's verdict line: `OK` once the destination device runs with
//! the state, `ERR <reason>` otherwise. Only `OK` leaves the source stopped;
//! anything else (an error line, a cut connection, a timeout, a refused
//! certificate) returns it to RUNNING. The destination bounds what a peer can make
//! it do: one connection within [`Limits::accept_within`], the whole exchange
//! within [`Limits::deadline`], at most [`Limits::max_bytes`] read.

use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use rustls::{ClientConnection, ServerConnection, StreamOwned};

use super::tls::Tls;
use super::{load, save, Header, MigrationDevice, Stats, Tracker};
use crate::error::{Error, Result};

/// How long the source waits for the destination's verdict after the trailer.
pub const VERDICT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a destination waits for a source, and for each read from it: a stalled
/// source must not keep the destination in RESUMING.
pub const INCOMING_TIMEOUT: Duration = Duration::from_secs(60);

/// What a destination allows one incoming migration.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// For the source to connect.
    pub accept_within: Duration,
    /// For the whole exchange, handshake to verdict: a source that drips is cut.
    pub deadline: Duration,
    /// Bytes read from the source in all (TLS records included).
    pub max_bytes: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            accept_within: INCOMING_TIMEOUT,
            deadline: Duration::from_secs(600),
            max_bytes: 64 << 30,
        }
    }
}

fn net(dev: &dyn MigrationDevice, what: String) -> Error {
    Error::Migration {
        device: dev.name().into(),
        what,
    }
}

/// Sends `dev`'s state to `to` (`HOST:PORT`, whose certificate must name HOST). On
/// success the source is stopped (its tracker is returned); on any failure it runs
/// again.
pub fn send(
    dev: &dyn MigrationDevice,
    header: &Header,
    to: &str,
    tls: &Tls,
) -> Result<(Tracker, Stats)> {
    send_with_progress(dev, header, to, tls, &mut |_| {})
}

/// [`send`], calling `progress` with the bytes sent so far every [`PROGRESS_EVERY`].
pub fn send_with_progress(
    dev: &dyn MigrationDevice,
    header: &Header,
    to: &str,
    tls: &Tls,
    progress: &mut dyn FnMut(u64),
) -> Result<(Tracker, Stats)> {
    let name = tls
        .server_name(to)
        .ok_or_else(|| net(dev, format!("{to:?} is not HOST:PORT")))?;
    let conn = TcpStream::connect(to)
        .map_err(|e| net(dev, format!("cannot reach the destination: {e}")))?;
    conn.set_nodelay(true).ok();
    let session = ClientConnection::new(tls.client.clone(), name)
        .map_err(|e| net(dev, format!("TLS: {e}")))?;
    let mut stream = StreamOwned::new(session, conn);
    // Now, while the device runs: done lazily, the handshake would happen at the
    // first flush, which comes after the stop (measured: 12-16 ms more downtime
    // for mtty in the emulated host).
    handshake(&mut stream)
        .map_err(|e| net(dev, format!("TLS handshake with the destination: {e}")))?;
    let out = Progress {
        // Smaller than a chunk: chunks go to TLS straight from the device's buffer
        // (writev); only the small records are gathered here.
        inner: BufWriter::with_capacity(64 << 10, &mut stream),
        sent: 0,
        next: PROGRESS_EVERY,
        report: progress,
    };
    let (src, stats) = save(dev, header, out)?;
    stream.sock.set_read_timeout(Some(VERDICT_TIMEOUT)).ok();
    let mut line = String::new();
    let verdict = BufReader::new(&mut stream).read_line(&mut line);
    match (verdict, line.trim_end()) {
        (Ok(_), "OK") => Ok((src.commit(), stats)),
        (Ok(_), l) if l.starts_with("ERR ") => Err(net(
            dev,
            format!(
                "the destination refused: {}; the source runs again",
                &l[4..]
            ),
        )),
        (Ok(_), _) => Err(net(
            dev,
            "the destination closed without a verdict; the source runs again".into(),
        )),
        (Err(e), _) => Err(net(
            dev,
            format!("no verdict from the destination ({e}); the source runs again"),
        )),
    }
}

/// Completes a TLS handshake now rather than at the first read or write.
fn handshake<C, D, S>(stream: &mut StreamOwned<C, S>) -> std::io::Result<()>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<D>>,
    D: rustls::SideData,
    S: Read + Write,
{
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock)?;
    }
    Ok(())
}

/// How often an outgoing migration reports progress.
pub const PROGRESS_EVERY: u64 = 64 << 20;

/// A writer that reports how much has gone through it.
struct Progress<'a, W: Write> {
    inner: W,
    sent: u64,
    next: u64,
    report: &'a mut dyn FnMut(u64),
}

impl<W: Write> Write for Progress<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count(n);
        Ok(n)
    }

    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        let n = self.inner.write_vectored(bufs)?;
        self.count(n);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl<W: Write> Progress<'_, W> {
    fn count(&mut self, n: usize) {
        self.sent += n as u64;
        if self.sent >= self.next {
            self.next = self.sent + PROGRESS_EVERY;
            (self.report)(self.sent);
        }
    }
}

/// Waits up to `timeout` for one connection: a source that never comes must not
/// hold the destination's device reserved for ever.
fn accept_within(listener: &TcpListener, timeout: Duration) -> std::io::Result<TcpStream> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((conn, _)) => {
                conn.set_nonblocking(false)?;
                // The verdict and TLS's close are small records written back to
                // back: no Nagle wait between them while the source is stopped.
                conn.set_nodelay(true)?;
                return Ok(conn);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no source connected within {}s", timeout.as_secs_f32()),
                    ));
                }
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// A source's socket with the destination's bounds: every read ends by the
/// deadline, and no more than `left` bytes are read.
struct Bounded {
    sock: TcpStream,
    deadline: Instant,
    left: u64,
}

impl Read for Bounded {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let now = Instant::now();
        if now >= self.deadline {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the migration's deadline passed (a source that drips is cut)",
            ));
        }
        if self.left == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the source sent more than the configured bound",
            ));
        }
        let wait = (self.deadline - now).min(INCOMING_TIMEOUT);
        self.sock.set_read_timeout(Some(wait))?;
        let max = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.sock.read(&mut buf[..max])?;
        self.left -= n as u64;
        Ok(n)
    }
}

impl Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.sock.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.sock.flush()
    }
}

/// Accepts one source on `listener` and loads its state into `dev` within
/// `limits`, answering with the verdict. A source without a certificate the CA
/// signed is refused before any byte reaches the device.
pub fn receive(
    dev: &dyn MigrationDevice,
    want: &Header,
    listener: &TcpListener,
    tls: &Tls,
    limits: &Limits,
) -> Result<Stats> {
    let conn = accept_within(listener, limits.accept_within)
        .map_err(|e| net(dev, format!("waiting for the source: {e}")))?;
    let session =
        ServerConnection::new(tls.server.clone()).map_err(|e| net(dev, format!("TLS: {e}")))?;
    let sock = Bounded {
        sock: conn,
        deadline: Instant::now() + limits.deadline,
        left: limits.max_bytes,
    };
    let mut stream = StreamOwned::new(session, sock);
    // Before the device: a peer that cannot complete the handshake touches nothing.
    handshake(&mut stream)
        .map_err(|e| net(dev, format!("refused the source: TLS handshake: {e}")))?;
    // Unbuffered: a buffer would read ahead into the next chunk and copy that part
    // once more; each record header is one 13-byte read instead.
    let result = load(dev, want, &mut stream);
    let line = match &result {
        Ok(_) => "OK\n".to_string(),
        Err(e) => format!("ERR {}\n", e.to_string().replace('\n', " ")),
    };
    // The source may be gone already (a cut connection); the verdict is then moot.
    let _ = stream.write_all(line.as_bytes()).and_then(|()| {
        stream.conn.send_close_notify();
        stream.flush()
    });
    result
}

/// Fault injection for tests and demos: a one-connection proxy to `to` that
/// forwards at most `limit` bytes of the stream (a cut connection), flipping the
/// byte at offset `flip` if given (a corrupted chunk), and passes the verdict back.
pub fn fault_proxy(
    to: SocketAddr,
    limit: usize,
    flip: Option<usize>,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    thread::spawn(move || -> std::io::Result<()> {
        let (mut from_src, _) = listener.accept()?;
        let mut to_dst = TcpStream::connect(to)?;
        let (mut verdict, mut back) = (to_dst.try_clone()?, from_src.try_clone()?);
        thread::spawn(move || std::io::copy(&mut verdict, &mut back));
        let mut buf = vec![0u8; 64 << 10];
        let mut sent = 0;
        while sent < limit {
            let n = from_src.read(&mut buf)?.min(limit - sent);
            if n == 0 {
                break;
            }
            if let Some(f) = flip.filter(|f| (sent..sent + n).contains(f)) {
                buf[f - sent] ^= 0x01;
            }
            to_dst.write_all(&buf[..n])?;
            sent += n;
        }
        let _ = to_dst.shutdown(Shutdown::Both);
        from_src.shutdown(Shutdown::Both)
    });
    Ok(addr)
}
