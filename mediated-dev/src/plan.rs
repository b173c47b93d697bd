//! The dry run: which requested mdev or vGPU types fit where, before anything is
//! changed. The kernel only says what fits *now* (each type's
//! `available_instances`, each VF's `creatable_vgpu_types`), and that shrinks as
//! devices are created, so the plan simulates the placements with the rules behind
//! those numbers:
//! - types on one parent draw from one capacity; a type's cost, relative to the
//!   cheapest, is read from the counts (mtty: 24 x `mtty-1` or 12 x `mtty-2`);
//! - NVIDIA time-sliced vGPUs on one GPU share one framebuffer size (the size is in
//!   the type's description, `framebuffer=2048M`, or its name, `A100D-4C`), and a
//!   GPU holds at most its framebuffer over the type's;
//! - a VF takes one vGPU type. On a GPU that already holds vGPUs the kernel shows
//!   only whether one more fits, so the plan counts one there.
//!
//! Placements prefer a parent already committed to the type's size, then the
//! fullest one that fits (best fit), keeping empty GPUs free for other sizes.

use std::collections::BTreeMap;

use serde::Serialize;
use vf_provisioner::PciAddress;

use crate::host::{MdevHost, VgpuSlot};
use vfio_manager_api::ids::{MdevParent, MdevTypeId};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want {
    /// An mdev type id (`mtty-2`), an mdev type's name (`GRID T4-2Q`), or a vGPU
    /// type's name or id (`NVIDIA A100D-4C`).
    pub profile: String,
    pub count: u32,
}

impl std::str::FromStr for Want {
    type Err = crate::Error;

    /// `PROFILE` or `PROFILE:COUNT` (the count after the last colon, if numeric).
    fn from_str(s: &str) -> crate::Result<Want> {
        let (profile, count) = match s.rsplit_once(':') {
            Some((p, n)) if n.parse::<u32>().is_ok() => (p, n.parse().unwrap_or(1)),
            _ => (s, 1),
        };
        if profile.is_empty() || count == 0 || count > 4096 {
            return Err(crate::Error::InvalidInput {
                what: "profile request",
                input: s.into(),
                reason: "expected PROFILE or PROFILE:COUNT with 1 <= COUNT <= 4096".into(),
            });
        }
        Ok(Want {
            profile: profile.into(),
            count,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    /// Create an mdev of `type_id` on `parent`.
    Mdev {
        parent: MdevParent,
        type_id: MdevTypeId,
    },
    /// Set vGPU type `type_id` on a VF (NVIDIA vGPU 17+).
    Vgpu { vf: PciAddress, type_id: u32 },
}

#[derive(Debug, Clone, Serialize)]
pub struct Placement {
    pub profile: String,
    #[serde(flatten)]
    pub target: Target,
}

#[derive(Debug, Clone, Serialize)]
pub struct Shortfall {
    pub profile: String,
    pub missing: u32,
    pub reason: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Plan {
    pub placements: Vec<Placement>,
    pub shortfalls: Vec<Shortfall>,
}

impl Plan {
    pub fn fits(&self) -> bool {
        self.shortfalls.is_empty()
    }
}

/// Framebuffer size in MiB from an NVIDIA description (`framebuffer=2048M`) or
/// type name (`NVIDIA A100D-4C`, `GRID T4-2Q`: GiB before the series letter).
pub fn framebuffer_mib(name: &str, description: &str) -> Option<u64> {
    if let Some(rest) = description.split("framebuffer=").nth(1) {
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let unit = rest[digits.len()..].chars().next();
        let n: u64 = digits.parse().ok()?;
        return Some(if unit == Some('G') { n * 1024 } else { n });
    }
    let last = name.rsplit('-').next()?;
    let digits: String = last.chars().take_while(char::is_ascii_digit).collect();
    let series = &last[digits.len()..];
    (!digits.is_empty() && !series.is_empty() && series.chars().all(|c| c.is_ascii_uppercase()))
        .then(|| digits.parse::<u64>().ok().map(|g| g * 1024))
        .flatten()
}

/// One mdev parent's remaining capacity, in units of its cheapest type.
struct MdevPool {
    parent: MdevParent,
    free: u32,
    /// type id -> (name, cost, framebuffer group)
    types: BTreeMap<MdevTypeId, (String, u32, Option<u64>)>,
    size: Option<u64>,
}

/// One GPU's VFs on vGPU 17+.
struct VgpuPool {
    free_vfs: Vec<VgpuSlot>,
    size: Option<u64>,
    /// Instances of the committed size that still fit (None = not yet known).
    room: Option<u32>,
    total_mib: Option<u64>,
}

fn mdev_pools(host: &MdevHost) -> Vec<MdevPool> {
    host.parents
        .iter()
        .map(|p| {
            let free = p
                .types
                .iter()
                .map(|t| t.available_instances)
                .max()
                .unwrap_or(0);
            let size = p
                .types
                .iter()
                .filter(|t| !t.devices.is_empty())
                .find_map(|t| framebuffer_mib(&t.name, &t.description));
            let types = p
                .types
                .iter()
                .filter(|t| t.available_instances > 0)
                .map(|t| {
                    let cost = free.div_ceil(t.available_instances).max(1);
                    (
                        t.id.clone(),
                        (
                            t.name.clone(),
                            cost,
                            framebuffer_mib(&t.name, &t.description),
                        ),
                    )
                })
                .collect();
            MdevPool {
                parent: p.name.clone(),
                free,
                types,
                size,
            }
        })
        .collect()
}

fn vgpu_pools(host: &MdevHost) -> Vec<VgpuPool> {
    let mut by_pf: BTreeMap<Option<PciAddress>, Vec<&VgpuSlot>> = BTreeMap::new();
    for s in &host.vgpus {
        by_pf.entry(s.pf).or_default().push(s);
    }
    by_pf
        .into_values()
        .map(|slots| {
            let in_use = slots.iter().filter(|s| s.current.is_some()).count();
            let listed = slots.iter().flat_map(|s| &s.creatable);
            let total_mib = if in_use == 0 {
                listed.filter_map(|t| framebuffer_mib(&t.name, "")).max()
            } else {
                None
            };
            VgpuPool {
                free_vfs: slots
                    .iter()
                    .filter(|s| s.current.is_none())
                    .map(|s| (*s).clone())
                    .collect(),
                size: None,
                room: (in_use > 0).then_some(1),
                total_mib,
            }
        })
        .collect()
}

fn place_mdev(pools: &mut [MdevPool], profile: &str) -> Option<Target> {
    let fits = |p: &MdevPool| {
        p.types
            .iter()
            .find(|(id, (name, cost, fb))| {
                (*id == profile || name == profile)
                    && *cost <= p.free
                    && (p.size.is_none() || p.size == *fb)
            })
            .map(|(id, (_, cost, fb))| (id.clone(), *cost, *fb))
    };
    let best = pools
        .iter()
        .enumerate()
        .filter_map(|(i, p)| fits(p).map(|f| (i, f)))
        .min_by_key(|(i, (_, _, fb))| (pools[*i].size.is_none() || fb.is_none(), pools[*i].free))?;
    let (i, (type_id, cost, fb)) = best;
    let p = &mut pools[i];
    p.free -= cost;
    p.size = p.size.or(fb);
    Some(Target::Mdev {
        parent: p.parent.clone(),
        type_id,
    })
}

fn place_vgpu(pools: &mut [VgpuPool], profile: &str) -> Option<Target> {
    let matches = |s: &VgpuSlot| {
        s.creatable
            .iter()
            .find(|t| t.name == profile || t.id.to_string() == profile)
            .cloned()
    };
    let candidate = |p: &VgpuPool| -> Option<(usize, crate::host::VgpuType)> {
        let (i, t) = p
            .free_vfs
            .iter()
            .enumerate()
            .find_map(|(i, s)| matches(s).map(|t| (i, t)))?;
        let size = framebuffer_mib(&t.name, "");
        let same_size = p.size.is_none() || p.size == size;
        let room = p.room.unwrap_or(u32::MAX) > 0;
        (same_size && room).then_some((i, t))
    };
    let (pi, (vi, t)) = pools
        .iter()
        .enumerate()
        .filter_map(|(pi, p)| candidate(p).map(|c| (pi, c)))
        .min_by_key(|(pi, _)| (pools[*pi].size.is_none(), pools[*pi].free_vfs.len()))?;
    let p = &mut pools[pi];
    let slot = p.free_vfs.remove(vi);
    if p.size.is_none() {
        let size = framebuffer_mib(&t.name, "");
        p.size = size;
        if p.room.is_none() {
            p.room = match (p.total_mib, size) {
                (Some(total), Some(s)) if s > 0 => Some((total / s) as u32),
                _ => Some(1),
            };
        }
    }
    p.room = p.room.map(|r| r.saturating_sub(1));
    Some(Target::Vgpu {
        vf: slot.vf,
        type_id: t.id,
    })
}

/// Places `wants` on `host` without changing anything.
pub fn plan(host: &MdevHost, wants: &[Want]) -> Plan {
    let mut mdevs = mdev_pools(host);
    let mut vgpus = vgpu_pools(host);
    let mut out = Plan::default();
    for w in wants {
        let mut placed = 0;
        while placed < w.count {
            let Some(target) =
                place_mdev(&mut mdevs, &w.profile).or_else(|| place_vgpu(&mut vgpus, &w.profile))
            else {
                break;
            };
            out.placements.push(Placement {
                profile: w.profile.clone(),
                target,
            });
            placed += 1;
        }
        if placed < w.count {
            out.shortfalls.push(Shortfall {
                profile: w.profile.clone(),
                missing: w.count - placed,
                reason: why_not(host, &w.profile, placed),
            });
        }
    }
    out
}

fn why_not(host: &MdevHost, profile: &str, placed: u32) -> String {
    let known_mdev = host
        .parents
        .iter()
        .flat_map(|p| &p.types)
        .any(|t| t.id == profile || t.name == profile);
    let known_vgpu = host
        .vgpus
        .iter()
        .flat_map(|s| &s.creatable)
        .any(|t| t.name == profile || t.id.to_string() == profile);
    if !known_mdev && !known_vgpu {
        return "no parent or VF on this host offers this type now (`vfctl mdev types` lists them)"
            .into();
    }
    format!(
        "only {placed} fit: the parents and GPUs offering it are full, or hold another framebuffer size \
         (NVIDIA time-sliced vGPUs on one GPU share one size); free instances or use another type"
    )
}
