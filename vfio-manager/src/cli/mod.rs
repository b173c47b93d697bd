//! The `vfctl` command line: parsing, dispatch and exit codes. Output goes to the
//! writers passed in, so tests run the real commands and compare what they print.

mod attach;
pub mod client;
mod mdev;
mod render;

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use vf_provisioner::{
    fake, layouts, DeviceFilter, Host, Kind, Level, PciAddress, Provisioner, Sysfs,
};

use crate::api::Request;
use crate::config::{Config, ConfigError};

/// Exit codes: distinct for bad input, refusals and failures.
pub mod exit {
    pub const OK: u8 = 0;
    /// The operation started and failed (kernel error, timeout), or `check` found errors.
    pub const FAILED: u8 = 1;
    /// Malformed input (address, count, config, root); nothing was attempted.
    pub const BAD_INPUT: u8 = 2;
    /// Refused by policy (device in use, group not viable, ...); nothing was changed.
    pub const REFUSED: u8 = 3;
}

#[derive(Parser, Debug)]
#[command(
    name = "vfctl",
    version,
    about = "Manage GPU SR-IOV virtual functions and their vfio-pci binding for VM passthrough",
    long_about = "Manage GPU SR-IOV virtual functions and their vfio-pci binding for VM passthrough.\n\n\
        Commands that change the host say so in their help. Every change is checked first: a refused \
        command changes nothing and says which device, why, and what to do.\n\n\
        Commands go to the vfio-manager daemon over D-Bus (system bus, or DBUS_SYSTEM_BUS_ADDRESS), \
        which records every change and lease; `--direct` works on the host without it (recovery, tests). \
        `show`, `check`, `reset` and `capture-layout` always read or act on the host directly.\n\n\
        Exit codes: 0 success, 1 failure, 2 bad input, 3 refused.",
    after_help = "Environment: VFCTL_ROOT sets --root, VFCTL_FAKE_KERNEL=true --fake-kernel; DBUS_SYSTEM_BUS_ADDRESS picks the bus."
)]
pub struct Cli {
    /// Work on the host directly instead of through the daemon (no leases, no
    /// state table, no audit log).
    #[arg(long, global = true)]
    direct: bool,
    /// Root of the host's /sys, /dev and /proc (a fake host tree in tests and demos).
    #[arg(long, global = true, env = "VFCTL_ROOT", default_value = "/")]
    root: PathBuf,
    /// The root is a tree made by `vfctl fake-host`: writes go to the fake kernel
    /// (tests and demos). Never chosen from what the root holds.
    #[arg(long, global = true, env = "VFCTL_FAKE_KERNEL")]
    fake_kernel: bool,
    /// Configuration file (direct mode): extra GPU vendors, other PFs to manage, exclusions.
    #[arg(long, global = true, default_value = crate::config::DEFAULT_PATH)]
    config: PathBuf,
    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

/// What a VM wants leased: the arguments `provision` and `attach` share.
#[derive(clap::Args, Debug)]
pub struct Want {
    #[arg(long)]
    vm: String,
    /// `vf` (any whole VF), a PF model `vvvv:dddd`, or a mediated profile: an mdev
    /// type id or name (`mtty-2`, `GRID T4-2Q`: the lease creates the mdevs and its
    /// release removes them) or an NVIDIA vGPU 17+ type (`NVIDIA A100D-20C`: the
    /// lease sets the type on free VFs and its release clears it).
    #[arg(long, default_value = "vf")]
    profile: String,
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// Exactly this function (repeatable; --count is then their number).
    #[arg(long = "device")]
    devices: Vec<String>,
    /// When a leased device fails: `notify` (hold it back, signal LeaseDegraded) or
    /// `replace` (also swap a healthy VF of the same model into the running VM);
    /// default: the daemon's `[recovery]` configuration.
    #[arg(long, value_parser = ["notify", "replace"])]
    on_failure: Option<String>,
    /// Where the VM's agent (vm-agent) speaks to the daemon: `cid:N` (vsock),
    /// `unix:/PATH` (the daemon listens there: cloud-hypervisor's vsock socket and
    /// port, `S_22086`), or `serial:/PATH` (the daemon connects to a virtio-serial
    /// port's socket). Without one the daemon does not know how the devices are used.
    #[arg(long)]
    agent: Option<String>,
    /// When all the lease's devices sit idle (`[usage]` thresholds): `notify`,
    /// `unplug` (the agent lets go, the VMM removes the device, it returns to the
    /// pool) or `release-on-stop`; default: the daemon's `[usage]` configuration.
    #[arg(long, value_parser = ["notify", "unplug", "release-on-stop"])]
    on_idle: Option<String>,
    /// `high` may take the devices of `low` leases that sit idle when too few are
    /// free (they are unplugged from their VMs); default `normal`.
    #[arg(long, value_parser = ["low", "normal", "high"])]
    priority: Option<String>,
}

impl Want {
    fn request(&self, request_id: String) -> Request {
        Request {
            request_id,
            vm_name: self.vm.clone(),
            profile: self.profile.clone(),
            count: if self.devices.is_empty() {
                self.count
            } else {
                self.devices.len() as u32
            },
            devices: self.devices.clone(),
            on_failure: self.on_failure.clone().unwrap_or_default(),
            agent: self.agent.clone().unwrap_or_default(),
            on_idle: self.on_idle.clone().unwrap_or_default(),
            priority: self.priority.clone().unwrap_or_default(),
            ..Request::default()
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List GPUs and SR-IOV PFs with their VFs (changes nothing).
    List {
        /// Every PCI function, not only GPUs and SR-IOV PFs.
        #[arg(long)]
        all: bool,
    },
    /// Show one function in detail (changes nothing).
    Show { address: String },
    /// Enable VFs on a PF. Changes the host: writes sriov_numvfs (with autoprobe off,
    /// so no host driver takes the new VFs). A different count goes through 0 and is
    /// refused while a VF is in use.
    Enable {
        pf: String,
        /// How many VFs; default: the vendor's (4 on domestic GPUs) or all the device allows.
        #[arg(long)]
        vfs: Option<String>,
    },
    /// Disable all VFs of a PF. Changes the host: writes 0 to sriov_numvfs; refused
    /// while a VF's VFIO group is open or leased.
    Disable { pf: String },
    /// Bind a function to vfio-pci. Changes the host: sets driver_override, unbinds it
    /// from its driver and probes vfio-pci. Refused if its IOMMU group would not be viable.
    Bind {
        address: String,
        /// Also bind the other members of its IOMMU group (e.g. the GPU's HDMI audio).
        #[arg(long)]
        whole_group: bool,
    },
    /// Return a function from vfio-pci to a host driver. Changes the host: clears
    /// driver_override, unbinds and reprobes. Refused while its VFIO group is open.
    Unbind {
        address: String,
        /// Also return the other vfio-bound members of its IOMMU group.
        #[arg(long)]
        whole_group: bool,
        /// Bind to this driver instead of the one the kernel matches.
        #[arg(long)]
        driver: Option<String>,
    },
    /// Lease devices to a VM (daemon only). Changes the host: enables VFs on a managed
    /// PF if none are free, binds the leased VFs to vfio-pci and records the lease.
    /// The same --request-id returns the same lease.
    Provision {
        #[command(flatten)]
        want: Want,
        /// Only devices on this NUMA node.
        #[arg(long)]
        numa: Option<u32>,
        /// Idempotency key (e.g. the VM's UUID); default: a new one.
        #[arg(long)]
        request_id: Option<String>,
        #[arg(long, default_value = "")]
        vm_uuid: String,
        /// Preferred PFs, tried first (repeatable).
        #[arg(long = "pf")]
        pfs: Vec<String>,
        /// Print the lease as libvirt `<hostdev>` elements for a domain's <devices>,
        /// as cloud-hypervisor `--device` arguments, or as QEMU `-device` arguments.
        #[arg(long, value_parser = ["libvirt", "cloud-hypervisor", "qemu"])]
        format: Option<String>,
        /// Where the VM runs, for a swap when a device fails: `libvirt` (the domain
        /// named --vm) or `ch:SOCKET` (cloud-hypervisor's API socket).
        #[arg(long, default_value = "")]
        vmm: String,
    },
    /// Lease devices and hot-add them to a running cloud-hypervisor VM over its API
    /// socket (daemon only). Changes the host (as provision) and the VM (vm.add-device);
    /// if an add fails, the added devices are removed and the lease released.
    Attach {
        /// The VM's `--api-socket` path.
        #[arg(long)]
        ch_socket: PathBuf,
        #[command(flatten)]
        want: Want,
        /// Stay until the VM exits or the devices are removed from it, then release.
        #[arg(long)]
        watch: bool,
    },
    /// Remove a VM's leased devices from its cloud-hypervisor (vm.remove-device) and
    /// release its leases (daemon only). Changes the VM and the host.
    Detach {
        #[arg(long)]
        ch_socket: PathBuf,
        #[arg(long)]
        vm: String,
    },
    /// Release a lease by its lease id, or with --request-id by the request id that
    /// made it (daemon only; root or the user who made it). Changes the host:
    /// resets the devices and returns them to their drivers before the lease.
    /// Refused while a VM holds a device open.
    Release {
        #[arg(required_unless_present = "request_id", conflicts_with = "request_id")]
        lease: Option<String>,
        #[arg(long)]
        request_id: Option<String>,
    },
    /// List leases, with their agents' state (daemon only; changes nothing).
    Leases,
    /// Where the next lease goes: each PF's predicted compute pressure and its
    /// place in the order (`[placement]`; daemon only; changes nothing).
    Placement,
    /// Leased devices' usage as the guests' agents report it, refreshed in place
    /// on a terminal, printed once when piped (daemon only; changes nothing).
    Top {
        /// Print once and exit.
        #[arg(long)]
        once: bool,
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=3600))]
        interval_s: u64,
    },
    /// The devices swapped in a lease, oldest first (daemon only; changes nothing).
    Swaps { lease: String },
    /// List devices quarantined as orphans: on vfio-pci with our driver_override, or
    /// an mdev nobody defined, with no lease (daemon only; changes nothing).
    Orphans,
    /// Adopt or free a quarantined device (daemon only; audited).
    #[command(subcommand)]
    Orphan(OrphanCommand),
    /// Each managed device's health: healthy, degraded (PCIe errors), failed,
    /// quarantined or gone, with the reason and the kernel's AER error counts
    /// (daemon only; changes nothing).
    Health,
    /// Hold a device back (a PCI address or an mdev UUID): it is leased, bound
    /// and given mdevs to nobody until `vfctl clear` (daemon only; audited). A
    /// leased device keeps its lease.
    Quarantine {
        device: String,
        /// Why, for `vfctl health` and the audit log (1-256 bytes).
        #[arg(long)]
        reason: String,
    },
    /// Probe a held-back device (failed or quarantined) again and, if it answers,
    /// offer it again; one that still fails its probe stays held back (daemon
    /// only; audited).
    Clear { device: String },
    /// Swap a leased VF for a healthy one of the same model (on its NUMA node first),
    /// a VF with a vGPU type for another VF given that type, a leased mdev for a
    /// new one of the lease's profile, or a whole device (a GPU with its HDMI audio)
    /// with its IOMMU group for another with the same functions, in the running VM,
    /// through the VMM its lease names (daemon only; audited). Changes the host and
    /// the VM: binds (or creates) the replacement, plugs it into the VM, unplugs
    /// DEVICE, and holds DEVICE back with REASON. The lease keeps its id.
    Replace {
        device: String,
        /// Why, for `vfctl health` and the audit log (1-256 bytes).
        #[arg(long)]
        reason: String,
    },
    /// Configuration file commands (change nothing).
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Reset a function through the kernel. Changes the device state; refused while in use.
    Reset { address: String },
    /// Mediated devices (mdev types: mtty, NVIDIA before vGPU 17), with definitions in
    /// mdevctl's files. `list`, `create` and `remove` go through the daemon (which
    /// records them and shows leases); definitions are read and written directly.
    #[command(subcommand)]
    Mdev(mdev::MdevCommand),
    /// Move an mdev's device state to another host's daemon (VFIO migration v2)
    /// (daemon only).
    #[command(subcommand)]
    Migrate(mdev::MigrateCommand),
    /// NVIDIA vGPU 17+ types chosen per VF (`nvidia/current_vgpu_type`), on the host directly.
    #[command(subcommand)]
    Vgpu(mdev::VgpuCommand),
    /// Dry run: where requested mdev or vGPU types would fit, as PROFILE[:COUNT]
    /// (type id, type name or vGPU type). Changes nothing; exits 3 if not all fit.
    /// With --rebalance (daemon only): the moves that would relieve GPUs predicted
    /// over `[placement] pressure_limit_percent`, for migratable mdevs only.
    Plan {
        #[arg(required_unless_present = "rebalance")]
        wants: Vec<String>,
        #[arg(long, conflicts_with = "wants")]
        rebalance: bool,
    },
    /// Check the host: IOMMU, VFIO modules, SR-IOV and IOMMU group viability per GPU
    /// (changes nothing). Exits 1 if any check fails.
    Check,
    /// Print this host's topology as a fake-host layout (JSON) for `fake-host --from`
    /// (changes nothing). Enable one VF per PF with autoprobe on first, so that the
    /// VF drivers' ids are seen.
    CaptureLayout {
        #[arg(long, default_value = "captured")]
        name: String,
    },
    /// Print shell completions (bash, zsh, fish, ...), vfctl's man page, or
    /// vfio-managerd's (`daemon-man`) (changes nothing).
    Generate {
        #[arg(value_parser = ["bash", "zsh", "fish", "elvish", "powershell", "man", "daemon-man"])]
        what: String,
    },
    /// Build a fake host tree for tests and demos. Creates files under DIR only.
    FakeHost {
        dir: PathBuf,
        /// A built-in layout: demo, domestic-gpu, nvidia-dc, emulated.
        #[arg(long, default_value = "demo", conflicts_with_all = ["pfs", "from"])]
        layout: String,
        /// A generated host with this many domestic GPU PFs (with --vfs-per-pf VFs each).
        #[arg(long)]
        pfs: Option<u32>,
        #[arg(long, default_value_t = 4)]
        vfs_per_pf: u32,
        /// A layout from a JSON file (as captured from the emulated host).
        #[arg(long)]
        from: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Validate a configuration file; errors name the line and column.
    Check { file: PathBuf },
}

#[derive(Subcommand, Debug)]
pub enum OrphanCommand {
    /// End NAME's quarantine and offer it again as it is. Changes what is offered.
    Adopt { name: String },
    /// Return NAME (a PCI address) to its host driver, clear the vGPU type of a VF a
    /// swap took away, or remove NAME (an mdev UUID); then end its quarantine.
    /// Changes the host; refused while a VM holds it open.
    Free { name: String },
}

/// What can go wrong in a command: the operation, the daemon, the configuration, or
/// writing its output.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Op(#[from] vf_provisioner::Error),
    #[error(transparent)]
    Id(#[from] crate::api::ids::IdError),
    /// A typed error from the daemon, its name decoded.
    #[error("{message}")]
    Daemon {
        name: crate::api::ErrorName,
        message: String,
    },
    #[error("{0}")]
    Unreachable(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Vmm(#[from] crate::ch::ChError),
    #[error(transparent)]
    Mdev(#[from] mediated_dev::Error),
    #[error("cannot write output")]
    Output(#[source] std::io::Error),
}

/// Runs `vfctl` with `args`, printing to `out` and `err`.
pub fn main(
    args: impl IntoIterator<Item = OsString>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> ExitCode {
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() {
                exit::BAD_INPUT
            } else {
                exit::OK
            };
            let text = e.render().to_string();
            let _ = if e.use_stderr() {
                write!(err, "{text}")
            } else {
                write!(out, "{text}")
            };
            return ExitCode::from(code);
        }
    };
    match run(&cli, out) {
        Ok(code) => ExitCode::from(code),
        // A reader that went away (`vfctl list | head`) is not an error.
        Err(CliError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            ExitCode::from(exit::OK)
        }
        Err(CliError::Output(e)) => {
            let _ = writeln!(err, "vfctl: cannot write output: {e}");
            ExitCode::from(exit::FAILED)
        }
        Err(CliError::Daemon { name, message }) => {
            use crate::api::ErrorName as N;
            let _ = writeln!(err, "vfctl: {message}");
            ExitCode::from(match name {
                N::BadInput | N::NotFound => exit::BAD_INPUT,
                N::Refused | N::NoDevice | N::PermissionDenied => exit::REFUSED,
                N::Failed | N::Other(_) => exit::FAILED,
            })
        }
        Err(e @ (CliError::Unreachable(_) | CliError::Vmm(_))) => {
            let _ = writeln!(err, "vfctl: {e}");
            ExitCode::from(exit::FAILED)
        }
        Err(e @ (CliError::Config(_) | CliError::Id(_))) => {
            let _ = writeln!(err, "vfctl: {e}");
            ExitCode::from(exit::BAD_INPUT)
        }
        Err(CliError::Op(e)) => report(err, &e, e.kind()),
        Err(CliError::Mdev(e)) => report(err, &e, e.kind()),
    }
}

/// Prints an operation's error with its causes; the exit code follows its kind.
fn report(err: &mut dyn Write, e: &dyn std::error::Error, kind: Kind) -> ExitCode {
    let _ = writeln!(err, "vfctl: {e}");
    let mut source = e.source();
    while let Some(s) = source {
        let _ = writeln!(err, "  caused by: {s}");
        source = s.source();
    }
    ExitCode::from(match kind {
        Kind::BadInput => exit::BAD_INPUT,
        Kind::Refused => exit::REFUSED,
        Kind::Failed => exit::FAILED,
    })
}

fn addr(s: &str) -> vf_provisioner::Result<PciAddress> {
    Ok(s.parse()?)
}

fn count(s: &str) -> vf_provisioner::Result<u32> {
    s.parse().map_err(|_| vf_provisioner::Error::InvalidInput {
        what: "VF count",
        input: s.into(),
        reason: "expected a whole number such as 4".into(),
    })
}

fn run(cli: &Cli, out: &mut dyn Write) -> Result<u8, CliError> {
    if let Command::Generate { what } = &cli.command {
        return generate(what, out);
    }
    if let Command::FakeHost {
        dir,
        layout,
        pfs,
        vfs_per_pf,
        from,
    } = &cli.command
    {
        return build_fake(dir, layout, *pfs, *vfs_per_pf, from.as_deref(), out);
    }
    if let Command::Config(ConfigCommand::Check { file }) = &cli.command {
        let c = Config::load_required(file)?;
        let r = render::Renderer {
            out,
            format: cli.output,
        };
        return r.done(&format!(
            "{}: ok ({} PFs to restore, {} functions to bind, {} manage entries, {} exclusions)",
            file.display(),
            c.pfs.len(),
            c.bind.len(),
            c.devices.manage.len(),
            c.devices.exclude.len()
        ));
    }
    if !cli.direct && through_daemon(&cli.command) {
        return daemon_command(cli, out);
    }
    let sys = Sysfs::open_as(&cli.root, cli.fake_kernel)?;
    if let Command::CaptureLayout { name } = &cli.command {
        let layout = fake::Layout::capture(&sys, name);
        serde_json::to_writer_pretty(&mut *out, &layout).map_err(|e| CliError::Output(e.into()))?;
        writeln!(out).map_err(CliError::Output)?;
        return Ok(exit::OK);
    }
    let cfg = Config::load(&cli.config)?;
    let p = Provisioner::new(sys, DeviceFilter::new(&cfg.devices));
    if let Some(code) = mediated(&cli.command, &p, cli.output, out) {
        return code;
    }
    let r = render::Renderer {
        out,
        format: cli.output,
    };
    match &cli.command {
        Command::List { all } => r.list(&p, &Host::scan(p.sysfs()), *all),
        Command::Show { address } => {
            let a = addr(address)?;
            let host = Host::scan(p.sysfs());
            let f = host.get(&a).ok_or(vf_provisioner::Error::NoSuchDevice(a))?;
            r.show(&p, &host, f)
        }
        Command::Enable { pf, vfs } => {
            let n = vfs.as_deref().map(count).transpose()?;
            let pf = addr(pf)?;
            let created = p.enable_vfs(&pf, n)?;
            r.enabled(&pf, &created)
        }
        Command::Disable { pf } => {
            let pf = addr(pf)?;
            p.disable_vfs(&pf)?;
            r.done(&format!("{pf}: VFs disabled"))
        }
        Command::Bind {
            address,
            whole_group,
        } => r.moved(&p.bind_vfio(&addr(address)?, *whole_group)?, address),
        Command::Unbind {
            address,
            whole_group,
            driver,
        } => r.moved(
            &p.unbind(&addr(address)?, *whole_group, driver.as_deref())?,
            address,
        ),
        Command::Reset { address } => {
            let a = addr(address)?;
            p.reset(&a)?;
            r.done(&format!("{a}: reset"))
        }
        Command::Check => {
            let findings = p.check();
            r.check(&findings)?;
            Ok(if findings.iter().any(|f| f.level == Level::Error) {
                exit::FAILED
            } else {
                exit::OK
            })
        }
        Command::Provision { .. }
        | Command::Migrate(_)
        | Command::Release { .. }
        | Command::Attach { .. }
        | Command::Detach { .. }
        | Command::Orphans
        | Command::Orphan(_)
        | Command::Health
        | Command::Quarantine { .. }
        | Command::Clear { .. }
        | Command::Replace { .. }
        | Command::Swaps { .. }
        | Command::Top { .. }
        | Command::Placement
        | Command::Plan {
            rebalance: true, ..
        }
        | Command::Leases => Err(vf_provisioner::Error::InvalidInput {
            what: "mode",
            input: "--direct".into(),
            reason: "leases live in the daemon; run this command without --direct".into(),
        }
        .into()),
        Command::FakeHost { .. }
        | Command::CaptureLayout { .. }
        | Command::Generate { .. }
        | Command::Mdev(_)
        | Command::Vgpu(_)
        | Command::Plan {
            rebalance: false, ..
        }
        | Command::Config(_) => unreachable!("handled above"),
    }
}

/// The mediated path's commands (always on the host directly); `None` for the rest.
fn mediated(
    c: &Command,
    p: &Provisioner,
    format: Output,
    out: &mut dyn Write,
) -> Option<Result<u8, CliError>> {
    let m = mediated_dev::Mediator::new(p.sysfs().clone());
    let r = render::Renderer { out, format };
    match c {
        Command::Mdev(cmd) => Some(mdev::mdev(&m, p, cmd, r)),
        Command::Vgpu(cmd) => Some(mdev::vgpu(&m, p, cmd, r)),
        Command::Plan {
            wants,
            rebalance: false,
        } => Some(mdev::plan(&m, wants, r)),
        _ => None,
    }
}

fn through_daemon(c: &Command) -> bool {
    matches!(
        c,
        Command::List { .. }
            | Command::Enable { .. }
            | Command::Disable { .. }
            | Command::Bind { .. }
            | Command::Unbind { .. }
            | Command::Provision { .. }
            | Command::Release { .. }
            | Command::Attach { .. }
            | Command::Detach { .. }
            | Command::Leases
            | Command::Swaps { .. }
            | Command::Top { .. }
            | Command::Placement
            | Command::Plan {
                rebalance: true,
                ..
            }
            | Command::Orphans
            | Command::Orphan(_)
            | Command::Health
            | Command::Quarantine { .. }
            | Command::Clear { .. }
            | Command::Replace { .. }
            | Command::Migrate(_)
    ) || matches!(c, Command::Mdev(m) if mdev::through_daemon(m))
}

/// `vfctl top`: the usage table, redrawn every `every` seconds on a terminal.
fn top(
    c: &client::Client,
    mut r: render::Renderer,
    once: bool,
    every: u64,
) -> Result<u8, CliError> {
    use std::io::IsTerminal;
    let live = !once && r.format == Output::Table && std::io::stdout().is_terminal();
    loop {
        let usage = c.usage_now()?;
        if live {
            r.clear()?;
        }
        r.usage(&usage)?;
        if !live {
            return Ok(exit::OK);
        }
        std::thread::sleep(std::time::Duration::from_secs(every));
    }
}

/// One command through the daemon.
fn daemon_command(cli: &Cli, out: &mut dyn Write) -> Result<u8, CliError> {
    let c = client::Client::connect()?;
    let r = render::Renderer {
        out,
        format: cli.output,
    };
    match &cli.command {
        Command::Mdev(cmd) => mdev::mdev_daemon(&c, cmd, r),
        Command::Migrate(cmd) => mdev::migrate(&c, cmd, r),
        Command::List { .. } => r.devices(&c.devices()?),
        Command::Leases => r.leases(&c.leases()?, &c.agents()?),
        Command::Top { once, interval_s } => top(&c, r, *once, *interval_s),
        Command::Placement => r.pressure(&c.pressure()?),
        Command::Plan { .. } => r.moves(&c.plan_rebalance()?),
        Command::Swaps { lease } => r.swaps(&c.lease_swaps(lease)?),
        Command::Orphans => r.orphans(&c.orphans()?),
        Command::Health => r.health(&c.health()?),
        Command::Quarantine { device, reason } => {
            c.quarantine(device, reason)?;
            r.done(&format!(
                "{device} quarantined: offered to nobody until `vfctl clear {device}`"
            ))
        }
        Command::Clear { device } => {
            c.clear(device)?;
            r.done(&format!(
                "{device} cleared: it answers its probe and is offered again"
            ))
        }
        Command::Replace { device, reason } => {
            let new = c.replace(device, reason)?;
            r.done(&format!(
                "{device} replaced by {new} in its lease; {device} is held back (`vfctl health`)"
            ))
        }
        Command::Orphan(OrphanCommand::Adopt { name }) => {
            c.adopt_orphan(name)?;
            r.done(&format!("{name} adopted: offered again as it is"))
        }
        Command::Orphan(OrphanCommand::Free { name }) => {
            c.free_orphan(name)?;
            r.done(&format!("{name} freed: returned to the host"))
        }
        Command::Provision {
            want,
            numa,
            request_id,
            vm_uuid,
            pfs,
            format,
            vmm,
        } => {
            let id = request_id
                .clone()
                .unwrap_or_else(|| format!("vfctl-{}", crate::daemon::core::new_id()));
            let req = Request {
                vm_uuid: vm_uuid.clone(),
                numa_node: numa.map_or(-1, |n| n as i32),
                pfs: pfs.clone(),
                vmm: vmm.clone(),
                ..want.request(id)
            };
            let lease = c.provision(&req)?;
            match format.as_deref() {
                Some("libvirt") => r.libvirt_hostdevs(&lease),
                Some("qemu") => r.qemu_devices(&lease),
                Some(_) => r.ch_devices(&lease),
                None => r.leases(&[lease], &[]),
            }
        }
        Command::Attach {
            ch_socket,
            want,
            watch,
        } => {
            let socket = std::path::absolute(ch_socket).unwrap_or_else(|_| ch_socket.clone());
            let req = Request {
                // Where the daemon swaps a failed device (policy `replace`).
                vmm: format!("ch:{}", socket.display()),
                ..want.request(format!("ch-{}-{}", want.vm, crate::daemon::core::new_id()))
            };
            let ch = crate::ch::ChClient::new(ch_socket);
            let (lease, added) = attach::attach(&c, &ch, &req)?;
            let code = r.attached(&lease, &added)?;
            if *watch {
                attach::watch(&c, &ch, &lease)?;
            }
            Ok(code)
        }
        Command::Detach { ch_socket, vm } => {
            let ch = crate::ch::ChClient::new(ch_socket);
            let released = attach::detach(&c, &ch, vm)?;
            r.done(&format!(
                "VM {vm}: devices removed, leases released: {}",
                released.join(" ")
            ))
        }
        Command::Release { lease, request_id } => {
            let (released, what) = match (lease, request_id) {
                (Some(l), _) => (c.release(l)?, format!("lease {l}")),
                (None, Some(r)) => (
                    c.release_request(r)?,
                    format!("the lease of request id {r}"),
                ),
                (None, None) => unreachable!("clap requires one"),
            };
            r.done(&if released {
                format!("{what} released")
            } else {
                format!("{what} was already released")
            })
        }
        Command::Enable { pf, vfs } => {
            let n = vfs.as_deref().map(count).transpose()?.unwrap_or(0);
            let created = c.enable(pf, n)?;
            r.done(&format!(
                "{pf}: {} VFs enabled: {}",
                created.len(),
                created.join(" ")
            ))
        }
        Command::Disable { pf } => {
            c.disable(pf)?;
            r.done(&format!("{pf}: VFs disabled"))
        }
        Command::Bind {
            address,
            whole_group,
        } => {
            let moved = c.bind(address, *whole_group)?;
            r.done(&format!("bound to vfio-pci: {}", or_nothing(&moved)))
        }
        Command::Unbind {
            address,
            whole_group,
            driver,
        } => {
            if let Some(d) = driver {
                return Err(vf_provisioner::Error::InvalidInput {
                    what: "option",
                    input: format!("--driver {d}"),
                    reason: "the daemon returns a function to the driver the kernel matches; use --direct to pick one".into(),
                }
                .into());
            }
            let moved = c.unbind(address, *whole_group)?;
            r.done(&format!("returned to the host: {}", or_nothing(&moved)))
        }
        _ => unreachable!("through_daemon lists the commands"),
    }
}

fn or_nothing(v: &[String]) -> String {
    if v.is_empty() {
        "nothing to change".into()
    } else {
        v.join(" ")
    }
}

fn generate(what: &str, out: &mut dyn Write) -> Result<u8, CliError> {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    if what == "daemon-man" {
        cmd = crate::daemon::Options::command();
    }
    if what == "man" || what == "daemon-man" {
        let section = if what == "man" { "1" } else { "8" };
        clap_mangen::Man::new(cmd)
            .section(section)
            .render(out)
            .map_err(CliError::Output)?;
        return Ok(exit::OK);
    }
    let shell: clap_complete::Shell = what.parse().expect("value_parser checked the shell");
    clap_complete::generate(shell, &mut cmd, "vfctl", out);
    Ok(exit::OK)
}

fn build_fake(
    dir: &std::path::Path,
    layout: &str,
    pfs: Option<u32>,
    vfs_per_pf: u32,
    from: Option<&std::path::Path>,
    out: &mut dyn Write,
) -> Result<u8, CliError> {
    let bad = |reason: String| vf_provisioner::Error::InvalidInput {
        what: "fake host",
        input: dir.display().to_string(),
        reason,
    };
    let l = match (pfs, from) {
        (Some(n), _) => layouts::large(n, vfs_per_pf),
        (_, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| bad(format!("{}: {e}", path.display())))?;
            fake::Layout::from_json(&text).map_err(|e| bad(format!("{}: {e}", path.display())))?
        }
        _ => layouts::by_name(layout).ok_or_else(|| {
            bad(format!(
                "no layout {layout:?}; choose one of {}",
                layouts::NAMES.join(", ")
            ))
        })?,
    };
    if dir.exists()
        && std::fs::read_dir(dir)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(bad("the directory exists and is not empty".into()).into());
    }
    l.build(dir).map_err(|e| bad(e.to_string()))?;
    writeln!(out, "fake host {:?} built under {}", l.name, dir.display())
        .map_err(CliError::Output)?;
    Ok(exit::OK)
}
