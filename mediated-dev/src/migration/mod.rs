//! Live migration of device state with the VFIO migration uAPI v2.
//!
//! - [`state`]: the uAPI's states and arcs, and a tracker of every state passed;
//! - [`device`]: the seam (a real VFIO device, or one in memory);
//! - [`stream`]: the versioned, checksummed stream format;
//! - here, the policy: [`save`] and [`load`], which leave nothing half done: a
//!   failed save returns the source to RUNNING, a failed load resets the
//!   destination out of RESUMING (an mdev left there oopses mtty's kernel,
//!   kernel rule 8, docs/kernel.md) or says it must be re-created;
//! - [`net`]: the same over TCP between two hosts inside mutual TLS ([`tls`]), with
//!   the destination's verdict deciding whether the source stays stopped.

pub mod device;
pub mod net;
pub mod state;
pub mod stream;
pub mod tls;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use serde::Serialize;

pub use device::{MemoryDevice, MigrationDevice, VfioMigration};
pub use state::{MigState, Tracker};
pub use stream::{Header, StreamError, StreamReader, StreamWriter};

use crate::error::{Error, Result};

/// How much state one read or write moves: 256 KiB, which stays in a core's L2
/// cache between the device's read, the checksum and the socket's copy (the 256
/// MiB benchmark: 1 MiB buffers 0.70-0.76x of bare loopback TCP, 256 KiB
/// 0.71-0.84x, 64-128 KiB no better).
const BUF: usize = 256 << 10;
/// STOP_COPY reads per send: one `writev` of four 256 KiB chunks, each
/// checksummed right after its read while it is in cache, costs the socket less
/// than four sends (the 256 MiB benchmark, three runs alternating: 0.61-0.70x of
/// bare loopback TCP with one chunk per send, 0.67-0.77x with four; 0.81-0.84x
/// with four and the AVX2 checksum). A second thread for the device side was
/// slower on two cores (0.47-0.66x): its hand-offs cost more than they overlap.
const BATCH: usize = 4;
/// PRE_COPY rounds before stopping the device regardless of what is left.
const PRECOPY_ROUNDS: u32 = 8;

#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    pub bytes: u64,
    pub precopy_bytes: u64,
    pub history: String,
    /// Save: from STOP_COPY to the trailer sent. Load: from RESUMING to RUNNING.
    pub stopped_for: Duration,
}

fn fail(dev: &dyn MigrationDevice, what: impl Into<String>) -> Error {
    Error::Migration {
        device: dev.name().into(),
        what: what.into(),
    }
}

/// Moves `dev` to `to`, checking the walk first and recording it.
fn go(dev: &dyn MigrationDevice, t: &mut Tracker, to: MigState) -> Result<()> {
    let walk = t.plan(to).map_err(|why| fail(dev, why))?;
    dev.set_state(to).map_err(|e| {
        fail(
            dev,
            format!(
                "{} -> {to} failed: {e} (states: {})",
                t.current(),
                t.describe()
            ),
        )
    })?;
    t.record(&walk);
    Ok(())
}

/// Preflight: whether `dev` can be migrated now, and its flags; the reason if not.
pub fn check(dev: &dyn MigrationDevice) -> Result<u64> {
    let flags = dev
        .flags()
        .map_err(|e| fail(dev, format!("query failed: {e}")))?
        .filter(|f| f & state::STOP_COPY != 0)
        .ok_or_else(|| {
            Error::refused(
                dev.name(),
                "its driver does not offer VFIO migration v2 (no STOP_COPY)",
                "use a device type whose vendor driver supports migration, or stop the VM and move it cold",
            )
        })?;
    let now = dev
        .state()
        .map_err(|e| fail(dev, format!("state query failed: {e}")))?;
    if now != MigState::Running {
        return Err(Error::refused(
            dev.name(),
            format!("it is in {now}, not RUNNING (another migration, or one that failed)"),
            "finish or abort that migration first; a reset returns it to RUNNING",
        ));
    }
    Ok(flags)
}

/// A source that has been saved and stopped. Dropping it without [`commit`]
/// returns the device to RUNNING: the VM goes on here.
///
/// [`commit`]: Outgoing::commit
pub struct Outgoing<'a> {
    dev: &'a dyn MigrationDevice,
    tracker: Tracker,
    committed: bool,
}

impl Outgoing<'_> {
    /// The destination runs: the source stays stopped (its VM is gone from here).
    pub fn commit(mut self) -> Tracker {
        self.committed = true;
        self.tracker.clone()
    }
}

impl Drop for Outgoing<'_> {
    fn drop(&mut self) {
        if !self.committed {
            let _ = go(self.dev, &mut self.tracker, MigState::Running);
        }
    }
}

/// Saves `dev`'s state into `out`: PRE_COPY rounds where offered, then STOP_COPY
/// to the end. Returns the stopped source; any error returns it to RUNNING.
pub fn save<'a, W: Write>(
    dev: &'a dyn MigrationDevice,
    header: &Header,
    out: W,
) -> Result<(Outgoing<'a>, Stats)> {
    let flags = check(dev)?;
    let mut src = Outgoing {
        dev,
        tracker: Tracker::new(dev.name(), flags, MigState::Running),
        committed: false,
    };
    let header = Header {
        flags,
        ..header.clone()
    };
    let io = |e: std::io::Error| fail(dev, format!("sending the state failed: {e}"));
    let mut w = StreamWriter::new(out, &header).map_err(io)?;
    let mut buf = vec![0u8; BUF];
    let mut stats = Stats::default();
    if flags & state::PRE_COPY != 0 {
        go(dev, &mut src.tracker, MigState::PreCopy)?;
        for _ in 0..PRECOPY_ROUNDS {
            let (initial, dirty) = dev
                .precopy_info()
                .map_err(|e| fail(dev, format!("precopy info: {e}")))?;
            if initial + dirty == 0 {
                break;
            }
            let n = dev
                .read(&mut buf)
                .map_err(|e| fail(dev, format!("reading PRE_COPY data: {e}")))?;
            if n == 0 {
                break;
            }
            w.chunk(&buf[..n]).map_err(io)?;
            stats.precopy_bytes += n as u64;
        }
    }
    let stopped = Instant::now();
    go(dev, &mut src.tracker, MigState::StopCopy)?;
    loop {
        let (parts, ended) = read_batch(dev, &mut buf)?;
        let read: usize = parts.iter().map(|p| p.len()).sum();
        w.chunks(&parts).map_err(io)?;
        if ended {
            break;
        }
        // A full buffer: more is coming, read several per send from now on. Grown
        // only then: zeroing 1 MiB for a state of a few hundred bytes (mtty's) put
        // ~5 ms into its downtime under emulation.
        if read == buf.len() {
            buf.resize(BATCH * BUF, 0);
        }
    }
    let (_, total) = w.finish().map_err(io)?;
    go(dev, &mut src.tracker, MigState::Stop)?;
    stats.bytes = total;
    stats.stopped_for = stopped.elapsed();
    stats.history = src.tracker.describe();
    Ok((src, stats))
}

/// Fills `batch` from the device's STOP_COPY data, [`BUF`] per read: the parts read,
/// and whether the state ended (a read returned 0).
fn read_batch<'b>(dev: &dyn MigrationDevice, batch: &'b mut [u8]) -> Result<(Vec<&'b [u8]>, bool)> {
    let mut parts = Vec::with_capacity(BATCH);
    for part in batch.chunks_mut(BUF) {
        let n = dev
            .read(part)
            .map_err(|e| fail(dev, format!("reading STOP_COPY data: {e}")))?;
        if n == 0 {
            return Ok((parts, true));
        }
        let part: &'b [u8] = part;
        parts.push(&part[..n]);
    }
    Ok((parts, false))
}

/// What an mdev's state will be described as: its type, its vendor driver and
/// that driver's version (the module's `version`, else the kernel release).
pub fn mdev_header(sys: &vf_provisioner::Sysfs, m: &crate::Mdev) -> Header {
    let driver = m.driver.clone().unwrap_or_default();
    Header {
        device_kind: "mdev".into(),
        profile: m.type_id.to_string(),
        driver_version: driver_version(sys, &driver),
        driver,
        flags: 0,
        size_hint: 0,
    }
}

/// Vendor driver `driver`'s version as a header names it: the module's `version`,
/// else the kernel release (a driver built in, or one that declares no version).
pub fn driver_version(sys: &vf_provisioner::Sysfs, driver: &str) -> String {
    let read = |p: std::path::PathBuf| vf_provisioner::sysfs::read_opt(&p);
    read(sys.module_dir(driver).join("version"))
        .or_else(|| read(sys.root().join("proc/sys/kernel/osrelease")))
        .unwrap_or_default()
}

/// Why a state described by `got` cannot be loaded into a device described by `want`.
pub fn incompatible(got: &Header, want: &Header) -> Option<String> {
    let fields = [
        ("device kind", &got.device_kind, &want.device_kind),
        ("type", &got.profile, &want.profile),
        ("driver", &got.driver, &want.driver),
        ("driver version", &got.driver_version, &want.driver_version),
    ];
    fields
        .iter()
        .find(|(_, a, b)| a != b)
        .map(|(what, a, b)| format!("the state is from {what} {a:?}, this device is {b:?}"))
}

/// Loads a stream into `dev`, which must be RUNNING and match `want`. The header is
/// checked before the device is touched. On failure the device is reset out of
/// RESUMING; if even that fails, the error says to re-create it.
pub fn load<R: Read>(dev: &dyn MigrationDevice, want: &Header, input: R) -> Result<Stats> {
    let (mut r, got) =
        StreamReader::new(input).map_err(|e| fail(dev, format!("refused the stream: {e}")))?;
    if let Some(why) = incompatible(&got, want) {
        return Err(Error::refused(
            dev.name(),
            format!("incompatible device state: {why}"),
            "migrate to a device of the same type and driver version (`vfctl migrate check`)",
        ));
    }
    let flags = check(dev)?;
    let mut t = Tracker::new(dev.name(), flags, MigState::Running);
    let started = Instant::now();
    go(dev, &mut t, MigState::Resuming)?;
    let result = (|| {
        let mut buf = Vec::with_capacity(BUF);
        while r
            .next_chunk(&mut buf)
            .map_err(|e| fail(dev, format!("stream: {e}")))?
        {
            dev.write(&buf)
                .map_err(|e| fail(dev, format!("writing the state: {e}")))?;
        }
        go(dev, &mut t, MigState::Running)
    })();
    if let Err(e) = result {
        return Err(recover(dev, e));
    }
    Ok(Stats {
        bytes: r.total(),
        precopy_bytes: 0,
        history: t.describe(),
        stopped_for: started.elapsed(),
    })
}

/// Takes a destination out of RESUMING after a failed load.
fn recover(dev: &dyn MigrationDevice, cause: Error) -> Error {
    let reset = dev.reset().and_then(|_| dev.state());
    match reset {
        Ok(MigState::Running) => cause,
        Ok(s) => fail(
            dev,
            format!("{cause}; after a reset it is in {s}: remove and re-create it"),
        ),
        Err(e) => fail(
            dev,
            format!("{cause}; resetting it failed ({e}): remove and re-create it"),
        ),
    }
}
