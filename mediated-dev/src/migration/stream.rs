//! The device-state stream: versioned, checksummed, self-describing.
//!
//! ```text
//! header   "VFMSTATE" | version u16 | header length u32 | header JSON | xxh3 u64
//! chunk    0x01 | length u32 | xxh3 of the bytes u64 | bytes     (repeated)
//! trailer  0xFF | total bytes u64 | chunk count u32 | xxh3 of the chunks' hashes u64
//! ```
//! Integers are little-endian; the checksums are XXH3-64 (one pass over each byte,
//! several times faster than CRC32 here, so the stream keeps up with the network;
//! AVX2 where the CPU has it, chosen at run time).
//! The trailer's hash over the chunks' hashes catches a lost or reordered chunk. The header names what produced the state (device
//! kind, mdev type or vendor profile, driver, driver version, size) so the
//! destination can refuse an incompatible state before it touches its device.

use std::io::{self, Read, Write};

use std::hash::Hasher as _;

use serde::{Deserialize, Serialize};
use twox_hash::XxHash3_64;

pub const MAGIC: &[u8; 8] = b"VFMSTATE";
pub const VERSION: u16 = 2;
const CHUNK: u8 = 0x01;
const TRAILER: u8 = 0xFF;
/// The largest chunk a reader accepts (a corrupt length must not allocate gigabytes).
pub const MAX_CHUNK: usize = 16 << 20;
const MAX_HEADER: usize = 64 << 10;
/// Bytes in the trailer record, tag included.
pub const TRAILER_LEN: usize = 21;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// `mdev` or `vfio-pci`.
    pub device_kind: String,
    /// The mdev type (`mtty-2`) or the vendor's profile (a vGPU type name).
    pub profile: String,
    /// The vendor driver on the source (`mtty`, `nvidia-vgpu-vfio`).
    pub driver: String,
    /// The vendor driver's version (the kernel release for in-tree drivers).
    pub driver_version: String,
    /// `VFIO_MIGRATION_*` flags of the source device.
    pub flags: u64,
    /// The size the source expected to send (`VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`), 0 if unknown.
    pub size_hint: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("the stream ended early ({0})")]
    Truncated(&'static str),
    #[error("the stream is corrupt: {0}")]
    Corrupt(String),
    #[error(
        "the stream's format version {0} is not supported (this build reads version {VERSION})"
    )]
    Version(u16),
    #[error(transparent)]
    Io(io::Error),
}

impl From<io::Error> for StreamError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            StreamError::Truncated("connection closed or file cut")
        } else {
            StreamError::Io(e)
        }
    }
}

pub struct StreamWriter<W: Write> {
    out: W,
    total: u64,
    chunks: u32,
    hashes: XxHash3_64,
}

impl<W: Write> StreamWriter<W> {
    pub fn new(mut out: W, header: &Header) -> io::Result<Self> {
        let json = serde_json::to_vec(header).map_err(io::Error::other)?;
        let mut head = Vec::with_capacity(json.len() + 18);
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&VERSION.to_le_bytes());
        head.extend_from_slice(&(json.len() as u32).to_le_bytes());
        head.extend_from_slice(&json);
        out.write_all(&head)?;
        out.write_all(&checksum(&head).to_le_bytes())?;
        Ok(StreamWriter {
            out,
            total: 0,
            chunks: 0,
            hashes: XxHash3_64::new(),
        })
    }

    pub fn chunk(&mut self, data: &[u8]) -> io::Result<()> {
        self.chunks(&data.chunks(MAX_CHUNK).collect::<Vec<_>>())
    }

    /// One chunk per part (each at most [`MAX_CHUNK`]), all in one `writev` where
    /// the sink passes it through (a `BufWriter` smaller than the parts does): no
    /// copy of the data in user space, one system call for several chunks.
    pub fn chunks(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        let heads: Vec<[u8; 13]> = parts.iter().map(|part| self.record(part)).collect();
        let mut iov: Vec<io::IoSlice> = heads
            .iter()
            .zip(parts)
            .flat_map(|(head, part)| [io::IoSlice::new(head), io::IoSlice::new(part)])
            .collect();
        let mut iov = &mut iov[..];
        while !iov.is_empty() {
            let n = self.out.write_vectored(iov)?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            io::IoSlice::advance_slices(&mut iov, n);
        }
        Ok(())
    }

    /// Counts `part` into the trailer and returns its record header.
    fn record(&mut self, part: &[u8]) -> [u8; 13] {
        assert!(part.len() <= MAX_CHUNK, "a chunk of {} bytes", part.len());
        let hash = checksum(part).to_le_bytes();
        let mut head = [0u8; 13];
        head[0] = CHUNK;
        head[1..5].copy_from_slice(&(part.len() as u32).to_le_bytes());
        head[5..13].copy_from_slice(&hash);
        self.hashes.write(&hash);
        self.total += part.len() as u64;
        self.chunks += 1;
        head
    }

    /// Writes the trailer and returns the sink and the bytes of state sent.
    pub fn finish(mut self) -> io::Result<(W, u64)> {
        let mut t = [0u8; TRAILER_LEN];
        t[0] = TRAILER;
        t[1..9].copy_from_slice(&self.total.to_le_bytes());
        t[9..13].copy_from_slice(&self.chunks.to_le_bytes());
        t[13..21].copy_from_slice(&self.hashes.finish().to_le_bytes());
        self.out.write_all(&t)?;
        self.out.flush()?;
        Ok((self.out, self.total))
    }
}

/// A chunk's (or the header's) checksum.
fn checksum(data: &[u8]) -> u64 {
    XxHash3_64::oneshot(data)
}

pub struct StreamReader<R: Read> {
    input: R,
    total: u64,
    chunks: u32,
    hashes: XxHash3_64,
    done: bool,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl<R: Read> StreamReader<R> {
    /// Reads and checks the header.
    pub fn new(mut input: R) -> Result<(Self, Header), StreamError> {
        let mut fixed = [0u8; 14];
        input.read_exact(&mut fixed)?;
        if &fixed[..8] != MAGIC {
            return Err(StreamError::Corrupt(
                "it does not start with VFMSTATE".into(),
            ));
        }
        let version = u16::from_le_bytes([fixed[8], fixed[9]]);
        if version != VERSION {
            return Err(StreamError::Version(version));
        }
        let len = u32_at(&fixed, 10) as usize;
        if len > MAX_HEADER {
            return Err(StreamError::Corrupt(format!("header length {len}")));
        }
        let mut rest = vec![0u8; len + 8];
        input.read_exact(&mut rest)?;
        let mut h = XxHash3_64::new();
        h.write(&fixed);
        h.write(&rest[..len]);
        if h.finish() != u64_at(&rest, len) {
            return Err(StreamError::Corrupt("header checksum mismatch".into()));
        }
        let header: Header = serde_json::from_slice(&rest[..len])
            .map_err(|e| StreamError::Corrupt(format!("header: {e}")))?;
        let reader = StreamReader {
            input,
            total: 0,
            chunks: 0,
            hashes: XxHash3_64::new(),
            done: false,
        };
        Ok((reader, header))
    }

    /// The next chunk into `buf`; `Ok(false)` after a verified trailer.
    pub fn next_chunk(&mut self, buf: &mut Vec<u8>) -> Result<bool, StreamError> {
        if self.done {
            return Ok(false);
        }
        // A chunk's record header and the start of the trailer in one read: the
        // trailer is longer than a chunk's header, so 13 bytes are always there.
        let mut h = [0u8; 13];
        self.input.read_exact(&mut h)?;
        match h[0] {
            CHUNK => {
                let len = u32_at(&h, 1) as usize;
                if len > MAX_CHUNK {
                    return Err(StreamError::Corrupt(format!(
                        "chunk {} length {len}",
                        self.chunks
                    )));
                }
                buf.resize(len, 0);
                self.input.read_exact(buf)?;
                if checksum(buf) != u64_at(&h, 5) {
                    return Err(StreamError::Corrupt(format!(
                        "chunk {} checksum mismatch",
                        self.chunks
                    )));
                }
                self.hashes.write(&h[5..13]);
                self.total += len as u64;
                self.chunks += 1;
                Ok(true)
            }
            TRAILER => {
                let mut t = [0u8; TRAILER_LEN];
                t[..13].copy_from_slice(&h);
                self.input.read_exact(&mut t[13..])?;
                let ok = u64_at(&t, 1) == self.total
                    && u32_at(&t, 9) == self.chunks
                    && u64_at(&t, 13) == self.hashes.finish();
                if !ok {
                    return Err(StreamError::Corrupt(
                        "the trailer does not match the chunks received".into(),
                    ));
                }
                self.done = true;
                buf.clear();
                Ok(false)
            }
            other => Err(StreamError::Corrupt(format!(
                "unknown record tag {other:#x}"
            ))),
        }
    }

    pub fn total(&self) -> u64 {
        self.total
    }
}
