//! The name-like identities: each a string checked once by its constructor.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::IdError;

/// The longest mdev parent or type name accepted. The kernel's are a PCI address
/// (12 bytes), a driver's device name (`mtty`) or `<driver>-<type>`
/// (`nvidia-563`, `i915-GVTg_V5_8`); 64 leaves room and bounds every message.
pub const MAX_NAME: usize = 64;

fn check_len(what: &'static str, s: &str, max: usize) -> Result<(), IdError> {
    if s.is_empty() || s.len() > max {
        return Err(IdError::new(what, s, format!("give 1 to {max} characters")));
    }
    Ok(())
}

fn check_chars(
    what: &'static str,
    s: &str,
    ok: fn(char) -> bool,
    rule: &str,
) -> Result<(), IdError> {
    match s.chars().find(|c| !ok(*c)) {
        Some(c) => Err(IdError::new(
            what,
            s,
            format!("{c:?} is not allowed; {rule}"),
        )),
        None => Ok(()),
    }
}

/// One path component: 1-64 of `A-Z a-z 0-9 . _ : + -`, not starting with `.`
/// (so never `.` or `..`), never `/` or a control character.
fn path_component(what: &'static str, s: &str) -> Result<(), IdError> {
    check_len(what, s, MAX_NAME)?;
    if s.starts_with('.') {
        return Err(IdError::new(what, s, "a name may not start with '.'"));
    }
    check_chars(
        what,
        s,
        |c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '+' | '-'),
        "a name is one path component of letters, digits and . _ : + -",
    )
}

fn mdev_parent(s: &str) -> Result<(), IdError> {
    path_component("mdev parent", s)
}

fn mdev_type(s: &str) -> Result<(), IdError> {
    path_component("mdev type", s)
}

fn driver_name(s: &str) -> Result<(), IdError> {
    path_component("driver", s)
}

/// A vendor attribute's name from an mdevctl definition: written as a file under
/// the new mdev's directory, so one path component too.
pub fn check_mdev_attribute(s: &str) -> Result<(), IdError> {
    path_component("mdev attribute", s)
}

fn profile(s: &str) -> Result<(), IdError> {
    check_len("profile", s, 64)?;
    check_chars(
        "profile",
        s,
        |c| !c.is_control(),
        "use `vf`, a PF model id vvvv:dddd, or an mdev or vGPU type",
    )
}

fn request_id(s: &str) -> Result<(), IdError> {
    check_len("request id", s, 128)?;
    check_chars(
        "request id",
        s,
        |c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '@' | '+' | '=' | '-'),
        "a request id is letters, digits and . _ : @ + = -",
    )
}

fn lease_id(s: &str) -> Result<(), IdError> {
    if s.len() != 16 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(IdError::new(
            "lease id",
            s,
            "a lease id is 16 lowercase hex digits, as `vfctl leases` shows it",
        ));
    }
    Ok(())
}

fn vm_name(s: &str) -> Result<(), IdError> {
    check_len("VM name", s, 256)?;
    check_chars(
        "VM name",
        s,
        |c| c != '/' && !c.is_control(),
        "a VM name has no '/' (libvirt's rule) and no control characters",
    )
}

fn endpoint(s: &str) -> Result<(), IdError> {
    check_len("endpoint", s, 261)?;
    check_chars(
        "endpoint",
        s,
        |c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'),
        "give HOST:PORT (a name, an IPv4 address or a [bracketed] IPv6 address)",
    )?;
    let port = s.rsplit_once(':').map(|(_, p)| p);
    match port.and_then(|p| p.parse::<u16>().ok()) {
        Some(_) => Ok(()),
        None => Err(IdError::new(
            "endpoint",
            s,
            "it must end with :PORT (0-65535)",
        )),
    }
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $check:path) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn new(s: &str) -> Result<Self, IdError> {
                $check(s)?;
                Ok($name(s.to_string()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                $check(&s)?;
                Ok($name(s))
            }
        }

        impl std::str::FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                $name::new(s)
            }
        }

        impl From<$name> for String {
            fn from(n: $name) -> String {
                n.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<std::path::Path> for $name {
            fn as_ref(&self) -> &std::path::Path {
                std::path::Path::new(&self.0)
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

name_type!(
    /// An mdev parent: a device under `/sys/class/mdev_bus/` (a PCI address or a
    /// name such as `mtty`), and a directory under `/etc/mdevctl.d/`.
    MdevParent,
    mdev_parent
);

name_type!(
    /// An mdev type id: a directory under a parent's `mdev_supported_types/`.
    MdevTypeId,
    mdev_type
);

name_type!(
    /// A kernel driver's name (`mtty`, `nvidia-vgpu-vfio`): a directory under
    /// `/sys/module/` when it is a module.
    DriverName,
    driver_name
);

name_type!(
    /// What a lease asks for: `vf`, a PF model `vvvv:dddd`, an mdev type (id or
    /// name) or a vGPU type (name or id). Only compared, never a path.
    Profile,
    profile
);

name_type!(
    /// A client's idempotency key: the same id returns the same lease. Its own
    /// namespace: it is never looked up as a lease id.
    RequestId,
    request_id
);

name_type!(
    /// A lease's id, made by the daemon (16 hex digits from the kernel's random
    /// source). Its own namespace: it is never looked up as a request id.
    LeaseId,
    lease_id
);

name_type!(
    /// A VM's name as libvirt or the caller gives it.
    VmName,
    vm_name
);

name_type!(
    /// Where a migration stream goes or is received: `HOST:PORT`.
    Endpoint,
    endpoint
);

/// A UUID in the one form the kernel and mdevctl write (lowercase, hyphenated).
pub fn parse_uuid(s: &str) -> Result<Uuid, IdError> {
    let bad = |reason: &str| IdError::new("mdev UUID", s, reason);
    if s.len() != 36 || s.chars().filter(|c| *c == '-').count() != 4 {
        return Err(bad(
            "expected the form 8-4-4-4-12 hex digits, e.g. 83b8f4f2-509f-382f-3c1e-e6bfe0fa1001",
        ));
    }
    let u = Uuid::parse_str(s).map_err(|e| bad(&e.to_string()))?;
    if u.to_string() != s.to_ascii_lowercase() {
        return Err(bad("not a hyphenated UUID"));
    }
    Ok(u)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_names_are_accepted() {
        for p in [
            "mtty",
            "0000:3b:00.0",
            "i915-GVTg_V5_8",
            "nvidia-563",
            "a+b",
        ] {
            assert_eq!(MdevParent::new(p).unwrap().as_str(), p);
            assert_eq!(MdevTypeId::new(p).unwrap().as_str(), p);
        }
    }

    #[test]
    fn names_that_would_leave_their_directory_are_refused() {
        let long = "a".repeat(MAX_NAME + 1);
        for bad in [
            "",
            ".",
            "..",
            "../mtty",
            "mtty/..",
            "/etc",
            "a/b",
            ".hidden",
            "a\0b",
            "a\nb",
            "a b",
            "mtty\u{202e}",
            &long,
        ] {
            let e = MdevParent::new(bad).unwrap_err();
            assert_eq!(e.what, "mdev parent", "{bad:?}: {e}");
            assert!(MdevTypeId::new(bad).is_err(), "{bad:?}");
            assert!(check_mdev_attribute(bad).is_err(), "{bad:?}");
            let json = serde_json::to_string(bad).unwrap();
            assert!(serde_json::from_str::<MdevTypeId>(&json).is_err());
        }
    }

    #[test]
    fn a_refusal_quotes_a_bounded_part_of_the_input() {
        // Found by the `ids` fuzz target: 80 control characters, each escaped to six
        // bytes, made a message of over 600.
        let escapes = format!("\u{32c}{}", "\u{17}".repeat(500));
        for e in [
            Endpoint::new(&escapes).unwrap_err(),
            VmName::new(&escapes).unwrap_err(),
            MdevParent::new(&"x".repeat(1 << 20)).unwrap_err(),
            VmName::new(&"x".repeat(1 << 20)).unwrap_err(),
            RequestId::new(&"\n".repeat(1 << 20)).unwrap_err(),
        ] {
            assert!(e.to_string().len() < 300, "{} bytes", e.to_string().len());
        }
    }

    #[test]
    fn request_and_lease_ids_and_vm_names_refuse_what_could_forge_output() {
        for bad in [
            "",
            "a b",
            "a\nb",
            "a\u{1b}[2J",
            "<x/>",
            "a'b",
            "a/b",
            &"r".repeat(129),
        ] {
            assert!(RequestId::new(bad).is_err(), "{bad:?}");
        }
        for ok in [
            "libvirt-4dea22b3-1d52-d8f3-2516-782e98ab3fa0-1a2b",
            "job@42",
            "b1",
        ] {
            RequestId::new(ok).unwrap();
        }
        for bad in [
            "",
            "0123456789abcde",
            "0123456789ABCDEF",
            "0123456789abcdef0",
            "../../../../etc/x",
        ] {
            assert!(LeaseId::new(bad).is_err(), "{bad:?}");
        }
        LeaseId::new("0123456789abcdef").unwrap();
        for bad in ["", "a/b", "vm\n<hostdev>", "vm\u{7f}", &"v".repeat(257)] {
            assert!(VmName::new(bad).is_err(), "{bad:?}");
        }
        // libvirt allows these in a domain name; so do we (they are escaped on output).
        for ok in ["vm1", "web <prod> & 'db'", "виртуалка"] {
            VmName::new(ok).unwrap();
        }
    }

    #[test]
    fn endpoints_are_host_and_port_only() {
        for ok in ["127.0.0.1:0", "[::1]:7000", "dst-host.example:49152"] {
            Endpoint::new(ok).unwrap();
        }
        for bad in [
            "",
            "127.0.0.1",
            "host:99999",
            "a b:1",
            "x\n:1",
            "h/../:1",
            &"h".repeat(300),
        ] {
            assert!(Endpoint::new(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn uuids_are_strict() {
        for bad in [
            "",
            "83b8f4f2509f382f3c1ee6bfe0fa1001",
            "{83b8f4f2-509f-382f-3c1e-e6bfe0fa1001}",
            "83b8f4f2-509f-382f-3c1e-e6bfe0fa100",
            "../../../../../../../../../../../etc",
        ] {
            assert!(parse_uuid(bad).is_err(), "{bad:?}");
        }
        assert!(parse_uuid("83B8F4F2-509F-382F-3C1E-E6BFE0FA1001").is_ok());
    }
}
