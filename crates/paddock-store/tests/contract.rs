//! One contract suite, run against both backends: every case below runs once on a fresh
//! SQLite file and once on a fresh PostgreSQL database.
#![allow(clippy::unwrap_used)]

use paddock_proto::{
    Capabilities, ErrorCode, ResultStatus, Selector, ShellTask, TaskResult, TaskSpec,
};
use paddock_store::{
    ClaimRequest, Handed, NewTask, PairingError, Role, Store, StoreError, TaskState,
};

macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let dir = tempfile::tempdir().unwrap();
                let store = paddock_store::Store::connect(&paddock_store::testing::sqlite_url(dir.path())).await.unwrap();
                super::$name(store).await;
            } )*
        }
        mod postgres {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let Some(url) = paddock_store::testing::postgres_url().await else { return };
                let store = paddock_store::Store::connect(&url).await.unwrap();
                super::$name(store).await;
            } )*
        }
    };
}

contract!(
    orgs_and_api_tokens,
    pairing_tokens_are_single_use_and_expire,
    agent_tokens_tags_and_revocation,
    claims_follow_selector_kind_backend_and_org,
    claims_honour_limit_and_org_cap,
    first_completion_wins,
    batched_results_are_judged_one_by_one,
    lost_agents_requeue_then_fail,
    queued_tasks_time_out,
    cancel_queued_and_running,
    results_expire_after_ttl,
    output_and_events,
    concurrent_claims_never_double_dispatch,
    reconnect_rebinds_running_tasks,
    migrations_are_idempotent,
    reconnect_detaches_unlisted_tasks,
    hand_backs_requeue_with_or_without_the_attempt,
    pools_upsert_and_cap_live_instances,
    user_instance_bootstrap_attempts_cooldown_and_failure,
    instance_claims_are_targeted_gated_and_counted,
    gateway_secret_is_shared_and_stable,
    batched_inserts_keep_order_and_are_all_or_none,
    claims_record_their_dispatched_events,
    insert_and_claim_take_older_work_first_and_all_or_nothing,
    counts_by_state_cover_every_state,
    the_in_memory_pick_agrees_with_the_claim,
    tasks_dispatched_before_they_are_stored,
    assigned_tasks_are_stored_dispatched_unless_older_work_waits,
);

fn shell(argv: &[&str]) -> TaskSpec {
    TaskSpec {
        kind: "agent.execute".into(),
        selector: None,
        shell: Some(ShellTask {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }),
        bundle: None,
        sandbox: Default::default(),
        timeout_ms: None,
        queue_timeout_ms: None,
        max_attempts: None,
    }
}

/// Queues `n` tasks `echo 0`, `echo 1`, ... one by one; returns their ids in order.
async fn insert_echo_tasks(store: &Store, org: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        ids.push(
            store
                .insert_task(&new_task(org, shell(&["echo", &i.to_string()])))
                .await
                .unwrap(),
        );
    }
    ids
}

fn new_task(org: &str, spec: TaskSpec) -> NewTask {
    NewTask {
        id: None,
        org_id: org.into(),
        spec,
        max_attempts: 2,
        queue_deadline_at: paddock_proto::now_ms() + 60_000,
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

struct AgentView {
    tags: Vec<String>,
    kinds: Vec<String>,
    backends: Vec<String>,
}

impl AgentView {
    fn plain() -> Self {
        AgentView {
            tags: vec![],
            kinds: strings(&["agent.execute"]),
            backends: strings(&["host"]),
        }
    }
    fn req<'a>(&'a self, org: &'a str, agent: &'a str, limit: u32) -> ClaimRequest<'a> {
        ClaimRequest {
            org_id: org,
            agent_id: agent,
            tags: &self.tags,
            kinds: &self.kinds,
            backends: &self.backends,
            limit,
            lease_until: paddock_proto::now_ms() + 30_000,
            org_max_inflight: None,
            now: paddock_proto::now_ms(),
            instance: false,
        }
    }
}

fn result(task: &str, attempt: u32, status: ResultStatus, code: i32) -> TaskResult {
    TaskResult {
        task_id: task.into(),
        attempt,
        status,
        exit_code: Some(code),
        signal: None,
        error_code: None,
        error_message: None,
        stdout: format!("attempt {attempt}"),
        stderr: String::new(),
        stdout_truncated: false,
        stderr_truncated: false,
        started_at_ms: paddock_proto::now_ms(),
        finished_at_ms: paddock_proto::now_ms(),
    }
}

async fn orgs_and_api_tokens(store: Store) {
    let org = store.create_org("acme").await.unwrap();
    assert_eq!(store.get_org(&org.id).await.unwrap().unwrap().name, "acme");
    let (token_id, token) = store
        .create_api_token(&org.id, Role::Admin, "ci")
        .await
        .unwrap();
    let p = store.authenticate_api_token(&token).await.unwrap().unwrap();
    assert_eq!(
        (p.org_id.as_str(), p.role, p.token_id.as_str()),
        (org.id.as_str(), Role::Admin, token_id.as_str())
    );
    assert!(
        store
            .authenticate_api_token("pdk_nope")
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .authenticate_api_token(&format!("{token}x"))
            .await
            .unwrap()
            .is_none()
    );
    let other = store.create_org("other").await.unwrap();
    assert!(
        !store.revoke_api_token(&other.id, &token_id).await.unwrap(),
        "cross-org revoke must not work"
    );
    assert!(store.revoke_api_token(&org.id, &token_id).await.unwrap());
    assert!(
        store
            .authenticate_api_token(&token)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(store.list_orgs().await.unwrap().len(), 2);
}

async fn pairing_tokens_are_single_use_and_expire(store: Store) {
    let org = store.create_org("acme").await.unwrap();
    let (token, expires) = store.create_pairing_token(&org.id, "t").await.unwrap();
    let now = paddock_proto::now_ms();
    assert!(
        (expires - now - 15 * 60 * 1000).abs() < 5_000,
        "15 minute lifetime"
    );
    let (agent, agent_token) = store.pair_agent(&token, "box", now).await.unwrap().unwrap();
    assert_eq!(agent.org_id, org.id);
    assert_eq!(agent.pool, "byon");
    assert!(
        agent_token.starts_with(&format!("{}.", org.id)),
        "agent token is <orgId>.<secret>"
    );
    assert_eq!(
        store
            .pair_agent(&token, "again", now)
            .await
            .unwrap()
            .unwrap_err(),
        PairingError::Used
    );
    assert_eq!(
        store
            .pair_agent("pdp_unknown", "x", now)
            .await
            .unwrap()
            .unwrap_err(),
        PairingError::Invalid
    );
    let (late, _) = store.create_pairing_token(&org.id, "t").await.unwrap();
    let after = now + 15 * 60 * 1000 + 1_000;
    assert_eq!(
        store
            .pair_agent(&late, "x", after)
            .await
            .unwrap()
            .unwrap_err(),
        PairingError::Expired
    );
    // Two concurrent exchanges of one token: exactly one wins.
    let (race, _) = store.create_pairing_token(&org.id, "t").await.unwrap();
    let (a, b) = tokio::join!(
        store.pair_agent(&race, "a", now),
        store.pair_agent(&race, "b", now)
    );
    let wins = [a.unwrap().is_ok(), b.unwrap().is_ok()]
        .iter()
        .filter(|w| **w)
        .count();
    assert_eq!(wins, 1);
}

async fn agent_tokens_tags_and_revocation(store: Store) {
    let org = store.create_org("acme").await.unwrap();
    let other = store.create_org("other").await.unwrap();
    let (agent, token) = store
        .issue_managed_agent(&org.id, "m1", &strings(&["east"]))
        .await
        .unwrap();
    assert_eq!(agent.pool, "managed");
    assert_eq!(
        store.authenticate_agent(&token).await.unwrap().unwrap().id,
        agent.id
    );
    // A token whose org prefix was changed does not authenticate.
    let (_, secret) = token.split_once('.').unwrap();
    assert!(
        store
            .authenticate_agent(&format!("{}.{secret}", other.id))
            .await
            .unwrap()
            .is_none()
    );
    assert!(store.authenticate_agent("garbage").await.unwrap().is_none());
    // Tags: control plane only; cross-org updates see nothing.
    assert!(
        store
            .set_agent_tags(&other.id, &agent.id, &strings(&["x"]))
            .await
            .unwrap()
            .is_none()
    );
    let a = store
        .set_agent_tags(&org.id, &agent.id, &strings(&["west", "group:beta"]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(a.tags, strings(&["west", "group:beta"]));
    let caps = Capabilities {
        tags: strings(&["reported"]),
        max_in_flight: 3,
        kinds: strings(&["agent.execute"]),
        ..Default::default()
    };
    store
        .mark_agent_connected(&agent.id, "r1", &caps, "0.1.0", paddock_proto::now_ms())
        .await
        .unwrap();
    let a = store.get_agent(&org.id, &agent.id).await.unwrap().unwrap();
    assert_eq!(a.reported_tags, strings(&["reported"]));
    assert_eq!(
        a.tags,
        strings(&["west", "group:beta"]),
        "reported tags never replace control-plane tags"
    );
    assert_eq!(a.capabilities.unwrap().max_in_flight, 3);
    assert_eq!(store.list_live_agents(&org.id, 0).await.unwrap().len(), 1);
    assert!(
        store
            .list_live_agents(&other.id, 0)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .touch_agents(std::slice::from_ref(&agent.id), paddock_proto::now_ms(), 0)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .revoke_agent(&other.id, &agent.id)
            .await
            .unwrap()
            .is_none(),
        "cross-org revoke"
    );
    let a = store
        .revoke_agent(&org.id, &agent.id)
        .await
        .unwrap()
        .unwrap();
    assert!(a.revoked_at.is_some());
    assert_eq!(
        store
            .touch_agents(std::slice::from_ref(&agent.id), paddock_proto::now_ms(), 0)
            .await
            .unwrap(),
        vec![agent.id.clone()]
    );
    assert!(
        store.list_live_agents(&org.id, 0).await.unwrap().is_empty(),
        "revoked agents are not live"
    );
    store
        .mark_agent_disconnected(&agent.id, "other-replica")
        .await
        .unwrap();
    assert!(
        store
            .get_agent(&org.id, &agent.id)
            .await
            .unwrap()
            .unwrap()
            .connected_replica
            .is_some(),
        "only the holder clears"
    );
    store
        .mark_agent_disconnected(&agent.id, "r1")
        .await
        .unwrap();
    assert!(
        store
            .get_agent(&org.id, &agent.id)
            .await
            .unwrap()
            .unwrap()
            .connected_replica
            .is_none()
    );
}

async fn claims_follow_selector_kind_backend_and_org(store: Store) {
    let org = store.create_org("acme").await.unwrap();
    let other = store.create_org("other").await.unwrap();
    let mut tagged = shell(&["true"]);
    tagged.selector = Some(Selector {
        tag: Some("gpu".into()),
        group: None,
        instance: None,
    });
    let mut grouped = shell(&["true"]);
    grouped.selector = Some(Selector {
        tag: None,
        group: Some("beta".into()),
        instance: None,
    });
    let mut docker = shell(&["true"]);
    docker.sandbox.backend = Some("docker".into());
    let t_tag = store.insert_task(&new_task(&org.id, tagged)).await.unwrap();
    let t_group = store
        .insert_task(&new_task(&org.id, grouped))
        .await
        .unwrap();
    let t_docker = store.insert_task(&new_task(&org.id, docker)).await.unwrap();
    let t_other_org = store
        .insert_task(&new_task(&other.id, shell(&["true"])))
        .await
        .unwrap();

    let plain = AgentView::plain();
    assert!(
        store
            .claim_tasks(&plain.req(&org.id, "a1", 10))
            .await
            .unwrap()
            .is_empty(),
        "untagged agent takes no selected task"
    );
    let gpu = AgentView {
        tags: strings(&["gpu"]),
        ..AgentView::plain()
    };
    let got = store
        .claim_tasks(&gpu.req(&org.id, "a2", 10))
        .await
        .unwrap();
    assert_eq!(
        got.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
        vec![t_tag.as_str()]
    );
    assert_eq!(got[0].attempt, 1);
    let beta = AgentView {
        tags: strings(&["group:beta"]),
        ..AgentView::plain()
    };
    let got = store
        .claim_tasks(&beta.req(&org.id, "a3", 10))
        .await
        .unwrap();
    assert_eq!(
        got.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
        vec![t_group.as_str()]
    );
    let dock = AgentView {
        backends: strings(&["host", "docker"]),
        ..AgentView::plain()
    };
    let got = store
        .claim_tasks(&dock.req(&org.id, "a4", 10))
        .await
        .unwrap();
    assert_eq!(
        got.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
        vec![t_docker.as_str()]
    );
    let no_kind = AgentView {
        kinds: vec![],
        ..AgentView::plain()
    };
    assert!(
        store
            .claim_tasks(&no_kind.req(&other.id, "a5", 10))
            .await
            .unwrap()
            .is_empty()
    );
    let got = store
        .claim_tasks(&plain.req(&other.id, "a6", 10))
        .await
        .unwrap();
    assert_eq!(
        got.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
        vec![t_other_org.as_str()],
        "agents only ever see their own org's tasks"
    );
    let row = store.get_task(&org.id, &t_tag).await.unwrap().unwrap();
    assert_eq!(
        (row.state, row.agent_id.as_deref()),
        (TaskState::Dispatched, Some("a2"))
    );
    assert!(
        store.get_task(&other.id, &t_tag).await.unwrap().is_none(),
        "cross-org read"
    );
}

async fn claims_honour_limit_and_org_cap(store: Store) {
    let org = store.create_org("acme").await.unwrap();
    let ids = insert_echo_tasks(&store, &org.id, 6).await;
    let a = AgentView::plain();
    let got = store.claim_tasks(&a.req(&org.id, "a1", 2)).await.unwrap();
    assert_eq!(
        got.iter().map(|c| c.id.clone()).collect::<Vec<_>>(),
        ids[..2].to_vec(),
        "oldest first, at most limit"
    );
    let mut capped = a.req(&org.id, "a2", 10);
    capped.org_max_inflight = Some(3);
    let got = store.claim_tasks(&capped).await.unwrap();
    assert_eq!(got.len(), 1, "2 in flight + 1 = cap of 3");
    assert!(
        store.claim_tasks(&capped).await.unwrap().is_empty(),
        "at cap: nothing more, tasks stay queued"
    );
    let queued = store
        .list_tasks(&org.id, Some(TaskState::Queued), 100)
        .await
        .unwrap();
    assert_eq!(queued.len(), 3, "capped tasks wait queued, none dropped");
    assert!(
        store
            .complete_task(
                &org.id,
                "a2",
                &result(&got[0].id, 1, ResultStatus::Succeeded, 0),
                60_000
            )
            .await
            .unwrap()
    );
    assert_eq!(
        store.claim_tasks(&capped).await.unwrap().len(),
        1,
        "a finished task frees a slot"
    );
}

/// A claim writes one `dispatched` event per task it claimed, naming the agent, in the same
/// transaction; a claim that finds nothing writes nothing.
async fn claims_record_their_dispatched_events(store: Store) {
    let org = store.create_org("acme").await.unwrap();
    let ids = insert_echo_tasks(&store, &org.id, 3).await;
    let a = AgentView::plain();
    let got = store.claim_tasks(&a.req(&org.id, "a1", 2)).await.unwrap();
    assert_eq!(got.len(), 2);
    for c in &got {
        let events = store.list_events(&c.id).await.unwrap();
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].name, "dispatched");
        assert_eq!(events[0].attempt, c.attempt);
        assert_eq!(events[0].payload, serde_json::json!({ "agentId": "a1" }));
    }
    assert!(
        store.list_events(&ids[2]).await.unwrap().is_empty(),
        "the task left queued has no event"
    );
    // Another agent takes the last one; then nothing is left and nothing more is written.
    assert_eq!(
        store
            .claim_tasks(&a.req(&org.id, "a2", 5))
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(
        store
            .claim_tasks(&a.req(&org.id, "a2", 5))
            .await
            .unwrap()
            .is_empty()
    );
    for id in &ids {
        assert_eq!(store.list_events(id).await.unwrap().len(), 1, "task {id}");
    }
}

async fn batched_results_are_judged_one_by_one(store: Store) {
    let org = store.create_org("acme").await.unwrap();
    let ids = insert_echo_tasks(&store, &org.id, 3).await;
    let a = AgentView::plain();
    assert_eq!(
        store
            .claim_tasks(&a.req(&org.id, "a1", 3))
            .await
            .unwrap()
            .len(),
        3
    );
    // One transaction: the current attempts are stored, a wrong attempt and a duplicate of a
    // result already in the batch are not.
    let stored = store
        .complete_tasks(
            &org.id,
            "a1",
            &[
                result(&ids[0], 1, ResultStatus::Succeeded, 0),
                result(&ids[1], 2, ResultStatus::Succeeded, 0),
                result(&ids[2], 1, ResultStatus::Failed, 3),
                result(&ids[0], 1, ResultStatus::Failed, 9),
            ],
            60_000,
        )
        .await
        .unwrap();
    let flags: Vec<bool> = stored.iter().map(Option::is_some).collect();
    assert_eq!(flags, vec![true, false, true, false]);
    // A stored result comes back as the task's new row.
    let row0 = stored[0].as_ref().unwrap();
    assert_eq!(
        (row0.id.as_str(), row0.state, row0.exit_code, row0.attempt),
        (ids[0].as_str(), TaskState::Succeeded, Some(0), 1)
    );
    assert_eq!(stored[2].as_ref().unwrap().state, TaskState::Failed);
    let t0 = store.get_task(&org.id, &ids[0]).await.unwrap().unwrap();
    assert_eq!((t0.state, t0.exit_code), (TaskState::Succeeded, Some(0)));
    let t1 = store.get_task(&org.id, &ids[1]).await.unwrap().unwrap();
    assert_eq!(t1.state, TaskState::Dispatched);
    let t2 = store.get_task(&org.id, &ids[2]).await.unwrap().unwrap();
    assert_eq!((t2.state, t2.exit_code), (TaskState::Failed, Some(3)));
    assert_eq!(
        stored[2].as_ref(),
        Some(&t2),
        "the returned row is the stored row"
    );
    // A batch of one, and an empty batch.
    assert_eq!(
        store
            .complete_tasks(
                &org.id,
                "a1",
                &[result(&ids[1], 1, ResultStatus::Succeeded, 0)],
                60_000
            )
            .await
            .unwrap()
            .iter()
            .map(Option::is_some)
            .collect::<Vec<_>>(),
        vec![true]
    );
    assert!(
        store
            .complete_tasks(&org.id, "a1", &[], 60_000)
            .await
            .unwrap()
            .is_empty()
    );
    // A wrong attempt before the right one for the same task, another agent's task, and a
    // batch past one statement's worth (128): each judged on its own.
    let more: Vec<String> = store
        .insert_tasks(
            &(0..130)
                .map(|_| new_task(&org.id, shell(&["true"])))
                .collect::<Vec<_>>(),
        )
        .await
        .unwrap();
    assert_eq!(
        store
            .claim_tasks(&a.req(&org.id, "a1", 64))
            .await
            .unwrap()
            .len()
            + store
                .claim_tasks(&a.req(&org.id, "a1", 64))
                .await
                .unwrap()
                .len()
            + store
                .claim_tasks(&a.req(&org.id, "a1", 64))
                .await
                .unwrap()
                .len(),
        130
    );
    let mut batch = vec![
        result(&more[0], 7, ResultStatus::Failed, 1),
        result(&more[0], 1, ResultStatus::Succeeded, 0),
    ];
    batch.extend(
        more[1..]
            .iter()
            .map(|id| result(id, 1, ResultStatus::Succeeded, 0)),
    );
    let stored = store
        .complete_tasks(&org.id, "a1", &batch, 60_000)
        .await
        .unwrap();
    assert_eq!(stored.len(), 131);
    assert!(stored[0].is_none(), "the wrong attempt is not stored");
    assert!(stored[1..].iter().all(Option::is_some));
    let by_other = store
        .complete_tasks(
            &org.id,
            "a2",
            &[
                result(&ids[1], 1, ResultStatus::Failed, 1),
                result(&more[5], 1, ResultStatus::Failed, 1),
            ],
            60_000,
        )
        .await
        .unwrap();
    assert_eq!(by_other, vec![None, None]);
    assert_eq!(
        store
            .get_task(&org.id, &more[0])
            .await
            .unwrap()
            .unwrap()
            .state,
        TaskState::Succeeded
    );
}

async fn first_completion_wins(store: Store) {
    let org = store.create_org("acme").await.unwrap();
    let id = store
        .insert_task(&new_task(&org.id, shell(&["true"])))
        .await
        .unwrap();
    let a = AgentView::plain();
    let c = store
        .claim_tasks(&a.req(&org.id, "a1", 1))
        .await
        .unwrap()
        .remove(0);
    assert!(
        store
            .mark_task_running(&id, 1, "a1", paddock_proto::now_ms())
            .await
            .unwrap()
    );
    assert!(
        !store
            .mark_task_running(&id, 1, "someone-else", paddock_proto::now_ms())
            .await
            .unwrap()
    );
    // Lease lost: the task is re-queued and dispatched as attempt 2 to another agent.
    let (failed, requeued) = store
        .expire_leases(paddock_proto::now_ms() + 3_600_000, 60_000, 0)
        .await
        .unwrap();
    assert!(failed.is_empty());
    assert_eq!(
        requeued.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        vec![id.as_str()]
    );
    let c2 = store
        .claim_tasks(&a.req(&org.id, "a2", 1))
        .await
        .unwrap()
        .remove(0);
    assert_eq!((c2.id.as_str(), c2.attempt), (c.id.as_str(), 2));
    // Another agent of the same org cannot complete an attempt it does not hold.
    assert!(
        !store
            .complete_task(
                &org.id,
                "intruder",
                &result(&id, 2, ResultStatus::Succeeded, 0),
                60_000
            )
            .await
            .unwrap()
    );
    // The first agent's late result for attempt 1 is ignored.
    assert!(
        !store
            .complete_task(
                &org.id,
                "a1",
                &result(&id, 1, ResultStatus::Failed, 3),
                60_000
            )
            .await
            .unwrap()
    );
    assert!(
        store
            .complete_task(
                &org.id,
                "a2",
                &result(&id, 2, ResultStatus::Succeeded, 0),
                60_000
            )
            .await
            .unwrap()
    );
    // A duplicate of the winning result is ignored too.
    assert!(
        !store
            .complete_task(
                &org.id,
                "a2",
                &result(&id, 2, ResultStatus::Failed, 9),
                60_000
            )
            .await
            .unwrap()
    );
    let row = store.get_task(&org.id, &id).await.unwrap().unwrap();
    assert_eq!(
        (row.state, row.exit_code, row.attempt),
        (TaskState::Succeeded, Some(0), 2)
    );
    assert_eq!(row.result.unwrap().stdout, "attempt 2");
    // Cross-org completion never lands.
    let other = store.create_org("other").await.unwrap();
    let id2 = store
        .insert_task(&new_task(&org.id, shell(&["true"])))
        .await
        .unwrap();
    store.claim_tasks(&a.req(&org.id, "a1", 1)).await.unwrap();
    assert!(
        !store
            .complete_task(
                &other.id,
                "a1",
                &result(&id2, 1, ResultStatus::Succeeded, 0),
                60_000
            )
            .await
            .unwrap()
    );
}

async fn lost_agents_requeue_then_fail(store: Store) {
    let org = store.create_org("acme").await.unwrap();
    let id = store
        .insert_task(&new_task(&org.id, shell(&["true"])))
        .await
        .unwrap();
    let a = AgentView::plain();
    let far = paddock_proto::now_ms() + 3_600_000;
    store.claim_tasks(&a.req(&org.id, "a1", 1)).await.unwrap();
    let (_, requeued) = store
        .expire_leases(far, 60_000, far + 60_000)
        .await
        .unwrap();
    assert_eq!(requeued.len(), 1);
    store.claim_tasks(&a.req(&org.id, "a2", 1)).await.unwrap();
    let (failed, requeued) = store
        .expire_leases(far, 60_000, far + 60_000)
        .await
        .unwrap();
    assert_eq!(
        (failed.len(), requeued.len()),
        (1, 0),
        "max_attempts = 2: second loss fails"
    );
    let row = store.get_task(&org.id, &id).await.unwrap().unwrap();
    assert_eq!(row.state, TaskState::Failed);
    assert_eq!(
        row.error_code.as_deref(),
        Some(ErrorCode::AgentLost.as_str())
    );
    // Leases that have not expired are left alone.
    store
        .insert_task(&new_task(&org.id, shell(&["true"])))
        .await
        .unwrap();
    store.claim_tasks(&a.req(&org.id, "a3", 1)).await.unwrap();
    let (f, r) = store
        .expire_leases(paddock_proto::now_ms(), 60_000, 0)
        .await
        .unwrap();
    assert!(f.is_empty() && r.is_empty());
}

async fn queued_tasks_time_out(store: Store) {
    let org = store.create_org("acme").await.unwrap();
    let mut t = new_task(&org.id, shell(&["true"]));
    t.queue_deadline_at = paddock_proto::now_ms() - 1;
    let id = store.insert_task(&t).await.unwrap();
    let a = AgentView::plain();
    assert!(
        store
            .claim_tasks(&a.req(&org.id, "a1", 1))
            .await
            .unwrap()
            .is_empty(),
        "past-deadline tasks are not dispatched"
    );
    let reaped = store
        .expire_queued(paddock_proto::now_ms(), 60_000)
        .await
        .unwrap();
    assert_eq!(reaped.len(), 1);
    let row = store.get_task(&org.id, &id).await.unwrap().unwrap();
    assert_eq!(
        (row.state, row.error_code.as_deref()),
        (TaskState::Failed, Some("QUEUE_TIMEOUT"))
    );
}

async fn cancel_queued_and_running(store: Store) {
    let org = store.create_org("acme").await.unwrap();
    let q = store
        .insert_task(&new_task(&org.id, shell(&["true"])))
        .await
        .unwrap();
    let (state, _, _) = store
        .cancel_task(&org.id, &q, 60_000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state, TaskState::Canceled);
    assert!(
        store
            .cancel_task(&org.id, &q, 60_000)
            .await
            .unwrap()
            .is_none(),
        "already finished"
    );
    let r = store
        .insert_task(&new_task(&org.id, shell(&["true"])))
        .await
        .unwrap();
    let a = AgentView::plain();
    store.claim_tasks(&a.req(&org.id, "a1", 1)).await.unwrap();
    let other = store.create_org("other").await.unwrap();
    assert!(
        store
            .cancel_task(&other.id, &r, 60_000)
            .await
            .unwrap()
            .is_none(),
        "cross-org cancel"
    );
    let (state, agent, attempt) = store
        .cancel_task(&org.id, &r, 60_000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (state, agent.as_deref(), attempt),
        (TaskState::Running, Some("a1"), 1)
    );
    // A canceled task whose agent is lost is failed, not re-dispatched.
    let far = paddock_proto::now_ms() + 3_600_000;
    let (failed, requeued) = store.expire_leases(far, 60_000, far).await.unwrap();
    assert_eq!((failed.len(), requeued.len()), (1, 0));
}

async fn results_expire_after_ttl(store: Store) {
    let org = store.create_org("acme").await.unwrap();
    let id = store
        .insert_task(&new_task(&org.id, shell(&["true"])))
        .await
        .unwrap();
    let keep = store
        .insert_task(&new_task(&org.id, shell(&["true"])))
        .await
        .unwrap();
    let a = AgentView::plain();
    store.claim_tasks(&a.req(&org.id, "a1", 2)).await.unwrap();
    store.append_output(&id, 1, 1, "stdout", "x").await.unwrap();
    store
        .add_event(&id, 1, "started", &serde_json::json!({}))
        .await
        .unwrap();
    assert!(
        store
            .complete_task(
                &org.id,
                "a1",
                &result(&id, 1, ResultStatus::Succeeded, 0),
                1_000
            )
            .await
            .unwrap()
    );
    assert!(
        store
            .complete_task(
                &org.id,
                "a1",
                &result(&keep, 1, ResultStatus::Succeeded, 0),
                3_600_000
            )
            .await
            .unwrap()
    );
    assert_eq!(
        store
            .delete_expired_results(paddock_proto::now_ms())
            .await
            .unwrap(),
        0,
        "not yet expired"
    );
    assert_eq!(
        store
            .delete_expired_results(paddock_proto::now_ms() + 5_000)
            .await
            .unwrap(),
        1
    );
    assert!(store.get_task(&org.id, &id).await.unwrap().is_none());
    assert!(store.read_output(&id, 1, 0, 10).await.unwrap().is_empty());
    assert!(store.list_events(&id).await.unwrap().is_empty());
    assert!(store.get_task(&org.id, &keep).await.unwrap().is_some());
}

async fn output_and_events(store: Store) {
    let org = store.create_org("acme").await.unwrap();
    let id = store
        .insert_task(&new_task(&org.id, shell(&["true"])))
        .await
        .unwrap();
    for (seq, s, d) in [
        (2, "stderr", "b"),
        (1, "stdout", "a"),
        (2, "stderr", "dup"),
        (3, "stdout", "c"),
    ] {
        store.append_output(&id, 1, seq, s, d).await.unwrap();
    }
    let out = store.read_output(&id, 1, 0, 10).await.unwrap();
    assert_eq!(
        out.iter()
            .map(|o| (o.seq, o.data.as_str()))
            .collect::<Vec<_>>(),
        vec![(1, "a"), (2, "b"), (3, "c")]
    );
    assert_eq!(store.read_output(&id, 1, 2, 10).await.unwrap().len(), 1);
    assert!(store.read_output(&id, 2, 0, 10).await.unwrap().is_empty());
    store
        .add_event(&id, 1, "dispatched", &serde_json::json!({"agentId": "a1"}))
        .await
        .unwrap();
    store
        .add_event(&id, 1, "started", &serde_json::json!({"pid": 7}))
        .await
        .unwrap();
    let ev = store.list_events(&id).await.unwrap();
    assert_eq!(
        ev.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
        vec!["dispatched", "started"]
    );
    assert_eq!(ev[1].payload["pid"], 7);
    let counts = store.count_tasks_by_state().await.unwrap();
    assert_eq!(counts.len(), 1);
    assert_eq!((counts[0].state, counts[0].count), (TaskState::Queued, 1));
    assert_eq!(
        store.orgs_with_queued_tasks().await.unwrap(),
        vec![org.id.clone()]
    );
    // The dispatcher's probe: only the orgs asked about, only those with queued work.
    let idle = store.create_org("idle").await.unwrap();
    assert_eq!(
        store
            .orgs_with_queued_among(&[idle.id.as_str(), org.id.as_str(), "nope"])
            .await
            .unwrap(),
        vec![org.id.clone()]
    );
    assert!(
        store
            .orgs_with_queued_among(&[idle.id.as_str()])
            .await
            .unwrap()
            .is_empty()
    );
    assert!(store.orgs_with_queued_among(&[]).await.unwrap().is_empty());
    let many: Vec<String> = (0..450).map(|i| format!("org-{i}")).collect();
    let mut ask: Vec<&str> = many.iter().map(String::as_str).collect();
    ask.push(&org.id);
    assert_eq!(
        store.orgs_with_queued_among(&ask).await.unwrap(),
        vec![org.id.clone()]
    );
    // A batch of events in one statement: each task gets its own, with its attempt.
    let other = store
        .insert_task(&new_task(&org.id, shell(&["true"])))
        .await
        .unwrap();
    store
        .add_events(&[], "dispatched", &serde_json::json!({}))
        .await
        .unwrap();
    store
        .add_events(
            &[(id.as_str(), 2), (other.as_str(), 1)],
            "dispatched",
            &serde_json::json!({"agentId": "a2"}),
        )
        .await
        .unwrap();
    let ev = store.list_events(&id).await.unwrap();
    assert_eq!(ev.len(), 3);
    assert_eq!((ev[2].name.as_str(), ev[2].attempt), ("dispatched", 2));
    assert_eq!(ev[2].payload["agentId"], "a2");
    let ev = store.list_events(&other).await.unwrap();
    assert_eq!(ev.len(), 1);
    assert_eq!((ev[0].name.as_str(), ev[0].attempt), ("dispatched", 1));
}

async fn concurrent_claims_never_double_dispatch(store: Store) {
    let org = store.create_org("acme").await.unwrap();
    for i in 0..60 {
        store
            .insert_task(&new_task(&org.id, shell(&["echo", &i.to_string()])))
            .await
            .unwrap();
    }
    let mut handles = Vec::new();
    for w in 0..4 {
        let store = store.clone();
        let org = org.id.clone();
        handles.push(tokio::spawn(async move {
            let a = AgentView::plain();
            let agent = format!("w{w}");
            let mut mine = Vec::new();
            loop {
                let got = store.claim_tasks(&a.req(&org, &agent, 3)).await.unwrap();
                if got.is_empty() {
                    break;
                }
                mine.extend(got.into_iter().map(|c| c.id));
            }
            mine
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.unwrap());
    }
    let unique: std::collections::HashSet<_> = all.iter().collect();
    assert_eq!(all.len(), 60, "every task claimed");
    assert_eq!(unique.len(), 60, "no task claimed twice");
}

async fn reconnect_rebinds_running_tasks(store: Store) {
    let org = store.create_org("acme").await.unwrap();
    let id = store
        .insert_task(&new_task(&org.id, shell(&["true"])))
        .await
        .unwrap();
    let a = AgentView::plain();
    store.claim_tasks(&a.req(&org.id, "a1", 1)).await.unwrap();
    let far = paddock_proto::now_ms() + 3_600_000;
    assert!(store.rebind_task(&org.id, &id, 1, "a1", far).await.unwrap());
    assert!(
        !store.rebind_task(&org.id, &id, 2, "a1", far).await.unwrap(),
        "wrong attempt"
    );
    let other = store.create_org("other").await.unwrap();
    assert!(
        !store
            .rebind_task(&other.id, &id, 1, "a1", far)
            .await
            .unwrap(),
        "wrong org"
    );
    // Re-queued while the agent was away: taken back, not run twice.
    store.expire_leases(far + 1, 60_000, 0).await.unwrap();
    assert_eq!(
        store.get_task(&org.id, &id).await.unwrap().unwrap().state,
        TaskState::Queued
    );
    assert!(
        store
            .rebind_task(&org.id, &id, 1, "a1", far + 60_000)
            .await
            .unwrap()
    );
    let row = store.get_task(&org.id, &id).await.unwrap().unwrap();
    assert_eq!(
        (row.state, row.agent_id.as_deref()),
        (TaskState::Running, Some("a1"))
    );
    assert!(
        !store.release_claim(&id, 1).await.unwrap(),
        "release only undoes a fresh dispatch"
    );
}

async fn migrations_are_idempotent(store: Store) {
    // Connecting again to the same database re-runs the migrator, which must be a no-op.
    let org = store.create_org("acme").await.unwrap();
    store.migrate_again_for_tests().await.unwrap();
    assert!(store.get_org(&org.id).await.unwrap().is_some());
}

async fn reconnect_detaches_unlisted_tasks(store: Store) {
    let org = store.create_org("acme").await.unwrap();
    let kept = store
        .insert_task(&new_task(&org.id, shell(&["a"])))
        .await
        .unwrap();
    let lost = store
        .insert_task(&new_task(&org.id, shell(&["b"])))
        .await
        .unwrap();
    let a = AgentView::plain();
    assert_eq!(
        store
            .claim_tasks(&a.req(&org.id, "a1", 2))
            .await
            .unwrap()
            .len(),
        2
    );
    // The agent reconnects listing only `kept`: `lost` (its dispatch never arrived) is detached.
    // A task dispatched after the new connection's hello is not one it forgot.
    let before_claim = paddock_proto::now_ms() - 60_000;
    assert_eq!(
        store
            .detach_unlisted_tasks(&org.id, "a1", std::slice::from_ref(&kept), before_claim)
            .await
            .unwrap(),
        0
    );
    let n = store
        .detach_unlisted_tasks(
            &org.id,
            "a1",
            std::slice::from_ref(&kept),
            paddock_proto::now_ms() + 1,
        )
        .await
        .unwrap();
    assert_eq!(n, 1);
    // Presence no longer renews it...
    store
        .touch_agents(
            &["a1".to_string()],
            paddock_proto::now_ms(),
            paddock_proto::now_ms() + 60_000,
        )
        .await
        .unwrap();
    // ...so the reaper re-queues it at once, while `kept` keeps its lease.
    let (failed, requeued) = store
        .expire_leases(paddock_proto::now_ms(), 60_000, 0)
        .await
        .unwrap();
    assert!(failed.is_empty());
    assert_eq!(
        requeued.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        vec![lost.as_str()]
    );
    assert_eq!(
        store.get_task(&org.id, &kept).await.unwrap().unwrap().state,
        TaskState::Dispatched
    );
    // Listing nothing detaches everything the agent held.
    assert_eq!(
        store
            .detach_unlisted_tasks(&org.id, "a1", &[], paddock_proto::now_ms() + 1)
            .await
            .unwrap(),
        1
    );
    // Another agent of the org cannot take over a task by listing it.
    store
        .insert_task(&new_task(&org.id, shell(&["c"])))
        .await
        .unwrap();
    let t = store
        .claim_tasks(&a.req(&org.id, "a2", 1))
        .await
        .unwrap()
        .remove(0);
    let far = paddock_proto::now_ms() + 60_000;
    assert!(
        !store
            .rebind_task(&org.id, &t.id, t.attempt, "intruder", far)
            .await
            .unwrap()
    );
    assert!(
        store
            .rebind_task(&org.id, &t.id, t.attempt, "a2", far)
            .await
            .unwrap()
    );
}

async fn hand_backs_requeue_with_or_without_the_attempt(store: Store) {
    let org = store.create_org("acme").await.unwrap();
    let id = store
        .insert_task(&new_task(&org.id, shell(&["a"])))
        .await
        .unwrap();
    let a = AgentView::plain();
    let far = paddock_proto::now_ms() + 3_600_000;
    store.claim_tasks(&a.req(&org.id, "a1", 1)).await.unwrap();
    assert!(
        !store
            .hand_back_task(&org.id, &id, 1, "other", false, far)
            .await
            .unwrap(),
        "only the holder hands back"
    );
    // Busy refusal: the attempt never started and is given back.
    assert!(
        store
            .hand_back_task(&org.id, &id, 1, "a1", false, far)
            .await
            .unwrap()
    );
    let row = store.get_task(&org.id, &id).await.unwrap().unwrap();
    assert_eq!((row.state, row.attempt), (TaskState::Queued, 0));
    // Shutdown hand-back: the attempt counts, the queue deadline is pushed out.
    store.claim_tasks(&a.req(&org.id, "a1", 1)).await.unwrap();
    assert!(
        store
            .hand_back_task(&org.id, &id, 1, "a1", true, far)
            .await
            .unwrap()
    );
    let row = store.get_task(&org.id, &id).await.unwrap().unwrap();
    assert_eq!((row.state, row.attempt), (TaskState::Queued, 1));
    assert!(
        store
            .expire_queued(far - 1_000, 60_000)
            .await
            .unwrap()
            .is_empty(),
        "deadline extended"
    );
    // A canceled task whose agent is lost ends canceled, not failed.
    let c = store
        .claim_tasks(&a.req(&org.id, "a1", 1))
        .await
        .unwrap()
        .remove(0);
    store.cancel_task(&org.id, &c.id, 60_000).await.unwrap();
    store.expire_leases(far + 1, 60_000, 0).await.unwrap();
    let row = store.get_task(&org.id, &id).await.unwrap().unwrap();
    assert_eq!(
        (row.state, row.error_code.as_deref()),
        (TaskState::Canceled, Some("TASK_CANCELED"))
    );
}

mod instances {
    //! Instances and pools (issue 4), on both databases.
    use super::*;
    use paddock_store::{BootstrapDecision, InstanceStatus, NewPool};

    fn pool_spec<'a>(name: &'a str, labels: &'a [String], max: u32, max_use: u32) -> NewPool<'a> {
        NewPool {
            name,
            provider: "process",
            labels,
            min: 1,
            max,
            target: None,
            max_use,
            boot_deadline_ms: 60_000,
        }
    }

    fn instance_claim<'a>(
        org: &'a str,
        agent: &'a str,
        tags: &'a [String],
        kinds: &'a [String],
    ) -> ClaimRequest<'a> {
        ClaimRequest {
            org_id: org,
            agent_id: agent,
            tags,
            kinds,
            backends: &[],
            limit: 4,
            lease_until: paddock_proto::now_ms() + 30_000,
            org_max_inflight: None,
            now: paddock_proto::now_ms(),
            instance: true,
        }
    }

    pub(super) async fn pools_upsert_and_cap_live_instances(store: Store) {
        let org = store.create_org("acme").await.unwrap();
        let labels = strings(&["ci"]);
        let pool = store
            .upsert_pool(&org.id, &pool_spec("ci", &labels, 3, 1))
            .await
            .unwrap();
        assert_eq!((pool.min, pool.max, pool.max_use), (1, 3, 1));
        let again = store
            .upsert_pool(&org.id, &pool_spec("ci", &labels, 3, 0))
            .await
            .unwrap();
        assert_eq!(again.id, pool.id, "upsert keeps the pool's id");
        assert_eq!(again.max_use, 0);
        assert_eq!(store.list_pools(&org.id).await.unwrap().len(), 1);

        // Eight concurrent creations against a ceiling of three.
        let mut handles = Vec::new();
        for _ in 0..8 {
            let store = store.clone();
            let pool = again.clone();
            handles.push(tokio::spawn(async move {
                store.create_pool_instance(&pool).await.unwrap()
            }));
        }
        let mut ok = Vec::new();
        let mut full = 0;
        for h in handles {
            match h.await.unwrap() {
                Ok(inst) => ok.push(inst),
                Err(e) => {
                    assert_eq!(e.max, 3);
                    full += 1;
                }
            }
        }
        assert_eq!((ok.len(), full), (3, 5), "exactly max instances created");
        let inst = &ok[0];
        assert_eq!(inst.status, InstanceStatus::Starting);
        assert_eq!(inst.mode, "pool");
        let agent = store.get_agent(&org.id, &inst.id).await.unwrap().unwrap();
        assert_eq!(agent.pool, "instance");
        assert!(agent.tags.contains(&"ci".to_string()));
        assert!(agent.tags.contains(&"pool:ci".to_string()));
        assert!(agent.tags.contains(&format!("instance:{}", inst.id)));
        // The agent row's token hash can never be matched by a presented token.
        assert!(
            store
                .authenticate_agent(&format!("{}.instance:{}", org.id, inst.id))
                .await
                .unwrap()
                .is_none()
        );

        // A terminated instance frees its slot.
        store
            .deregister_instance(&org.id, &inst.id)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let t = store
            .terminate_instance(&org.id, &inst.id, None)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(t.status, InstanceStatus::Terminated);
        assert!(t.terminated_at.is_some());
        let agent = store.get_agent(&org.id, &inst.id).await.unwrap().unwrap();
        assert!(
            agent.revoked_at.is_some(),
            "a destroyed instance's agent is revoked"
        );
        assert!(store.create_pool_instance(&again).await.unwrap().is_ok());
        assert!(store.create_pool_instance(&again).await.unwrap().is_err());
        assert_eq!(
            store
                .list_instances(&org.id, Some(&again.id), false)
                .await
                .unwrap()
                .len(),
            3
        );
        assert_eq!(
            store
                .list_instances(&org.id, Some(&again.id), true)
                .await
                .unwrap()
                .len(),
            4
        );
        // Another org sees none of them.
        let other = store.create_org("other").await.unwrap();
        assert!(
            store
                .get_instance(&other.id, &ok[1].id)
                .await
                .unwrap()
                .is_none()
        );
        assert!(
            store
                .list_instances(&other.id, None, true)
                .await
                .unwrap()
                .is_empty()
        );
    }

    pub(super) async fn user_instance_bootstrap_attempts_cooldown_and_failure(store: Store) {
        let org = store.create_org("acme").await.unwrap();
        let inst = store
            .ensure_user_instance(&org.id, "u1", "command")
            .await
            .unwrap();
        let same = store
            .ensure_user_instance(&org.id, "u1", "command")
            .await
            .unwrap();
        assert_eq!(inst.id, same.id, "one live instance per user");
        assert_eq!(inst.status, InstanceStatus::Starting);
        let now = paddock_proto::now_ms();
        let cooldown = 30_000;

        assert_eq!(
            store
                .begin_bootstrap(&inst.id, now, cooldown, 3, false)
                .await
                .unwrap(),
            BootstrapDecision::Triggered { attempt: 1 }
        );
        // In flight: no second trigger.
        assert!(matches!(
            store
                .begin_bootstrap(&inst.id, now + 10, cooldown, 3, false)
                .await
                .unwrap(),
            BootstrapDecision::Wait { .. }
        ));
        let failed = store
            .bootstrap_failed(&inst.id, 1, "exit 1: boom", 3)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(failed.status, InstanceStatus::Starting);
        assert_eq!(failed.last_error.as_deref(), Some("exit 1: boom"));
        // A stale attempt's failure is not recorded twice.
        assert!(
            store
                .bootstrap_failed(&inst.id, 1, "again", 3)
                .await
                .unwrap()
                .is_none()
        );
        // Inside the cooldown: wait, and for how long.
        match store
            .begin_bootstrap(&inst.id, now + 10_000, cooldown, 3, false)
            .await
            .unwrap()
        {
            BootstrapDecision::Wait { retry_after_ms } => assert_eq!(retry_after_ms, 20_000),
            other => panic!("expected Wait, got {other:?}"),
        }
        for attempt in 2..=3 {
            let at = now + i64::from(attempt) * 40_000;
            assert_eq!(
                store
                    .begin_bootstrap(&inst.id, at, cooldown, 3, false)
                    .await
                    .unwrap(),
                BootstrapDecision::Triggered { attempt }
            );
            store
                .bootstrap_failed(&inst.id, attempt, "exit 1", 3)
                .await
                .unwrap()
                .unwrap();
        }
        let dead = store.find_instance(&inst.id).await.unwrap().unwrap();
        assert_eq!(dead.status, InstanceStatus::Failed);
        assert_eq!(dead.bootstrap_attempts, 3);
        assert_eq!(
            store
                .begin_bootstrap(&inst.id, now + 999_000, cooldown, 3, false)
                .await
                .unwrap(),
            BootstrapDecision::Failed
        );
        // Rebootstrap bypasses cooldown and the spent attempts.
        assert_eq!(
            store
                .begin_bootstrap(&inst.id, now + 999_001, cooldown, 3, true)
                .await
                .unwrap(),
            BootstrapDecision::Triggered { attempt: 1 }
        );
        let ready = store
            .instance_connected(&inst.id, now + 999_100)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ready.status, InstanceStatus::Ready);
        assert_eq!(ready.last_error, None);
        assert_eq!(ready.ready_at, Some(now + 999_100));
        assert_eq!(
            store
                .begin_bootstrap(&inst.id, now + 999_200, 0, 3, false)
                .await
                .unwrap(),
            BootstrapDecision::Ready
        );
        store
            .instance_disconnected(&inst.id, now + 999_300)
            .await
            .unwrap();
        let gone = store.find_instance(&inst.id).await.unwrap().unwrap();
        assert_eq!(gone.status, InstanceStatus::Disconnected);
        // A disconnected instance inside the cooldown is not re-triggered...
        assert!(matches!(
            store
                .begin_bootstrap(&inst.id, now + 999_400, cooldown, 3, false)
                .await
                .unwrap(),
            BootstrapDecision::Wait { .. }
        ));
        // ...and after it, it is, once, whatever the number of concurrent callers.
        let mut handles = Vec::new();
        for _ in 0..8 {
            let store = store.clone();
            let id = inst.id.clone();
            handles.push(tokio::spawn(async move {
                store
                    .begin_bootstrap(&id, now + 1_100_000, cooldown, 3, false)
                    .await
                    .unwrap()
            }));
        }
        let mut triggered = 0;
        for h in handles {
            if matches!(
                h.await.unwrap(),
                BootstrapDecision::Triggered { attempt: 2 }
            ) {
                triggered += 1;
            }
        }
        assert_eq!(triggered, 1, "exactly one caller runs the bootstrap");
        // Terminated: a new user instance can be made, and the old token cannot connect.
        store
            .terminate_instance(&org.id, &inst.id, Some("stopped"))
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(
            store
                .instance_connected(&inst.id, now)
                .await
                .unwrap()
                .is_none()
        );
        let fresh = store
            .ensure_user_instance(&org.id, "u1", "command")
            .await
            .unwrap();
        assert_ne!(fresh.id, inst.id);
    }

    pub(super) async fn instance_claims_are_targeted_gated_and_counted(store: Store) {
        let org = store.create_org("acme").await.unwrap();
        let labels = strings(&["ci"]);
        let pool = store
            .upsert_pool(&org.id, &pool_spec("ci", &labels, 4, 1))
            .await
            .unwrap();
        let inst = store.create_pool_instance(&pool).await.unwrap().unwrap();
        let tags = pool.instance_tags(&inst.id);
        let kinds = strings(&["agent.execute"]);
        let untargeted = store
            .insert_task(&new_task(&org.id, shell(&["true"])))
            .await
            .unwrap();
        let mut spec = shell(&["true"]);
        spec.selector = Some(Selector {
            tag: Some("ci".into()),
            group: None,
            instance: None,
        });
        let t1 = store
            .insert_task(&new_task(&org.id, spec.clone()))
            .await
            .unwrap();
        let t2 = store
            .insert_task(&new_task(&org.id, spec.clone()))
            .await
            .unwrap();
        assert_eq!(
            store
                .pool_queued_demand(&pool, paddock_proto::now_ms())
                .await
                .unwrap(),
            2
        );

        // Not connected yet (`starting`): nothing is claimed.
        let req = instance_claim(&org.id, &inst.id, &tags, &kinds);
        assert!(store.claim_tasks(&req).await.unwrap().is_empty());
        store
            .instance_connected(&inst.id, paddock_proto::now_ms())
            .await
            .unwrap()
            .unwrap();
        // Ready: one task (max_use 1), and only a targeted one.
        let got = store.claim_tasks(&req).await.unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].id, t1);
        let busy = store.find_instance(&inst.id).await.unwrap().unwrap();
        assert_eq!((busy.status, busy.uses), (InstanceStatus::Busy, 1));
        assert!(
            store.claim_tasks(&req).await.unwrap().is_empty(),
            "max_use reached"
        );
        // Busy: cannot be deregistered or terminated.
        assert_eq!(
            store
                .deregister_instance(&org.id, &inst.id)
                .await
                .unwrap()
                .unwrap()
                .unwrap_err(),
            InstanceStatus::Busy
        );
        assert_eq!(
            store
                .terminate_instance(&org.id, &inst.id, None)
                .await
                .unwrap()
                .unwrap()
                .unwrap_err(),
            InstanceStatus::Busy
        );
        assert!(
            store
                .complete_task(
                    &org.id,
                    &inst.id,
                    &result(&t1, 1, ResultStatus::Succeeded, 0),
                    60_000
                )
                .await
                .unwrap()
        );
        assert_eq!(
            store.instance_task_finished(&inst.id).await.unwrap(),
            Some(InstanceStatus::Draining),
            "one-shot instance drains after its task"
        );
        assert!(store.claim_tasks(&req).await.unwrap().is_empty());

        // A reusable instance goes back to ready; a deregistered one takes nothing.
        let reusable = store
            .upsert_pool(&org.id, &pool_spec("ci", &labels, 4, 0))
            .await
            .unwrap();
        let inst2 = store
            .create_pool_instance(&reusable)
            .await
            .unwrap()
            .unwrap();
        let tags2 = reusable.instance_tags(&inst2.id);
        let req2 = instance_claim(&org.id, &inst2.id, &tags2, &kinds);
        store
            .instance_connected(&inst2.id, paddock_proto::now_ms())
            .await
            .unwrap()
            .unwrap();
        let got = store.claim_tasks(&req2).await.unwrap();
        assert_eq!(
            got.iter().map(|c| c.id.clone()).collect::<Vec<_>>(),
            vec![t2.clone()]
        );
        store
            .complete_task(
                &org.id,
                &inst2.id,
                &result(&t2, 1, ResultStatus::Succeeded, 0),
                60_000,
            )
            .await
            .unwrap();
        assert_eq!(
            store.instance_task_finished(&inst2.id).await.unwrap(),
            Some(InstanceStatus::Ready)
        );
        let t3 = store.insert_task(&new_task(&org.id, spec)).await.unwrap();
        store
            .deregister_instance(&org.id, &inst2.id)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(
            store.claim_tasks(&req2).await.unwrap().is_empty(),
            "draining takes no work"
        );
        let queued = store.get_task(&org.id, &t3).await.unwrap().unwrap();
        assert_eq!(queued.state, TaskState::Queued);
        let untouched = store.get_task(&org.id, &untargeted).await.unwrap().unwrap();
        assert_eq!(
            untouched.state,
            TaskState::Queued,
            "instances never take untargeted work"
        );
    }

    pub(super) async fn gateway_secret_is_shared_and_stable(store: Store) {
        let a = store.gateway_secret("vm-token").await.unwrap();
        let b = store.gateway_secret("vm-token").await.unwrap();
        let c = store.gateway_secret("other").await.unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.len() >= 32);
    }
}
use instances::{
    gateway_secret_is_shared_and_stable, instance_claims_are_targeted_gated_and_counted,
    pools_upsert_and_cap_live_instances, user_instance_bootstrap_attempts_cooldown_and_failure,
};

async fn batched_inserts_keep_order_and_are_all_or_none(store: Store) {
    let org = store.create_org("acme").await.unwrap();
    // More than one multi-row statement's worth, so the transaction path runs.
    let n = paddock_store::INSERT_CHUNK + 44;
    let tasks: Vec<NewTask> = (0..n)
        .map(|i| new_task(&org.id, shell(&["echo", &i.to_string()])))
        .collect();
    let ids = store.insert_tasks(&tasks).await.unwrap();
    assert_eq!(ids.len(), n);
    for i in [0, paddock_store::INSERT_CHUNK, n - 1] {
        let t = store.get_task(&org.id, &ids[i]).await.unwrap().unwrap();
        assert_eq!(t.state, TaskState::Queued);
        assert_eq!(
            t.spec.shell.unwrap().argv,
            strings(&["echo", &i.to_string()])
        );
    }
    // Ids sort in submission order.
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(sorted, ids);

    // A caller-chosen id is kept.
    let mut chosen = new_task(&org.id, shell(&["true"]));
    let id = paddock_store::new_task_id();
    chosen.id = Some(id.clone());
    assert_eq!(store.insert_task(&chosen).await.unwrap(), id);

    // A duplicate id in the second statement: the whole batch is refused, the first
    // statement's rows included.
    let before = store.list_tasks(&org.id, None, 500).await.unwrap().len();
    let mut bad: Vec<NewTask> = (0..n)
        .map(|_| new_task(&org.id, shell(&["true"])))
        .collect();
    bad[n - 1].id = Some(id.clone());
    assert!(store.insert_tasks(&bad).await.is_err());
    assert_eq!(
        store.list_tasks(&org.id, None, 500).await.unwrap().len(),
        before
    );
    assert!(store.insert_tasks(&[]).await.unwrap().is_empty());
}

/// `sqlite::memory:` is one private database that every connection of the store sees (the
/// writer's two and the readers), gone with the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_memory_is_one_database_for_writer_and_readers() {
    let store = Store::connect("sqlite::memory:").await.unwrap();
    let org = store.create_org("acme").await.unwrap();
    let id = store
        .insert_task(&new_task(&org.id, shell(&["true"])))
        .await
        .unwrap();
    // Read through the readers.
    let task = store.get_task(&org.id, &id).await.unwrap().unwrap();
    assert_eq!(task.state, TaskState::Queued);
    let a = AgentView::plain();
    let got = store.claim_tasks(&a.req(&org.id, "a1", 1)).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(
        store.get_task(&org.id, &id).await.unwrap().unwrap().state,
        TaskState::Dispatched
    );
}

/// New tasks and the claims for them in one call: a claim sees what was queued before the
/// new tasks (oldest first) and what the claims before it took; a batch that cannot be stored
/// leaves nothing behind (on SQLite the claims are undone with it).
async fn insert_and_claim_take_older_work_first_and_all_or_nothing(store: Store) {
    let org = store.create_org("acme").await.unwrap();
    let older = insert_echo_tasks(&store, &org.id, 1).await;
    let a = AgentView::plain();
    let new: Vec<NewTask> = (0..3)
        .map(|i| new_task(&org.id, shell(&["echo", &format!("n{i}")])))
        .collect();
    let claims = [a.req(&org.id, "a1", 2), a.req(&org.id, "a2", 5)];
    let mut handed = None;
    let ids = store
        .insert_tasks_and_claim(&new, &claims, |c, m| handed = Some((c, m)))
        .await
        .unwrap();
    let (claimed, more) = handed.expect("the claims are handed over");
    assert_eq!(ids.len(), 3);
    // a1 filled its limit, but a2 took what was left: neither may want more.
    assert_eq!(more, vec![false, false]);
    let got: Vec<Vec<&str>> = claimed
        .iter()
        .map(|c| c.iter().map(|t| t.id.as_str()).collect())
        .collect();
    assert_eq!(
        got,
        vec![
            vec![older[0].as_str(), ids[0].as_str()],
            vec![ids[1].as_str(), ids[2].as_str()],
        ],
        "the first claim takes the oldest two, the second the rest"
    );
    for (agent, tasks) in [("a1", &claimed[0]), ("a2", &claimed[1])] {
        for t in tasks {
            assert_eq!(t.attempt, 1);
            let row = store.get_task(&org.id, &t.id).await.unwrap().unwrap();
            assert_eq!(row.state, TaskState::Dispatched);
            assert_eq!(row.agent_id.as_deref(), Some(agent));
            let events = store.list_events(&t.id).await.unwrap();
            assert_eq!(events.len(), 1, "{events:?}");
            assert_eq!(events[0].payload, serde_json::json!({ "agentId": agent }));
        }
    }
    // No claims: a plain insert.
    let mut handed = None;
    let more = store
        .insert_tasks_and_claim(&[new_task(&org.id, shell(&["true"]))], &[], |c, m| {
            handed = Some((c, m));
        })
        .await
        .unwrap();
    assert_eq!(handed, Some((vec![], vec![])));
    let queued = store
        .list_tasks(&org.id, Some(TaskState::Queued), 10)
        .await
        .unwrap();
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].id, more[0]);
    // A taken id fails the batch: neither the other task nor the claim of the queued one
    // stays (SQLite: one transaction; PostgreSQL: the insert fails before any claim).
    let mut dup = new_task(&org.id, shell(&["true"]));
    dup.id = Some(ids[0].clone());
    let batch = [new_task(&org.id, shell(&["echo", "lost"])), dup];
    let claims = [a.req(&org.id, "a3", 5)];
    let mut called = false;
    assert!(
        store
            .insert_tasks_and_claim(&batch, &claims, |_, _| called = true)
            .await
            .is_err()
    );
    assert!(
        !called,
        "nothing is handed over from a batch that was not stored"
    );
    let queued = store
        .list_tasks(&org.id, Some(TaskState::Queued), 10)
        .await
        .unwrap();
    assert_eq!(
        queued.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(),
        vec![more[0].as_str()],
        "nothing of the failed batch is stored, and the queued task is not claimed"
    );
    // Two new tasks, one slot: the claim takes the queued one and work is left (the org's
    // newest task), so the agent may want more.
    let two: Vec<NewTask> = (0..2)
        .map(|_| new_task(&org.id, shell(&["true"])))
        .collect();
    let mut handed = None;
    store
        .insert_tasks_and_claim(&two, &[a.req(&org.id, "a4", 1)], |c, m| {
            handed = Some((c, m));
        })
        .await
        .unwrap();
    let (claimed, wants) = handed.expect("the claim is handed over");
    assert_eq!(claimed[0].len(), 1);
    assert_eq!(claimed[0][0].id, more[0], "the older queued task first");
    assert_eq!(wants, vec![true]);
    // Instance claims go through claim_tasks.
    let mut inst = a.req(&org.id, "i1", 1);
    inst.instance = true;
    assert!(
        store
            .insert_tasks_and_claim(&[], &[inst], |_, _| {})
            .await
            .is_err()
    );
}

/// The metrics' count by state and the listing by state read one partial index per group of
/// states (queued, in flight, finished): every state is counted and listed, each task once.
async fn counts_by_state_cover_every_state(store: Store) {
    let org = store.create_org("acme").await.unwrap();
    let ids = insert_echo_tasks(&store, &org.id, 6).await;
    let a = AgentView::plain();
    assert_eq!(
        store
            .claim_tasks(&a.req(&org.id, "a1", 4))
            .await
            .unwrap()
            .len(),
        4
    );
    let now = paddock_proto::now_ms();
    assert!(
        store
            .mark_task_running(&ids[1], 1, "a1", now)
            .await
            .unwrap()
    );
    for (id, status, code) in [
        (&ids[2], ResultStatus::Succeeded, 0),
        (&ids[3], ResultStatus::Failed, 1),
    ] {
        assert!(
            store
                .complete_task(&org.id, "a1", &result(id, 1, status, code), 60_000)
                .await
                .unwrap()
        );
    }
    store.cancel_task(&org.id, &ids[4], 60_000).await.unwrap();
    let mut counts: Vec<(&str, i64)> = store
        .count_tasks_by_state()
        .await
        .unwrap()
        .iter()
        .map(|c| (c.state.as_str(), c.count))
        .collect();
    counts.sort_unstable();
    assert_eq!(
        counts,
        vec![
            ("canceled", 1),
            ("dispatched", 1),
            ("failed", 1),
            ("queued", 1),
            ("running", 1),
            ("succeeded", 1),
        ]
    );
    // Listing by state reads the same partial indexes: each state's tasks, newest first.
    let newer = insert_echo_tasks(&store, &org.id, 1).await;
    for (state, want) in [
        (TaskState::Queued, vec![&newer[0], &ids[5]]),
        (TaskState::Dispatched, vec![&ids[0]]),
        (TaskState::Running, vec![&ids[1]]),
        (TaskState::Succeeded, vec![&ids[2]]),
        (TaskState::Failed, vec![&ids[3]]),
        (TaskState::Canceled, vec![&ids[4]]),
        (TaskState::TimedOut, vec![]),
    ] {
        let got = store.list_tasks(&org.id, Some(state), 10).await.unwrap();
        assert_eq!(
            got.iter().map(|t| &t.id).collect::<Vec<_>>(),
            want,
            "{state:?}"
        );
    }
}

/// A SQLite file made before migration 6 keeps its task events when it is opened: they are
/// moved into the table clustered by task, and read back in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_events_survive_their_table_being_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    {
        // The schema as migrations 1 to 5 left it, with two events of one task.
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE paddock_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL);",
        )
        .unwrap();
        for (v, sql) in [
            (1, include_str!("../migrations/0001_core.sql")),
            (2, include_str!("../migrations/0002_instances.sql")),
            (3, include_str!("../migrations/0003_bundles.sql")),
            (4, include_str!("../migrations/0004_queue_order.sql")),
            (5, include_str!("../migrations/0005_partial_indexes.sql")),
        ] {
            conn.execute_batch(sql).unwrap();
            conn.execute("INSERT INTO paddock_migrations VALUES (?1, 'old', 0)", [v])
                .unwrap();
        }
        for (id, name) in [("01-b", "started"), ("01-a", "dispatched")] {
            conn.execute(
                "INSERT INTO task_events (id, task_id, attempt, name, payload, created_at) VALUES (?1, 't1', 1, ?2, '{}', 5)",
                [id, name],
            )
            .unwrap();
        }
    }
    let store = Store::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    let events = store.list_events("t1").await.unwrap();
    assert_eq!(
        events.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
        vec!["dispatched", "started"]
    );
    store
        .add_event("t1", 1, "finished", &serde_json::json!({}))
        .await
        .unwrap();
    assert_eq!(store.list_events("t1").await.unwrap().len(), 3);
}

/// `ClaimRequest::would_take` (the gateway's pick of a free agent for a new task, in
/// memory) says yes exactly when the claim's SQL takes the task: every pair of task and
/// agent below, each in an org of its own, plus a task of another org and one past its queue
/// deadline.
async fn the_in_memory_pick_agrees_with_the_claim(store: Store) {
    let selected = |tag: Option<&str>, group: Option<&str>| {
        let mut t = shell(&["true"]);
        t.selector = Some(Selector {
            tag: tag.map(Into::into),
            group: group.map(Into::into),
            instance: None,
        });
        t
    };
    let mut docker = shell(&["true"]);
    docker.sandbox.backend = Some("docker".into());
    let mut noop = shell(&["true"]);
    noop.kind = "agent.noop".into();
    let mut gpu_docker = selected(Some("gpu"), None);
    gpu_docker.sandbox.backend = Some("docker".into());
    let tasks = [
        ("plain", shell(&["true"])),
        ("tag gpu", selected(Some("gpu"), None)),
        ("group beta", selected(None, Some("beta"))),
        ("docker", docker),
        ("noop kind", noop),
        ("gpu on docker", gpu_docker),
    ];
    let view = |tags: &[&str], kinds: &[&str], backends: &[&str]| AgentView {
        tags: strings(tags),
        kinds: strings(kinds),
        backends: strings(backends),
    };
    let agents = [
        ("plain", AgentView::plain()),
        ("gpu", view(&["gpu"], &["agent.execute"], &["host"])),
        ("beta", view(&["group:beta"], &["agent.execute"], &["host"])),
        (
            "gpu+docker",
            view(&["gpu", "x"], &["agent.execute"], &["host", "docker"]),
        ),
        ("no backends", view(&[], &["agent.execute"], &[])),
        ("no kinds", view(&[], &[], &["host"])),
        (
            "noop too",
            view(&[], &["agent.noop", "agent.execute"], &["host"]),
        ),
    ];
    let mut yes = 0;
    for (i, (tname, spec)) in tasks.iter().enumerate() {
        for (j, (aname, agent)) in agents.iter().enumerate() {
            let org = store.create_org(&format!("o{i}-{j}")).await.unwrap();
            let task = new_task(&org.id, spec.clone());
            store.insert_task(&task).await.unwrap();
            let req = agent.req(&org.id, "a1", 1);
            let took = store.claim_tasks(&req).await.unwrap().len() == 1;
            assert_eq!(req.would_take(&task), took, "task {tname}, agent {aname}");
            yes += usize::from(took);
        }
    }
    // Taken, by agent: plain 1 (plain), gpu 2, beta 2, gpu+docker 4 (all but the group's and
    // the no-op), no backends 1, no kinds 0, noop too 2.
    assert_eq!(yes, 12, "pairs taken");
    let org = store.create_org("late").await.unwrap();
    let other = store.create_org("else").await.unwrap();
    let plain = AgentView::plain();
    let mut late = new_task(&org.id, shell(&["true"]));
    late.queue_deadline_at = paddock_proto::now_ms() - 1;
    store.insert_task(&late).await.unwrap();
    let req = plain.req(&org.id, "a1", 1);
    assert!(!req.would_take(&late));
    assert!(store.claim_tasks(&req).await.unwrap().is_empty());
    let elsewhere = new_task(&other.id, shell(&["true"]));
    store.insert_task(&elsewhere).await.unwrap();
    assert!(!req.would_take(&elsewhere));
    assert!(store.claim_tasks(&req).await.unwrap().is_empty());
    // An instance's claim is never predicted (it depends on the instance's row).
    let i1 = view(&["instance:i1"], &["agent.execute"], &["host"]);
    let mut inst = i1.req(&org.id, "i1", 1);
    inst.instance = true;
    let mut targeted = shell(&["true"]);
    targeted.selector = Some(Selector {
        tag: None,
        group: None,
        instance: Some("i1".into()),
    });
    assert!(!inst.would_take(&new_task(&org.id, targeted)));
}

/// Tasks handed to agents before they are stored (SQLite): `hand` runs before any row
/// exists, then each task is stored as it was left: dispatched to its agent (attempt 1, its
/// lease, its `dispatched` event; its result is then stored) or queued. A failed insert
/// stores none of the batch. PostgreSQL refuses the call without calling `hand`.
async fn tasks_dispatched_before_they_are_stored(store: Store) {
    let org = store.create_org("acme").await.unwrap();
    let mut tasks: Vec<NewTask> = (0..3)
        .map(|i| new_task(&org.id, shell(&["echo", &i.to_string()])))
        .collect();
    // Without ids: refused before `hand`.
    let mut called = false;
    let err = store
        .insert_dispatched(&tasks, || {
            called = true;
            vec![]
        })
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Unsupported(_)), "{err}");
    assert!(!called);
    for t in &mut tasks {
        t.id = Some(paddock_store::new_task_id());
    }
    let ids: Vec<String> = tasks.iter().map(|t| t.id.clone().unwrap()).collect();
    let lease_until = paddock_proto::now_ms() + 30_000;
    let handed = |agent: &str| {
        Some(Handed {
            agent_id: agent.into(),
            lease_until,
        })
    };
    let reads = store.clone();
    let mut before = None;
    let got = store
        .insert_dispatched(&tasks, || {
            // The readers see no row yet: `hand` runs before the insert.
            before = Some(std::thread::scope(|s| {
                s.spawn(|| {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap()
                        .block_on(reads.get_task(&org.id, &ids[0]))
                        .unwrap()
                })
                .join()
                .unwrap()
            }));
            vec![handed("a1"), None, handed("a2")]
        })
        .await;
    if store.dialect() == paddock_store::Dialect::Postgres {
        assert!(matches!(got, Err(StoreError::Unsupported(_))), "{got:?}");
        assert!(before.is_none(), "hand is not called on PostgreSQL");
        assert!(store.get_task(&org.id, &ids[0]).await.unwrap().is_none());
        return;
    }
    assert_eq!(got.unwrap(), ids);
    assert_eq!(before, Some(None), "no row existed when hand ran");
    for (id, agent) in [(&ids[0], "a1"), (&ids[2], "a2")] {
        let row = store.get_task(&org.id, id).await.unwrap().unwrap();
        assert_eq!(row.state, TaskState::Dispatched);
        assert_eq!(row.agent_id.as_deref(), Some(agent));
        assert_eq!(row.attempt, 1);
        assert!(row.dispatched_at.is_some());
        let events = store.list_events(id).await.unwrap();
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].name, "dispatched");
        assert_eq!(events[0].payload, serde_json::json!({ "agentId": agent }));
    }
    let queued = store.get_task(&org.id, &ids[1]).await.unwrap().unwrap();
    assert_eq!(queued.state, TaskState::Queued);
    assert_eq!(queued.attempt, 0);
    assert!(store.list_events(&ids[1]).await.unwrap().is_empty());
    // The leases are the ones given: none has run out just before, ...
    let ttl = 60_000;
    let (failed, requeued) = store
        .expire_leases(lease_until - 1, ttl, lease_until + ttl)
        .await
        .unwrap();
    assert!(failed.is_empty() && requeued.is_empty());
    // ... the dispatched task's result is stored as any claimed one's, ...
    assert!(
        store
            .complete_task(
                &org.id,
                "a1",
                &result(&ids[0], 1, ResultStatus::Succeeded, 0),
                60_000
            )
            .await
            .unwrap()
    );
    assert_eq!(
        store
            .get_task(&org.id, &ids[0])
            .await
            .unwrap()
            .unwrap()
            .state,
        TaskState::Succeeded
    );
    // ... and the other's lease runs out after: it goes back to the queue, behind the queued
    // task, and a claim takes both.
    let (failed, requeued) = store
        .expire_leases(lease_until + 1, ttl, lease_until + ttl)
        .await
        .unwrap();
    assert!(failed.is_empty());
    assert_eq!(
        requeued.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(),
        vec![ids[2].as_str()]
    );
    let a = AgentView::plain();
    let claimed = store.claim_tasks(&a.req(&org.id, "a3", 5)).await.unwrap();
    assert_eq!(
        claimed.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
        vec![ids[1].as_str(), ids[2].as_str()]
    );
    assert_eq!(claimed[1].attempt, 2);
    // A taken id fails the whole batch, after `hand` ran.
    let mut again = new_task(&org.id, shell(&["true"]));
    again.id = Some(paddock_store::new_task_id());
    let mut dup = new_task(&org.id, shell(&["true"]));
    dup.id = Some(ids[0].clone());
    let mut called = false;
    assert!(
        store
            .insert_dispatched(&[again.clone(), dup], || {
                called = true;
                vec![handed("a1"), handed("a1")]
            })
            .await
            .is_err()
    );
    assert!(called);
    assert!(
        store
            .get_task(&org.id, again.id.as_ref().unwrap())
            .await
            .unwrap()
            .is_none(),
        "nothing of the failed batch is stored"
    );
}

/// New tasks assigned to agents are stored dispatched to them (attempt 1, their event, their
/// lease), unassigned ones queued; an assigned task is stored queued when queued work its
/// agent would claim is already waiting (work it would not claim does not count), and the
/// claim then takes the older first. A batch that fails stores nothing.
async fn assigned_tasks_are_stored_dispatched_unless_older_work_waits(store: Store) {
    let org = store.create_org("acme").await.unwrap();
    let plain = AgentView::plain();
    let tasks: Vec<NewTask> = (0..2)
        .map(|i| new_task(&org.id, shell(&["echo", &i.to_string()])))
        .collect();
    let a1 = plain.req(&org.id, "a1", 1);
    let (ids, dispatched) = store
        .insert_assigned(&tasks, &[Some(a1), None])
        .await
        .unwrap();
    assert_eq!(dispatched, vec![true, false]);
    let row = store.get_task(&org.id, &ids[0]).await.unwrap().unwrap();
    assert_eq!(row.state, TaskState::Dispatched);
    assert_eq!(row.agent_id.as_deref(), Some("a1"));
    assert_eq!(row.attempt, 1);
    let events = store.list_events(&ids[0]).await.unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].payload, serde_json::json!({ "agentId": "a1" }));
    let queued = store.get_task(&org.id, &ids[1]).await.unwrap().unwrap();
    assert_eq!(queued.state, TaskState::Queued);
    // The lease is the one given.
    let ttl = 60_000;
    let (_, requeued) = store
        .expire_leases(a1.lease_until + 1, ttl, a1.lease_until + ttl)
        .await
        .unwrap();
    assert_eq!(
        requeued.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(),
        vec![ids[0].as_str()]
    );
    // Queued work a2 would claim waits (both tasks now): the new task is queued behind it.
    let late = new_task(&org.id, shell(&["true"]));
    let (late_ids, dispatched) = store
        .insert_assigned(
            std::slice::from_ref(&late),
            &[Some(plain.req(&org.id, "a2", 1))],
        )
        .await
        .unwrap();
    assert_eq!(dispatched, vec![false]);
    let claimed = store
        .claim_tasks(&plain.req(&org.id, "a2", 5))
        .await
        .unwrap();
    assert_eq!(
        claimed.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
        vec![ids[0].as_str(), ids[1].as_str(), late_ids[0].as_str()],
        "oldest first"
    );
    // Queued work the agent would not claim (another tag) does not hold it back.
    let mut gpu = shell(&["true"]);
    gpu.selector = Some(Selector {
        tag: Some("gpu".into()),
        group: None,
        instance: None,
    });
    store.insert_task(&new_task(&org.id, gpu)).await.unwrap();
    let (lone, dispatched) = store
        .insert_assigned(
            &[new_task(&org.id, shell(&["true"]))],
            &[Some(plain.req(&org.id, "a3", 1))],
        )
        .await
        .unwrap();
    assert_eq!(dispatched, vec![true]);
    // (A lone task is one statement on PostgreSQL: the same row and event.)
    let row = store.get_task(&org.id, &lone[0]).await.unwrap().unwrap();
    assert_eq!(
        (row.state, row.agent_id.as_deref(), row.attempt),
        (TaskState::Dispatched, Some("a3"), 1)
    );
    let events = store.list_events(&lone[0]).await.unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].name, "dispatched");
    assert_eq!(events[0].payload, serde_json::json!({ "agentId": "a3" }));
    // A taken id fails the batch: nothing of it is stored.
    let mut fresh_with_id = new_task(&org.id, shell(&["echo", "lost"]));
    fresh_with_id.id = Some(paddock_store::new_task_id());
    let mut dup = new_task(&org.id, shell(&["true"]));
    dup.id = Some(ids[0].clone());
    assert!(
        store
            .insert_assigned(
                &[fresh_with_id.clone(), dup],
                &[Some(plain.req(&org.id, "a4", 1)), None]
            )
            .await
            .is_err()
    );
    assert!(
        store
            .get_task(&org.id, fresh_with_id.id.as_ref().unwrap())
            .await
            .unwrap()
            .is_none(),
        "nothing of the failed batch is stored"
    );
}
