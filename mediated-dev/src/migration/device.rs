//! The hardware seam for migration: a device that can be moved between migration
//! states and read or written through its data fd. [`VfioMigration`] is a real
//! VFIO device (an mdev or a vfio-pci function) opened through its group;
//! [`MemoryDevice`] keeps its state in memory and answers like the kernel does (invalid
//! arcs fail with EINVAL, the data fd exists only in streaming states, a short
//! state fails the RESUMING -> STOP load) for tests and the throughput benchmark.

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::{Arc, Mutex};

use vfio_ioctls::{VfioContainer, VfioDevice};

use super::state::{path, MigState, PRE_COPY, STOP_COPY};
use crate::error::{Error, Result};

pub trait MigrationDevice: Send + Sync {
    /// A name for messages (the mdev UUID or PCI address).
    fn name(&self) -> &str;
    /// `VFIO_MIGRATION_*` flags; `None` if the device cannot migrate.
    fn flags(&self) -> io::Result<Option<u64>>;
    fn state(&self) -> io::Result<MigState>;
    /// Moves to `to`; the kernel walks multi-arc paths itself.
    fn set_state(&self, to: MigState) -> io::Result<()>;
    /// Reads device state from the data fd (0 = end of the state).
    fn read(&self, buf: &mut [u8]) -> io::Result<usize>;
    fn write(&self, data: &[u8]) -> io::Result<()>;
    /// PRE_COPY's `VFIO_MIG_GET_PRECOPY_INFO`: (initial bytes, dirty bytes).
    fn precopy_info(&self) -> io::Result<(u64, u64)>;
    /// `VFIO_DEVICE_RESET`: the way out of a failed RESUMING (mtty returns to RUNNING).
    fn reset(&self) -> io::Result<()>;
    /// `VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`: the driver's estimate of the state to
    /// move after the stop (what the downtime carries); 0 when it gives none.
    fn data_size(&self) -> io::Result<u64> {
        Ok(0)
    }
}

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// A real device, opened through its VFIO group (the container API; Debian's 6.12
/// has no IOMMUFD). Only one process can hold a group: a device a VMM holds is
/// migrated by that VMM, through this same code linked in or over D-Bus.
pub struct VfioMigration {
    name: String,
    device: VfioDevice,
    _container: Arc<VfioContainer>,
}

impl VfioMigration {
    /// Opens the device at `sysfs_path` (`/sys/bus/mdev/devices/<uuid>` or a
    /// vfio-pci function's directory).
    pub fn open(sysfs_path: &Path, name: &str) -> Result<Self> {
        let vfio = |what: &str, e: vfio_ioctls::VfioError| Error::Vfio {
            device: name.into(),
            what: what.into(),
            source: Box::new(e),
        };
        let container =
            Arc::new(VfioContainer::new(None).map_err(|e| vfio("opening /dev/vfio/vfio", e))?);
        let device = VfioDevice::new(sysfs_path, container.clone(), false)
            .map_err(|e| vfio("opening the device through its group", e))?;
        Ok(VfioMigration {
            name: name.into(),
            device,
            _container: container,
        })
    }

    /// Reads `buf.len()` bytes of a device region (mtty: BAR0 holds the ports).
    pub fn region_read(&self, index: u32, buf: &mut [u8], offset: u64) {
        self.device.region_read(index, buf, offset)
    }

    pub fn region_write(&self, index: u32, buf: &[u8], offset: u64) {
        self.device.region_write(index, buf, offset)
    }
}

impl MigrationDevice for VfioMigration {
    fn name(&self) -> &str {
        &self.name
    }

    fn flags(&self) -> io::Result<Option<u64>> {
        self.device.query_migration_support().map_err(other)
    }

    fn state(&self) -> io::Result<MigState> {
        let raw = self.device.get_migration_state().map_err(other)?;
        MigState::from_raw(raw).ok_or_else(|| other(format!("unknown migration state {raw}")))
    }

    fn set_state(&self, to: MigState) -> io::Result<()> {
        self.device.set_migration_state(to as u32).map_err(other)
    }

    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.device.read_migration_data(buf).map_err(other)
    }

    fn write(&self, data: &[u8]) -> io::Result<()> {
        self.device.write_migration_data(data).map_err(other)
    }

    fn precopy_info(&self) -> io::Result<(u64, u64)> {
        let i = self.device.mig_get_precopy_info().map_err(other)?;
        Ok((i.initial_bytes, i.dirty_bytes))
    }

    fn data_size(&self) -> io::Result<u64> {
        self.device.get_mig_data_size().map_err(other)
    }

    fn reset(&self) -> io::Result<()> {
        // _IO(VFIO_TYPE, VFIO_BASE + 11). vfio-ioctls only resets devices that
        // advertise VFIO_DEVICE_FLAGS_RESET; mtty handles the ioctl without it.
        const VFIO_DEVICE_RESET: libc::c_ulong = (59 << 8) | (100 + 11);
        // SAFETY: the fd is this device's open VFIO device fd, owned by `self.device`
        // for the whole call; VFIO_DEVICE_RESET takes no argument and touches no memory
        // of ours.
        let rc = unsafe { libc::ioctl(self.device.as_raw_fd(), VFIO_DEVICE_RESET) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

struct Mem {
    state: MigState,
    /// The device's state (what a save reads, what a load replaces).
    data: Vec<u8>,
    /// Save: read position. Resume: bytes received.
    pos: usize,
    incoming: Vec<u8>,
}

/// A device whose state lives in memory, behaving like mtty's migration driver.
pub struct MemoryDevice {
    name: String,
    flags: u64,
    inner: Mutex<Mem>,
}

impl MemoryDevice {
    pub fn new(name: &str, flags: u64, data: Vec<u8>) -> Self {
        MemoryDevice {
            name: name.into(),
            flags,
            inner: Mutex::new(Mem {
                state: MigState::Running,
                data,
                pos: 0,
                incoming: Vec::new(),
            }),
        }
    }

    /// A device with STOP_COPY and PRE_COPY, as mtty reports (flags 0x7 there).
    pub fn mtty_like(name: &str, data: Vec<u8>) -> Self {
        Self::new(name, STOP_COPY | PRE_COPY | super::state::P2P, data)
    }

    pub fn data(&self) -> Vec<u8> {
        self.inner.lock().expect("device lock").data.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Mem> {
        self.inner.lock().expect("device lock")
    }
}

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

impl MigrationDevice for MemoryDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn flags(&self) -> io::Result<Option<u64>> {
        Ok(Some(self.flags))
    }

    fn state(&self) -> io::Result<MigState> {
        Ok(self.lock().state)
    }

    fn set_state(&self, to: MigState) -> io::Result<()> {
        let mut m = self.lock();
        let walk = path(m.state, to, self.flags).ok_or_else(|| errno(libc::EINVAL))?;
        for next in walk.into_iter().skip(1) {
            match (m.state, next) {
                (MigState::Resuming, MigState::Stop) => {
                    // mtty_load_state: a short state is refused and the device stays.
                    if m.incoming.len() != m.data.len() {
                        return Err(errno(libc::EINVAL));
                    }
                    m.data = std::mem::take(&mut m.incoming);
                }
                (_, MigState::Resuming) => {
                    m.incoming.clear();
                    let want = m.data.len();
                    m.incoming.reserve(want);
                }
                (from, MigState::StopCopy | MigState::PreCopy | MigState::PreCopyP2p)
                    if !from.streams() =>
                {
                    m.pos = 0
                }
                _ => {}
            }
            m.state = next;
        }
        Ok(())
    }

    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut m = self.lock();
        if !matches!(
            m.state,
            MigState::StopCopy | MigState::PreCopy | MigState::PreCopyP2p
        ) {
            return Err(errno(libc::EBADF));
        }
        let n = buf.len().min(m.data.len() - m.pos);
        let start = m.pos;
        buf[..n].copy_from_slice(&m.data[start..start + n]);
        m.pos += n;
        Ok(n)
    }

    fn write(&self, data: &[u8]) -> io::Result<()> {
        let mut m = self.lock();
        if m.state != MigState::Resuming {
            return Err(errno(libc::EBADF));
        }
        m.incoming.extend_from_slice(data);
        Ok(())
    }

    fn precopy_info(&self) -> io::Result<(u64, u64)> {
        let m = self.lock();
        if !matches!(m.state, MigState::PreCopy | MigState::PreCopyP2p) {
            return Err(errno(libc::EINVAL));
        }
        Ok(((m.data.len() - m.pos) as u64, 0))
    }

    fn data_size(&self) -> io::Result<u64> {
        Ok(self.lock().data.len() as u64)
    }

    fn reset(&self) -> io::Result<()> {
        let mut m = self.lock();
        m.state = MigState::Running;
        m.incoming.clear();
        Ok(())
    }
}
