//! Time from task submission to task start on a pool instance: with a warm idle instance
//! (`--min 1`) against cold provisioning (`--min 0`: the supervisor is woken by the demand,
//! creates the instance, its agent boots and connects, then the task is dispatched), per
//! provider (`process`, `docker`). The real binary runs as gateway (SQLite) and supervisor;
//! the time is the gateway's `startedAt` minus the submission time (same host clock).
//!
//! Run: `bench/pool.sh` (release build, appends to docs/BENCHMARKS.md), or
//! `cargo bench --bench pool_warm_cold -- [--runs N] [--markdown] [--only process,docker]`.
//! The docker row needs dockerd and the local image `paddock/busybox:test`
//! (`scripts/test.sh` builds it); without them it is listed as missing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_paddock");
const SERVICE_TOKEN: &str = "bench-service-token-0123456789";
const IMAGE: &str = "paddock/busybox:test";

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

struct Gateway {
    _child: Child,
    url: String,
}

async fn start_gateway(dir: &Path) -> Gateway {
    let mut child = Command::new(BIN)
        .arg("gateway")
        .env("HOME", dir)
        .env("GATEWAY_HOST", "127.0.0.1")
        .env("GATEWAY_PORT", "0")
        .env(
            "DATABASE_URL",
            format!("sqlite://{}", dir.join("db.sqlite").display()),
        )
        .env("GATEWAY_SERVICE_TOKEN", SERVICE_TOKEN)
        .env("GATEWAY_TICK_MS", "100")
        .env("GATEWAY_HEARTBEAT_MS", "250")
        .env("GATEWAY_LOG_LEVEL", "warn")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("gateway.log")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = lines.next_line().await.unwrap().expect("gateway started");
    let port = line.rsplit(':').next().unwrap().trim().to_string();
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Gateway {
        _child: child,
        url: format!("http://127.0.0.1:{port}"),
    }
}

struct Org {
    http: reqwest::Client,
    url: String,
    id: String,
    token: String,
}

impl Org {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut b = self
            .http
            .request(method, format!("{}/v1/orgs/{}{path}", self.url, self.id))
            .bearer_auth(&self.token)
            .header("X-Org-Id", &self.id);
        if let Some(body) = body {
            b = b.json(&body);
        }
        let r = b.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }
}

async fn create_org(gw: &Gateway) -> Org {
    let http = reqwest::Client::new();
    let v: Value = http
        .post(format!("{}/v1/orgs", gw.url))
        .header("X-Service-Token", SERVICE_TOKEN)
        .json(&json!({"name": "bench"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    Org {
        http,
        url: gw.url.clone(),
        id: v["org"]["id"].as_str().unwrap().into(),
        token: v["ownerToken"].as_str().unwrap().into(),
    }
}

fn pool_args(pool: &str, provider: &str, min: u32, state: &Path) -> Vec<String> {
    let mut a: Vec<String> = [
        "--pool",
        pool,
        "--labels",
        pool,
        "--provider",
        provider,
        "--min",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.push(min.to_string());
    a.extend(["--max", "2", "--state-dir"].iter().map(|s| s.to_string()));
    a.push(state.display().to_string());
    if provider == "docker" {
        a.extend(["--docker-image".to_string(), IMAGE.to_string()]);
    }
    a
}

fn paddock(org: &Org, sub: &str, args: &[String], log: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.args(["pool", sub])
        .args(args)
        .env("PADDOCK_API_URL", &org.url)
        .env("PADDOCK_TOKEN", &org.token)
        .env("PADDOCK_ORG_ID", &org.id)
        .stdout(Stdio::null())
        .stderr(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap(),
        );
    c
}

/// Waits until the pool has exactly `ready` ready instances and nothing else live.
async fn settle(org: &Org, pool: &str, ready: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (status, v) = org
            .call(reqwest::Method::GET, &format!("/pools/{pool}"), None)
            .await;
        if status == 200 {
            let inst = v["instances"].as_array().unwrap();
            if inst.len() == ready && inst.iter().all(|i| i["status"] == "ready") {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "pool {pool} does not settle: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Submits one task for the pool; returns submission-to-start.
async fn one(org: &Org, pool: &str) -> Duration {
    let t0 = now_ms();
    let (status, v) = org
        .call(
            reqwest::Method::POST,
            "/tasks",
            Some(json!({"kind": "agent.execute", "selector": {"tag": pool}, "shell": {"argv": ["true"]}})),
        )
        .await;
    assert_eq!(status, 202, "{v}");
    let id = v["taskId"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, t) = org
            .call(reqwest::Method::GET, &format!("/tasks/{id}"), None)
            .await;
        if let Some(started) = t["startedAt"].as_i64() {
            return Duration::from_millis((started - t0).max(0) as u64);
        }
        assert!(Instant::now() < deadline, "task not started: {t}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn stats(samples: &mut [Duration]) -> (f64, f64) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    (
        ms(samples[samples.len() / 2]),
        ms(samples[(samples.len() * 9 / 10).min(samples.len() - 1)]),
    )
}

async fn measure(org: &Org, provider: &str, min: u32, runs: usize, dir: &Path) -> Vec<Duration> {
    let pool = format!("{}-{}", provider, if min > 0 { "warm" } else { "cold" });
    let state = dir.join("state");
    let log = dir.join(format!("{pool}.log"));
    let mut args = pool_args(&pool, provider, min, &state);
    args.extend(["--interval".into(), "15s".into()]);
    let mut sup = paddock(org, "run", &args, &log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut samples = Vec::new();
    for _ in 0..runs {
        settle(org, &pool, min as usize).await;
        samples.push(one(org, &pool).await);
    }
    settle(org, &pool, min as usize).await;
    if let Some(pid) = sup.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let _ = sup.wait().await;
    // Tear the floor down.
    let mut args = pool_args(&pool, provider, 0, &state);
    args.extend(["--target".into(), "0".into()]);
    let _ = paddock(org, "reconcile", &args, &log).status().await;
    samples
}

async fn docker_ready() -> Result<(), String> {
    let out = Command::new("docker")
        .args(["image", "inspect", IMAGE])
        .output()
        .await
        .map_err(|e| format!("docker CLI: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("dockerd or {IMAGE} unavailable"))
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runs = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(10usize);
    let markdown = args.iter().any(|a| a == "--markdown");
    let only: Option<Vec<String>> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.split(',').map(str::to_string).collect());
    let dir = tempfile::tempdir().unwrap();
    let gw = start_gateway(dir.path()).await;
    let org = create_org(&gw).await;
    let mut rows = Vec::new();
    for provider in ["process", "docker"] {
        if only
            .as_ref()
            .is_some_and(|o| !o.iter().any(|p| p == provider))
        {
            continue;
        }
        if provider == "docker"
            && let Err(why) = docker_ready().await
        {
            rows.push(format!("| {provider} | missing: {why} | | | | |"));
            continue;
        }
        let pdir: PathBuf = dir.path().join(provider);
        std::fs::create_dir_all(&pdir).unwrap();
        let mut warm = measure(&org, provider, 1, runs, &pdir).await;
        let mut cold = measure(&org, provider, 0, runs, &pdir).await;
        let (wm, wp) = stats(&mut warm);
        let (cm, cp) = stats(&mut cold);
        let row = format!("| {provider} | {wm:.0} | {wp:.0} | {cm:.0} | {cp:.0} | {runs} |");
        if !markdown {
            eprintln!("{row}");
        }
        rows.push(row);
    }
    println!(
        "| provider | warm idle instance: median ms | p90 ms | cold provisioning: median ms | p90 ms | runs |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for r in rows {
        println!("{r}");
    }
}
