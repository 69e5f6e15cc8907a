//! The supervisor against a small in-process fake of the gateway's pool API (the real
//! gateway is exercised end to end in `crates/paddock/tests/e2e_pool.rs`) and an in-memory
//! provider; both write to one call log so the order of operations is checked.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use super::*;
use crate::api::{ApiConfig, Secret};
use crate::provider::{ProviderError, ProviderFuture};

const TOKEN_PREFIX: &str = "vmt_secret_";

type Log = Arc<Mutex<Vec<String>>>;

#[derive(Default)]
struct Gw {
    pool: Option<Value>,
    instances: Vec<Instance>,
    queued: u32,
    next: u32,
    cap: Option<usize>,
}

#[derive(Clone)]
struct Fake {
    gw: Arc<Mutex<Gw>>,
    log: Log,
}

fn err(status: StatusCode, code: &str) -> Response {
    (
        status,
        Json(json!({"code": code, "message": code.to_lowercase()})),
    )
        .into_response()
}

async fn put_pool(
    State(f): State<Fake>,
    Path((_o, name)): Path<(String, String)>,
    Json(b): Json<Value>,
) -> Response {
    f.log.lock().unwrap().push(format!("PUT {name}"));
    let mut pool = b.clone();
    pool["id"] = json!("pool-1");
    pool["orgId"] = json!("org1");
    pool["name"] = json!(name);
    f.gw.lock().unwrap().pool = Some(pool.clone());
    Json(pool).into_response()
}

async fn get_pool(State(f): State<Fake>) -> Response {
    let gw = f.gw.lock().unwrap();
    let Some(pool) = gw.pool.clone() else {
        return err(StatusCode::NOT_FOUND, "POOL_NOT_FOUND");
    };
    let live: Vec<&Instance> = gw
        .instances
        .iter()
        .filter(|i| i.status != InstanceStatus::Terminated)
        .collect();
    Json(json!({"pool": pool, "instances": live, "demand": {"queued": gw.queued}})).into_response()
}

async fn create(State(f): State<Fake>) -> Response {
    let mut gw = f.gw.lock().unwrap();
    let max = gw
        .cap
        .unwrap_or(gw.pool.as_ref().unwrap()["max"].as_u64().unwrap() as usize);
    let live = gw
        .instances
        .iter()
        .filter(|i| i.status != InstanceStatus::Terminated)
        .count();
    if live >= max {
        return err(StatusCode::CONFLICT, POOL_AT_CAPACITY);
    }
    gw.next += 1;
    let id = format!("inst{}", gw.next);
    f.log.lock().unwrap().push(format!("POST instance {id}"));
    let inst = Instance {
        instance_id: id.clone(),
        org_id: "org1".into(),
        pool_id: Some("pool-1".into()),
        status: InstanceStatus::Starting,
        provider: "mem".into(),
        bootstrap_attempts: 0,
        last_error: None,
        uses: 0,
        max_use: 1,
        created_at: now_ms(),
        updated_at: now_ms(),
        last_bootstrap_at: None,
        ready_at: None,
        connected_at: None,
        disconnected_at: None,
        busy_at: None,
        idle_since: None,
        terminated_at: None,
    };
    gw.instances.push(inst.clone());
    let token = format!("{TOKEN_PREFIX}{id}");
    (
        StatusCode::CREATED,
        Json(json!({
            "instance": inst, "token": token, "controlPlaneWs": "ws://127.0.0.1:9/ws/vm",
            "env": {"VM_TOKEN": token, "VM_INSTANCE_ID": id, "VM_ORG_ID": "org1", "VM_USER_ID": "",
                    "VM_MODE": "pool", "VM_POOL": "ci", "CONTROL_PLANE_WS": "ws://127.0.0.1:9/ws/vm"}
        })),
    )
        .into_response()
}

async fn action(
    State(f): State<Fake>,
    Path((_o, id, what)): Path<(String, String, String)>,
    body: Option<Json<Value>>,
) -> Response {
    f.log.lock().unwrap().push(format!("{what} {id}"));
    let mut gw = f.gw.lock().unwrap();
    let Some(i) = gw.instances.iter_mut().find(|i| i.instance_id == id) else {
        return err(StatusCode::NOT_FOUND, "INSTANCE_NOT_FOUND");
    };
    if i.status == InstanceStatus::Busy && what != "fail" {
        return err(StatusCode::CONFLICT, INSTANCE_BUSY);
    }
    let reason = body.and_then(|b| b.0["error"].as_str().map(str::to_string));
    match what.as_str() {
        "deregister" => i.status = InstanceStatus::Draining,
        "terminate" => {
            i.status = InstanceStatus::Terminated;
            i.terminated_at = Some(now_ms());
            if reason.is_some() {
                i.last_error = reason;
            }
        }
        "fail" => {
            i.status = InstanceStatus::Failed;
            i.last_error = reason;
        }
        _ => return err(StatusCode::NOT_FOUND, "NOT_FOUND"),
    }
    Json(i.clone()).into_response()
}

async fn fake_gateway(log: Log) -> (String, Arc<Mutex<Gw>>) {
    let gw = Arc::new(Mutex::new(Gw::default()));
    let app = Router::new()
        .route("/v1/orgs/{o}/pools/{name}", get(get_pool).put(put_pool))
        .route("/v1/orgs/{o}/pools/{name}/instances", post(create))
        .route("/v1/orgs/{o}/instances/{id}/{what}", post(action))
        .with_state(Fake {
            gw: gw.clone(),
            log,
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), gw)
}

/// An in-memory provider: instance id -> running.
struct Mem {
    have: Mutex<BTreeMap<String, bool>>,
    log: Log,
    fail_create: bool,
    tokens_seen: Mutex<Vec<String>>,
}

impl Provider for Mem {
    fn name(&self) -> &'static str {
        "mem"
    }
    fn create<'a>(&'a self, launch: &'a Launch) -> ProviderFuture<'a, ()> {
        Box::pin(async move {
            self.log
                .lock()
                .unwrap()
                .push(format!("provider create {}", launch.instance_id));
            self.tokens_seen
                .lock()
                .unwrap()
                .push(launch.env["VM_TOKEN"].clone());
            if self.fail_create {
                return Err(ProviderError::new(format!(
                    "boot failed for token {}",
                    launch.token.expose()
                )));
            }
            self.have
                .lock()
                .unwrap()
                .insert(launch.instance_id.clone(), true);
            Ok(())
        })
    }
    fn destroy<'a>(&'a self, id: &'a str) -> ProviderFuture<'a, ()> {
        Box::pin(async move {
            self.log
                .lock()
                .unwrap()
                .push(format!("provider destroy {id}"));
            self.have.lock().unwrap().remove(id);
            Ok(())
        })
    }
    fn list(&self) -> ProviderFuture<'_, Option<Vec<ProviderInstance>>> {
        Box::pin(async move {
            Ok(Some(
                self.have
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|(id, running)| ProviderInstance {
                        instance_id: id.clone(),
                        running: *running,
                        detail: "mem".into(),
                    })
                    .collect(),
            ))
        })
    }
}

struct Rig {
    sup: Supervisor,
    gw: Arc<Mutex<Gw>>,
    mem: Arc<Mem>,
    log: Log,
    dir: tempfile::TempDir,
}

fn spec(min: u32, max: u32) -> PoolSpec {
    PoolSpec {
        provider: "process".into(),
        labels: vec!["ci".into()],
        min,
        max,
        target: None,
        max_use: 1,
        boot_deadline_ms: 60_000,
    }
}

async fn rig(min: u32, max: u32, dry_run: bool, fail_create: bool) -> Rig {
    let log: Log = Arc::default();
    let (base, gw) = fake_gateway(log.clone()).await;
    let api = PoolApi::connect(ApiConfig {
        base,
        token: Secret::new("pdk_apitoken"),
        org: Some("org1".into()),
    })
    .await
    .unwrap();
    let mem = Arc::new(Mem {
        have: Mutex::default(),
        log: log.clone(),
        fail_create,
        tokens_seen: Mutex::default(),
    });
    let dir = tempfile::tempdir().unwrap();
    let cfg = SupervisorConfig {
        pool: "ci".into(),
        spec: Some(spec(min, max)),
        dry_run,
        disconnect_grace: Duration::from_secs(30),
        orphan_grace: Duration::ZERO,
        interval: Duration::from_secs(15),
        watch: false,
        inventory_out: Some(dir.path().join("out/inventory.json")),
        status_out: Some(dir.path().join("out/status.json")),
        control_plane_ws: None,
        mode: "reconcile".into(),
    };
    let sup = Supervisor::new(
        api,
        mem.clone(),
        PoolDir::new(&dir.path().join("state"), "ci"),
        cfg,
    );
    Rig {
        sup,
        gw,
        mem,
        log,
        dir,
    }
}

impl Rig {
    fn set_status(&self, id: &str, status: InstanceStatus) {
        let mut gw = self.gw.lock().unwrap();
        gw.instances
            .iter_mut()
            .find(|i| i.instance_id == id)
            .unwrap()
            .status = status;
    }
    fn calls(&self) -> Vec<String> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
    fn read(&self, name: &str) -> (String, Value) {
        let text = std::fs::read_to_string(self.dir.path().join("out").join(name)).unwrap();
        let v = serde_json::from_str(&text).unwrap();
        (text, v)
    }
}

#[tokio::test]
async fn a_pass_configures_the_pool_fills_the_floor_and_reports() {
    let mut r = rig(2, 4, false, false).await;
    let report = r.sup.pass().await;
    assert!(report.ok(), "{:?}", report.errors);
    assert_eq!(report.plan.as_ref().unwrap().create, 2);
    let calls = r.calls();
    assert_eq!(calls[0], "PUT ci");
    // Each instance: recorded in the gateway before its runtime is created.
    for id in ["inst1", "inst2"] {
        let post = calls
            .iter()
            .position(|c| c == &format!("POST instance {id}"));
        let create = calls
            .iter()
            .position(|c| c == &format!("provider create {id}"));
        assert!(post.unwrap() < create.unwrap(), "{calls:?}");
    }
    // The provider got each instance's own token.
    let mut seen = r.mem.tokens_seen.lock().unwrap().clone();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            format!("{TOKEN_PREFIX}inst1"),
            format!("{TOKEN_PREFIX}inst2")
        ]
    );

    let (inv_text, inv) = r.read("inventory.json");
    assert_eq!(inv["version"], 1);
    assert_eq!(inv["pool"], "ci");
    assert_eq!(inv["instances"].as_array().unwrap().len(), 2);
    assert_eq!(inv["instances"][0]["status"], "starting");
    assert_eq!(inv["instances"][0]["provider"]["running"], true);
    let (status_text, status) = r.read("status.json");
    assert_eq!(status["desired"], 2);
    assert_eq!(status["ok"], true);
    assert_eq!(status["totals"]["created"], 2);
    assert_eq!(status["lastActions"].as_array().unwrap().len(), 2);
    for text in [&inv_text, &status_text] {
        assert!(!text.contains(TOKEN_PREFIX), "a token leaked: {text}");
        assert!(
            !text.contains("pdk_apitoken"),
            "the API token leaked: {text}"
        );
    }

    // A second pass changes nothing and does not PUT again.
    let report = r.sup.pass().await;
    assert!(report.plan.unwrap().is_noop());
    assert!(r.calls().is_empty());
}

#[tokio::test]
async fn a_dry_run_changes_nothing() {
    let mut r = rig(2, 4, true, false).await;
    // The pool does not exist yet: planned from the flags.
    let report = r.sup.pass().await;
    assert!(report.ok(), "{:?}", report.errors);
    assert!(report.dry_run);
    assert_eq!(report.plan.as_ref().unwrap().create, 2);
    assert!(r.calls().is_empty(), "no PUT, no POST, no provider call");
    assert!(r.gw.lock().unwrap().pool.is_none());
    assert!(r.mem.have.lock().unwrap().is_empty());
    let (_, status) = r.read("status.json");
    assert_eq!(status["dryRun"], true);
    assert_eq!(status["lastPlan"]["create"], 2);
    assert!(!r.dir.path().join("state/ci/.orphans.json").exists());
}

#[tokio::test]
async fn teardown_deregisters_then_destroys_then_terminates_and_never_touches_busy() {
    let mut r = rig(0, 4, false, false).await;
    r.sup.pass().await; // PUT; floor 0: nothing created
    r.gw.lock().unwrap().queued = 2;
    r.sup.pass().await;
    r.gw.lock().unwrap().queued = 0;
    r.calls();
    r.set_status("inst1", InstanceStatus::Draining);
    r.set_status("inst2", InstanceStatus::Busy);
    let report = r.sup.pass().await;
    assert!(report.ok(), "{:?}", report.errors);
    let calls = r.calls();
    assert_eq!(
        calls,
        vec![
            "deregister inst1",
            "provider destroy inst1",
            "terminate inst1"
        ]
    );
    assert!(r.mem.have.lock().unwrap().contains_key("inst2"));
}

#[tokio::test]
async fn a_busy_refusal_skips_destruction() {
    let r = rig(0, 4, false, false).await;
    let mut sup = r.sup;
    sup.pass().await;
    r.gw.lock().unwrap().queued = 1;
    sup.pass().await;
    r.gw.lock().unwrap().queued = 0;
    {
        let mut g = r.gw.lock().unwrap();
        g.instances[0].status = InstanceStatus::Busy;
    }
    r.log.lock().unwrap().clear();
    // Ask for a destruction the gateway refuses (it is busy).
    let d = Destroy {
        instance_id: "inst1".into(),
        status: InstanceStatus::Ready,
        reason: DestroyReason::ScaleDown,
    };
    let config = PlanConfig {
        min: 0,
        max: 4,
        target: None,
        max_use: 1,
        boot_deadline_ms: 0,
        disconnect_grace_ms: 0,
        orphan_grace_ms: 0,
    };
    let a = sup.destroy_one(&d, &config).await;
    assert_eq!(a.outcome, "skipped", "{a:?}");
    assert_eq!(*r.log.lock().unwrap(), vec!["deregister inst1"]);
    assert!(r.mem.have.lock().unwrap().contains_key("inst1"));
}

#[tokio::test]
async fn a_provider_failure_fails_destroys_and_terminates_without_leaking_the_token() {
    let mut r = rig(1, 2, false, true).await;
    let report = r.sup.pass().await;
    assert!(!report.ok());
    let calls = r.calls();
    assert_eq!(
        calls,
        vec![
            "PUT ci",
            "POST instance inst1",
            "provider create inst1",
            "fail inst1",
            "provider destroy inst1",
            "terminate inst1"
        ]
    );
    let gw = r.gw.lock().unwrap();
    assert_eq!(gw.instances[0].status, InstanceStatus::Terminated);
    let last_error = gw.instances[0].last_error.clone().unwrap();
    assert!(last_error.contains("boot failed"), "{last_error}");
    assert!(!last_error.contains(TOKEN_PREFIX), "{last_error}");
    drop(gw);
    assert!(report.errors.iter().all(|e| !e.contains(TOKEN_PREFIX)));
    let (text, status) = r.read("status.json");
    assert_eq!(status["ok"], false);
    assert_eq!(status["totals"]["createFailures"], 1);
    assert!(!text.contains(TOKEN_PREFIX), "{text}");
}

#[tokio::test]
async fn a_full_pool_stops_creation_quietly() {
    let mut r = rig(2, 4, false, false).await;
    // The gateway holds the ceiling: it accepts one instance, then answers POOL_AT_CAPACITY.
    r.gw.lock().unwrap().cap = Some(1);
    let report = r.sup.pass().await;
    assert!(report.ok(), "{:?}", report.errors);
    assert_eq!(report.plan.as_ref().unwrap().create, 2);
    let outcomes: Vec<&str> = report.actions.iter().map(|a| a.outcome.as_str()).collect();
    let mut sorted = outcomes.clone();
    sorted.sort();
    assert_eq!(sorted, vec!["done", "skipped"]);
    assert_eq!(r.mem.have.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn orphans_are_removed_on_the_second_sighting_and_sightings_persist() {
    let mut r = rig(0, 4, false, false).await;
    r.sup.pass().await;
    r.mem.have.lock().unwrap().insert("ghost".into(), true);
    r.calls();
    let first = r.sup.pass().await;
    assert_eq!(first.plan.unwrap().pending_orphans.len(), 1);
    assert!(r.calls().is_empty());
    assert!(
        r.dir.path().join("state/ci/.orphans.json").exists(),
        "the sighting is persisted for a restarted supervisor"
    );
    let second = r.sup.pass().await;
    assert_eq!(
        second.plan.unwrap().remove_provider_orphans,
        vec!["ghost".to_string()]
    );
    assert_eq!(r.calls(), vec!["provider destroy ghost"]);
}
