//! Gateway configuration: one struct, filled from flags or the seed's `GATEWAY_*` variables
//! by the binary (`paddock gateway --help` lists them).

use std::time::Duration;

/// Which parts of the gateway this process runs (seed 004 `GATEWAY_ROLE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatewayRole {
    /// Serves the HTTP API and the executor WebSocket, and dispatches to its own agents.
    Edge,
    /// Runs the background reapers (leases, queue deadlines, result TTL) and serves the
    /// internal service endpoints, health and metrics.
    Brain,
    /// Both.
    All,
}

impl GatewayRole {
    /// Parses `edge|brain|all`.
    pub fn parse(s: &str) -> Option<GatewayRole> {
        match s {
            "edge" => Some(GatewayRole::Edge),
            "brain" => Some(GatewayRole::Brain),
            "all" => Some(GatewayRole::All),
            _ => None,
        }
    }

    /// Whether this role serves the public API and executor WebSockets.
    pub fn is_edge(self) -> bool {
        matches!(self, GatewayRole::Edge | GatewayRole::All)
    }

    /// Whether this role runs the reapers.
    pub fn is_brain(self) -> bool {
        matches!(self, GatewayRole::Brain | GatewayRole::All)
    }
}

/// Gateway settings.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Role of this replica.
    pub role: GatewayRole,
    /// Database URL (`sqlite://...` or `postgres://...`).
    pub database_url: String,
    /// Name of this replica (defaults to a random id); stored with each live connection.
    pub replica_id: String,
    /// An agent silent for this long is disconnected and shown offline
    /// (`GATEWAY_AGENT_STALE_MS`, default 60000).
    pub agent_stale: Duration,
    /// Shared secret for `/internal/...` endpoints (`GATEWAY_SERVICE_TOKEN`). Without it those
    /// endpoints answer `GATEWAY_NOT_CONFIGURED`.
    pub service_token: Option<String>,
    /// Public HTTP base URL, told to agents and users (`GATEWAY_HTTP_URL`).
    pub http_url: String,
    /// Public executor WebSocket URL (`GATEWAY_WS_URL`).
    pub ws_url: String,
    /// How long finished results are kept (`GATEWAY_RESULTS_TTL_SEC`, default 900).
    pub results_ttl: Duration,
    /// Cap on dispatched + running tasks per org (`GATEWAY_ORG_MAX_INFLIGHT`); excess tasks wait.
    pub org_max_inflight: Option<u32>,
    /// Heartbeat interval asked of agents.
    pub heartbeat_interval: Duration,
    /// Lease given to a dispatched attempt; extended while its agent is connected.
    pub lease: Duration,
    /// Default attempts per task (1 = never re-dispatched after an agent loss).
    pub max_attempts: u32,
    /// Default time a queued task may wait for an agent.
    pub queue_timeout: Duration,
    /// Largest WebSocket frame accepted from an agent.
    pub max_frame_bytes: usize,
    /// Period of the reapers and presence updates.
    pub tick: Duration,
    /// Instances and their bootstrap (seed 000).
    pub instances: InstanceSettings,
    /// Workflow bundles (seed 001).
    pub bundles: BundleSettings,
}

/// Workflow bundle settings.
#[derive(Debug, Clone)]
pub struct BundleSettings {
    /// `PADDOCK_OBJECT_STORE_URL`: `file:///abs/dir` or `s3://bucket?endpoint=...&region=...`
    /// (credentials from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`). Default: a
    /// directory under the system temp dir (the binary passes `<data dir>/objects`).
    pub object_store_url: Option<String>,
    /// `PADDOCK_BUNDLE_MAX_BYTES` (1 GiB): largest accepted upload.
    pub max_bytes: u64,
    /// Lifetime of download URLs in spawn configs (15 min).
    pub url_ttl: Duration,
}

impl Default for BundleSettings {
    fn default() -> BundleSettings {
        BundleSettings {
            object_store_url: None,
            max_bytes: 1 << 30,
            url_ttl: Duration::from_secs(900),
        }
    }
}

/// Instance bootstrap settings (seed 000's `VM_*` variables).
#[derive(Clone)]
pub struct InstanceSettings {
    /// `PADDOCK_BOOTSTRAP_CMD` / `VM_BOOTSTRAP_CMD`: run (with `sh -c`) to bootstrap a
    /// user's instance. When empty outside production, `default_script` is used if present.
    pub bootstrap_cmd: Option<String>,
    /// `scripts/vm/bootstrap-local.sh`, resolved against the working directory.
    pub default_script: std::path::PathBuf,
    /// `PADDOCK_ENV=production`: no default script.
    pub production: bool,
    /// `VM_BOOTSTRAP_COOLDOWN_MS` (30000): no automatic re-trigger within this window.
    pub cooldown: Duration,
    /// `VM_BOOTSTRAP_MAX_ATTEMPTS` (5): then `failed`.
    pub max_attempts: u32,
    /// `VM_BOOT_TIMEOUT_MS` (120000): a triggered instance whose runtime has not connected
    /// after this long counts as a failed attempt (also bounds the command's run time).
    pub boot_timeout: Duration,
    /// `PADDOCK_VM_TOKEN_TTL_SEC` (900): lifetime of an instance token.
    pub token_ttl: Duration,
    /// `PADDOCK_JWT_SECRET` / `JWT_SECRET`: the token key; else one is generated and kept in
    /// the database.
    pub token_secret: Option<String>,
    /// `CONTROL_PLANE_WS` given to instances; default: `ws_url` with `/ws/vm`.
    pub ws_url: Option<String>,
}

impl std::fmt::Debug for InstanceSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstanceSettings")
            .field("bootstrap_cmd", &self.bootstrap_cmd)
            .field("default_script", &self.default_script)
            .field("production", &self.production)
            .field("cooldown", &self.cooldown)
            .field("max_attempts", &self.max_attempts)
            .field("boot_timeout", &self.boot_timeout)
            .field("token_ttl", &self.token_ttl)
            .field("token_secret", &self.token_secret.as_ref().map(|_| "***"))
            .field("ws_url", &self.ws_url)
            .finish()
    }
}

impl Default for InstanceSettings {
    fn default() -> InstanceSettings {
        InstanceSettings {
            bootstrap_cmd: None,
            default_script: "scripts/vm/bootstrap-local.sh".into(),
            production: false,
            cooldown: Duration::from_millis(30_000),
            max_attempts: 5,
            boot_timeout: Duration::from_millis(120_000),
            token_ttl: Duration::from_secs(900),
            token_secret: None,
            ws_url: None,
        }
    }
}

impl GatewayConfig {
    /// Defaults for a local gateway on `database_url`.
    pub fn new(database_url: impl Into<String>) -> GatewayConfig {
        GatewayConfig {
            role: GatewayRole::All,
            database_url: database_url.into(),
            replica_id: format!("gw-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
            agent_stale: Duration::from_millis(60_000),
            service_token: None,
            http_url: "http://localhost:3002".into(),
            ws_url: "ws://localhost:3002/ws/executor".into(),
            results_ttl: Duration::from_secs(900),
            org_max_inflight: None,
            heartbeat_interval: Duration::from_secs(5),
            lease: Duration::from_secs(30),
            max_attempts: 2,
            queue_timeout: Duration::from_secs(600),
            max_frame_bytes: paddock_proto::DEFAULT_MAX_FRAME_BYTES,
            tick: Duration::from_secs(1),
            instances: InstanceSettings::default(),
            bundles: BundleSettings::default(),
        }
    }

    /// Results TTL in milliseconds.
    /// The WebSocket URL instances connect to (`CONTROL_PLANE_WS`).
    pub fn vm_ws_url(&self) -> String {
        if let Some(u) = &self.instances.ws_url {
            return u.clone();
        }
        match self.ws_url.strip_suffix("/ws/executor") {
            Some(base) => format!("{base}/ws/vm"),
            None => format!("{}/ws/vm", self.ws_url.trim_end_matches('/')),
        }
    }

    /// The bootstrap command for user instances, if any: the configured one, else (outside
    /// production) the default script when it exists.
    pub fn bootstrap_command(&self) -> Option<String> {
        if let Some(c) = self.instances.bootstrap_cmd.as_deref().map(str::trim)
            && !c.is_empty()
        {
            return Some(c.to_string());
        }
        if !self.instances.production && self.instances.default_script.is_file() {
            return Some(self.instances.default_script.display().to_string());
        }
        None
    }

    pub fn results_ttl_ms(&self) -> i64 {
        self.results_ttl.as_millis() as i64
    }
}
