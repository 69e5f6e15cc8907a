//! The gateway's pool API as the supervisor sees it: wire types (JSON, camelCase) and a small
//! HTTP client (`reqwest`). The supervisor is a client like any other operator tool; it may
//! run on another host than the database, so it shares no code with the store, only the
//! documented JSON. Decoding is lenient (unknown fields ignored, an unknown status kept as
//! [`InstanceStatus::Unknown`], which the planner never touches).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Lifecycle of an instance, as the gateway reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceStatus {
    /// Recorded; its runtime has not been started yet.
    Starting,
    /// Its runtime is being started.
    Provisioning,
    /// Its agent is connected and idle.
    Ready,
    /// Its agent runs a task.
    Busy,
    /// Takes no more work (used up `maxUse`, or deregistered): to be destroyed.
    Draining,
    /// Was connected; its agent is gone.
    Disconnected,
    /// Gave up (provider failure, bootstrap failures).
    Failed,
    /// Destroyed.
    Terminated,
    /// A status this supervisor does not know (a newer gateway): never acted upon.
    #[serde(other)]
    Unknown,
}

impl InstanceStatus {
    /// The wire form.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceStatus::Starting => "starting",
            InstanceStatus::Provisioning => "provisioning",
            InstanceStatus::Ready => "ready",
            InstanceStatus::Busy => "busy",
            InstanceStatus::Draining => "draining",
            InstanceStatus::Disconnected => "disconnected",
            InstanceStatus::Failed => "failed",
            InstanceStatus::Terminated => "terminated",
            InstanceStatus::Unknown => "unknown",
        }
    }
}

impl fmt::Display for InstanceStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One instance (`GET .../pools/{name}`, `GET .../instances`). Times are ms since the epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Instance {
    /// Instance id (also its agent's id).
    pub instance_id: String,
    /// Org.
    #[serde(default)]
    pub org_id: String,
    /// Pool id.
    #[serde(default)]
    pub pool_id: Option<String>,
    /// Lifecycle state.
    pub status: InstanceStatus,
    /// Provider that makes it.
    #[serde(default)]
    pub provider: String,
    /// Bootstrap attempts so far.
    #[serde(default)]
    pub bootstrap_attempts: u32,
    /// Why the last attempt failed, or why it was failed/terminated.
    #[serde(default)]
    pub last_error: Option<String>,
    /// Tasks dispatched to it.
    #[serde(default)]
    pub uses: u32,
    /// Tasks it may take before it drains (0 = unlimited).
    #[serde(default)]
    pub max_use: u32,
    /// Creation.
    pub created_at: i64,
    /// Last change.
    #[serde(default)]
    pub updated_at: i64,
    /// Last bootstrap trigger.
    #[serde(default)]
    pub last_bootstrap_at: Option<i64>,
    /// First connection of its runtime.
    #[serde(default)]
    pub ready_at: Option<i64>,
    /// Last connection.
    #[serde(default)]
    pub connected_at: Option<i64>,
    /// Last disconnection.
    #[serde(default)]
    pub disconnected_at: Option<i64>,
    /// Last time it took a task.
    #[serde(default)]
    pub busy_at: Option<i64>,
    /// Last time it became idle.
    #[serde(default)]
    pub idle_since: Option<i64>,
    /// Destruction.
    #[serde(default)]
    pub terminated_at: Option<i64>,
}

/// A pool as the gateway stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pool {
    /// Pool id.
    #[serde(default)]
    pub id: String,
    /// Org.
    #[serde(default)]
    pub org_id: String,
    /// Name, unique in the org.
    pub name: String,
    /// Provider (`process`, `docker`, `command`).
    pub provider: String,
    /// Control-plane tags of its agents: what tasks select (`selector.tag`).
    #[serde(default)]
    pub labels: Vec<String>,
    /// Idle floor.
    pub min: u32,
    /// Ceiling on live (non-terminated) instances.
    pub max: u32,
    /// Desired size, clamped into `[min, max]`.
    #[serde(default)]
    pub target: Option<u32>,
    /// Tasks per instance before it is destroyed (0 = unlimited).
    #[serde(default)]
    pub max_use: u32,
    /// An instance not ready this long after its creation is destroyed.
    #[serde(default)]
    pub boot_deadline_ms: u64,
    /// Creation.
    #[serde(default)]
    pub created_at: i64,
    /// Last change.
    #[serde(default)]
    pub updated_at: i64,
}

/// The body of `PUT .../pools/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolSpec {
    /// Provider.
    pub provider: String,
    /// Labels.
    pub labels: Vec<String>,
    /// Floor.
    pub min: u32,
    /// Ceiling.
    pub max: u32,
    /// Target.
    pub target: Option<u32>,
    /// Tasks per instance.
    pub max_use: u32,
    /// Boot deadline.
    pub boot_deadline_ms: u64,
}

impl PoolSpec {
    /// The pool this spec describes, before the gateway stored it (dry runs of a new pool).
    pub fn as_pool(&self, name: &str) -> Pool {
        Pool {
            id: String::new(),
            org_id: String::new(),
            name: name.to_string(),
            provider: self.provider.clone(),
            labels: self.labels.clone(),
            min: self.min,
            max: self.max,
            target: self.target,
            max_use: self.max_use,
            boot_deadline_ms: self.boot_deadline_ms,
            created_at: 0,
            updated_at: 0,
        }
    }
}

/// Queued work that this pool serves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Demand {
    /// Queued tasks selecting one of the pool's labels or `pool:<name>`.
    #[serde(default)]
    pub queued: u32,
}

/// `GET .../pools/{name}`: the pool, its non-terminated instances and its demand.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolState {
    /// The pool.
    pub pool: Pool,
    /// Its instances that are not terminated.
    #[serde(default)]
    pub instances: Vec<Instance>,
    /// Its demand.
    #[serde(default)]
    pub demand: Demand,
}

/// A secret string (an instance token): never printed by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    /// The secret itself, for the one place that must pass it on.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// `text` with every occurrence of the secret replaced by `[redacted]`.
    pub fn redact(&self, text: &str) -> String {
        if self.0.is_empty() {
            return text.to_string();
        }
        text.replace(&self.0, "[redacted]")
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// The answer to `POST .../pools/{name}/instances`: a new instance and what its runtime
/// needs to connect.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreatedInstance {
    /// The instance (`starting`).
    pub instance: Instance,
    /// Its instance token (secret).
    pub token: Secret,
    /// The WebSocket URL its agent connects to (`/ws/vm`).
    pub control_plane_ws: String,
    /// The environment of its runtime (`VM_*`, `CONTROL_PLANE_WS`); `VM_TOKEN` is secret.
    #[serde(default)]
    pub env: RuntimeEnv,
}

/// A runtime environment whose `Debug` hides `VM_TOKEN`.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct RuntimeEnv(pub BTreeMap<String, String>);

impl fmt::Debug for RuntimeEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut m = f.debug_map();
        for (k, v) in &self.0 {
            if k == "VM_TOKEN" {
                m.entry(k, &"[redacted]");
            } else {
                m.entry(k, v);
            }
        }
        m.finish()
    }
}

/// Why an API call failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The gateway answered with an error body (stable code).
    #[error("{code}: {message} (HTTP {status})")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Stable error code (`POOL_AT_CAPACITY`, `INSTANCE_BUSY`, ...).
        code: String,
        /// Human message.
        message: String,
        /// Retry hint.
        retry_after_ms: Option<u64>,
    },
    /// No answer (connection refused, timeout).
    #[error("cannot reach the gateway at {base}: {detail}")]
    Transport {
        /// Base URL.
        base: String,
        /// What failed.
        detail: String,
    },
    /// An answer this client cannot read.
    #[error("unexpected answer to {what}: {detail}")]
    Decode {
        /// The request.
        what: String,
        /// What was wrong.
        detail: String,
    },
}

impl ApiError {
    /// The stable code of a refusal.
    pub fn code(&self) -> Option<&str> {
        match self {
            ApiError::Refused { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The HTTP status of a refusal.
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Code of a full pool.
pub const POOL_AT_CAPACITY: &str = "POOL_AT_CAPACITY";
/// Code of a busy instance (never destroyed).
pub const INSTANCE_BUSY: &str = "INSTANCE_BUSY";

/// Where the gateway is and who the supervisor is.
#[derive(Clone)]
pub struct ApiConfig {
    /// HTTP base URL (`http://127.0.0.1:3002`).
    pub base: String,
    /// API token (owner or admin of the org).
    pub token: Secret,
    /// Org id; `None` asks `/v1/whoami`.
    pub org: Option<String>,
}

/// An authenticated client bound to one org.
#[derive(Clone)]
pub struct PoolApi {
    http: reqwest::Client,
    watch_http: reqwest::Client,
    base: String,
    token: Secret,
    org: String,
}

impl fmt::Debug for PoolApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolApi")
            .field("base", &self.base)
            .field("org", &self.org)
            .finish_non_exhaustive()
    }
}

/// Timeout of one ordinary request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

impl PoolApi {
    /// A client; resolves the org from the token when none is given.
    ///
    /// # Errors
    /// The gateway cannot be reached or refuses the token.
    pub async fn connect(cfg: ApiConfig) -> Result<PoolApi, ApiError> {
        let base = cfg.base.trim_end_matches('/').to_string();
        let transport = |e: reqwest::Error| ApiError::Transport {
            base: base.clone(),
            detail: e.to_string(),
        };
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(transport)?;
        let watch_http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(transport)?;
        let mut api = PoolApi {
            http,
            watch_http,
            base: base.clone(),
            token: cfg.token,
            org: cfg.org.unwrap_or_default(),
        };
        if api.org.is_empty() {
            let who = api.call(reqwest::Method::GET, "/v1/whoami", None).await?;
            api.org = who["orgId"]
                .as_str()
                .ok_or_else(|| ApiError::Decode {
                    what: "GET /v1/whoami".into(),
                    detail: "no orgId".into(),
                })?
                .to_string();
        }
        Ok(api)
    }

    /// The org this client acts for.
    pub fn org(&self) -> &str {
        &self.org
    }

    /// The gateway's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn org_path(&self, rest: &str) -> String {
        format!("/v1/orgs/{}{rest}", self.org)
    }

    fn request(
        &self,
        client: &reqwest::Client,
        method: reqwest::Method,
        path: &str,
    ) -> reqwest::RequestBuilder {
        let mut b = client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(self.token.expose());
        if !self.org.is_empty() {
            b = b.header("X-Org-Id", &self.org);
        }
        b
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ApiError> {
        let what = format!("{method} {path}");
        let mut b = self.request(&self.http, method, path);
        if let Some(body) = body {
            b = b.json(body);
        }
        let resp = b.send().await.map_err(|e| ApiError::Transport {
            base: self.base.clone(),
            detail: e.without_url().to_string(),
        })?;
        decode(&what, resp).await
    }

    fn typed<T: serde::de::DeserializeOwned>(what: &str, v: Value) -> Result<T, ApiError> {
        serde_json::from_value(v).map_err(|e| ApiError::Decode {
            what: what.to_string(),
            detail: e.to_string(),
        })
    }

    fn pool_path(name: &str, rest: &str) -> String {
        format!("/pools/{}{rest}", path_segment(name))
    }

    /// `PUT .../pools/{name}`: creates or updates the pool.
    ///
    /// # Errors
    /// Refusal or transport failure.
    pub async fn put_pool(&self, name: &str, spec: &PoolSpec) -> Result<Pool, ApiError> {
        let body = serde_json::to_value(spec).map_err(|e| ApiError::Decode {
            what: "pool spec".into(),
            detail: e.to_string(),
        })?;
        let v = self
            .call(
                reqwest::Method::PUT,
                &self.org_path(&Self::pool_path(name, "")),
                Some(&body),
            )
            .await?;
        Self::typed("PUT pool", v)
    }

    /// `GET .../pools/{name}`: the pool, its live instances and its demand.
    ///
    /// # Errors
    /// Refusal (`404` for an unknown pool) or transport failure.
    pub async fn get_pool(&self, name: &str) -> Result<PoolState, ApiError> {
        let v = self
            .call(
                reqwest::Method::GET,
                &self.org_path(&Self::pool_path(name, "")),
                None,
            )
            .await?;
        Self::typed("GET pool", v)
    }

    /// `POST .../pools/{name}/instances`: a new instance (`409 POOL_AT_CAPACITY` when full).
    ///
    /// # Errors
    /// Refusal or transport failure.
    pub async fn create_instance(&self, name: &str) -> Result<CreatedInstance, ApiError> {
        let v = self
            .call(
                reqwest::Method::POST,
                &self.org_path(&Self::pool_path(name, "/instances")),
                Some(&json!({})),
            )
            .await?;
        Self::typed("POST instances", v)
    }

    async fn instance_action(
        &self,
        id: &str,
        action: &str,
        body: Value,
    ) -> Result<Instance, ApiError> {
        let v = self
            .call(
                reqwest::Method::POST,
                &self.org_path(&format!("/instances/{}/{action}", path_segment(id))),
                Some(&body),
            )
            .await?;
        Self::typed(action, v)
    }

    /// `POST .../instances/{id}/deregister`: the instance takes no more work (`draining`);
    /// `409 INSTANCE_BUSY` while it runs a task.
    ///
    /// # Errors
    /// Refusal or transport failure.
    pub async fn deregister(&self, id: &str) -> Result<Instance, ApiError> {
        self.instance_action(id, "deregister", json!({})).await
    }

    /// `POST .../instances/{id}/terminate`: records the instance destroyed and revokes its
    /// token; `409 INSTANCE_BUSY` while it runs a task.
    ///
    /// # Errors
    /// Refusal or transport failure.
    pub async fn terminate(&self, id: &str, error: Option<&str>) -> Result<Instance, ApiError> {
        let body = match error {
            Some(e) => json!({ "error": e }),
            None => json!({}),
        };
        self.instance_action(id, "terminate", body).await
    }

    /// `POST .../instances/{id}/fail`: marks the instance failed with a reason.
    ///
    /// # Errors
    /// Refusal or transport failure.
    pub async fn fail(&self, id: &str, error: &str) -> Result<Instance, ApiError> {
        self.instance_action(id, "fail", json!({ "error": error }))
            .await
    }

    /// `GET .../instances?pool={name}&all=true`: every instance of the pool, terminated ones
    /// included.
    ///
    /// # Errors
    /// Refusal or transport failure.
    pub async fn list_instances(&self, pool: &str, all: bool) -> Result<Vec<Instance>, ApiError> {
        let mut path = self.org_path(&format!("/instances?pool={}", path_segment(pool)));
        if all {
            path.push_str("&all=true");
        }
        let v = self.call(reqwest::Method::GET, &path, None).await?;
        Self::typed("GET instances", v)
    }

    /// Follows `GET .../pools/{name}/watch` (server-sent events) and calls `on_change` for
    /// every `change` event, until the stream ends or fails.
    ///
    /// # Errors
    /// Refusal or transport failure; `Ok` when the gateway closed the stream.
    pub async fn watch(&self, name: &str, mut on_change: impl FnMut()) -> Result<(), ApiError> {
        let path = self.org_path(&Self::pool_path(name, "/watch"));
        let resp = self
            .request(&self.watch_http, reqwest::Method::GET, &path)
            .header("accept", "text/event-stream")
            .send()
            .await
            .map_err(|e| ApiError::Transport {
                base: self.base.clone(),
                detail: e.without_url().to_string(),
            })?;
        if !resp.status().is_success() {
            return Err(decode("GET watch", resp).await.err().unwrap_or_else(|| {
                ApiError::Decode {
                    what: "GET watch".into(),
                    detail: "refused".into(),
                }
            }));
        }
        let mut body = resp.bytes_stream();
        let mut parser = SseParser::default();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| ApiError::Transport {
                base: self.base.clone(),
                detail: e.without_url().to_string(),
            })?;
            for event in parser.push(&chunk) {
                if event == "change" {
                    on_change();
                }
            }
        }
        Ok(())
    }
}

/// Percent-encodes what may not appear in one path segment.
fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

async fn decode(what: &str, resp: reqwest::Response) -> Result<Value, ApiError> {
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    let value: Value = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    if status.is_success() {
        return Ok(value);
    }
    let message = value["message"].as_str().map(str::to_string);
    Err(ApiError::Refused {
        status: status.as_u16(),
        code: value["code"]
            .as_str()
            .map_or_else(|| format!("HTTP_{}", status.as_u16()), str::to_string),
        message: message.unwrap_or_else(|| {
            let mut s = value.to_string();
            s.truncate(300);
            format!("{what}: {s}")
        }),
        retry_after_ms: value["retryAfterMs"].as_u64(),
    })
}

/// Splits a server-sent-event byte stream into event names (`message` when unnamed);
/// comments (keep-alives) are skipped.
#[derive(Debug, Default)]
pub(crate) struct SseParser {
    buf: Vec<u8>,
}

impl SseParser {
    /// Feeds bytes; returns the names of the events completed by them.
    pub(crate) fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(bytes);
        let mut events = Vec::new();
        loop {
            let text = String::from_utf8_lossy(&self.buf).replace("\r\n", "\n");
            let Some(end) = text.find("\n\n") else {
                // Keep the normalised form so a later "\r\n" split across chunks still works.
                self.buf = text.into_bytes();
                return events;
            };
            let block = &text[..end];
            let mut name = None;
            let mut has_field = false;
            for line in block.lines() {
                if line.starts_with(':') || line.is_empty() {
                    continue;
                }
                has_field = true;
                if let Some(v) = line.strip_prefix("event:") {
                    name = Some(v.trim().to_string());
                }
            }
            if has_field {
                events.push(name.unwrap_or_else(|| "message".into()));
            }
            self.buf = text.as_bytes()[end + 2..].to_vec();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_split_across_chunks_and_comments_skipped() {
        let mut p = SseParser::default();
        assert!(p.push(b": keep-alive\n\n").is_empty());
        assert!(p.push(b"event: cha").is_empty());
        assert_eq!(
            p.push(b"nge\ndata: {}\n\nevent: change\r\n"),
            vec!["change"]
        );
        assert_eq!(
            p.push(b"data: x\r\n\r\ndata: y\n\n"),
            vec!["change", "message"]
        );
    }

    #[test]
    fn instance_decodes_leniently() {
        let v = json!({
            "instanceId": "i1", "orgId": "o", "poolId": "p", "mode": "pool",
            "status": "hibernating", "provider": "process", "bootstrapAttempts": 0,
            "lastError": null, "uses": 0, "maxUse": 1, "createdAt": 5, "updatedAt": 6,
            "readyAt": null, "extra": true
        });
        let i: Instance = serde_json::from_value(v).unwrap();
        assert_eq!(i.status, InstanceStatus::Unknown);
        assert_eq!(i.created_at, 5);
    }

    #[test]
    fn secrets_never_in_debug() {
        let created: CreatedInstance = serde_json::from_value(json!({
            "instance": {"instanceId": "i1", "status": "starting", "createdAt": 1},
            "token": "vmt_supersecret",
            "controlPlaneWs": "ws://127.0.0.1:1/ws/vm",
            "env": {"VM_TOKEN": "vmt_supersecret", "VM_INSTANCE_ID": "i1"}
        }))
        .unwrap();
        let dbg = format!("{created:?}");
        assert!(!dbg.contains("supersecret"), "{dbg}");
        assert!(dbg.contains("VM_INSTANCE_ID"));
        assert_eq!(
            created.token.redact("boom vmt_supersecret!"),
            "boom [redacted]!"
        );
    }

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(path_segment("ci-pool_1"), "ci-pool_1");
        assert_eq!(path_segment("a/b c"), "a%2Fb%20c");
    }
}
