//! `Provision`'s arguments as they arrive on the bus: the body's bytes decoded as
//! `(s, a{sv})`, then through the contract's one request codec. No panic; what is
//! accepted passes the request checks.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use zbus::zvariant::serialized::{Context, Data};
use zbus::zvariant::{OwnedValue, LE};

fuzz_target!(|data: &[u8]| {
    let ctx = Context::new_dbus(LE, 0);
    let body = Data::new(data, ctx);
    let Ok(((vm, opts), _)) = body.deserialize::<(String, HashMap<String, OwnedValue>)>() else {
        return;
    };
    if let Ok(r) = vfio_manager_api::codec::decode(vm, opts, || "0123456789abcdef".into()) {
        vfio_manager_api::codec::check(&r).expect("a decoded request passes the checks");
    }
});
