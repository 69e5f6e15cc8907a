//! End-to-end: the real binary as gateway and agents, on SQLite and on PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use reqwest::Method;
use serde_json::json;

on_both_databases!(
    pair_run_and_revoke,
    routing_uses_control_plane_tags_only,
    max_in_flight_and_org_quota_queue_work,
    agent_killed_mid_task_is_redispatched_once,
    agent_lost_without_attempts_left_fails_agent_lost,
    gateway_restart_mid_task_keeps_the_result,
    cross_org_access_is_denied_everywhere,
    results_are_deleted_after_ttl,
    cancel_running_task_kills_it,
    revoked_api_token_is_refused_at_once,
    batch_submission_is_all_or_none,
);

async fn setup(db: Db, env: &[(&str, &str)]) -> Option<(GatewayProc, Org, tempfile::TempDir)> {
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_db(db, dir.path()).await?;
    let gw = GatewayProc::start(&url, env).await;
    let org = gw.create_org("acme").await;
    Some((gw, org, dir))
}

async fn pair_run_and_revoke(db: Db) {
    let Some((gw, org, _d)) = setup(db, &[]).await else {
        return;
    };
    // Pairing tokens need owner/admin.
    let member = org
        .post(&org.p("/tokens"), json!({"name": "m", "role": "member"}))
        .await;
    assert_eq!(member.status, 201);
    let member_token = member.body["token"].as_str().unwrap();
    let denied = org
        .call_as(
            member_token,
            Some(&org.id),
            Method::POST,
            &org.p("/agents/pairing-tokens"),
            None,
        )
        .await;
    assert_eq!((denied.status, denied.code()), (403, "FORBIDDEN"));

    let mut agent = AgentProc::pair(&org, &["--tags", "east,group:alpha"], &[]).await;
    let creds = agent.home.path().join(".paddock/agent.json");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&creds).unwrap().permissions())
            & 0o777;
    assert_eq!(mode, 0o600, "agent.json must be 0600");
    let stored: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&creds).unwrap()).unwrap();
    assert!(
        stored["agentToken"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{}.", org.id))
    );

    let listed = org.get(&org.p("/agents")).await;
    let a = &listed.body["agents"][0];
    assert_eq!(a["status"], "online");
    assert_eq!(a["reportedTags"], json!(["east", "group:alpha"]));
    assert_eq!(
        a["tags"],
        json!([]),
        "reported tags are not control-plane tags"
    );
    assert_eq!(
        a["capabilities"]["kinds"],
        json!(["agent.execute", "bundle.run", "agent.noop"])
    );
    assert_eq!(a["capabilities"]["maxInFlight"], 10);

    // Submit-and-wait: output, exit code, env minimal.
    let r = org
        .post(&org.p("/tasks/run"), json!({"kind": "agent.execute", "shell": {"script": "echo out; echo err >&2; echo HOME=$HOME; env | grep -c GATEWAY_ || true; exit 3", "env": {"X": "1"}}}))
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["state"], "failed");
    assert_eq!(r.body["exitCode"], 3);
    let out = r.body["result"]["stdout"].as_str().unwrap();
    assert!(out.starts_with("out\nHOME="), "{out}");
    assert!(
        out.ends_with("0\n"),
        "no gateway variables leak into the task: {out}"
    );
    assert_eq!(r.body["result"]["stderr"], "err\n");
    let live = org
        .get(&org.p(&format!("/tasks/{}/output", r.body["id"].as_str().unwrap())))
        .await;
    let joined: String = live.body["chunks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["stream"] == "stdout")
        .map(|c| c["data"].as_str().unwrap())
        .collect();
    assert_eq!(joined, out, "live chunks add up to the stored stdout");

    // Host backend refuses networkMode none with its code.
    let r = org.post(&org.p("/tasks/run"), json!({"kind": "agent.execute", "shell": {"argv": ["true"]}, "sandbox": {"networkMode": "none"}})).await;
    assert_eq!(
        r.body["errorCode"], "HOST_NETWORK_MODE_UNSUPPORTED",
        "{r:?}"
    );

    // agent.noop: answered by the agent without starting anything; it takes no shell.
    let r = org
        .post(&org.p("/tasks/run"), json!({"kind": "agent.noop"}))
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body["state"], "succeeded", "{r:?}");
    assert_eq!(r.body["exitCode"], 0);
    assert_eq!(r.body["result"]["stdout"], "");
    let r = org
        .post(
            &org.p("/tasks/run"),
            json!({"kind": "agent.noop", "shell": {"argv": ["true"]}}),
        )
        .await;
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(r.body["code"], "INVALID_REQUEST", "{r:?}");

    // The pairing token was single use.
    let home2 = tempfile::tempdir().unwrap();
    let token = org.pairing_token().await;
    let pair = http()
        .post(format!("{}/v1/agents/pair", org.url))
        .json(&json!({"pairingToken": token}))
        .send()
        .await
        .unwrap();
    assert_eq!(pair.status(), 201);
    let again = http()
        .post(format!("{}/v1/agents/pair", org.url))
        .json(&json!({"pairingToken": token}))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 401);
    assert_eq!(
        again.json::<serde_json::Value>().await.unwrap()["code"],
        "PAIRING_TOKEN_USED"
    );
    drop(home2);

    // Revoke: the live connection closes within a second and the agent exits with an error.
    let t0 = Instant::now();
    let rv = org
        .post(&org.p(&format!("/agents/{}/revoke", agent.id)), json!({}))
        .await;
    assert_eq!(
        (rv.status, rv.body["status"].as_str()),
        (200, Some("revoked"))
    );
    let status = agent.wait_exit(Duration::from_secs(5)).await;
    let elapsed = t0.elapsed();
    assert!(
        elapsed < Duration::from_secs(1),
        "revocation closed the connection after {elapsed:?}"
    );
    assert!(!status.success());
    assert!(
        agent.log_text().contains("AGENT_REVOKED"),
        "{}",
        agent.log_text()
    );
    // Reconnecting with the stored (revoked) token is refused.
    agent.reconnect(&org, &[]);
    let status = agent.wait_exit(Duration::from_secs(10)).await;
    assert!(!status.success());
    // No secret reached the logs.
    let logs = gw.log_text() + &agent.log_text();
    assert!(!logs.contains(&org.token), "owner token leaked into logs");
    assert!(
        !logs.contains(stored["agentToken"].as_str().unwrap()),
        "agent token leaked into logs"
    );
    assert!(
        !logs.contains(SERVICE_TOKEN),
        "service token leaked into logs"
    );
}

async fn routing_uses_control_plane_tags_only(db: Db) {
    let Some((_gw, org, _d)) = setup(db, &[]).await else {
        return;
    };
    // The agent *reports* gpu, but has no control-plane tag.
    let a = AgentProc::pair(&org, &["--tags", "gpu"], &[]).await;
    let b = AgentProc::pair(&org, &[], &[]).await;
    let gpu = |s: &str| json!({"kind": "agent.execute", "selector": {"tag": "gpu"}, "shell": {"script": s}});
    let r = org.post(&org.p("/tasks/run"), gpu("true")).await;
    assert_eq!(
        (r.status, r.code()),
        (503, "NO_AGENT_AVAILABLE"),
        "reported tags never route"
    );
    let r = org
        .post(&org.p("/tasks?requireAgent=true"), gpu("true"))
        .await;
    assert_eq!((r.status, r.code()), (503, "NO_AGENT_AVAILABLE"));
    // A queued task waits for an eligible agent.
    let queued = org.submit(gpu("echo on-gpu")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(org.task(&queued).await["state"], "queued");
    // Control-plane tags make B eligible; the queued task goes there.
    let t = org
        .call(
            Method::PUT,
            &org.p(&format!("/agents/{}/tags", b.id)),
            Some(json!({"tags": ["gpu", "group:beta"]})),
        )
        .await;
    assert_eq!(t.status, 200, "{t:?}");
    let done = org.wait_done(&queued, Duration::from_secs(10)).await;
    assert_eq!(
        (done["state"].as_str(), done["agentId"].as_str()),
        (Some("succeeded"), Some(b.id.as_str()))
    );
    for _ in 0..4 {
        let r = org.post(&org.p("/tasks/run"), json!({"kind": "agent.execute", "selector": {"group": "beta"}, "shell": {"argv": ["true"]}})).await;
        assert_eq!(
            (r.status, r.body["agentId"].as_str()),
            (200, Some(b.id.as_str()))
        );
    }
    // Unknown backend: no agent offers it.
    let r = org.post(&org.p("/tasks/run"), json!({"kind": "agent.execute", "sandbox": {"backend": "vm"}, "shell": {"argv": ["true"]}})).await;
    assert_eq!(r.code(), "NO_AGENT_AVAILABLE");
    // Queue deadline.
    let id = org.submit(json!({"kind": "agent.execute", "selector": {"tag": "nobody"}, "shell": {"argv": ["true"]}, "queueTimeoutMs": 300})).await;
    let t = org.wait_done(&id, Duration::from_secs(10)).await;
    assert_eq!(
        (t["state"].as_str(), t["errorCode"].as_str()),
        (Some("failed"), Some("QUEUE_TIMEOUT"))
    );
    drop(a);
}

async fn max_in_flight_and_org_quota_queue_work(db: Db) {
    let Some((_gw, org, _d)) = setup(db, &[("GATEWAY_ORG_MAX_INFLIGHT", "2")]).await else {
        return;
    };
    let _a = AgentProc::pair(&org, &[], &[("PADDOCK_AGENT_MAX_IN_FLIGHT", "1")]).await;
    let _b = AgentProc::pair(&org, &[], &[("PADDOCK_AGENT_MAX_IN_FLIGHT", "5")]).await;
    let _c = AgentProc::pair(&org, &[], &[]).await;
    // Each task records its start and end; at most 2 may overlap (org cap), none is dropped.
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("spans");
    let mut ids = Vec::new();
    for i in 0..8 {
        let script = format!(
            "echo start {i} $(date +%s%N) >> {0}; sleep 0.3; echo end {i} $(date +%s%N) >> {0}",
            log.display()
        );
        ids.push(org.submit(sh(&script)).await);
    }
    for id in &ids {
        assert_eq!(
            org.wait_done(id, Duration::from_secs(30)).await["state"],
            "succeeded"
        );
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let mut events: Vec<(u128, i32)> = text
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f[2].parse().unwrap(), if f[0] == "start" { 1 } else { -1 })
        })
        .collect();
    events.sort();
    let (mut cur, mut peak) = (0, 0);
    for (_, d) in events {
        cur += d;
        peak = peak.max(cur);
    }
    assert_eq!(
        peak, 2,
        "GATEWAY_ORG_MAX_INFLIGHT=2 must cap concurrency at exactly 2 with 3 idle agents"
    );
}

async fn agent_killed_mid_task_is_redispatched_once(db: Db) {
    let Some((_gw, org, _d)) = setup(db, &[]).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("runs");
    let mut a = AgentProc::pair(&org, &[], &[]).await;
    let id = org
        .submit(sh(&format!(
            "echo run >> {}; sleep 1; echo done",
            marker.display()
        )))
        .await;
    org.wait_task(&id, Duration::from_secs(10), |t| t["state"] == "running")
        .await;
    a.kill().await;
    // A second agent appears; after the lease expires the task runs there as attempt 2.
    let b = AgentProc::pair(&org, &[], &[]).await;
    let t = org.wait_done(&id, Duration::from_secs(20)).await;
    assert_eq!(t["state"], "succeeded", "{t}");
    assert_eq!(t["attempt"], 2);
    assert_eq!(t["agentId"].as_str(), Some(b.id.as_str()));
    assert_eq!(t["result"]["stdout"], "done\n");
    let events = org.get(&org.p(&format!("/tasks/{id}/events"))).await.body;
    let names: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        vec!["dispatched", "requeued", "dispatched"],
        "{events}"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let runs = std::fs::read_to_string(&marker).unwrap();
    assert_eq!(
        runs.lines().count(),
        2,
        "attempt 1 (killed) and attempt 2, nothing more"
    );
    assert_eq!(org.task(&id).await["attempt"], 2, "never completed twice");
}

async fn agent_lost_without_attempts_left_fails_agent_lost(db: Db) {
    let Some((_gw, org, _d)) = setup(db, &[("GATEWAY_MAX_ATTEMPTS", "1")]).await else {
        return;
    };
    let mut a = AgentProc::pair(&org, &[], &[]).await;
    let id = org.submit(sh("sleep 3")).await;
    org.wait_task(&id, Duration::from_secs(10), |t| t["state"] == "running")
        .await;
    a.kill().await;
    let t = org.wait_done(&id, Duration::from_secs(15)).await;
    assert_eq!(
        (t["state"].as_str(), t["errorCode"].as_str()),
        (Some("failed"), Some("AGENT_LOST")),
        "{t}"
    );
}

async fn gateway_restart_mid_task_keeps_the_result(db: Db) {
    let Some((mut gw, org, _d)) = setup(db, &[("GATEWAY_LEASE_MS", "10000")]).await else {
        return;
    };
    let _a = AgentProc::pair(&org, &[], &[]).await;
    let id = org.submit(sh("sleep 1.5; echo survived")).await;
    org.wait_task(&id, Duration::from_secs(10), |t| t["state"] == "running")
        .await;
    gw.kill().await; // crash, not a graceful stop
    tokio::time::sleep(Duration::from_millis(2000)).await; // the task finishes while the gateway is down
    gw.restart().await;
    let t = org.wait_done(&id, Duration::from_secs(20)).await;
    assert_eq!(t["state"], "succeeded", "{t}");
    assert_eq!(t["attempt"], 1, "resumed, not re-run");
    assert_eq!(t["result"]["stdout"], "survived\n");
}

async fn cross_org_access_is_denied_everywhere(db: Db) {
    let Some((gw, org, _d)) = setup(db, &[]).await else {
        return;
    };
    let other = gw.create_org("other").await;
    let agent = AgentProc::pair(&org, &[], &[]).await;
    let task = org.post(&org.p("/tasks/run"), sh("echo mine")).await.body["id"]
        .as_str()
        .unwrap()
        .to_string();
    let paths: Vec<(Method, String)> = vec![
        (Method::GET, format!("/v1/orgs/{}", org.id)),
        (Method::POST, format!("/v1/orgs/{}/tokens", org.id)),
        (
            Method::POST,
            format!("/v1/orgs/{}/agents/pairing-tokens", org.id),
        ),
        (Method::GET, format!("/v1/orgs/{}/agents", org.id)),
        (
            Method::GET,
            format!("/v1/orgs/{}/agents/{}", org.id, agent.id),
        ),
        (
            Method::PUT,
            format!("/v1/orgs/{}/agents/{}/tags", org.id, agent.id),
        ),
        (
            Method::POST,
            format!("/v1/orgs/{}/agents/{}/revoke", org.id, agent.id),
        ),
        (Method::POST, format!("/v1/orgs/{}/tasks", org.id)),
        (Method::POST, format!("/v1/orgs/{}/tasks/run", org.id)),
        (Method::GET, format!("/v1/orgs/{}/tasks", org.id)),
        (Method::GET, format!("/v1/orgs/{}/tasks/{task}", org.id)),
        (
            Method::GET,
            format!("/v1/orgs/{}/tasks/{task}/output", org.id),
        ),
        (
            Method::GET,
            format!("/v1/orgs/{}/tasks/{task}/events", org.id),
        ),
        (
            Method::GET,
            format!("/v1/orgs/{}/tasks/{task}/stream", org.id),
        ),
        (
            Method::POST,
            format!("/v1/orgs/{}/tasks/{task}/cancel", org.id),
        ),
    ];
    let body = || {
        Some(
            json!({"kind": "agent.execute", "shell": {"argv": ["true"]}, "tags": [], "name": "x", "role": "member"}),
        )
    };
    for (m, p) in &paths {
        // Other org's token, naming the victim org in the header.
        let a = other
            .call_as(&other.token, Some(&org.id), m.clone(), p, body())
            .await;
        assert_eq!(
            (a.status, a.code()),
            (403, "ORG_MISMATCH"),
            "{m} {p}: {a:?}"
        );
        // Other org's token and header, victim org in the path.
        let a = other
            .call_as(&other.token, Some(&other.id), m.clone(), p, body())
            .await;
        assert_eq!(
            (a.status, a.code()),
            (403, "ORG_MISMATCH"),
            "{m} {p}: {a:?}"
        );
        // No token, bad token, missing X-Org-Id.
        let a = http()
            .request(m.clone(), format!("{}{p}", org.url))
            .send()
            .await
            .unwrap();
        assert_eq!(a.status(), 401, "{m} {p}");
        let a = other
            .call_as("pdk_bogus", Some(&org.id), m.clone(), p, body())
            .await;
        assert_eq!((a.status, a.code()), (401, "UNAUTHORIZED"), "{m} {p}");
        let a = http()
            .request(m.clone(), format!("{}{p}", org.url))
            .bearer_auth(&org.token)
            .send()
            .await
            .unwrap();
        assert_eq!(a.status(), 400, "{m} {p}: X-Org-Id is required");
    }
    // Resources of one org are invisible through another org's own paths.
    let a = other.get(&other.p(&format!("/tasks/{task}"))).await;
    assert_eq!((a.status, a.code()), (404, "NOT_FOUND"));
    let a = other.get(&other.p(&format!("/agents/{}", agent.id))).await;
    assert_eq!(a.status, 404);
    let a = other
        .post(&other.p(&format!("/agents/{}/revoke", agent.id)), json!({}))
        .await;
    assert_eq!(a.status, 404);
    let listed = other.get(&other.p("/agents")).await;
    assert_eq!(listed.body["agents"], json!([]));
    // Other org's tasks never reach this org's agent.
    let r = other.post(&other.p("/tasks/run"), sh("true")).await;
    assert_eq!(r.code(), "NO_AGENT_AVAILABLE");
    // Internal endpoints want the service token.
    for p in [
        "/internal/v1/dispatch",
        "/internal/v1/managed-executors/issue",
        "/v1/orgs",
    ] {
        let a = org.call(Method::POST, p, Some(json!({"name": "x"}))).await;
        assert_eq!(a.status, 401, "{p}: {a:?}");
    }
    assert_eq!(
        org.agent(&agent.id).await["status"],
        "online",
        "nothing above touched the agent"
    );
}

async fn results_are_deleted_after_ttl(db: Db) {
    let Some((_gw, org, _d)) = setup(db, &[("GATEWAY_RESULTS_TTL_SEC", "1")]).await else {
        return;
    };
    let _a = AgentProc::pair(&org, &[], &[]).await;
    let r = org.post(&org.p("/tasks/run"), sh("echo short-lived")).await;
    let id = r.body["id"].as_str().unwrap().to_string();
    assert_eq!(org.get(&org.p(&format!("/tasks/{id}"))).await.status, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let a = org.get(&org.p(&format!("/tasks/{id}"))).await;
        if a.status == 404 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "result still there after its TTL"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn cancel_running_task_kills_it(db: Db) {
    let Some((_gw, org, _d)) = setup(db, &[]).await else {
        return;
    };
    let _a = AgentProc::pair(&org, &[], &[]).await;
    let id = org.submit(sh("sleep 30")).await;
    org.wait_task(&id, Duration::from_secs(10), |t| t["state"] == "running")
        .await;
    let t0 = Instant::now();
    let c = org
        .post(&org.p(&format!("/tasks/{id}/cancel")), json!({}))
        .await;
    assert_eq!(c.status, 202, "{c:?}");
    let t = org.wait_done(&id, Duration::from_secs(10)).await;
    assert_eq!(
        (t["state"].as_str(), t["errorCode"].as_str()),
        (Some("canceled"), Some("TASK_CANCELED"))
    );
    assert!(t0.elapsed() < Duration::from_secs(5));
    let again = org
        .post(&org.p(&format!("/tasks/{id}/cancel")), json!({}))
        .await;
    assert_eq!(again.status, 409);
    // A queued task is canceled at once.
    let q = org.submit(json!({"kind": "agent.execute", "selector": {"tag": "none"}, "shell": {"argv": ["true"]}})).await;
    let c = org
        .post(&org.p(&format!("/tasks/{q}/cancel")), json!({}))
        .await;
    assert_eq!(
        (c.status, c.body["state"].as_str()),
        (200, Some("canceled"))
    );
}

/// Backends are declared in `hello` and route work: a task asking for `process` runs only on
/// an agent that offers it, isolated; `host` refuses `networkMode: none`, `process` enforces it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_route_to_agents_offering_their_backend() {
    if !nix::unistd::geteuid().is_root() {
        assert!(std::env::var("CI").is_err(), "CI runs as root");
        eprintln!("skipping: the process backend needs root");
        return;
    }
    let Some((_gw, org, _d)) = setup(Db::Sqlite, &[]).await else {
        return;
    };
    let host_only = AgentProc::pair(&org, &[], &[("PADDOCK_AGENT_BACKENDS", "host")]).await;
    let isolated = AgentProc::pair(&org, &[], &[("PADDOCK_AGENT_EXEC_BACKEND", "process")]).await;
    let caps = org.agent(&isolated.id).await["capabilities"]["backends"].clone();
    assert_eq!(
        caps[0], "process",
        "the default backend is declared first: {caps}"
    );
    assert_eq!(
        org.agent(&host_only.id).await["capabilities"]["backends"],
        json!(["host"])
    );
    for _ in 0..3 {
        let r = org
            .post(&org.p("/tasks/run"), json!({"kind": "agent.execute", "sandbox": {"backend": "process", "networkMode": "none"},
                "shell": {"script": "id -u; cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '"}}))
            .await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.body["agentId"].as_str(), Some(isolated.id.as_str()));
        assert_eq!(r.body["result"]["stdout"], "65534\nlo\n", "{r:?}");
    }
    // Limits asked by the task are enforced (and reported with their code).
    let r = org
        .post(&org.p("/tasks/run"), json!({"kind": "agent.execute", "sandbox": {"backend": "process", "limits": {"memoryMb": 32}},
            "shell": {"script": "dd if=/dev/zero of=/dev/null bs=200M count=1"}}))
        .await;
    assert_eq!(r.body["errorCode"], "MEMORY_LIMIT_EXCEEDED", "{r:?}");
    // keepWorkdir: the directory survives and its path is reported as an event.
    let r = org
        .post(
            &org.p("/tasks/run"),
            json!({"kind": "agent.execute", "sandbox": {"backend": "process", "keepWorkdir": true},
            "shell": {"script": "echo artifact > out.txt"}}),
        )
        .await;
    let id = r.body["id"].as_str().unwrap();
    let events = org.get(&org.p(&format!("/tasks/{id}/events"))).await.body;
    let kept = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "workdir_kept")
        .expect("workdir_kept event");
    let path = std::path::Path::new(kept["payload"]["path"].as_str().unwrap());
    assert_eq!(
        std::fs::read_to_string(path.join("out.txt")).unwrap(),
        "artifact\n"
    );
    // No agent offers `vm`.
    let r = org.post(&org.p("/tasks/run"), json!({"kind": "agent.execute", "sandbox": {"backend": "vm"}, "shell": {"argv": ["true"]}})).await;
    assert_eq!((r.status, r.code()), (503, "NO_AGENT_AVAILABLE"));
}

/// The gateway caches valid API tokens; a revoked one must still be refused on the very next
/// request, on every route that authenticates a token.
async fn revoked_api_token_is_refused_at_once(db: Db) {
    let Some((_gw, org, _d)) = setup(db, &[]).await else {
        return;
    };
    let made = org
        .post(&org.p("/tokens"), json!({"name": "ci", "role": "member"}))
        .await;
    assert_eq!(made.status, 201, "{made:?}");
    let (token, token_id) = (
        made.body["token"].as_str().unwrap().to_string(),
        made.body["id"].as_str().unwrap().to_string(),
    );
    // Used (and so cached) on an org route and on /v1/whoami.
    for _ in 0..2 {
        let listed = org
            .call_as(&token, Some(&org.id), Method::GET, &org.p("/tasks"), None)
            .await;
        assert_eq!(listed.status, 200, "{listed:?}");
        let who = org
            .call_as(&token, None, Method::GET, "/v1/whoami", None)
            .await;
        assert_eq!(who.body["tokenId"], token_id.as_str(), "{who:?}");
    }
    let revoked = org
        .call(Method::DELETE, &org.p(&format!("/tokens/{token_id}")), None)
        .await;
    assert_eq!(revoked.status, 204, "{revoked:?}");
    let listed = org
        .call_as(&token, Some(&org.id), Method::GET, &org.p("/tasks"), None)
        .await;
    assert_eq!((listed.status, listed.code()), (401, "UNAUTHORIZED"));
    let who = org
        .call_as(&token, None, Method::GET, "/v1/whoami", None)
        .await;
    assert_eq!((who.status, who.code()), (401, "UNAUTHORIZED"));
    // A wrong token that shares the valid one's prefix is refused too, and the owner's token
    // still works.
    let forged = format!("{}x", &token[..token.len() - 1]);
    let bad = org
        .call_as(&forged, Some(&org.id), Method::GET, &org.p("/tasks"), None)
        .await;
    assert_eq!(bad.status, 401);
    assert_eq!(org.get(&org.p("/tasks")).await.status, 200);
}

/// `POST .../tasks/batch` stores every task or none, in order, and its tasks run.
async fn batch_submission_is_all_or_none(db: Db) {
    let Some((_gw, org, _d)) = setup(db, &[]).await else {
        return;
    };
    let count = |org: Org| async move {
        org.get(&org.p("/tasks?limit=500")).await.body["tasks"]
            .as_array()
            .map_or(0, Vec::len)
    };
    // One bad spec (index 2): 400 naming it, nothing stored.
    let bad = org
        .post(
            &org.p("/tasks/batch"),
            json!({"tasks": [
                sh("echo 0"),
                sh("echo 1"),
                {"kind": "agent.execute", "shell": {"script": "true"},
                 "selector": {"tag": "a", "group": "b"}},
            ]}),
        )
        .await;
    assert_eq!(
        (bad.status, bad.code()),
        (400, "INVALID_REQUEST"),
        "{bad:?}"
    );
    assert!(
        bad.body["message"].as_str().unwrap().contains("tasks[2]"),
        "{bad:?}"
    );
    assert_eq!(count(org.clone()).await, 0);
    for (body, what) in [
        (json!({"tasks": []}), "empty"),
        (json!({"tasks": vec![sh("true"); 1001]}), "over 1,000"),
    ] {
        let r = org.post(&org.p("/tasks/batch"), body).await;
        assert_eq!(
            (r.status, r.code()),
            (400, "INVALID_REQUEST"),
            "{what}: {r:?}"
        );
    }
    assert_eq!(count(org.clone()).await, 0);

    // 300 good ones (more than one multi-row INSERT): 202, one id each, in order.
    let specs: Vec<_> = (0..300).map(|i| sh(&format!("echo {i}"))).collect();
    let ok = org
        .post(&org.p("/tasks/batch"), json!({ "tasks": specs }))
        .await;
    assert_eq!(ok.status, 202, "{ok:?}");
    let ids: Vec<String> = ok.body["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            assert_eq!(t["state"], "queued");
            t["taskId"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(ids.len(), 300);
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 300, "ids are distinct");
    assert_eq!(count(org.clone()).await, 300);
    // They run, each with its own spec.
    let _agent = AgentProc::pair(&org, &[], &[]).await;
    for i in [0usize, 150, 299] {
        let t = org.wait_done(&ids[i], Duration::from_secs(30)).await;
        assert_eq!(t["result"]["stdout"], format!("{i}\n"), "{t}");
    }
}
