//! What a lease asks for when one of its devices fails (`on_failure`), and where its
//! VM can be reached to swap the device (`vmm`).

use std::fmt;
use std::str::FromStr;

use super::IdError;

/// The longest path `sockaddr_un` holds (with its terminating NUL).
const MAX_SOCKET: usize = 107;

/// What the daemon does when a leased device fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// Holds the device back and signals `LeaseDegraded`; the VM keeps it.
    Notify,
    /// Also leases a healthy equivalent, hands it to the running VM in place of the
    /// failed one, and signals `LeaseRecovered`.
    Replace,
}

impl FromStr for OnFailure {
    type Err = IdError;
    fn from_str(s: &str) -> Result<OnFailure, IdError> {
        match s {
            "notify" => Ok(OnFailure::Notify),
            "replace" => Ok(OnFailure::Replace),
            _ => Err(IdError::new("on_failure", s, "give notify or replace")),
        }
    }
}

impl fmt::Display for OnFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OnFailure::Notify => "notify",
            OnFailure::Replace => "replace",
        })
    }
}

/// How the daemon reaches a lease's running VM to swap a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Vmm {
    /// Not reachable: a replacement is leased and named in `LeaseRecovered`, and
    /// whoever runs the VM plugs it (`""`).
    Other,
    /// A libvirt domain, by the lease's VM name, through libvirt's own API
    /// (`libvirt`).
    Libvirt,
    /// cloud-hypervisor's REST API on this socket (`ch:/run/ch/vm1.sock`).
    CloudHypervisor(String),
}

impl FromStr for Vmm {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Vmm, IdError> {
        let bad = |why: &str| Err(IdError::new("vmm", s, why));
        match s {
            "" => Ok(Vmm::Other),
            "libvirt" => Ok(Vmm::Libvirt),
            _ => match s.strip_prefix("ch:") {
                None => bad("give libvirt, ch:/PATH/TO/API.SOCKET, or nothing"),
                Some(p) if !p.starts_with('/') || p.len() > MAX_SOCKET => bad(&format!(
                    "cloud-hypervisor's --api-socket is an absolute path of at most {MAX_SOCKET} bytes"
                )),
                Some(p) if p.chars().any(char::is_control) => {
                    bad("a socket path has no control characters")
                }
                Some(p) if p.split('/').any(|c| c == "..") => bad("a socket path has no '..'"),
                Some(p) => Ok(Vmm::CloudHypervisor(p.to_string())),
            },
        }
    }
}

impl fmt::Display for Vmm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Vmm::Other => Ok(()),
            Vmm::Libvirt => f.write_str("libvirt"),
            Vmm::CloudHypervisor(p) => write!(f, "ch:{p}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_spelling_round_trips() {
        for s in ["", "libvirt", "ch:/run/ch/vm1.sock"] {
            assert_eq!(s.parse::<Vmm>().unwrap().to_string(), s);
        }
        for s in ["notify", "replace"] {
            assert_eq!(s.parse::<OnFailure>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn hostile_spellings_are_refused_and_quoted() {
        let long = format!("ch:/{}", "a".repeat(200));
        for s in [
            "ch:relative.sock",
            "ch:/run/../etc/shadow",
            "ch:/run/a\nb",
            long.as_str(),
            "qemu",
            "libvirt ",
        ] {
            let e = s.parse::<Vmm>().unwrap_err().to_string();
            assert!(e.starts_with("invalid vmm"), "{e}");
            assert!(!e.contains('\n') && e.len() < 300, "{e}");
        }
        assert!("Replace".parse::<OnFailure>().is_err());
    }
}
