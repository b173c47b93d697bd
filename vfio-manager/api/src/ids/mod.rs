//! Typed identities: every name that enters from outside (D-Bus arguments, `vfctl`
//! arguments, hook XML, the configuration, mdevctl files, the migration header) is
//! one of these before anything uses it. Each constructor refuses anything else
//! with an [`IdError`] (a `BadInput`) quoting a bounded part of the input, so no
//! unchecked string is ever joined into a path, written into XML or a table, or
//! used to look a lease up.
//!
//! | type          | accepted                                                     | at most |
//! |---------------|--------------------------------------------------------------|---------|
//! | [`PciAddress`]| `dddd:bb:dd.f` or `bb:dd.f` (hex; device <= 1f, function <= 7) | 12 bytes |
//! | mdev UUID     | [`parse_uuid`]: hyphenated 8-4-4-4-12 hex, as the kernel writes it | 36 bytes |
//! | [`MdevParent`]| one path component: letters, digits, `. _ : + -`, not starting with `.` | 64 bytes |
//! | [`MdevTypeId`]| the same                                                     | 64 bytes |
//! | [`Profile`]   | `vf`, `vvvv:dddd`, an mdev type id or name, a vGPU type name or id: printable, no control characters | 64 bytes |
//! | [`RequestId`] | letters, digits, `. _ : @ + = -`                             | 128 bytes |
//! | [`LeaseId`]   | 16 lowercase hex digits (the daemon makes them)              | 16 bytes |
//! | [`VmName`]    | libvirt's rule (no `/`), and no control characters           | 256 bytes |
//! | [`Endpoint`]  | `HOST:PORT`: a name, IPv4 or [IPv6] address, and a port       | 261 bytes |
//! | [`OnFailure`] | `notify` or `replace`                                        | 7 bytes |
//! | [`Vmm`]       | empty, `libvirt`, or `ch:` and an absolute socket path without `..` or control characters | 110 bytes |
//! | [`AgentChannel`] | empty, `cid:N` (3 to 2^32-2), `unix:` or `serial:` and such a socket path | 114 bytes |
//! | [`OnIdle`]    | `notify`, `unplug` or `release-on-stop`                      | 15 bytes |
//! | [`Priority`]  | empty, `low`, `normal` or `high`                             | 6 bytes |

mod held;
mod names;
mod pci;
mod recovery;
mod usage;

pub use held::Held;
pub use names::{
    check_mdev_attribute, parse_uuid, DriverName, Endpoint, LeaseId, MdevParent, MdevTypeId,
    Profile, RequestId, VmName, MAX_NAME,
};
pub use pci::PciAddress;
pub use recovery::{OnFailure, Vmm};
pub use usage::{AgentChannel, OnIdle, Priority};

/// How a caller should classify an error (the CLI maps these to exit codes, the
/// daemon to D-Bus error names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The input was malformed; nothing was attempted.
    BadInput,
    /// The request was understood and refused by policy; nothing was changed.
    Refused,
    /// Something failed while carrying the request out.
    Failed,
}

/// An error that knows its [`Kind`], and whether it means "no such thing": each
/// crate's error enum implements it, and the D-Bus error follows from it.
pub trait Classify: std::error::Error {
    fn kind(&self) -> Kind;
    fn not_found(&self) -> bool {
        false
    }
}

/// A malformed identity: what it was meant to be, a bounded prefix of the input
/// (escaped: no control character reaches a log or a terminal), and why it is
/// refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} \"{input}\": {reason}")]
pub struct IdError {
    pub what: &'static str,
    pub input: String,
    pub reason: String,
}

/// The most bytes of a refused input, escaped, that a message quotes.
const QUOTED: usize = 80;

impl IdError {
    pub fn new(what: &'static str, input: &str, reason: impl Into<String>) -> IdError {
        IdError {
            what,
            input: quote(input),
            reason: reason.into(),
        }
    }
}

/// `s` escaped as Rust's `{:?}` would, cut at [`QUOTED`] bytes of the escaped text
/// (an escape can be ten times its character: the cut is on what is shown).
pub fn quote(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        let e: String = c.escape_debug().collect();
        if out.len() + e.len() > QUOTED {
            out.push_str("...");
            break;
        }
        out.push_str(&e);
    }
    out
}

impl Classify for IdError {
    fn kind(&self) -> Kind {
        Kind::BadInput
    }
}
