//! The running VM's side of a device swap: plugging a leased device into the VM and
//! unplugging one from it, through the VM's own manager. A small trait, one
//! implementation per VMM the daemon can reach (a lease's `vmm`):
//! - libvirt, through `virsh` (libvirt's own client; the daemon is root and talks
//!   to the URI of the configuration). The daemon is not libvirt's hook, so it may
//!   call libvirt. Live and, for a persistent domain, its configuration too, so that
//!   the next start names the replacement;
//! - cloud-hypervisor, through its REST API (`vm.add-device`, `vm.remove-device`).

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::api::ids::Vmm;
use crate::api::LeasedDevice;
use crate::ch::{device_id, ChClient};
use crate::config::RecoveryConfig;

/// The longest a `virsh` call may take.
const VIRSH_DEADLINE: Duration = Duration::from_secs(120);

/// A running VM's device slots.
pub trait Hotplug: Send + Sync {
    /// Who plugs: `libvirt`, `cloud-hypervisor`.
    fn name(&self) -> &'static str;
    /// Adds `dev` (leased, on vfio-pci) to the running VM.
    fn plug(&self, dev: &LeasedDevice) -> Result<(), String>;
    /// Removes `dev` from the running VM (the guest is asked to let go).
    fn unplug(&self, dev: &LeasedDevice) -> Result<(), String>;
}

/// How to reach the VM of a lease, if its `vmm` says.
pub fn reach(vmm: &Vmm, vm_name: &str, cfg: &RecoveryConfig) -> Option<Box<dyn Hotplug>> {
    match vmm {
        Vmm::Other => None,
        Vmm::Libvirt => Some(Box::new(Libvirt {
            virsh: cfg.virsh.clone(),
            uri: cfg.libvirt_uri.clone(),
            domain: vm_name.to_string(),
        })),
        Vmm::CloudHypervisor(socket) => Some(Box::new(ChClient::new(Path::new(socket)))),
    }
}

impl Hotplug for ChClient {
    fn name(&self) -> &'static str {
        "cloud-hypervisor"
    }

    fn plug(&self, dev: &LeasedDevice) -> Result<(), String> {
        self.add_device(&dev.sysfs_path, &device_id(&dev.address))
            .map(drop)
            .map_err(|e| e.to_string())
    }

    fn unplug(&self, dev: &LeasedDevice) -> Result<(), String> {
        self.remove_device(&device_id(&dev.address))
            .map_err(|e| e.to_string())
    }
}

/// A libvirt domain, by name.
struct Libvirt {
    virsh: std::path::PathBuf,
    uri: String,
    domain: String,
}

impl Hotplug for Libvirt {
    fn name(&self) -> &'static str {
        "libvirt"
    }

    fn plug(&self, dev: &LeasedDevice) -> Result<(), String> {
        self.device("attach-device", dev)
    }

    fn unplug(&self, dev: &LeasedDevice) -> Result<(), String> {
        self.device("detach-device", dev)
    }
}

impl Libvirt {
    /// `virsh attach-device|detach-device` of `dev`'s `<hostdev>`: live, and in the
    /// persistent configuration when the domain has one.
    fn device(&self, verb: &str, dev: &LeasedDevice) -> Result<(), String> {
        let file = tempfile::NamedTempFile::new().map_err(|e| format!("{verb}: {e}"))?;
        std::fs::write(file.path(), &dev.libvirt_hostdev).map_err(|e| format!("{verb}: {e}"))?;
        let scope = if self.persistent()? {
            "--persistent"
        } else {
            "--live"
        };
        let path = file.path().display().to_string();
        self.virsh(&[verb, &self.domain_arg(), &format!("--file={path}"), scope])
            .map(drop)
    }

    fn persistent(&self) -> Result<bool, String> {
        let info = self.virsh(&["dominfo", &self.domain_arg()])?;
        Ok(info.lines().any(|l| {
            l.split_once(':')
                .is_some_and(|(k, v)| k.trim() == "Persistent" && v.trim() == "yes")
        }))
    }

    /// `--domain=NAME`: one argument, so that a name starting with `-` is a name.
    fn domain_arg(&self) -> String {
        format!("--domain={}", self.domain)
    }

    /// Runs `virsh -c URI ARGS` (no shell) and returns its output, or its error. A
    /// virsh that has not finished after [`VIRSH_DEADLINE`] is killed: a swap holds
    /// its lease's devices, and a stuck libvirtd must not hold them for ever.
    fn virsh(&self, args: &[&str]) -> Result<String, String> {
        let what = format!("virsh {} of domain {}", args[0], self.domain);
        let mut child = Command::new(&self.virsh)
            .arg("-c")
            .arg(&self.uri)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.virsh.display()))?;
        let start = Instant::now();
        let status = loop {
            match child.try_wait().map_err(|e| format!("{what}: {e}"))? {
                Some(st) => break st,
                None if start.elapsed() > VIRSH_DEADLINE => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "{what}: no answer in {}s; is libvirtd stuck?",
                        VIRSH_DEADLINE.as_secs()
                    ));
                }
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        // virsh says little: its pipes hold all of it until it exits.
        let text = |p: Option<&mut dyn Read>| {
            let mut s = String::new();
            p.map(|p| p.read_to_string(&mut s));
            s.trim().to_string()
        };
        match status.success() {
            true => Ok(text(child.stdout.as_mut().map(|p| p as &mut dyn Read))),
            false => Err(format!(
                "{what}: {}",
                text(child.stderr.as_mut().map(|p| p as &mut dyn Read))
            )),
        }
    }
}
