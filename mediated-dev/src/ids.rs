//! The names of the mediated path that become sysfs or mdevctl paths: an mdev
//! parent (`/sys/class/mdev_bus/<parent>`, `/etc/mdevctl.d/<parent>`) and an mdev
//! type (`<parent>/mdev_supported_types/<type>`). Each is checked once, where it
//! enters (D-Bus, `vfctl`, the configuration, a definition file, a directory
//! listing); the functions that build paths take only these types, so no
//! unchecked string is ever joined into a path.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The longest parent or type name accepted. The kernel's are a PCI address
/// (12 bytes), a driver's device name (`mtty`) or `<driver>-<type>`
/// (`nvidia-563`, `i915-GVTg_V5_8`); 64 leaves room and bounds every message.
pub const MAX_NAME: usize = 64;

/// One path component: 1-64 of `A-Z a-z 0-9 . _ : + -`, not starting with `.`
/// (so never `.` or `..`), never `/` or a control character.
fn check(what: &'static str, s: &str) -> Result<()> {
    let bad = |reason: &str| {
        Err(Error::InvalidInput {
            what,
            input: s.chars().take(MAX_NAME + 8).collect(),
            reason: reason.into(),
        })
    };
    if s.is_empty() || s.len() > MAX_NAME {
        return bad(&format!("give 1 to {MAX_NAME} characters"));
    }
    if s.starts_with('.') {
        return bad("a name may not start with '.'");
    }
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '+' | '-');
    if let Some(c) = s.chars().find(|c| !ok(*c)) {
        return bad(&format!(
            "{c:?} is not allowed; a name is one path component of letters, digits and . _ : + -"
        ));
    }
    Ok(())
}

/// A vendor attribute's name from an mdevctl definition: written as a file under
/// the new mdev's directory, so it must be one path component too.
pub(crate) fn check_attr(name: &str) -> Result<()> {
    check("mdev attribute", name)
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn new(s: &str) -> Result<Self> {
                check($what, s)?;
                Ok($name(s.to_string()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = Error;
            fn try_from(s: String) -> Result<Self> {
                check($what, &s)?;
                Ok($name(s))
            }
        }

        impl std::str::FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                $name::new(s)
            }
        }

        impl From<$name> for String {
            fn from(n: $name) -> String {
                n.0
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
    /// name such as `mtty`).
    MdevParent,
    "mdev parent"
);

name_type!(
    /// An mdev type id: a directory under a parent's `mdev_supported_types/`.
    MdevTypeId,
    "mdev type"
);

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
            assert!(
                matches!(
                    e,
                    Error::InvalidInput {
                        what: "mdev parent",
                        ..
                    }
                ),
                "{bad:?}: {e}"
            );
            assert!(MdevTypeId::new(bad).is_err(), "{bad:?}");
            assert!(
                serde_json::from_str::<MdevTypeId>(&serde_json::to_string(bad).unwrap()).is_err()
            );
        }
    }

    #[test]
    fn a_refusal_quotes_a_bounded_part_of_the_input() {
        let e = MdevParent::new(&"x".repeat(1 << 20))
            .unwrap_err()
            .to_string();
        assert!(e.len() < 300, "{} bytes", e.len());
    }
}
