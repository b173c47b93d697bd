//! Where a lease's in-guest agent reaches the daemon (`agent`), and what the daemon
//! does when the lease's devices sit idle (`on_idle`).

use std::fmt;
use std::str::FromStr;

use super::IdError;

/// The longest path `sockaddr_un` holds (with its terminating NUL).
const MAX_SOCKET: usize = 107;

/// The channel a lease's agent (vm-agent in the guest) speaks on. The daemon knows
/// which VM a connection is from by the channel alone, never by what the guest
/// says.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum AgentChannel {
    /// No agent: the daemon knows who holds the devices, not how they are used.
    None,
    /// virtio-vsock, the guest's context id (`cid:N`, N >= 3): QEMU's vhost-vsock
    /// (libvirt's `<vsock><cid address='N'/>`). The daemon listens on AF_VSOCK.
    Vsock(u32),
    /// A Unix socket the daemon listens on (`unix:/PATH`): cloud-hypervisor's vsock
    /// (`--vsock cid=N,socket=S`) connects the guest's port P to `S_P`.
    Unix(String),
    /// A Unix socket the daemon connects to (`serial:/PATH`): a virtio-serial port
    /// whose chardev QEMU binds (libvirt's `<channel type='unix'>` with
    /// `mode='bind'`), for guests without vsock.
    Serial(String),
}

fn socket_path(what: &'static str, s: &str, p: &str) -> Result<String, IdError> {
    let bad = |why: &str| Err(IdError::new(what, s, why));
    if !p.starts_with('/') || p.len() > MAX_SOCKET {
        return bad(&format!(
            "a socket is an absolute path of at most {MAX_SOCKET} bytes"
        ));
    }
    if p.chars().any(char::is_control) {
        return bad("a socket path has no control characters");
    }
    if p.split('/').any(|c| c == "..") {
        return bad("a socket path has no '..'");
    }
    Ok(p.to_string())
}

impl FromStr for AgentChannel {
    type Err = IdError;
    fn from_str(s: &str) -> Result<AgentChannel, IdError> {
        if s.is_empty() {
            return Ok(AgentChannel::None);
        }
        if let Some(n) = s.strip_prefix("cid:") {
            // 0-2 are the hypervisor, local and host; u32::MAX is "any".
            return match n.parse::<u32>() {
                Ok(c) if (3..u32::MAX).contains(&c) && !n.starts_with(['0', '+']) => {
                    Ok(AgentChannel::Vsock(c))
                }
                _ => Err(IdError::new(
                    "agent",
                    s,
                    "a guest's vsock context id is a decimal number from 3 to 4294967294",
                )),
            };
        }
        if let Some(p) = s.strip_prefix("unix:") {
            return socket_path("agent", s, p).map(AgentChannel::Unix);
        }
        if let Some(p) = s.strip_prefix("serial:") {
            return socket_path("agent", s, p).map(AgentChannel::Serial);
        }
        Err(IdError::new(
            "agent",
            s,
            "give cid:N (vsock), unix:/PATH (cloud-hypervisor's vsock socket and port), serial:/PATH (a virtio-serial chardev), or nothing",
        ))
    }
}

impl fmt::Display for AgentChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentChannel::None => Ok(()),
            AgentChannel::Vsock(c) => write!(f, "cid:{c}"),
            AgentChannel::Unix(p) => write!(f, "unix:{p}"),
            AgentChannel::Serial(p) => write!(f, "serial:{p}"),
        }
    }
}

/// What the daemon does when a lease's devices have been idle past the threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnIdle {
    /// Signals `UsageAlert` (level `idle`); nothing changes.
    Notify,
    /// Asks the agent to let go, removes the device from the running VM through its
    /// VMM, and returns it to the pool; the lease records it.
    Unplug,
    /// Signals, and releases the lease when its VM stops instead of keeping it for
    /// a restart.
    ReleaseOnStop,
}

impl FromStr for OnIdle {
    type Err = IdError;
    fn from_str(s: &str) -> Result<OnIdle, IdError> {
        match s {
            "notify" => Ok(OnIdle::Notify),
            "unplug" => Ok(OnIdle::Unplug),
            "release-on-stop" => Ok(OnIdle::ReleaseOnStop),
            _ => Err(IdError::new(
                "on_idle",
                s,
                "give notify, unplug or release-on-stop",
            )),
        }
    }
}

impl fmt::Display for OnIdle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OnIdle::Notify => "notify",
            OnIdle::Unplug => "unplug",
            OnIdle::ReleaseOnStop => "release-on-stop",
        })
    }
}

/// A lease's priority class: a `high` request may take the devices of idle `low`
/// leases when too few are free.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Priority {
    Low,
    Normal,
    High,
}

impl FromStr for Priority {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Priority, IdError> {
        match s {
            "low" => Ok(Priority::Low),
            "" | "normal" => Ok(Priority::Normal),
            "high" => Ok(Priority::High),
            _ => Err(IdError::new("priority", s, "give low, normal or high")),
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_spelling_round_trips() {
        for s in [
            "",
            "cid:3",
            "cid:4294967294",
            "unix:/run/ch/vm1.vsock_22086",
            "serial:/run/a.sock",
        ] {
            assert_eq!(s.parse::<AgentChannel>().unwrap().to_string(), s);
        }
        for s in ["notify", "unplug", "release-on-stop"] {
            assert_eq!(s.parse::<OnIdle>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn hostile_spellings_are_refused_and_quoted() {
        let long = format!("unix:/{}", "a".repeat(200));
        for s in [
            "cid:2",
            "cid:0",
            "cid:1",
            "cid:4294967295",
            "cid:03",
            "cid:+3",
            "cid:-3",
            "cid:99999999999",
            "unix:relative",
            "unix:/run/../etc/shadow",
            "serial:/a\nb",
            long.as_str(),
            "vsock",
            "cid:3 ",
        ] {
            let e = s.parse::<AgentChannel>().unwrap_err().to_string();
            assert!(e.starts_with("invalid agent"), "{e}");
            assert!(!e.contains('\n') && e.len() < 400, "{e}");
        }
        assert!("Unplug".parse::<OnIdle>().is_err());
        for bad in ["urgent", "HIGH", " high"] {
            assert!(bad.parse::<Priority>().is_err(), "{bad}");
        }
        assert_eq!("".parse::<Priority>().unwrap(), Priority::Normal);
    }
}
