//! `vfctl attach` / `detach`: leases that follow a cloud-hypervisor VM, which has no
//! hooks. Attach leases through the daemon, then hot-adds each device over the VM's
//! API socket (undoing both if any add fails); detach removes the devices from the
//! VM, then releases. `--watch` stays until the VM exits or the devices are removed
//! from it, then releases.

use std::time::Duration;

use super::client::Client;
use super::CliError;
use crate::api::{Lease, Request};
use crate::ch::{device_id, ChClient, PciDeviceInfo};

/// Leases `req` and hot-adds its devices to the VM behind `ch`.
pub fn attach(
    c: &Client,
    ch: &ChClient,
    req: &Request,
) -> Result<(Lease, Vec<PciDeviceInfo>), CliError> {
    let lease = c.provision(req)?;
    let mut added = Vec::new();
    for d in &lease.devices {
        match ch.add_device(&d.sysfs_path, &device_id(&d.address)) {
            Ok(info) => added.push(info),
            Err(e) => {
                for a in &added {
                    let _ = ch.remove_device(&a.id);
                }
                let _ = c.release(&lease.id);
                return Err(e.into());
            }
        }
    }
    Ok((lease, added))
}

/// Removes the leased devices of `vm` from the VM (those it still has) and
/// releases the VM's leases. Returns the released lease ids.
pub fn detach(c: &Client, ch: &ChClient, vm: &str) -> Result<Vec<String>, CliError> {
    let has: Vec<String> = ch.devices()?.into_iter().map(|d| d.id).collect();
    let mut released = Vec::new();
    for l in c.leases()?.into_iter().filter(|l| l.vm_name == vm) {
        for d in &l.devices {
            let id = device_id(&d.address);
            if has.contains(&id) {
                ch.remove_device(&id)?;
            }
        }
        // The VMM closes the device after the guest has let it go.
        release_when_closed(c, &l.id)?;
        released.push(l.id);
    }
    Ok(released)
}

/// Waits until the VM has exited or no longer has any of `lease`'s devices, then
/// releases the lease. The devices are read from the lease each time: the daemon
/// may have swapped a failed one (`on_failure = replace`).
pub fn watch(c: &Client, ch: &ChClient, lease: &Lease) -> Result<(), CliError> {
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let Some(now) = c.leases()?.into_iter().find(|l| l.id == lease.id) else {
            return Ok(()); // released by someone else
        };
        let ids: Vec<String> = now.devices.iter().map(|d| device_id(&d.address)).collect();
        if !ch.alive() {
            break;
        }
        let has = match ch.devices() {
            Ok(has) => has,
            // It exited between the two calls.
            Err(_) if !ch.alive() => break,
            Err(e) => return Err(e.into()),
        };
        if !has.iter().any(|d| ids.contains(&d.id)) {
            break;
        }
    }
    release_when_closed(c, &lease.id)
}

/// Release, retried for a while: it is refused while the VMM still holds a group.
fn release_when_closed(c: &Client, lease: &str) -> Result<(), CliError> {
    let mut tries = 0;
    loop {
        match c.release(lease).map_err(CliError::from) {
            Err(CliError::Daemon {
                name: crate::api::ErrorName::Refused,
                ..
            }) if tries < 30 => {
                tries += 1;
                std::thread::sleep(Duration::from_secs(1));
            }
            r => return r.map(|_| ()),
        }
    }
}
