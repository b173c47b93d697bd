//! Kernel uevents for the subsystems whose devices we track (pci, mdev, vfio), read
//! from a NETLINK_KOBJECT_UEVENT socket. The kernel's own multicast group is used,
//! not udevd's, so this works on hosts and in guests without udevd.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const SUBSYSTEMS: &[&str] = &["pci", "mdev", "vfio"];

/// One event: `add`/`remove`/`bind`/`unbind`/`change` and the device path; for
/// the `change` events of PCIe error recovery (kernel rule 12, docs/kernel.md),
/// `ERROR_EVENT` (BEGIN_RECOVERY, SUCCESSFUL_RECOVERY, FAILED_RECOVERY). Their
/// `DEVICE_ONLINE` is not kept: it is 0 at BEGIN_RECOVERY as at FAILED_RECOVERY.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uevent {
    pub action: String,
    pub subsystem: String,
    pub devpath: String,
    pub error_event: Option<String>,
    /// When it was read: the start of the daemon's reaction time.
    pub at: std::time::Instant,
}

impl Uevent {
    /// The device's name: the last component of its path (a PCI address, an mdev
    /// UUID).
    pub fn device(&self) -> &str {
        self.devpath.rsplit('/').next().unwrap_or_default()
    }
}

pub struct Listener {
    fd: OwnedFd,
}

impl Listener {
    pub fn open() -> io::Result<Listener> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                libc::NETLINK_KOBJECT_UEVENT,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_nl is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = 1; // the kernel's uevent group
                            // SAFETY: `addr` lives across the call and the length is its size.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::addr_of!(addr).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Listener { fd })
    }

    /// Blocks for the next event of a tracked subsystem.
    pub fn next(&self) -> io::Result<Uevent> {
        let mut buf = vec![0u8; 8192];
        loop {
            // SAFETY: `buf` is valid for `buf.len()` bytes for the whole call.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if let Some(ev) = parse(&buf[..n as usize]) {
                return Ok(ev);
            }
        }
    }
}

/// Parses `ACTION@DEVPATH\0KEY=VALUE\0...`; `None` for other subsystems or noise.
pub fn parse(msg: &[u8]) -> Option<Uevent> {
    let mut action = None;
    let mut subsystem = None;
    let mut devpath = None;
    let mut error_event = None;
    for field in msg
        .split(|b| *b == 0)
        .filter_map(|f| std::str::from_utf8(f).ok())
    {
        if let Some((k, v)) = field.split_once('=') {
            match k {
                "ACTION" => action = Some(v.to_string()),
                "SUBSYSTEM" => subsystem = Some(v.to_string()),
                "DEVPATH" => devpath = Some(v.to_string()),
                "ERROR_EVENT" => error_event = Some(v.to_string()),
                _ => {}
            }
        }
    }
    let subsystem = subsystem.filter(|s| SUBSYSTEMS.contains(&s.as_str()))?;
    Some(Uevent {
        action: action?,
        subsystem,
        devpath: devpath?,
        error_event,
        at: std::time::Instant::now(),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_a_kernel_pci_event_and_skips_others() {
        let m = b"add@/devices/pci0000:00/0000:00:02.0/0000:01:10.0\0ACTION=add\0DEVPATH=/devices/pci0000:00/0000:00:02.0/0000:01:10.0\0SUBSYSTEM=pci\0PCI_ID=8086:10CA\0SEQNUM=1\0";
        let e = super::parse(m).unwrap();
        assert_eq!((e.action.as_str(), e.subsystem.as_str()), ("add", "pci"));
        assert!(e.devpath.ends_with("0000:01:10.0"));
        assert!(super::parse(b"add@/x\0ACTION=add\0DEVPATH=/x\0SUBSYSTEM=net\0").is_none());
    }

    #[test]
    fn reads_the_error_recovery_keys_of_a_change_event() {
        let m = b"change@/devices/pci0000:00/0000:00:1c.0/0000:01:00.0\0ACTION=change\0DEVPATH=/devices/pci0000:00/0000:00:1c.0/0000:01:00.0\0SUBSYSTEM=pci\0ERROR_EVENT=FAILED_RECOVERY\0DEVICE_ONLINE=0\0SEQNUM=7\0";
        let e = super::parse(m).unwrap();
        assert_eq!(e.device(), "0000:01:00.0");
        assert_eq!(e.error_event.as_deref(), Some("FAILED_RECOVERY"));
    }
}
