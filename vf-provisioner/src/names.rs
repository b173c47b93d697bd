//! Vendor and device names from the pci-ids database. Names are cosmetic (the
//! embedded snapshot ages); callers always show `vvvv:dddd` beside them.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use pci_ids::FromId;

type Names = (Option<String>, Option<String>);

/// (vendor name, device name). pci-ids scans a vendor's device list linearly, so
/// results are memoised: a host has few distinct ids and many functions.
pub fn lookup(vendor: u16, device: u16) -> Names {
    static CACHE: OnceLock<Mutex<HashMap<(u16, u16), Names>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(hit) = cache.lock().expect("names cache").get(&(vendor, device)) {
        return hit.clone();
    }
    let names = match pci_ids::Device::from_vid_pid(vendor, device) {
        Some(d) => (
            Some(d.vendor().name().to_string()),
            Some(d.name().to_string()),
        ),
        None => (
            pci_ids::Vendor::from_id(vendor).map(|v| v.name().to_string()),
            None,
        ),
    };
    cache
        .lock()
        .expect("names cache")
        .insert((vendor, device), names.clone());
    names
}
