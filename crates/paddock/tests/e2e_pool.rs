//! End-to-end: the warm-pool supervisor (`paddock pool run|reconcile`, process provider)
//! against the real gateway, on SQLite and on PostgreSQL; `POST /api/spawn` on a warm
//! one-shot pool instance.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use tokio::process::Child;

on_both_databases!(
    burst_of_one_shot_tasks_with_a_supervisor_crash,
    dry_run_changes_nothing,
    orphans_are_removed_after_the_grace,
    command_provider_runs_the_local_vm_scripts,
    spawn_runs_on_a_warm_one_shot_pool_instance,
);

/// The environment marker the process provider sets on every instance process.
const MARKER: &str = "PADDOCK_POOL_PROCESS_DIR";

async fn setup(db: Db) -> Option<(GatewayProc, Org, tempfile::TempDir)> {
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_db(db, dir.path()).await?;
    let gw = GatewayProc::start(&url, &[]).await;
    let org = gw.create_org("acme").await;
    Some((gw, org, dir))
}

/// Kills every instance process started under `state` when dropped (a failed test leaves
/// nothing behind).
struct Reaper(PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        for pids in agent_processes(&self.0).values() {
            for pid in pids {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(*pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// Live instance processes whose provider directory is under `state`: instance id -> pids.
fn agent_processes(state: &Path) -> BTreeMap<String, Vec<i32>> {
    let prefix = format!("{MARKER}={}", state.display());
    let mut out: BTreeMap<String, Vec<i32>> = BTreeMap::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let state_char = stat[stat.rfind(')').unwrap() + 1..].trim().chars().next();
        if matches!(state_char, Some('Z' | 'X')) {
            continue;
        }
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let vars: Vec<String> = environ
            .split(|b| *b == 0)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect();
        if !vars.iter().any(|v| v.starts_with(&prefix)) {
            continue;
        }
        if let Some(id) = vars.iter().find_map(|v| v.strip_prefix("VM_INSTANCE_ID=")) {
            out.entry(id.to_string()).or_default().push(pid);
        }
    }
    out
}

/// A `paddock pool run` process.
struct Supervisor {
    child: Option<Child>,
    log: PathBuf,
}

impl Supervisor {
    fn start(org: &Org, args: &[String], log: &Path) -> Supervisor {
        Self::start_with_env(org, args, log, &[])
    }

    /// With extra environment (`PADDOCK_AGENT_*` reaches the instances).
    fn start_with_env(org: &Org, args: &[String], log: &Path, env: &[(&str, &str)]) -> Supervisor {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = org
            .cli(log.parent().unwrap())
            .args(["pool", "run"])
            .args(args)
            .env("PADDOCK_AGENT_SHUTDOWN_GRACE_SEC", "5")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        Supervisor {
            child: Some(child),
            log: log.to_path_buf(),
        }
    }

    async fn kill(&mut self) {
        let mut c = self.child.take().unwrap();
        c.kill().await.unwrap();
    }

    async fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().unwrap();
        signal(&c, nix::sys::signal::Signal::SIGTERM);
        tokio::time::timeout(Duration::from_secs(30), c.wait())
            .await
            .expect("supervisor stops on SIGTERM")
            .unwrap()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// `paddock pool reconcile` once; returns the exit code and stdout followed by stderr.
async fn reconcile(org: &Org, args: &[String], home: &Path) -> (i32, String) {
    let (code, stdout, stderr) = reconcile_split(org, args, home).await;
    (code, stdout + &stderr)
}

async fn reconcile_split(org: &Org, args: &[String], home: &Path) -> (i32, String, String) {
    let out = org
        .cli(home)
        .args(["pool", "reconcile"])
        .args(args)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains(&org.token),
        "the API token leaked: {stderr}"
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr.into_owned(),
    )
}

fn args(pool: &str, state: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
        "--pool",
        pool,
        "--labels",
        &format!("{pool}-label"),
        "--provider",
        "process",
        "--state-dir",
        &state.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

async fn pool_state(org: &Org, pool: &str) -> Value {
    let a = org.get(&org.p(&format!("/pools/{pool}"))).await;
    assert_eq!(a.status, 200, "{a:?}");
    a.body
}

async fn all_instances(org: &Org, pool: &str) -> Vec<Value> {
    let a = org
        .get(&org.p(&format!("/instances?pool={pool}&all=true")))
        .await;
    assert_eq!(a.status, 200, "{a:?}");
    a.body.as_array().unwrap().clone()
}

fn statuses(state: &Value) -> Vec<String> {
    let mut v: Vec<String> = state["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["status"].as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

/// Polls until `pred` holds on the pool's state.
async fn wait_pool(
    org: &Org,
    pool: &str,
    within: Duration,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let a = org.get(&org.p(&format!("/pools/{pool}"))).await;
        // 404 until the supervisor configured the pool.
        assert!(a.status == 200 || a.status == 404, "{a:?}");
        if a.status == 200 && pred(&a.body) {
            return a.body;
        }
        let s = a.body;
        assert!(
            Instant::now() < deadline,
            "{what}: not reached in {within:?}: {s}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The largest number of instances alive at once, from their creation and termination
/// times (a termination at the same millisecond as a creation comes first: the gateway
/// counts the slot free once terminated).
fn max_overlap(instances: &[Value]) -> i64 {
    let mut events: Vec<(i64, i64)> = Vec::new();
    for i in instances {
        events.push((i["createdAt"].as_i64().unwrap(), 1));
        if let Some(t) = i["terminatedAt"].as_i64() {
            events.push((t, -1));
        }
    }
    events.sort();
    let (mut live, mut max) = (0, 0);
    for (_, d) in events {
        live += d;
        max = max.max(live);
    }
    max
}

async fn burst_of_one_shot_tasks_with_a_supervisor_crash(db: Db) {
    let Some((_gw, org, dir)) = setup(db).await else {
        return;
    };
    let state = dir.path().join("state");
    let _reaper = Reaper(state.clone());
    let out = dir.path().join("out");
    let pool = "burst";
    let sup_args = args(
        pool,
        &state,
        &[
            "--min",
            "2",
            "--max",
            "4",
            "--max-use",
            "1",
            "--interval",
            "1s",
            "--orphan-grace",
            "2s",
            "--boot-deadline",
            "30s",
            "--kill-grace",
            "5s",
            "--status-out",
            &out.join("status.json").display().to_string(),
            "--inventory-out",
            &out.join("inventory.json").display().to_string(),
        ],
    );
    let mut sup = Supervisor::start(&org, &sup_args, &dir.path().join("supervisor.log"));

    // The floor: two ready instances before any demand.
    wait_pool(&org, pool, Duration::from_secs(60), "2 ready", |s| {
        statuses(s) == ["ready", "ready"]
    })
    .await;

    // A burst of 20 one-shot tasks for the pool's label.
    let mut tasks = Vec::new();
    for i in 0..20 {
        tasks.push(
            org.submit(json!({
                "kind": "agent.execute",
                "selector": {"tag": format!("{pool}-label")},
                "shell": {"script": format!("echo task-{i}; sleep 0.3")},
            }))
            .await,
        );
    }
    // Mid-burst, the supervisor is killed (no chance to clean up) and restarted.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut finished = 0;
        for t in &tasks {
            if org.task(t).await["state"] == "succeeded" {
                finished += 1;
            }
        }
        if finished >= 6 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the burst does not progress: {}",
            sup.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sup.kill().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut sup = Supervisor::start(&org, &sup_args, &dir.path().join("supervisor2.log"));

    // Every task succeeds, each on its own instance of the pool.
    let mut agents = BTreeSet::new();
    for t in &tasks {
        let done = org.wait_done(t, Duration::from_secs(180)).await;
        assert_eq!(done["state"], "succeeded", "{done}");
        agents.insert(done["agentId"].as_str().unwrap().to_string());
    }
    assert_eq!(agents.len(), 20, "one task per instance: {agents:?}");

    // The floor is restored: exactly two ready instances, one process each, and no other
    // instance process left anywhere.
    let settled = wait_pool(&org, pool, Duration::from_secs(90), "floor restored", |s| {
        statuses(s) == ["ready", "ready"]
    })
    .await;
    let live: BTreeSet<String> = settled["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["instanceId"].as_str().unwrap().to_string())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let procs = agent_processes(&state);
        let ids: BTreeSet<String> = procs.keys().cloned().collect();
        if ids == live && procs.values().all(|p| p.len() == 1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "processes {procs:?} != live instances {live:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let all = all_instances(&org, pool).await;
    let ids: BTreeSet<&str> = all
        .iter()
        .map(|i| i["instanceId"].as_str().unwrap())
        .collect();
    for a in &agents {
        assert!(
            ids.contains(a.as_str()),
            "task ran on {a}, not a pool instance"
        );
    }
    for i in &all {
        assert!(i["uses"].as_u64().unwrap() <= 1, "{i}");
        if i["uses"] == 1 {
            assert_eq!(
                i["status"], "terminated",
                "a used instance is destroyed: {i}"
            );
        }
    }
    assert!(max_overlap(&all) <= 4, "more than max live: {all:?}");

    // The output files: versioned, no secret.
    let status_text = std::fs::read_to_string(out.join("status.json")).unwrap();
    let status: Value = serde_json::from_str(&status_text).unwrap();
    assert_eq!(status["version"], 1);
    assert_eq!(status["pool"], pool);
    assert_eq!(status["mode"], "run");
    assert!(status["desired"].as_u64().unwrap() >= 2);
    let inventory_text = std::fs::read_to_string(out.join("inventory.json")).unwrap();
    let inventory: Value = serde_json::from_str(&inventory_text).unwrap();
    assert_eq!(inventory["version"], 1);
    for text in [&status_text, &inventory_text, &sup.log_text()] {
        assert!(!text.contains(&org.token), "the API token leaked");
        assert!(!text.contains("VM_TOKEN="), "an instance token leaked");
    }

    // SIGTERM stops the supervisor cleanly; the instances stay up.
    let exit = sup.stop().await;
    assert!(exit.success(), "{exit:?}: {}", sup.log_text());
    let procs = agent_processes(&state);
    assert_eq!(procs.keys().cloned().collect::<BTreeSet<_>>(), live);
}

async fn dry_run_changes_nothing(db: Db) {
    let Some((_gw, org, dir)) = setup(db).await else {
        return;
    };
    let state = dir.path().join("state");
    let _reaper = Reaper(state.clone());
    let pool = "dry";
    // A pool that does not exist yet: planned from the flags, nothing created.
    let (code, out, err) = reconcile_split(
        &org,
        &args(
            pool,
            &state,
            &["--min", "2", "--max", "3", "--dry-run", "--json"],
        ),
        dir.path(),
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let status: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["dryRun"], true);
    assert_eq!(status["lastPlan"]["create"], 2);
    let a = org.get(&org.p(&format!("/pools/{pool}"))).await;
    assert_eq!(a.status, 404, "a dry run created the pool: {a:?}");
    assert!(agent_processes(&state).is_empty());

    // A real pass with min 1, then a dry run asking for more: nothing moves.
    let (code, out) = reconcile(
        &org,
        &args(pool, &state, &["--min", "1", "--max", "3"]),
        dir.path(),
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let before = pool_state(&org, pool).await;
    assert_eq!(before["instances"].as_array().unwrap().len(), 1);
    let (code, out) = reconcile(
        &org,
        &args(
            pool,
            &state,
            &["--min", "3", "--max", "3", "--target", "3", "--dry-run"],
        ),
        dir.path(),
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("would create 2"), "{out}");
    let after = pool_state(&org, pool).await;
    assert_eq!(after["pool"]["min"], 1, "the configuration is unchanged");
    assert_eq!(
        all_instances(&org, pool).await.len(),
        1,
        "no instance created"
    );
    assert_eq!(agent_processes(&state).len(), 1);
}

async fn orphans_are_removed_after_the_grace(db: Db) {
    let Some((_gw, org, dir)) = setup(db).await else {
        return;
    };
    let state = dir.path().join("state");
    let _reaper = Reaper(state.clone());
    let pool = "orph";
    let pass = |extra: &'static [&'static str]| {
        let mut a = args(
            pool,
            &state,
            &[
                "--min",
                "1",
                "--max",
                "3",
                "--orphan-grace",
                "1s",
                "--disconnect-grace",
                "10m",
            ],
        );
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let (code, out) = reconcile(&org, &pass(&[]), dir.path()).await;
    assert_eq!(code, 0, "{out}");
    let s = wait_pool(&org, pool, Duration::from_secs(60), "1 ready", |s| {
        statuses(s) == ["ready"]
    })
    .await;
    let first = s["instances"][0]["instanceId"]
        .as_str()
        .unwrap()
        .to_string();

    // 1. Provider-only: the gateway terminates the instance behind the supervisor's back
    //    (its agent is cut off, its record stays); and a live process carrying the
    //    provider's marker for an instance the gateway never heard of.
    let record = state.join(pool).join(format!("{first}.json"));
    let t = org
        .post(&org.p(&format!("/instances/{first}/terminate")), json!({}))
        .await;
    assert_eq!(t.status, 200, "{t:?}");
    assert!(record.exists());
    let stray_id = format!("stray-{}", uuid::Uuid::new_v4().simple());
    let mut stray = std::process::Command::new("sleep")
        .arg("300")
        .env(MARKER, state.join(pool))
        .env("VM_INSTANCE_ID", &stray_id)
        .process_group(0)
        .spawn()
        .unwrap();
    std::thread::spawn(move || stray.wait());
    assert!(agent_processes(&state).contains_key(&stray_id));
    // 2. Gateway-only: an instance recorded in the gateway whose runtime never started.
    let created = org
        .post(&org.p(&format!("/pools/{pool}/instances")), json!({}))
        .await;
    assert_eq!(created.status, 201, "{created:?}");
    let ghost = created.body["instance"]["instanceId"]
        .as_str()
        .unwrap()
        .to_string();

    // First sighting (a new supervisor process each time: the sightings persist): nothing
    // removed yet.
    let (code, out) = reconcile(&org, &pass(&[]), dir.path()).await;
    assert_eq!(code, 0, "{out}");
    assert!(record.exists(), "removed before the grace: {out}");
    assert!(
        agent_processes(&state).contains_key(&stray_id),
        "removed before the grace: {out}"
    );
    let ghost_now = all_instances(&org, pool)
        .await
        .into_iter()
        .find(|i| i["instanceId"] == ghost.as_str())
        .unwrap();
    assert_ne!(
        ghost_now["status"], "terminated",
        "removed before the grace"
    );

    // After the grace: both removed.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (code, out) = reconcile(&org, &pass(&[]), dir.path()).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        !record.exists(),
        "the orphan's record is still there: {out}"
    );
    assert!(!agent_processes(&state).contains_key(&first), "{out}");
    assert!(
        !agent_processes(&state).contains_key(&stray_id),
        "the stray process is still alive: {out}"
    );
    let ghost_now = all_instances(&org, pool)
        .await
        .into_iter()
        .find(|i| i["instanceId"] == ghost.as_str())
        .unwrap();
    assert_eq!(ghost_now["status"], "terminated", "{ghost_now}");
    assert!(
        ghost_now["lastError"]
            .as_str()
            .unwrap_or("")
            .contains("orphan"),
        "{ghost_now}"
    );
    // The pool is back to its floor, one process per live instance.
    let s = wait_pool(&org, pool, Duration::from_secs(60), "floor", |s| {
        statuses(s) == ["ready"]
    })
    .await;
    let live = s["instances"][0]["instanceId"]
        .as_str()
        .unwrap()
        .to_string();
    let procs = agent_processes(&state);
    assert_eq!(procs.keys().cloned().collect::<Vec<_>>(), vec![live]);
}

/// Live processes whose environment has `VM_INSTANCE_ID=<id>` (any provider).
fn processes_of_instance(id: &str) -> Vec<i32> {
    let needle = format!("VM_INSTANCE_ID={id}");
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let state_char = stat[stat.rfind(')').unwrap() + 1..].trim().chars().next();
        if matches!(state_char, Some('Z' | 'X')) {
            continue;
        }
        let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        if environ.split(|b| *b == 0).any(|v| v == needle.as_bytes()) {
            out.push(pid);
        }
    }
    out
}

/// The command provider with the seed-000 scripts (`scripts/vm/bootstrap-local.sh` to
/// create, `stop-local.sh` to destroy): one task on a fresh instance, which is then
/// destroyed and replaced.
async fn command_provider_runs_the_local_vm_scripts(db: Db) {
    let Some((_gw, org, dir)) = setup(db).await else {
        return;
    };
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/vm");
    let runtime = dir.path().join("runtime");
    let pool = "vms";
    let run = |min: &str, target: Option<&str>| {
        let mut a = args(
            pool,
            &dir.path().join("state"),
            &["--min", min, "--max", "1"],
        );
        a[5] = "command".into(); // --provider
        a.extend([
            "--create-cmd".to_string(),
            scripts.join("bootstrap-local.sh").display().to_string(),
            "--destroy-cmd".to_string(),
            scripts.join("stop-local.sh").display().to_string(),
        ]);
        if let Some(t) = target {
            a.extend(["--target".to_string(), t.to_string()]);
        }
        a
    };
    let reconcile_env = |a: Vec<String>| {
        let org = org.clone();
        let runtime = runtime.clone();
        let home = dir.path().to_path_buf();
        async move {
            let out = org
                .cli(&home)
                .args(["pool", "reconcile"])
                .args(&a)
                .env("PADDOCK_BIN", BIN)
                .env("RUNTIME_WORKDIR", &runtime)
                .env("RUNTIME_LOG_DIR", &runtime)
                .output()
                .await
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{text}");
            assert!(!text.contains(&org.token), "the API token leaked");
        }
    };
    reconcile_env(run("1", None)).await;
    let s = wait_pool(&org, pool, Duration::from_secs(60), "1 ready", |s| {
        statuses(s) == ["ready"]
    })
    .await;
    let first = s["instances"][0]["instanceId"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(processes_of_instance(&first).len(), 1);
    let task = org
        .submit(json!({
            "kind": "agent.execute",
            "selector": {"tag": format!("{pool}-label")},
            "shell": {"script": "echo on-a-vm"},
        }))
        .await;
    let done = org.wait_done(&task, Duration::from_secs(60)).await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["agentId"], first.as_str());
    wait_pool(&org, pool, Duration::from_secs(30), "drained", |s| {
        statuses(s) == ["draining"]
    })
    .await;
    // Destroyed through stop-local.sh, terminated, and replaced.
    reconcile_env(run("1", None)).await;
    let gone = all_instances(&org, pool)
        .await
        .into_iter()
        .find(|i| i["instanceId"] == first.as_str())
        .unwrap();
    assert_eq!(gone["status"], "terminated", "{gone}");
    assert!(processes_of_instance(&first).is_empty());
    let s = wait_pool(&org, pool, Duration::from_secs(60), "replaced", |s| {
        statuses(s) == ["ready"]
    })
    .await;
    let second = s["instances"][0]["instanceId"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(second, first);
    // Scaled to zero: the last runtime stops too.
    reconcile_env(run("0", Some("0"))).await;
    assert!(processes_of_instance(&second).is_empty());
    assert!(
        pool_state(&org, pool).await["instances"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

/// `paddock bundle push` of `dir` as `workflow` (shell runtime, entrypoint `main.sh`) for `org`.
async fn push_shell_bundle(org: &Org, dir: &Path, workflow: &str) -> Value {
    let out = org
        .cli(dir)
        .args(["bundle", "push"])
        .arg(dir)
        .args(["--workflow", workflow, "--runtime", "shell"])
        .args(["--entrypoint", "main.sh", "--json"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A spawn route called with `org`'s token (no `X-Org-Id` unless given).
async fn spawn_call(
    org: &Org,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
    org_header: Option<&str>,
) -> Answer {
    org.call_as(&org.token, org_header, method, path, body)
        .await
}

/// Polls a spawn's status until its run is finished.
async fn wait_spawn_done(org: &Org, vm: &str, sup: &Supervisor) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let a = spawn_call(
            org,
            reqwest::Method::GET,
            &format!("/api/spawn/{vm}/status"),
            None,
            None,
        )
        .await;
        assert_eq!(a.status, 200, "{a:?}");
        if matches!(
            a.body["status"].as_str(),
            Some("succeeded" | "failed" | "timed_out" | "canceled")
        ) {
            return a.body;
        }
        assert!(
            Instant::now() < deadline,
            "spawn {vm} not finished: {}\n{}",
            a.body,
            sup.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn active_spawns(list: &Answer) -> Vec<String> {
    assert_eq!(list.status, 200, "{list:?}");
    list.body["spawns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["vmId"].as_str().unwrap().to_string())
        .collect()
}

/// Seed 001 on a warm pool: a one-shot pool (`--max-use 1`, min 1, max 1, labelled `spawn`)
/// keeps one ready instance; `POST /api/spawn` naming the pool runs a shell bundle on that
/// instance (no bootstrap command is configured, so the caller's-instance path could not
/// have served it); `DELETE` releases the spawn, the used instance is destroyed and
/// terminated, and the pool refills with a new one, which then serves a spawn naming no
/// pool (the org's pool labelled `spawn`). Another org naming the pool gets
/// `404 NOT_FOUND`, and its token with this org's `X-Org-Id` `403 ORG_MISMATCH`. A spawn
/// released mid-run is canceled and its instance destroyed as well.
async fn spawn_runs_on_a_warm_one_shot_pool_instance(db: Db) {
    let Some((gw, org, dir)) = setup(db).await else {
        return;
    };
    let state = dir.path().join("state");
    let _reaper = Reaper(state.clone());
    let pool = "warm";
    let mut sup_args = args(
        pool,
        &state,
        &[
            "--min",
            "1",
            "--max",
            "1",
            "--max-use",
            "1",
            "--interval",
            "1s",
            "--boot-deadline",
            "30s",
            "--kill-grace",
            "5s",
        ],
    );
    sup_args[3] = "spawn".into(); // --labels
    let cache = dir.path().join("bundle-cache");
    let sup = Supervisor::start_with_env(
        &org,
        &sup_args,
        &dir.path().join("supervisor.log"),
        &[("PADDOCK_AGENT_BUNDLE_CACHE", cache.to_str().unwrap())],
    );
    let s = wait_pool(&org, pool, Duration::from_secs(60), "1 ready", |s| {
        statuses(s) == ["ready"]
    })
    .await;
    let first = s["instances"][0]["instanceId"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(s["pool"]["maxUse"], 1, "{s}");

    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("main.sh"), "echo \"shell says $*\"\n").unwrap();
    let pushed = push_shell_bundle(&org, &src, "hello-sh").await;
    assert_eq!(pushed["version"], 1, "{pushed}");

    // 1. Naming the pool: the run happens on its warm instance.
    let a = spawn_call(
        &org,
        reqwest::Method::POST,
        "/api/spawn",
        Some(json!({"workflow_id": "hello-sh", "pool": pool, "args": ["warm"]})),
        None,
    )
    .await;
    assert_eq!(a.status, 202, "{a:?}");
    let vm = a.body["vmId"].as_str().unwrap().to_string();
    let done = wait_spawn_done(&org, &vm, &sup).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["exitCode"], 0, "{done}");
    assert_eq!(done["logs"], "shell says warm\n", "{done}");
    assert_eq!(
        done["instanceId"],
        first.as_str(),
        "ran on the warm instance"
    );
    let members: BTreeSet<String> = all_instances(&org, pool)
        .await
        .iter()
        .map(|i| i["instanceId"].as_str().unwrap().to_string())
        .collect();
    assert!(members.contains(&first), "{members:?}");
    let task = org.task(done["taskId"].as_str().unwrap()).await;
    assert_eq!(task["kind"], "bundle.run", "{task}");
    assert_eq!(task["agentId"], first.as_str(), "{task}");
    // The bundle went through the instance's digest cache.
    let cached = cache.join("sha256").join(format!(
        "{}.tar.zst",
        pushed["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:")
    ));
    assert!(cached.is_file(), "{} not cached", cached.display());

    // 2. Listed, then released: the one-shot instance is destroyed and terminated, and
    //    the pool refills.
    let list = spawn_call(&org, reqwest::Method::GET, "/api/spawn", None, None).await;
    assert!(active_spawns(&list).contains(&vm), "{list:?}");
    let del = spawn_call(
        &org,
        reqwest::Method::DELETE,
        &format!("/api/spawn/{vm}"),
        None,
        None,
    )
    .await;
    assert_eq!(del.status, 200, "{del:?}");
    assert_eq!(del.body["status"], "released", "{del:?}");
    let list = spawn_call(&org, reqwest::Method::GET, "/api/spawn", None, None).await;
    assert!(!active_spawns(&list).contains(&vm), "{list:?}");
    let s = wait_pool(&org, pool, Duration::from_secs(60), "refilled", |s| {
        statuses(s) == ["ready"] && s["instances"][0]["instanceId"] != first.as_str()
    })
    .await;
    let second = s["instances"][0]["instanceId"]
        .as_str()
        .unwrap()
        .to_string();
    let gone = all_instances(&org, pool)
        .await
        .into_iter()
        .find(|i| i["instanceId"] == first.as_str())
        .unwrap();
    assert_eq!(gone["status"], "terminated", "{gone}");
    assert_eq!(gone["uses"], 1, "{gone}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while agent_processes(&state).contains_key(&first) {
        assert!(
            Instant::now() < deadline,
            "the used instance's process is alive"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 3. Another org's pool of that name does not exist for it, whatever its workflows.
    let other = gw.create_org("other").await;
    push_shell_bundle(&other, &src, "hello-sh").await;
    let refused = spawn_call(
        &other,
        reqwest::Method::POST,
        "/api/spawn",
        Some(json!({"workflow_id": "hello-sh", "pool": pool})),
        None,
    )
    .await;
    assert_eq!(
        (refused.status, refused.code()),
        (404, "NOT_FOUND"),
        "{refused:?}"
    );
    let mismatch = spawn_call(
        &other,
        reqwest::Method::POST,
        "/api/spawn",
        Some(json!({"workflow_id": "hello-sh", "pool": pool})),
        Some(&org.id),
    )
    .await;
    assert_eq!(
        (mismatch.status, mismatch.code()),
        (403, "ORG_MISMATCH"),
        "{mismatch:?}"
    );
    let theirs = spawn_call(&other, reqwest::Method::GET, "/api/spawn", None, None).await;
    assert!(active_spawns(&theirs).is_empty(), "{theirs:?}");
    let peek = spawn_call(
        &other,
        reqwest::Method::GET,
        &format!("/api/spawn/{vm}/status"),
        None,
        None,
    )
    .await;
    assert_eq!((peek.status, peek.code()), (404, "NOT_FOUND"), "{peek:?}");
    let s = pool_state(&org, pool).await;
    assert_eq!(statuses(&s), ["ready"], "nothing was sent to the pool: {s}");
    assert_eq!(s["instances"][0]["uses"], 0, "{s}");

    // 4. Naming no pool: the org's pool labelled `spawn` serves it, on the new instance.
    let a = spawn_call(
        &org,
        reqwest::Method::POST,
        "/api/spawn",
        Some(json!({"workflow_id": "hello-sh", "args": ["again"]})),
        None,
    )
    .await;
    assert_eq!(a.status, 202, "{a:?}");
    let vm2 = a.body["vmId"].as_str().unwrap().to_string();
    let done = wait_spawn_done(&org, &vm2, &sup).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["logs"], "shell says again\n", "{done}");
    assert_eq!(done["instanceId"], second.as_str(), "{done}");

    // 5. Released mid-run: the run is canceled and its one-shot instance destroyed too.
    let s = wait_pool(&org, pool, Duration::from_secs(60), "refilled again", |s| {
        statuses(s) == ["ready"] && s["instances"][0]["instanceId"] != second.as_str()
    })
    .await;
    let third = s["instances"][0]["instanceId"]
        .as_str()
        .unwrap()
        .to_string();
    let slow = dir.path().join("slow");
    std::fs::create_dir_all(&slow).unwrap();
    std::fs::write(slow.join("main.sh"), "echo started; sleep 60\n").unwrap();
    push_shell_bundle(&org, &slow, "slow").await;
    let a = spawn_call(
        &org,
        reqwest::Method::POST,
        "/api/spawn",
        Some(json!({"workflow_id": "slow"})),
        None,
    )
    .await;
    assert_eq!(a.status, 202, "{a:?}");
    let vm3 = a.body["vmId"].as_str().unwrap().to_string();
    let task3 = a.body["taskId"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = spawn_call(
            &org,
            reqwest::Method::GET,
            &format!("/api/spawn/{vm3}/status"),
            None,
            None,
        )
        .await;
        if st.body["status"] == "running" && st.body["logs"] == "started\n" {
            assert_eq!(st.body["instanceId"], third.as_str(), "{st:?}");
            break;
        }
        assert!(Instant::now() < deadline, "never running: {st:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t0 = Instant::now();
    let del = spawn_call(
        &org,
        reqwest::Method::DELETE,
        &format!("/api/spawn/{vm3}"),
        None,
        None,
    )
    .await;
    assert_eq!(
        (del.status, &del.body["status"]),
        (200, &json!("released")),
        "{del:?}"
    );
    let t = org.wait_done(&task3, Duration::from_secs(30)).await;
    assert_eq!(t["state"], "canceled", "{t}");
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "the run was not stopped"
    );
    wait_pool(
        &org,
        pool,
        Duration::from_secs(60),
        "refilled a third time",
        |s| statuses(s) == ["ready"] && s["instances"][0]["instanceId"] != third.as_str(),
    )
    .await;
    let gone = all_instances(&org, pool)
        .await
        .into_iter()
        .find(|i| i["instanceId"] == third.as_str())
        .unwrap();
    assert_eq!(gone["status"], "terminated", "{gone}");
    assert!(!agent_processes(&state).contains_key(&third));

    for text in [sup.log_text(), gw.log_text()] {
        assert!(!text.contains(&org.token), "the API token leaked");
        assert!(!text.contains(&other.token), "the API token leaked");
    }
}
