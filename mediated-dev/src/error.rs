//! The one error type of this crate. Messages name the device (an mdev UUID, a
//! parent and type, or a VF), the cause and, for refusals, the fix.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

pub use vf_provisioner::Kind;
use vfio_manager_api::ids::{Classify, IdError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid {what} {input:?}: {reason}")]
    InvalidInput {
        what: &'static str,
        input: String,
        reason: String,
    },

    /// A malformed identity (an mdev UUID, parent, type or attribute name).
    #[error(transparent)]
    Id(#[from] IdError),

    #[error("{0}: no such mdev parent; `vfctl mdev types` lists the parents on this host")]
    NoParent(String),

    #[error("{parent}: no mdev type {type_id:?}; its types are: {known}")]
    NoType {
        parent: String,
        type_id: String,
        known: String,
    },

    #[error("mdev {0} does not exist; `vfctl mdev list` shows the mdevs present and defined")]
    NoMdev(uuid::Uuid),

    /// A policy refusal: nothing was changed.
    #[error("refused: {device}: {cause}; {fix}")]
    Refused {
        device: String,
        cause: String,
        fix: String,
    },

    #[error("{device}: the kernel rejected writing {data:?} to {}: {explanation}", path.display())]
    KernelWrite {
        device: String,
        path: PathBuf,
        data: String,
        explanation: String,
        #[source]
        source: io::Error,
    },

    #[error("{device}: {what} did not finish within {timeout:?}")]
    Timeout {
        device: String,
        what: String,
        timeout: Duration,
    },

    #[error("mdev {device} was created but its vendor driver did not bind it ({detail}); it was removed again; the kernel log says why")]
    NotBound { device: String, detail: String },

    #[error("{}: {reason}; fix or remove the file", path.display())]
    Definition { path: PathBuf, reason: String },

    #[error("{}: {what}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },

    #[error("{device}: VFIO {what} failed")]
    Vfio {
        device: String,
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// The migration stream's TLS credentials are missing or unusable.
    #[error("{}: migration TLS: {reason}; a migration stream is mutual TLS: give this host the CA and its server and client certificates (libvirt's PKI layout, or [migration] in the configuration)", path.display())]
    Tls { path: PathBuf, reason: String },

    /// Migration refused or aborted; the source device was returned to RUNNING.
    #[error("{device}: migration {what}")]
    Migration { device: String, what: String },
}

impl Error {
    pub fn kind(&self) -> Kind {
        match self {
            Error::InvalidInput { .. }
            | Error::Id(_)
            | Error::NoParent(_)
            | Error::NoType { .. }
            | Error::NoMdev(_)
            | Error::Definition { .. } => Kind::BadInput,
            Error::Refused { .. } | Error::Tls { .. } => Kind::Refused,
            _ => Kind::Failed,
        }
    }

    pub(crate) fn refused(
        device: impl std::fmt::Display,
        cause: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Error::Refused {
            device: device.to_string(),
            cause: cause.into(),
            fix: fix.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, what: &'static str, source: io::Error) -> Self {
        Error::Io {
            path: path.into(),
            what,
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

impl Classify for Error {
    fn kind(&self) -> Kind {
        Error::kind(self)
    }
    fn not_found(&self) -> bool {
        matches!(self, Error::NoMdev(_))
    }
}
