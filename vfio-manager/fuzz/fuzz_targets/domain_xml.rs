//! A domain's XML as the libvirt hook reads it, and the rewrite of an incoming
//! domain: no panic, and a rewrite of what parsed parses again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use libvirt_hooks::domain::{rewrite, Domain};
use vfio_manager_api::ids::PciAddress;

fuzz_target!(|data: &[u8]| {
    let Ok(xml) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(d) = Domain::parse(xml) else {
        return;
    };
    let _ = d.may_be_ours();
    let slots = d.lease_slots();
    let to: Vec<PciAddress> = (0..slots.len())
        .map(|i| PciAddress::new(0, 0x42, (i % 32) as u8, 0))
        .collect();
    let out = rewrite(xml, &slots, &to);
    let again = Domain::parse(&out).expect("a rewritten domain parses");
    assert_eq!(again.hostdevs.len(), d.hostdevs.len());
});
