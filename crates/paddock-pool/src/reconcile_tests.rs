#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use super::*;

const NOW: i64 = 1_000_000;

fn cfg(min: u32, max: u32, target: Option<u32>) -> PlanConfig {
    PlanConfig {
        min,
        max,
        target,
        max_use: 1,
        boot_deadline_ms: 60_000,
        disconnect_grace_ms: 30_000,
        orphan_grace_ms: 10_000,
    }
}

fn inst(id: &str, status: InstanceStatus) -> Instance {
    Instance {
        instance_id: id.into(),
        org_id: "o".into(),
        pool_id: Some("p".into()),
        status,
        provider: "process".into(),
        bootstrap_attempts: 0,
        last_error: None,
        uses: 0,
        max_use: 1,
        created_at: NOW - 5_000,
        updated_at: NOW - 1_000,
        last_bootstrap_at: None,
        ready_at: None,
        connected_at: None,
        disconnected_at: None,
        busy_at: None,
        idle_since: None,
        terminated_at: None,
    }
}

fn running(ids: &[&str]) -> Vec<ProviderInstance> {
    ids.iter()
        .map(|id| ProviderInstance {
            instance_id: (*id).into(),
            running: true,
            detail: String::new(),
        })
        .collect()
}

struct Case {
    config: PlanConfig,
    instances: Vec<Instance>,
    queued: u32,
    provider: Option<Vec<ProviderInstance>>,
    sightings: BTreeMap<String, Sighting>,
    now: i64,
}

impl Case {
    fn new(config: PlanConfig, instances: Vec<Instance>) -> Case {
        Case {
            config,
            instances,
            queued: 0,
            provider: None,
            sightings: BTreeMap::new(),
            now: NOW,
        }
    }

    /// The provider runs exactly the gateway's live instances.
    fn consistent(mut self) -> Case {
        let ids: Vec<&str> = self
            .instances
            .iter()
            .filter(|i| i.status != InstanceStatus::Terminated)
            .map(|i| i.instance_id.as_str())
            .collect();
        self.provider = Some(running(&ids));
        self
    }

    fn plan(&self) -> Plan {
        plan(&PlanInput {
            config: self.config,
            instances: &self.instances,
            queued: self.queued,
            provider: self.provider.as_deref(),
            sightings: &self.sightings,
            now: self.now,
        })
    }
}

fn destroyed(p: &Plan) -> Vec<(&str, DestroyReason)> {
    p.destroy
        .iter()
        .map(|d| (d.instance_id.as_str(), d.reason))
        .collect()
}

// ---- the desired formula ----

#[test]
fn desired_is_busy_plus_queued_plus_floor_capped_at_max_never_below_min() {
    let c = cfg(2, 4, None);
    assert_eq!(desired(&c, 0, 0), 2);
    assert_eq!(desired(&c, 1, 0), 3);
    assert_eq!(desired(&c, 1, 1), 4);
    assert_eq!(desired(&c, 0, 20), 4);
    assert_eq!(desired(&c, 4, 0), 4);
    let zero = cfg(0, 3, None);
    assert_eq!(desired(&zero, 0, 0), 0);
    assert_eq!(desired(&zero, 0, 2), 2);
    assert_eq!(desired(&zero, u32::MAX, u32::MAX), 3);
}

#[test]
fn target_is_clamped_into_min_max_and_raises_the_floor() {
    assert_eq!(floor(&cfg(1, 4, Some(3))), 3);
    assert_eq!(floor(&cfg(1, 4, Some(9))), 4);
    assert_eq!(floor(&cfg(2, 4, Some(0))), 2);
    assert_eq!(floor(&cfg(2, 4, None)), 2);
    assert_eq!(desired(&cfg(1, 4, Some(3)), 0, 0), 3);
    assert_eq!(desired(&cfg(1, 4, Some(3)), 2, 0), 4);
}

#[test]
fn a_min_above_max_is_held_at_max() {
    let c = cfg(5, 3, None);
    assert_eq!(floor(&c), 3);
    assert_eq!(desired(&c, 0, 0), 3);
    let p = Case::new(c, vec![]).plan();
    assert_eq!(p.create, 3);
}

// ---- scaling up ----

#[test]
fn an_empty_pool_is_filled_to_the_floor() {
    let p = Case::new(cfg(2, 4, None), vec![]).consistent().plan();
    assert_eq!(p.desired, 2);
    assert_eq!(p.create, 2);
    assert!(p.destroy.is_empty());
    assert!(!p.is_noop());
}

#[test]
fn a_pool_at_its_floor_does_nothing() {
    let p = Case::new(
        cfg(2, 4, None),
        vec![
            inst("a", InstanceStatus::Ready),
            inst("b", InstanceStatus::Ready),
        ],
    )
    .consistent()
    .plan();
    assert!(p.is_noop(), "{p:?}");
    assert_eq!(p.counts.usable, 2);
}

#[test]
fn booting_instances_count_as_usable() {
    let p = Case::new(
        cfg(2, 4, None),
        vec![
            inst("a", InstanceStatus::Starting),
            inst("b", InstanceStatus::Provisioning),
        ],
    )
    .consistent()
    .plan();
    assert_eq!(p.counts.booting, 2);
    assert!(p.is_noop(), "{p:?}");
}

#[test]
fn queued_demand_creates_up_to_max() {
    let mut c = Case::new(
        cfg(2, 4, None),
        vec![
            inst("a", InstanceStatus::Ready),
            inst("b", InstanceStatus::Ready),
        ],
    )
    .consistent();
    c.queued = 20;
    let p = c.plan();
    assert_eq!(p.desired, 4);
    assert_eq!(p.create, 2);
}

#[test]
fn busy_instances_keep_the_idle_floor_on_top() {
    let p = Case::new(
        cfg(2, 6, None),
        vec![
            inst("a", InstanceStatus::Busy),
            inst("b", InstanceStatus::Busy),
            inst("c", InstanceStatus::Ready),
        ],
    )
    .consistent()
    .plan();
    assert_eq!(p.desired, 4);
    assert_eq!(p.create, 1);
}

#[test]
fn draining_instances_count_against_max_until_destroyed() {
    // max 4: 4 live (3 draining, 1 busy), 10 queued. The drained ones are destroyed this
    // pass, so 3 slots free up for creation, not more.
    let mut c = Case::new(
        cfg(2, 4, None),
        vec![
            inst("a", InstanceStatus::Draining),
            inst("b", InstanceStatus::Draining),
            inst("c", InstanceStatus::Draining),
            inst("d", InstanceStatus::Busy),
        ],
    )
    .consistent();
    c.queued = 10;
    let p = c.plan();
    assert_eq!(p.counts.live, 4);
    assert_eq!(p.counts.draining, 3);
    assert_eq!(destroyed(&p).len(), 3);
    assert_eq!(p.create, 3);
    assert!(p.counts.live - p.destroy.len() as u32 + p.create <= 4);
}

#[test]
fn live_instances_never_exceed_max_whatever_the_statuses() {
    use InstanceStatus::*;
    let statuses = [
        Starting,
        Provisioning,
        Ready,
        Busy,
        Draining,
        Disconnected,
        Failed,
        Unknown,
    ];
    // Every combination of 4 instances (8^4) with heavy demand, max 4 and max 6.
    for max in [4u32, 6] {
        for n in 0..(8usize.pow(4)) {
            let mut instances = Vec::new();
            let mut k = n;
            for j in 0..4 {
                let mut i = inst(&format!("i{j}"), statuses[k % 8]);
                k /= 8;
                i.disconnected_at = Some(NOW - 60_000);
                instances.push(i);
            }
            let mut c = Case::new(cfg(2, max, None), instances).consistent();
            c.queued = 50;
            let p = c.plan();
            let after = p.counts.live - p.destroy.len() as u32 + p.create;
            assert!(after <= max, "{p:?}");
            for d in &p.destroy {
                assert!(
                    !matches!(d.status, Busy | Unknown),
                    "never destroys busy or unknown: {p:?}"
                );
            }
        }
    }
}

// ---- teardown ----

#[test]
fn drained_failed_and_long_disconnected_instances_are_destroyed() {
    let mut gone = inst("d", InstanceStatus::Disconnected);
    gone.disconnected_at = Some(NOW - 31_000);
    let mut blip = inst("e", InstanceStatus::Disconnected);
    blip.disconnected_at = Some(NOW - 1_000);
    let p = Case::new(
        cfg(0, 8, None),
        vec![
            inst("a", InstanceStatus::Draining),
            inst("b", InstanceStatus::Failed),
            inst("c", InstanceStatus::Busy),
            gone,
            blip,
        ],
    )
    .consistent()
    .plan();
    assert_eq!(
        destroyed(&p),
        vec![
            ("a", DestroyReason::Drained),
            ("b", DestroyReason::Failed),
            ("d", DestroyReason::Disconnected),
        ]
    );
    // The busy one and the one disconnected a second ago are kept (and count as usable).
    assert_eq!(p.counts.usable, 2);
}

#[test]
fn disconnected_without_a_time_uses_the_last_update() {
    let mut i = inst("a", InstanceStatus::Disconnected);
    i.updated_at = NOW - 40_000;
    let p = Case::new(cfg(0, 2, None), vec![i]).consistent().plan();
    assert_eq!(destroyed(&p), vec![("a", DestroyReason::Disconnected)]);
}

#[test]
fn instances_not_ready_within_the_boot_deadline_are_destroyed_and_replaced() {
    let mut late = inst("a", InstanceStatus::Provisioning);
    late.created_at = NOW - 60_000;
    let mut stuck = inst("b", InstanceStatus::Starting);
    stuck.created_at = NOW - 120_000;
    let mut young = inst("c", InstanceStatus::Starting);
    young.created_at = NOW - 59_999;
    let p = Case::new(cfg(3, 3, None), vec![late, stuck, young])
        .consistent()
        .plan();
    assert_eq!(
        destroyed(&p),
        vec![
            ("a", DestroyReason::BootDeadline),
            ("b", DestroyReason::BootDeadline)
        ]
    );
    assert_eq!(p.create, 2);
}

#[test]
fn a_zero_boot_deadline_disables_the_check() {
    let mut c = cfg(1, 1, None);
    c.boot_deadline_ms = 0;
    let mut old = inst("a", InstanceStatus::Starting);
    old.created_at = 0;
    let p = Case::new(c, vec![old]).consistent().plan();
    assert!(p.is_noop(), "{p:?}");
}

#[test]
fn busy_instances_are_never_destroyed_even_far_above_desired() {
    let instances: Vec<Instance> = (0..4)
        .map(|i| inst(&format!("b{i}"), InstanceStatus::Busy))
        .collect();
    let p = Case::new(cfg(0, 4, None), instances).consistent().plan();
    assert!(p.destroy.is_empty());
    assert_eq!(p.create, 0);
}

#[test]
fn terminated_instances_are_ignored() {
    let p = Case::new(
        cfg(1, 1, None),
        vec![
            inst("old", InstanceStatus::Terminated),
            inst("a", InstanceStatus::Ready),
        ],
    )
    .consistent()
    .plan();
    assert!(p.is_noop(), "{p:?}");
    assert_eq!(p.counts.live, 1);
}

#[test]
fn unknown_statuses_are_counted_but_left_alone() {
    let p = Case::new(cfg(1, 2, None), vec![inst("x", InstanceStatus::Unknown)])
        .consistent()
        .plan();
    assert_eq!(p.counts.unknown, 1);
    assert!(p.destroy.is_empty());
    // Not usable, but room for one more.
    assert_eq!(p.create, 1);
}

// ---- scaling down ----

#[test]
fn surplus_idle_instances_are_scaled_down_longest_idle_first() {
    let mut a = inst("a", InstanceStatus::Ready);
    a.idle_since = Some(NOW - 100);
    let mut b = inst("b", InstanceStatus::Ready);
    b.idle_since = Some(NOW - 9_000);
    let mut c = inst("c", InstanceStatus::Ready);
    c.idle_since = Some(NOW - 5_000);
    let d = inst("d", InstanceStatus::Busy);
    let p = Case::new(cfg(1, 4, None), vec![a, b, c, d])
        .consistent()
        .plan();
    // desired = busy 1 + floor 1 = 2; usable 4: two idle go, the longest idle first.
    assert_eq!(p.desired, 2);
    assert_eq!(
        destroyed(&p),
        vec![
            ("b", DestroyReason::ScaleDown),
            ("c", DestroyReason::ScaleDown)
        ]
    );
    assert_eq!(p.create, 0);
}

#[test]
fn booting_instances_are_not_scaled_down() {
    let p = Case::new(
        cfg(0, 4, None),
        vec![
            inst("a", InstanceStatus::Starting),
            inst("b", InstanceStatus::Provisioning),
        ],
    )
    .consistent()
    .plan();
    assert!(p.is_noop(), "{p:?}");
}

#[test]
fn queued_demand_protects_idle_instances_from_scale_down() {
    let mut c = Case::new(
        cfg(0, 4, None),
        vec![
            inst("a", InstanceStatus::Ready),
            inst("b", InstanceStatus::Ready),
        ],
    )
    .consistent();
    c.queued = 2;
    let p = c.plan();
    assert!(p.is_noop(), "{p:?}");
}

#[test]
fn lowering_the_target_scales_down_to_it() {
    let instances: Vec<Instance> = (0..4)
        .map(|i| inst(&format!("r{i}"), InstanceStatus::Ready))
        .collect();
    let p = Case::new(cfg(1, 4, Some(2)), instances).consistent().plan();
    assert_eq!(p.desired, 2);
    assert_eq!(p.destroy.len(), 2);
}

// ---- orphans ----

#[test]
fn a_provider_only_orphan_is_removed_only_after_the_grace_on_a_later_pass() {
    let mut c = Case::new(cfg(0, 2, None), vec![]);
    c.provider = Some(running(&["ghost"]));
    // First sighting: recorded, nothing removed.
    let p1 = c.plan();
    assert!(p1.remove_provider_orphans.is_empty());
    assert_eq!(
        p1.sightings["ghost"],
        Sighting {
            kind: OrphanKind::ProviderOnly,
            first_seen_at: NOW
        }
    );
    assert_eq!(p1.pending_orphans.len(), 1);
    assert_eq!(p1.pending_orphans[0].remove_after, NOW + 10_000);
    // Inside the grace: still waiting, first sighting kept.
    c.sightings = p1.sightings.clone();
    c.now = NOW + 9_999;
    let p2 = c.plan();
    assert!(p2.remove_provider_orphans.is_empty());
    assert_eq!(p2.sightings["ghost"].first_seen_at, NOW);
    // Past the grace: removed.
    c.now = NOW + 10_000;
    let p3 = c.plan();
    assert_eq!(p3.remove_provider_orphans, vec!["ghost".to_string()]);
    assert!(p3.destroy.is_empty());
}

#[test]
fn a_zero_grace_still_takes_two_passes() {
    let mut config = cfg(0, 2, None);
    config.orphan_grace_ms = 0;
    let mut c = Case::new(config, vec![]);
    c.provider = Some(running(&["ghost"]));
    let p1 = c.plan();
    assert!(p1.remove_provider_orphans.is_empty());
    c.sightings = p1.sightings;
    assert_eq!(c.plan().remove_provider_orphans, vec!["ghost".to_string()]);
}

#[test]
fn a_runtime_of_a_terminated_instance_is_a_provider_only_orphan() {
    let mut c = Case::new(cfg(0, 2, None), vec![inst("t", InstanceStatus::Terminated)]);
    c.provider = Some(running(&["t"]));
    c.sightings.insert(
        "t".into(),
        Sighting {
            kind: OrphanKind::ProviderOnly,
            first_seen_at: NOW - 20_000,
        },
    );
    assert_eq!(c.plan().remove_provider_orphans, vec!["t".to_string()]);
}

#[test]
fn a_dead_runtime_record_is_still_removed_as_an_orphan() {
    let mut c = Case::new(cfg(0, 2, None), vec![]);
    c.provider = Some(vec![ProviderInstance {
        instance_id: "dead".into(),
        running: false,
        detail: String::new(),
    }]);
    c.sightings.insert(
        "dead".into(),
        Sighting {
            kind: OrphanKind::ProviderOnly,
            first_seen_at: NOW - 20_000,
        },
    );
    assert_eq!(c.plan().remove_provider_orphans, vec!["dead".to_string()]);
}

#[test]
fn a_gateway_only_orphan_is_terminated_after_the_grace_and_replaced() {
    let mut c = Case::new(cfg(1, 2, None), vec![inst("lost", InstanceStatus::Ready)]);
    c.provider = Some(vec![]);
    let p1 = c.plan();
    assert!(p1.destroy.is_empty());
    assert_eq!(p1.sightings["lost"].kind, OrphanKind::GatewayOnly);
    // Within the grace it still counts as usable: nothing is created yet.
    assert_eq!(p1.create, 0);
    c.sightings = p1.sightings;
    c.now = NOW + 10_000;
    let p2 = c.plan();
    assert_eq!(destroyed(&p2), vec![("lost", DestroyReason::Orphan)]);
    assert_eq!(p2.create, 1);
}

#[test]
fn a_gateway_instance_whose_runtime_died_is_an_orphan() {
    let mut c = Case::new(cfg(0, 2, None), vec![inst("a", InstanceStatus::Starting)]);
    c.provider = Some(vec![ProviderInstance {
        instance_id: "a".into(),
        running: false,
        detail: String::new(),
    }]);
    c.sightings.insert(
        "a".into(),
        Sighting {
            kind: OrphanKind::GatewayOnly,
            first_seen_at: NOW - 10_000,
        },
    );
    assert_eq!(destroyed(&c.plan()), vec![("a", DestroyReason::Orphan)]);
}

#[test]
fn busy_instances_are_never_gateway_only_orphans() {
    let mut c = Case::new(cfg(0, 2, None), vec![inst("b", InstanceStatus::Busy)]);
    c.provider = Some(vec![]);
    c.sightings.insert(
        "b".into(),
        Sighting {
            kind: OrphanKind::GatewayOnly,
            first_seen_at: NOW - 100_000,
        },
    );
    let p = c.plan();
    assert!(p.destroy.is_empty());
    assert!(p.sightings.is_empty(), "the sighting is dropped: {p:?}");
}

#[test]
fn an_orphan_that_comes_back_is_forgotten() {
    let mut c = Case::new(cfg(1, 2, None), vec![inst("a", InstanceStatus::Ready)]);
    c.provider = Some(running(&["a"]));
    c.sightings.insert(
        "a".into(),
        Sighting {
            kind: OrphanKind::GatewayOnly,
            first_seen_at: NOW - 100_000,
        },
    );
    let p = c.plan();
    assert!(p.is_noop());
    assert!(p.sightings.is_empty());
}

#[test]
fn a_sighting_of_the_other_kind_restarts_the_grace() {
    let mut c = Case::new(cfg(0, 2, None), vec![]);
    c.provider = Some(running(&["x"]));
    c.sightings.insert(
        "x".into(),
        Sighting {
            kind: OrphanKind::GatewayOnly,
            first_seen_at: NOW - 100_000,
        },
    );
    let p = c.plan();
    assert!(p.remove_provider_orphans.is_empty());
    assert_eq!(
        p.sightings["x"],
        Sighting {
            kind: OrphanKind::ProviderOnly,
            first_seen_at: NOW
        }
    );
}

#[test]
fn status_teardown_takes_precedence_over_orphan_handling() {
    let mut c = Case::new(cfg(0, 2, None), vec![inst("d", InstanceStatus::Draining)]);
    c.provider = Some(vec![]);
    let p = c.plan();
    assert_eq!(destroyed(&p), vec![("d", DestroyReason::Drained)]);
    assert!(p.sightings.is_empty());
}

#[test]
fn without_a_provider_list_orphan_detection_is_off_and_sightings_kept() {
    let mut c = Case::new(cfg(1, 2, None), vec![inst("a", InstanceStatus::Ready)]);
    c.sightings.insert(
        "zzz".into(),
        Sighting {
            kind: OrphanKind::ProviderOnly,
            first_seen_at: 1,
        },
    );
    let p = c.plan();
    assert!(!p.orphan_detection);
    assert!(p.is_noop());
    assert_eq!(p.sightings, c.sightings);
}

#[test]
fn a_clock_going_backwards_never_removes_early() {
    let mut c = Case::new(cfg(0, 2, None), vec![]);
    c.provider = Some(running(&["ghost"]));
    c.sightings.insert(
        "ghost".into(),
        Sighting {
            kind: OrphanKind::ProviderOnly,
            first_seen_at: NOW + 50_000,
        },
    );
    let p = c.plan();
    assert!(p.remove_provider_orphans.is_empty());
    assert_eq!(p.sightings["ghost"].first_seen_at, NOW);
}

// ---- the one-job-per-instance burst, step by step ----

#[test]
fn a_burst_with_max_use_one_stays_within_max_pass_after_pass() {
    // Simulates passes of a min 2 / max 4 pool while 20 queued tasks are worked off, with
    // an idealised gateway between passes: created instances become ready, ready ones take
    // a queued task (busy), busy ones finish (draining).
    let config = cfg(2, 4, None);
    let mut instances: Vec<Instance> = Vec::new();
    let mut queued = 20u32;
    let mut next = 0;
    let mut done = 0;
    for pass in 0..100 {
        let ids: Vec<String> = instances.iter().map(|i| i.instance_id.clone()).collect();
        let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let provider = running(&id_refs);
        let p = plan(&PlanInput {
            config,
            instances: &instances,
            queued,
            provider: Some(&provider),
            sightings: &BTreeMap::new(),
            now: NOW + pass,
        });
        // Act.
        for d in &p.destroy {
            assert_ne!(d.status, InstanceStatus::Busy);
            instances.retain(|i| i.instance_id != d.instance_id);
        }
        for _ in 0..p.create {
            next += 1;
            instances.push(inst(&format!("n{next}"), InstanceStatus::Starting));
        }
        assert!(
            instances.len() <= 4,
            "pass {pass}: {} live",
            instances.len()
        );
        // The gateway moves on.
        for i in &mut instances {
            match i.status {
                InstanceStatus::Busy => {
                    i.status = InstanceStatus::Draining;
                    done += 1;
                }
                InstanceStatus::Ready if queued > 0 => {
                    queued -= 1;
                    i.status = InstanceStatus::Busy;
                    i.uses += 1;
                }
                InstanceStatus::Starting => i.status = InstanceStatus::Ready,
                _ => {}
            }
        }
        if done == 20 && instances.iter().all(|i| i.status == InstanceStatus::Ready) {
            break;
        }
    }
    assert_eq!(done, 20);
    assert_eq!(instances.len(), 2, "floor restored: {instances:?}");
    assert!(instances.iter().all(|i| i.uses == 0));
}
