//! The policy layer on fake hosts: create/remove with refusals and rollback,
//! mdevctl definitions, boot start, vGPU 17+ types, and the plan.

use std::path::Path;

use mediated_dev::{plan, Definition, Error, Kind, Mediator, Start, Store, Want};
use vf_provisioner::{fake, layouts, Sysfs};

fn host(layout: fake::Layout) -> (tempfile::TempDir, Mediator) {
    let dir = tempfile::tempdir().unwrap();
    layout.build(dir.path()).unwrap();
    let m = Mediator::new(Sysfs::open_fake(dir.path()).unwrap());
    (dir, m)
}

fn def(uuid: &str, parent: &str, ty: &str, start: Start) -> Definition {
    serde_json::from_value::<mediated_dev::mdevctl::Config>(serde_json::json!({
        "mdev_type": ty, "start": start, "attrs": []
    }))
    .map(|config| Definition {
        uuid: uuid.parse().unwrap(),
        parent: parent.parse().unwrap(),
        config,
    })
    .unwrap()
}

fn enable_a100_vfs(root: &Path, n: u32) {
    let numvfs = root.join("sys/bus/pci/devices/0000:ca:00.0/sriov_numvfs");
    Sysfs::open_fake(root)
        .unwrap()
        .write_attr(&numvfs, &n.to_string())
        .unwrap();
}

fn available(m: &Mediator, ty: &str) -> u32 {
    let h = m.scan();
    h.parent("mtty")
        .unwrap()
        .find_type(ty)
        .unwrap()
        .available_instances
}

#[test]
fn create_and_remove_an_mtty_mdev() {
    let (_t, m) = host(layouts::emulated());
    let d = m
        .create(&"mtty".parse().unwrap(), &"mtty-2".parse().unwrap(), None)
        .unwrap();
    assert_eq!(d.driver.as_deref(), Some("mtty"));
    assert!(d.iommu_group.is_some());
    assert_eq!(available(&m, "mtty-2"), 11);
    m.remove(&d.uuid).unwrap();
    assert_eq!(available(&m, "mtty-2"), 12);
    assert!(m.scan().mdevs.is_empty());
}

#[test]
fn refusals_name_the_device_and_change_nothing() {
    let (t, m) = host(layouts::emulated());
    let e = m
        .create(&"nope".parse().unwrap(), &"mtty-2".parse().unwrap(), None)
        .unwrap_err();
    assert_eq!(e.kind(), Kind::BadInput);
    let e = m
        .create(&"mtty".parse().unwrap(), &"mtty-9".parse().unwrap(), None)
        .unwrap_err();
    assert!(e.to_string().contains("mtty-1, mtty-2"), "{e}");
    for _ in 0..12 {
        m.create(&"mtty".parse().unwrap(), &"mtty-2".parse().unwrap(), None)
            .unwrap();
    }
    let e = m
        .create(&"mtty".parse().unwrap(), &"mtty-2".parse().unwrap(), None)
        .unwrap_err();
    assert_eq!(e.kind(), Kind::Refused);
    assert!(
        e.to_string()
            .contains("mtty type mtty-2: no instance of this type fits (12 in use)"),
        "{e}"
    );
    assert_eq!(m.scan().mdevs.len(), 12, "nothing was created");
    // A held group refuses removal, naming the holder.
    let d = m.scan().mdevs[0].clone();
    fake::hold_group(t.path(), 77, "qemu-system-x86", d.iommu_group.unwrap()).unwrap();
    let e = m.remove(&d.uuid).unwrap_err();
    assert!(e.to_string().contains("qemu-system-x86 (pid 77)"), "{e}");
    let e = m
        .create(
            &"mtty".parse().unwrap(),
            &"mtty-1".parse().unwrap(),
            Some(d.uuid),
        )
        .unwrap_err();
    assert!(
        matches!(e, Error::Refused { .. }) && e.to_string().contains("in use"),
        "{e}"
    );
}

#[test]
fn a_create_that_loses_a_race_for_capacity_leaves_nothing() {
    // available_instances says one fits, but by the time of the write the capacity
    // is gone (another writer, or a type that costs more than it showed): the
    // driver's probe fails and the kernel refuses the write (rule 11).
    let (t, m) = host(layouts::emulated());
    let tdir = t
        .path()
        .join("sys/devices/virtual/mtty/mtty/mdev_supported_types/mtty-2");
    std::fs::write(tdir.join(".fake_units"), "100\n").unwrap();
    std::fs::write(tdir.join("available_instances"), "1\n").unwrap();
    let m = m.with_timeout(std::time::Duration::from_millis(50));
    let e = m
        .create(&"mtty".parse().unwrap(), &"mtty-2".parse().unwrap(), None)
        .unwrap_err();
    assert!(
        e.to_string().contains("no instance of this type fits"),
        "{e}"
    );
    assert!(m.scan().mdevs.is_empty(), "nothing left behind");
}

#[test]
fn definitions_are_mdevctl_files_and_start_at_boot() {
    let (t, m) = host(layouts::emulated());
    let store = Store::new(t.path());
    let u1 = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001";
    let u2 = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1002";
    store
        .write(&def(u1, "mtty", "mtty-2", Start::Auto))
        .unwrap();
    store
        .write(&def(u2, "mtty", "mtty-1", Start::Manual))
        .unwrap();
    let text = std::fs::read_to_string(t.path().join("etc/mdevctl.d/mtty").join(u1)).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"mdev_type": "mtty-2", "start": "auto", "attrs": []})
    );
    // A stray file is reported, not fatal; mdevctl's scripts.d is not a parent.
    std::fs::create_dir_all(t.path().join("etc/mdevctl.d/scripts.d/callouts")).unwrap();
    std::fs::write(t.path().join("etc/mdevctl.d/mtty/garbage"), "{").unwrap();
    let (defs, problems) = store.list();
    assert_eq!(defs.len(), 2);
    assert_eq!(problems.len(), 1);
    let dump = mediated_dev::mdevctl::dump_json(&defs);
    assert_eq!(dump[0]["mtty"][0][u1]["mdev_type"], "mtty-2");
    let started = m.start_auto(&store, &|_| None);
    assert_eq!(started.len(), 1);
    assert!(started[0].1.is_ok());
    assert_eq!(m.scan().mdevs[0].uuid.to_string(), u1);
    // Starting again leaves the active one alone.
    assert!(matches!(
        m.start_auto(&store, &|_| None)[0].1,
        Ok(mediated_dev::ops::Started::AlreadyActive(_))
    ));
    // The same UUID on another parent is refused.
    assert!(store
        .write(&def(u1, "0000:af:00.0", "nvidia-222", Start::Auto))
        .is_err());
    assert!(store.remove(&u1.parse().unwrap()).unwrap());
    assert!(!Path::new(&t.path().join("etc/mdevctl.d/mtty").join(u1)).exists());
}

#[test]
fn hostile_definition_files_are_problems_and_write_nothing_outside_the_mdev() {
    let (t, m) = host(layouts::emulated());
    let store = Store::new(t.path());
    let dir = t.path().join("etc/mdevctl.d/mtty");
    std::fs::create_dir_all(&dir).unwrap();
    let u1 = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001";
    let u2 = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1002";
    // A type that climbs out of mdev_supported_types is not a definition.
    std::fs::write(
        dir.join(u1),
        r#"{"mdev_type": "../../../../tmp", "start": "auto"}"#,
    )
    .unwrap();
    // An attribute name that climbs out of the new mdev's directory.
    std::fs::write(
        dir.join(u2),
        r#"{"mdev_type": "mtty-2", "start": "auto", "attrs": [{"../../../../../../escaped": "1"}]}"#,
    )
    .unwrap();
    let (defs, problems) = store.list();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].reason.contains("mdev type"), "{problems:?}");
    let started = m.start_auto(&store, &|_| None);
    assert_eq!(started.len(), 1);
    let e = started[0].1.as_ref().unwrap_err();
    assert_eq!(e.kind(), Kind::BadInput, "{e}");
    assert!(e.to_string().contains("mdev attribute"), "{e}");
    assert!(m.scan().mdevs.is_empty(), "the new mdev was removed again");
    assert!(!t.path().join("escaped").exists());
    assert_eq!(defs.len(), 1);
}

#[test]
fn vgpu17_set_and_clear_with_refusals() {
    let (t, m) = host(layouts::nvidia_dc());
    enable_a100_vfs(t.path(), 3);
    let vf0 = "0000:ca:00.4".parse().unwrap();
    let vf1 = "0000:ca:00.5".parse().unwrap();
    let t0 = m.set_vgpu(&vf0, "NVIDIA A100D-40C").unwrap();
    let e = m.set_vgpu(&vf0, "NVIDIA A100D-40C").unwrap_err();
    assert!(
        e.to_string()
            .contains("clear it first with `vfctl vgpu clear 0000:ca:00.4`"),
        "{e}"
    );
    let e = m.set_vgpu(&vf1, "NVIDIA A100D-4C").unwrap_err();
    assert!(
        e.to_string()
            .contains("pick one that fits now: NVIDIA A100D-40C"),
        "{e}"
    );
    m.set_vgpu(&vf1, &t0.id.to_string()).unwrap();
    let e = m
        .set_vgpu(&"0000:01:00.0".parse().unwrap(), "x")
        .unwrap_err();
    assert_eq!(e.kind(), Kind::Refused);
    m.clear_vgpu(&vf0).unwrap();
    assert!(m
        .scan()
        .vgpus
        .iter()
        .any(|s| s.vf == vf0 && s.current.is_none()));
}

fn wants(s: &[&str]) -> Vec<Want> {
    s.iter().map(|w| w.parse().unwrap()).collect()
}

#[test]
fn plan_places_mixed_mtty_types_as_the_kernel_would() {
    let (_t, m) = host(layouts::emulated());
    let p = plan(&m.scan(), &wants(&["mtty-2:10", "mtty-1:4"]));
    assert!(p.fits(), "{p:?}");
    let p = plan(&m.scan(), &wants(&["mtty-2:10", "mtty-1:5"]));
    assert_eq!(p.shortfalls[0].missing, 1, "24 ports: 20 + 4");
    // The plan agrees with the kernel after the fact.
    for pl in plan(&m.scan(), &wants(&["mtty-2:10", "mtty-1:4"])).placements {
        let mediated_dev::plan::Target::Mdev { parent, type_id } = pl.target else {
            panic!()
        };
        m.create(&parent, &type_id, None).unwrap();
    }
    assert_eq!(available(&m, "mtty-1"), 0);
}

#[test]
fn plan_keeps_one_framebuffer_size_per_nvidia_gpu() {
    let (t, m) = host(layouts::nvidia_dc());
    enable_a100_vfs(t.path(), 8);
    let p = plan(&m.scan(), &wants(&["NVIDIA A100D-20C:4"]));
    assert!(p.fits(), "{p:?}");
    let p = plan(
        &m.scan(),
        &wants(&["NVIDIA A100D-20C:2", "NVIDIA A100D-10C:1"]),
    );
    assert_eq!(p.placements.len(), 2);
    assert_eq!(p.shortfalls[0].profile, "NVIDIA A100D-10C");
    let p = plan(&m.scan(), &wants(&["NVIDIA A100D-20C:5"]));
    assert_eq!(p.shortfalls[0].missing, 1, "80 GB holds four");
    let p = plan(&m.scan(), &wants(&["no-such-type"]));
    assert!(p.shortfalls[0].reason.contains("no parent or VF"), "{p:?}");
    // mdev-based NVIDIA types follow the same rule.
    let (_t2, m2) = host(layouts::nvidia_mdev());
    let p = plan(&m2.scan(), &wants(&["GRID T4-2Q:8", "GRID T4-1Q:1"]));
    assert_eq!(p.placements.len(), 8);
    assert_eq!(p.shortfalls.len(), 1);
}
