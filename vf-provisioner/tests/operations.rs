//! The policy layer on the fake kernel: each operation, its refusals (which change
//! nothing) and its rollback.

mod common;
use common::*;
use std::fs;
use vf_provisioner::{fake, layouts, DeviceFilter, Error, Host, Kind, Provisioner};

fn snapshot(root: &std::path::Path) -> String {
    serde_json::to_string(&Host::scan(&sys(root))).unwrap()
}

fn assert_refused<T: std::fmt::Debug>(r: vf_provisioner::Result<T>, needle: &str) -> String {
    let e = r.expect_err("expected a refusal");
    assert_eq!(e.kind(), Kind::Refused, "{e}");
    let msg = e.to_string();
    assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
    msg
}

#[test]
fn enable_defaults_to_four_vfs_on_a_domestic_gpu_and_leaves_them_unbound() {
    let t = build(layouts::domestic_gpu());
    let p = Provisioner::new(sys(t.path()), DeviceFilter::default());
    let vfs = p.enable_vfs(&a("0000:3b:00.0"), None).unwrap();
    assert_eq!(
        vfs.iter().map(|v| v.to_string()).collect::<Vec<_>>(),
        [
            "0000:3b:00.4",
            "0000:3b:00.5",
            "0000:3b:00.6",
            "0000:3b:00.7"
        ]
    );
    assert!(
        vfs.iter()
            .all(|v| driver(t.path(), &v.to_string()).is_none()),
        "autoprobe was off"
    );
    assert!(
        func(t.path(), "0000:3b:00.0")
            .sriov
            .unwrap()
            .drivers_autoprobe,
        "autoprobe restored"
    );
}

#[test]
fn enable_same_count_is_a_no_op_and_n_to_m_goes_through_zero() {
    let t = build(layouts::emulated());
    let p = provisioner(t.path());
    let pf = a("0000:01:00.0");
    p.enable_vfs(&pf, Some(4)).unwrap();
    assert_eq!(p.enable_vfs(&pf, Some(4)).unwrap().len(), 4);
    assert_eq!(p.enable_vfs(&pf, Some(2)).unwrap().len(), 2);
    assert_eq!(func(t.path(), "0000:01:00.0").sriov.unwrap().num_vfs, 2);
}

#[test]
fn enable_refuses_too_many_vfs_and_changes_nothing() {
    let t = build(layouts::emulated());
    let p = provisioner(t.path());
    let before = snapshot(t.path());
    let msg = assert_refused(p.enable_vfs(&a("0000:01:00.0"), Some(8)), "at most 7");
    assert!(msg.contains("0000:01:00.0"));
    assert_eq!(snapshot(t.path()), before);
}

#[test]
fn enable_refuses_unmanaged_devices_vfs_and_devices_without_sriov() {
    let t = build(layouts::demo());
    let p = Provisioner::new(sys(t.path()), DeviceFilter::default());
    assert_refused(p.enable_vfs(&a("0000:01:00.0"), Some(1)), "manage");
    // The GPU's audio function is the card's (it shares the slot): ours, but it
    // has no SR-IOV.
    assert_refused(p.enable_vfs(&a("0000:3b:00.1"), Some(1)), "no SR-IOV");
    p.enable_vfs(&a("0000:3b:00.0"), Some(1)).unwrap();
    assert_refused(
        p.enable_vfs(&a("0000:3b:00.4"), Some(1)),
        "use its PF 0000:3b:00.0",
    );
    let err = p.enable_vfs(&a("0000:99:00.0"), Some(1)).unwrap_err();
    assert_eq!(err.kind(), Kind::BadInput);
}

#[test]
fn changing_or_disabling_is_refused_while_a_vf_is_open_and_allowed_after() {
    let t = build(layouts::emulated());
    let r = t.path();
    let p = provisioner(r);
    let pf = a("0000:01:00.0");
    let vfs = p.enable_vfs(&pf, Some(4)).unwrap();
    p.bind_vfio(&vfs[1], false).unwrap();
    let group = func(r, "0000:01:10.2").iommu_group.unwrap();
    fake::hold_group(r, 999, "qemu-system-x86", group).unwrap();
    let before = snapshot(r);
    let msg = assert_refused(p.disable_vfs(&pf), "0000:01:10.2");
    assert!(msg.contains("qemu-system-x86 (pid 999)"), "{msg}");
    assert_refused(p.enable_vfs(&pf, Some(2)), "in use");
    assert_refused(p.unbind(&vfs[1], false, None), "held open");
    assert_refused(p.reset(&vfs[1]), "held open");
    assert_eq!(snapshot(r), before);
    fake::end_process(r, 999).unwrap();
    p.disable_vfs(&pf).unwrap();
    assert_eq!(func(r, "0000:01:00.0").sriov.unwrap().num_vfs, 0);
}

#[test]
fn leased_vfs_are_refused_too() {
    struct Leases;
    impl vf_provisioner::Facts for Leases {
        fn lease_of(&self, name: &str) -> Option<String> {
            (name == "0000:01:10.0").then(|| "VM web-1".into())
        }
        fn health(&self, _: &str) -> Option<vf_provisioner::Health> {
            None
        }
    }
    let t = build(layouts::emulated());
    let p = provisioner(t.path()).with_facts(std::sync::Arc::new(Leases));
    p.enable_vfs(&a("0000:01:00.0"), Some(2)).unwrap();
    assert_refused(p.disable_vfs(&a("0000:01:00.0")), "VM web-1");
}

#[test]
fn bind_and_unbind_round_trip_to_the_original_host_driver() {
    let t = build(layouts::emulated());
    let r = t.path();
    let p = provisioner(r);
    let vfs = p.enable_vfs(&a("0000:01:00.0"), Some(2)).unwrap();
    // A VF on its host driver first (as if autoprobe had been on).
    p.unbind(&vfs[0], false, None).unwrap();
    assert_eq!(driver(r, "0000:01:10.0").as_deref(), Some("igbvf"));
    let moved = p.bind_vfio(&vfs[0], false).unwrap();
    assert_eq!(moved[0].from.as_deref(), Some("igbvf"));
    assert_eq!(driver(r, "0000:01:10.0").as_deref(), Some("vfio-pci"));
    assert!(
        p.bind_vfio(&vfs[0], false).unwrap().is_empty(),
        "binding twice is a no-op"
    );
    p.unbind(&vfs[0], false, None).unwrap();
    assert_eq!(driver(r, "0000:01:10.0").as_deref(), Some("igbvf"));
    assert_eq!(func(r, "0000:01:10.0").driver_override, None);
    assert!(
        func(r, "0000:01:00.0").sriov.unwrap().drivers_autoprobe,
        "autoprobe restored after the reprobe"
    );
}

#[test]
fn bind_refuses_a_non_viable_group_naming_the_companion_unless_whole_group() {
    let t = build(layouts::domestic_gpu());
    let r = t.path();
    let p = Provisioner::new(sys(r), DeviceFilter::default());
    let before = snapshot(r);
    let msg = assert_refused(p.bind_vfio(&a("0000:3b:00.0"), false), "0000:3b:00.1");
    assert!(
        msg.contains("snd_hda_intel") && msg.contains("--whole-group"),
        "{msg}"
    );
    assert_eq!(snapshot(r), before);
    let moved = p.bind_vfio(&a("0000:3b:00.0"), true).unwrap();
    assert_eq!(moved.len(), 2);
    assert_eq!(driver(r, "0000:3b:00.1").as_deref(), Some("vfio-pci"));
    p.unbind(&a("0000:3b:00.0"), true, None).unwrap();
    assert_eq!(driver(r, "0000:3b:00.0").as_deref(), Some("mtgpu"));
    assert_eq!(driver(r, "0000:3b:00.1").as_deref(), Some("snd_hda_intel"));
}

#[test]
fn bind_never_takes_host_critical_functions() {
    let t = build(layouts::emulated());
    let r = t.path();
    let cfg = vf_provisioner::DeviceConfig::parse(
        "manage = [\"0000:00:02.0\", \"8086:10c9\"]",
        std::path::Path::new("t"),
    )
    .unwrap();
    let p = Provisioner::new(sys(r), DeviceFilter::new(&cfg));
    assert_refused(p.bind_vfio(&a("0000:00:02.0"), false), "bridge");
    // The NIC carries an interface that is up.
    let net = r.join("sys/devices/pci0000:00/0000:01:00.0/net/eth0");
    fs::create_dir_all(&net).unwrap();
    fs::write(net.join("flags"), "0x1003\n").unwrap();
    assert_refused(p.bind_vfio(&a("0000:01:00.0"), false), "eth0");
}

#[test]
fn bind_never_takes_the_boot_display() {
    let mut layout = layouts::domestic_gpu();
    let console: fake::FakeFunction = serde_json::from_str(
        r#"{"address": "0000:65:00.0", "id": "1ed5:0323", "class": "030000", "driver": "mtgpu",
            "numa_node": 0, "iommu_group": 30, "reset_methods": [], "boot_vga": true, "sriov": null}"#,
    )
    .unwrap();
    layout.functions.push(console);
    let t = build(layout);
    let p = provisioner(t.path());
    let before = snapshot(t.path());
    assert_refused(p.bind_vfio(&a("0000:65:00.0"), false), "boot display");
    assert_eq!(snapshot(t.path()), before);
}

/// The fake kernel, failing writes to paths that end with `fail_suffix`.
struct Faulty {
    inner: fake::FakeKernel,
    fail_suffix: String,
}

impl vf_provisioner::sysfs::KernelWrite for Faulty {
    fn write(&self, path: &std::path::Path, data: &str) -> std::io::Result<()> {
        if path.to_string_lossy().ends_with(&self.fail_suffix) {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        self.inner.write(path, data)
    }
}

fn faulty(root: &std::path::Path, fail_suffix: &str) -> Provisioner {
    let kernel = Faulty {
        inner: fake::FakeKernel::new(root),
        fail_suffix: fail_suffix.into(),
    };
    let sys = vf_provisioner::Sysfs::with_kernel(root, std::sync::Arc::new(kernel));
    Provisioner::new(sys, DeviceFilter::default())
}

#[test]
fn bind_rolls_back_the_group_when_a_later_member_fails() {
    let t = build(layouts::domestic_gpu());
    let r = t.path();
    let before = snapshot(r);
    // The PF moves first; the companion's unbind from snd_hda_intel then fails.
    let e = faulty(r, "snd_hda_intel/unbind")
        .bind_vfio(&a("0000:3b:00.0"), true)
        .unwrap_err();
    assert_eq!(e.kind(), Kind::Failed, "{e}");
    assert!(e.to_string().contains("0000:3b:00.1"), "{e}");
    assert_eq!(
        snapshot(r),
        before,
        "the PF went back to mtgpu and its override was cleared"
    );
}

#[test]
fn enable_rolls_back_when_restoring_autoprobe_fails() {
    let t = build(layouts::domestic_gpu());
    let r = t.path();
    // Turning autoprobe off before the numvfs write fails: nothing may be enabled.
    let e = faulty(r, "sriov_drivers_autoprobe")
        .enable_vfs(&a("0000:3b:00.0"), Some(2))
        .unwrap_err();
    assert_eq!(e.kind(), Kind::Failed);
    assert_eq!(
        func(r, "0000:3b:00.0").sriov.unwrap().num_vfs,
        0,
        "nothing enabled"
    );
}

#[test]
fn reset_needs_a_kernel_reset_method() {
    let t = build(layouts::domestic_gpu());
    let r = t.path();
    let p = Provisioner::new(sys(r), DeviceFilter::default());
    p.reset(&a("0000:3b:00.0")).unwrap();
    assert_eq!(fake::reset_count(r, &a("0000:3b:00.0")), 1);
    fs::remove_file(r.join("sys/devices/pci0000:00/0000:3b:00.0/reset_method")).unwrap();
    assert_refused(p.reset(&a("0000:3b:00.0")), "no reset method");
}

#[test]
fn vfio_pci_pf_is_refused_without_enable_sriov_with_the_fix() {
    let t = build(layouts::domestic_gpu());
    let r = t.path();
    let p = Provisioner::new(sys(r), DeviceFilter::default());
    p.bind_vfio(&a("0000:3b:00.0"), true).unwrap();
    assert_refused(p.enable_vfs(&a("0000:3b:00.0"), Some(2)), "enable_sriov");
    write(r, "sys/module/vfio_pci/parameters/enable_sriov", "Y").unwrap();
    let vfs = p.enable_vfs(&a("0000:3b:00.0"), Some(2)).unwrap();
    assert_eq!(
        func(r, &vfs[0].to_string()).driver_override.as_deref(),
        Some("vfio-pci")
    );
}

#[test]
fn check_reports_iommu_vfio_and_the_non_viable_gpu_group() {
    let t = build(layouts::domestic_gpu());
    let p = Provisioner::new(sys(t.path()), DeviceFilter::default());
    let findings = p.check();
    assert_eq!(findings[0].level, vf_provisioner::Level::Ok, "{findings:?}");
    assert!(findings
        .iter()
        .any(|f| f.message.contains("0000:3b:00.1") && f.level == vf_provisioner::Level::Warn));
    let t2 = build(vf_provisioner::fake::Layout {
        iommu: None,
        vfio_loaded: false,
        ..layouts::emulated()
    });
    fs::remove_dir_all(t2.path().join("sys/kernel/iommu_groups")).unwrap();
    fs::create_dir_all(t2.path().join("sys/kernel/iommu_groups")).unwrap();
    let f2 = Provisioner::new(sys(t2.path()), DeviceFilter::default()).check();
    assert!(
        f2.iter()
            .filter(|f| f.level == vf_provisioner::Level::Error)
            .count()
            >= 2,
        "{f2:?}"
    );
}

#[test]
fn a_root_that_is_not_sysfs_is_refused() {
    let d = tempfile::tempdir().unwrap();
    assert!(matches!(
        vf_provisioner::Sysfs::open_fake(d.path()),
        Err(Error::NotSysfs { .. })
    ));
}

/// The fake kernel is the caller's choice: a real-looking tree without the fake's
/// marker is refused to it, and `open` never picks the fake from a marker.
#[test]
fn the_fake_kernel_is_chosen_explicitly_never_by_a_marker() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("sys/bus/pci/devices")).unwrap();
    assert!(matches!(
        vf_provisioner::Sysfs::open_fake(d.path()),
        Err(Error::NotSysfs { .. })
    ));
    assert!(matches!(
        vf_provisioner::Sysfs::open_fake("/"),
        Err(Error::NotSysfs { .. })
    ));
    let fake = tempfile::tempdir().unwrap();
    vf_provisioner::layouts::emulated()
        .build(fake.path())
        .unwrap();
    let real = vf_provisioner::Sysfs::open(fake.path()).unwrap();
    let path = real.device_attr(&"0000:01:00.0".parse().unwrap(), "sriov_numvfs");
    // The real kernel's write: a plain file write, which the fake would have
    // answered by making VFs.
    real.write(&"0000:01:00.0".parse().unwrap(), &path, "2")
        .unwrap();
    assert!(!fake
        .path()
        .join("sys/bus/pci/devices/0000:01:10.0")
        .exists());
}
