//! Each provisioning operation done by the project beside the bare sysfs writes
//! that do the same thing, in one process on one host, alternating, and the ratio.
//! Runs in the emulated host (`make bench-real-kernel`) or on a fake host.
//! Usage: bench-ops ROOT [ITERATIONS] [vfs|mdev]   (uses the igb PF at 0000:01:00.0;
//! both parts unless one is named: the emulated host runs the VF part before it
//! starts the daemon, whose uevent-driven re-reads would run beside the timings)

use std::path::Path;
use std::time::{Duration, Instant};

use integration_tests::{addr, IGB};
use mediated_dev::Mediator;
use std::process::Command;
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
    let (o, r) = (median(ours), median(raw));
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
    let part = std::env::args().nth(3).unwrap_or_default();
    let sys = Sysfs::open(&root).expect("sysfs root");
    if part != "mdev" {
        vf_bench(&sys, n);
    }
    if part != "vfs" {
        mdev_bench(&sys, n);
    }
}

/// Enable, disable, bind and unbind on the igb PF's VFs, beside the bare writes.
fn vf_bench(sys: &Sysfs, n: usize) {
    let cfg = DeviceConfig::parse(integration_tests::CONFIG, Path::new("bench")).unwrap();
    let p = Provisioner::new(sys.clone(), DeviceFilter::new(&cfg));
    let raw = Raw { sys };
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

/// mdev create/remove on mtty: the library beside the bare writes; `vfctl` beside
/// Debian's `mdevctl` (both exec'd, from the guest's tmpfs, as operators run them);
/// and one mtty migration between two mdevs.
fn mdev_bench(sys: &Sysfs, n: usize) {
    let m = Mediator::new(sys.clone());
    if m.scan().parent("mtty").is_err() {
        println!("mdev: skipped (no mtty parent on this host)");
        return;
    }
    let tdir = sys
        .root()
        .join("sys/class/mdev_bus/mtty/mdev_supported_types/mtty-2");
    let bus = sys.root().join("sys/bus/mdev/devices");
    let (mut c, mut c_raw, mut r, mut r_raw) = (vec![], vec![], vec![], vec![]);
    for _ in 0..n {
        let u = uuid::Uuid::new_v4();
        c.push(timed(|| drop(m.create("mtty", "mtty-2", Some(u)).unwrap())));
        r.push(timed(|| m.remove(&u).unwrap()));
        let u = uuid::Uuid::new_v4().to_string();
        c_raw.push(timed(|| sys.write_attr(&tdir.join("create"), &u).unwrap()));
        r_raw.push(timed(|| {
            sys.write_attr(&bus.join(&u).join("remove"), "1").unwrap()
        }));
    }
    println!("operation              mediated-dev  bare sysfs   ratio   (median of {n})");
    report("mdev create (mtty-2)", &c, &c_raw);
    report("mdev remove", &r, &r_raw);
    if std::env::var_os("DBUS_SYSTEM_BUS_ADDRESS").is_some() {
        daemon_bench(&c_raw, &r_raw, n);
    }
    let tools = Path::new("/tmp");
    let mdevctl = tools.join("mdevctl/mdevctl");
    if !mdevctl.exists() || !tools.join("vfctl").exists() {
        println!("vfctl vs mdevctl: skipped (needs /tmp/vfctl and /tmp/mdevctl, as in the emulated host)");
        return;
    }
    let run = |cmd: &mut Command| {
        let out = cmd.output().expect("exec");
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let mdevctl_cmd = |args: &[&str]| {
        let mut c = Command::new(tools.join("mdevctl/ld-linux-x86-64.so.2"));
        c.args(["--library-path", "/tmp/mdevctl"])
            .arg(&mdevctl)
            .args(args);
        c
    };
    let vfctl = |args: &[&str]| {
        let mut c = Command::new(tools.join("vfctl"));
        c.args(["--direct", "mdev"]).args(args);
        c
    };
    let (mut ours, mut theirs, mut exec) = (vec![], vec![], vec![]);
    for _ in 0..n {
        let u = uuid::Uuid::new_v4().to_string();
        ours.push(timed(|| {
            run(&mut vfctl(&[
                "create", "--parent", "mtty", "--type", "mtty-2", "--uuid", &u,
            ]));
            run(&mut vfctl(&["remove", &u]));
        }));
        let u = uuid::Uuid::new_v4().to_string();
        theirs.push(timed(|| {
            run(&mut mdevctl_cmd(&[
                "start", "-p", "mtty", "-t", "mtty-2", "-u", &u,
            ]));
            run(&mut mdevctl_cmd(&["stop", "-u", &u]));
        }));
        exec.push(timed(|| run(&mut Command::new("/bin/true"))));
    }
    println!("operation              vfctl        mdevctl      ratio   (median of {n}; exec of /bin/true: {:.2?})", median(&exec));
    report("create+remove (exec)", &ours, &theirs);
    migrate_bench(sys, &m, n);
}

/// CreateMdev and RemoveMdev through vfio-managerd on a real dbus-daemon, beside
/// the bare writes plus one bus round trip (Peer.Ping) measured in the same loop.
fn daemon_bench(c_raw: &[Duration], r_raw: &[Duration], n: usize) {
    let c = match vfio_manager::cli::client::Client::connect() {
        Ok(c) => c,
        Err(e) => {
            println!("mdev through the daemon: skipped ({e})");
            return;
        }
    };
    let (mut create, mut remove, mut ping) = (vec![], vec![], vec![]);
    for _ in 0..n {
        let u = uuid::Uuid::new_v4().to_string();
        ping.push(timed(|| c.ping().unwrap()));
        create.push(timed(|| {
            drop(c.create_mdev("mtty", "mtty-2", &u, "").unwrap())
        }));
        remove.push(timed(|| c.remove_mdev(&u, false).unwrap()));
    }
    let plus_ping = |raw: &[Duration]| -> Vec<Duration> {
        raw.iter().zip(&ping).map(|(r, p)| *r + *p).collect()
    };
    println!(
        "operation              D-Bus         bare + ping  ratio   (median of {n}; Ping: {:.2?})",
        median(&ping)
    );
    report("mdev create over D-Bus", &create, &plus_ping(c_raw));
    report("mdev remove over D-Bus", &remove, &plus_ping(r_raw));
}

/// One mtty-2 state moved between two mdevs in this process: total and the time
/// the source is stopped (STOP_COPY to the destination RUNNING).
fn migrate_bench(sys: &Sysfs, m: &Mediator, n: usize) {
    use mediated_dev::migration::{self as mig, MigState, MigrationDevice, VfioMigration};
    let (a, b) = (
        m.create("mtty", "mtty-2", None).unwrap(),
        m.create("mtty", "mtty-2", None).unwrap(),
    );
    let open = |d: &mediated_dev::Mdev| {
        VfioMigration::open(&bus_path(sys, d), &d.uuid.to_string()).unwrap()
    };
    let (src, dst) = (open(&a), open(&b));
    let (header, want) = (mig::mdev_header(sys, &a), mig::mdev_header(sys, &b));
    let (mut total, mut down) = (vec![], vec![]);
    for _ in 0..n {
        let started = Instant::now();
        let mut stream = Vec::new();
        let (out, saved) = mig::save(&src, &header, &mut stream).unwrap();
        let saved_at = started.elapsed();
        mig::load(&dst, &want, &stream[..]).unwrap();
        let done = started.elapsed();
        // Stopped from STOP_COPY (inside the save) until the destination runs.
        down.push(done - saved_at + saved.stopped_for);
        total.push(done);
        out.commit();
        src.set_state(MigState::Running).unwrap();
    }
    println!(
        "mtty migration         total {:.2?}, source stopped {:.2?} (median of {n}; {} bytes of state)",
        median(&total),
        median(&down),
        state_len(&src, &header)
    );
    drop((src, dst));
    m.remove(&a.uuid).unwrap();
    m.remove(&b.uuid).unwrap();
}

fn state_len(
    src: &dyn mediated_dev::migration::MigrationDevice,
    h: &mediated_dev::migration::Header,
) -> usize {
    let mut v = Vec::new();
    drop(mediated_dev::migration::save(src, h, &mut v).expect("save"));
    v.len()
}

fn bus_path(sys: &Sysfs, d: &mediated_dev::Mdev) -> std::path::PathBuf {
    sys.root()
        .join("sys/bus/mdev/devices")
        .join(d.uuid.to_string())
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[v.len() / 2]
}
