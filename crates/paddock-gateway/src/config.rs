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
        }
    }

    /// Results TTL in milliseconds.
    pub fn results_ttl_ms(&self) -> i64 {
        self.results_ttl.as_millis() as i64
    }
}
