//! Real parts for the daemon's tests: a `dbus-daemon` per test with its own
//! configuration, the `vfio-managerd` binary on a fake host, and clients.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use vf_provisioner::fake::Layout;
use vfio_manager_api::client::{Client, ClientError};

pub static DAEMON: LazyLock<PathBuf> =
    LazyLock::new(|| bin("vfio-managerd", option_env!("CARGO_BIN_EXE_vfio-managerd")));
pub static VFCTL: LazyLock<PathBuf> =
    LazyLock::new(|| bin("vfctl", option_env!("CARGO_BIN_EXE_vfctl")));

/// A workspace binary: cargo names it for this package's tests; other packages'
/// tests (the hooks) find it beside their own test executable's directory.
fn bin(name: &str, from_cargo: Option<&str>) -> PathBuf {
    let path = from_cargo.map(PathBuf::from).unwrap_or_else(|| {
        let exe = std::env::current_exe().unwrap();
        exe.parent()
            .and_then(|deps| deps.parent())
            .unwrap()
            .join(name)
    });
    assert!(
        path.exists(),
        "{} is not built; run `cargo build -p vfio-manager` (or `cargo test --workspace`)",
        path.display()
    );
    path
}
pub const POLICY: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/dist/org.vfiomanager.VfioManager1.conf"
);

/// A private bus: `dbus-daemon` with a config of ours, on a socket in a temp dir.
pub struct Bus {
    child: Child,
    pub address: String,
    _dir: tempfile::TempDir,
}

impl Bus {
    /// A bus where anyone may own and call anything (the daemon's own uid check
    /// is then the only guard).
    pub fn open() -> Bus {
        Bus::start("<policy context=\"default\"><allow own=\"*\"/><allow send_destination=\"*\"/></policy>")
    }

    /// A bus that applies the project's policy file, as the system bus does.
    pub fn with_project_policy() -> Bus {
        Bus::start(&format!(
            "<policy context=\"default\"><allow send_destination=\"*\"/></policy><include>{POLICY}</include>"
        ))
    }

    fn start(policy: &str) -> Bus {
        let dir = tempfile::tempdir().unwrap();
        // Callers of other uids must reach the socket.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let conf = dir.path().join("bus.conf");
        std::fs::write(
            &conf,
            format!(
                "<!DOCTYPE busconfig PUBLIC \"-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN\" \
                 \"http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd\">\n<busconfig><type>system</type>\
                 <listen>unix:path={}/bus</listen><auth>EXTERNAL</auth>\
                 <policy context=\"default\"><allow user=\"*\"/><allow receive_type=\"method_call\"/>\
                 <allow receive_type=\"method_return\"/><allow receive_type=\"error\"/><allow receive_type=\"signal\"/>\
                 <allow send_destination=\"org.freedesktop.DBus\"/></policy>{policy}</busconfig>\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let mut child = dies_with_us(&mut Command::new("dbus-daemon"))
            .arg(format!("--config-file={}", conf.display()))
            .args(["--nofork", "--nopidfile", "--print-address=1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("dbus-daemon (Debian package dbus-daemon) must be installed: `make deps`");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("unix:"), "dbus-daemon printed {line:?}");
        Bus {
            child,
            address: line.trim().to_string(),
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn client(&self) -> Client {
        Client::connect_to(Some(&self.address)).unwrap()
    }
}

/// Has the kernel kill the child when the thread that started it ends, so that a
/// test or bench killed before its Drop runs leaves no daemon behind.
fn dies_with_us(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches only the child being started.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `vfio-managerd` on a fake host, restartable.
pub struct Daemon {
    child: Option<Child>,
    pub root: PathBuf,
    pub state: PathBuf,
    pub log: PathBuf,
    pub config: PathBuf,
    bus: String,
    extra: Vec<String>,
    pub dir: tempfile::TempDir,
    _host: tempfile::TempDir,
}

/// A directory for a fake host: in memory where the machine has /dev/shm, as
/// sysfs is (the state directory stays on disk, where the daemon's is).
fn host_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vfm-host")
        .tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap()
}

impl Daemon {
    /// A fake host built from `layout`, a configuration, and the daemon started on `bus`.
    pub fn start(bus: &Bus, layout: Layout, config: &str, extra: &[&str]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let host = host_dir();
        let root = host.path().join("host");
        layout.build(&root).unwrap();
        let cfg = dir.path().join("config.toml");
        std::fs::write(&cfg, config).unwrap();
        let mut d = Daemon {
            child: None,
            root,
            state: dir.path().join("state"),
            log: dir.path().join("daemon.log"),
            config: cfg,
            bus: bus.address.clone(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            dir,
            _host: host,
        };
        d.spawn();
        d.wait_ready();
        d
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = dies_with_us(&mut Command::new(&*DAEMON))
            .arg("--fake-kernel")
            .arg("--root")
            .arg(&self.root)
            .arg("--config")
            .arg(&self.config)
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--audit-log")
            .arg(self.dir.path().join("audit.log"))
            .arg("--bus-address")
            .arg(&self.bus)
            .arg("--no-uevents")
            .args(&self.extra)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// Waits until the daemon answers on the bus.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let c = Client::connect_to(Some(&self.bus)).unwrap();
        loop {
            let e = match c.devices() {
                Ok(_) => return,
                Err(e) => e,
            };
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("vfio-managerd exited ({st}); log:\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "vfio-managerd not ready ({e}); log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// A thread that SIGKILLs the daemon after `after` (the call it cuts may have
    /// ended by then) and returns the pid it killed.
    pub fn kill_after(&self, after: Duration) -> std::thread::JoinHandle<u32> {
        let victim = self.pid();
        assert!(victim > 0, "the daemon runs");
        std::thread::spawn(move || {
            std::thread::sleep(after);
            // SAFETY: kill(2) on the daemon's pid, a child of this test.
            unsafe { libc::kill(victim as i32, libc::SIGKILL) };
            victim
        })
    }

    /// After a call failed on the bus: waits until `killer` has fired, restarts.
    pub fn restart_after(&mut self, killer: Option<&std::thread::JoinHandle<u32>>) {
        while killer.is_some_and(|k| !k.is_finished()) {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.restart();
    }

    /// After an operation: joins `killer` and restarts the daemon if it killed the
    /// one running now (between calls; a SIGKILL always lands, but the child may
    /// not be reaped yet). Returns whether it did.
    pub fn reap(&mut self, killer: Option<std::thread::JoinHandle<u32>>) -> bool {
        killer.is_some_and(|k| {
            let victim = k.join().unwrap();
            let killed = self.pid() == victim;
            if killed {
                self.restart();
            }
            killed
        })
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
        self.wait_ready();
    }

    /// Restarts, expecting the daemon to refuse to start: waits for it to exit
    /// and returns its log.
    pub fn restart_refused(&mut self) -> String {
        self.kill();
        self.spawn();
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            assert!(
                Instant::now() < deadline,
                "vfio-managerd started:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(
            !status.success(),
            "vfio-managerd exited 0:\n{}",
            self.log_text()
        );
        self.log_text()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn audit_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("audit.log")).unwrap_or_default()
    }

    /// Stops with SIGTERM and returns the exit status's success.
    pub fn stop(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return false;
        };
        // SAFETY: kill(2) on a child we spawned and have not reaped.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        c.wait().map(|s| s.success()).unwrap_or(false)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The daemon's error name (`Refused`, `NoDevice`, ...), or the whole error when it
/// gave none.
pub fn error_name(e: &ClientError) -> String {
    match e.name() {
        Some(n) => n.to_string(),
        None => format!("{e:?}"),
    }
}

/// The driver the fake kernel shows for `addr`.
pub fn driver(root: &Path, addr: &str) -> Option<String> {
    vf_provisioner::sysfs::link_name(&root.join("sys/bus/pci/devices").join(addr).join("driver"))
}

/// Runs vfctl against `bus`, returning (exit code, stdout, stderr).
pub fn vfctl(bus: &Bus, args: &[&str]) -> (i32, String, String) {
    let o = Command::new(&*VFCTL)
        .args(args)
        .env("DBUS_SYSTEM_BUS_ADDRESS", &bus.address)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

pub fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A copy of vfctl that any uid can run: the checkout may sit under a directory
/// only root enters. One copy per build, named by the build's size and mtime and
/// shared by every test process (nextest runs each test in its own): a temporary
/// directory in a static is never dropped, and leaked 136 MB per process.
static VFCTL_FOR_ALL: LazyLock<PathBuf> = LazyLock::new(|| {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&*VFCTL).unwrap();
    let dir = std::env::temp_dir().join("vfio-manager-tests");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let copy = dir.join(format!(
        "vfctl-{}-{}",
        meta.size(),
        meta.mtime_nsec() ^ meta.mtime()
    ));
    if !copy.exists() {
        // Older builds' copies go; a process still running one keeps its inode.
        for old in std::fs::read_dir(&dir).unwrap().flatten() {
            let name = old.file_name().to_string_lossy().into_owned();
            if name.starts_with("vfctl-") && old.path() != copy {
                let _ = std::fs::remove_file(old.path());
            }
        }
        let part = dir.join(format!(".part-{}", std::process::id()));
        std::fs::copy(&*VFCTL, &part).unwrap();
        std::fs::rename(&part, &copy).unwrap();
    }
    copy
});

/// `vfctl ARGS` as `uid` (and the same gid): (exit code, stdout, stderr). Needs root.
pub fn vfctl_as(bus: &Bus, uid: u32, args: &[&str]) -> (i32, String, String) {
    use std::os::unix::process::CommandExt;
    let o = Command::new(&*VFCTL_FOR_ALL)
        .args(args)
        .env("DBUS_SYSTEM_BUS_ADDRESS", &bus.address)
        .uid(uid)
        .gid(uid)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Waits until `done` holds: no timing assert, a 40 s bound for a hung daemon,
/// whose log the failure shows.
pub fn wait_for(d: &Daemon, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(40);
    while !done() {
        assert!(
            Instant::now() < deadline,
            "never: {what}; log:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// xorshift64*: a reproducible sequence from the printed seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The crash tests' seed: `VFM_CRASH_SEED`, or the clock's; printed so that a
/// failure can be repeated.
pub fn crash_seed() -> u64 {
    let seed = std::env::var("VFM_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("crash test seed {seed} (VFM_CRASH_SEED={seed} repeats it)");
    seed
}

/// `dbus-monitor` on a bus, in place before the test goes on.
pub struct Monitor {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
}

impl Monitor {
    /// Starts it for match `rule` and waits until it has become a monitor (the
    /// bus then tells it NameLost); `None` where dbus-monitor is not installed.
    pub fn start(bus: &Bus, rule: &str) -> Option<Monitor> {
        let mut child = Command::new("dbus-monitor")
            .args(["--address", &bus.address, rule])
            .stdout(Stdio::piped())
            .spawn()
            .ok()?;
        let mut out = BufReader::new(child.stdout.take()?);
        let mut line = String::new();
        while !line.contains("member=NameLost") {
            line.clear();
            if out.read_line(&mut line).ok()? == 0 {
                return None;
            }
        }
        Some(Monitor { child, out })
    }

    /// Everything it printed, after `settle` for the last signals to arrive.
    pub fn stop(mut self, settle: Duration) -> String {
        std::thread::sleep(settle);
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut self.out, &mut text);
        text
    }
}

/// Checks that every function on vfio-pci is held by a lease or held back (failed,
/// quarantined): nothing was lost on the way. Returns the held-back names.
pub fn nothing_stray(bus: &Bus, root: &Path, context: &str) -> Vec<String> {
    let c = bus.client();
    let leased: Vec<String> = c
        .leases()
        .unwrap()
        .into_iter()
        .flat_map(|l| l.devices.into_iter().map(|d| d.address))
        .collect();
    let back: Vec<String> = c
        .health()
        .unwrap()
        .into_iter()
        .filter(|h| h.state != "healthy")
        .map(|h| h.name)
        .collect();
    for f in c.devices().unwrap() {
        if driver(root, &f.address).as_deref() == Some("vfio-pci") {
            assert!(
                leased.contains(&f.address) || back.contains(&f.address),
                "{context}: {} on vfio-pci, neither leased nor held back",
                f.address
            );
        }
    }
    back
}

/// Two T4s, each an mdev parent (NVIDIA before vGPU 17).
pub fn two_t4s() -> vf_provisioner::fake::Layout {
    let mut l = vf_provisioner::layouts::nvidia_mdev();
    let gpu = "0000:af:00.0";
    let mut f = l
        .functions
        .iter()
        .find(|f| f.address.to_string() == gpu)
        .unwrap()
        .clone();
    f.address = "0000:b0:00.0".parse().unwrap();
    f.iommu_group = Some(51);
    l.functions.push(f);
    let mut p = l.mdev_parents[0].clone();
    p.parent = "0000:b0:00.0".into();
    l.mdev_parents.push(p);
    l
}
