//! The fake kernel's mdev and vGPU rules (kernel rules 6 and 11 in docs/kernel.md as the
//! 6.12 kernel showed them, mtty's
//! shared port capacity, NVIDIA's documented per-VF vGPU behaviour), written as raw
//! sysfs writes so that the same expectations hold against the real kernel.

use std::io::ErrorKind;
use std::path::Path;

use vf_provisioner::{fake, layouts, Sysfs};

const MTTY2: &str = "sys/class/mdev_bus/mtty/mdev_supported_types/mtty-2";
const MTTY1: &str = "sys/class/mdev_bus/mtty/mdev_supported_types/mtty-1";
const U1: &str = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001";

fn build(layout: fake::Layout) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    layout.build(dir.path()).unwrap();
    dir
}

fn write(root: &Path, rel: &str, data: &str) -> Result<(), i32> {
    let sys = Sysfs::open_fake(root).unwrap();
    sys.write_attr(&root.join(rel), data).map_err(|e| {
        e.raw_os_error()
            .unwrap_or(if e.kind() == ErrorKind::WouldBlock {
                -11
            } else {
                -1
            })
    })
}

fn read(root: &Path, rel: &str) -> String {
    std::fs::read_to_string(root.join(rel))
        .unwrap()
        .trim()
        .to_string()
}

fn uuid(i: u32) -> String {
    format!("83b8f4f2-509f-382f-3c1e-e6bfe0fa{i:04x}")
}

#[test]
fn create_gives_a_bound_mdev_with_its_own_group_and_takes_capacity() {
    let t = build(layouts::emulated());
    let r = t.path();
    assert_eq!(read(r, &format!("{MTTY1}/available_instances")), "24");
    assert_eq!(read(r, &format!("{MTTY2}/available_instances")), "12");
    write(r, &format!("{MTTY2}/create"), U1).unwrap();
    let dev = format!("sys/bus/mdev/devices/{U1}");
    assert!(r.join(&dev).join("driver").exists());
    let group = std::fs::read_link(r.join(&dev).join("iommu_group")).unwrap();
    let g = group.file_name().unwrap().to_str().unwrap();
    assert!(r.join("dev/vfio").join(g).exists());
    assert_eq!(
        read(r, &format!("{MTTY1}/available_instances")),
        "22",
        "a dual port takes two"
    );
    assert_eq!(read(r, &format!("{MTTY2}/available_instances")), "11");
    assert_eq!(write(r, &format!("{MTTY1}/create"), U1), Err(libc::EEXIST));
    assert_eq!(
        write(r, &format!("{MTTY1}/create"), "not-a-uuid"),
        Err(libc::EINVAL)
    );
    write(r, &format!("{dev}/remove"), "1").unwrap();
    assert!(!r.join(&dev).exists());
    assert!(!r.join("dev/vfio").join(g).exists());
    assert_eq!(read(r, &format!("{MTTY1}/available_instances")), "24");
}

#[test]
fn rule11_create_beyond_capacity_fails_and_leaves_nothing() {
    let t = build(layouts::emulated());
    let r = t.path();
    for i in 0..12 {
        write(r, &format!("{MTTY2}/create"), &uuid(i)).unwrap();
    }
    assert_eq!(read(r, &format!("{MTTY2}/available_instances")), "0");
    assert_eq!(
        write(r, &format!("{MTTY2}/create"), &uuid(99)),
        Err(libc::ENOSPC),
        "mtty's probe error"
    );
    assert!(
        !r.join("sys/bus/mdev/devices").join(uuid(99)).exists(),
        "the kernel deleted it"
    );
}

#[test]
fn rule6_an_unbound_mdev_cannot_be_bound_again() {
    let t = build(layouts::emulated());
    let r = t.path();
    write(r, &format!("{MTTY1}/create"), U1).unwrap();
    write(r, "sys/bus/mdev/drivers/mtty/unbind", U1).unwrap();
    assert_eq!(
        write(r, "sys/bus/mdev/drivers/mtty/bind", U1),
        Err(libc::ENODEV)
    );
}

#[test]
fn remove_blocks_while_the_group_is_open() {
    let t = build(layouts::emulated());
    let r = t.path();
    write(r, &format!("{MTTY1}/create"), U1).unwrap();
    let dev = format!("sys/bus/mdev/devices/{U1}");
    let group: u32 = std::fs::read_link(r.join(&dev).join("iommu_group"))
        .unwrap()
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    fake::hold_group(r, 4242, "qemu-system-x86", group).unwrap();
    assert_eq!(write(r, &format!("{dev}/remove"), "1"), Err(-11));
    fake::end_process(r, 4242).unwrap();
    write(r, &format!("{dev}/remove"), "1").unwrap();
}

#[test]
fn nvidia_mdev_types_of_another_framebuffer_size_drop_to_zero() {
    let t = build(layouts::nvidia_mdev());
    let r = t.path();
    let ty = |id: &str| format!("sys/class/mdev_bus/0000:af:00.0/mdev_supported_types/{id}");
    assert_eq!(
        read(r, &format!("{}/available_instances", ty("nvidia-223"))),
        "8"
    );
    write(r, &format!("{}/create", ty("nvidia-223")), U1).unwrap();
    assert_eq!(
        read(r, &format!("{}/available_instances", ty("nvidia-223"))),
        "7"
    );
    assert_eq!(
        read(r, &format!("{}/available_instances", ty("nvidia-222"))),
        "0"
    );
    assert_eq!(
        read(r, &format!("{}/available_instances", ty("nvidia-226"))),
        "0"
    );
}

#[test]
fn nvidia_vgpu17_creatable_types_shrink_as_vfs_take_types() {
    let t = build(layouts::nvidia_dc());
    let r = t.path();
    write(r, "sys/bus/pci/devices/0000:ca:00.0/sriov_numvfs", "4").unwrap();
    let vf = |i: u32| format!("sys/bus/pci/devices/0000:ca:00.{}/nvidia", 4 + i);
    let all = read(r, &format!("{}/creatable_vgpu_types", vf(0)));
    assert!(
        all.starts_with("ID    : vGPU Name") && all.contains("NVIDIA A100D-80C"),
        "{all}"
    );
    assert_eq!(read(r, &format!("{}/current_vgpu_type", vf(0))), "0");
    // A40C: two fit on the GPU; once two VFs hold it nothing else is creatable.
    let id40 = all
        .lines()
        .find(|l| l.ends_with("A100D-40C"))
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .trim()
        .to_string();
    write(r, &format!("{}/current_vgpu_type", vf(0)), &id40).unwrap();
    let after = read(r, &format!("{}/creatable_vgpu_types", vf(1)));
    assert!(
        after.contains("A100D-40C") && !after.contains("A100D-4C"),
        "one size per GPU: {after}"
    );
    assert_eq!(
        write(r, &format!("{}/current_vgpu_type", vf(0)), &id40),
        Err(libc::EBUSY),
        "clear first"
    );
    write(r, &format!("{}/current_vgpu_type", vf(1)), &id40).unwrap();
    assert_eq!(
        read(r, &format!("{}/creatable_vgpu_types", vf(2))),
        "ID    : vGPU Name"
    );
    assert_eq!(
        write(r, &format!("{}/current_vgpu_type", vf(2)), &id40),
        Err(libc::EINVAL)
    );
    write(r, &format!("{}/current_vgpu_type", vf(0)), "0").unwrap();
    assert!(read(r, &format!("{}/creatable_vgpu_types", vf(2))).contains("A100D-40C"));
}

/// The fake runs inside the daemon, so a SIGKILL can cut its create in two; a
/// create cut off before the device reached the bus left nothing that a second
/// create of the same UUID trips over (the kernel's write cannot be cut).
#[test]
fn a_create_cut_off_before_the_bus_leaves_nothing_behind() {
    let t = build(layouts::emulated());
    let r = t.path();
    let dev = r.join("sys/devices/virtual/mtty/mtty").join(U1);
    std::fs::create_dir_all(&dev).unwrap();
    std::os::unix::fs::symlink("../mdev_supported_types/mtty-1", dev.join("mdev_type")).unwrap();
    write(r, &format!("{MTTY1}/create"), U1).unwrap();
    let bus = r.join("sys/bus/mdev/devices").join(U1);
    assert!(bus.join("driver").exists() && bus.join("iommu_group").exists());
}
