//! Each provisioning operation done by the project beside the bare sysfs writes
//! that do the same thing, in one process on one host, alternating, and the ratio.
//! Runs in the emulated host (`make bench-real-kernel`) or on a fake host.
//! Usage: bench-ops ROOT [ITERATIONS]   (uses the igb PF at 0000:01:00.0)

use std::path::Path;
use std::time::{Duration, Instant};

use integration_tests::{addr, IGB};
use vf_provisioner::{DeviceConfig, DeviceFilter, PciAddress, Provisioner, Sysfs};

struct Raw<'a> {
    sys: &'a Sysfs,
}

impl Raw<'_> {
    fn w(&self, dev: &PciAddress, attr: &str, data: &str) {
        self.sys
            .write(dev, &self.sys.device_attr(dev, attr), data)
            .expect("raw write");
    }
    fn drv(&self, dev: &PciAddress, driver: &str, attr: &str) {
        self.sys
            .write(dev, &self.sys.driver_attr(driver, attr), &dev.to_string())
            .expect("raw driver write");
    }
    fn probe(&self, dev: &PciAddress) {
        self.sys
            .write(dev, &self.sys.drivers_probe(), &dev.to_string())
            .expect("raw probe");
    }
}

fn timed(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

fn report(name: &str, ours: &[Duration], raw: &[Duration]) {
    let med = |v: &[Duration]| {
        let mut v = v.to_vec();
        v.sort();
        v[v.len() / 2]
    };
    let (o, r) = (med(ours), med(raw));
    println!(
        "{name:<22} {:>10.2?} {:>10.2?} {:>7.2}x",
        o,
        r,
        o.as_secs_f64() / r.as_secs_f64()
    );
}

fn main() {
    let root = std::env::args()
        .nth(1)
        .expect("usage: bench-ops ROOT [ITERATIONS]");
    let n: usize = std::env::args()
        .nth(2)
        .map_or(10, |s| s.parse().expect("iterations"));
    let sys = Sysfs::open(&root).expect("sysfs root");
    let cfg = DeviceConfig::parse(integration_tests::CONFIG, Path::new("bench")).unwrap();
    let p = Provisioner::new(sys.clone(), DeviceFilter::new(&cfg));
    let raw = Raw { sys: &sys };
    let pf = addr(IGB);
    let vf = pf.offset_by(128).unwrap();
    let (mut en, mut en_raw, mut dis, mut dis_raw) = (vec![], vec![], vec![], vec![]);
    let (mut bind, mut bind_raw, mut unbind, mut unbind_raw) = (vec![], vec![], vec![], vec![]);
    for _ in 0..n {
        en.push(timed(|| drop(p.enable_vfs(&pf, Some(4)).unwrap())));
        dis.push(timed(|| p.disable_vfs(&pf).unwrap()));
        en_raw.push(timed(|| {
            raw.w(&pf, "sriov_drivers_autoprobe", "0");
            raw.w(&pf, "sriov_numvfs", "4");
            raw.w(&pf, "sriov_drivers_autoprobe", "1");
        }));
        dis_raw.push(timed(|| raw.w(&pf, "sriov_numvfs", "0")));
    }
    // VF moves between its host driver (igbvf) and vfio-pci.
    p.enable_vfs(&pf, Some(1)).unwrap();
    p.unbind(&vf, false, None).unwrap();
    for _ in 0..n {
        bind.push(timed(|| drop(p.bind_vfio(&vf, false).unwrap())));
        unbind.push(timed(|| drop(p.unbind(&vf, false, None).unwrap())));
        bind_raw.push(timed(|| {
            raw.w(&vf, "driver_override", "vfio-pci");
            raw.drv(&vf, "igbvf", "unbind");
            raw.probe(&vf);
        }));
        unbind_raw.push(timed(|| {
            raw.w(&vf, "driver_override", "\n");
            raw.drv(&vf, "vfio-pci", "unbind");
            raw.probe(&vf);
        }));
    }
    p.disable_vfs(&pf).unwrap();
    println!("operation              vf-provisioner  bare sysfs   ratio   (median of {n})");
    report("enable 4 VFs", &en, &en_raw);
    report("disable VFs", &dis, &dis_raw);
    report("bind VF to vfio-pci", &bind, &bind_raw);
    report("unbind VF to igbvf", &unbind, &unbind_raw);
}
