//! The one error type of this crate. Messages are sentences that name the device,
//! the cause and, for refusals, the fix; the underlying cause stays in `source`.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::address::PciAddress;
pub use vfio_manager_api::ids::Kind;
use vfio_manager_api::ids::{Classify, IdError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A malformed identity (a PCI address, a name): see `vfio_manager_api::ids`.
    #[error(transparent)]
    Id(#[from] IdError),

    #[error("invalid {what} {input:?}: {reason}")]
    InvalidInput {
        what: &'static str,
        input: String,
        reason: String,
    },

    #[error("{root} is not a sysfs root: {missing} does not exist; pass the directory that holds sys/bus/pci")]
    NotSysfs { root: PathBuf, missing: PathBuf },

    #[error("PCI device {0} does not exist on this host; `vfctl list` shows the devices present")]
    NoSuchDevice(PciAddress),

    /// The policy gate's refusal (`ops::gate`). Nothing was changed.
    #[error("refused: {0}")]
    Gate(#[from] crate::ops::Refusal),

    /// A refusal by an operation's own preconditions (a count out of range, no
    /// SR-IOV): it would have been impossible. Nothing was changed.
    #[error("refused: {device}: {cause}; {fix}")]
    Refused {
        device: PciAddress,
        cause: String,
        fix: String,
    },

    #[error("{device}: the kernel rejected writing {data:?} to {}: {explanation}", path.display())]
    KernelWrite {
        device: PciAddress,
        path: PathBuf,
        data: String,
        explanation: String,
        #[source]
        source: io::Error,
    },

    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("{device}: {what} did not finish within {timeout:?}; {hint}")]
    Timeout {
        device: PciAddress,
        what: String,
        timeout: Duration,
        hint: String,
    },

    #[error("{device}: {what} failed, and rolling back the earlier steps also failed ({rollback}); check `vfctl show {device}`")]
    RollbackFailed {
        device: PciAddress,
        what: String,
        rollback: String,
        #[source]
        source: Box<Error>,
    },

    #[error("{device}: VFIO {what} failed")]
    Vfio {
        device: PciAddress,
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Error {
    pub fn kind(&self) -> Kind {
        match self {
            Error::Id(_)
            | Error::InvalidInput { .. }
            | Error::NotSysfs { .. }
            | Error::NoSuchDevice(_) => Kind::BadInput,
            Error::Refused { .. } | Error::Gate(_) => Kind::Refused,
            _ => Kind::Failed,
        }
    }

    pub(crate) fn refused(
        device: PciAddress,
        cause: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Error::Refused {
            device,
            cause: cause.into(),
            fix: fix.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

impl Classify for Error {
    fn kind(&self) -> Kind {
        Error::kind(self)
    }
    fn not_found(&self) -> bool {
        matches!(self, Error::NoSuchDevice(_))
    }
}
