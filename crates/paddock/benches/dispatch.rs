//! Dispatch benchmark (issue 6): a real `paddock gateway` with real `paddock agent` processes
//! on loopback, on SQLite and on PostgreSQL, next to the raw WebSocket floor.
//!
//! - (a) sequential round trip of a no-op task through `POST /tasks/run` (submit, dispatch,
//!   agent runs `true`, result stored, caller answered), p50/p99 over `--roundtrips`;
//! - (b) throughput: `--tasks` no-op tasks queued at once with `POST /tasks` (32 concurrent
//!   submitters), timed until the gateway has stored every result; (c) the same with 2 agents;
//!   (b') the same tasks queued with `POST /tasks/batch` (500 per request, 4 submitters) for
//!   one agent declaring 64 slots;
//! - (d) gateway RSS (`VmRSS`) with 1,000 and 10,000 idle agent sessions from an in-process
//!   load generator (managed-executor tokens, `hello`, heartbeats);
//! - floor: a WebSocket request/reply between two processes with the frame sizes of a no-op
//!   task's `dispatch` and `result`.
//!
//! Two workloads: `agent.noop` (the agent answers without starting a process: the dispatch
//! path alone, the counterpart of the peers' no-op function in a running worker) for (a),
//! (b) and (c), and argv `["true"]` on the host backend (one process spawned per task, about
//! 1 ms, see `sandbox_cold_start`) for (a) and (b).
//!
//! Run: `bench/run.sh` (everything, with the peers), or
//! `cargo bench --bench dispatch -- [--db sqlite,postgres] [--roundtrips N] [--tasks N]
//! [--idle 1000,10000] [--only floor,rt,tput,idle] [--json PATH]`.
//! PostgreSQL needs `PADDOCK_TEST_PG_URL` (an admin URL; a fresh database per gateway).
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)]

#[path = "dispatch/floor.rs"]
mod floor;
#[path = "dispatch/http1.rs"]
mod http1;
#[path = "dispatch/idle.rs"]
mod idle;
#[path = "dispatch/procs.rs"]
mod procs;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use paddock_proto::{Dispatch, GatewayMessage, ShellTask, TaskSpec};
use serde_json::{Value, json};

use procs::{AgentProc, Gateway};

struct Args {
    dbs: Vec<String>,
    roundtrips: usize,
    tasks: usize,
    idle: Vec<usize>,
    only: Vec<String>,
    json: Option<String>,
}

fn parse_args() -> Args {
    let mut a = Args {
        dbs: vec!["sqlite".into()],
        roundtrips: 2000,
        tasks: 20_000,
        idle: vec![1000, 10_000],
        only: vec![],
        json: None,
    };
    let mut it = std::env::args().skip(1);
    let list = |s: String| -> Vec<String> { s.split(',').map(str::to_string).collect() };
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--db" => a.dbs = list(it.next().unwrap()),
            "--roundtrips" => a.roundtrips = it.next().unwrap().parse().unwrap(),
            "--tasks" => a.tasks = it.next().unwrap().parse().unwrap(),
            "--idle" => {
                a.idle = list(it.next().unwrap())
                    .iter()
                    .map(|s| s.parse().unwrap())
                    .collect();
            }
            "--only" => a.only = list(it.next().unwrap()),
            "--json" => a.json = it.next(),
            // cargo bench passes --bench.
            _ => {}
        }
    }
    a
}

/// The no-op task of a workload: `noop` is the `agent.noop` kind (the agent answers at once:
/// the dispatch path alone, like the peers' no-op function in a running worker); `true`
/// runs argv `["true"]` on the host backend (one process spawned per task).
fn task(workload: &str) -> Value {
    match workload {
        "noop" => json!({ "kind": "agent.noop" }),
        _ => json!({ "kind": "agent.execute", "shell": { "argv": ["true"] } }),
    }
}

fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

fn summary(mut samples: Vec<Duration>) -> Value {
    samples.sort();
    let mean = samples.iter().sum::<Duration>().as_secs_f64() * 1000.0 / samples.len() as f64;
    json!({
        "n": samples.len(),
        "p50_ms": percentile_ms(&samples, 0.50),
        "p99_ms": percentile_ms(&samples, 0.99),
        "mean_ms": mean,
    })
}

/// Frame sizes on the agent connection for one no-op task: `dispatch` and `result`.
fn frame_sizes() -> (usize, usize) {
    let spec = TaskSpec {
        kind: "agent.execute".into(),
        selector: None,
        shell: Some(ShellTask {
            argv: vec!["true".into()],
            ..ShellTask::default()
        }),
        bundle: None,
        sandbox: Default::default(),
        timeout_ms: None,
        queue_timeout_ms: None,
        max_attempts: None,
    };
    let dispatch = GatewayMessage::Dispatch(Box::new(Dispatch {
        task_id: uuid::Uuid::now_v7().to_string(),
        attempt: 1,
        lease_deadline_ms: paddock_proto::now_ms(),
        spec,
    }));
    let dispatch = serde_json::to_string(&dispatch).unwrap().len();
    let result = json!({"type": "result", "taskId": uuid::Uuid::now_v7().to_string(), "attempt": 1,
        "status": "succeeded", "exitCode": 0, "stdout": "", "stderr": "",
        "stdoutTruncated": false, "stderrTruncated": false, "durationMs": 1});
    (dispatch, result.to_string().len())
}

/// A fresh database URL for one gateway (PostgreSQL: a new database in the cluster named by
/// `PADDOCK_TEST_PG_URL`).
async fn fresh_db(db: &str, dir: &std::path::Path) -> String {
    match db {
        "sqlite" => paddock_store::testing::sqlite_url(dir),
        "postgres" => paddock_store::testing::postgres_url()
            .await
            .expect("PADDOCK_TEST_PG_URL (an admin URL) is needed for postgres"),
        other => panic!("unknown database {other}"),
    }
}

/// (a) Sequential submit-and-wait round trips on one kept-alive connection driven by the
/// measuring task (the lean client, as the floor's); `via_reqwest` sends them through
/// `reqwest` instead (its connection task adds a task hand-off each way).
async fn round_trips(
    gw: &Gateway,
    org: &procs::Org,
    http: &reqwest::Client,
    n: usize,
    workload: &str,
    via_reqwest: bool,
) -> Vec<Duration> {
    let body = task(workload);
    let bytes = serde_json::to_vec(&body).unwrap();
    let path = format!("/v1/orgs/{}/tasks/run", org.id);
    let headers = format!(
        "authorization: Bearer {}\r\nx-org-id: {}\r\n",
        org.token, org.id
    );
    let mut conn = if via_reqwest {
        None
    } else {
        Some(http1::Conn::connect(gw.port).await)
    };
    let mut samples = Vec::with_capacity(n);
    for i in 0..n + 50 {
        let t0 = Instant::now();
        let (status, task): (u16, Value) = match conn.as_mut() {
            Some(conn) => {
                let (status, reply) = conn.post_json(&path, &headers, &bytes).await;
                (status, serde_json::from_slice(&reply).unwrap())
            }
            None => {
                let resp = org
                    .post(http, "/tasks/run")
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                (resp.status().as_u16(), resp.json().await.unwrap())
            }
        };
        let dt = t0.elapsed();
        assert!(
            status == 200 && task["state"] == "succeeded",
            "round trip: {status} {task}"
        );
        // 50 warm-up round trips.
        if i >= 50 {
            samples.push(dt);
        }
    }
    samples
}

/// Waits for the submitters and for the gateway to have stored `n` more results than
/// `done_before`; returns (time to submit, time to the last result), both from `t0`.
async fn until_done(
    gw: &Gateway,
    http: &reqwest::Client,
    n: usize,
    done_before: f64,
    t0: Instant,
    submitters: Vec<tokio::task::JoinHandle<()>>,
) -> (Duration, Duration) {
    let submitted = async {
        for s in submitters {
            s.await.unwrap();
        }
        t0.elapsed()
    };
    let poll = async {
        loop {
            let done = gw.metric(http, "paddock_results_total").await - done_before;
            if done >= n as f64 {
                return t0.elapsed();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(600),
                "only {done} of {n} tasks finished in 600 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::join!(submitted, poll)
}

/// (b)/(c) `n` tasks queued at once by 32 submitters; seconds until every result is stored.
async fn throughput(
    gw: &Gateway,
    org: &procs::Org,
    http: &reqwest::Client,
    n: usize,
    workload: &'static str,
) -> Value {
    let done_before = gw.metric(http, "paddock_results_total").await;
    let next = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut submitters = Vec::new();
    for _ in 0..32 {
        let next = next.clone();
        let org = org.clone();
        let http = http.clone();
        submitters.push(tokio::spawn(async move {
            let body = task(workload);
            while next.fetch_add(1, Ordering::Relaxed) < n {
                let resp = org.post(&http, "/tasks").json(&body).send().await.unwrap();
                assert_eq!(resp.status(), 202, "{}", resp.text().await.unwrap());
            }
        }));
    }
    let (submit_time, total) = until_done(gw, http, n, done_before, t0, submitters).await;
    let succeeded = gw
        .metric(http, "paddock_results_total{state=\"succeeded\"}")
        .await;
    json!({
        "tasks": n,
        "submit_s": submit_time.as_secs_f64(),
        "total_s": total.as_secs_f64(),
        "tasks_per_s": n as f64 / total.as_secs_f64(),
        "succeeded_total": succeeded,
        "rss_kib_after": gw.rss_kib(),
    })
}

/// Tasks per `POST .../tasks/batch` in the batched throughput run.
const BATCH: usize = 500;

/// (b') `n` tasks queued with `POST .../tasks/batch` (`BATCH` per request, 4 submitters);
/// seconds until every result is stored.
async fn throughput_batched(
    gw: &Gateway,
    org: &procs::Org,
    http: &reqwest::Client,
    n: usize,
) -> Value {
    let done_before = gw.metric(http, "paddock_results_total").await;
    let next = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut submitters = Vec::new();
    for _ in 0..4 {
        let next = next.clone();
        let org = org.clone();
        let http = http.clone();
        submitters.push(tokio::spawn(async move {
            loop {
                let from = next.fetch_add(BATCH, Ordering::Relaxed);
                if from >= n {
                    break;
                }
                let count = BATCH.min(n - from);
                let body = json!({ "tasks": vec![task("noop"); count] });
                let resp = org
                    .post(&http, "/tasks/batch")
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 202, "{}", resp.text().await.unwrap());
            }
        }));
    }
    let (submit_time, total) = until_done(gw, http, n, done_before, t0, submitters).await;
    json!({
        "tasks": n,
        "batch": BATCH,
        "agent_max_in_flight": BATCHED_AGENT_MAX_IN_FLIGHT,
        "submit_s": submit_time.as_secs_f64(),
        "total_s": total.as_secs_f64(),
        "tasks_per_s": n as f64 / total.as_secs_f64(),
        "rss_kib_after": gw.rss_kib(),
    })
}

/// The agent's concurrency (`PADDOCK_AGENT_MAX_IN_FLIGHT`) in the batched run; the other
/// runs use the default, 10.
const BATCHED_AGENT_MAX_IN_FLIGHT: &str = "64";

/// (d) Gateway RSS with idle agent sessions, at each count of `counts` (cumulative).
async fn idle_rss(
    gw: &Gateway,
    org: &procs::Org,
    http: &reqwest::Client,
    counts: &[usize],
) -> Value {
    let mut out = serde_json::Map::new();
    out.insert("0".into(), json!(gw.rss_kib()));
    let mut agents = idle::IdleAgents::new();
    let mut have = 0;
    for &count in counts {
        let t0 = Instant::now();
        let tokens = idle::issue_tokens(gw, org, http, count - have).await;
        let issued = t0.elapsed();
        agents.connect(gw, tokens, Duration::from_secs(180)).await;
        let connected = t0.elapsed();
        let live = agents.live.load(Ordering::SeqCst);
        // Let a heartbeat round and a presence sweep pass (5 s by default).
        tokio::time::sleep(Duration::from_secs(6)).await;
        let rss = gw.rss_kib();
        let gauge = gw.metric(http, "paddock_connected_agents").await;
        eprintln!(
            "  {count} idle agents: {live} live ({gauge} in the hub), VmRSS {} MiB (tokens {:.1}s, connected {:.1}s)",
            rss / 1024,
            issued.as_secs_f64(),
            connected.as_secs_f64()
        );
        out.insert(
            count.to_string(),
            json!({ "rss_kib": rss, "live": live, "hub": gauge,
                    "issue_s": issued.as_secs_f64(), "connect_s": connected.as_secs_f64() }),
        );
        have = count;
    }
    agents.close();
    Value::Object(out)
}

async fn bench_db(db: &str, a: &Args, http: &reqwest::Client) -> Value {
    let want = |s: &str| a.only.is_empty() || a.only.iter().any(|o| o == s);
    let mut out = serde_json::Map::new();
    out.insert("db".into(), json!(db));
    let scratch = std::env::var("PADDOCK_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    std::fs::create_dir_all(&scratch).unwrap();

    if want("rt") || want("tput") {
        let dir = tempfile::tempdir_in(&scratch).unwrap();
        let gw = Gateway::start(&fresh_db(db, dir.path()).await, dir.path()).await;
        let org = gw.create_org(http).await;
        let agent = AgentProc::pair(&org, http, 1).await;
        for (workload, suffix) in [("noop", ""), ("true", "_true")] {
            if want("rt") {
                let s = summary(round_trips(&gw, &org, http, a.roundtrips, workload, false).await);
                eprintln!("  [{db}] round trip, {workload}: {s}");
                out.insert(format!("round_trip{suffix}"), s);
                if workload == "noop" {
                    let s =
                        summary(round_trips(&gw, &org, http, a.roundtrips, workload, true).await);
                    eprintln!("  [{db}] round trip through reqwest, {workload}: {s}");
                    out.insert("round_trip_reqwest".into(), s);
                }
            }
            if want("tput") {
                // A quarter of the tasks for `true`: it is there to show what a spawned
                // process costs, and the whole run must fit in 15 minutes.
                let n = if workload == "noop" {
                    a.tasks
                } else {
                    (a.tasks / 4).max(1)
                };
                let t = throughput(&gw, &org, http, n, workload).await;
                eprintln!("  [{db}] throughput, 1 agent, {workload}: {t}");
                out.insert(format!("throughput_1{suffix}"), t);
            }
        }
        agent.stop().await;
        gw.stop().await;
    }
    if want("tput") {
        let dir = tempfile::tempdir_in(&scratch).unwrap();
        let gw = Gateway::start(&fresh_db(db, dir.path()).await, dir.path()).await;
        let org = gw.create_org(http).await;
        let a1 = AgentProc::pair(&org, http, 1).await;
        let a2 = AgentProc::pair(&org, http, 2).await;
        let t = throughput(&gw, &org, http, a.tasks, "noop").await;
        eprintln!("  [{db}] throughput, 2 agents, noop: {t}");
        out.insert("throughput_2".into(), t);
        a1.stop().await;
        a2.stop().await;
        gw.stop().await;
    }
    if want("tput") {
        let dir = tempfile::tempdir_in(&scratch).unwrap();
        let gw = Gateway::start(&fresh_db(db, dir.path()).await, dir.path()).await;
        let org = gw.create_org(http).await;
        let agent = AgentProc::pair_with(
            &org,
            http,
            1,
            &[("PADDOCK_AGENT_MAX_IN_FLIGHT", BATCHED_AGENT_MAX_IN_FLIGHT)],
        )
        .await;
        let t = throughput_batched(&gw, &org, http, a.tasks).await;
        eprintln!(
            "  [{db}] throughput, 1 agent (max in flight {BATCHED_AGENT_MAX_IN_FLIGHT}), batched submissions, noop: {t}"
        );
        out.insert("throughput_batch".into(), t);
        agent.stop().await;
        gw.stop().await;
    }
    if want("idle") && !a.idle.is_empty() {
        let dir = tempfile::tempdir_in(&scratch).unwrap();
        let gw = Gateway::start(&fresh_db(db, dir.path()).await, dir.path()).await;
        let org = gw.create_org(http).await;
        let r = idle_rss(&gw, &org, http, &a.idle).await;
        out.insert("idle_rss".into(), r);
        let log = std::fs::read_to_string(&gw.log).unwrap_or_default();
        if !log.trim().is_empty() {
            eprintln!("  [{db}] gateway log (warnings):\n{}", tail(&log, 10));
        }
        gw.stop().await;
    }
    Value::Object(out)
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Raises the open-file limit to the hard limit (and the hard limit to 65536 when allowed),
/// for this process and the gateways it starts.
fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let want = hard.max(65_536);
    if setrlimit(Resource::RLIMIT_NOFILE, want, want).is_err() {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    }
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if let Some(i) = argv.iter().position(|a| a == "--echo-server") {
        let reply: usize = argv[i + 1].parse().unwrap();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(floor::serve(reply));
        return;
    }
    raise_nofile();
    let a = parse_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // The measurements run as a task on a worker (as `paddock` itself does), not in
    // `block_on` on this thread: no hand-off from the worker that saw a reply to a parked main
    // thread. The floor and Paddock are measured the same way.
    let main = rt.spawn(async move {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .tcp_nodelay(true)
            .build()
            .unwrap();
        let mut report = serde_json::Map::new();
        let want = |s: &str| a.only.is_empty() || a.only.iter().any(|o| o == s);
        if want("floor") {
            let (req, reply) = frame_sizes();
            let s = summary(floor::measure(req, reply, a.roundtrips).await);
            eprintln!("  floor ({req} B out, {reply} B back): {s}");
            let mut s = s;
            s["request_bytes"] = json!(req);
            s["reply_bytes"] = json!(reply);
            report.insert("floor".into(), s);
        }
        let mut dbs = Vec::new();
        for db in &a.dbs {
            eprintln!("paddock on {db}");
            dbs.push(bench_db(db, &a, &http).await);
        }
        report.insert("paddock".into(), Value::Array(dbs));
        report.insert(
            "config".into(),
            json!({ "roundtrips": a.roundtrips, "tasks": a.tasks, "idle": a.idle }),
        );
        let text = serde_json::to_string_pretty(&Value::Object(report)).unwrap();
        match &a.json {
            Some(p) => std::fs::write(p, text).unwrap(),
            None => println!("{text}"),
        }
    });
    rt.block_on(main).unwrap();
}
