//! Two gateway replicas sharing one PostgreSQL: the agent is connected to replica A, the
//! submitter talks to replica B. PostgreSQL only (SQLite is the single-process default).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_submitted_to_b_runs_on_agent_connected_to_a() {
    let dir = tempfile::tempdir().unwrap();
    let Some(url) = fresh_db(Db::Postgres, dir.path()).await else {
        return;
    };
    // Slow periodic sweeps (5 s) so that the prompt delivery below can only come from NOTIFY.
    let slow = [("GATEWAY_TICK_MS", "5000")];
    let a = GatewayProc::start(&url, &slow).await;
    let b = GatewayProc::start(&url, &slow).await;
    let org_a = a.create_org("acme").await;
    let org_b = Org {
        url: b.url.clone(),
        ..org_a.clone()
    };
    let agent = AgentProc::pair(&org_a, &[], &[]).await;
    assert_eq!(
        org_b.agent(&agent.id).await["connectedReplica"],
        a.replica.as_str()
    );

    // Submit-and-wait on B: B sees the live agent in the database, A dispatches it.
    let t0 = Instant::now();
    let r = org_b.post(&org_b.p("/tasks/run"), sh("echo via-a")).await;
    let elapsed = t0.elapsed();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        (r.body["state"].as_str(), r.body["agentId"].as_str()),
        (Some("succeeded"), Some(agent.id.as_str()))
    );
    assert_eq!(r.body["result"]["stdout"], "via-a\n");
    assert!(
        elapsed < Duration::from_secs(2),
        "NOTIFY should wake replica A at once, took {elapsed:?}"
    );

    // Queued submissions on B, streamed on B.
    let mut ids = Vec::new();
    for i in 0..10 {
        ids.push(org_b.submit(sh(&format!("echo {i}"))).await);
    }
    for (i, id) in ids.iter().enumerate() {
        let t = org_b.wait_done(id, Duration::from_secs(10)).await;
        assert_eq!(t["result"]["stdout"], format!("{i}\n"));
    }
    // Tags set on B reach the connection on A.
    let t = org_b
        .call(
            reqwest::Method::PUT,
            &org_b.p(&format!("/agents/{}/tags", agent.id)),
            Some(json!({"tags": ["gpu"]})),
        )
        .await;
    assert_eq!(t.status, 200);
    let r = org_b.post(&org_b.p("/tasks/run"), json!({"kind": "agent.execute", "selector": {"tag": "gpu"}, "shell": {"argv": ["true"]}})).await;
    assert_eq!(r.body["state"], "succeeded", "{r:?}");

    // Revocation on B closes the connection held by A within a second.
    let mut agent = agent;
    let t0 = Instant::now();
    let rv = org_b
        .post(&org_b.p(&format!("/agents/{}/revoke", agent.id)), json!({}))
        .await;
    assert_eq!(rv.status, 200);
    let status = agent.wait_exit(Duration::from_secs(5)).await;
    assert!(!status.success());
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "cross-replica revocation took {:?}",
        t0.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_never_dispatch_one_attempt_twice() {
    let dir = tempfile::tempdir().unwrap();
    let Some(url) = fresh_db(Db::Postgres, dir.path()).await else {
        return;
    };
    // Leases long enough that a starved machine (CI runs many suites at once) cannot expire
    // one while its agent is alive: this test is about claims, not about lease renewal.
    let slow_leases = [("GATEWAY_LEASE_MS", "15000")];
    let a = GatewayProc::start(&url, &slow_leases).await;
    let b = GatewayProc::start(&url, &slow_leases).await;
    let org_a = a.create_org("acme").await;
    let org_b = Org {
        url: b.url.clone(),
        ..org_a.clone()
    };
    let _x = AgentProc::pair(&org_a, &[], &[]).await;
    let _y = AgentProc::pair(&org_b, &[], &[]).await;
    let log = dir.path().join("runs");
    let mut ids = Vec::new();
    for i in 0..40 {
        let org = if i % 2 == 0 { &org_a } else { &org_b };
        ids.push(
            org.submit(sh(&format!(
                "echo {i} $PADDOCK_TASK_ATTEMPT >> {}",
                log.display()
            )))
            .await,
        );
    }
    for id in &ids {
        let t = org_a.wait_done(id, Duration::from_secs(20)).await;
        assert_eq!(
            (t["state"].as_str(), t["attempt"].as_u64()),
            (Some("succeeded"), Some(1))
        );
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.sort();
    lines.dedup();
    assert_eq!(text.lines().count(), 40, "each task ran exactly once");
    assert_eq!(lines.len(), 40);
    // Both replicas dispatched work (both agents were used).
    let agents: std::collections::HashSet<String> = {
        let mut s = std::collections::HashSet::new();
        for id in &ids {
            s.insert(
                org_a.task(id).await["agentId"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
        }
        s
    };
    assert_eq!(
        agents.len(),
        2,
        "work spread over the agents of both replicas"
    );
}

/// Replicas cache valid API tokens; a token revoked through A is refused by B at once (the
/// revocation travels by NOTIFY), not only when B's cache entry expires (10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_revoked_on_a_is_refused_by_b_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let Some(url) = fresh_db(Db::Postgres, dir.path()).await else {
        return;
    };
    let a = GatewayProc::start(&url, &[]).await;
    let b = GatewayProc::start(&url, &[]).await;
    let org_a = a.create_org("acme").await;
    let org_b = Org {
        url: b.url.clone(),
        ..org_a.clone()
    };
    let made = org_a
        .post(&org_a.p("/tokens"), json!({"name": "ci", "role": "member"}))
        .await;
    assert_eq!(made.status, 201, "{made:?}");
    let token = made.body["token"].as_str().unwrap().to_string();
    let token_id = made.body["id"].as_str().unwrap().to_string();
    let tasks_path = org_b.p("/tasks");
    let list_on_b = || {
        org_b.call_as(
            &token,
            Some(&org_b.id),
            reqwest::Method::GET,
            &tasks_path,
            None,
        )
    };
    // B has resolved (and cached) the token.
    assert_eq!(list_on_b().await.status, 200);
    let revoked = org_a
        .call(
            reqwest::Method::DELETE,
            &org_a.p(&format!("/tokens/{token_id}")),
            None,
        )
        .await;
    assert_eq!(revoked.status, 204, "{revoked:?}");
    let t0 = Instant::now();
    loop {
        let r = list_on_b().await;
        if r.status == 401 {
            assert_eq!(r.code(), "UNAUTHORIZED");
            break;
        }
        assert_eq!(r.status, 200, "{r:?}");
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "B still accepts the revoked token after {:?}",
            t0.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
