//! `vfctl mdev`, `vfctl vgpu` and `vfctl plan`: the mediated path, on the host
//! directly (as mdevctl does), with definitions in mdevctl's own files.

use clap::Subcommand;
use mediated_dev::mdevctl::{self, Config};
use mediated_dev::plan::Target;
use mediated_dev::{parse_uuid, Definition, MdevParent, MdevTypeId, Mediator, Start, Store, Want};
use serde_json::json;
use vf_provisioner::{Op, PciAddress, PciFunction, Provisioner, Subject};

use super::client::Client;
use super::render::{Renderer, Res};
use super::{exit, Output};
use crate::api::MdevInfo;

/// Which mdev: the arguments `create` and `define` share.
#[derive(clap::Args, Debug)]
pub struct Spec {
    /// A PCI address or a device name such as `mtty`.
    #[arg(long)]
    parent: MdevParent,
    #[arg(long = "type")]
    type_id: MdevTypeId,
    /// Defaults to a fresh random UUID.
    #[arg(long)]
    uuid: Option<String>,
}

impl Spec {
    fn definition(&self, auto: bool) -> mediated_dev::Result<Definition> {
        Ok(Definition {
            uuid: uuid_or_new(&self.uuid)?,
            parent: self.parent.clone(),
            config: Config {
                mdev_type: self.type_id.clone(),
                start: if auto { Start::Auto } else { Start::Manual },
                attrs: vec![],
            },
        })
    }
}

#[derive(Subcommand, Debug)]
pub enum MdevCommand {
    /// List mdev parents and their types with free instances (changes nothing).
    Types {
        /// Only this parent (a PCI address or a device name such as `mtty`).
        #[arg(long)]
        parent: Option<String>,
    },
    /// List active mdevs and the definitions in /etc/mdevctl.d (changes nothing).
    /// With --defined and --output json, prints mdevctl's `list -d --dumpjson` shape.
    List {
        #[arg(long)]
        defined: bool,
    },
    /// Create an mdev. Changes the host: a new device on the mdev bus with its own
    /// IOMMU group; with --define, also writes its definition.
    Create {
        #[command(flatten)]
        spec: Spec,
        /// Also write a persistent definition (start manual, or auto with --auto).
        #[arg(long)]
        define: bool,
        #[arg(long, requires = "define")]
        auto: bool,
    },
    /// Remove an mdev (refused while a VM holds it). With --undefine, also deletes
    /// its definition.
    Remove {
        uuid: String,
        #[arg(long)]
        undefine: bool,
    },
    /// Write a persistent definition to /etc/mdevctl.d/PARENT/UUID (does not create
    /// the device; `vfctl mdev start` does).
    Define {
        #[command(flatten)]
        spec: Spec,
        /// Mark it `auto` (`vfctl mdev start` with no UUID starts those).
        #[arg(long)]
        auto: bool,
    },
    /// Delete a definition (the device, if active, stays).
    Undefine { uuid: String },
    /// Create defined mdevs: one UUID, or every `auto` definition. Changes the host.
    Start { uuid: Option<String> },
}

#[derive(Subcommand, Debug)]
pub enum VgpuCommand {
    /// VFs with NVIDIA vGPU 17+ attributes: their type and what fits now (changes nothing).
    List,
    /// Give a VF a vGPU type (id or name). Changes the VF's vGPU configuration.
    Set { vf: String, r#type: String },
    /// Clear a VF's vGPU type (refused while a VM holds the VF).
    Clear { vf: String },
}

fn uuid_or_new(s: &Option<String>) -> mediated_dev::Result<uuid::Uuid> {
    Ok(s.as_deref()
        .map(parse_uuid)
        .transpose()?
        .unwrap_or_else(uuid::Uuid::new_v4))
}

fn vf(s: &str) -> Result<PciAddress, super::CliError> {
    Ok(s.parse::<PciAddress>()?)
}

/// The policy gate for a direct change on PCI function `a` (the parent of an
/// mdev, a vGPU VF); a named parent such as `mtty` has no function to judge.
fn gate(p: &Provisioner, op: Op, a: Option<PciAddress>) -> Result<(), super::CliError> {
    let f = a.and_then(|a| PciFunction::read_brief(p.sysfs(), &a));
    match f {
        Some(f) => p
            .gate(op, Subject::Function(&f))
            .map_err(|r| vf_provisioner::Error::from(r).into()),
        None => Ok(()),
    }
}

pub fn mdev(m: &Mediator, p: &Provisioner, cmd: &MdevCommand, mut r: Renderer) -> Res {
    let store = Store::new(m.sysfs().root());
    match cmd {
        MdevCommand::Types { parent } => types(m, parent.as_deref(), r),
        MdevCommand::List { defined } => list(m, &store, *defined, r),
        MdevCommand::Create { spec, define, auto } => {
            let def = spec.definition(*auto)?;
            gate(p, Op::MdevCreate, def.parent.as_str().parse().ok())?;
            if *define {
                // Definition first: a crash between the two leaves a definition to
                // start, never an mdev nobody recorded.
                store.write(&def)?;
            }
            let d = m.create(&def.parent, &def.config.mdev_type, Some(def.uuid))?;
            if r.format == Output::Json {
                return r.json(&d);
            }
            r.line(&format!("{}", d.uuid))
        }
        MdevCommand::Remove { uuid, undefine } => {
            let uuid = parse_uuid(uuid)?;
            if let Some(d) = mediated_dev::host::read_mdev(m.sysfs(), &uuid) {
                let parent = d.parent.as_str().parse().ok();
                let parent = parent.and_then(|a| PciFunction::read_brief(p.sysfs(), &a));
                let name = uuid.to_string();
                let s = Subject::Mdev {
                    uuid: &name,
                    group: d.iommu_group,
                    parent: parent.as_ref(),
                };
                p.gate(Op::MdevRemove, s)
                    .map_err(vf_provisioner::Error::from)?;
            }
            m.remove(&uuid)?;
            if *undefine {
                store.remove(&uuid)?;
            }
            r.done(&format!("removed mdev {uuid}"))
        }
        MdevCommand::Define { spec, auto } => {
            let def = spec.definition(*auto)?;
            m.scan()
                .parent(def.parent.as_str())?
                .find_type(def.config.mdev_type.as_str())?;
            store.write(&def)?;
            r.line(&def.uuid.to_string())
        }
        MdevCommand::Undefine { uuid } => {
            let uuid = parse_uuid(uuid)?;
            if !store.remove(&uuid)? {
                return Err(mediated_dev::Error::NoMdev(uuid).into());
            }
            r.done(&format!("undefined mdev {uuid}"))
        }
        MdevCommand::Start { uuid: Some(u) } => {
            let uuid = parse_uuid(u)?;
            let def = store.get(&uuid).ok_or(mediated_dev::Error::NoMdev(uuid))?;
            gate(p, Op::MdevCreate, def.parent.as_str().parse().ok())?;
            m.start(&def)?;
            r.done(&format!("started mdev {uuid}"))
        }
        MdevCommand::Start { uuid: None } => {
            let mut code = exit::OK;
            let veto = |d: &Definition| {
                gate(p, Op::MdevCreate, d.parent.as_str().parse().ok())
                    .err()
                    .map(|e| e.to_string())
            };
            for (uuid, res) in m.start_auto(&store, &veto) {
                match res {
                    Ok(_) => r.line(&format!("{uuid}: started"))?,
                    Err(e) => {
                        code = exit::FAILED;
                        r.line(&format!("{uuid}: {e}"))?
                    }
                };
            }
            Ok(code)
        }
    }
}

fn types(m: &Mediator, only: Option<&str>, mut r: Renderer) -> Res {
    let host = m.scan();
    let parents: Vec<_> = match only {
        Some(p) => vec![host.parent(p)?.clone()],
        None => host.parents.clone(),
    };
    if r.format == Output::Json {
        return r.json(&parents);
    }
    r.line(&format!(
        "{:<14} {:<12} {:>9} {:>6}  NAME",
        "PARENT", "TYPE", "AVAILABLE", "IN USE"
    ))?;
    for p in &parents {
        for t in &p.types {
            r.line(&format!(
                "{:<14} {:<12} {:>9} {:>6}  {}",
                p.name,
                t.id,
                t.available_instances,
                t.devices.len(),
                t.name
            ))?;
        }
    }
    Ok(exit::OK)
}

fn list(m: &Mediator, store: &Store, defined: bool, r: Renderer) -> Res {
    let (defs, problems) = store.list();
    if defined && r.format == Output::Json {
        let mut r = r;
        return r.json(&mdevctl::dump_json(&defs));
    }
    let infos = crate::api::mdev_infos(&m.scan(), &defs);
    let warnings: Vec<String> = problems
        .iter()
        .map(|p| format!("warning: {}: {}", p.path.display(), p.reason))
        .collect();
    table(infos, defined, &warnings, r)
}

/// The mdev table both modes print (only active ones unless `defined`).
fn table(mut infos: Vec<MdevInfo>, defined: bool, warnings: &[String], mut r: Renderer) -> Res {
    infos.retain(|i| defined || i.active);
    if r.format == Output::Json {
        return r.json(&infos);
    }
    r.line(&format!(
        "{:<36} {:<14} {:<12} {:<7} {:<8} {:<5} VM",
        "UUID", "PARENT", "TYPE", "ACTIVE", "DEFINED", "GROUP"
    ))?;
    for i in &infos {
        let state = match (i.active, i.driver.is_empty()) {
            (false, _) => "no",
            (true, true) => "unbound",
            (true, false) => "yes",
        };
        let group = if i.iommu_group < 0 {
            "-".into()
        } else {
            i.iommu_group.to_string()
        };
        r.line(&format!(
            "{:<36} {:<14} {:<12} {state:<7} {:<8} {group:<5} {}",
            i.uuid,
            i.parent,
            i.type_id,
            or_dash(&i.defined),
            or_dash(&i.vm_name)
        ))?;
    }
    for w in warnings {
        r.line(w)?;
    }
    Ok(exit::OK)
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

/// Whether an mdev command goes to the daemon (outside `--direct`): the changes it
/// records and the list with leases. Definitions are files, read and written here.
pub fn through_daemon(cmd: &MdevCommand) -> bool {
    matches!(
        cmd,
        MdevCommand::List { defined: false }
            | MdevCommand::Create { .. }
            | MdevCommand::Remove { .. }
    )
}

/// An mdev command through the daemon (see [`through_daemon`]).
pub fn mdev_daemon(c: &Client, cmd: &MdevCommand, mut r: Renderer) -> Res {
    match cmd {
        MdevCommand::List { .. } => table(c.mdevs()?, false, &[], r),
        MdevCommand::Create { spec, define, auto } => {
            let uuid = spec.uuid.as_deref().map(parse_uuid).transpose()?;
            let define = match (define, auto) {
                (false, _) => "",
                (true, false) => "manual",
                (true, true) => "auto",
            };
            let uuid = uuid.map(|u| u.to_string()).unwrap_or_default();
            let d = c.create_mdev(spec.parent.as_str(), spec.type_id.as_str(), &uuid, define)?;
            if r.format == Output::Json {
                return r.json(&d);
            }
            r.line(&d.uuid)
        }
        MdevCommand::Remove { uuid, undefine } => {
            let uuid = parse_uuid(uuid)?;
            c.remove_mdev(&uuid.to_string(), *undefine)?;
            r.done(&format!("removed mdev {uuid}"))
        }
        _ => unreachable!("through_daemon lists the commands"),
    }
}

#[derive(Subcommand, Debug)]
pub enum MigrateCommand {
    /// Preflight (changes nothing). With UUID: whether this daemon can migrate that
    /// mdev now and as what; exits 3 with the reason if not (no VFIO migration, not
    /// running, held by a VMM). With --vm and --to: whether the destination host can
    /// take the mdevs of VM NAME's leases (their vendor driver at the same version,
    /// room for each type), asked of the destination's daemon; exits 3 with its
    /// answer if not.
    #[command(group(clap::ArgGroup::new("what").required(true).args(["uuid", "vm"])))]
    Check {
        uuid: Option<String>,
        /// The VM whose leased mdevs would move.
        #[arg(long, requires = "to")]
        vm: Option<String>,
        /// The destination: its daemon's D-Bus address (`unix:path=...`), or a host
        /// reached over ssh as `busctl --host` does (its systemd-stdio-bridge).
        #[arg(long, requires = "vm")]
        to: Option<String>,
    },
    /// What would move if VM NAME live-migrated (changes nothing): each device of its
    /// leases, and whether its state moves with the VM (an mdev, through its VMM's
    /// VFIO migration, under its vendor driver and version) or not (a passed-through
    /// PCI function: release or unplug it first); and a hand-over already prepared.
    /// `vfctl migrate check --vm NAME --to HOST` then asks the destination.
    Plan {
        #[arg(long)]
        vm: String,
    },
    /// Destination: reserve mdev UUID (created as --type if absent) and wait for one
    /// source. Changes the host: may create the mdev; its state is replaced by the
    /// source's. Prints the endpoint for `vfctl migrate send` on the source host and
    /// returns; the daemon receives in the background (a failure resets the device,
    /// or removes it if it was created for this).
    Receive {
        uuid: String,
        /// The mdev type to create the device as, if it does not exist here.
        #[arg(long = "type", default_value = "")]
        type_id: String,
        /// HOST:PORT to listen on (port 0 picks one); required: the daemon listens
        /// only where told. A wildcard host in the printed endpoint means any of this
        /// host's addresses.
        #[arg(long)]
        listen: String,
        /// Use credentials made for this migration alone instead of the PKI's, and
        /// write the source's part to FILE (created, mode 0600; it holds the
        /// source's private key): give it to `vfctl migrate send --credentials`.
        #[arg(long, value_name = "FILE")]
        credentials_out: Option<std::path::PathBuf>,
    },
    /// Source: stream an mdev's state to a destination's endpoint. Changes the host:
    /// on success the device is left stopped (its VM now runs there); on any
    /// failure it runs again here. Shows its progress on stderr: bytes, rate and
    /// expected downtime (a bar on a terminal, a line a second when piped).
    Send {
        uuid: String,
        endpoint: String,
        /// The one-time credentials the destination's `receive --credentials-out`
        /// wrote (otherwise the PKI's are used).
        #[arg(long, value_name = "FILE")]
        credentials: Option<std::path::PathBuf>,
    },
    /// A running VM that its VMM migrates to a second VMM on this host: reserve the
    /// destination mdev for lease LEASE's mdev, after checking that it can take the
    /// source's state (type, vendor driver and version). Changes the host: makes
    /// the destination (of the source's type) unless --uuid names a free one. Prints
    /// its UUID, for the destination VMM (`sysfsdev=/sys/bus/mdev/devices/UUID`).
    PrepareVm {
        #[arg(long)]
        lease: String,
        /// The destination mdev (made when absent; a new UUID when not given).
        #[arg(long, default_value = "")]
        uuid: String,
    },
    /// After the VMM's migration completed and the source VMM quit: the lease holds
    /// the destination under the same id, and the source mdev goes (removed if the
    /// lease made it). Refused while the source is held open or while no VMM holds
    /// the destination. Changes the host and the lease.
    Commit {
        #[arg(long)]
        lease: String,
    },
    /// After a failed or cancelled migration, once the destination VMM quit: the
    /// destination mdev goes (removed if it was made for this). The lease is unchanged.
    Abort {
        #[arg(long)]
        lease: String,
    },
}

/// A migration's progress on stderr, from the daemon's `MigrationProgress`: a bar
/// redrawn in place on a terminal, a plain line at most once a second otherwise.
struct Progress<'a> {
    uuid: &'a str,
    start: std::time::Instant,
    last: Option<std::time::Instant>,
    live: bool,
}

impl<'a> Progress<'a> {
    fn new(uuid: &'a str) -> Self {
        use std::io::IsTerminal;
        let live = std::io::stderr().is_terminal();
        Progress {
            uuid,
            start: std::time::Instant::now(),
            last: None,
            live,
        }
    }

    fn update(&mut self, sent: u64, expected: u64) {
        let now = std::time::Instant::now();
        if !self.live
            && self
                .last
                .is_some_and(|t| now - t < std::time::Duration::from_secs(1))
        {
            return;
        }
        self.last = Some(now);
        let line = progress_line(self.uuid, sent, expected, now - self.start, self.live);
        match self.live {
            true => eprint!("\r\x1b[K{line}"),
            false => eprintln!("{line}"),
        }
    }

    fn end(&self) {
        if self.live && self.last.is_some() {
            eprintln!();
        }
    }
}

/// `UUID: [####......] 12.0 MiB sent, 96.0 MiB/s, expected downtime ~1 ms`: the bar
/// (on a terminal, when the device said what the stop carries) is the bytes sent
/// against that; the downtime is what the stop carries at the rate so far.
fn progress_line(
    uuid: &str,
    sent: u64,
    expected: u64,
    took: std::time::Duration,
    bar: bool,
) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    let rate = sent as f64 / took.as_secs_f64().max(1e-3);
    let mut line = format!("{uuid}: ");
    if bar && expected > 0 {
        let filled = (sent.min(expected) * 20 / expected) as usize;
        line += &format!("[{}{}] ", "#".repeat(filled), ".".repeat(20 - filled));
    }
    line += &format!("{:.1} MiB sent, {:.1} MiB/s", sent as f64 / MIB, rate / MIB);
    if expected > 0 && rate > 0.0 {
        line += &format!(
            ", expected downtime ~{:.0} ms",
            expected as f64 / rate * 1e3
        );
    }
    line
}

/// `vfctl migrate check --vm NAME --to DEST`: VM NAME's mdevs, by type, from this
/// host's daemon; then each type asked of the destination's daemon.
fn check_vm(c: &Client, vm: &str, to: &str, mut r: Renderer) -> Res {
    let mut wants: Vec<((String, String, String), u32)> = Vec::new();
    for (_, _, type_id, driver, version) in c.vm_mdevs(vm)? {
        let key = (type_id, driver, version);
        match wants.iter_mut().find(|(k, _)| *k == key) {
            Some((_, n)) => *n += 1,
            None => wants.push((key, 1)),
        }
    }
    let dest = Client::connect_to(Some(&destination_address(to)?)).map_err(|e| {
        super::CliError::Unreachable(format!(
            "destination {to}: its daemon is not reachable: {e}; nothing was changed"
        ))
    })?;
    let mut answers = Vec::new();
    for ((type_id, driver, version), n) in &wants {
        answers.push(dest.check_incoming(type_id, driver, version, *n)?);
    }
    if r.format == Output::Json {
        return r.json(&json!({ "vm": vm, "to": to, "ok": answers }));
    }
    r.line(&format!(
        "VM {vm} can migrate to {to}: {}",
        answers.join("; ")
    ))
}

/// One device of a VM's leases in `vfctl migrate plan`.
#[derive(serde::Serialize)]
struct Mover {
    lease: String,
    device: String,
    /// `mdev` or `pci`.
    kind: &'static str,
    /// The mdev type, or the PCI function's vendor:device.
    id: String,
    driver: String,
    driver_version: String,
    moves: bool,
}

/// A hand-over prepared for a lease (`vfctl migrate prepare-vm`), in `migrate plan`.
#[derive(serde::Serialize)]
struct Prepared {
    lease: String,
    from: String,
    to: String,
}

/// `vfctl migrate plan --vm NAME`: what VM NAME's leases hold, and what of it moves.
fn plan_vm(c: &Client, vm: &str, mut r: Renderer) -> Res {
    let vm = crate::api::ids::VmName::new(vm)?;
    let leases: Vec<_> = c
        .leases()?
        .into_iter()
        .filter(|l| l.vm_name == vm.as_str())
        .collect();
    if leases.is_empty() {
        return Err(super::CliError::Daemon {
            name: crate::api::ErrorName::NotFound,
            message: format!("VM {vm}: no lease of it here; `vfctl leases` lists them"),
        });
    }
    let mdevs = match c.vm_mdevs(vm.as_str()) {
        Ok(m) => m,
        Err(e) if e.name() == Some(&crate::api::ErrorName::NotFound) => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let mut movers = Vec::new();
    let mut prepared = Vec::new();
    for l in &leases {
        for d in &l.devices {
            let m = mdevs.iter().find(|m| m.1 == d.address);
            movers.push(Mover {
                lease: l.id.clone(),
                device: d.address.clone(),
                kind: if m.is_some() { "mdev" } else { "pci" },
                id: m.map_or_else(|| d.id.clone(), |m| m.2.clone()),
                driver: m.map(|m| m.3.clone()).unwrap_or_default(),
                driver_version: m.map(|m| m.4.clone()).unwrap_or_default(),
                moves: m.is_some(),
            });
        }
        if let Some((from, to)) = c.prepared_handover(&l.id)? {
            prepared.push(Prepared {
                lease: l.id.clone(),
                from,
                to,
            });
        }
    }
    if r.format == Output::Json {
        return r.json(&json!({ "vm": vm.as_str(), "devices": movers, "prepared": prepared }));
    }
    let stay = movers.iter().filter(|m| !m.moves).count();
    r.line(&format!(
        "VM {vm}: {} of {} devices move with it{}",
        movers.len() - stay,
        movers.len(),
        if stay > 0 {
            "; it cannot live-migrate as it is"
        } else {
            ""
        }
    ))?;
    for m in &movers {
        r.line(&match m.moves {
            true => format!(
                "  lease {}: mdev {} ({}, vendor driver {} {}): moves through its VMM's VFIO migration; the destination needs type {} under {} {}",
                m.lease, m.device, m.id, m.driver, m.driver_version, m.id, m.driver, m.driver_version
            ),
            false => format!(
                "  lease {}: {} ({}): does not move (a passed-through function carries no migration state); release it (`vfctl release {}`) or unplug it first",
                m.lease, m.device, m.id, m.lease
            ),
        })?;
    }
    for p in &prepared {
        r.line(&format!(
            "  lease {}: hand-over prepared from {} to {} (`vfctl migrate commit|abort --lease {}`)",
            p.lease, p.from, p.to, p.lease
        ))?;
    }
    r.line(&format!(
        "`vfctl migrate check --vm {vm} --to HOST` asks the destination for room and the vendor driver"
    ))
}

/// The D-Bus address of a destination given as an address (it has `=`) or a host
/// name, reached as `busctl --host` reaches one: ssh running systemd-stdio-bridge.
/// A host that ssh would read as an option, or that needs escaping, is refused.
fn destination_address(to: &str) -> Result<String, crate::api::ids::IdError> {
    if to.contains('=') {
        return Ok(to.to_string());
    }
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '@' | ':');
    if to.is_empty() || to.len() > 255 || to.starts_with('-') || !to.chars().all(plain) {
        return Err(crate::api::ids::IdError::new(
            "destination",
            to,
            "give a D-Bus address (unix:path=...) or a host name ([user@]host: letters, digits and . - _ :, not starting with '-')",
        ));
    }
    Ok(format!(
        "unixexec:path=ssh,argv1=-xT,argv2=--,argv3={to},argv4=systemd-stdio-bridge"
    ))
}

/// `vfctl migrate`: always through the daemon, which owns the devices' state.
pub fn migrate(c: &Client, cmd: &MigrateCommand, mut r: Renderer) -> Res {
    match cmd {
        MigrateCommand::Check {
            vm: Some(vm),
            to: Some(to),
            ..
        } => check_vm(c, vm, to, r),
        MigrateCommand::Plan { vm } => plan_vm(c, vm, r),
        MigrateCommand::Check { uuid, .. } => {
            let i = c.migration_check(uuid.as_deref().unwrap_or_default())?;
            if r.format == Output::Json {
                return r.json(&i);
            }
            r.line(&format!(
                "{}: can migrate: type {}, driver {} {}, features {}",
                i.uuid, i.type_id, i.driver, i.driver_version, i.features
            ))
        }
        MigrateCommand::Receive {
            uuid,
            type_id,
            listen,
            credentials_out,
        } => {
            let endpoint = match credentials_out {
                None => c.prepare_incoming(uuid, type_id, listen)?,
                Some(path) => {
                    let (endpoint, bundle) = c.prepare_incoming_once(uuid, type_id, listen)?;
                    write_secret(path, &bundle)?;
                    endpoint
                }
            };
            if r.format == Output::Json {
                return r.json(&json!({ "uuid": uuid, "endpoint": endpoint }));
            }
            r.line(&endpoint)
        }
        MigrateCommand::PrepareVm { lease, uuid } => {
            let dest = c.prepare_handover(lease, uuid)?;
            if r.format == Output::Json {
                return r.json(&json!({ "lease": lease, "uuid": dest }));
            }
            r.line(&dest)
        }
        MigrateCommand::Commit { lease } => {
            let dest = c.commit_handover(lease)?;
            r.done(&format!(
                "lease {lease} now holds mdev {dest}; the source mdev is gone"
            ))
        }
        MigrateCommand::Abort { lease } => {
            c.abort_handover(lease)?;
            r.done(&format!(
                "lease {lease}: the prepared destination is gone; the lease is unchanged"
            ))
        }
        MigrateCommand::Send {
            uuid,
            endpoint,
            credentials,
        } => {
            let bundle = match credentials {
                None => None,
                Some(path) => Some(read_bounded(path).map_err(|e| file_error(path, e))?),
            };
            let mut shown = Progress::new(uuid);
            let s =
                c.migrate_out_watching(uuid, endpoint, bundle.as_deref(), &mut |sent, expected| {
                    shown.update(sent, expected)
                });
            shown.end();
            let s = s?;
            if r.format == Output::Json {
                return r.json(&s);
            }
            r.line(&format!(
                "{uuid}: migrated to {endpoint}: {} bytes ({} before the stop), stopped for {} us; states {}",
                s.bytes, s.precopy_bytes, s.downtime_us, s.history
            ))
        }
    }
}

pub fn vgpu(m: &Mediator, p: &Provisioner, cmd: &VgpuCommand, mut r: Renderer) -> Res {
    match cmd {
        VgpuCommand::List => {
            let host = m.scan();
            if r.format == Output::Json {
                return r.json(&host.vgpus);
            }
            r.line(&format!(
                "{:<13} {:<13} {:<8} CREATABLE NOW",
                "VF", "PF", "TYPE"
            ))?;
            for s in &host.vgpus {
                let names: Vec<&str> = s.creatable.iter().map(|t| t.name.as_str()).collect();
                r.line(&format!(
                    "{:<13} {:<13} {:<8} {}",
                    s.vf.to_string(),
                    s.pf.map_or("-".into(), |p| p.to_string()),
                    s.current.map_or("-".into(), |c| c.to_string()),
                    names.join(", ")
                ))?;
            }
            Ok(exit::OK)
        }
        VgpuCommand::Set { vf: v, r#type } => {
            gate(p, Op::Vgpu, Some(vf(v)?))?;
            let t = m.set_vgpu(&vf(v)?, r#type)?;
            r.done(&format!("{v}: vGPU type {} ({})", t.name, t.id))
        }
        VgpuCommand::Clear { vf: v } => {
            gate(p, Op::VgpuClear, Some(vf(v)?))?;
            m.clear_vgpu(&vf(v)?)?;
            r.done(&format!("{v}: vGPU type cleared"))
        }
    }
}

/// `vfctl plan`: where each requested type would go; exit 3 if not all fit.
pub fn plan(m: &Mediator, wants: &[String], mut r: Renderer) -> Res {
    let wants = wants
        .iter()
        .map(|w| w.parse::<Want>())
        .collect::<mediated_dev::Result<Vec<_>>>()?;
    let p = mediated_dev::plan(&m.scan(), &wants);
    let code = if p.fits() { exit::OK } else { exit::REFUSED };
    if r.format == Output::Json {
        r.json(&p)?;
        return Ok(code);
    }
    for pl in &p.placements {
        let at = match &pl.target {
            Target::Mdev { parent, type_id } => format!("mdev {type_id} on {parent}"),
            Target::Vgpu { vf, type_id } => format!("vGPU type {type_id} on VF {vf}"),
        };
        r.line(&format!("fits   {:<20} {at}", pl.profile))?;
    }
    for s in &p.shortfalls {
        r.line(&format!(
            "short  {:<20} {} more do not fit: {}",
            s.profile, s.missing, s.reason
        ))?;
    }
    r.line(if p.fits() {
        "plan: everything fits; nothing was changed"
    } else {
        "plan: not everything fits; nothing was changed"
    })?;
    Ok(code)
}

fn file_error(path: &std::path::Path, e: std::io::Error) -> super::CliError {
    vf_provisioner::Error::InvalidInput {
        what: "credentials file",
        input: path.display().to_string(),
        reason: e.to_string(),
    }
    .into()
}

/// A credentials file, at most one byte past the size a bundle may have (the
/// daemon refuses a longer one; a device such as /dev/zero is not read forever).
/// A NUL cannot travel in a D-Bus string: the bus would drop the connection.
fn read_bounded(path: &std::path::Path) -> std::io::Result<String> {
    use std::io::Read;
    let limit = mediated_dev::migration::tls::MAX_BUNDLE as u64 + 1;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(limit)
        .read_to_string(&mut text)?;
    if text.contains('\0') {
        let e =
            "it holds NUL bytes: it is not the PEM text `migrate receive --credentials-out` writes";
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e));
    }
    Ok(text)
}

/// Writes one-time credentials where only the caller can read them; never over
/// an existing file.
fn write_secret(path: &std::path::Path, text: &str) -> Result<(), super::CliError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|e| file_error(path, e))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn progress_shows_bytes_rate_and_expected_downtime() {
        let l = super::progress_line("u", 8 << 20, 16 << 20, Duration::from_secs(2), true);
        assert_eq!(
            l,
            "u: [##########..........] 8.0 MiB sent, 4.0 MiB/s, expected downtime ~4000 ms"
        );
        let piped = super::progress_line("u", 8 << 20, 16 << 20, Duration::from_secs(2), false);
        assert!(!piped.contains('['), "no bar when piped: {piped}");
        let unknown = super::progress_line("u", 1 << 20, 0, Duration::from_secs(1), true);
        assert_eq!(
            unknown, "u: 1.0 MiB sent, 1.0 MiB/s",
            "no estimate without the device's"
        );
        let past = super::progress_line("u", 32 << 20, 16 << 20, Duration::from_secs(1), true);
        assert!(past.contains("[####################]"), "capped: {past}");
    }
}
