//! The fake kernel must behave like the real one: one test per rule listed in
//! docs/kernel.md.
//! Rules 6, 8, 9 and 11 concern mdevs and VFIO migration, which the mediated-dev
//! crate's fake covers; here are the PCI rules.

mod common;
use common::*;
use vf_provisioner::{fake, layouts, Host};

const IGB: &str = "sys/bus/pci/devices/0000:01:00.0";

#[test]
fn rule1_numvfs_goes_only_through_zero_and_not_past_total() {
    let t = build(layouts::emulated());
    let r = t.path();
    assert_eq!(
        write(r, &format!("{IGB}/sriov_numvfs"), "8"),
        Err(libc::ERANGE)
    );
    assert_eq!(write(r, &format!("{IGB}/sriov_numvfs"), "4"), Ok(()));
    assert_eq!(
        write(r, &format!("{IGB}/sriov_numvfs"), "2"),
        Err(libc::EBUSY)
    );
    assert_eq!(
        write(r, &format!("{IGB}/sriov_numvfs"), "4"),
        Ok(()),
        "same count is a no-op"
    );
    assert_eq!(write(r, &format!("{IGB}/sriov_numvfs"), "0"), Ok(()));
    assert_eq!(write(r, &format!("{IGB}/sriov_numvfs"), "2"), Ok(()));
    assert_eq!(
        func(r, "0000:01:00.0").sriov.unwrap().vfs,
        vec![a("0000:01:10.0"), a("0000:01:10.2")]
    );
}

#[test]
fn rule2_new_vfs_are_probed_by_the_vf_driver_unless_autoprobe_is_off() {
    let t = build(layouts::emulated());
    let r = t.path();
    write(r, &format!("{IGB}/sriov_numvfs"), "2").unwrap();
    assert_eq!(driver(r, "0000:01:10.0").as_deref(), Some("igbvf"));
    write(r, &format!("{IGB}/sriov_numvfs"), "0").unwrap();
    write(r, &format!("{IGB}/sriov_drivers_autoprobe"), "0").unwrap();
    write(r, &format!("{IGB}/sriov_numvfs"), "2").unwrap();
    assert_eq!(driver(r, "0000:01:10.0"), None);
}

#[test]
fn rule3_bind_without_override_fails_with_enodev_when_autoprobe_is_off() {
    let t = build(layouts::emulated());
    let r = t.path();
    write(r, &format!("{IGB}/sriov_drivers_autoprobe"), "0").unwrap();
    write(r, &format!("{IGB}/sriov_numvfs"), "1").unwrap();
    let vf = "0000:01:10.0";
    assert_eq!(
        write(r, "sys/bus/pci/drivers/igbvf/bind", vf),
        Err(libc::ENODEV)
    );
    assert_eq!(
        write(r, "sys/bus/pci/drivers/vfio-pci/bind", vf),
        Err(libc::ENODEV)
    );
    // The reliable way: override, then drivers_probe.
    write(
        r,
        &format!("sys/bus/pci/devices/{vf}/driver_override"),
        "vfio-pci\n",
    )
    .unwrap();
    write(r, "sys/bus/pci/drivers_probe", vf).unwrap();
    assert_eq!(driver(r, vf).as_deref(), Some("vfio-pci"));
    assert!(r
        .join("dev/vfio")
        .join(func(r, vf).iommu_group.unwrap().to_string())
        .exists());
    // drivers_probe on a bound device is EINVAL; unbind from the wrong driver ENODEV.
    assert_eq!(write(r, "sys/bus/pci/drivers_probe", vf), Err(libc::EINVAL));
    assert_eq!(
        write(r, "sys/bus/pci/drivers/igbvf/unbind", vf),
        Err(libc::ENODEV)
    );
    // A cleared override reads back as "(null)".
    write(
        r,
        &format!("sys/bus/pci/devices/{vf}/driver_override"),
        "\n",
    )
    .unwrap();
    assert_eq!(
        std::fs::read_to_string(r.join(format!("sys/bus/pci/devices/{vf}/driver_override")))
            .unwrap(),
        "(null)\n"
    );
}

#[test]
fn rule4_vfio_pci_pf_needs_enable_sriov_and_marks_vfs_for_vfio() {
    let t = build(layouts::emulated());
    let r = t.path();
    write(r, &format!("{IGB}/driver_override"), "vfio-pci").unwrap();
    write(r, "sys/bus/pci/drivers/igb/unbind", "0000:01:00.0").unwrap();
    write(r, "sys/bus/pci/drivers_probe", "0000:01:00.0").unwrap();
    assert_eq!(
        write(r, &format!("{IGB}/sriov_numvfs"), "2"),
        Err(libc::ENOENT)
    );
    write(r, "sys/module/vfio_pci/parameters/enable_sriov", "Y").unwrap();
    write(r, &format!("{IGB}/sriov_numvfs"), "2").unwrap();
    let vf = func(r, "0000:01:10.0");
    assert_eq!(vf.driver_override.as_deref(), Some("vfio-pci"));
    assert_eq!(vf.driver.as_deref(), Some("vfio-pci"));
}

#[test]
fn rule4_pf_without_driver_cannot_enable_vfs() {
    let t = build(layouts::emulated());
    let r = t.path();
    write(r, "sys/bus/pci/drivers/igb/unbind", "0000:01:00.0").unwrap();
    assert_eq!(
        write(r, &format!("{IGB}/sriov_numvfs"), "2"),
        Err(libc::ENOENT)
    );
}

#[test]
fn rule5_disable_works_with_vfs_on_vfio_but_blocks_while_one_is_open() {
    let t = build(layouts::emulated());
    let r = t.path();
    write(r, &format!("{IGB}/sriov_drivers_autoprobe"), "0").unwrap();
    write(r, &format!("{IGB}/sriov_numvfs"), "2").unwrap();
    let vf = "0000:01:10.2";
    write(
        r,
        &format!("sys/bus/pci/devices/{vf}/driver_override"),
        "vfio-pci",
    )
    .unwrap();
    write(r, "sys/bus/pci/drivers_probe", vf).unwrap();
    let group = func(r, vf).iommu_group.unwrap();
    fake::hold_group(r, 4242, "qemu-system-x86", group).unwrap();
    let blocked = sys(r)
        .write(&a(vf), &r.join(format!("{IGB}/sriov_numvfs")), "0")
        .unwrap_err();
    assert!(
        matches!(blocked, vf_provisioner::Error::KernelWrite { ref source, .. } if source.kind() == std::io::ErrorKind::WouldBlock)
    );
    fake::end_process(r, 4242).unwrap();
    write(r, &format!("{IGB}/sriov_numvfs"), "0").unwrap();
    assert!(!r.join("dev/vfio").join(group.to_string()).exists());
}

#[test]
fn rule7_group_numbers_are_reassigned_and_identity_is_the_address() {
    let t = build(layouts::emulated());
    let r = t.path();
    write(r, &format!("{IGB}/sriov_numvfs"), "2").unwrap();
    let before = func(r, "0000:01:10.2").iommu_group;
    write(r, &format!("{IGB}/sriov_numvfs"), "0").unwrap();
    write(r, "sys/bus/pci/devices/0000:02:00.0/sriov_numvfs", "1").unwrap();
    write(r, &format!("{IGB}/sriov_numvfs"), "2").unwrap();
    assert_ne!(
        func(r, "0000:01:10.2").iommu_group,
        before,
        "the NVMe VF took a freed number"
    );
}

#[test]
fn rule10_a_held_group_is_reported_with_its_process() {
    let t = build(layouts::domestic_gpu());
    let r = t.path();
    write(r, "sys/bus/pci/devices/0000:3b:00.0/sriov_numvfs", "4").unwrap();
    let vf = "0000:3b:00.4";
    write(
        r,
        &format!("sys/bus/pci/devices/{vf}/driver_override"),
        "vfio-pci",
    )
    .unwrap();
    write(r, "sys/bus/pci/drivers/mtgpu/unbind", vf).unwrap();
    write(r, "sys/bus/pci/drivers_probe", vf).unwrap();
    let group = func(r, vf).iommu_group.unwrap();
    fake::hold_group(r, 77, "cloud-hypervisor", group).unwrap();
    let host = Host::scan(&sys(r));
    assert_eq!(
        host.holders_of(host.get(&a(vf)).unwrap())[0].comm,
        "cloud-hypervisor"
    );
    let blocked = sys(r)
        .write(&a(vf), &r.join("sys/bus/pci/drivers/vfio-pci/unbind"), vf)
        .unwrap_err();
    assert!(
        matches!(blocked, vf_provisioner::Error::KernelWrite { ref source, .. } if source.kind() == std::io::ErrorKind::WouldBlock),
        "unbinding a held vfio-pci device blocks on the real kernel"
    );
}

#[test]
fn rule15_a_loaded_mdev_driver_has_its_module_dir_and_the_kernel_its_release() {
    let t = build(layouts::emulated());
    let r = t.path();
    assert!(
        r.join("sys/module/mtty").is_dir(),
        "mtty is a loaded module"
    );
    let version = std::fs::read_to_string(r.join("sys/module/mtty/version")).unwrap();
    assert_eq!(version, "0.1\n", "as the emulated host's mtty declares");
    let release = std::fs::read_to_string(r.join("proc/sys/kernel/osrelease")).unwrap();
    assert!(!release.trim().is_empty());
}

#[test]
fn read_only_attributes_refuse_writes_and_missing_ones_do_not_appear() {
    let t = build(layouts::emulated());
    let r = t.path();
    assert_eq!(
        write(r, &format!("{IGB}/vendor"), "0x1234"),
        Err(libc::EACCES)
    );
    assert_eq!(
        write(r, &format!("{IGB}/no_such_attr"), "1"),
        Err(libc::ENOENT)
    );
    assert!(!r.join(format!("{IGB}/no_such_attr")).exists());
}

#[test]
fn new_id_grabs_every_unbound_function_with_that_id() {
    let t = build(layouts::emulated());
    let r = t.path();
    write(r, &format!("{IGB}/sriov_numvfs"), "3").unwrap();
    for vf in ["0000:01:10.0", "0000:01:10.2", "0000:01:10.4"] {
        write(r, "sys/bus/pci/drivers/igbvf/unbind", vf).unwrap();
    }
    write(r, "sys/bus/pci/drivers/vfio-pci/new_id", "8086 10ca").unwrap();
    for vf in ["0000:01:10.0", "0000:01:10.2", "0000:01:10.4"] {
        assert_eq!(driver(r, vf).as_deref(), Some("vfio-pci"), "{vf}");
    }
}
