//! Typed errors: the daemon answers with one of [`ApiError`]'s D-Bus names, and a
//! client decodes the name back into [`ErrorName`], never by matching text. People
//! read the message, which names the device, the cause and the fix.

use crate::ids::{Classify, Kind};
use crate::ERROR_PREFIX;

#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.vfiomanager.VfioManager1.Error")]
pub enum ApiError {
    #[zbus(error)]
    ZBus(zbus::Error),
    /// Malformed request or argument; nothing was attempted.
    BadInput(String),
    /// Understood and refused by policy; nothing was changed.
    Refused(String),
    /// No such device or lease.
    NotFound(String),
    /// No free device matches the request.
    NoDevice(String),
    /// The caller may not change the host.
    PermissionDenied(String),
    /// The operation started and failed (kernel error, timeout).
    Failed(String),
}

/// The daemon's error names, decoded (`Other`: a name this client does not know,
/// from a newer daemon or the bus itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorName {
    BadInput,
    Refused,
    NotFound,
    NoDevice,
    PermissionDenied,
    Failed,
    Other(String),
}

impl ErrorName {
    /// Decodes a D-Bus error name (`org.vfiomanager.VfioManager1.Error.Refused`).
    pub fn decode(name: &str) -> ErrorName {
        let short = name
            .strip_prefix(ERROR_PREFIX)
            .and_then(|s| s.strip_prefix('.'));
        match short {
            Some("BadInput") => ErrorName::BadInput,
            Some("Refused") => ErrorName::Refused,
            Some("NotFound") => ErrorName::NotFound,
            Some("NoDevice") => ErrorName::NoDevice,
            Some("PermissionDenied") => ErrorName::PermissionDenied,
            Some("Failed") => ErrorName::Failed,
            _ => ErrorName::Other(name.to_string()),
        }
    }

    /// The short name (`Refused`), for logs and `--output json`.
    pub fn as_str(&self) -> &str {
        match self {
            ErrorName::BadInput => "BadInput",
            ErrorName::Refused => "Refused",
            ErrorName::NotFound => "NotFound",
            ErrorName::NoDevice => "NoDevice",
            ErrorName::PermissionDenied => "PermissionDenied",
            ErrorName::Failed => "Failed",
            ErrorName::Other(n) => n,
        }
    }
}

impl std::fmt::Display for ErrorName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error and its causes in one line, for messages that cross the bus.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(c) = source {
        s.push_str(&format!(" (caused by: {c})"));
        source = c.source();
    }
    s
}

/// Every crate's error becomes the D-Bus error its class names.
impl<E: Classify> From<E> for ApiError {
    fn from(e: E) -> Self {
        let text = error_chain(&e);
        match (e.kind(), e.not_found()) {
            (_, true) => ApiError::NotFound(text),
            (Kind::BadInput, _) => ApiError::BadInput(text),
            (Kind::Refused, _) => ApiError::Refused(text),
            (Kind::Failed, _) => ApiError::Failed(text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_decode_to_the_enum_and_back() {
        for n in [
            ErrorName::BadInput,
            ErrorName::Refused,
            ErrorName::NotFound,
            ErrorName::NoDevice,
            ErrorName::PermissionDenied,
            ErrorName::Failed,
        ] {
            let full = format!("{ERROR_PREFIX}.{n}");
            assert_eq!(ErrorName::decode(&full), n);
        }
        assert_eq!(
            ErrorName::decode("org.freedesktop.DBus.Error.Failed"),
            ErrorName::Other("org.freedesktop.DBus.Error.Failed".into())
        );
        assert!(matches!(
            ErrorName::decode("org.vfiomanager.VfioManager1.ErrorRefused"),
            ErrorName::Other(_)
        ));
    }

    #[test]
    fn an_id_error_is_bad_input() {
        let e: ApiError = crate::ids::LeaseId::new("x").unwrap_err().into();
        assert!(matches!(e, ApiError::BadInput(m) if m.contains("lease id")));
    }
}
