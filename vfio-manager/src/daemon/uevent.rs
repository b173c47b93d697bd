//! Kernel uevents for the subsystems whose devices we track (pci, mdev, vfio), read
//! through libudev (the `udev` crate). The monitor listens to the kernel's own
//! multicast group, not udevd's: it works on hosts and in guests without udevd, and
//! libudev disables a udev-group monitor where udevd is not running. Nothing is
//! lost by not waiting for udevd's rules: every event is followed by a re-read of
//! sysfs, never by a use of a device node udev may still be setting up.

use std::io;
use std::os::fd::AsRawFd;

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

    /// The daemon's view of a libudev event; `None` for an event without an action.
    fn from_udev(ev: &udev::Event) -> Option<Uevent> {
        let text = |v: Option<&std::ffi::OsStr>| v.and_then(|s| s.to_str()).map(str::to_string);
        Some(Uevent {
            action: text(ev.action())?,
            subsystem: text(ev.subsystem())?,
            devpath: text(Some(ev.devpath()))?,
            error_event: text(ev.property_value("ERROR_EVENT")),
            at: std::time::Instant::now(),
        })
    }
}

/// Reads events on a thread of its own and hands each to `each` until it returns
/// false. The monitor is opened on that thread (libudev's handles are not `Send`);
/// an error opening it is returned here.
pub fn follow(mut each: impl FnMut(Uevent) -> bool + Send + 'static) -> io::Result<()> {
    let (opened, result) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let listener = match Listener::open() {
            Ok(l) => l,
            Err(e) => return drop(opened.send(Err(e))),
        };
        let _ = opened.send(Ok(()));
        while let Ok(ev) = listener.next() {
            if !each(ev) {
                break;
            }
        }
    });
    result
        .recv()
        .unwrap_or_else(|_| Err(io::Error::other("the uevent thread ended")))
}

/// A libudev monitor of the kernel's uevents, filtered in the kernel (a socket
/// filter libudev installs) to the tracked subsystems.
struct Listener {
    socket: udev::MonitorSocket,
}

impl Listener {
    fn open() -> io::Result<Listener> {
        let mut monitor = udev::MonitorBuilder::new_kernel()?;
        for s in SUBSYSTEMS {
            monitor = monitor.match_subsystem(s)?;
        }
        Ok(Listener {
            socket: monitor.listen()?,
        })
    }

    /// Blocks for the next event of a tracked subsystem. libudev's socket does not
    /// block, so this waits in poll(2) until it is readable.
    fn next(&self) -> io::Result<Uevent> {
        loop {
            if let Some(ev) = self.socket.iter().find_map(|e| Uevent::from_udev(&e)) {
                return Ok(ev);
            }
            let mut fd = libc::pollfd {
                fd: self.socket.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: `fd` is one valid pollfd that lives across the call.
            if unsafe { libc::poll(&mut fd, 1, -1) } < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// A real kernel event through libudev: a synthetic `change` written to a PCI
    /// device's `uevent` attribute (harmless: udevd, where it runs, re-applies its
    /// rules). It needs root and a PCI device; without them it says so and passes.
    #[test]
    fn reads_a_real_kernel_pci_event() {
        let Some(Ok(dev)) = std::fs::read_dir("/sys/bus/pci/devices")
            .ok()
            .and_then(|mut d| d.next())
        else {
            eprintln!("SKIP reads_a_real_kernel_pci_event: this machine shows no PCI device");
            return;
        };
        let dev = dev.file_name().into_string().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        super::follow(move |ev| tx.send(ev).is_ok()).expect("a libudev kernel monitor");
        let path = format!("/sys/bus/pci/devices/{dev}/uevent");
        if let Err(e) = std::fs::write(&path, "change") {
            eprintln!("SKIP reads_a_real_kernel_pci_event: cannot write {path} ({e}); run as root");
            return;
        }
        let ev = std::iter::from_fn(|| rx.recv_timeout(std::time::Duration::from_secs(10)).ok())
            .find(|e| e.device() == dev)
            .expect("the change event");
        assert_eq!(
            (ev.action.as_str(), ev.subsystem.as_str()),
            ("change", "pci")
        );
        assert_eq!(ev.error_event, None);
    }
}
