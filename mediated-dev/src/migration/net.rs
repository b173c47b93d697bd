//! Device state between two hosts over TCP. The source streams (see
//! [`super::stream`]), then waits for the destination's verdict line: `OK` once the
//! destination device runs with the state, `ERR <reason>` otherwise. Only `OK`
//! leaves the source stopped; anything else (an error line, a cut connection, a
//! timeout) returns it to RUNNING.

use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::thread;
use std::time::Duration;

use super::{load, save, Header, MigrationDevice, Stats, Tracker};
use crate::error::{Error, Result};

/// How long the source waits for the destination's verdict after the trailer.
pub const VERDICT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a destination waits for a source, and for each read from it: a stalled
/// source must not keep the destination in RESUMING.
pub const INCOMING_TIMEOUT: Duration = Duration::from_secs(60);

fn net(dev: &dyn MigrationDevice, what: String) -> Error {
    Error::Migration {
        device: dev.name().into(),
        what,
    }
}

/// Sends `dev`'s state to `to`. On success the source is stopped (its tracker is
/// returned); on any failure it runs again.
pub fn send(
    dev: &dyn MigrationDevice,
    header: &Header,
    to: impl ToSocketAddrs,
) -> Result<(Tracker, Stats)> {
    send_with_progress(dev, header, to, &mut |_| {})
}

/// [`send`], calling `progress` with the bytes sent so far every [`PROGRESS_EVERY`].
pub fn send_with_progress(
    dev: &dyn MigrationDevice,
    header: &Header,
    to: impl ToSocketAddrs,
    progress: &mut dyn FnMut(u64),
) -> Result<(Tracker, Stats)> {
    let conn = TcpStream::connect(to)
        .map_err(|e| net(dev, format!("cannot reach the destination: {e}")))?;
    conn.set_nodelay(true).ok();
    let reader = conn.try_clone().map_err(|e| net(dev, e.to_string()))?;
    let out = Progress {
        // Smaller than a chunk: chunks go to the socket straight from the device's
        // buffer (writev); only the small records are gathered here.
        inner: BufWriter::with_capacity(64 << 10, &conn),
        sent: 0,
        next: PROGRESS_EVERY,
        report: progress,
    };
    let (src, stats) = save(dev, header, out)?;
    reader.set_read_timeout(Some(VERDICT_TIMEOUT)).ok();
    let mut line = String::new();
    let verdict = BufReader::new(reader).read_line(&mut line);
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
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((conn, _)) => {
                conn.set_nonblocking(false)?;
                conn.set_read_timeout(Some(timeout))?;
                return Ok(conn);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if std::time::Instant::now() > deadline {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no source connected within {}s", timeout.as_secs()),
                    ));
                }
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Accepts one connection on `listener` (within [`INCOMING_TIMEOUT`]) and loads it
/// into `dev`, answering the source with the verdict.
pub fn receive(dev: &dyn MigrationDevice, want: &Header, listener: &TcpListener) -> Result<Stats> {
    receive_within(dev, want, listener, INCOMING_TIMEOUT)
}

pub fn receive_within(
    dev: &dyn MigrationDevice,
    want: &Header,
    listener: &TcpListener,
    timeout: Duration,
) -> Result<Stats> {
    let conn = accept_within(listener, timeout)
        .map_err(|e| net(dev, format!("waiting for the source: {e}")))?;
    let mut answer = conn.try_clone().map_err(|e| net(dev, e.to_string()))?;
    // Unbuffered: a buffer would read ahead into the next chunk and copy that part
    // once more; each record header is one 13-byte read instead.
    let result = load(dev, want, &conn);
    let line = match &result {
        Ok(_) => "OK\n".to_string(),
        Err(e) => format!("ERR {}\n", e.to_string().replace('\n', " ")),
    };
    // The source may be gone already (a cut connection); the verdict is then moot.
    let _ = answer.write_all(line.as_bytes());
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
