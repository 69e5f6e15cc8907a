//! Executor WebSocket messages. Every message is one JSON text frame with a `type` field.
//! Field names are camelCase. See `docs/protocol.md`.

use serde::{Deserialize, Serialize};

use crate::{ErrorCode, ResultStatus, TaskSpec};

/// Capabilities an agent declares in `hello`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Capabilities {
    /// Task kinds the agent runs (`agent.execute`, ...).
    #[serde(default)]
    pub kinds: Vec<String>,
    /// Connector ids the agent can execute (for `connector.action`).
    #[serde(default)]
    pub connectors: Vec<String>,
    /// Self-reported tags: shown as `reportedTags`, never used for routing.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Concurrency the agent accepts; the gateway never dispatches more (default 10).
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: u32,
    /// Sandbox backends available on this agent; the first is its default.
    #[serde(default)]
    pub backends: Vec<String>,
}

fn default_max_in_flight() -> u32 {
    10
}

/// A task the agent is still running (or holding an unacknowledged result for), reported in
/// `hello` after a reconnect so the gateway re-binds it instead of re-dispatching.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunningTask {
    /// Task id.
    pub task_id: String,
    /// Attempt number the agent is running.
    pub attempt: u32,
}

/// First message from an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hello {
    /// Protocol version the agent speaks.
    pub protocol: u32,
    /// Agent build version (informational).
    pub agent_version: String,
    /// Declared capabilities.
    pub capabilities: Capabilities,
    /// Tasks in progress on this agent.
    #[serde(default)]
    pub running: Vec<RunningTask>,
}

/// Gateway's answer to `hello`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HelloOk {
    /// Protocol version chosen for the session.
    pub protocol: u32,
    /// The agent's id.
    pub agent_id: String,
    /// The agent's org.
    pub org_id: String,
    /// How often the agent should send `heartbeat`.
    pub heartbeat_interval_ms: u64,
    /// Tasks from `hello.running` the gateway no longer considers the agent's (the agent
    /// should stop them).
    #[serde(default)]
    pub cancel: Vec<RunningTask>,
    /// On `/ws/vm` only: a fresh instance token, for the agent to reconnect with after
    /// the one it connected with expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_token: Option<String>,
}

/// A task handed to an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Dispatch {
    /// Task id.
    pub task_id: String,
    /// Attempt number, starting at 1. Results must echo it.
    pub attempt: u32,
    /// Lease deadline (ms since epoch); heartbeats extend it while connected.
    pub lease_deadline_ms: i64,
    /// What to run.
    pub spec: TaskSpec,
}

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl Stream {
    /// Name as stored and sent.
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// A chunk of live output. `seq` starts at 1 per (task, attempt) and has no gaps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Output {
    /// Task id.
    pub task_id: String,
    /// Attempt number.
    pub attempt: u32,
    /// Sequence number within the attempt.
    pub seq: u64,
    /// Source stream.
    pub stream: Stream,
    /// UTF-8 text (invalid bytes replaced).
    pub data: String,
}

/// A task event reported by the agent (for example `started`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// Task id.
    pub task_id: String,
    /// Attempt number.
    pub attempt: u32,
    /// Event name.
    pub name: String,
    /// Free-form payload.
    #[serde(default)]
    pub payload: serde_json::Value,
}

/// The outcome of one attempt. Carries the full captured (capped) output, so the stored
/// result does not depend on every live `output` frame arriving.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskResult {
    /// Task id.
    pub task_id: String,
    /// Attempt number.
    pub attempt: u32,
    /// Outcome.
    pub status: ResultStatus,
    /// Exit code when the process exited normally.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Signal number when the process was killed by one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Error code when `status` is `error`, `timed_out` or `canceled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<ErrorCode>,
    /// Human-readable error detail (never secrets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    /// Captured standard output, capped.
    #[serde(default)]
    pub stdout: String,
    /// Captured standard error, capped.
    #[serde(default)]
    pub stderr: String,
    /// Standard output exceeded the cap.
    #[serde(default)]
    pub stdout_truncated: bool,
    /// Standard error exceeded the cap.
    #[serde(default)]
    pub stderr_truncated: bool,
    /// When the process started (ms since epoch).
    pub started_at_ms: i64,
    /// When the attempt finished (ms since epoch).
    pub finished_at_ms: i64,
}

impl TaskResult {
    /// The exit code a CLI should exit with for this result.
    pub fn process_exit_code(&self) -> i32 {
        match (self.exit_code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => match self.status {
                ResultStatus::Succeeded => 0,
                ResultStatus::TimedOut => 124,
                _ => 1,
            },
        }
    }
}

/// An error, from either side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    /// Stable code.
    pub code: ErrorCode,
    /// Human-readable detail.
    pub message: String,
    /// Task the error is about, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// Attempt the error is about, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
}

/// Heartbeat, both directions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Heartbeat {
    /// Sender's clock, ms since epoch.
    pub ts_ms: i64,
}

/// Cancel request from the gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cancel {
    /// Task id.
    pub task_id: String,
    /// Attempt to cancel.
    pub attempt: u32,
    /// Why.
    pub reason: String,
}

/// Gateway's acknowledgement of a `result` (the agent drops it from its outbox).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResultAck {
    /// Task id.
    pub task_id: String,
    /// Attempt number.
    pub attempt: u32,
    /// `false` when the result was ignored (stale attempt or task already finished).
    pub stored: bool,
}

/// Task and attempt, for `accepted`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TaskRef {
    /// Task id.
    pub task_id: String,
    /// Attempt number.
    pub attempt: u32,
}

/// Messages an agent sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMessage {
    /// First message of a session.
    Hello(Hello),
    /// Liveness; the gateway answers with its own heartbeat.
    Heartbeat(Heartbeat),
    /// The agent took a dispatched task and started it.
    Accepted(TaskRef),
    /// Live output chunk.
    Output(Output),
    /// Task event.
    Event(Event),
    /// Final result of an attempt.
    Result(TaskResult),
    /// The agent refuses a dispatch or reports a protocol problem.
    Error(ErrorBody),
}

/// Messages a gateway sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum GatewayMessage {
    /// Session accepted.
    HelloOk(HelloOk),
    /// Liveness.
    Heartbeat(Heartbeat),
    /// Run this task.
    Dispatch(Box<Dispatch>),
    /// Stop this task.
    Cancel(Cancel),
    /// Result received (stored or ignored).
    ResultAck(ResultAck),
    /// Something is wrong; fatal errors are followed by a close.
    Error(ErrorBody),
}
