//! The CLI as a user runs it: `paddock up`, `paddock run`, `paddock task get`, operator
//! commands, and the HTTP surface around them (health, metrics, OpenAPI, WebSocket auth).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

async fn paddock(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(args)
        .env_remove("PADDOCK_TOKEN")
        .env_remove("PADDOCK_API_URL")
        .env_remove("PADDOCK_ORG_ID");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("command finished")
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_runs_tasks_and_stops_gracefully() {
    let home = tempfile::tempdir().unwrap();
    let mut up = tokio::process::Command::new(BIN)
        .args(["up", "--port", "0"])
        .env("HOME", home.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(up.stdout.take().unwrap()).lines();
    let (mut url, mut token, mut org) = (String::new(), String::new(), String::new());
    let deadline = Instant::now() + Duration::from_secs(30);
    while token.is_empty() || url.is_empty() {
        assert!(Instant::now() < deadline, "paddock up printed no banner");
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .expect("banner");
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["API:", u, ..] => url = u.to_string(),
            ["Owner", "token:", t] => token = t.to_string(),
            ["Org:", o] => org = o.to_string(),
            _ => {}
        }
    }
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let env = [
        ("PADDOCK_API_URL", url.as_str()),
        ("PADDOCK_TOKEN", token.as_str()),
    ];
    // The local agent connects within a few seconds.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, _, err) = paddock(&["run", "--", "echo", "hello from paddock"], &env).await;
        if code == 0 {
            break;
        }
        assert!(
            err.contains("NO_AGENT_AVAILABLE") && Instant::now() < deadline,
            "{code} {err}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (code, out, err) = paddock(
        &["run", "--shell", "--", "echo out; echo err >&2; exit 7"],
        &env,
    )
    .await;
    assert_eq!((code, out.as_str(), err.as_str()), (7, "out\n", "err\n"));
    let (code, _, err) = paddock(&["run", "--timeout", "1s", "--", "sleep", "10"], &env).await;
    assert_eq!(code, 124, "{err}");
    assert!(err.contains("TASK_TIMEOUT"), "{err}");
    let (code, _, err) = paddock(&["run", "--network", "none", "--", "true"], &env).await;
    assert_ne!(code, 0);
    assert!(err.contains("HOST_NETWORK_MODE_UNSUPPORTED"), "{err}");
    let (code, _, err) = paddock(&["run", "--selector", "tag=nowhere", "--", "true"], &env).await;
    assert_eq!(code, 125);
    assert!(err.contains("NO_AGENT_AVAILABLE"), "{err}");
    let (code, out, _) = paddock(&["run", "--detach", "--", "echo", "detached"], &env).await;
    assert_eq!(code, 0);
    let id = out.trim().to_string();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (code, out, _) = paddock(&["task", "get", &id, "--json"], &env).await;
    assert_eq!(code, 0);
    let t: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (t["state"].as_str(), t["result"]["stdout"].as_str()),
        (Some("succeeded"), Some("detached\n"))
    );
    let (code, out, _) = paddock(&["agent", "list", "--json"], &env).await;
    assert_eq!(code, 0);
    let agents: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(agents["agents"][0]["status"], "online");
    assert_eq!(agents["agents"][0]["pool"], "managed");
    // Bad token: a clear error and Paddock's own exit code.
    let (code, _, err) = paddock(
        &["run", "--", "true"],
        &[
            ("PADDOCK_API_URL", url.as_str()),
            ("PADDOCK_TOKEN", "pdk_nope"),
        ],
    )
    .await;
    assert_eq!(code, 125);
    assert!(err.contains("UNAUTHORIZED"), "{err}");

    // SIGTERM while a task runs: the task finishes, its result is stored, then `up` exits 0.
    let runner = tokio::spawn({
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        async move {
            let env: Vec<(&str, &str)> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            paddock(&["run", "--shell", "--", "sleep 1; echo finished"], &env).await
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    signal(&up, nix::sys::signal::Signal::SIGTERM);
    let (code, out, _) = runner.await.unwrap();
    assert_eq!(
        (code, out.as_str()),
        (0, "finished\n"),
        "in-flight task finished during shutdown"
    );
    let status = tokio::time::timeout(Duration::from_secs(30), up.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    // Restarting on the same data dir reuses the org and token.
    let data = home.path().join(".paddock/up/up.json");
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(&data).unwrap()).unwrap();
    assert_eq!(
        (saved["orgId"].as_str(), saved["ownerToken"].as_str()),
        (Some(org.as_str()), Some(token.as_str()))
    );
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&data).unwrap().permissions())
            & 0o777;
    assert_eq!(mode, 0o600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_surface_health_metrics_openapi_and_ws_auth() {
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_db(Db::Sqlite, dir.path()).await.unwrap();
    let gw = GatewayProc::start(&url, &[]).await;
    let org = gw.create_org("acme").await;
    let _agent = AgentProc::pair(&org, &[], &[]).await;
    org.post(&org.p("/tasks/run"), sh("true")).await;
    let get = |p: &str| {
        let u = format!("{}{p}", gw.url);
        async move { http().get(u).send().await.unwrap() }
    };
    assert_eq!(get("/healthz").await.status(), 200);
    let ready: Value = get("/readyz").await.json().await.unwrap();
    assert_eq!(ready["status"], "ready");
    let metrics = get("/metrics").await.text().await.unwrap();
    for needle in [
        "paddock_tasks{state=\"succeeded\"} 1",
        "paddock_queue_depth 0",
        "paddock_connected_agents 1",
        "paddock_dispatch_latency_seconds_count 1",
    ] {
        assert!(
            metrics.contains(needle),
            "metrics lack {needle:?}:\n{metrics}"
        );
    }
    let served: Value = get("/openapi.json").await.json().await.unwrap();
    let checked_in: Value =
        serde_json::from_str(include_str!("../../../docs/openapi.json")).unwrap();
    assert_eq!(
        served, checked_in,
        "docs/openapi.json is stale: cargo run -- openapi > docs/openapi.json"
    );
    assert!(served["paths"]["/v1/orgs/{org_id}/tasks/run"].is_object());
    let missing = get("/v1/nope").await;
    assert_eq!(missing.status(), 404);
    assert_eq!(missing.json::<Value>().await.unwrap()["code"], "NOT_FOUND");
    // Malformed JSON body: INVALID_REQUEST with a message, nothing stored.
    let bad = http()
        .post(format!("{}{}", gw.url, org.p("/tasks")))
        .bearer_auth(&org.token)
        .header("X-Org-Id", &org.id)
        .header("content-type", "application/json")
        .body("{\"kind\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    assert_eq!(
        bad.json::<Value>().await.unwrap()["code"],
        "INVALID_REQUEST"
    );
    let invalid = org
        .post(
            &org.p("/tasks"),
            json!({"kind": "agent.execute", "shell": {}}),
        )
        .await;
    assert_eq!((invalid.status, invalid.code()), (400, "INVALID_REQUEST"));
    assert_eq!(
        org.get(&org.p("/tasks")).await.body["tasks"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // WebSocket: no token, bad token, token with a forged org prefix -> 401 before upgrade.
    let ws = format!("ws://127.0.0.1:{}/ws/executor", gw.port);
    for token in [
        None,
        Some("nope".to_string()),
        Some(format!("{}.{}", org.id, "0".repeat(64))),
    ] {
        let mut req = ws.as_str().into_client_request().unwrap();
        if let Some(t) = token {
            req.headers_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        match tokio_tungstenite::connect_async(req).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status(), 401)
            }
            other => panic!("expected 401, got {other:?}"),
        }
    }
    // A valid managed executor that sends garbage gets MALFORMED_FRAME, then oversize closes.
    let issued: Value = http()
        .post(format!("{}/internal/v1/managed-executors/issue", gw.url))
        .header("X-Service-Token", SERVICE_TOKEN)
        .json(&json!({"orgId": org.id, "tags": ["m"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut req = ws.as_str().into_client_request().unwrap();
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", issued["executorToken"].as_str().unwrap())
            .parse()
            .unwrap(),
    );
    let (mut sock, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    sock.send(Message::Text(r#"{"type":"hello","protocol":1,"agentVersion":"t","capabilities":{"kinds":["agent.execute"]}}"#.into())).await.unwrap();
    let next = |m: Option<Result<Message, _>>| -> Value {
        match m {
            Some(Ok(Message::Text(t))) => serde_json::from_str(&t).unwrap(),
            other => panic!("expected a text frame, got {other:?}"),
        }
    };
    let hello_ok = next(sock.next().await);
    assert_eq!(hello_ok["type"], "hello_ok");
    assert_eq!(hello_ok["agentId"], issued["executorId"]);
    sock.send(Message::Text("{not json".into())).await.unwrap();
    let err = next(sock.next().await);
    assert_eq!(
        (err["type"].as_str(), err["code"].as_str()),
        (Some("error"), Some("MALFORMED_FRAME"))
    );
    sock.send(Message::Text(
        format!(
            "{{\"type\":\"heartbeat\",\"tsMs\":1,\"pad\":\"{}\"}}",
            "x".repeat(4_300_000)
        )
        .into(),
    ))
    .await
    .unwrap();
    let err = next(sock.next().await);
    assert_eq!(err["code"], "FRAME_TOO_LARGE");
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(m)) = sock.next().await {
            if m.is_close() {
                return true;
            }
        }
        true
    })
    .await
    .unwrap();
    assert!(closed);
    // The gateway is still healthy after all that.
    assert_eq!(get("/healthz").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_refuses_to_start_without_service_token_outside_test() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = paddock(
        &[
            "gateway",
            "--port",
            "0",
            "--data-dir",
            dir.path().to_str().unwrap(),
        ],
        &[("GATEWAY_SERVICE_TOKEN", ""), ("PADDOCK_ENV", "production")],
    )
    .await;
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("GATEWAY_SERVICE_TOKEN is required"), "{err}");
    let (code, _, err) = paddock(&["gateway", "--role", "sideways"], &[]).await;
    assert_eq!(code, 2, "clap rejects a bad role: {err}");
    assert!(err.contains("edge"), "{err}");
}
