//! A strict PCI address. Parsing happens before any path is built, so `..`, `/`,
//! whitespace or overlong fields can never reach the filesystem.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::IdError;

/// `domain:bus:device.function`, e.g. `0000:3b:00.0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    pub domain: u16,
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl PciAddress {
    pub const fn new(domain: u16, bus: u8, device: u8, function: u8) -> Self {
        PciAddress {
            domain,
            bus,
            device,
            function,
        }
    }

    /// The 8-bit device/function number used by SR-IOV offset arithmetic.
    pub fn devfn(&self) -> u8 {
        (self.device << 3) | self.function
    }

    /// The address `n` routing-ID steps after this one (bus may advance), as the
    /// kernel computes VF addresses from `First VF Offset` and `VF Stride`.
    pub fn offset_by(&self, n: u32) -> Option<PciAddress> {
        let rid = ((self.bus as u32) << 8 | self.devfn() as u32) + n;
        if rid > 0xffff {
            return None;
        }
        Some(PciAddress {
            domain: self.domain,
            bus: (rid >> 8) as u8,
            device: ((rid >> 3) & 0x1f) as u8,
            function: (rid & 0x7) as u8,
        })
    }
}

fn hex_field(s: &str, max_len: usize, what: &'static str, input: &str) -> Result<u32, IdError> {
    if s.is_empty() || s.len() > max_len || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad_address(input, what));
    }
    Ok(u32::from_str_radix(s, 16).expect("validated hex"))
}

fn bad_address(input: &str, reason: &str) -> IdError {
    IdError::new(
        "PCI address",
        input,
        format!("{reason}; expected dddd:bb:dd.f or bb:dd.f, e.g. 0000:3b:00.0"),
    )
}

impl FromStr for PciAddress {
    type Err = IdError;

    fn from_str(input: &str) -> Result<Self, IdError> {
        let bad = |reason| bad_address(input, reason);
        if input.len() > 12 {
            return Err(bad("too long"));
        }
        let (rest, function) = input
            .rsplit_once('.')
            .ok_or_else(|| bad("missing .function"))?;
        let parts: Vec<&str> = rest.split(':').collect();
        let (domain, bus, device) = match parts.as_slice() {
            [d, b, s] => (
                hex_field(d, 4, "domain must be 1-4 hex digits", input)?,
                *b,
                *s,
            ),
            [b, s] => (0, *b, *s),
            _ => return Err(bad("expected two or three ':'-separated fields")),
        };
        let bus = hex_field(bus, 2, "bus must be 1-2 hex digits", input)?;
        let device = hex_field(device, 2, "device must be 1-2 hex digits", input)?;
        if device > 0x1f {
            return Err(bad("device must be at most 1f"));
        }
        if function.len() != 1 || !matches!(function.as_bytes()[0], b'0'..=b'7') {
            return Err(bad("function must be a single digit 0-7"));
        }
        Ok(PciAddress {
            domain: domain as u16,
            bus: bus as u8,
            device: device as u8,
            function: function.as_bytes()[0] - b'0',
        })
    }
}

/// Written by hand rather than with `write!`: an address is formatted into nearly
/// every sysfs path, and padded hex through `fmt` cost a tenth of the daemon's
/// instructions per provision. Same text as `{:04x}:{:02x}:{:02x}.{}`.
impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.function > 9 {
            // Not a real function number (the parser takes 0-7); kept exact anyway.
            let (d, b, s, n) = (self.domain, self.bus, self.device, self.function);
            return f.pad(&format!("{d:04x}:{b:02x}:{s:02x}.{n}"));
        }
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let nibble = |v: u16, shift: u16| HEX[usize::from((v >> shift) & 0xf)];
        let (d, b, s) = (self.domain, u16::from(self.bus), u16::from(self.device));
        let text = [
            nibble(d, 12),
            nibble(d, 8),
            nibble(d, 4),
            nibble(d, 0),
            b':',
            nibble(b, 4),
            nibble(b, 0),
            b':',
            nibble(s, 4),
            nibble(s, 0),
            b'.',
            b'0' + self.function,
        ];
        f.pad(std::str::from_utf8(&text).expect("ASCII"))
    }
}

impl Serialize for PciAddress {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PciAddress {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_and_short_forms() {
        assert_eq!(
            "0000:3b:00.1".parse::<PciAddress>().unwrap(),
            PciAddress::new(0, 0x3b, 0, 1)
        );
        assert_eq!(
            "3b:1f.7".parse::<PciAddress>().unwrap(),
            PciAddress::new(0, 0x3b, 0x1f, 7)
        );
        assert_eq!(
            "0000:3B:00.0".parse::<PciAddress>().unwrap().to_string(),
            "0000:3b:00.0"
        );
    }

    #[test]
    fn prints_like_padded_hex_with_width_honoured() {
        for (d, b, s, n) in [
            (0, 0, 0, 0),
            (0xabcd, 0xef, 0x1f, 7),
            (0x10, 0x3b, 0x02, 1),
            (1, 2, 3, 12),
        ] {
            let a = PciAddress::new(d, b, s, n);
            assert_eq!(a.to_string(), format!("{d:04x}:{b:02x}:{s:02x}.{n}"));
            assert_eq!(format!("[{a:>16}]"), format!("[{:>16}]", a.to_string()));
        }
    }

    #[test]
    fn refuses_anything_that_could_escape_a_path() {
        for bad in [
            "",
            "../00:00.0",
            "0000:00:00.0/..",
            "00:00.0 ",
            " 00:00.0",
            "00:00.8",
            "00:20.0",
            "00000:00:00.0",
            "0000:000:00.0",
            "0000:00:00.00",
            "0000:00:00",
            "0000:00:00.0\n",
            "zz:00.0",
            "0000:00:00:00.0",
            "..",
            "/",
            "0000:00:0g.0",
            "+0:00.0",
        ] {
            assert!(bad.parse::<PciAddress>().is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn offset_walks_routing_ids_across_buses() {
        let pf = PciAddress::new(0, 1, 0, 0);
        assert_eq!(pf.offset_by(0x80).unwrap().to_string(), "0000:01:10.0");
        assert_eq!(pf.offset_by(0x80 + 2).unwrap().to_string(), "0000:01:10.2");
        assert_eq!(
            PciAddress::new(0, 1, 0x1f, 7)
                .offset_by(1)
                .unwrap()
                .to_string(),
            "0000:02:00.0"
        );
        assert!(PciAddress::new(0, 0xff, 0x1f, 7).offset_by(1).is_none());
    }
}
