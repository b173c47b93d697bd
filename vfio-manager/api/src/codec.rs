//! The one `a{sv}` codec of `Provision`'s request, both ways, and the checks every
//! request passes whoever sends it (D-Bus, `vfctl`, the hook): each field through
//! its typed identity, lists and counts bounded.

use std::collections::{BTreeSet, HashMap};

use zbus::zvariant::{OwnedValue, Value};

use crate::ids::{
    parse_uuid, quote, AgentChannel, IdError, OnFailure, OnIdle, PciAddress, Priority, Profile,
    RequestId, VmName, Vmm,
};
use crate::{ApiError, Request};

/// The most devices one request may ask for (and the longest `pfs` list).
pub const MAX_COUNT: u32 = 64;

/// Whether a lease profile asks for a mediated device (an mdev type id or name, or
/// a vGPU type) rather than a whole VF (`vf`, `vvvv:dddd`).
pub fn is_mediated(profile: &str) -> bool {
    profile != "vf" && !is_model_id(profile)
}

/// A PCI model id `vvvv:dddd`.
pub fn is_model_id(s: &str) -> bool {
    s.len() == 9 && s.as_bytes()[4] == b':' && s.chars().all(|c| c == ':' || c.is_ascii_hexdigit())
}

/// `Provision`'s `a{sv}`: only the keys that differ from the defaults.
pub fn encode(r: &Request) -> HashMap<&'static str, Value<'_>> {
    let mut opts: HashMap<&str, Value> = HashMap::new();
    opts.insert("request_id", r.request_id.as_str().into());
    opts.insert("profile", r.profile.as_str().into());
    opts.insert("count", r.count.into());
    opts.insert("numa_node", r.numa_node.into());
    if !r.vm_uuid.is_empty() {
        opts.insert("vm_uuid", r.vm_uuid.as_str().into());
    }
    if !r.pfs.is_empty() {
        opts.insert("pfs", r.pfs.clone().into());
    }
    if !r.devices.is_empty() {
        opts.insert("devices", r.devices.clone().into());
    }
    if r.adopt {
        opts.insert("adopt", true.into());
    }
    if !r.on_failure.is_empty() {
        opts.insert("on_failure", r.on_failure.as_str().into());
    }
    if !r.vmm.is_empty() {
        opts.insert("vmm", r.vmm.as_str().into());
    }
    if !r.agent.is_empty() {
        opts.insert("agent", r.agent.as_str().into());
    }
    if !r.on_idle.is_empty() {
        opts.insert("on_idle", r.on_idle.as_str().into());
    }
    if !r.priority.is_empty() {
        opts.insert("priority", r.priority.as_str().into());
    }
    opts
}

/// A request from `Provision`'s arguments, checked. No request id: the request is
/// not idempotent and gets `anonymous-<fresh>`.
pub fn decode(
    vm: String,
    opts: HashMap<String, OwnedValue>,
    fresh_id: impl FnOnce() -> String,
) -> Result<Request, ApiError> {
    let mut r = Request {
        vm_name: vm,
        ..Request::default()
    };
    for (k, v) in opts {
        let bad = |e: zbus::zvariant::Error| {
            ApiError::BadInput(format!("request key \"{}\": {e}", quote(&k)))
        };
        match k.as_str() {
            "request_id" => r.request_id = String::try_from(v).map_err(bad)?,
            "vm_uuid" => r.vm_uuid = String::try_from(v).map_err(bad)?,
            "profile" => r.profile = String::try_from(v).map_err(bad)?,
            "count" => r.count = u32::try_from(v).map_err(bad)?,
            "numa_node" => r.numa_node = i32::try_from(v).map_err(bad)?,
            "pfs" => r.pfs = Vec::<String>::try_from(v).map_err(bad)?,
            "devices" => r.devices = Vec::<String>::try_from(v).map_err(bad)?,
            "adopt" => r.adopt = bool::try_from(v).map_err(bad)?,
            "on_failure" => r.on_failure = String::try_from(v).map_err(bad)?,
            "vmm" => r.vmm = String::try_from(v).map_err(bad)?,
            "agent" => r.agent = String::try_from(v).map_err(bad)?,
            "on_idle" => r.on_idle = String::try_from(v).map_err(bad)?,
            "priority" => r.priority = String::try_from(v).map_err(bad)?,
            _ => {
                return Err(ApiError::BadInput(format!(
                    "unknown request key \"{}\"; known: request_id, vm_uuid, profile, count, numa_node, pfs, devices, adopt, on_failure, vmm, agent, on_idle, priority",
                    quote(&k)
                )))
            }
        }
    }
    if !r.devices.is_empty() {
        r.count = r.devices.len().try_into().unwrap_or(u32::MAX);
    }
    if r.request_id.is_empty() {
        r.request_id = format!("anonymous-{}", fresh_id());
    }
    check(&r)?;
    Ok(r)
}

/// The checks every request passes before the daemon looks at it.
pub fn check(r: &Request) -> Result<(), ApiError> {
    let bad = |m: String| Err(ApiError::BadInput(m));
    let vm = VmName::new(&r.vm_name)?;
    RequestId::new(&r.request_id)?;
    Profile::new(&r.profile)?;
    if !r.on_failure.is_empty() {
        r.on_failure.parse::<OnFailure>()?;
    }
    r.vmm.parse::<Vmm>()?;
    r.agent.parse::<AgentChannel>()?;
    r.priority.parse::<Priority>()?;
    if !r.on_idle.is_empty() {
        r.on_idle.parse::<OnIdle>()?;
    }
    if r.count == 0 || r.count > MAX_COUNT {
        return bad(format!(
            "count {} for VM {vm}: ask for 1 to {MAX_COUNT} devices",
            r.count
        ));
    }
    if !r.vm_uuid.is_empty() {
        parse_uuid(&r.vm_uuid).map_err(|e| IdError {
            what: "VM UUID",
            ..e
        })?;
    }
    if r.pfs.len() > MAX_COUNT as usize {
        return bad(format!("VM {vm}: at most {MAX_COUNT} preferred PFs"));
    }
    for p in &r.pfs {
        p.parse::<PciAddress>()?;
    }
    let mut named = BTreeSet::new();
    for d in &r.devices {
        // A mediated profile names mdevs by UUID (a domain's `<hostdev type='mdev'>`).
        let key = if is_mediated(&r.profile) {
            parse_uuid(d)?.to_string()
        } else {
            d.parse::<PciAddress>()?.to_string()
        };
        if !named.insert(key) {
            return bad(format!("VM {vm}: device {d} is named twice"));
        }
    }
    if !r.devices.is_empty() && r.devices.len() != r.count as usize {
        return bad(format!(
            "VM {vm}: {} devices named but count is {}",
            r.devices.len(),
            r.count
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned(opts: HashMap<&'static str, Value<'_>>) -> HashMap<String, OwnedValue> {
        opts.into_iter()
            .map(|(k, v)| (k.to_string(), v.try_to_owned().unwrap()))
            .collect()
    }

    #[test]
    fn a_request_survives_the_round_trip() {
        let r = Request {
            request_id: "job-1".into(),
            vm_name: "vm1".into(),
            vm_uuid: "4dea22b3-1d52-d8f3-2516-782e98ab3fa0".into(),
            profile: "1ed5:0323".into(),
            count: 2,
            numa_node: 1,
            pfs: vec!["0000:10:00.0".into()],
            devices: vec!["0000:10:00.1".into(), "0000:10:00.2".into()],
            adopt: true,
            on_failure: "replace".into(),
            vmm: "ch:/run/ch/vm1.sock".into(),
            agent: "cid:7".into(),
            on_idle: "unplug".into(),
            priority: "high".into(),
        };
        let back = decode("vm1".into(), owned(encode(&r)), || unreachable!()).unwrap();
        assert_eq!(back, r);
    }

    /// A `Provision` body as the bus carries it (the fuzz target's seed).
    #[test]
    fn a_body_from_the_wire_decodes() {
        use zbus::zvariant::serialized::{Context, Data};
        let bytes = include_bytes!("../../fuzz/corpus/dbus_request/seed-vf");
        let body = Data::new(&bytes[..], Context::new_dbus(zbus::zvariant::LE, 0));
        let ((vm, opts), _) = body
            .deserialize::<(String, HashMap<String, OwnedValue>)>()
            .unwrap();
        let r = decode(vm, opts, || unreachable!()).unwrap();
        assert_eq!(
            (r.vm_name.as_str(), r.request_id.as_str(), r.count),
            ("web-1", "r1", 2)
        );
    }

    #[test]
    fn hostile_requests_are_bad_input() {
        let base = Request {
            request_id: "r".into(),
            vm_name: "vm".into(),
            ..Request::default()
        };
        let cases: Vec<Request> = vec![
            Request {
                vm_name: "vm/../x".into(),
                ..base.clone()
            },
            Request {
                vm_name: "vm\n</hostdev>".into(),
                ..base.clone()
            },
            Request {
                request_id: "r\u{1b}[2J".into(),
                ..base.clone()
            },
            Request {
                request_id: "x".repeat(1 << 20),
                ..base.clone()
            },
            Request {
                profile: "vf\n".into(),
                ..base.clone()
            },
            Request {
                count: 0,
                ..base.clone()
            },
            Request {
                count: MAX_COUNT + 1,
                ..base.clone()
            },
            Request {
                vm_uuid: "not-a-uuid".into(),
                ..base.clone()
            },
            Request {
                pfs: vec!["../../etc".into()],
                ..base.clone()
            },
            Request {
                pfs: vec!["0000:10:00.0".into(); 65],
                ..base.clone()
            },
            Request {
                devices: vec!["10:00.1".into(), "0000:10:00.1".into()],
                count: 2,
                ..base.clone()
            },
        ];
        for r in cases {
            let e = decode(r.vm_name.clone(), owned(encode(&r)), || "x".into()).unwrap_err();
            assert!(
                matches!(&e, ApiError::BadInput(m) if m.len() < 600),
                "{r:?}: {e:?}"
            );
        }
        let mut opts = owned(encode(&base));
        opts.insert("evil".repeat(1000), OwnedValue::from(1u32));
        let e = decode("vm".into(), opts, || "x".into()).unwrap_err();
        assert!(
            matches!(&e, ApiError::BadInput(m) if m.len() < 300),
            "{e:?}"
        );
    }
}
