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
    /// After a swap: runs the VM again if its VMM stopped it on the swapped-out
    /// device's error. `Some(what was done)`, or `None` when it was not stopped.
    fn restart_if_stopped(&self) -> Result<Option<String>, String> {
        Ok(None)
    }
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

    /// QEMU stops a guest when vfio-pci reports an error on one of its devices, and
    /// will not continue it without a reset ("Resetting the Virtual Machine is
    /// required"); libvirt shows such a domain `paused (unknown)`, a stop it did not
    /// ask for (a user's suspend shows `user`, a migration `migration`, a disk's error
    /// `I/O error`). With the failed device swapped out the domain is reset, so that
    /// its guest boots again with the replacement, and resumed. The unplug of the
    /// failed device, which a stopped guest cannot answer, completes at the reset
    /// (docs/libvirt.md, "A device that fails in a running domain").
    fn restart_if_stopped(&self) -> Result<Option<String>, String> {
        let state = self.virsh(&["domstate", &self.domain_arg(), "--reason"])?;
        if state.trim() != "paused (unknown)" {
            return Ok(None);
        }
        self.virsh(&["reset", &self.domain_arg()])?;
        self.virsh(&["resume", &self.domain_arg()])?;
        Ok(Some(
            "libvirt reset and resumed the domain, which QEMU had stopped on the device's error"
                .into(),
        ))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// virsh's command line for one domain state: answers `domstate` with `state`
    /// and logs each call's verb and domain. libvirtd itself runs in
    /// libvirt-hooks/tests/libvirt.rs and in the libvirt boot (run.sh --libvirt),
    /// where QEMU really stops a domain on a VF's error.
    fn libvirt_in(dir: &Path, state: &str) -> Libvirt {
        let virsh = dir.join("virsh");
        let script = format!(
            "#!/bin/sh\necho \"$3 $4\" >> {}/calls\n[ \"$3\" = domstate ] && echo '{state}'\nexit 0\n",
            dir.display()
        );
        std::fs::write(&virsh, script).unwrap();
        std::fs::set_permissions(&virsh, std::fs::Permissions::from_mode(0o755)).unwrap();
        Libvirt {
            virsh,
            uri: "qemu:///system".into(),
            domain: "-vm".into(),
        }
    }

    fn calls(dir: &Path) -> String {
        std::fs::read_to_string(dir.join("calls")).unwrap_or_default()
    }

    #[test]
    fn a_domain_that_qemu_stopped_is_reset_then_resumed() {
        let dir = tempfile::tempdir().unwrap();
        let done = libvirt_in(dir.path(), "paused (unknown)").restart_if_stopped();
        assert!(done.unwrap().unwrap().contains("reset and resumed"));
        assert_eq!(
            calls(dir.path()),
            "domstate --domain=-vm\nreset --domain=-vm\nresume --domain=-vm\n"
        );
    }

    #[test]
    fn a_running_domain_or_one_paused_on_purpose_is_left_as_it_is() {
        for state in [
            "running (booted)",
            "paused (user)",
            "paused (migration)",
            "paused (I/O error)",
            "shut off (destroyed)",
        ] {
            let dir = tempfile::tempdir().unwrap();
            let done = libvirt_in(dir.path(), state).restart_if_stopped();
            assert_eq!(done, Ok(None), "{state}");
            assert_eq!(calls(dir.path()), "domstate --domain=-vm\n", "{state}");
        }
    }
}
