//! `vfctl mdev`, `vfctl vgpu` and `vfctl plan`: the mediated path, on the host
//! directly (as mdevctl does), with definitions in mdevctl's own files.

use clap::Subcommand;
use mediated_dev::mdevctl::{self, Config};
use mediated_dev::plan::Target;
use mediated_dev::{parse_uuid, Definition, Mediator, Start, Store, Want};
use serde_json::json;
use vf_provisioner::PciAddress;

use super::render::{Renderer, Res};
use super::{exit, Output};

/// Which mdev: the arguments `create` and `define` share.
#[derive(clap::Args, Debug)]
pub struct Spec {
    /// A PCI address or a device name such as `mtty`.
    #[arg(long)]
    parent: String,
    #[arg(long = "type")]
    type_id: String,
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
    s.as_deref()
        .map(parse_uuid)
        .unwrap_or_else(|| Ok(uuid::Uuid::new_v4()))
}

fn vf(s: &str) -> Result<PciAddress, super::CliError> {
    Ok(s.parse::<PciAddress>()?)
}

pub fn mdev(m: &Mediator, cmd: &MdevCommand, mut r: Renderer) -> Res {
    let store = Store::new(m.sysfs().root());
    match cmd {
        MdevCommand::Types { parent } => types(m, parent.as_deref(), r),
        MdevCommand::List { defined } => list(m, &store, *defined, r),
        MdevCommand::Create { spec, define, auto } => {
            let def = spec.definition(*auto)?;
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
            m.remove(&uuid)?;
            if *undefine {
                store.remove(&uuid)?;
            }
            r.done(&format!("removed mdev {uuid}"))
        }
        MdevCommand::Define { spec, auto } => {
            let def = spec.definition(*auto)?;
            m.scan()
                .parent(&def.parent)?
                .find_type(&def.config.mdev_type)?;
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
            m.start(&def)?;
            r.done(&format!("started mdev {uuid}"))
        }
        MdevCommand::Start { uuid: None } => {
            let mut code = exit::OK;
            for (uuid, res) in m.start_auto(&store) {
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

fn list(m: &Mediator, store: &Store, defined: bool, mut r: Renderer) -> Res {
    let (defs, problems) = store.list();
    let host = m.scan();
    if r.format == Output::Json {
        if defined {
            return r.json(&mdevctl::dump_json(&defs));
        }
        return r.json(&json!({ "active": host.mdevs, "defined": defs, "problems": problems }));
    }
    r.line(&format!(
        "{:<36} {:<14} {:<12} {:<7} {:<8} GROUP",
        "UUID", "PARENT", "TYPE", "ACTIVE", "DEFINED"
    ))?;
    let mut uuids: Vec<uuid::Uuid> = host.mdevs.iter().map(|d| d.uuid).collect();
    if defined {
        uuids.extend(
            defs.iter()
                .map(|d| d.uuid)
                .filter(|u| !host.mdevs.iter().any(|m| m.uuid == *u)),
        );
    }
    for u in uuids {
        let active = host.mdev(&u);
        let def = defs.iter().find(|d| d.uuid == u);
        let (parent, ty) = match (active, def) {
            (Some(a), _) => (a.parent.clone(), a.type_id.clone()),
            (None, Some(d)) => (d.parent.clone(), d.config.mdev_type.clone()),
            (None, None) => continue,
        };
        let state = match active {
            Some(a) if a.driver.is_none() => "unbound",
            Some(_) => "yes",
            None => "no",
        };
        let defined = def.map_or("no", |d| {
            if d.config.start == Start::Auto {
                "auto"
            } else {
                "manual"
            }
        });
        let group = active
            .and_then(|a| a.iommu_group)
            .map_or("-".into(), |g| g.to_string());
        r.line(&format!(
            "{u:<36} {parent:<14} {ty:<12} {state:<7} {defined:<8} {group}"
        ))?;
    }
    for p in problems {
        r.line(&format!("warning: {}: {}", p.path.display(), p.reason))?;
    }
    Ok(exit::OK)
}

pub fn vgpu(m: &Mediator, cmd: &VgpuCommand, mut r: Renderer) -> Res {
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
            let t = m.set_vgpu(&vf(v)?, r#type)?;
            r.done(&format!("{v}: vGPU type {} ({})", t.name, t.id))
        }
        VgpuCommand::Clear { vf: v } => {
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
