//! Built-in fake host layouts. Ids, classes and SR-IOV geometry follow the real
//! devices: the emulated host's igb (8086:10c9, 7 VFs at offset 0x80 stride 2) and
//! NVMe (1b36:0010) as seen on the real kernel, a Moore Threads S4000 with its
//! HDMI/DP audio companion in the same IOMMU group, and an NVIDIA A100.

use crate::address::PciAddress;
use crate::fake::{
    FakeDriver, FakeFunction, FakeMdevParent, FakeMdevType, FakeSriov, FakeVgpuType, Layout,
};

fn func(
    addr: &str,
    id: &str,
    class: &str,
    driver: Option<&str>,
    group: u32,
    numa: i32,
) -> FakeFunction {
    FakeFunction {
        address: addr.parse().expect("layout address"),
        id: id.into(),
        class: class.into(),
        driver: driver.map(str::to_string),
        numa_node: numa,
        iommu_group: Some(group),
        reset_methods: vec![],
        boot_vga: false,
        sriov: None,
    }
}

fn sriov(total: u32, offset: u32, stride: u32, vf_device: &str) -> Option<FakeSriov> {
    Some(FakeSriov {
        total_vfs: total,
        offset,
        stride,
        vf_device: vf_device.into(),
        num_vfs: 0,
        drivers_autoprobe: true,
        vgpu_types: vec![],
    })
}

fn driver(name: &str, ids: &[&str], sriov_configure: bool) -> FakeDriver {
    FakeDriver {
        name: name.into(),
        ids: ids.iter().map(|s| s.to_string()).collect(),
        sriov_configure,
    }
}

fn platform() -> Vec<FakeFunction> {
    vec![
        func("0000:00:00.0", "8086:29c0", "060000", None, 0, -1),
        func(
            "0000:00:01.0",
            "1b36:000c",
            "060400",
            Some("pcieport"),
            1,
            -1,
        ),
        func(
            "0000:00:02.0",
            "1b36:000c",
            "060400",
            Some("pcieport"),
            2,
            -1,
        ),
        func(
            "0000:00:03.0",
            "1b36:000c",
            "060400",
            Some("pcieport"),
            5,
            -1,
        ),
    ]
}

fn base(name: &str) -> Layout {
    Layout {
        name: name.into(),
        drivers: vec![driver("pcieport", &[], false)],
        functions: platform(),
        vfio_loaded: true,
        iommu: Some("dmar0".into()),
        cmdline: "console=ttyS0 intel_iommu=on iommu=pt".into(),
        mdev_parents: vec![],
    }
}

/// Moore Threads MTT S4000 PF with four VFs possible and the HDMI/DP audio function
/// in the PF's IOMMU group (the classic companion that makes a group non-viable).
pub fn domestic_gpu() -> Layout {
    let mut l = base("domestic-gpu");
    l.drivers
        .push(driver("mtgpu", &["1ed5:0323", "1ed5:0324"], true));
    l.drivers
        .push(driver("snd_hda_intel", &["1ed5:01ff"], false));
    let mut pf = func("0000:3b:00.0", "1ed5:0323", "030200", Some("mtgpu"), 20, 0);
    pf.reset_methods = vec!["flr".into(), "bus".into()];
    pf.sriov = sriov(4, 4, 1, "0324");
    l.functions.push(pf);
    l.functions.push(func(
        "0000:3b:00.1",
        "1ed5:01ff",
        "040300",
        Some("snd_hda_intel"),
        20,
        0,
    ));
    l
}

/// NVIDIA A100 PCIe 80GB on vGPU 17+: SR-IOV with 20 VFs, a vGPU type chosen per VF
/// through `nvidia/current_vgpu_type`. Time-sliced C-series types; one framebuffer
/// size per GPU, as NVIDIA documents.
pub fn nvidia_dc() -> Layout {
    let mut l = base("nvidia-dc");
    l.drivers.push(driver("nvidia", &["10de:20b5"], true));
    let mut pf = func("0000:ca:00.0", "10de:20b5", "030200", Some("nvidia"), 40, 1);
    pf.reset_methods = vec!["bus".into()];
    pf.sriov = sriov(20, 4, 1, "20b5");
    if let Some(s) = pf.sriov.as_mut() {
        s.vgpu_types = [
            (4, 20),
            (8, 10),
            (10, 8),
            (16, 5),
            (20, 4),
            (40, 2),
            (80, 1),
        ]
        .iter()
        .enumerate()
        .map(|(i, &(gib, max))| FakeVgpuType {
            id: 692 + i as u32,
            name: format!("NVIDIA A100D-{gib}C"),
            framebuffer_mib: gib * 1024,
            max_instances: max,
        })
        .collect();
    }
    l.functions.push(pf);
    l
}

/// NVIDIA Tesla T4 before vGPU 17: vGPU types are mdev types on the PF
/// (`nvidia-NNN`, description as the vendor writes it).
pub fn nvidia_mdev() -> Layout {
    let mut l = base("nvidia-mdev");
    l.drivers.push(driver("nvidia", &["10de:1eb8"], false));
    l.functions.push(func(
        "0000:af:00.0",
        "10de:1eb8",
        "030200",
        Some("nvidia"),
        50,
        1,
    ));
    let types = [1u32, 2, 4, 8, 16]
        .iter()
        .enumerate()
        .map(|(i, &gib)| FakeMdevType {
            id: format!("nvidia-{}", 222 + i),
            name: format!("GRID T4-{gib}Q"),
            description: format!(
                "num_heads=4, frl_config=60, framebuffer={}M, max_resolution=7680x4320, max_instance={}",
                gib * 1024,
                16 / gib
            ),
            device_api: "vfio-pci".into(),
            units: gib,
            group: Some(format!("{}M", gib * 1024)),
        })
        .collect();
    l.mdev_parents.push(FakeMdevParent {
        parent: "0000:af:00.0".into(),
        driver: "nvidia-vgpu-vfio".into(),
        units: 16,
        types,
        version: None,
    });
    l
}

/// The emulated host exactly as its kernel showed it: captured there by
/// `make regenerate-layouts` (igb and NVMe PFs with SR-IOV, and a multifunction slot
/// of two e1000e functions sharing one IOMMU group, the GPU-plus-HDMI-audio case).
pub fn emulated() -> Layout {
    Layout::from_json(include_str!("../layouts/emulated.json")).expect("committed layout parses")
}

/// Every layout above in one host: the demo and the CLI's default fake.
pub fn demo() -> Layout {
    let mut l = emulated();
    l.name = "demo".into();
    for other in [domestic_gpu(), nvidia_dc(), nvidia_mdev()] {
        for d in other.drivers {
            if !l.drivers.iter().any(|x| x.name == d.name) {
                l.drivers.push(d);
            }
        }
        l.functions
            .extend(other.functions.into_iter().filter(|f| f.address.bus != 0));
        l.mdev_parents.extend(other.mdev_parents);
    }
    l
}

/// `pfs` domestic GPU PFs with `vfs` VFs each enabled and bound to the VF driver.
pub fn large(pfs: u32, vfs: u32) -> Layout {
    let mut l = base("large");
    l.drivers
        .push(driver("mtgpu", &["1ed5:0323", "1ed5:0324"], true));
    for i in 0..pfs {
        let bus = 0x10 + i as u8;
        let addr = PciAddress::new(0, bus, 0, 0).to_string();
        let mut pf = func(
            &addr,
            "1ed5:0323",
            "030200",
            Some("mtgpu"),
            10 + i,
            (i % 2) as i32,
        );
        pf.reset_methods = vec!["flr".into()];
        pf.sriov = sriov(vfs.max(1), 1, 1, "0324");
        if let Some(s) = pf.sriov.as_mut() {
            s.num_vfs = vfs;
        }
        l.functions.push(pf);
    }
    l
}

/// Looks a layout up by name.
pub fn by_name(name: &str) -> Option<Layout> {
    match name {
        "domestic-gpu" => Some(domestic_gpu()),
        "nvidia-dc" => Some(nvidia_dc()),
        "nvidia-mdev" => Some(nvidia_mdev()),
        "emulated" => Some(emulated()),
        "demo" => Some(demo()),
        _ => None,
    }
}

pub const NAMES: &[&str] = &[
    "demo",
    "domestic-gpu",
    "nvidia-dc",
    "nvidia-mdev",
    "emulated",
];
