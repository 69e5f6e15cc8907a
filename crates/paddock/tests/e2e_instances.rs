//! Instances on demand (issue 4, seed 000), end to end with the real binary: the gateway runs
//! a bootstrap command that fails twice then starts `scripts/vm/bootstrap-local.sh`; the
//! runtime connects to `/ws/vm`; `paddock run --instance self` retries until it is ready.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{BIN, Db, GatewayProc, Org, fresh_db};
use reqwest::Method;
use serde_json::{Value, json};

fn repo_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../scripts/vm")
        .join(name)
        .canonicalize()
        .unwrap()
}

/// A bootstrap command for tests: records each attempt (time, env names, never the token),
/// fails while `$STATE/fail-<user>` holds a positive count (decrementing it) or
/// `$STATE/always-fail-<user>` exists, then runs the real local bootstrap script.
fn write_boot_script(dir: &Path) -> PathBuf {
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let path = dir.join("boot.sh");
    let script = format!(
        r#"#!/bin/sh
set -eu
S={state}
u="$VM_USER_ID"
echo "$(date +%s%3N) $VM_INSTANCE_ID" >>"$S/attempts-$u"
{{ echo "VM_USER_ID=$VM_USER_ID"; echo "VM_ORG_ID=$VM_ORG_ID"; echo "VM_INSTANCE_ID=$VM_INSTANCE_ID";
   echo "VM_MODE=$VM_MODE"; echo "CONTROL_PLANE_WS=$CONTROL_PLANE_WS"; echo "VM_TICKET=${{VM_TICKET:-}}";
   [ -n "$VM_TOKEN" ] && echo "VM_TOKEN=<set>"; }} >"$S/env-$u"
if [ -f "$S/always-fail-$u" ]; then echo "boom (always) for $u" >&2; exit 9; fi
n=$(cat "$S/fail-$u" 2>/dev/null || echo 0)
if [ "$n" -gt 0 ]; then echo $((n - 1)) >"$S/fail-$u"; echo "boom $n; token $VM_TOKEN" >&2; exit 7; fi
exec {boot}
"#,
        state = state.display(),
        boot = repo_script("bootstrap-local.sh").display(),
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    path
}

struct Env {
    gw: GatewayProc,
    org: Org,
    dir: tempfile::TempDir,
}

impl Env {
    async fn start(db: Db, cooldown_ms: u64, max_attempts: u32) -> Option<Env> {
        let dir = tempfile::tempdir().unwrap();
        let url = fresh_db(db, dir.path()).await?;
        let boot = write_boot_script(dir.path());
        let runtime = dir.path().join("runtime");
        let logs = dir.path().join("logs");
        let gw = GatewayProc::start(
            &url,
            &[
                ("PADDOCK_BOOTSTRAP_CMD", boot.to_str().unwrap()),
                ("VM_BOOTSTRAP_COOLDOWN_MS", &cooldown_ms.to_string()),
                ("VM_BOOTSTRAP_MAX_ATTEMPTS", &max_attempts.to_string()),
                ("VM_BOOT_TIMEOUT_MS", "20000"),
                ("RUNTIME_WORKDIR", runtime.to_str().unwrap()),
                ("RUNTIME_LOG_DIR", logs.to_str().unwrap()),
                ("PADDOCK_AGENT_HOST_KILL_GRACE_MS", "200"),
                ("PADDOCK_AGENT_SHUTDOWN_GRACE_SEC", "2"),
                (
                    "PADDOCK_AGENT_BUNDLE_CACHE",
                    dir.path().join("bundle-cache").to_str().unwrap(),
                ),
                (
                    "PADDOCK_OBJECT_STORE_URL",
                    &format!("file://{}", dir.path().join("objects").display()),
                ),
            ],
        )
        .await;
        let org = gw.create_org("acme").await;
        Some(Env { gw, org, dir })
    }

    fn state(&self, file: &str) -> PathBuf {
        self.dir.path().join("state").join(file)
    }

    fn attempts(&self, user: &str) -> Vec<i64> {
        std::fs::read_to_string(self.state(&format!("attempts-{user}")))
            .unwrap_or_default()
            .lines()
            .map(|l| l.split(' ').next().unwrap().parse().unwrap())
            .collect()
    }

    async fn vm(&self, method: Method, path: &str, user: Option<&str>) -> (u16, Value) {
        let mut b = common::http()
            .request(method, format!("{}{path}", self.org.url))
            .bearer_auth(&self.org.token);
        if let Some(u) = user {
            b = b.header("X-User-Id", u);
        }
        let resp = b.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn wait_status(&self, user: Option<&str>, want: &str, within: Duration) -> Value {
        let t0 = Instant::now();
        loop {
            let (_, v) = self.vm(Method::GET, "/api/v1/vm/status", user).await;
            if v["status"] == want {
                return v;
            }
            assert!(
                t0.elapsed() < within,
                "instance never {want}: {v}\n{}",
                self.gw.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `paddock run --instance self` as a user would run it.
    async fn paddock_run(&self, extra: &[&str], cmd: &[&str]) -> std::process::Output {
        let mut c = tokio::process::Command::new(BIN);
        c.arg("run")
            .arg("--instance")
            .arg("self")
            .args(extra)
            .arg("--")
            .args(cmd)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("PADDOCK_API_URL", &self.org.url)
            .env("PADDOCK_TOKEN", &self.org.token)
            .env("PADDOCK_ORG_ID", &self.org.id);
        tokio::time::timeout(Duration::from_secs(60), c.output())
            .await
            .expect("paddock run finishes")
            .unwrap()
    }

    /// Stops every runtime the local scripts started.
    fn stop_runtimes(&self) {
        let runtime = self.dir.path().join("runtime");
        let Ok(entries) = std::fs::read_dir(&runtime) else {
            return;
        };
        for e in entries.flatten() {
            let _ = std::process::Command::new(repo_script("stop-local.sh"))
                .env("VM_INSTANCE_ID", e.file_name())
                .env("RUNTIME_WORKDIR", &runtime)
                .env("RUNTIME_LOG_DIR", self.dir.path().join("logs"))
                .output();
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.stop_runtimes();
    }
}

/// Seed 000, section 4: the first two bootstraps fail, the third starts the runtime, and the
/// client's retries end in the command's output. Attempts are counted, the cooldown is
/// honoured between attempts, and the token never reaches the client or the logs.
async fn chat_retries_until_the_instance_is_ready(db: Db) {
    let cooldown = 800;
    let Some(env) = Env::start(db, cooldown, 5).await else {
        return;
    };
    let (s, v) = env.vm(Method::GET, "/api/v1/vm/status", None).await;
    assert_eq!((s, v["status"].as_str()), (200, Some("none")), "{v}");
    let me = format!("token:{}", owner_token_id(&env).await);
    std::fs::write(env.state(&format!("fail-{me}")), "2").unwrap();

    let out = env
        .paddock_run(
            &["--instance-wait", "45s"],
            &["sh", "-c", "echo hello from $(hostname)"],
        )
        .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {stderr}\n{}",
        env.gw.log_text()
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("hello from"),
        "{out:?}"
    );
    assert!(
        stderr.contains("INSTANCE_NOT_READY") || stderr.contains("retry after"),
        "{stderr}"
    );

    let attempts = env.attempts(&me);
    assert_eq!(attempts.len(), 3, "two failures then success: {attempts:?}");
    for w in attempts.windows(2) {
        assert!(
            w[1] - w[0] >= cooldown as i64,
            "a retry came inside the cooldown: {attempts:?}"
        );
    }
    let st = env
        .wait_status(None, "ready", Duration::from_secs(10))
        .await;
    assert_eq!(st["bootstrapAttempts"], 3, "{st}");
    assert_eq!(st["lastError"], Value::Null, "cleared on connection: {st}");
    assert_eq!(st["retryAfterMs"], Value::Null);
    let id = st["instanceId"].as_str().unwrap().to_string();

    // The command got the seed's environment.
    let env_seen = std::fs::read_to_string(env.state(&format!("env-{me}"))).unwrap();
    for line in [
        format!("VM_USER_ID={me}"),
        format!("VM_ORG_ID={}", env.org.id),
        format!("VM_INSTANCE_ID={id}"),
        "VM_MODE=user".into(),
        format!("CONTROL_PLANE_WS=ws://127.0.0.1:{}/ws/vm", env.gw.port),
        "VM_TOKEN=<set>".into(),
    ] {
        assert!(
            env_seen.lines().any(|l| l == line),
            "{line} missing in {env_seen}"
        );
    }
    // The instance is listed, with its agent's tags; the second run reuses it at once.
    let inst = env.org.get(&env.org.p(&format!("/instances/{id}"))).await;
    assert_eq!(inst.status, 200, "{inst:?}");
    assert_eq!(inst.body["mode"], "user");
    let t0 = Instant::now();
    let out = env.paddock_run(&[], &["echo", "again"]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "again\n");
    assert!(t0.elapsed() < Duration::from_secs(20));
    assert_eq!(
        env.attempts(&me).len(),
        3,
        "a ready instance is not bootstrapped again"
    );

    // The failed attempts' stderr (which echoed the token) was redacted before storage.
    let log = env.gw.log_text();
    assert!(
        !log.contains("pvm1."),
        "an instance token leaked into the gateway log"
    );
    let metrics = common::http()
        .get(format!("{}/metrics", env.gw.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("paddock_bootstrap_failures_total 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("paddock_instances{state=\"ready\"} 1"),
        "{metrics}"
    );
}

async fn owner_token_id(env: &Env) -> String {
    let v = common::http()
        .get(format!("{}/v1/whoami", env.org.url))
        .bearer_auth(&env.org.token)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    v["tokenId"].as_str().expect("whoami tokenId").to_string()
}

/// After `VM_BOOTSTRAP_MAX_ATTEMPTS` failures the instance is `failed` with its last error;
/// submissions answer `INSTANCE_FAILED` and trigger nothing; rebootstrap restarts it.
async fn max_attempts_then_failed_and_rebootstrap_revives(db: Db) {
    let Some(env) = Env::start(db, 300, 3).await else {
        return;
    };
    let user = "bob";
    std::fs::write(env.state(&format!("always-fail-{user}")), "").unwrap();
    let spec = json!({"kind": "agent.execute", "selector": {"instance": "self"}, "shell": {"argv": ["true"]}});
    let t0 = Instant::now();
    let last = loop {
        let a = submit_as(&env, user, &spec).await;
        if a.1["code"] == "INSTANCE_FAILED" {
            break a;
        }
        assert_eq!(a.0, 503, "{a:?}");
        assert_eq!(a.1["code"], "INSTANCE_NOT_READY", "{a:?}");
        assert!(a.1["retryAfterMs"].as_u64().is_some(), "{a:?}");
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "never failed: {a:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(last.0, 503);
    assert_eq!(last.1["bootstrapAttempts"], 3, "{last:?}");
    assert!(
        last.1["lastError"]
            .as_str()
            .unwrap()
            .contains("boom (always)"),
        "{last:?}"
    );
    assert_eq!(env.attempts(user).len(), 3);
    let st = env
        .wait_status(Some(user), "failed", Duration::from_secs(5))
        .await;
    assert_eq!(st["bootstrapAttempts"], 3);
    // Failed: no more triggers, however often asked.
    for _ in 0..3 {
        assert_eq!(
            submit_as(&env, user, &spec).await.1["code"],
            "INSTANCE_FAILED"
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(env.attempts(user).len(), 3);

    // A member cannot act for another user.
    let member = env
        .org
        .post(
            &env.org.p("/tokens"),
            json!({"name": "m", "role": "member"}),
        )
        .await;
    let member_token = member.body["token"].as_str().unwrap().to_string();
    let denied = common::http()
        .get(format!("{}/api/v1/vm/status", env.org.url))
        .bearer_auth(&member_token)
        .header("X-User-Id", user)
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status().as_u16(), 403);

    // Rebootstrap: fixed script, attempts restart at 1, ready, and the task runs.
    std::fs::remove_file(env.state(&format!("always-fail-{user}"))).unwrap();
    let (s, v) = env
        .vm(Method::POST, "/api/v1/vm/rebootstrap", Some(user))
        .await;
    assert_eq!(s, 202, "{v}");
    assert_eq!(v["triggered"], true);
    assert!(
        matches!(v["status"].as_str(), Some("provisioning" | "ready")),
        "{v}"
    );
    assert_eq!(v["bootstrapAttempts"], 1);
    env.wait_status(Some(user), "ready", Duration::from_secs(15))
        .await;
    let done = submit_as(&env, user, &spec).await;
    assert_eq!(done.0, 202, "{done:?}");
}

async fn submit_as(env: &Env, user: &str, spec: &Value) -> (u16, Value) {
    let resp = common::http()
        .post(format!("{}{}", env.org.url, env.org.p("/tasks")))
        .bearer_auth(&env.org.token)
        .header("X-Org-Id", &env.org.id)
        .header("X-User-Id", user)
        .json(spec)
        .send()
        .await
        .unwrap();
    let s = resp.status().as_u16();
    (s, resp.json().await.unwrap())
}

/// A disconnected instance inside the cooldown is not re-triggered; rebootstrap bypasses
/// the cooldown.
async fn cooldown_holds_and_rebootstrap_bypasses_it(db: Db) {
    let Some(env) = Env::start(db, 120_000, 5).await else {
        return;
    };
    let out = env.paddock_run(&[], &["echo", "one"]).await;
    assert_eq!(out.status.code(), Some(0), "{out:?}\n{}", env.gw.log_text());
    let me = format!("token:{}", owner_token_id(&env).await);
    assert_eq!(env.attempts(&me).len(), 1);
    let st = env.wait_status(None, "ready", Duration::from_secs(5)).await;
    let id = st["instanceId"].as_str().unwrap().to_string();

    // The runtime goes away: `disconnected`.
    let stop = std::process::Command::new(repo_script("stop-local.sh"))
        .env("VM_INSTANCE_ID", &id)
        .env("RUNTIME_WORKDIR", env.dir.path().join("runtime"))
        .env("RUNTIME_LOG_DIR", env.dir.path().join("logs"))
        .output()
        .unwrap();
    assert!(stop.status.success(), "{stop:?}");
    env.wait_status(None, "disconnected", Duration::from_secs(10))
        .await;

    // Inside the cooldown: not re-triggered; told how long to wait.
    let spec = json!({"kind": "agent.execute", "selector": {"instance": "self"}, "shell": {"argv": ["true"]}});
    let a = env.org.post(&env.org.p("/tasks"), spec.clone()).await;
    assert_eq!((a.status, a.code()), (503, "INSTANCE_NOT_READY"), "{a:?}");
    assert!(a.body["retryAfterMs"].as_u64().unwrap() > 60_000, "{a:?}");
    assert_eq!(a.body["status"], "disconnected");
    assert_eq!(env.attempts(&me).len(), 1);

    // Rebootstrap bypasses it.
    let t0 = Instant::now();
    let (s, v) = env.vm(Method::POST, "/api/v1/vm/rebootstrap", None).await;
    assert_eq!(s, 202, "{v}");
    env.wait_status(None, "ready", Duration::from_secs(15))
        .await;
    assert!(t0.elapsed() < Duration::from_secs(60));
    assert_eq!(env.attempts(&me).len(), 2);
    let out = env.paddock_run(&[], &["echo", "two"]).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "two\n", "{out:?}");

    // `paddock vm status --json` shows the same.
    let cli = tokio::process::Command::new(BIN)
        .args(["vm", "status", "--json"])
        .env("PADDOCK_API_URL", &env.org.url)
        .env("PADDOCK_TOKEN", &env.org.token)
        .output()
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&cli.stdout).unwrap();
    assert_eq!(v["status"], "ready", "{cli:?}");
    assert_eq!(v["bootstrapAttempts"], 1, "rebootstrap restarts the count");
}

/// `/ws/vm` accepts only valid, unexpired tokens of live instances, and a terminated
/// instance's runtime is cut off.
async fn instance_tokens_are_checked(db: Db) {
    let Some(env) = Env::start(db, 1000, 5).await else {
        return;
    };
    let ws = format!("ws://127.0.0.1:{}/ws/vm", env.gw.port);
    let code = |status: u16, body: &str| -> (u16, String) {
        let v: Value = serde_json::from_str(body).unwrap_or_default();
        (status, v["code"].as_str().unwrap_or("").to_string())
    };
    let try_connect = |token: String| {
        let ws = ws.clone();
        async move {
            let mut req =
                tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                    ws.as_str(),
                )
                .unwrap();
            req.headers_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
            match tokio_tungstenite::connect_async(req).await {
                Ok(_) => (101, String::new()),
                Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                    let body = String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default())
                        .into_owned();
                    code(resp.status().as_u16(), &body)
                }
                Err(e) => panic!("{e}"),
            }
        }
    };
    assert_eq!(
        try_connect("pvm1.x.y.99999999999999.00".into()).await,
        (401, "INSTANCE_TOKEN_INVALID".into())
    );
    // A pool instance's token (from the pool API) lets its runtime in; once terminated, not.
    let pool = env
        .org
        .call(
            Method::PUT,
            &env.org.p("/pools/ci"),
            Some(json!({"provider": "process", "labels": ["ci"], "min": 0, "max": 2, "maxUse": 1})),
        )
        .await;
    assert_eq!(pool.status, 200, "{pool:?}");
    let made = env
        .org
        .post(&env.org.p("/pools/ci/instances"), json!({}))
        .await;
    assert_eq!(made.status, 201, "{made:?}");
    let token = made.body["token"].as_str().unwrap().to_string();
    let id = made.body["instance"]["instanceId"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(made.body["env"]["VM_MODE"], "pool");
    assert_eq!(made.body["env"]["VM_POOL"], "ci");
    // Tampered: another instance id under the same signature.
    let forged = token.replacen(&id, &uuid::Uuid::new_v4().to_string(), 1);
    assert_eq!(
        try_connect(forged).await,
        (401, "INSTANCE_TOKEN_INVALID".into())
    );
    // Another org cannot see or touch it.
    let other = env.gw.create_org("other").await;
    let peek = other
        .get(&format!("/v1/orgs/{}/instances/{id}", env.org.id))
        .await;
    assert_eq!(peek.status, 403, "{peek:?}");
    let own = other.get(&other.p(&format!("/instances/{id}"))).await;
    assert_eq!(own.status, 404, "{own:?}");
    let dereg = other
        .post(&other.p(&format!("/instances/{id}/deregister")), json!({}))
        .await;
    assert_eq!(dereg.status, 404);

    assert_eq!(try_connect(token.clone()).await.0, 101);
    let term = env
        .org
        .post(
            &env.org.p(&format!("/instances/{id}/terminate")),
            json!({"error": "test"}),
        )
        .await;
    assert_eq!(term.status, 200, "{term:?}");
    assert_eq!(term.body["status"], "terminated");
    assert_eq!(try_connect(token).await, (410, "INSTANCE_GONE".into()));
    let again = env
        .org
        .post(&env.org.p("/pools/ci/instances"), json!({}))
        .await;
    assert_eq!(again.status, 201, "a terminated instance frees its slot");
    let third = env
        .org
        .post(&env.org.p("/pools/ci/instances"), json!({}))
        .await;
    assert_eq!(third.status, 201);
    let full = env
        .org
        .post(&env.org.p("/pools/ci/instances"), json!({}))
        .await;
    assert_eq!(
        (full.status, full.code()),
        (409, "POOL_AT_CAPACITY"),
        "{full:?}"
    );
}

/// Seed 001 end to end: push a node and a python bundle with the CLI (an identical re-push
/// uploads nothing), spawn each on the caller's instance, read its output through the spawn
/// status, release it; a bundle altered in the object store is refused with
/// `BUNDLE_HASH_MISMATCH`.
async fn bundles_push_spawn_and_refuse_a_tampered_object(db: Db) {
    let Some(env) = Env::start(db, 500, 5).await else {
        return;
    };
    let src = env.dir.path().join("src");
    let node = src.join("node");
    std::fs::create_dir_all(node.join("lib")).unwrap();
    std::fs::write(
        node.join("index.js"),
        "const m = require('./lib/m.js'); console.log('node says ' + m.word + ' ' + process.argv.slice(2).join(','));\n",
    )
    .unwrap();
    std::fs::write(node.join("lib/m.js"), "module.exports = { word: 'hi' };\n").unwrap();
    let py = src.join("py");
    std::fs::create_dir_all(&py).unwrap();
    std::fs::write(
        py.join("main.py"),
        "import sys\nprint('python says', sys.argv[1:])\n",
    )
    .unwrap();

    let push = |dir: PathBuf, wf: &'static str, runtime: &'static str, entry: &'static str| {
        let env = &env;
        async move {
            let out = tokio::process::Command::new(BIN)
                .args(["bundle", "push"])
                .arg(&dir)
                .args([
                    "--workflow",
                    wf,
                    "--runtime",
                    runtime,
                    "--entrypoint",
                    entry,
                    "--json",
                ])
                .env("PADDOCK_API_URL", &env.org.url)
                .env("PADDOCK_TOKEN", &env.org.token)
                .env("PADDOCK_ORG_ID", &env.org.id)
                .output()
                .await
                .unwrap();
            assert!(out.status.success(), "{out:?}");
            serde_json::from_slice::<Value>(&out.stdout).unwrap()
        }
    };
    let first = push(node.clone(), "hello-node", "node", "index.js").await;
    assert_eq!(first["uploaded"], true, "{first}");
    assert_eq!(first["version"], 1);
    let again = push(node.clone(), "hello-node", "node", "index.js").await;
    assert_eq!(
        again["uploaded"], false,
        "identical tree, nothing uploaded: {again}"
    );
    assert_eq!(again["created"], false);
    assert_eq!(again["digest"], first["digest"], "same tree, same digest");
    let pyv = push(py.clone(), "hello-py", "python", "main.py").await;
    assert_eq!(pyv["uploaded"], true);

    // The internal spawn config (service token).
    let cfg: Value = common::http()
        .get(format!("{}/api/internal/spawn/hello-node", env.org.url))
        .header("X-Service-Token", common::SERVICE_TOKEN)
        .header("X-Org-Id", &env.org.id)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(cfg["bundle_hash"], first["digest"], "{cfg}");
    assert_eq!(cfg["runtime"], "node");
    assert_eq!(cfg["entrypoint"], "index.js");
    // `paddock bundle fetch` with that URL verifies and unpacks.
    let dest = env.dir.path().join("fetched");
    let f = tokio::process::Command::new(BIN)
        .args(["bundle", "fetch"])
        .arg(cfg["bundle_url"].as_str().unwrap())
        .arg(cfg["bundle_hash"].as_str().unwrap())
        .arg(&dest)
        .arg("--cache-dir")
        .arg(env.dir.path().join("cli-cache"))
        .output()
        .await
        .unwrap();
    assert!(f.status.success(), "{f:?}");
    assert!(dest.join("lib/m.js").is_file());
    let wrong = tokio::process::Command::new(BIN)
        .args(["bundle", "fetch"])
        .arg(cfg["bundle_url"].as_str().unwrap())
        .arg("0".repeat(64))
        .arg(env.dir.path().join("fetched-2"))
        .arg("--cache-dir")
        .arg(env.dir.path().join("cli-cache-2"))
        .output()
        .await
        .unwrap();
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("BUNDLE_HASH_MISMATCH"),
        "{wrong:?}"
    );

    let spawn = |body: Value| {
        let env = &env;
        async move {
            let t0 = Instant::now();
            loop {
                let resp = common::http()
                    .post(format!("{}/api/spawn", env.org.url))
                    .bearer_auth(&env.org.token)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                let status = resp.status().as_u16();
                let v: Value = resp.json().await.unwrap();
                if status == 202 {
                    return v;
                }
                assert_eq!(
                    (status, v["code"].as_str()),
                    (503, Some("INSTANCE_NOT_READY")),
                    "{v}"
                );
                assert!(t0.elapsed() < Duration::from_secs(30), "{v}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let wait_status = |vm: String| {
        let env = &env;
        async move {
            let t0 = Instant::now();
            loop {
                let v: Value = common::http()
                    .get(format!("{}/api/spawn/{vm}/status", env.org.url))
                    .bearer_auth(&env.org.token)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                if matches!(
                    v["status"].as_str(),
                    Some("succeeded" | "failed" | "timed_out" | "canceled")
                ) {
                    return v;
                }
                assert!(
                    t0.elapsed() < Duration::from_secs(60),
                    "{v}\n{}",
                    env.gw.log_text()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let s = spawn(json!({"workflow_id": "hello-node", "args": ["a", "b"]})).await;
    let vm = s["vmId"].as_str().unwrap().to_string();
    let done = wait_status(vm.clone()).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["exitCode"], 0);
    assert_eq!(done["logs"], "node says hi a,b\n", "{done}");
    assert_eq!(done["version"], 1);
    let list: Value = common::http()
        .get(format!("{}/api/spawn", env.org.url))
        .bearer_auth(&env.org.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        list["spawns"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["vmId"] == vm.as_str())
    );
    let del = common::http()
        .delete(format!("{}/api/spawn/{vm}", env.org.url))
        .bearer_auth(&env.org.token)
        .send()
        .await
        .unwrap();
    assert_eq!(del.status().as_u16(), 200);
    let list: Value = common::http()
        .get(format!("{}/api/spawn", env.org.url))
        .bearer_auth(&env.org.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        !list["spawns"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["vmId"] == vm.as_str())
    );

    let s = spawn(json!({"workflow_id": "hello-py", "args": ["x"]})).await;
    let done = wait_status(s["vmId"].as_str().unwrap().to_string()).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["logs"], "python says ['x']\n", "{done}");

    // Tamper: a new bundle whose stored object is altered before any host fetched it.
    std::fs::write(node.join("extra.txt"), "more").unwrap();
    let v2 = push(node.clone(), "hello-node", "node", "index.js").await;
    assert_eq!(v2["version"], 2, "{v2}");
    let digest = v2["digest"].as_str().unwrap();
    let object = walk_find(&env.dir.path().join("objects"), digest).expect("stored object");
    let mut bytes = std::fs::read(&object).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&object, bytes).unwrap();
    let s = spawn(json!({"workflow_id": "hello-node"})).await;
    let done = wait_status(s["vmId"].as_str().unwrap().to_string()).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["errorCode"], "BUNDLE_HASH_MISMATCH", "{done}");
    assert!(
        std::fs::read_dir(env.dir.path().join("bundle-cache"))
            .unwrap()
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().contains(digest)),
        "nothing of the tampered bundle is kept in the cache"
    );
    // Unknown workflow.
    let missing = common::http()
        .post(format!("{}/api/spawn", env.org.url))
        .bearer_auth(&env.org.token)
        .json(&json!({"workflow_id": "nope"}))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status().as_u16(), 404);
}

fn walk_find(dir: &Path, needle: &str) -> Option<PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(f) = walk_find(&p, needle) {
                return Some(f);
            }
        } else if p.file_name()?.to_string_lossy().contains(needle) {
            return Some(p);
        }
    }
    None
}

on_both_databases!(
    bundles_push_spawn_and_refuse_a_tampered_object,
    chat_retries_until_the_instance_is_ready,
    max_attempts_then_failed_and_rebootstrap_revives,
    cooldown_holds_and_rebootstrap_bypasses_it,
    instance_tokens_are_checked,
);
