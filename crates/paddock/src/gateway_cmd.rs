//! `paddock gateway`: the control plane, configured by the seed's `GATEWAY_*` variables.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use paddock_gateway::{Gateway, GatewayConfig, GatewayRole};

/// Gateway settings. Every flag can also be given by the environment variable shown.
#[derive(Debug, Clone, Args)]
pub(crate) struct GatewayArgs {
    /// Address to listen on.
    #[arg(long, env = "GATEWAY_HOST", default_value = "0.0.0.0")]
    pub host: String,
    /// Port to listen on (0 picks a free one; the chosen port is logged).
    #[arg(long, env = "GATEWAY_PORT", default_value_t = 3002)]
    pub port: u16,
    /// Which parts to run: `edge` (API, executor WebSocket, dispatch), `brain` (reapers,
    /// internal endpoints) or `all`.
    #[arg(long, env = "GATEWAY_ROLE", default_value = "all", value_parser = ["edge", "brain", "all"])]
    pub role: String,
    /// Log filter (`info`, `debug`, `paddock_gateway=debug,info`, ...).
    #[arg(long, env = "GATEWAY_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "GATEWAY_LOG_JSON")]
    pub log_json: bool,
    /// An agent silent this long (ms) is disconnected and listed offline.
    #[arg(long, env = "GATEWAY_AGENT_STALE_MS", default_value_t = 60_000)]
    pub agent_stale_ms: u64,
    /// Shared secret for `/internal/...` and `POST /v1/orgs`. Required unless
    /// PADDOCK_ENV=test or development.
    #[arg(long, env = "GATEWAY_SERVICE_TOKEN", hide_env_values = true)]
    pub service_token: Option<String>,
    /// Read the service token from this file instead.
    #[arg(
        long,
        env = "GATEWAY_SERVICE_TOKEN_FILE",
        conflicts_with = "service_token"
    )]
    pub service_token_file: Option<PathBuf>,
    /// Public HTTP base URL (shown to users and in pairing commands) [default:
    /// http://<host>:<port> of the listening socket, 127.0.0.1 for a wildcard host].
    #[arg(long, env = "GATEWAY_HTTP_URL")]
    pub http_url: Option<String>,
    /// Public executor WebSocket URL [default: ws://<host>:<port>/ws/executor, as above].
    #[arg(long, env = "GATEWAY_WS_URL")]
    pub ws_url: Option<String>,
    /// Seconds finished results are kept before the reaper deletes them.
    #[arg(long, env = "GATEWAY_RESULTS_TTL_SEC", default_value_t = 900)]
    pub results_ttl_sec: u64,
    /// Per-org cap on dispatched + running tasks; more wait queued (unset: no cap).
    #[arg(long, env = "GATEWAY_ORG_MAX_INFLIGHT")]
    pub org_max_inflight: Option<u32>,
    /// Database: `sqlite://PATH` (default, under --data-dir) or `postgres://...` (several
    /// replicas may share one PostgreSQL).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Directory for the default SQLite database.
    #[arg(long, env = "PADDOCK_DATA_DIR", default_value = "./paddock-data")]
    pub data_dir: PathBuf,
    /// Name of this replica (default: random).
    #[arg(long, env = "GATEWAY_REPLICA_ID")]
    pub replica_id: Option<String>,
    /// Lease of a dispatched attempt (ms); renewed while its agent is connected. A task whose
    /// agent is gone this long is re-dispatched or fails with AGENT_LOST.
    #[arg(long, env = "GATEWAY_LEASE_MS", default_value_t = 30_000)]
    pub lease_ms: u64,
    /// Heartbeat interval asked of agents (ms).
    #[arg(long, env = "GATEWAY_HEARTBEAT_MS", default_value_t = 5_000)]
    pub heartbeat_ms: u64,
    /// Attempts per task when agents are lost (1 = never re-dispatch).
    #[arg(long, env = "GATEWAY_MAX_ATTEMPTS", default_value_t = 2)]
    pub max_attempts: u32,
    /// How long a queued task waits for an agent before QUEUE_TIMEOUT (ms).
    #[arg(long, env = "GATEWAY_QUEUE_TIMEOUT_MS", default_value_t = 600_000)]
    pub queue_timeout_ms: u64,
    /// Period of reapers and dispatch sweeps (ms).
    #[arg(long, env = "GATEWAY_TICK_MS", default_value_t = 1_000, hide = true)]
    pub tick_ms: u64,
    #[command(flatten)]
    pub instances: InstanceArgs,
    /// Where bundles are kept: `file:///abs/dir` or
    /// `s3://bucket?endpoint=http://host:port&region=us-east-1` (credentials from
    /// AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) [default: file://<data dir>/objects].
    #[arg(
        long,
        env = "PADDOCK_OBJECT_STORE_URL",
        help_heading = "Bundles (seed 001)"
    )]
    pub object_store_url: Option<String>,
    /// Largest bundle accepted by upload (bytes).
    #[arg(long, env = "PADDOCK_BUNDLE_MAX_BYTES", default_value_t = 1 << 30, help_heading = "Bundles (seed 001)")]
    pub bundle_max_bytes: u64,
}

/// Instances on demand (seed 000).
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Instances (seed 000)")]
pub(crate) struct InstanceArgs {
    /// Command (run with `sh -c`) that bootstraps a user's instance; gets VM_USER_ID,
    /// VM_ORG_ID, VM_INSTANCE_ID, VM_MODE, VM_TOKEN, CONTROL_PLANE_WS, VM_TICKET, PADDOCK_BIN.
    /// `VM_BOOTSTRAP_CMD` is read too. Empty outside production: scripts/vm/bootstrap-local.sh
    /// if it exists.
    #[arg(long, env = "PADDOCK_BOOTSTRAP_CMD")]
    pub bootstrap_cmd: Option<String>,
    /// No automatic re-trigger of a disconnected or failed-attempt instance within this window (ms).
    #[arg(long, env = "VM_BOOTSTRAP_COOLDOWN_MS", default_value_t = 30_000)]
    pub bootstrap_cooldown_ms: u64,
    /// Failed bootstraps before the instance is `failed`.
    #[arg(long, env = "VM_BOOTSTRAP_MAX_ATTEMPTS", default_value_t = 5)]
    pub bootstrap_max_attempts: u32,
    /// A bootstrapped instance whose runtime has not connected after this long is a failed
    /// attempt; also the longest the command may run (ms).
    #[arg(long, env = "VM_BOOT_TIMEOUT_MS", default_value_t = 120_000)]
    pub boot_timeout_ms: u64,
    /// Lifetime of instance tokens (s).
    #[arg(long, env = "PADDOCK_VM_TOKEN_TTL_SEC", default_value_t = 900)]
    pub vm_token_ttl_sec: u64,
    /// Key that signs instance tokens (`JWT_SECRET` is read too); default: generated once
    /// and kept in the database, shared by replicas.
    #[arg(long, env = "PADDOCK_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// CONTROL_PLANE_WS given to instances (default: GATEWAY_WS_URL with /ws/vm).
    #[arg(long, env = "PADDOCK_VM_WS_URL")]
    pub vm_ws_url: Option<String>,
}

impl GatewayArgs {
    pub(crate) fn database_url(&self) -> anyhow::Result<String> {
        match &self.database_url {
            Some(u) => Ok(u.clone()),
            None => {
                std::fs::create_dir_all(&self.data_dir)
                    .with_context(|| format!("creating {}", self.data_dir.display()))?;
                Ok(format!(
                    "sqlite://{}",
                    self.data_dir.join("paddock.db").display()
                ))
            }
        }
    }

    pub(crate) fn config(&self) -> anyhow::Result<GatewayConfig> {
        let mut cfg = GatewayConfig::new(self.database_url()?);
        cfg.role =
            GatewayRole::parse(&self.role).context("GATEWAY_ROLE must be edge, brain or all")?;
        if let Some(r) = &self.replica_id {
            cfg.replica_id = r.clone();
        }
        cfg.agent_stale = Duration::from_millis(self.agent_stale_ms.max(100));
        cfg.service_token = match (&self.service_token, &self.service_token_file) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?
                    .trim()
                    .to_string(),
            ),
            (None, None) => None,
        }
        .filter(|t| !t.is_empty());
        if cfg.service_token.as_deref().is_some_and(|t| t.len() < 16) {
            anyhow::bail!("GATEWAY_SERVICE_TOKEN must be at least 16 characters");
        }
        if let Some(u) = &self.http_url {
            cfg.http_url = u.trim_end_matches('/').to_string();
        }
        if let Some(u) = &self.ws_url {
            cfg.ws_url = u.clone();
        }
        cfg.results_ttl = Duration::from_secs(self.results_ttl_sec);
        cfg.org_max_inflight = self.org_max_inflight.filter(|n| *n > 0);
        cfg.lease = Duration::from_millis(self.lease_ms.max(100));
        cfg.heartbeat_interval = Duration::from_millis(self.heartbeat_ms.max(50));
        cfg.max_attempts = self.max_attempts.clamp(1, 10);
        cfg.queue_timeout = Duration::from_millis(self.queue_timeout_ms);
        cfg.tick = Duration::from_millis(self.tick_ms.max(10));
        let i = &self.instances;
        let nonempty = |v: Option<String>| v.filter(|s| !s.trim().is_empty());
        cfg.instances.bootstrap_cmd = nonempty(i.bootstrap_cmd.clone())
            .or_else(|| nonempty(std::env::var("VM_BOOTSTRAP_CMD").ok()));
        cfg.instances.production = std::env::var("PADDOCK_ENV").as_deref() == Ok("production");
        cfg.instances.cooldown = Duration::from_millis(i.bootstrap_cooldown_ms);
        cfg.instances.max_attempts = i.bootstrap_max_attempts.max(1);
        cfg.instances.boot_timeout = Duration::from_millis(i.boot_timeout_ms.max(100));
        cfg.instances.token_ttl = Duration::from_secs(i.vm_token_ttl_sec.max(10));
        cfg.instances.token_secret =
            nonempty(i.jwt_secret.clone()).or_else(|| nonempty(std::env::var("JWT_SECRET").ok()));
        if cfg
            .instances
            .token_secret
            .as_deref()
            .is_some_and(|k| k.len() < 16)
        {
            anyhow::bail!("PADDOCK_JWT_SECRET / JWT_SECRET must be at least 16 characters");
        }
        cfg.instances.ws_url = i.vm_ws_url.clone();
        cfg.bundles.object_store_url = Some(match &self.object_store_url {
            Some(u) if !u.trim().is_empty() => u.clone(),
            _ => {
                let dir = std::path::absolute(self.data_dir.join("objects"))
                    .context("resolving the data directory")?;
                format!("file://{}", dir.display())
            }
        });
        cfg.bundles.max_bytes = self.bundle_max_bytes.max(1);
        Ok(cfg)
    }
}

pub(crate) async fn run(args: GatewayArgs) -> anyhow::Result<i32> {
    crate::logging::init(&args.log_level, args.log_json);
    let mut cfg = args.config()?;
    if cfg.service_token.is_none() {
        let env = std::env::var("PADDOCK_ENV").unwrap_or_default();
        if env != "test" && env != "development" {
            anyhow::bail!(
                "GATEWAY_SERVICE_TOKEN is required (or GATEWAY_SERVICE_TOKEN_FILE); set PADDOCK_ENV=development to run without internal endpoints"
            );
        }
        tracing::warn!("no service token: internal endpoints answer GATEWAY_NOT_CONFIGURED");
    }
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
    let addr = listener.local_addr()?;
    // Unset public URLs follow the socket actually bound (port 0 picks a free one).
    let host = match addr.ip() {
        ip if ip.is_unspecified() => "127.0.0.1".to_string(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        ip => ip.to_string(),
    };
    if args.http_url.is_none() {
        cfg.http_url = format!("http://{host}:{}", addr.port());
    }
    if args.ws_url.is_none() {
        cfg.ws_url = format!("ws://{host}:{}/ws/executor", addr.port());
    }
    tracing::info!(
        %addr, role = %args.role, replica = %cfg.replica_id,
        database = %paddock_store::redact_url(&cfg.database_url),
        "gateway listening"
    );
    // A line tests and scripts can wait for.
    println!("paddock gateway listening on {addr}");
    let gateway = Gateway::start(cfg).await?;
    gateway.serve(listener, crate::shutdown_signal()).await?;
    Ok(0)
}
