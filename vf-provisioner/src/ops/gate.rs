//! The one policy gate. Every operation that changes the host, from every caller
//! (the daemon's leases and direct requests, `vfctl --direct`, mdev creates, vGPU
//! types, migration), asks [`Provisioner::gate`] first; the kernel-facing steps
//! after it decide nothing. Which reasons apply to which operation is the table in
//! [`Op::checks`], so a newcomer reads the whole policy in one place.

use std::fmt;

use super::group::{blocking_members, host_critical};
use super::Provisioner;
use crate::address::PciAddress;
use crate::holders;
use crate::host::{group_members, PciFunction};

/// What a caller is about to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Hand a function or mdev to a VM. `adopt`: a running VM already holds it
    /// (libvirt reconnecting), so held open and quarantined are expected.
    /// `whole_group`: the same lease takes every other member of its IOMMU group
    /// (a GPU with its audio function), so it need not be alone in it; the caller
    /// asks the gate for each of them too.
    Lease { adopt: bool, whole_group: bool },
    /// Move a function to vfio-pci; `whole_group` moves the members in the way too.
    Bind { whole_group: bool },
    /// Move a function off vfio-pci to a host driver.
    Unbind,
    /// Give a lease's own device back at release (or undo a cut-off lease).
    Return,
    /// Reset a function through the kernel.
    Reset,
    /// Change a PF's VF count.
    Sriov,
    /// Move or remove a function along with another: a group member unbound with
    /// it, a VF removed when its PF's count changes.
    Along,
    /// Create an mdev on this parent function.
    MdevCreate,
    /// Remove an mdev.
    MdevRemove,
    /// Give a VF a vGPU type.
    Vgpu,
    /// Take a VF's vGPU type away.
    VgpuClear,
    /// Move an mdev's state out or in.
    Migrate,
}

/// The checks an operation runs, in the order they are asked.
#[derive(Debug, Default, Clone, Copy)]
struct Checks {
    config: bool,
    failed: bool,
    quarantined: bool,
    leased: bool,
    /// Alone in its IOMMU group (a lease) or a viable group (a bind).
    group: bool,
    held_open: bool,
    host_critical: bool,
}

impl Op {
    /// The policy, as one table.
    fn checks(self) -> Checks {
        let all = Checks {
            config: true,
            failed: true,
            quarantined: true,
            leased: true,
            group: true,
            held_open: true,
            host_critical: true,
        };
        let none = Checks::default();
        match self {
            Op::Lease { adopt, whole_group } => Checks {
                quarantined: !adopt,
                held_open: !adopt,
                group: !whole_group,
                ..all
            },
            Op::Bind { .. } => Checks {
                held_open: false,
                ..all
            },
            Op::Unbind | Op::Reset | Op::MdevRemove | Op::VgpuClear => Checks {
                config: true,
                leased: true,
                held_open: true,
                ..none
            },
            Op::Return => Checks {
                held_open: true,
                ..none
            },
            Op::Sriov => Checks {
                config: true,
                ..none
            },
            Op::Along => Checks {
                leased: true,
                held_open: true,
                ..none
            },
            Op::MdevCreate | Op::Vgpu => Checks {
                group: false,
                held_open: false,
                ..all
            },
            Op::Migrate => Checks {
                config: true,
                failed: true,
                quarantined: true,
                held_open: true,
                ..none
            },
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Lease { .. } => "lease it",
            Op::Bind { .. } => "bind it to vfio-pci",
            Op::Unbind => "unbind it",
            Op::Return => "return it to its driver",
            Op::Reset => "reset it",
            Op::Sriov => "change its VFs",
            Op::Along => "move it along",
            Op::MdevCreate => "create an mdev on it",
            Op::MdevRemove => "remove it",
            Op::Vgpu => "give it a vGPU type",
            Op::VgpuClear => "clear its vGPU type",
            Op::Migrate => "migrate it",
        })
    }
}

/// What an operation is about: a PCI function, or an mdev on its parent (a PCI
/// function, or none for a virtual parent such as `mtty`).
#[derive(Debug, Clone, Copy)]
pub enum Subject<'a> {
    Function(&'a PciFunction),
    Mdev {
        uuid: &'a str,
        group: Option<u32>,
        parent: Option<&'a PciFunction>,
    },
}

impl Subject<'_> {
    fn name(&self) -> String {
        match self {
            Subject::Function(f) => f.address.to_string(),
            Subject::Mdev { uuid, .. } => format!("mdev {uuid}"),
        }
    }

    /// The PCI function the configuration judges: the function, or the mdev's parent.
    fn function(&self) -> Option<&PciFunction> {
        match self {
            Subject::Function(f) => Some(f),
            Subject::Mdev { parent, .. } => *parent,
        }
    }

    fn group(&self) -> Option<u32> {
        match self {
            Subject::Function(f) => f.iommu_group,
            Subject::Mdev { group, .. } => *group,
        }
    }
}

/// What the daemon knows that sysfs does not. Direct mode knows none of it.
pub trait Facts: Send + Sync {
    /// Who leases `name` (a PCI address or an mdev UUID), e.g. `VM web-1 (lease 0f…)`.
    fn lease_of(&self, name: &str) -> Option<String>;
    /// Why `name` must not be used, if it must not.
    fn health(&self, name: &str) -> Option<Health>;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// An operation on it failed (a reset, a bind); with what failed.
    Failed(String),
    /// Held back until an operator adopts or frees it; with why.
    Quarantined(String),
}

/// Why the gate refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// The configuration excludes it or its PF (`pf`: the one excluded, if not itself).
    Excluded {
        pf: Option<PciAddress>,
    },
    /// Not a GPU and its PF is not under `manage`.
    NotManaged {
        pf: PciAddress,
        id: String,
    },
    Leased(String),
    Failed(String),
    Quarantined(String),
    NoIommu,
    /// Its IOMMU group holds others: `blocker` is the member in the way.
    SharedGroup {
        group: u32,
        blocker: String,
    },
    HeldOpen {
        group: u32,
        by: String,
    },
    HostCritical(String),
}

impl Reason {
    /// The fix the refusal of `op` names.
    pub fn fix(&self, op: Op, name: &str) -> String {
        match self {
            Reason::Excluded { .. } => {
                "remove it from `exclude` in /etc/vfio-manager/config.toml if it should be ours".into()
            }
            Reason::NotManaged { pf, id } => format!(
                "add \"{id}\" or \"{pf}\" to `manage` in /etc/vfio-manager/config.toml to manage it"
            ),
            Reason::Leased(_) => {
                "release its lease first, or pick another device (`vfctl leases` shows owners)".into()
            }
            Reason::Failed(_) | Reason::Quarantined(_) => format!(
                "find the cause, then `vfctl clear {name}` probes it and offers it again (`vfctl orphan free {name}` returns it to the host instead)"
            ),
            Reason::NoIommu => "boot with intel_iommu=on iommu=pt (or amd_iommu=on) and check with `vfctl check`".into(),
            Reason::SharedGroup { .. } if matches!(op, Op::Lease { .. }) => {
                "name every function of the group in the lease (a GPU with its audio function), or pick a function alone in its group".into()
            }
            Reason::SharedGroup { .. } => {
                "bind the whole group (--whole-group) or pick a function alone in its group".into()
            }
            Reason::HeldOpen { .. } if op == Op::Migrate => {
                "the VMM holding it drives its migration (QEMU: VFIO migration); the daemon migrates devices no VMM holds".into()
            }
            Reason::HeldOpen { .. } => "stop the VM that holds it first".into(),
            Reason::HostCritical(_) => {
                "pick another device; the host's own bridges, display, disks and networks are never taken".into()
            }
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Excluded { pf: None } => write!(f, "it is excluded in the configuration"),
            Reason::Excluded { pf: Some(pf) } => {
                write!(f, "its PF {pf} or itself is excluded in the configuration")
            }
            Reason::NotManaged { pf, .. } => write!(
                f,
                "it is not managed (not a GPU, and its PF {pf} is not under `manage` in the configuration)"
            ),
            Reason::Leased(who) => write!(f, "it is leased to {who}"),
            Reason::Failed(why) => write!(f, "it failed and is held back: {why}"),
            Reason::Quarantined(why) => write!(f, "it is quarantined ({why})"),
            Reason::NoIommu => write!(f, "it has no IOMMU group, so VFIO cannot isolate it (the IOMMU is off)"),
            Reason::SharedGroup { group, blocker } => {
                write!(f, "its IOMMU group {group} is not its own: {blocker}")
            }
            Reason::HeldOpen { group, by } => write!(f, "its VFIO group {group} is held open by {by}"),
            Reason::HostCritical(why) => write!(f, "the host needs it: {why}"),
        }
    }
}

/// A refusal: the device, what was refused, why, and the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub device: String,
    pub op: Op,
    pub reason: Reason,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.device.trim_start_matches("mdev ");
        write!(
            f,
            "{}: cannot {}: {}; {}",
            self.device,
            self.op,
            self.reason,
            self.reason.fix(self.op, name)
        )
    }
}

impl std::error::Error for Refusal {}

/// Proof that the gate passed `f` for `op`: the only way to take a function for a
/// VM without the checks of [`Provisioner::bind_vfio`] (see `Provisioner::bind_passed`).
#[derive(Debug)]
pub struct Passed {
    pub(super) f: PciFunction,
    pub(super) op: Op,
}

impl Passed {
    pub fn function(&self) -> &PciFunction {
        &self.f
    }
}

impl Provisioner {
    /// The policy's verdict on `op` of `subject`: every caller asks this, and only
    /// this, before it changes the host.
    pub fn gate(&self, op: Op, subject: Subject<'_>) -> Result<(), Refusal> {
        match self.refusal(op, subject) {
            Some(reason) => Err(Refusal {
                device: subject.name(),
                op,
                reason,
            }),
            None => Ok(()),
        }
    }

    /// [`Provisioner::gate`] for a function, with the proof that it passed.
    pub fn gate_function(&self, op: Op, f: PciFunction) -> Result<Passed, Refusal> {
        self.gate(op, Subject::Function(&f))?;
        Ok(Passed { f, op })
    }

    fn refusal(&self, op: Op, s: Subject<'_>) -> Option<Reason> {
        let c = op.checks();
        let f = s.function();
        if c.config {
            if let Some(r) = f.and_then(|f| self.config_refusal(f)) {
                return Some(r);
            }
        }
        let facts = self.facts.as_deref();
        let name = match s {
            Subject::Function(f) => f.address.to_string(),
            Subject::Mdev { uuid, .. } => uuid.to_string(),
        };
        if c.failed || c.quarantined {
            // An mdev is as healthy as its parent too.
            let names = [Some(name.clone()), f.map(|f| f.address.to_string())];
            for n in names.iter().flatten() {
                match facts.and_then(|x| x.health(n)) {
                    Some(Health::Failed(why)) if c.failed => return Some(Reason::Failed(why)),
                    Some(Health::Quarantined(why)) if c.quarantined => {
                        return Some(Reason::Quarantined(why))
                    }
                    _ => {}
                }
            }
        }
        if c.leased {
            if let Some(who) = facts.and_then(|x| x.lease_of(&name)) {
                return Some(Reason::Leased(who));
            }
        }
        if c.group {
            if let Some(r) = self.group_refusal(op, s) {
                return Some(r);
            }
        }
        if c.held_open {
            if let Some(r) = self.held_open(s) {
                return Some(r);
            }
        }
        if c.host_critical {
            if let Some(why) = f.and_then(|f| host_critical(&self.sys, f)) {
                return Some(Reason::HostCritical(why));
            }
        }
        None
    }

    /// The configuration's verdict: an excluded PF covers its VFs and every mdev on
    /// them; otherwise a function must be a GPU or its PF managed.
    pub fn config_refusal(&self, f: &PciFunction) -> Option<Reason> {
        let owner = match f.physfn {
            // A VF whose PF cannot be read is not judged ours: it is going away.
            Some(p) => match PciFunction::read_ids(&self.sys, &p) {
                Some(pf) => Some(pf),
                None => {
                    let id = "(unreadable)".into();
                    return Some(Reason::NotManaged { pf: p, id });
                }
            },
            None => None,
        };
        let pf = owner.as_ref().unwrap_or(f);
        let filter = &self.filter;
        if filter.is_excluded(pf) || filter.is_excluded(f) {
            let pf = (pf.address != f.address).then_some(pf.address);
            return Some(Reason::Excluded { pf });
        }
        if !filter.is_managed(pf) && !filter.is_gpu(f) && !self.beside_a_gpu(f) {
            return Some(Reason::NotManaged {
                pf: pf.address,
                id: pf.id.clone(),
            });
        }
        None
    }

    /// Whether another function of `f`'s slot is a GPU: the audio (or USB)
    /// function of a graphics card is the card's, and goes where it goes.
    fn beside_a_gpu(&self, f: &PciFunction) -> bool {
        let a = f.address;
        (0..8u8)
            .filter(|&n| n != a.function)
            .filter_map(|n| {
                let other = PciAddress::new(a.domain, a.bus, a.device, n);
                PciFunction::read_ids(&self.sys, &other)
            })
            .any(|g| self.filter.is_gpu(&g) && !self.filter.is_excluded(&g))
    }

    fn group_refusal(&self, op: Op, s: Subject<'_>) -> Option<Reason> {
        let Subject::Function(f) = s else {
            return None;
        };
        let Some(group) = f.iommu_group else {
            return Some(Reason::NoIommu);
        };
        let blocker = match op {
            // A lease takes functions alone in their group.
            Op::Lease { .. } => {
                let members = group_members(&self.sys, group);
                let other = members.into_iter().find(|a| *a != f.address)?;
                format!("{other} is in it too; a lease takes functions alone in their group")
            }
            Op::Bind { whole_group: false } => {
                let b = blocking_members(&self.sys, f).into_iter().next()?;
                format!(
                    "{} {} is bound to {}, so the group would not be viable",
                    b.address,
                    b.label(),
                    b.driver.as_deref().unwrap_or("?")
                )
            }
            // The members in the way go too; each must be one the host can give.
            Op::Bind { whole_group: true } => {
                let (b, why) = blocking_members(&self.sys, f)
                    .into_iter()
                    .find_map(|b| host_critical(&self.sys, &b).map(|w| (b, w)))?;
                format!("{} in it is needed by the host: {why}", b.address)
            }
            _ => return None,
        };
        Some(Reason::SharedGroup { group, blocker })
    }

    fn held_open(&self, s: Subject<'_>) -> Option<Reason> {
        // Only a group bound to vfio can be held open: skip the /proc walk otherwise.
        if let Subject::Function(f) = s {
            if !f.on_vfio() {
                return None;
            }
        }
        let group = s.group()?;
        let by = holders::of_group(&self.sys, group).into_iter().next()?;
        Some(Reason::HeldOpen {
            group,
            by: by.to_string(),
        })
    }
}
