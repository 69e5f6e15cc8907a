//! The processes a dispatch benchmark drives: a `paddock gateway` on a free loopback port and
//! `paddock agent connect` processes paired with it, as `tests/common/mod.rs` starts them.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_paddock");
pub(crate) const SERVICE_TOKEN: &str = "bench-service-token-0123456789";

/// A running gateway process.
pub(crate) struct Gateway {
    child: Child,
    pub(crate) url: String,
    pub(crate) port: u16,
    pub(crate) pid: u32,
    pub(crate) log: PathBuf,
}

impl Gateway {
    /// Starts `paddock gateway` on `db_url` with the product's defaults (heartbeat 5 s, lease
    /// 30 s), logging at `warn` so that log writes do not weigh on the figures.
    pub(crate) async fn start(db_url: &str, dir: &Path) -> Gateway {
        let log = dir.join("gateway.log");
        let log_file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("gateway")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", dir)
            .env("GATEWAY_HOST", "127.0.0.1")
            .env("GATEWAY_PORT", "0")
            .env("DATABASE_URL", db_url)
            .env("GATEWAY_SERVICE_TOKEN", SERVICE_TOKEN)
            .env("GATEWAY_LOG_LEVEL", "warn")
            .env("PADDOCK_DATA_DIR", dir.join("data"))
            // Passed through for experiments with the runtime's size.
            .envs(std::env::var("TOKIO_WORKER_THREADS").map(|v| ("TOKIO_WORKER_THREADS", v)))
            .stdout(Stdio::piped())
            .stderr(log_file)
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn gateway");
        let pid = child.id().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = loop {
            let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
                .await
                .expect("gateway did not start within 60 s")
                .unwrap()
                .unwrap_or_else(|| {
                    panic!(
                        "gateway exited: {}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    )
                });
            if line.contains("listening on") {
                break line;
            }
        };
        let port: u16 = line.rsplit(':').next().unwrap().trim().parse().unwrap();
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Gateway {
            child,
            url: format!("http://127.0.0.1:{port}"),
            port,
            pid,
            log,
        }
    }

    /// Resident set size from `/proc/<pid>/status` (`VmRSS`), in KiB.
    pub(crate) fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// Creates an org through the service endpoint.
    pub(crate) async fn create_org(&self, http: &reqwest::Client) -> Org {
        let v: Value = http
            .post(format!("{}/v1/orgs", self.url))
            .header("X-Service-Token", SERVICE_TOKEN)
            .json(&json!({ "name": "bench" }))
            .send()
            .await
            .unwrap()
            .error_for_status()
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

    /// A counter or gauge from `/metrics`, summed over its label sets.
    pub(crate) async fn metric(&self, http: &reqwest::Client, name: &str) -> f64 {
        let text = http
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// SIGTERM, then SIGKILL after 10 s.
    pub(crate) async fn stop(mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// An org and its owner token.
#[derive(Clone)]
pub(crate) struct Org {
    pub(crate) url: String,
    pub(crate) id: String,
    pub(crate) token: String,
}

impl Org {
    pub(crate) fn post(&self, http: &reqwest::Client, rest: &str) -> reqwest::RequestBuilder {
        http.post(format!("{}/v1/orgs/{}{rest}", self.url, self.id))
            .bearer_auth(&self.token)
            .header("X-Org-Id", &self.id)
    }

    pub(crate) fn get(&self, http: &reqwest::Client, rest: &str) -> reqwest::RequestBuilder {
        http.get(format!("{}/v1/orgs/{}{rest}", self.url, self.id))
            .bearer_auth(&self.token)
            .header("X-Org-Id", &self.id)
    }

    /// Number of the org's agents listed `online`.
    pub(crate) async fn online_agents(&self, http: &reqwest::Client) -> usize {
        let v: Value = self
            .get(http, "/agents")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["agents"]
            .as_array()
            .map_or(0, |a| a.iter().filter(|a| a["status"] == "online").count())
    }
}

/// A `paddock agent connect` process with its own HOME (host backend).
pub(crate) struct AgentProc {
    child: Child,
    _home: tempfile::TempDir,
}

impl AgentProc {
    /// Pairs a new agent and returns once the org lists `expect_online` agents online.
    pub(crate) async fn pair(org: &Org, http: &reqwest::Client, expect_online: usize) -> AgentProc {
        AgentProc::pair_with(org, http, expect_online, &[]).await
    }

    /// [`AgentProc::pair`] with extra environment for the agent.
    pub(crate) async fn pair_with(
        org: &Org,
        http: &reqwest::Client,
        expect_online: usize,
        env: &[(&str, &str)],
    ) -> AgentProc {
        let v: Value = org
            .post(http, "/agents/pairing-tokens")
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap()
            .json()
            .await
            .unwrap();
        let token = v["token"].as_str().expect("pairing token").to_string();
        let home = tempfile::tempdir().unwrap();
        let log_file = std::fs::File::create(home.path().join("agent.log")).unwrap();
        let child = Command::new(BIN)
            .args(["agent", "connect", "--api-base", &org.url])
            .args(["--pairing-token", &token])
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", home.path())
            .env("PADDOCK_AGENT_EXEC_BACKEND", "host")
            .env("PADDOCK_AGENT_LOG_LEVEL", "warn")
            // The gateway's runtime size (an experiment's setting) is not the agent's.
            .env_remove("TOKIO_WORKER_THREADS")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn agent");
        let deadline = Instant::now() + Duration::from_secs(30);
        while org.online_agents(http).await < expect_online {
            assert!(
                Instant::now() < deadline,
                "agent not online within 30 s: {}",
                std::fs::read_to_string(home.path().join("agent.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        AgentProc { child, _home: home }
    }

    pub(crate) async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}
