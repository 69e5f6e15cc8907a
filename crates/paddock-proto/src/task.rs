//! The task specification: what a client submits and what an agent receives in `dispatch`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Task kind for a shell task run by an agent (seed 004, `agent.execute`).
pub const KIND_AGENT_EXECUTE: &str = "agent.execute";

/// Task kind an agent answers at once, without starting any process: a probe of the whole
/// dispatch path (submit, claim, deliver, result stored, caller answered), for health
/// checks and for measuring the control plane itself. Takes no `shell` and no `bundle`.
pub const KIND_AGENT_NOOP: &str = "agent.noop";

/// Kinds an agent of this build can run.
pub const AGENT_KINDS: &[&str] = &[KIND_AGENT_EXECUTE, KIND_BUNDLE_RUN, KIND_AGENT_NOOP];

/// Kind of a workflow-bundle run (seed 001): fetch, verify, unpack, install, run.
pub const KIND_BUNDLE_RUN: &str = "bundle.run";

/// Runtimes a bundle may declare.
pub const BUNDLE_RUNTIMES: &[&str] = &["node", "python", "shell", "binary"];

/// The payload of a `bundle.run` task: what `GET /api/internal/spawn/{workflowId}` returns,
/// carried to the agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BundleTask {
    /// Where to download the archive (a presigned S3 URL or a signed gateway URL). A
    /// credential: never logged.
    pub url: String,
    /// SHA-256 of the archive, hex.
    pub sha256: String,
    /// Archive size in bytes.
    pub size: u64,
    /// `node`, `python`, `shell` or `binary`.
    pub runtime: String,
    /// Path of the entrypoint inside the bundle.
    pub entrypoint: String,
    /// Arguments for the entrypoint.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Per-task environment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Workflow id and version (informational, for logs and events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_id: Option<String>,
    /// Version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
}

/// Default per-task timeout when the submitter gives none.
pub const DEFAULT_TASK_TIMEOUT_MS: u64 = 60_000;

/// Upper bound on a task timeout accepted by the gateway (24 h).
pub const MAX_TASK_TIMEOUT_MS: u64 = 24 * 3600 * 1000;

/// Which agents may take a task. Matches control-plane tags only; agent-reported tags
/// never route (seed 004).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Selector {
    /// The agent must carry this control-plane tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// The agent must carry the control-plane tag `group:<group>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Run on an instance (seed 000): `self` for the caller's own instance, which the
    /// gateway creates and bootstraps on demand and replaces with its id at submission.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
}

impl Selector {
    /// The control-plane tag this selector requires, if any.
    ///
    /// # Errors
    /// Both `tag` and `group` set, or an empty value.
    pub fn required_tag(&self) -> Result<Option<String>, String> {
        if let Some(inst) = &self.instance {
            if self.tag.is_some() || self.group.is_some() {
                return Err("selector: `instance` cannot be combined with `tag` or `group`".into());
            }
            if inst.trim().is_empty() {
                return Err("selector.instance is empty".into());
            }
            return Ok(Some(format!("instance:{inst}")));
        }
        match (&self.tag, &self.group) {
            (Some(_), Some(_)) => Err("selector: set either `tag` or `group`, not both".into()),
            (Some(t), None) if t.trim().is_empty() => Err("selector.tag is empty".into()),
            (None, Some(g)) if g.trim().is_empty() => Err("selector.group is empty".into()),
            (Some(t), None) => Ok(Some(t.clone())),
            (None, Some(g)) => Ok(Some(format!("group:{g}"))),
            (None, None) => Ok(None),
        }
    }
}

/// Network policy requested for the sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// No network at all. The `host` backend cannot enforce this and refuses the task
    /// with `HOST_NETWORK_MODE_UNSUPPORTED`.
    None,
    /// Whatever network the backend gives by default.
    Default,
}

/// Sandbox options of a task.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SandboxSpec {
    /// Backend the task needs (`host`, later `process`, `oci`, `docker`, `vm`). `None`
    /// means the agent's configured default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// Network policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_mode: Option<NetworkMode>,
    /// Names of agent-process environment variables copied into the task's environment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env_passthrough_allowlist: Vec<String>,
    /// Resource limits asked by the task; each is capped by the agent's own limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<LimitsSpec>,
    /// Keep the work directory after the run (its path is reported in a `workdir_kept` event).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep_workdir: bool,
}

/// Resource limits a task asks for (process, oci and docker backends).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LimitsSpec {
    /// Memory limit in MiB (no swap beyond it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    /// CPU quota in CPUs (0.5 = half a core).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// Most processes and threads at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u32>,
}

impl Eq for LimitsSpec {}

/// The shell payload of an `agent.execute` task: either an argv or a script run by `sh -c`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ShellTask {
    /// Program and arguments, executed directly (no shell).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub argv: Vec<String>,
    /// A script for `/bin/sh -c`, used when `argv` is empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script: Option<String>,
    /// Per-task environment, applied over the minimal environment and the passthrough.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Bytes written to the process's standard input, then closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
}

impl ShellTask {
    /// The argv to execute.
    pub fn command(&self) -> Vec<String> {
        if !self.argv.is_empty() {
            self.argv.clone()
        } else {
            vec![
                "/bin/sh".into(),
                "-c".into(),
                self.script.clone().unwrap_or_default(),
            ]
        }
    }
}

/// A task as submitted through the API and carried by `dispatch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TaskSpec {
    /// Task kind; this build runs `agent.execute`.
    pub kind: String,
    /// Routing selector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Selector>,
    /// Shell payload, required for `agent.execute`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<ShellTask>,
    /// Bundle payload, required for `bundle.run`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle: Option<BundleTask>,
    /// Sandbox options.
    #[serde(default)]
    pub sandbox: SandboxSpec,
    /// Run time limit, enforced by the agent (kill on expiry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// How long a queued task may wait for an eligible agent before failing with
    /// `QUEUE_TIMEOUT` (gateway default when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_timeout_ms: Option<u64>,
    /// Attempts allowed when the running agent is lost (gateway default when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
}

impl TaskSpec {
    /// Checks what can be checked without an agent.
    ///
    /// # Errors
    /// A human-readable reason, reported as `INVALID_REQUEST`.
    pub fn validate(&self) -> Result<(), String> {
        if !AGENT_KINDS.contains(&self.kind.as_str()) {
            return Err(format!(
                "unsupported kind `{}` (supported: {})",
                self.kind,
                AGENT_KINDS.join(", ")
            ));
        }
        if let Some(sel) = &self.selector {
            sel.required_tag()?;
        }
        if self.kind == KIND_BUNDLE_RUN {
            if self.shell.is_some() {
                return Err("`shell` is not used by bundle.run".into());
            }
            let b = self
                .bundle
                .as_ref()
                .ok_or("`bundle` is required for bundle.run")?;
            if b.sha256.len() != 64 || !b.sha256.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err("bundle.sha256 must be 64 hex digits".into());
            }
            if !BUNDLE_RUNTIMES.contains(&b.runtime.as_str()) {
                return Err(format!(
                    "bundle.runtime must be one of {}",
                    BUNDLE_RUNTIMES.join(", ")
                ));
            }
            if b.entrypoint.is_empty()
                || b.entrypoint.starts_with('/')
                || b.entrypoint.split('/').any(|c| c == "..")
            {
                return Err("bundle.entrypoint must be a relative path inside the bundle".into());
            }
            if !(b.url.starts_with("http://") || b.url.starts_with("https://")) {
                return Err("bundle.url must be http(s)".into());
            }
            return self.validate_common();
        }
        if self.bundle.is_some() {
            return Err("`bundle` is only used by bundle.run".into());
        }
        if self.kind == KIND_AGENT_NOOP {
            if self.shell.is_some() {
                return Err("`shell` is not used by agent.noop".into());
            }
            return self.validate_common();
        }
        let shell = self
            .shell
            .as_ref()
            .ok_or("`shell` is required for agent.execute")?;
        if shell.argv.is_empty() && shell.script.as_deref().is_none_or(str::is_empty) {
            return Err("shell: give `argv` or `script`".into());
        }
        if shell.argv.first().is_some_and(String::is_empty) {
            return Err("shell.argv[0] is empty".into());
        }
        for key in shell.env.keys() {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(format!("shell.env: invalid variable name {key:?}"));
            }
        }
        self.validate_common()
    }

    /// Checks shared by every kind: timeouts and limits.
    fn validate_common(&self) -> Result<(), String> {
        if let Some(t) = self.timeout_ms
            && (t == 0 || t > MAX_TASK_TIMEOUT_MS)
        {
            return Err(format!("timeoutMs must be in 1..={MAX_TASK_TIMEOUT_MS}"));
        }
        if let Some(t) = self.queue_timeout_ms
            && t > MAX_TASK_TIMEOUT_MS
        {
            return Err(format!(
                "queueTimeoutMs must be at most {MAX_TASK_TIMEOUT_MS}"
            ));
        }
        if let Some(l) = self.sandbox.limits {
            if l.memory_mb == Some(0) || l.pids == Some(0) {
                return Err("sandbox.limits: memoryMb and pids must be positive".into());
            }
            if l.cpus.is_some_and(|c| !(c > 0.0 && c <= 1024.0)) {
                return Err("sandbox.limits.cpus must be in (0, 1024]".into());
            }
        }
        if let Some(n) = self.max_attempts
            && !(1..=10).contains(&n)
        {
            return Err("maxAttempts must be in 1..=10".into());
        }
        Ok(())
    }

    /// The effective timeout.
    pub fn timeout_ms(&self) -> u64 {
        self.timeout_ms.unwrap_or(DEFAULT_TASK_TIMEOUT_MS)
    }
}

/// Final status of one attempt, as reported by the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResultStatus {
    /// The process exited with code 0.
    Succeeded,
    /// The process exited non-zero or was killed by a signal.
    Failed,
    /// The process outlived its timeout and was killed.
    TimedOut,
    /// The task was canceled.
    Canceled,
    /// The task could not run at all (see `errorCode`).
    Error,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> Result<TaskSpec, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn selector_group_maps_to_group_tag() {
        let s = Selector {
            tag: None,
            group: Some("alpha".into()),
            instance: None,
        };
        assert_eq!(s.required_tag().unwrap().as_deref(), Some("group:alpha"));
        let both = Selector {
            tag: Some("x".into()),
            group: Some("y".into()),
            instance: None,
        };
        assert!(both.required_tag().is_err());
        let inst = Selector {
            instance: Some("i-1".into()),
            ..Default::default()
        };
        assert_eq!(
            inst.required_tag().unwrap().as_deref(),
            Some("instance:i-1")
        );
        let mixed = Selector {
            instance: Some("i-1".into()),
            tag: Some("x".into()),
            group: None,
        };
        assert!(mixed.required_tag().is_err());
    }

    #[test]
    fn validate_rejects_bad_specs() {
        let ok = spec(r#"{"kind":"agent.execute","shell":{"argv":["true"]}}"#).unwrap();
        ok.validate().unwrap();
        assert_eq!(spec(r#"{"kind":"agent.noop"}"#).unwrap().validate(), Ok(()));
        assert!(
            spec(r#"{"kind":"agent.noop","shell":{"argv":["true"]}}"#)
                .unwrap()
                .validate()
                .is_err()
        );
        let no_shell = spec(r#"{"kind":"agent.execute"}"#).unwrap();
        assert!(no_shell.validate().is_err());
        let bad_kind = spec(r#"{"kind":"nope","shell":{"argv":["true"]}}"#).unwrap();
        assert!(
            bad_kind
                .validate()
                .unwrap_err()
                .contains("unsupported kind")
        );
        let zero =
            spec(r#"{"kind":"agent.execute","shell":{"script":"x"},"timeoutMs":0}"#).unwrap();
        assert!(zero.validate().is_err());
        let bad_env =
            spec(r#"{"kind":"agent.execute","shell":{"argv":["a"],"env":{"A=B":"c"}}}"#).unwrap();
        assert!(bad_env.validate().is_err());
        assert!(
            spec(r#"{"kind":"agent.execute","bogus":1}"#).is_err(),
            "unknown fields refused"
        );
    }

    #[test]
    fn script_runs_through_sh() {
        let s = ShellTask {
            script: Some("echo hi".into()),
            ..Default::default()
        };
        assert_eq!(s.command(), vec!["/bin/sh", "-c", "echo hi"]);
    }
}
