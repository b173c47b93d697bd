//! Each provisioning operation done by the project beside the bare sysfs writes
//! that do the same thing, in one process on one host, alternating, and the ratio.
//! Runs in the emulated host (`make bench-real-kernel`) or on a fake host.
//! Usage: bench-ops ROOT [ITERATIONS] [vfs|mdev|dbus]   (uses the igb PF at
//! 0000:01:00.0; every part unless one is named: the emulated host runs the VF and
//! mdev parts before it starts the daemon, whose uevent-driven re-reads would run
//! beside the timings, and the D-Bus part after)
//!
//! Each pair is timed in both orders, alternating from one iteration to the next,
//! and every timed operation starts after the same pause, so that neither side
//! inherits the other's aftermath (a driver's deferred work, a uevent's handlers).

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use integration_tests::{addr, IGB};
use mediated_dev::Mediator;
use std::process::Command;
use std::sync::{Arc, Mutex};

use vf_provisioner::sysfs::KernelWrite;
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

/// The pause before each timed operation: the kernel's deferred work from the one
/// before (runtime PM, uevent handlers) ends before the clock starts.
const SETTLE: Duration = Duration::from_millis(20);

fn timed(f: impl FnOnce()) -> Duration {
    std::thread::sleep(SETTLE);
    let t = Instant::now();
    f();
    t.elapsed()
}

/// Each side's median and the median of the pairs' ratios (iteration i of one
/// side beside iteration i of the other, timed next to each other): the machine's
/// drift between iterations, which moves both sides of a pair alike, cancels.
fn report(name: &str, ours: &[Duration], raw: &[Duration]) {
    let mut ratios: Vec<f64> = ours
        .iter()
        .zip(raw)
        .map(|(o, r)| o.as_secs_f64() / r.as_secs_f64())
        .collect();
    ratios.sort_by(f64::total_cmp);
    println!(
        "{name:<22} {:>10.2?} {:>10.2?} {:>7.2}x",
        median(ours),
        median(raw),
        ratios[ratios.len() / 2]
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
    let run = |name: &str| part.is_empty() || part == name;
    if run("vfs") {
        syscall_costs(&sys);
        vf_bench(&sys, n);
    }
    if run("mdev") {
        mdev_bench(&sys, n);
    }
    if run("dbus") {
        daemon_bench(&sys, n);
    }
}

/// What one syscall costs on this host, and what walking a long sysfs path adds to
/// it: the unit that the "(reads)" lines of the timelines below are made of.
fn syscall_costs(sys: &Sysfs) {
    const N: u32 = 200;
    let each = |f: &dyn Fn()| {
        let t = Instant::now();
        for _ in 0..N {
            f();
        }
        t.elapsed() / N
    };
    let dev = sys.device_dir(&addr(IGB));
    let dir = vf_provisioner::sysfs::Dir::open(&dev).expect("the igb PF");
    let (uevent, link) = (dev.join("uevent"), dev.join("driver"));
    println!(
        "one syscall here: getppid {:.1?}; readlink of a device's link by path {:.1?}, \
         through a dir fd {:.1?}; attribute open+read+close by path {:.1?}, through a \
         dir fd {:.1?}; dir fd open+close {:.1?}",
        each(&|| {
            black_box(std::os::unix::process::parent_id());
        }),
        each(&|| {
            black_box(vf_provisioner::sysfs::link_name(&link));
        }),
        each(&|| {
            black_box(dir.link_name("driver"));
        }),
        each(&|| {
            black_box(vf_provisioner::sysfs::read_opt(&uevent));
        }),
        each(&|| {
            black_box(dir.read("uevent"));
        }),
        each(&|| {
            black_box(vf_provisioner::sysfs::Dir::open(&dev));
        }),
    );
}

/// Runs the two sides of a pair, ours first on even iterations and the bare
/// writes first on odd ones.
fn pair(i: usize, ours: impl FnOnce(), bare: impl FnOnce()) {
    if i.is_multiple_of(2) {
        ours();
        bare();
    } else {
        bare();
        ours();
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
    for i in 0..n {
        pair(
            i,
            || {
                en.push(timed(|| drop(p.enable_vfs(&pf, Some(4)).unwrap())));
                dis.push(timed(|| p.disable_vfs(&pf).unwrap()));
            },
            || {
                en_raw.push(timed(|| {
                    raw.w(&pf, "sriov_drivers_autoprobe", "0");
                    raw.w(&pf, "sriov_numvfs", "4");
                    raw.w(&pf, "sriov_drivers_autoprobe", "1");
                }));
                dis_raw.push(timed(|| raw.w(&pf, "sriov_numvfs", "0")));
            },
        );
    }
    // VF moves between its host driver (igbvf) and vfio-pci.
    p.enable_vfs(&pf, Some(1)).unwrap();
    p.unbind(&vf, false, None).unwrap();
    vf_timelines(sys, DeviceFilter::new(&cfg), &vf, n);
    for i in 0..n {
        pair(
            i,
            || {
                bind.push(timed(|| drop(p.bind_vfio(&vf, false).unwrap())));
                unbind.push(timed(|| drop(p.unbind(&vf, false, None).unwrap())));
            },
            || {
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
            },
        );
    }
    p.disable_vfs(&pf).unwrap();
    println!("operation              vf-provisioner  bare sysfs   ratio   (medians of {n}, ratio of the median pair)");
    report("enable 4 VFs", &en, &en_raw);
    report("disable VFs", &dis, &dis_raw);
    report("bind VF to vfio-pci", &bind, &bind_raw);
    report("unbind VF to igbvf", &unbind, &unbind_raw);
}

/// A kernel that records when each write starts and ends, so that an operation's
/// time splits into its writes (the kernel's work, as in the bare version) and
/// what runs before, between and after them (our reads and checks).
struct Traced {
    inner: Arc<dyn KernelWrite>,
    writes: Mutex<Vec<(String, Instant, Instant)>>,
}

impl KernelWrite for Traced {
    fn write(&self, path: &Path, data: &str) -> std::io::Result<()> {
        let start = Instant::now();
        let r = self.inner.write(path, data);
        let name = path
            .file_name()
            .map_or(String::new(), |n| n.to_string_lossy().into_owned());
        self.writes
            .lock()
            .unwrap()
            .push((name, start, Instant::now()));
        r
    }
}

/// Where the time of one operation goes, as the median of `n` runs: the
/// segments before, between and after its kernel writes, and each write.
struct Timeline {
    name: &'static str,
    runs: Vec<Vec<(String, Duration)>>,
}

impl Timeline {
    fn new(name: &'static str) -> Self {
        Timeline {
            name,
            runs: Vec::new(),
        }
    }

    /// Runs `op` once on `kernel`, recording its segments.
    fn record(&mut self, kernel: &Traced, op: impl FnOnce()) {
        kernel.writes.lock().unwrap().clear();
        std::thread::sleep(SETTLE);
        let start = Instant::now();
        op();
        let end = Instant::now();
        let mut segs = Vec::new();
        let mut last = start;
        for (name, s, e) in kernel.writes.lock().unwrap().drain(..) {
            segs.push(("(reads)".to_string(), s - last));
            segs.push((format!("write {name}"), e - s));
            last = e;
        }
        segs.push(("(reads)".to_string(), end - last));
        self.runs.push(segs);
    }

    fn print(&self) {
        let Some(first) = self.runs.first() else {
            return;
        };
        // Runs that wrote the same attributes in the same order.
        let alike: Vec<_> = self
            .runs
            .iter()
            .filter(|r| r.iter().map(|s| &s.0).eq(first.iter().map(|s| &s.0)))
            .collect();
        println!(
            "where the time of our {} goes (median of {}):",
            self.name,
            alike.len()
        );
        for (i, (label, _)) in first.iter().enumerate() {
            let t = median(&alike.iter().map(|r| r[i].1).collect::<Vec<_>>());
            println!("  {label:<38} {t:>10.2?}");
        }
    }
}

fn traced(sys: &Sysfs) -> (Sysfs, Arc<Traced>) {
    let kernel = Arc::new(Traced {
        inner: sys.kernel(),
        writes: Mutex::new(Vec::new()),
    });
    (Sysfs::with_kernel(sys.root(), kernel.clone()), kernel)
}

/// Our bind and unbind of `vf` (on its host driver), traced.
fn vf_timelines(sys: &Sysfs, filter: DeviceFilter, vf: &PciAddress, n: usize) {
    let (tsys, k) = traced(sys);
    let p = Provisioner::new(tsys, filter);
    let (mut bind, mut unbind) = (Timeline::new("bind"), Timeline::new("unbind"));
    for _ in 0..n {
        bind.record(&k, || drop(p.bind_vfio(vf, false).unwrap()));
        unbind.record(&k, || drop(p.unbind(vf, false, None).unwrap()));
    }
    bind.print();
    unbind.print();
    bind_checks(sys, &p, vf, n);
}

/// The reads before a bind's first write, one by one, each time right after the
/// VF came back to its host driver (as in the bind timed above): which check
/// costs what when the kernel's sysfs nodes for the VF are fresh.
fn bind_checks(sys: &Sysfs, p: &Provisioner, vf: &PciAddress, n: usize) {
    use vf_provisioner::host::group_members;
    use vf_provisioner::PciFunction;
    let names = [
        "the VF's brief (uevent, links, override)",
        "its PF's ids",
        "host-critical (net interface up?)",
        "its IOMMU group's members",
    ];
    let mut runs: Vec<[Duration; 4]> = Vec::new();
    for _ in 0..n {
        drop(p.bind_vfio(vf, false).unwrap());
        std::thread::sleep(SETTLE);
        drop(p.unbind(vf, false, None).unwrap());
        std::thread::sleep(SETTLE);
        let t = Instant::now();
        let f = PciFunction::read_brief(sys, vf).expect("the VF");
        let t1 = Instant::now();
        black_box(PciFunction::read_ids(sys, &f.physfn.expect("a VF")));
        let t2 = Instant::now();
        black_box(vf_provisioner::ops::host_critical(sys, &f));
        let t3 = Instant::now();
        black_box(group_members(sys, f.iommu_group.expect("a group")));
        let t4 = Instant::now();
        runs.push([t1 - t, t2 - t1, t3 - t2, t4 - t3]);
    }
    println!(
        "where the reads before our bind's first write go (median of {n}, fresh after a probe):"
    );
    for (i, name) in names.iter().enumerate() {
        let t = median(&runs.iter().map(|r| r[i]).collect::<Vec<_>>());
        println!("  {name:<38} {t:>10.2?}");
    }
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
    let bare = BareMdev::new(sys);
    let (mut c, mut c_raw, mut r, mut r_raw) = (vec![], vec![], vec![], vec![]);
    for i in 0..n {
        pair(
            i,
            || {
                let u = uuid::Uuid::new_v4();
                c.push(timed(|| {
                    drop(
                        m.create(
                            &"mtty".parse().unwrap(),
                            &"mtty-2".parse().unwrap(),
                            Some(u),
                        )
                        .unwrap(),
                    )
                }));
                r.push(timed(|| m.remove(&u).unwrap()));
            },
            || bare.create_remove(&mut c_raw, &mut r_raw),
        );
    }
    println!("operation              mediated-dev  bare sysfs   ratio   (medians of {n}, ratio of the median pair)");
    report("mdev create (mtty-2)", &c, &c_raw);
    report("mdev remove", &r, &r_raw);
    mdev_timelines(sys, n);
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
    for i in 0..n {
        pair(
            i,
            || {
                let u = uuid::Uuid::new_v4().to_string();
                ours.push(timed(|| {
                    run(&mut vfctl(&[
                        "create", "--parent", "mtty", "--type", "mtty-2", "--uuid", &u,
                    ]));
                    run(&mut vfctl(&["remove", &u]));
                }));
            },
            || {
                let u = uuid::Uuid::new_v4().to_string();
                theirs.push(timed(|| {
                    run(&mut mdevctl_cmd(&[
                        "start", "-p", "mtty", "-t", "mtty-2", "-u", &u,
                    ]));
                    run(&mut mdevctl_cmd(&["stop", "-u", &u]));
                }));
            },
        );
        exec.push(timed(|| run(&mut Command::new("/bin/true"))));
    }
    println!("operation              vfctl        mdevctl      ratio   (medians of {n}, ratio of the median pair; exec of /bin/true: {:.2?})", median(&exec));
    report("create+remove (exec)", &ours, &theirs);
    migrate_bench(sys, &m, n);
}

/// Our mdev create and remove, traced.
fn mdev_timelines(sys: &Sysfs, n: usize) {
    let (tsys, k) = traced(sys);
    let m = Mediator::new(tsys);
    let (mut create, mut remove) = (Timeline::new("mdev create"), Timeline::new("mdev remove"));
    for _ in 0..n {
        let u = uuid::Uuid::new_v4();
        create.record(&k, || {
            drop(
                m.create(
                    &"mtty".parse().unwrap(),
                    &"mtty-2".parse().unwrap(),
                    Some(u),
                )
                .unwrap(),
            )
        });
        remove.record(&k, || m.remove(&u).unwrap());
    }
    create.print();
    remove.print();
}

/// The bare writes that create and remove an mtty-2 mdev.
struct BareMdev<'a> {
    sys: &'a Sysfs,
    create: std::path::PathBuf,
    devices: std::path::PathBuf,
}

impl<'a> BareMdev<'a> {
    fn new(sys: &'a Sysfs) -> Self {
        BareMdev {
            sys,
            create: sys
                .root()
                .join("sys/class/mdev_bus/mtty/mdev_supported_types/mtty-2/create"),
            devices: sys.root().join("sys/bus/mdev/devices"),
        }
    }

    /// Times one create and one remove of a new mdev.
    fn create_remove(&self, created: &mut Vec<Duration>, removed: &mut Vec<Duration>) {
        let u = uuid::Uuid::new_v4().to_string();
        created.push(timed(|| self.sys.write_attr(&self.create, &u).unwrap()));
        let remove = self.devices.join(&u).join("remove");
        removed.push(timed(|| self.sys.write_attr(&remove, "1").unwrap()));
    }
}

/// CreateMdev and RemoveMdev through vfio-managerd on a real dbus-daemon, beside
/// the bare writes plus one bus round trip (Peer.Ping), all in the same loop with
/// the daemon running.
fn daemon_bench(sys: &Sysfs, n: usize) {
    let c = match vfio_manager::cli::client::Client::connect() {
        Ok(c) => c,
        Err(e) => {
            println!("mdev through the daemon: skipped ({e})");
            return;
        }
    };
    let bare = BareMdev::new(sys);
    let (mut create, mut remove, mut ping) = (vec![], vec![], vec![]);
    let (mut c_raw, mut r_raw) = (vec![], vec![]);
    for i in 0..n {
        ping.push(timed(|| c.ping().unwrap()));
        pair(
            i,
            || {
                let u = uuid::Uuid::new_v4().to_string();
                create.push(timed(|| {
                    drop(c.create_mdev("mtty", "mtty-2", &u, "").unwrap())
                }));
                remove.push(timed(|| c.remove_mdev(&u, false).unwrap()));
            },
            || bare.create_remove(&mut c_raw, &mut r_raw),
        );
    }
    let plus_ping = |raw: &[Duration]| -> Vec<Duration> {
        raw.iter().zip(&ping).map(|(r, p)| *r + *p).collect()
    };
    println!(
        "operation              D-Bus         bare + ping  ratio   (medians of {n}, ratio of the median pair; Ping: {:.2?})",
        median(&ping)
    );
    report("mdev create over D-Bus", &create, &plus_ping(&c_raw));
    report("mdev remove over D-Bus", &remove, &plus_ping(&r_raw));
    release_bench(sys, &c, n, &plus_ping);
}

/// Release of a lease of 4 igb VFs (each reset, then returned) beside the bare
/// writes doing the same one VF after another: the daemon's resets overlap.
fn release_bench(
    sys: &Sysfs,
    c: &vfio_manager::cli::client::Client,
    n: usize,
    plus_ping: &dyn Fn(&[Duration]) -> Vec<Duration>,
) {
    const N: u32 = 4;
    if c.enable(IGB, N).is_err() {
        println!("release of {N} VFs: skipped (the daemon does not manage {IGB})");
        return;
    }
    let raw = Raw { sys };
    let vfs: Vec<PciAddress> = (0..N)
        .map(|i| addr(IGB).offset_by(128 + 2 * i).unwrap())
        .collect();
    let (mut ours, mut bare) = (vec![], vec![]);
    for i in 0..n {
        pair(
            i,
            || {
                let req = vfio_manager::api::Request {
                    request_id: format!("bench-release-{i}"),
                    vm_name: "bench".into(),
                    count: N,
                    ..Default::default()
                };
                let lease = c.provision(&req).unwrap();
                ours.push(timed(|| assert!(c.release(&lease.id).unwrap())));
            },
            || {
                for vf in &vfs {
                    raw.w(vf, "driver_override", "vfio-pci");
                    raw.probe(vf);
                }
                bare.push(timed(|| {
                    for vf in &vfs {
                        raw.w(vf, "reset", "1");
                        raw.drv(vf, "vfio-pci", "unbind");
                        raw.w(vf, "driver_override", "\n");
                    }
                }));
            },
        );
    }
    // Whether the kernel overlaps the resets of different VFs at all: the bare
    // resets one after another beside the same resets on a thread each.
    let (mut serial, mut parallel) = (vec![], vec![]);
    for vf in &vfs {
        raw.w(vf, "driver_override", "vfio-pci");
        raw.probe(vf);
    }
    for i in 0..n {
        pair(
            i,
            || serial.push(timed(|| vfs.iter().for_each(|vf| raw.w(vf, "reset", "1")))),
            || {
                parallel.push(timed(|| {
                    std::thread::scope(|s| {
                        for vf in &vfs {
                            s.spawn(|| raw.w(vf, "reset", "1"));
                        }
                    })
                }))
            },
        );
    }
    for vf in &vfs {
        raw.drv(vf, "vfio-pci", "unbind");
        raw.w(vf, "driver_override", "\n");
    }
    let _ = c.disable(IGB);
    report(&format!("release of {N} VFs"), &ours, &plus_ping(&bare));
    report(&format!("{N} resets: threads/serial"), &parallel, &serial);
}

/// One mtty-2 state moved between two mdevs in this process: total and the time
/// the source is stopped (STOP_COPY to the destination RUNNING).
fn migrate_bench(sys: &Sysfs, m: &Mediator, n: usize) {
    use mediated_dev::migration::{self as mig, MigState, MigrationDevice, VfioMigration};
    let (a, b) = (
        m.create(&"mtty".parse().unwrap(), &"mtty-2".parse().unwrap(), None)
            .unwrap(),
        m.create(&"mtty".parse().unwrap(), &"mtty-2".parse().unwrap(), None)
            .unwrap(),
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
