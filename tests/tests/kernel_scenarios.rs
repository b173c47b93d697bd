//! Provisioning scenarios that run twice: on the fake host (plain `cargo test`) and
//! on the real kernel inside the emulated host (`VFM_REAL_KERNEL=1`, serially). The
//! same assertions on both is what keeps the fake honest.

use integration_tests::*;
use vf_provisioner::{Host, Kind};

fn vfs(env: &Env, pf: &str) -> Vec<String> {
    env.func(pf)
        .sriov
        .expect("sriov")
        .vfs
        .iter()
        .map(|a| a.to_string())
        .collect()
}

#[test]
fn discovery_agrees_with_the_kernel_links_groups_and_ids() {
    let env = Env::new();
    let _r = Restore(&env);
    env.provisioner().enable_vfs(&addr(IGB), Some(4)).unwrap();
    assert_eq!(
        vfs(&env, IGB),
        [
            "0000:01:10.0",
            "0000:01:10.2",
            "0000:01:10.4",
            "0000:01:10.6"
        ]
    );
    let host = Host::scan(&env.sys());
    for vf in vfs(&env, IGB) {
        let f = host.get(&addr(&vf)).unwrap();
        assert_eq!(f.physfn, Some(addr(IGB)));
        assert_eq!(f.id, "8086:10ca");
        assert_eq!(f.driver, None, "autoprobe was off");
        let g = f.iommu_group.expect("VF has a group");
        assert_eq!(host.groups[&g], vec![addr(&vf)], "each VF in its own group");
    }
    let mf = host.get(&addr(MF0)).unwrap();
    assert_eq!(
        host.groups[&mf.iommu_group.unwrap()],
        vec![addr(MF0), addr(MF1)]
    );
    assert!(
        env.func(IGB).sriov.unwrap().drivers_autoprobe,
        "autoprobe restored"
    );
}

/// `uevent` as the kernel writes it for `addr`: its DRIVER line and its identity
/// lines, beside the `driver` link and the `vendor`, `device` and `class` files.
fn uevent_agrees(env: &Env, addr: &str) {
    let dir = env.root.join("sys/bus/pci/devices").join(addr);
    let read = |a: &str| std::fs::read_to_string(dir.join(a)).unwrap();
    let hex = |a: &str| u32::from_str_radix(read(a).trim().trim_start_matches("0x"), 16).unwrap();
    let uevent = read("uevent");
    let line = |key: &str| {
        uevent
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(str::to_string)
    };
    assert_eq!(line("DRIVER="), env.driver(addr), "{addr}: {uevent}");
    assert_eq!(
        line("PCI_ID="),
        Some(format!("{:04X}:{:04X}", hex("vendor"), hex("device"))),
        "{addr}"
    );
    assert_eq!(
        line("PCI_CLASS="),
        Some(format!("{:04X}", hex("class"))),
        "{addr}"
    );
    assert_eq!(line("PCI_SLOT_NAME=").as_deref(), Some(addr));
    let f = env.func(addr);
    assert_eq!(
        (f.vendor_id as u32, f.device_id as u32, f.class),
        (hex("vendor"), hex("device"), hex("class"))
    );
}

#[test]
fn uevent_names_the_identity_and_follows_the_driver_link() {
    let env = Env::new();
    let _r = Restore(&env);
    let p = env.provisioner();
    for f in [IGB, NVME, MF0] {
        uevent_agrees(&env, f);
    }
    let vf = p.enable_vfs(&addr(IGB), Some(1)).unwrap()[0].to_string();
    uevent_agrees(&env, &vf);
    p.unbind(&addr(&vf), false, None).unwrap();
    uevent_agrees(&env, &vf);
    p.bind_vfio(&addr(&vf), false).unwrap();
    uevent_agrees(&env, &vf);
}

#[test]
fn enables_four_vfs_on_igb_and_three_on_nvme() {
    let env = Env::new();
    let _r = Restore(&env);
    let p = env.provisioner();
    assert_eq!(p.enable_vfs(&addr(IGB), Some(4)).unwrap().len(), 4);
    assert_eq!(p.enable_vfs(&addr(NVME), Some(3)).unwrap().len(), 3);
    assert_eq!(
        vfs(&env, NVME),
        ["0000:02:00.1", "0000:02:00.2", "0000:02:00.3"]
    );
}

#[test]
fn a_new_count_goes_through_zero_and_the_same_count_changes_nothing() {
    let env = Env::new();
    let _r = Restore(&env);
    let p = env.provisioner();
    p.enable_vfs(&addr(IGB), Some(4)).unwrap();
    assert_eq!(p.enable_vfs(&addr(IGB), Some(4)).unwrap().len(), 4);
    assert_eq!(p.enable_vfs(&addr(IGB), Some(2)).unwrap().len(), 2);
    assert_eq!(env.func(IGB).sriov.unwrap().num_vfs, 2);
    let e = p.enable_vfs(&addr(IGB), Some(8)).unwrap_err();
    assert_eq!(e.kind(), Kind::Refused, "{e}");
    p.disable_vfs(&addr(IGB)).unwrap();
    assert!(vfs(&env, IGB).is_empty());
}

#[test]
fn binds_a_vf_to_vfio_pci_and_returns_it_to_its_host_driver() {
    let env = Env::new();
    let _r = Restore(&env);
    let p = env.provisioner();
    let vf = p.enable_vfs(&addr(IGB), Some(2)).unwrap()[0];
    p.unbind(&vf, false, None).unwrap();
    assert_eq!(env.driver(&vf.to_string()).as_deref(), Some("igbvf"));
    p.bind_vfio(&vf, false).unwrap();
    let f = env.func(&vf.to_string());
    assert_eq!(f.driver.as_deref(), Some("vfio-pci"));
    assert!(env
        .root
        .join("dev/vfio")
        .join(f.iommu_group.unwrap().to_string())
        .exists());
    p.unbind(&vf, false, None).unwrap();
    assert_eq!(env.driver(&vf.to_string()).as_deref(), Some("igbvf"));
    assert_eq!(env.func(&vf.to_string()).driver_override, None);
}

#[test]
fn returns_a_vf_to_its_host_driver_while_its_pf_has_autoprobe_off() {
    let env = Env::new();
    let _r = Restore(&env);
    let p = env.provisioner();
    let sys = env.sys();
    let vf = p.enable_vfs(&addr(IGB), Some(1)).unwrap()[0];
    p.bind_vfio(&vf, false).unwrap();
    let autoprobe = sys.device_attr(&addr(IGB), "sriov_drivers_autoprobe");
    sys.write(&addr(IGB), &autoprobe, "0").unwrap();
    // The kernel does not probe a VF of such a PF without an override (rule 3).
    p.unbind(&vf, false, None).unwrap();
    assert_eq!(env.driver(&vf.to_string()).as_deref(), Some("igbvf"));
    assert!(
        !env.func(IGB).sriov.unwrap().drivers_autoprobe,
        "the PF's autoprobe is left as it was"
    );
    sys.write(&addr(IGB), &autoprobe, "1").unwrap();
}

#[test]
fn refuses_a_bind_that_leaves_the_group_non_viable_and_binds_the_whole_group_on_request() {
    let env = Env::new();
    let _r = Restore(&env);
    let p = env.provisioner();
    let e = p.bind_vfio(&addr(MF0), false).unwrap_err();
    assert_eq!(e.kind(), Kind::Refused);
    assert!(
        e.to_string().contains(MF1) && e.to_string().contains("e1000e"),
        "{e}"
    );
    assert_eq!(
        env.driver(MF0).as_deref(),
        Some("e1000e"),
        "nothing changed"
    );
    p.bind_vfio(&addr(MF0), true).unwrap();
    assert_eq!(env.driver(MF0).as_deref(), Some("vfio-pci"));
    assert_eq!(env.driver(MF1).as_deref(), Some("vfio-pci"));
    p.unbind(&addr(MF0), true, None).unwrap();
    assert_eq!(env.driver(MF0).as_deref(), Some("e1000e"));
    assert_eq!(env.driver(MF1).as_deref(), Some("e1000e"));
}

#[test]
fn refuses_to_unbind_disable_or_reset_a_vf_whose_group_is_held_open() {
    let env = Env::new();
    let _r = Restore(&env);
    let p = env.provisioner();
    let vf = p.enable_vfs(&addr(IGB), Some(2)).unwrap()[1];
    p.bind_vfio(&vf, false).unwrap();
    let group = env.func(&vf.to_string()).iommu_group.unwrap();
    {
        let _held = env.hold(group);
        for (what, r) in [
            ("disable", p.disable_vfs(&addr(IGB)).err()),
            ("recount", p.enable_vfs(&addr(IGB), Some(1)).err()),
            ("unbind", p.unbind(&vf, false, None).err()),
            ("reset", p.reset(&vf).err()),
        ] {
            let e = r.unwrap_or_else(|| panic!("{what} was not refused"));
            assert_eq!(e.kind(), Kind::Refused, "{what}: {e}");
            assert!(
                e.to_string().contains(&format!("group {group}")),
                "{what}: {e}"
            );
        }
        assert_eq!(env.func(IGB).sriov.unwrap().num_vfs, 2);
    }
    p.reset(&vf).unwrap();
    p.disable_vfs(&addr(IGB)).unwrap();
}

#[test]
fn never_takes_a_nic_whose_interface_the_host_brought_up() {
    let env = Env::new();
    let _r = Restore(&env);
    let p = env.provisioner();
    let ifname = env.set_link(IGB, true);
    let e = p.bind_vfio(&addr(IGB), false).unwrap_err();
    env.set_link(IGB, false);
    assert_eq!(e.kind(), Kind::Refused, "{e}");
    assert!(e.to_string().contains(&ifname), "{e}");
    assert_eq!(env.driver(IGB).as_deref(), Some("igb"), "nothing changed");
}

#[test]
fn a_pf_on_vfio_pci_creates_vfs_only_with_enable_sriov() {
    let env = Env::new();
    let _r = Restore(&env);
    let p = env.provisioner();
    p.bind_vfio(&addr(IGB), false).unwrap();
    let e = p.enable_vfs(&addr(IGB), Some(2)).unwrap_err();
    assert!(e.to_string().contains("enable_sriov"), "{e}");
    let param = env.sys().vfio_pci_enable_sriov();
    env.sys().write(&addr(IGB), &param, "Y").unwrap();
    let vfs = p.enable_vfs(&addr(IGB), Some(2)).unwrap();
    let vf = env.func(&vfs[0].to_string());
    assert_eq!(vf.driver_override.as_deref(), Some("vfio-pci"));
    p.disable_vfs(&addr(IGB)).unwrap();
    env.sys().write(&addr(IGB), &param, "N").unwrap();
}

#[test]
fn opens_a_bound_vf_through_vfio_and_reads_its_config_space() {
    let env = Env::new();
    if !env.real {
        eprintln!("skipped: VFIO ioctls need the real kernel; runs in the emulated host (make real-kernel)");
        return;
    }
    let _r = Restore(&env);
    let p = env.provisioner();
    let vf = p.enable_vfs(&addr(IGB), Some(1)).unwrap()[0];
    p.bind_vfio(&vf, false).unwrap();
    let dev = vf_provisioner::vfio::OpenDevice::open(&env.sys(), &vf).unwrap();
    assert_eq!(dev.ids().unwrap(), (0x8086, 0x10ca));
    drop(dev);
    p.disable_vfs(&addr(IGB)).unwrap();
}
