//! The planner: one pure function from what the gateway and the provider report to what one
//! supervisor pass must do. No I/O, no clock: everything it needs is in [`PlanInput`], so
//! every rule is unit-tested here.
//!
//! Rules, in order:
//! 1. **Teardown.** A gateway instance is destroyed when it is `draining` (it used up
//!    `maxUse`, or was deregistered), `failed`, `disconnected` for longer than the
//!    disconnect grace, or still `starting`/`provisioning` `bootDeadlineMs` after its
//!    creation. `busy` and unknown statuses are never destroyed.
//! 2. **Orphans**, in two phases. A provider instance the gateway does not list as live
//!    (unknown to it, or terminated), and a live gateway instance (not `busy`) the provider
//!    has no running instance for, are *sighted*: the first sighting time is recorded in
//!    [`Plan::sightings`] (persisted by the supervisor), and the orphan is removed only when a
//!    later pass still sees it `orphan_grace_ms` after that first sighting.
//! 3. **Desired size** = min(max, busy + queued + floor), never below min, where floor =
//!    `target` clamped into `[min, max]`, or `min` without a target.
//! 4. **Scale.** Usable instances (busy, ready, booting, disconnected within its grace, and
//!    gateway-only orphans still in their grace) are compared with the desired size: the
//!    deficit is created, capped so that live instances (every non-terminated one, draining
//!    ones included) never exceed max once this pass's destructions are done; a surplus
//!    destroys idle `ready` instances, longest idle first. Booting instances are never
//!    scaled down (they are ready soon and scaled down then, if still surplus).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::api::{Instance, InstanceStatus};
use crate::provider::ProviderInstance;

/// The pool's sizing and timing policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanConfig {
    /// Idle floor.
    pub min: u32,
    /// Ceiling on live instances.
    pub max: u32,
    /// Optional desired size, clamped into `[min, max]`; raises the floor.
    pub target: Option<u32>,
    /// Tasks per instance (0 = unlimited); given to the agents as their in-flight cap.
    #[serde(default)]
    pub max_use: u32,
    /// Not ready this long after creation: destroyed (0 = no deadline).
    pub boot_deadline_ms: u64,
    /// Disconnected this long: destroyed.
    pub disconnect_grace_ms: u64,
    /// Orphaned this long (from the first sighting): removed.
    pub orphan_grace_ms: u64,
}

/// Which side knows an orphan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum OrphanKind {
    /// The provider has it; the gateway does not list it as live.
    ProviderOnly,
    /// The gateway lists it as live; the provider has nothing running for it.
    GatewayOnly,
}

/// The first sighting of an orphan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Sighting {
    /// Which side knows it.
    pub kind: OrphanKind,
    /// When it was first seen orphaned (ms since the epoch).
    pub first_seen_at: i64,
}

/// Everything a plan depends on.
#[derive(Debug, Clone, Copy)]
pub struct PlanInput<'a> {
    /// Policy.
    pub config: PlanConfig,
    /// The gateway's instances of the pool (terminated ones are ignored).
    pub instances: &'a [Instance],
    /// Queued tasks the pool serves.
    pub queued: u32,
    /// What the provider has; `None` when it cannot list (orphan detection is then off).
    pub provider: Option<&'a [ProviderInstance]>,
    /// Orphan sightings of earlier passes, by instance id.
    pub sightings: &'a BTreeMap<String, Sighting>,
    /// Now, ms since the epoch.
    pub now: i64,
}

/// Why an instance is destroyed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DestroyReason {
    /// `draining`: used up `maxUse`, or deregistered.
    Drained,
    /// `failed`.
    Failed,
    /// `disconnected` for longer than the disconnect grace.
    Disconnected,
    /// Not ready within the boot deadline.
    BootDeadline,
    /// Idle and above the desired size.
    ScaleDown,
    /// Live in the gateway, absent from the provider past the orphan grace.
    Orphan,
}

impl DestroyReason {
    /// The wire form.
    pub fn as_str(self) -> &'static str {
        match self {
            DestroyReason::Drained => "drained",
            DestroyReason::Failed => "failed",
            DestroyReason::Disconnected => "disconnected",
            DestroyReason::BootDeadline => "bootDeadline",
            DestroyReason::ScaleDown => "scaleDown",
            DestroyReason::Orphan => "orphan",
        }
    }
}

/// A gateway instance to destroy: deregister, re-check, destroy, terminate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Destroy {
    /// Instance id.
    pub instance_id: String,
    /// Its status when planned.
    pub status: InstanceStatus,
    /// Why.
    pub reason: DestroyReason,
}

/// An orphan seen but still inside its grace period.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PendingOrphan {
    /// Instance id.
    pub instance_id: String,
    /// Which side knows it.
    pub kind: OrphanKind,
    /// First sighting.
    pub first_seen_at: i64,
    /// When it will be removed if still orphaned.
    pub remove_after: i64,
}

/// Instance counts by what they mean for capacity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Counts {
    /// Not terminated: what counts against max.
    pub live: u32,
    /// `busy`.
    pub busy: u32,
    /// `ready` (idle).
    pub ready: u32,
    /// `starting` or `provisioning`.
    pub booting: u32,
    /// `draining`.
    pub draining: u32,
    /// `disconnected`.
    pub disconnected: u32,
    /// `failed`.
    pub failed: u32,
    /// A status this supervisor does not know.
    pub unknown: u32,
    /// Serving or about to serve, after this plan's teardowns.
    pub usable: u32,
}

/// What one pass does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    /// The idle floor used (`target` clamped, or `min`).
    pub floor: u32,
    /// Desired size.
    pub desired: u32,
    /// Queued demand.
    pub queued: u32,
    /// Counts before acting.
    pub counts: Counts,
    /// Instances to create.
    pub create: u32,
    /// Gateway instances to destroy.
    pub destroy: Vec<Destroy>,
    /// Provider instances the gateway does not know (or terminated), past the grace:
    /// destroyed in the provider only.
    pub remove_provider_orphans: Vec<String>,
    /// Orphans seen but still inside their grace.
    pub pending_orphans: Vec<PendingOrphan>,
    /// The sightings to keep for the next pass.
    pub sightings: BTreeMap<String, Sighting>,
    /// Whether orphan detection ran (the provider can list).
    pub orphan_detection: bool,
}

impl Plan {
    /// Whether the plan changes anything.
    pub fn is_noop(&self) -> bool {
        self.create == 0 && self.destroy.is_empty() && self.remove_provider_orphans.is_empty()
    }
}

/// The floor: `target` clamped into `[min, max]`, or `min`.
pub fn floor(config: &PlanConfig) -> u32 {
    let min = config.min.min(config.max);
    config.target.map_or(min, |t| t.clamp(min, config.max))
}

/// Desired size = min(max, busy + queued + floor), never below min.
pub fn desired(config: &PlanConfig, busy: u32, queued: u32) -> u32 {
    let min = config.min.min(config.max);
    busy.saturating_add(queued)
        .saturating_add(floor(config))
        .min(config.max)
        .max(min)
}

/// Plans one pass.
pub fn plan(input: &PlanInput<'_>) -> Plan {
    let cfg = &input.config;
    let now = input.now;
    let live: Vec<&Instance> = input
        .instances
        .iter()
        .filter(|i| i.status != InstanceStatus::Terminated)
        .collect();

    let mut counts = Counts {
        live: live.len() as u32,
        ..Counts::default()
    };
    for i in &live {
        match i.status {
            InstanceStatus::Busy => counts.busy += 1,
            InstanceStatus::Ready => counts.ready += 1,
            InstanceStatus::Starting | InstanceStatus::Provisioning => counts.booting += 1,
            InstanceStatus::Draining => counts.draining += 1,
            InstanceStatus::Disconnected => counts.disconnected += 1,
            InstanceStatus::Failed => counts.failed += 1,
            InstanceStatus::Unknown => counts.unknown += 1,
            InstanceStatus::Terminated => {}
        }
    }

    // 1. Teardown by status.
    let mut destroy: Vec<Destroy> = Vec::new();
    for i in &live {
        let reason = match i.status {
            InstanceStatus::Draining => Some(DestroyReason::Drained),
            InstanceStatus::Failed => Some(DestroyReason::Failed),
            InstanceStatus::Disconnected => {
                let since = i.disconnected_at.unwrap_or(i.updated_at);
                (elapsed(now, since) >= cfg.disconnect_grace_ms)
                    .then_some(DestroyReason::Disconnected)
            }
            InstanceStatus::Starting | InstanceStatus::Provisioning => (cfg.boot_deadline_ms > 0
                && elapsed(now, i.created_at) >= cfg.boot_deadline_ms)
                .then_some(DestroyReason::BootDeadline),
            InstanceStatus::Ready
            | InstanceStatus::Busy
            | InstanceStatus::Terminated
            | InstanceStatus::Unknown => None,
        };
        if let Some(reason) = reason {
            destroy.push(Destroy {
                instance_id: i.instance_id.clone(),
                status: i.status,
                reason,
            });
        }
    }

    // 2. Orphans, two phases.
    let mut sightings = BTreeMap::new();
    let mut pending_orphans = Vec::new();
    let mut remove_provider_orphans = Vec::new();
    if let Some(provider) = input.provider {
        let live_ids: BTreeSet<&str> = live.iter().map(|i| i.instance_id.as_str()).collect();
        let running: BTreeSet<&str> = provider
            .iter()
            .filter(|p| p.running)
            .map(|p| p.instance_id.as_str())
            .collect();
        let planned: BTreeSet<String> = destroy.iter().map(|d| d.instance_id.clone()).collect();
        let mut candidates: Vec<(String, OrphanKind)> = Vec::new();
        let mut seen_provider = BTreeSet::new();
        for p in provider {
            if !live_ids.contains(p.instance_id.as_str())
                && seen_provider.insert(p.instance_id.clone())
            {
                candidates.push((p.instance_id.clone(), OrphanKind::ProviderOnly));
            }
        }
        for i in &live {
            let protected = matches!(i.status, InstanceStatus::Busy | InstanceStatus::Unknown);
            if !protected
                && !running.contains(i.instance_id.as_str())
                && !planned.contains(&i.instance_id)
            {
                candidates.push((i.instance_id.clone(), OrphanKind::GatewayOnly));
            }
        }
        for (id, kind) in candidates {
            let first_seen_at = match input.sightings.get(&id) {
                Some(s) if s.kind == kind => s.first_seen_at.min(now),
                _ => now,
            };
            sightings.insert(
                id.clone(),
                Sighting {
                    kind,
                    first_seen_at,
                },
            );
            // Two phases: never removed on the pass that first saw it.
            let first_pass = !matches!(input.sightings.get(&id), Some(s) if s.kind == kind);
            let due = !first_pass && elapsed(now, first_seen_at) >= cfg.orphan_grace_ms;
            if due {
                match kind {
                    OrphanKind::ProviderOnly => remove_provider_orphans.push(id),
                    OrphanKind::GatewayOnly => destroy.push(Destroy {
                        status: live
                            .iter()
                            .find(|i| i.instance_id == id)
                            .map_or(InstanceStatus::Unknown, |i| i.status),
                        instance_id: id,
                        reason: DestroyReason::Orphan,
                    }),
                }
            } else {
                pending_orphans.push(PendingOrphan {
                    instance_id: id,
                    kind,
                    first_seen_at,
                    remove_after: first_seen_at
                        .saturating_add(cfg.orphan_grace_ms.min(i64::MAX as u64) as i64),
                });
            }
        }
    } else {
        sightings = input.sightings.clone();
    }

    // 3. Desired size.
    let floor = floor(cfg);
    let desired = desired(cfg, counts.busy, input.queued);

    // 4. Scale.
    let tearing_down: BTreeSet<&str> = destroy.iter().map(|d| d.instance_id.as_str()).collect();
    let usable = live
        .iter()
        .filter(|i| {
            !tearing_down.contains(i.instance_id.as_str())
                && matches!(
                    i.status,
                    InstanceStatus::Busy
                        | InstanceStatus::Ready
                        | InstanceStatus::Starting
                        | InstanceStatus::Provisioning
                        | InstanceStatus::Disconnected
                )
        })
        .count() as u32;
    counts.usable = usable;
    let mut create = 0;
    if usable < desired {
        let live_after = counts.live.saturating_sub(destroy.len() as u32);
        let room = cfg.max.saturating_sub(live_after);
        create = (desired - usable).min(room);
    } else if usable > desired {
        let surplus = (usable - desired) as usize;
        let mut idle: Vec<&&Instance> = live
            .iter()
            .filter(|i| {
                i.status == InstanceStatus::Ready && !tearing_down.contains(i.instance_id.as_str())
            })
            .collect();
        idle.sort_by(|a, b| {
            (
                a.idle_since.unwrap_or(a.created_at),
                a.created_at,
                &a.instance_id,
            )
                .cmp(&(
                    b.idle_since.unwrap_or(b.created_at),
                    b.created_at,
                    &b.instance_id,
                ))
        });
        let chosen: Vec<Destroy> = idle
            .into_iter()
            .take(surplus)
            .map(|i| Destroy {
                instance_id: i.instance_id.clone(),
                status: i.status,
                reason: DestroyReason::ScaleDown,
            })
            .collect();
        destroy.extend(chosen);
    }

    Plan {
        floor,
        desired,
        queued: input.queued,
        counts,
        create,
        destroy,
        remove_provider_orphans,
        pending_orphans,
        sightings,
        orphan_detection: input.provider.is_some(),
    }
}

fn elapsed(now: i64, since: i64) -> u64 {
    now.saturating_sub(since).max(0) as u64
}

#[cfg(test)]
#[path = "reconcile_tests.rs"]
mod tests;
