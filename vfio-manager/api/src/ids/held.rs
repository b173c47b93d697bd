//! What a lease holds of each device. The kind is stored with the device (the
//! table's `lease_devices.kind`) and read back as this enum, never guessed from
//! the device's name.

use uuid::Uuid;

use super::{parse_uuid, IdError, PciAddress};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    /// A whole PCI function; `driver_before` is the driver it had before the lease
    /// (empty: none), where its release returns it.
    Function {
        address: PciAddress,
        driver_before: String,
    },
    /// An mdev the lease created: its release removes it.
    MadeMdev(Uuid),
    /// An mdev a domain named, taken as it was: its release leaves it.
    KeptMdev(Uuid),
    /// A VF the lease gave a vGPU type: its release clears the type.
    Vgpu(PciAddress),
}

impl Held {
    /// The device's name: a PCI address or an mdev UUID (the table's key).
    pub fn name(&self) -> String {
        match self {
            Held::Function { address, .. } | Held::Vgpu(address) => address.to_string(),
            Held::MadeMdev(u) | Held::KeptMdev(u) => u.to_string(),
        }
    }

    /// The kind as the table stores it.
    pub fn kind(&self) -> &'static str {
        match self {
            Held::Function { .. } => "function",
            Held::MadeMdev(_) => "made-mdev",
            Held::KeptMdev(_) => "kept-mdev",
            Held::Vgpu(_) => "vgpu",
        }
    }

    /// The driver before the lease, for a whole function ("" for the rest).
    pub fn driver_before(&self) -> &str {
        match self {
            Held::Function { driver_before, .. } => driver_before,
            _ => "",
        }
    }

    /// The PCI function, for a whole function or a vGPU VF.
    pub fn pci(&self) -> Option<PciAddress> {
        match self {
            Held::Function { address, .. } | Held::Vgpu(address) => Some(*address),
            _ => None,
        }
    }

    /// The mdev, for a made or kept one.
    pub fn mdev(&self) -> Option<Uuid> {
        match self {
            Held::MadeMdev(u) | Held::KeptMdev(u) => Some(*u),
            _ => None,
        }
    }

    /// Read back from the table's columns; each name is parsed as what its kind says.
    pub fn from_row(name: &str, kind: &str, driver_before: &str) -> Result<Held, IdError> {
        Ok(match kind {
            "function" => Held::Function {
                address: name.parse()?,
                driver_before: driver_before.to_string(),
            },
            "made-mdev" => Held::MadeMdev(parse_uuid(name)?),
            "kept-mdev" => Held::KeptMdev(parse_uuid(name)?),
            "vgpu" => Held::Vgpu(name.parse()?),
            k => {
                return Err(IdError::new(
                    "leased device kind",
                    k,
                    "expected function, made-mdev, kept-mdev or vgpu",
                ))
            }
        })
    }

    /// The table's columns: (name, kind, driver before).
    pub fn to_row(&self) -> (String, &'static str, String) {
        (self.name(), self.kind(), self.driver_before().to_string())
    }

    /// The kind that markers in `driver_before` once spelled (tables and intents
    /// written before the kind had a column of its own): `@mdev`, `@mdev-kept`,
    /// `@vgpu`, else a driver.
    pub fn from_marker(name: &str, marker: &str) -> Result<Held, IdError> {
        match marker {
            "@mdev" => Held::from_row(name, "made-mdev", ""),
            "@mdev-kept" => Held::from_row(name, "kept-mdev", ""),
            "@vgpu" => Held::from_row(name, "vgpu", ""),
            before => Held::from_row(name, "function", before),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_round_trips_through_the_table_columns() {
        let u = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001";
        for h in [
            Held::Function {
                address: "0000:01:10.0".parse().unwrap(),
                driver_before: "igbvf".into(),
            },
            Held::MadeMdev(parse_uuid(u).unwrap()),
            Held::KeptMdev(parse_uuid(u).unwrap()),
            Held::Vgpu("0000:af:00.4".parse().unwrap()),
        ] {
            let (n, k, b) = h.to_row();
            assert_eq!(Held::from_row(&n, k, &b).unwrap(), h);
        }
    }

    #[test]
    fn a_name_that_is_not_its_kind_is_refused() {
        assert!(Held::from_row("0000:01:10.0", "made-mdev", "").is_err());
        assert!(Held::from_row("83b8f4f2-509f-382f-3c1e-e6bfe0fa1001", "function", "").is_err());
        assert!(Held::from_row("0000:01:10.0", "@mdev", "").is_err());
    }

    #[test]
    fn old_markers_read_as_their_kind() {
        let u = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001";
        assert_eq!(
            Held::from_marker(u, "@mdev-kept").unwrap().kind(),
            "kept-mdev"
        );
        assert_eq!(
            Held::from_marker("0000:af:00.4", "@vgpu").unwrap().kind(),
            "vgpu"
        );
        assert_eq!(
            Held::from_marker("0000:01:10.0", "")
                .unwrap()
                .driver_before(),
            ""
        );
    }
}
