//! Every typed identity's constructor: no panic, and what is accepted prints back
//! to itself (so a name is the same wherever it is used).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vfio_manager_api::ids::{
    check_mdev_attribute, parse_uuid, AgentChannel, DriverName, Endpoint, LeaseId, MdevParent,
    MdevTypeId, OnFailure, OnIdle, PciAddress, Priority, Profile, RequestId, VmName, Vmm,
};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(a) = s.parse::<PciAddress>() {
        assert_eq!(a.to_string().parse::<PciAddress>().unwrap(), a);
        assert!(!a.to_string().contains('/'));
    }
    if let Ok(u) = parse_uuid(s) {
        assert_eq!(parse_uuid(&u.to_string()).unwrap(), u);
    }
    // Names that become a path component under /sys.
    for n in [
        MdevParent::new(s).map(String::from),
        MdevTypeId::new(s).map(String::from),
        DriverName::new(s).map(String::from),
    ] {
        if let Ok(n) = n {
            assert!(!n.contains('/') && n != "." && n != ".." && !n.starts_with('.'));
        }
    }
    let _ = check_mdev_attribute(s);
    // A lease's VMM: a socket the daemon connects to as root.
    match s.parse::<Vmm>() {
        Ok(Vmm::CloudHypervisor(p)) => {
            assert!(p.starts_with('/') && !p.split('/').any(|c| c == ".."));
            assert!(!p.chars().any(char::is_control));
            assert_eq!(s.parse::<Vmm>().unwrap().to_string(), s);
        }
        Ok(v) => assert_eq!(v.to_string(), s),
        Err(e) => assert!(e.to_string().len() < 600),
    }
    if let Ok(p) = s.parse::<OnFailure>() {
        assert_eq!(p.to_string(), s);
    }
    // A lease's agent channel: a socket the daemon listens on or connects to as root.
    match s.parse::<AgentChannel>() {
        Ok(AgentChannel::Unix(p) | AgentChannel::Serial(p)) => {
            assert!(p.starts_with('/') && !p.split('/').any(|c| c == ".."));
            assert!(!p.chars().any(char::is_control) && p.len() <= 107);
            assert_eq!(s.parse::<AgentChannel>().unwrap().to_string(), s);
        }
        Ok(AgentChannel::Vsock(c)) => assert!(c >= 3 && c < u32::MAX),
        Ok(c) => assert_eq!(c.to_string(), s),
        Err(e) => assert!(e.to_string().len() < 600),
    }
    if let Ok(p) = s.parse::<OnIdle>() {
        assert_eq!(p.to_string(), s);
    }
    let _ = s.parse::<Priority>();
    for bounded in [
        Profile::new(s).map(String::from),
        RequestId::new(s).map(String::from),
        LeaseId::new(s).map(String::from),
        VmName::new(s).map(String::from),
        Endpoint::new(s).map(String::from),
    ] {
        match bounded {
            Ok(v) => assert!(!v.chars().any(char::is_control)),
            Err(e) => assert!(e.to_string().len() < 600),
        }
    }
});
