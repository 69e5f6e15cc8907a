//! `paddock agent ...`: pair and run an agent, and the admin commands around agents.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use paddock_agent::{AgentSettings, Credentials, Runner, credentials};
use reqwest::Method;
use tokio_util::sync::CancellationToken;

use crate::client::{Api, ApiArgs};

/// How the agent runs tasks. Every flag can also be given by the environment variable shown.
#[derive(Debug, Clone, Args)]
pub(crate) struct RunSettings {
    /// Default sandbox backend: `host` (no isolation), `process` (namespaces, cgroups,
    /// Landlock, seccomp; needs root).
    #[arg(long, env = "PADDOCK_AGENT_EXEC_BACKEND", default_value = "host", value_parser = ["host", "process", "oci", "docker"])]
    pub exec_backend: String,
    /// Backends tasks may ask for (comma-separated; default: every backend available here).
    #[arg(long, env = "PADDOCK_AGENT_BACKENDS", value_delimiter = ',')]
    pub backends: Vec<String>,
    /// Memory limit per task for isolating backends, in MiB (tasks may ask for less).
    #[arg(long, env = "PADDOCK_AGENT_SANDBOX_MEMORY_MB", default_value_t = 256)]
    pub sandbox_memory_mb: u64,
    /// CPU quota per task, in CPUs.
    #[arg(long, env = "PADDOCK_AGENT_SANDBOX_CPUS", default_value_t = 1.0)]
    pub sandbox_cpus: f64,
    /// Process limit per task.
    #[arg(long, env = "PADDOCK_AGENT_SANDBOX_PIDS", default_value_t = 256)]
    pub sandbox_pids: u32,
    /// Root filesystem (a directory) for the process backend; default: a read-only view of
    /// the host's /usr, /etc, /bin, /lib...
    #[arg(long, env = "PADDOCK_AGENT_ROOTFS")]
    pub rootfs: Option<PathBuf>,
    /// OCI runtime for the oci backend: `crun`, `runc` or a path (default: crun if found,
    /// else runc).
    #[arg(long, env = "PADDOCK_AGENT_OCI_RUNTIME")]
    pub oci_runtime: Option<PathBuf>,
    /// Image for the docker backend (must exist locally or be pullable by dockerd).
    #[arg(
        long,
        env = "PADDOCK_AGENT_DOCKER_IMAGE",
        default_value = "node:24-alpine"
    )]
    pub docker_image: String,
    /// Network of docker tasks that do not ask for `none` (`none`, `bridge`, a network name).
    #[arg(
        long,
        env = "PADDOCK_AGENT_DOCKER_NETWORK_DEFAULT",
        default_value = "none"
    )]
    pub docker_network_default: String,
    /// Timeout of docker tasks that give none (ms).
    #[arg(
        long,
        env = "PADDOCK_AGENT_DOCKER_TIMEOUT_MS",
        default_value_t = 30_000
    )]
    pub docker_timeout_ms: u64,
    /// Memory cap of docker tasks (MiB).
    #[arg(long, env = "PADDOCK_AGENT_DOCKER_MEMORY_MB", default_value_t = 256)]
    pub docker_memory_mb: u64,
    /// CPU cap of docker tasks.
    #[arg(long, env = "PADDOCK_AGENT_DOCKER_CPUS", default_value_t = 1.0)]
    pub docker_cpus: f64,
    /// Process cap of docker tasks.
    #[arg(long, env = "PADDOCK_AGENT_DOCKER_PIDS", default_value_t = 256)]
    pub docker_pids: u32,
    /// Output cap per stream of docker tasks (characters).
    #[arg(
        long,
        env = "PADDOCK_AGENT_DOCKER_OUTPUT_MAX_CHARS",
        default_value_t = 65_536
    )]
    pub docker_output_max_chars: usize,
    /// Digest-addressed cache of workflow bundles (`bundle.run`).
    #[arg(long, env = "PADDOCK_AGENT_BUNDLE_CACHE", default_value = paddock_bundle::DEFAULT_CACHE_DIR)]
    bundle_cache: PathBuf,
    /// Size cap of the bundle cache in MiB (least recently used bundles are evicted).
    #[arg(long, env = "PADDOCK_AGENT_BUNDLE_CACHE_MAX_MB", default_value_t = 10 * 1024)]
    bundle_cache_max_mb: u64,
    /// Root of per-run work directories (default ~/.paddock/workdir).
    #[arg(long, env = "PADDOCK_AGENT_WORKDIR_ROOT")]
    pub workdir_root: Option<PathBuf>,
    /// Output cap per stream, in characters (at most 262144, so a result fits in one frame).
    #[arg(
        long,
        env = "PADDOCK_AGENT_HOST_OUTPUT_MAX_CHARS",
        default_value_t = 65_536
    )]
    pub host_output_max_chars: usize,
    /// Grace between SIGTERM and SIGKILL when a task times out (ms).
    #[arg(long, env = "PADDOCK_AGENT_HOST_KILL_GRACE_MS", default_value_t = 500)]
    pub host_kill_grace_ms: u64,
    /// Tasks run at once (declared to the gateway as maxInFlight).
    #[arg(long, env = "PADDOCK_AGENT_MAX_IN_FLIGHT", default_value_t = 10)]
    pub max_in_flight: u32,
    /// Extra CA bundle (PEM) for wss:// and https:// gateways.
    #[arg(long, env = "PADDOCK_AGENT_TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,
    /// On SIGTERM/Ctrl-C, how long running tasks may finish before they are handed back (s).
    #[arg(long, env = "PADDOCK_AGENT_SHUTDOWN_GRACE_SEC", default_value_t = 30)]
    pub shutdown_grace_sec: u64,
    /// Log filter.
    #[arg(long, env = "PADDOCK_AGENT_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

impl RunSettings {
    fn settings(&self, tags: Vec<String>) -> AgentSettings {
        let home = paddock_agent::settings::home_dir();
        let mut s = AgentSettings::with_home(&home);
        s.exec_backend = self.exec_backend.clone();
        if let Some(root) = &self.workdir_root {
            s.workdir_root = root.clone();
        }
        s.host_output_max_chars = self
            .host_output_max_chars
            .clamp(1, paddock_proto::MAX_OUTPUT_CHARS);
        s.host_kill_grace = Duration::from_millis(self.host_kill_grace_ms);
        s.max_in_flight = self.max_in_flight.max(1);
        s.reported_tags = tags;
        s.tls_ca_file = self.tls_ca_file.clone();
        s.shutdown_grace = Duration::from_secs(self.shutdown_grace_sec);
        s.limits = paddock_agent::sandbox::Limits {
            memory_bytes: self.sandbox_memory_mb.max(4) * 1024 * 1024,
            cpu_millis: ((self.sandbox_cpus * 1000.0).round() as u32).max(10),
            pids: self.sandbox_pids.max(8),
        };
        s.rootfs = self.rootfs.clone();
        s.bundle_cache_dir = self.bundle_cache.clone();
        s.bundle_cache_max_bytes = self.bundle_cache_max_mb.max(1) << 20;
        s
    }
}

/// `paddock agent ...`
#[derive(Debug, Subcommand)]
pub(crate) enum AgentCommand {
    /// Pair with a gateway (first time, with --pairing-token) and run.
    ///
    /// The agent token is stored in ~/.paddock/agent.json (mode 0600); later runs without
    /// --pairing-token reuse it.
    Connect(ConnectArgs),
    /// Run a managed executor with issued credentials (seed: managed pool bootstrap).
    Start(StartArgs),
    /// Create a pairing token (owner/admin) and print the connect command.
    PairingToken {
        #[command(flatten)]
        api: ApiArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the org's agents.
    List {
        #[command(flatten)]
        api: ApiArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Set an agent's control-plane tags (comma-separated; `group:NAME` for groups).
    Tags {
        #[command(flatten)]
        api: ApiArgs,
        /// Agent id.
        agent_id: String,
        /// Tags, e.g. `west,group:beta` (empty string clears them).
        tags: String,
    },
    /// Revoke an agent; its connection is closed at once.
    Revoke {
        #[command(flatten)]
        api: ApiArgs,
        /// Agent id.
        agent_id: String,
    },
}

#[derive(Debug, Args)]
pub(crate) struct ConnectArgs {
    /// Single-use pairing token (from `paddock agent pairing-token` or the API).
    #[arg(long, env = "PADDOCK_PAIRING_TOKEN", hide_env_values = true)]
    pairing_token: Option<String>,
    /// Gateway HTTP base URL.
    #[arg(
        long,
        env = "PADDOCK_API_BASE",
        default_value = "http://localhost:3002"
    )]
    api_base: String,
    /// Override the executor WebSocket URL (default: derived from --api-base).
    #[arg(long, env = "PADDOCK_GATEWAY_WS_URL")]
    gateway_ws_url: Option<String>,
    /// Tags to report (informational: routing uses control-plane tags only).
    #[arg(long, env = "PADDOCK_AGENT_TAGS", value_delimiter = ',')]
    tags: Vec<String>,
    /// Agent name shown in listings (default: host name).
    #[arg(long)]
    name: Option<String>,
    /// Credentials file.
    #[arg(long, env = "PADDOCK_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// Pair, store the credentials and exit without connecting.
    #[arg(long)]
    pair_only: bool,
    /// Run as an instance's runtime (seed 000, pools): connect to `/ws/vm` with this
    /// instance token instead of pairing. The gateway injects it as `VM_TOKEN` into the
    /// bootstrap command; nothing is stored on disk.
    #[arg(long, env = "VM_TOKEN", hide_env_values = true, conflicts_with_all = ["pairing_token", "pair_only"])]
    vm_token: Option<String>,
    /// The instance WebSocket endpoint (with --vm-token).
    #[arg(
        long,
        env = "CONTROL_PLANE_WS",
        default_value = "ws://127.0.0.1:3101/ws/vm"
    )]
    control_plane_ws: String,
    #[command(flatten)]
    run: RunSettings,
}

#[derive(Debug, Args)]
pub(crate) struct StartArgs {
    /// Pool the executor belongs to.
    #[arg(long, default_value = "managed", value_parser = ["managed"])]
    pool: String,
    /// Executor id from `POST /internal/v1/managed-executors/issue`.
    #[arg(long, env = "PADDOCK_EXECUTOR_ID")]
    executor_id: String,
    /// Executor token (prefer the environment variable: argv is visible to other users).
    #[arg(long, env = "PADDOCK_EXECUTOR_TOKEN", hide_env_values = true)]
    executor_token: String,
    /// Executor WebSocket URL.
    #[arg(long, env = "PADDOCK_GATEWAY_WS_URL")]
    gateway_ws_url: String,
    /// Gateway HTTP base URL.
    #[arg(
        long,
        env = "PADDOCK_API_BASE",
        default_value = "http://localhost:3002"
    )]
    api_base: String,
    /// Tags to report (informational).
    #[arg(long, env = "PADDOCK_AGENT_TAGS", value_delimiter = ',')]
    tags: Vec<String>,
    #[command(flatten)]
    run: RunSettings,
}

pub(crate) async fn run(cmd: AgentCommand) -> anyhow::Result<i32> {
    match cmd {
        AgentCommand::Connect(args) => connect(args).await,
        AgentCommand::Start(args) => start(args).await,
        AgentCommand::PairingToken { api, json } => {
            let api = Api::connect(&api).await?;
            let v = api
                .request(Method::POST, &api.org_path("/agents/pairing-tokens"), None)
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "pairing token (single use, valid 15 minutes):\n  {}\n\non the agent machine:\n  {}",
                    v["token"].as_str().unwrap_or(""),
                    v["connectCommand"].as_str().unwrap_or("")
                );
            }
            Ok(0)
        }
        AgentCommand::List { api, json } => {
            let api = Api::connect(&api).await?;
            let v = api
                .request(Method::GET, &api.org_path("/agents"), None)
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for a in v["agents"].as_array().into_iter().flatten() {
                    println!(
                        "{}  {:<8} {:<8} {:<20} tags={} reported={}",
                        a["id"].as_str().unwrap_or(""),
                        a["status"].as_str().unwrap_or(""),
                        a["pool"].as_str().unwrap_or(""),
                        a["name"].as_str().unwrap_or(""),
                        a["tags"],
                        a["reportedTags"]
                    );
                }
            }
            Ok(0)
        }
        AgentCommand::Tags {
            api,
            agent_id,
            tags,
        } => {
            let api = Api::connect(&api).await?;
            let list: Vec<&str> = tags
                .split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .collect();
            let v = api
                .request(
                    Method::PUT,
                    &api.org_path(&format!("/agents/{agent_id}/tags")),
                    Some(&serde_json::json!({ "tags": list })),
                )
                .await?;
            println!("{}", v["tags"]);
            Ok(0)
        }
        AgentCommand::Revoke { api, agent_id } => {
            let api = Api::connect(&api).await?;
            let v = api
                .request(
                    Method::POST,
                    &api.org_path(&format!("/agents/{agent_id}/revoke")),
                    None,
                )
                .await?;
            println!("{}", v["status"].as_str().unwrap_or(""));
            Ok(0)
        }
    }
}

async fn connect(args: ConnectArgs) -> anyhow::Result<i32> {
    crate::logging::init(&args.run.log_level, false);
    if let Some(token) = &args.vm_token {
        // `pvm1.<instanceId>.<orgId>.<expiresAt>.<signature>`; the gateway checks it.
        let mut parts = token.split('.');
        let (Some("pvm1"), Some(instance), Some(org)) = (parts.next(), parts.next(), parts.next())
        else {
            anyhow::bail!("VM_TOKEN is not an instance token (pvm1.<instance>.<org>...)");
        };
        let creds = Credentials {
            version: credentials::CREDENTIALS_VERSION,
            api_base: args.api_base.clone(),
            gateway_ws_url: args.control_plane_ws.clone(),
            agent_id: instance.to_string(),
            org_id: org.to_string(),
            agent_token: token.clone(),
        };
        eprintln!(
            "running as instance {instance} of org {org}; connecting to {}",
            args.control_plane_ws
        );
        return serve(creds, &args.run, args.run.settings(args.tags)).await;
    }
    let home = paddock_agent::settings::home_dir();
    let path = args
        .config
        .clone()
        .unwrap_or_else(|| credentials::default_path(&home));
    let mut creds = match &args.pairing_token {
        Some(token) => {
            let name = args.name.clone().unwrap_or_else(hostname);
            let creds = paddock_agent::pair(
                &args.api_base,
                token,
                &name,
                args.run.tls_ca_file.as_deref(),
            )
            .await?;
            credentials::store(&path, &creds)?;
            eprintln!(
                "paired as agent {} of org {}; credentials stored in {}",
                creds.agent_id,
                creds.org_id,
                path.display()
            );
            creds
        }
        None => credentials::load(&path)?.with_context(|| {
            format!(
                "no stored credentials at {}: pair first with --pairing-token",
                path.display()
            )
        })?,
    };
    if let Some(ws) = &args.gateway_ws_url {
        creds.gateway_ws_url = ws.clone();
    }
    if args.pair_only {
        return Ok(0);
    }
    serve(creds, &args.run, args.run.settings(args.tags)).await
}

async fn start(args: StartArgs) -> anyhow::Result<i32> {
    crate::logging::init(&args.run.log_level, false);
    let org_id = args
        .executor_token
        .split_once('.')
        .map(|(o, _)| o.to_string())
        .context("executor token must look like <orgId>.<secret>")?;
    let _ = &args.pool;
    let creds = Credentials {
        version: credentials::CREDENTIALS_VERSION,
        api_base: args.api_base.clone(),
        gateway_ws_url: args.gateway_ws_url.clone(),
        agent_id: args.executor_id.clone(),
        org_id,
        agent_token: args.executor_token.clone(),
    };
    serve(creds, &args.run, args.run.settings(args.tags)).await
}

async fn serve(
    creds: Credentials,
    run: &RunSettings,
    settings: AgentSettings,
) -> anyhow::Result<i32> {
    std::fs::create_dir_all(&settings.workdir_root)
        .with_context(|| format!("creating {}", settings.workdir_root.display()))?;
    let wanted = (!run.backends.is_empty()).then_some(run.backends.as_slice());
    let docker = paddock_agent::sandbox::docker::DockerConfig {
        image: run.docker_image.clone(),
        network_default: run.docker_network_default.clone(),
        timeout_ms: run.docker_timeout_ms,
        memory_mb: run.docker_memory_mb,
        cpus: run.docker_cpus,
        pids: run.docker_pids,
        output_max_chars: run
            .docker_output_max_chars
            .clamp(1, paddock_proto::MAX_OUTPUT_CHARS),
    };
    let (backends, missing) = paddock_agent::sandbox::detect(
        &settings,
        wanted,
        std::env::current_exe().ok(),
        run.oci_runtime.clone(),
        docker,
    )
    .await;
    for (name, why) in &missing {
        tracing::warn!(backend = %name, "backend unavailable: {why}");
    }
    if !backends.iter().any(|b| b.name() == settings.exec_backend) {
        let why = missing
            .iter()
            .find(|(n, _)| *n == settings.exec_backend)
            .map_or(
                "not enabled in PADDOCK_AGENT_BACKENDS".to_string(),
                |(_, w)| w.clone(),
            );
        anyhow::bail!(
            "default backend `{}` is unavailable: {why}",
            settings.exec_backend
        );
    }
    tracing::info!(backends = ?backends.iter().map(|b| b.name()).collect::<Vec<_>>(), default = %settings.exec_backend, "sandbox backends");
    let runner = Runner::with_backends(settings, backends);
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            crate::shutdown_signal().await;
            tracing::info!("shutdown requested: finishing running tasks");
            shutdown.cancel();
            // A second signal stops at once.
            crate::shutdown_signal().await;
            std::process::exit(130);
        }
    });
    tracing::info!(agent = %creds.agent_id, url = %creds.gateway_ws_url, "agent starting");
    let outcome = paddock_agent::run(runner.clone(), &creds, shutdown).await;
    // Background clean-up of finished runs (cgroups, containers, bundles) completes before
    // the process exits; bounded so a wedged runtime cannot hold the exit forever.
    if tokio::time::timeout(Duration::from_secs(10), runner.settle())
        .await
        .is_err()
    {
        tracing::warn!("sandbox clean-up still running after 10 s; exiting anyway");
    }
    match outcome {
        Ok(()) => Ok(0),
        Err(e) => {
            eprintln!("error: {e:#}");
            Ok(1)
        }
    }
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "agent".into())
}
