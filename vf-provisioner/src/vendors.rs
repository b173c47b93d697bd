//! Which functions this service manages: GPUs recognised by class and by a vendor
//! table (domestic GPU vendors split into four VFs by default), plus anything the
//! operator lists in the configuration file.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::host::PciFunction;

/// PCI class codes (base, sub) that are GPUs or accelerators.
const GPU_CLASSES: &[(u8, u8)] = &[(0x03, 0x00), (0x03, 0x02), (0x03, 0x80), (0x12, 0x00)];

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuVendor {
    /// PCI vendor id, hex without 0x (e.g. "1ed5").
    #[serde(deserialize_with = "de_hex16")]
    pub vendor: u16,
    /// Restrict the entry to one device id; all devices of the vendor otherwise.
    #[serde(default, deserialize_with = "de_opt_hex16")]
    pub device: Option<u16>,
    pub name: String,
    /// VFs to enable when none are requested.
    pub default_vfs: u32,
}

/// Built-in vendor table. Domestic GPU vendors split their chips into four VFs.
pub fn builtin() -> Vec<GpuVendor> {
    let domestic: &[(u16, &str)] = &[
        (0x1ed5, "Moore Threads"),
        (0x1eed, "XDX Computing"),
        (0x1d94, "Hygon (DCU)"),
        (0x9999, "MetaX"),
        (0x1e36, "Enflame"),
        (0x0731, "Jingjia Micro"),
        (0x6766, "Glenfly"),
        (0x1ec6, "Vastai"),
        (0x1faa, "Hexaflake"),
        (0x19e5, "Huawei (Ascend)"),
        (0x0014, "Loongson"),
        (0x1d17, "Zhaoxin"),
        (0x1e30, "Sophgo"),
        (0x1f1c, "Sophgo"),
    ];
    let mut v: Vec<GpuVendor> = domestic
        .iter()
        .map(|&(vendor, name)| GpuVendor {
            vendor,
            device: None,
            name: name.into(),
            default_vfs: 4,
        })
        .collect();
    for (vendor, name) in [(0x10de, "NVIDIA"), (0x1002, "AMD"), (0x8086, "Intel")] {
        // Their VF counts differ per model and per vGPU profile: default to all the
        // device allows (0 = sriov_totalvfs).
        v.push(GpuVendor {
            vendor,
            device: None,
            name: name.into(),
            default_vfs: 0,
        });
    }
    v
}

/// The part of `/etc/vfio-manager/config.toml` this crate reads.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct DeviceConfig {
    /// Extra or overriding vendor/model entries (Iluvatar, Biren, Cambricon ...).
    pub gpu: Vec<GpuVendor>,
    /// Other PFs to manage: `vvvv:dddd` ids or PCI addresses.
    pub manage: Vec<String>,
    /// Functions never to touch, even if they match the above.
    pub exclude: Vec<String>,
}

impl DeviceConfig {
    pub fn parse(text: &str, origin: &Path) -> Result<Self> {
        let cfg: DeviceConfig = toml::from_str(text).map_err(|e| Error::InvalidInput {
            what: "configuration file",
            input: origin.display().to_string(),
            reason: e.to_string().trim_end().replace('\n', " "),
        })?;
        for m in cfg.manage.iter().chain(&cfg.exclude) {
            if !is_selector(m) {
                return Err(Error::InvalidInput {
                    what: "device selector in configuration",
                    input: m.clone(),
                    reason: format!("in {}: use vvvv:dddd or a PCI address", origin.display()),
                });
            }
        }
        Ok(cfg)
    }

    /// Loads `path`; a missing file means defaults.
    pub fn load(path: &Path) -> Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(Error::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }
}

fn hex16(s: &str) -> Option<u16> {
    (s.len() == 4)
        .then(|| u16::from_str_radix(s, 16).ok())
        .flatten()
}

fn de_hex16<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<u16, D::Error> {
    let s = String::deserialize(d)?;
    hex16(&s).ok_or_else(|| serde::de::Error::custom(format!("{s:?} is not a 4-digit hex id")))
}

fn de_opt_hex16<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<u16>, D::Error> {
    de_hex16(d).map(Some)
}

/// Whether `s` names devices: `vvvv:dddd` or a PCI address.
pub fn is_selector(s: &str) -> bool {
    parse_id(s).is_some() || s.parse::<crate::PciAddress>().is_ok()
}

fn parse_id(s: &str) -> Option<(u16, u16)> {
    let (v, d) = s.split_once(':')?;
    Some((hex16(v)?, hex16(d)?))
}

fn matches(sel: &str, f: &PciFunction) -> bool {
    match parse_id(sel) {
        Some((v, d)) => v == f.vendor_id && d == f.device_id,
        None => sel
            .parse::<crate::PciAddress>()
            .is_ok_and(|a| a == f.address),
    }
}

/// The policy on which functions are ours to change.
#[derive(Debug, Clone)]
pub struct DeviceFilter {
    vendors: Vec<GpuVendor>,
    manage: Vec<String>,
    exclude: Vec<String>,
}

impl Default for DeviceFilter {
    fn default() -> Self {
        DeviceFilter::new(&DeviceConfig::default())
    }
}

impl DeviceFilter {
    pub fn new(cfg: &DeviceConfig) -> Self {
        // Configured entries come first so that they override the built-in ones.
        let mut vendors = cfg.gpu.clone();
        vendors.extend(builtin());
        DeviceFilter {
            vendors,
            manage: cfg.manage.clone(),
            exclude: cfg.exclude.clone(),
        }
    }

    pub fn is_gpu(&self, f: &PciFunction) -> bool {
        let class = ((f.class >> 16) as u8, (f.class >> 8) as u8);
        GPU_CLASSES.contains(&class) || self.vendor_entry(f).is_some_and(|v| v.device.is_some())
    }

    fn vendor_entry(&self, f: &PciFunction) -> Option<&GpuVendor> {
        self.vendors
            .iter()
            .find(|v| v.vendor == f.vendor_id && v.device.is_none_or(|d| d == f.device_id))
    }

    pub fn is_excluded(&self, f: &PciFunction) -> bool {
        self.exclude.iter().any(|s| matches(s, f))
    }

    /// Whether this PF (or a VF's PF, passed in) is ours to change.
    pub fn is_managed(&self, pf: &PciFunction) -> bool {
        !self.is_excluded(pf) && (self.is_gpu(pf) || self.manage.iter().any(|s| matches(s, pf)))
    }

    /// VFs to enable on `pf` when the caller gives no count.
    pub fn default_vfs(&self, pf: &PciFunction) -> u32 {
        let total = pf.sriov.as_ref().map_or(0, |s| s.total_vfs);
        match self.vendor_entry(pf).map(|v| v.default_vfs) {
            Some(n) if n > 0 => n.min(total),
            _ => total,
        }
    }
}
