//! What each libvirt operation means for a domain's lease. libvirt runs
//! `/etc/libvirt/hooks/qemu NAME OP SUBOP EXTRA` with the domain XML on stdin:
//!
//! | operation          | the hook                                                  |
//! |--------------------|-----------------------------------------------------------|
//! | `prepare begin`    | leases the domain's devices (bound to vfio-pci; mdevs of a mediated profile made with the domain's UUIDs) or fails |
//! | `started begin`, `reconnect begin`, `attach begin` | makes sure the lease exists, adopting devices the running VM holds (warns, never fails) |
//! | `release end`      | releases the domain's leases, or ends the hand-over of a VM that migrated on this host |
//! | `migrate begin`, `restore begin` | leases devices here and prints the XML rewritten for them |
//! | anything else      | nothing                                                   |
//!
//! A VM that migrates to a second libvirtd on this host keeps its lease: at
//! `migrate begin` the destination gets an mdev of its own (`PrepareHandover`), and
//! the lease moves to it when the source's QEMU ends (`CommitHandover` at the
//! source's `release end`), or the destination's goes if the destination's ends
//! first (`AbortHandover`).
//!
//! Leases are found by the domain's UUID. The hook never calls back into libvirt;
//! the daemon does, to swap a failed device (`on_failure="replace"` in the lease
//! metadata, or the daemon's `[recovery]` configuration).

use std::time::{SystemTime, UNIX_EPOCH};

use vfio_manager_api::client::{Client, ClientError};
use vfio_manager_api::codec::is_mediated;
use vfio_manager_api::ids::PciAddress;
use vfio_manager_api::{ErrorName, Lease, Request};

use crate::domain::{rewrite, rewrite_mdev, Domain, DomainError};

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error("domain {domain}: {what}: {source}")]
    Daemon {
        domain: String,
        what: &'static str,
        #[source]
        source: Box<ClientError>,
    },
    #[error("domain {domain}: {what}")]
    Refused { domain: String, what: String },
}

/// What the hook prints on stdout: the rewritten XML for `migrate` and `restore`
/// (nothing means "unchanged" to libvirt).
pub type Output = Option<String>;

/// Runs operation `op` `sub` for the domain in `xml`; `connect` reaches the daemon
/// and is only called when the domain may hold devices of ours.
pub fn run(
    op: &str,
    sub: &str,
    xml: &str,
    connect: impl FnOnce() -> Result<Client, ClientError>,
) -> Result<Output, HookError> {
    let wanted = matches!(
        (op, sub),
        (
            "prepare" | "started" | "reconnect" | "attach" | "release" | "migrate" | "restore",
            _
        )
    );
    if !wanted {
        return Ok(None);
    }
    let d = Domain::parse(xml)?;
    if !d.may_be_ours() {
        return Ok(None);
    }
    let c = Session {
        client: connect().map_err(|e| daemon(&d, "the vfio-manager daemon is not reachable", e))?,
        d: &d,
    };
    match (op, sub) {
        ("prepare", "begin") => c.ensure(false).map(|_| None),
        // The VM already runs: a failure here must not stop it (libvirt kills a
        // domain whose reconnect hook fails), so it is reported and passed over.
        ("started" | "reconnect" | "attach", "begin") => {
            if let Err(e) = c.ensure(true) {
                eprintln!("vfio-manager: warning: {op}: {e}");
            }
            Ok(None)
        }
        ("release", "end") => c.release().map(|_| None),
        ("migrate", "begin") => match c.handover(xml)? {
            Some(moved) => Ok(Some(moved)),
            None => c.incoming(xml),
        },
        ("restore", "begin") => c.incoming(xml),
        _ => Ok(None),
    }
}

fn daemon(d: &Domain, what: &'static str, source: ClientError) -> HookError {
    HookError::Daemon {
        domain: d.name.clone(),
        what,
        source: Box::new(source),
    }
}

struct Session<'a> {
    client: Client,
    d: &'a Domain,
}

impl Session<'_> {
    fn leases(&self) -> Result<Vec<Lease>, HookError> {
        let all = self
            .client
            .leases()
            .map_err(|e| daemon(self.d, "cannot list leases", e))?;
        Ok(all
            .into_iter()
            .filter(|l| !self.d.uuid.is_empty() && l.vm_uuid == self.d.uuid)
            .collect())
    }

    /// The domain's lease, made if it has none. `adopt`: the VM already runs and
    /// holds the devices open.
    fn ensure(&self, adopt: bool) -> Result<Option<Lease>, HookError> {
        if let Some(l) = self.leases()?.into_iter().next() {
            return Ok(Some(l));
        }
        let Some(mut req) = self.request()? else {
            return Ok(None);
        };
        req.adopt = adopt;
        self.provision(&req).map(Some)
    }

    fn provision(&self, req: &Request) -> Result<Lease, HookError> {
        self.client
            .provision(req)
            .map_err(|e| daemon(self.d, "cannot lease its devices", e))
    }

    /// The request for this domain: the lease metadata's hostdevs (or profile and
    /// count when it has none), else the hostdevs that are devices we manage.
    fn request(&self) -> Result<Option<Request>, HookError> {
        let mut req = Request {
            request_id: request_id(&self.d.uuid),
            vm_name: self.d.name.clone(),
            vm_uuid: self.d.uuid.clone(),
            // The daemon swaps a failed device in the running domain through libvirt.
            vmm: "libvirt".into(),
            agent: self.d.agent.clone(),
            ..Request::default()
        };
        if let Some(w) = &self.d.wanted {
            req.on_failure = w.on_failure.clone();
            req.on_idle = w.on_idle.clone();
            req.profile = w.profile.clone();
            req.count = w.count;
            req.devices = if is_mediated(&w.profile) {
                // libvirt names mdevs by UUID: the lease makes (or takes) exactly those.
                self.d.mdev_uuids()
            } else {
                addresses(self.d.lease_slots().iter().map(|h| h.address))
            };
            if !req.devices.is_empty() {
                req.count = req.devices.len() as u32;
            }
        } else {
            // No metadata: exactly the hostdevs we manage, and none is no lease
            // (a domain that names none of ours is not ours).
            req.devices = self.managed_hostdevs()?;
            req.count = req.devices.len() as u32;
        }
        Ok((req.count > 0).then_some(req))
    }

    /// The `managed='no'` hostdevs that the daemon manages.
    fn managed_hostdevs(&self) -> Result<Vec<String>, HookError> {
        let table = self
            .client
            .devices()
            .map_err(|e| daemon(self.d, "cannot list devices", e))?;
        Ok(addresses(
            self.d
                .hostdevs
                .iter()
                .filter(|h| !h.managed && table.iter().any(|t| t.address == h.address.to_string()))
                .map(|h| h.address),
        ))
    }

    /// Ends the domain's leases (a mediated one as `ends_mediated` says).
    fn release(&self) -> Result<(), HookError> {
        for l in self.leases()? {
            if self.d.mdevs.is_empty() || self.ends_mediated(&l)? {
                self.client
                    .release(&l.id)
                    .map_err(|e| daemon(self.d, "cannot release its lease", e))?;
            }
        }
        Ok(())
    }

    /// What the end of this QEMU means for mediated lease `l`: true when the lease
    /// ends with it. With a hand-over prepared, this QEMU is one side of the VM's
    /// migration on this host: the source's end moves the lease to the
    /// destination, the destination's end (a failed migration) drops the
    /// destination. A lease that does not hold this QEMU's mdevs went with the VM.
    fn ends_mediated(&self, l: &Lease) -> Result<bool, HookError> {
        let mine = self.d.mdev_uuids();
        let fail = |what| move |e| daemon(self.d, what, e);
        let abort = || {
            self.client
                .abort_handover(&l.id)
                .map_err(fail("cannot drop the destination of its failed migration"))
        };
        let prepared = self
            .client
            .prepared_handover(&l.id)
            .map_err(fail("cannot read its lease"))?;
        match prepared {
            Some((_, to)) if mine.contains(&to) => abort().map(|_| false),
            Some((from, _)) if mine.contains(&from) => match self.client.commit_handover(&l.id) {
                Ok(_) => Ok(false),
                // No QEMU runs the destination: the VM is gone from both.
                Err(e) if e.name() == Some(&ErrorName::Refused) => abort().map(|_| true),
                Err(e) => Err(fail("cannot hand its lease to the migrated VM")(e)),
            },
            _ => Ok(l.devices.iter().any(|d| mine.contains(&d.address))),
        }
    }

    /// A running VM migrating to a second VMM process on this host (a second
    /// libvirtd): a lease here holds the mdev its source QEMU runs with, so the
    /// destination gets an mdev of its own, reserved and checked before any state
    /// moves, and the XML names it. None: no lease here holds the domain's mdevs
    /// (another host's VM).
    fn handover(&self, xml: &str) -> Result<Option<String>, HookError> {
        let mine = self.d.mdev_uuids();
        let Some(lease) = self
            .leases()?
            .into_iter()
            .find(|l| l.devices.iter().any(|d| mine.contains(&d.address)))
        else {
            return Ok(None);
        };
        let [slot] = self.d.mdevs.as_slice() else {
            return Err(HookError::Refused {
                domain: self.d.name.clone(),
                what: format!(
                    "it migrates on this host with {} mdevs of lease {}; a VM migrates between two VMMs of one host with one mdev",
                    mine.len(),
                    lease.id
                ),
            });
        };
        let to = self
            .client
            .prepare_handover(&lease.id, "")
            .map_err(|e| daemon(self.d, "cannot reserve the migration's destination mdev", e))?;
        let to: uuid::Uuid = to.parse().map_err(|_| HookError::Refused {
            domain: self.d.name.clone(),
            what: format!("the daemon named destination mdev {to:?}, not a UUID"),
        })?;
        Ok(Some(rewrite_mdev(xml, slot, &to)))
    }

    /// An incoming domain (migration or restore): lease devices here, the same
    /// addresses if they are free, otherwise any of the profile, and point the
    /// domain's slots at them.
    fn incoming(&self, xml: &str) -> Result<Output, HookError> {
        let slots = self.d.lease_slots();
        let lease = match self.ensure(false) {
            Ok(l) => l,
            Err(taken) if !slots.is_empty() => {
                let Some(mut req) = self.request()? else {
                    return Err(taken);
                };
                req.devices.clear();
                self.provision(&req).map(Some)?
            }
            Err(e) => return Err(e),
        };
        let Some(lease) = lease.filter(|_| !slots.is_empty()) else {
            return Ok(None);
        };
        let to: Vec<PciAddress> = lease
            .devices
            .iter()
            .filter_map(|d| d.address.parse().ok())
            .collect();
        if to.len() != slots.len() {
            return Err(HookError::Refused {
                domain: self.d.name.clone(),
                what: format!(
                    "its lease {} has {} devices for {} hostdevs; release it (`vfctl release {}`) and try again",
                    lease.id,
                    to.len(),
                    slots.len(),
                    lease.id
                ),
            });
        }
        Ok(Some(rewrite(xml, &slots, &to)))
    }
}

fn addresses(a: impl Iterator<Item = PciAddress>) -> Vec<String> {
    a.map(|a| a.to_string()).collect()
}

/// A request id of its own for each start: a released request id is never reused.
fn request_id(uuid: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("libvirt-{uuid}-{nanos:x}")
}
