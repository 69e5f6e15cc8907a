//! End-to-end harness: runs the real `paddock` binary as gateway and agent processes and
//! drives them over HTTP. Each test gets fresh databases, homes and ports.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const BIN: &str = env!("CARGO_BIN_EXE_paddock");

/// Which database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    Sqlite,
    Postgres,
}

/// A fresh database URL, or `None` to skip (PostgreSQL not configured outside CI).
pub async fn fresh_db(kind: Db, dir: &Path) -> Option<String> {
    match kind {
        Db::Sqlite => Some(paddock_store::testing::sqlite_url(dir)),
        Db::Postgres => paddock_store::testing::postgres_url().await,
    }
}

/// Generates one test per database for an `async fn(Db)`.
#[macro_export]
macro_rules! on_both_databases {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name($crate::common::Db::Sqlite).await } )*
        }
        mod postgres {
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name($crate::common::Db::Postgres).await } )*
        }
    };
}

pub const SERVICE_TOKEN: &str = "test-service-token-0123456789";

/// A gateway process.
pub struct GatewayProc {
    child: Option<Child>,
    pub url: String,
    pub port: u16,
    pub db_url: String,
    pub replica: String,
    pub log: PathBuf,
    env: Vec<(String, String)>,
    _dir: tempfile::TempDir,
}

impl GatewayProc {
    /// Starts a gateway on `db_url` with fast timings for tests; `env` overrides.
    pub async fn start(db_url: &str, env: &[(&str, &str)]) -> GatewayProc {
        Self::start_on(
            db_url,
            0,
            env,
            &format!("gw-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
        )
        .await
    }

    async fn start_on(db_url: &str, port: u16, env: &[(&str, &str)], replica: &str) -> GatewayProc {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("gateway.log");
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let (child, port) = spawn_gateway(db_url, port, &env, replica, &log).await;
        GatewayProc {
            child: Some(child),
            url: format!("http://127.0.0.1:{port}"),
            port,
            db_url: db_url.to_string(),
            replica: replica.to_string(),
            log,
            env,
            _dir: dir,
        }
    }

    /// Kills the process (SIGKILL: no graceful shutdown).
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    /// SIGTERM and wait.
    pub async fn stop(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        signal(&c, nix::sys::signal::Signal::SIGTERM);
        tokio::time::timeout(Duration::from_secs(20), c.wait())
            .await
            .expect("gateway stops")
            .unwrap()
    }

    /// Starts again on the same port and database.
    pub async fn restart(&mut self) {
        self.kill().await;
        let env = self.env.clone();
        let (child, _) =
            spawn_gateway(&self.db_url, self.port, &env, &self.replica, &self.log).await;
        self.child = Some(child);
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Creates an org through the service endpoint.
    pub async fn create_org(&self, name: &str) -> Org {
        let v: Value = http()
            .post(format!("{}/v1/orgs", self.url))
            .header("X-Service-Token", SERVICE_TOKEN)
            .json(&json!({ "name": name }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        Org {
            url: self.url.clone(),
            id: v["org"]["id"].as_str().expect("org id").to_string(),
            token: v["ownerToken"].as_str().expect("owner token").to_string(),
        }
    }
}

impl Drop for GatewayProc {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.start_kill();
        }
    }
}

async fn spawn_gateway(
    db_url: &str,
    port: u16,
    env: &[(String, String)],
    replica: &str,
    log: &Path,
) -> (Child, u16) {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut cmd = Command::new(BIN);
    cmd.arg("gateway")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", log.parent().unwrap())
        .env("PADDOCK_DATA_DIR", log.parent().unwrap())
        .env("GATEWAY_HOST", "127.0.0.1")
        .env("GATEWAY_PORT", port.to_string())
        .env("DATABASE_URL", db_url)
        .env("GATEWAY_SERVICE_TOKEN", SERVICE_TOKEN)
        .env("GATEWAY_REPLICA_ID", replica)
        .env("GATEWAY_LEASE_MS", "2000")
        .env("GATEWAY_HEARTBEAT_MS", "250")
        .env("GATEWAY_TICK_MS", "100")
        .env("GATEWAY_LOG_LEVEL", "info,paddock_gateway=debug")
        .stdout(Stdio::piped())
        .stderr(log_file)
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn gateway");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "gateway did not start: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            )
        })
        .unwrap()
        .unwrap_or_else(|| {
            panic!(
                "gateway exited: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            )
        });
    let addr = line.rsplit(' ').next().unwrap();
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, port)
}

pub fn signal(child: &Child, sig: nix::sys::signal::Signal) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
    }
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// An org and its owner token, with request helpers.
#[derive(Clone, Debug)]
pub struct Org {
    pub url: String,
    pub id: String,
    pub token: String,
}

/// An HTTP answer: status and JSON body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
}

impl Answer {
    pub fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }
}

impl Org {
    /// `paddock ARGS...` as this org's operator: an empty environment but `PATH`, `HOME`,
    /// and the API URL, token and org id.
    pub fn cli(&self, home: &Path) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", home)
            .env("PADDOCK_API_URL", &self.url)
            .env("PADDOCK_TOKEN", &self.token)
            .env("PADDOCK_ORG_ID", &self.id);
        cmd
    }

    pub async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Answer {
        self.call_as(&self.token, Some(&self.id), method, path, body)
            .await
    }

    /// A request with any token and `X-Org-Id` (none: the header is left out), for cross-org
    /// checks.
    pub async fn call_as(
        &self,
        token: &str,
        org_header: Option<&str>,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Answer {
        let mut b = http()
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(token);
        if let Some(h) = org_header {
            b = b.header("X-Org-Id", h);
        }
        if let Some(body) = body {
            b = b.json(&body);
        }
        let resp = b.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        Answer {
            status,
            body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
        }
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.call(reqwest::Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Answer {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    pub fn p(&self, rest: &str) -> String {
        format!("/v1/orgs/{}{rest}", self.id)
    }

    pub async fn pairing_token(&self) -> String {
        let a = self
            .call(
                reqwest::Method::POST,
                &self.p("/agents/pairing-tokens"),
                None,
            )
            .await;
        assert_eq!(a.status, 201, "{a:?}");
        a.body["token"].as_str().unwrap().to_string()
    }

    /// Queues a shell task; returns its id.
    pub async fn submit(&self, spec: Value) -> String {
        let a = self.post(&self.p("/tasks"), spec).await;
        assert_eq!(a.status, 202, "{a:?}");
        a.body["taskId"].as_str().unwrap().to_string()
    }

    pub async fn task(&self, id: &str) -> Value {
        let a = self.get(&self.p(&format!("/tasks/{id}"))).await;
        assert_eq!(a.status, 200, "{a:?}");
        a.body
    }

    /// Polls a task until it is finished.
    pub async fn wait_done(&self, id: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let t = self.task(id).await;
            if matches!(
                t["state"].as_str(),
                Some("succeeded" | "failed" | "timed_out" | "canceled")
            ) {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "task {id} not finished in {within:?}: {t}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls a task until `pred` holds.
    pub async fn wait_task(
        &self,
        id: &str,
        within: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let t = self.task(id).await;
            if pred(&t) {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "task {id}: condition not met in {within:?}: {t}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn agent(&self, id: &str) -> Value {
        self.get(&self.p(&format!("/agents/{id}"))).await.body
    }

    /// Waits until the agent is listed with `status`.
    pub async fn wait_agent_status(&self, id: &str, status: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let a = self.agent(id).await;
            if a["status"] == status {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "agent {id} not {status} in {within:?}: {a}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A shell task spec.
pub fn sh(script: &str) -> Value {
    json!({ "kind": "agent.execute", "shell": { "script": script } })
}

/// An agent process with its own HOME.
pub struct AgentProc {
    child: Option<Child>,
    pub home: tempfile::TempDir,
    pub id: String,
    pub log: PathBuf,
}

impl AgentProc {
    /// Pairs a new agent with `paddock agent connect --pairing-token` and waits until it is online.
    pub async fn pair(org: &Org, args: &[&str], env: &[(&str, &str)]) -> AgentProc {
        let home = tempfile::tempdir().unwrap();
        let token = org.pairing_token().await;
        let mut full = vec!["--pairing-token", token.as_str()];
        full.extend_from_slice(args);
        let mut agent = AgentProc {
            child: None,
            home,
            id: String::new(),
            log: PathBuf::new(),
        };
        agent.log = agent.home.path().join("agent.log");
        agent.spawn(org, &full, env);
        // The credentials file appears once pairing succeeded.
        let creds = agent.home.path().join(".paddock/agent.json");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !creds.exists() {
            assert!(
                Instant::now() < deadline,
                "agent did not pair: {}",
                agent.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&creds).unwrap()).unwrap();
        agent.id = v["agentId"].as_str().unwrap().to_string();
        org.wait_agent_status(&agent.id, "online", Duration::from_secs(20))
            .await;
        agent
    }

    /// Runs `paddock agent connect` with this agent's HOME.
    pub fn spawn(&mut self, org: &Org, args: &[&str], env: &[(&str, &str)]) {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(BIN);
        cmd.args(["agent", "connect", "--api-base", &org.url])
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", self.home.path())
            .env("PADDOCK_AGENT_SHUTDOWN_GRACE_SEC", "10")
            .stdout(Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("spawn agent"));
    }

    /// Restarts with stored credentials (no pairing token).
    pub fn reconnect(&mut self, org: &Org, env: &[(&str, &str)]) {
        self.spawn(org, &[], env);
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    pub fn sigterm(&self) {
        if let Some(c) = &self.child {
            signal(c, nix::sys::signal::Signal::SIGTERM);
        }
    }

    /// Waits for the process to exit.
    pub async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let c = self.child.as_mut().expect("running");
        let status = tokio::time::timeout(within, c.wait())
            .await
            .unwrap_or_else(|_| panic!("agent did not exit: {}", self.log_text()))
            .unwrap();
        self.child = None;
        status
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.start_kill();
        }
    }
}

/// Pids of live (non-zombie) host processes whose command line (argv joined by spaces)
/// contains `needle`.
pub fn live_processes_with(needle: &str) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let zombie = stat
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'));
        if !zombie
            && String::from_utf8_lossy(&cmdline)
                .replace('\0', " ")
                .contains(needle)
        {
            found.push(pid);
        }
    }
    found
}
