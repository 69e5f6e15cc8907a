//! Sandbox backends: where a task's process runs.
//!
//! A backend turns a [`RunRequest`] (argv, final environment, work directory, limits) into
//! a [`RunOutcome`]. Everything that is the same for every backend (building the
//! environment, creating and removing the work directory, talking to the gateway) lives in
//! the runner; a backend only starts, watches, caps and kills. Issue 2 ships `host`; the
//! `process`, `oci`, `docker` and `vm` backends implement the same trait.

pub(crate) mod cgroup;
pub(crate) mod cleanup;
pub mod docker;
pub mod host;
pub mod oci;
pub(crate) mod outcome;
pub mod output;
pub mod policy;
pub mod process;
pub(crate) mod supervise;
#[cfg(test)]
pub(crate) mod testing;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use paddock_proto::{ErrorCode, NetworkMode, ResultStatus, SandboxSpec, Stream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Everything a backend needs to run one attempt.
#[derive(Debug, Clone)]
pub struct RunRequest {
    /// Task id (for logs and names of sandbox objects).
    pub task_id: String,
    /// Attempt number.
    pub attempt: u32,
    /// Program and arguments.
    pub argv: Vec<String>,
    /// The complete environment of the process (the runner has already applied the minimal
    /// set, the passthrough allowlist and the per-task overrides).
    pub env: BTreeMap<String, String>,
    /// Written to standard input, which is then closed. `None`: stdin is `/dev/null`.
    pub stdin: Option<String>,
    /// The per-run work directory; exists when `run` is called.
    pub workdir: PathBuf,
    /// Wall-clock limit; on expiry the whole process tree gets SIGTERM, then SIGKILL after
    /// `kill_grace`.
    pub timeout: Duration,
    /// Time between SIGTERM and SIGKILL.
    pub kill_grace: Duration,
    /// Requested network policy.
    pub network: NetworkMode,
    /// Cap on captured characters, per stream. Output past the cap is read and discarded.
    pub output_max_chars: usize,
    /// Resource limits (ignored by `host`, which has no way to enforce them).
    pub limits: Limits,
    /// Root filesystem to show the task; `None`: a read-only view of the host's
    /// ([`policy::HOST_ROOT_ENTRIES`]).
    pub rootfs: Option<PathBuf>,
}

impl RunRequest {
    /// The program to run (`argv[0]`).
    ///
    /// # Errors
    /// [`SandboxError::Invalid`] when `argv` is empty.
    pub(crate) fn program(&self) -> Result<&str, SandboxError> {
        self.argv
            .first()
            .map(String::as_str)
            .ok_or_else(|| SandboxError::Invalid("argv is empty".into()))
    }
}

/// The first executable file named `program` in the directories of `path` (a `PATH` value;
/// `/usr/bin:/bin` when unset), as `execvp` would pick it. `program` must be a bare name.
pub(crate) fn find_in_path(program: &str, path: Option<&str>) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    path.unwrap_or("/usr/bin:/bin")
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|dir| std::path::Path::new(dir).join(program))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// `raw` with every character other than an ASCII letter or digit or one of `keep` replaced
/// by `_`: for the names of the objects a backend creates (cgroups, containers, bundles).
pub(crate) fn safe_name(raw: &str, keep: &[char]) -> String {
    raw.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || keep.contains(&c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Enforced resource limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Memory limit in bytes (swap included: no swap beyond it).
    pub memory_bytes: u64,
    /// CPU quota in thousandths of a CPU (1000 = one core).
    pub cpu_millis: u32,
    /// Most processes and threads at once.
    pub pids: u32,
}

impl Default for Limits {
    /// The seed's strict profile: 256 MiB, 1 CPU, 256 processes.
    fn default() -> Self {
        Limits {
            memory_bytes: 256 * 1024 * 1024,
            cpu_millis: 1000,
            pids: 256,
        }
    }
}

impl Limits {
    /// These limits, tightened by what a task asks for (a task never raises them).
    pub fn tightened(self, asked: Option<paddock_proto::LimitsSpec>) -> Limits {
        let Some(a) = asked else { return self };
        Limits {
            memory_bytes: a.memory_mb.map_or(self.memory_bytes, |m| {
                (m.saturating_mul(1024 * 1024)).min(self.memory_bytes)
            }),
            cpu_millis: a.cpus.map_or(self.cpu_millis, |c| {
                ((c * 1000.0).round() as u32).clamp(1, self.cpu_millis)
            }),
            pids: a.pids.map_or(self.pids, |p| p.min(self.pids)),
        }
    }
}

/// A chunk of live output, forwarded to the gateway as it is produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputChunk {
    /// Source stream.
    pub stream: Stream,
    /// Text (lossy UTF-8, never splitting a character).
    pub data: String,
}

/// The outcome of a run that started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutcome {
    /// Outcome class.
    pub status: ResultStatus,
    /// Exit code, if the process exited.
    pub exit_code: Option<i32>,
    /// Terminating signal, if killed.
    pub signal: Option<i32>,
    /// Code for timeouts, cancellation and limit kills.
    pub error_code: Option<ErrorCode>,
    /// Detail for the error code.
    pub error_message: Option<String>,
    /// Captured standard output (at most `output_max_chars` characters).
    pub stdout: String,
    /// Captured standard error (at most `output_max_chars` characters).
    pub stderr: String,
    /// Standard output was cut at the cap.
    pub stdout_truncated: bool,
    /// Standard error was cut at the cap.
    pub stderr_truncated: bool,
    /// When the process was started (ms since epoch).
    pub started_at_ms: i64,
    /// When the run ended (ms since epoch).
    pub finished_at_ms: i64,
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The backend cannot enforce the requested network mode.
    #[error("the {backend} backend cannot enforce networkMode \"none\"")]
    NetworkModeUnsupported {
        /// Backend name.
        backend: &'static str,
    },
    /// The process could not be started.
    #[error("could not start {program}: {reason}")]
    SpawnFailed {
        /// argv\[0\].
        program: String,
        /// OS error text.
        reason: String,
    },
    /// The request is not valid for this backend.
    #[error("invalid sandbox request: {0}")]
    Invalid(String),
    /// Namespaces, mounts, cgroups or the container runtime failed.
    #[error("sandbox set-up failed: {0}")]
    Setup(String),
}

impl SandboxError {
    /// The stable code reported in the task result.
    pub fn code(&self) -> ErrorCode {
        match self {
            SandboxError::NetworkModeUnsupported { .. } => ErrorCode::HostNetworkModeUnsupported,
            SandboxError::SpawnFailed { .. } => ErrorCode::SpawnFailed,
            SandboxError::Invalid(_) => ErrorCode::InvalidRequest,
            SandboxError::Setup(_) => ErrorCode::SandboxSetupFailed,
        }
    }
}

/// A boxed future, so backends can be used as trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A sandbox backend.
pub trait Sandbox: Send + Sync {
    /// Backend name as used in `PADDOCK_AGENT_EXEC_BACKEND` and `sandbox.backend`.
    fn name(&self) -> &'static str;

    /// Refuses, before anything is created, a task this backend cannot honour (for
    /// example `networkMode: "none"` on `host`).
    ///
    /// # Errors
    /// The reason, with its code.
    fn check(&self, spec: &SandboxSpec) -> Result<(), SandboxError>;

    /// Where the task sees its work directory (`HOME` and `PADDOCK_WORKDIR` point there):
    /// `None` for the host path itself (the `host` backend), `/work` for isolating backends.
    fn workdir_inside(&self) -> Option<&'static str> {
        Some(policy::WORK_DIR)
    }

    /// Timeout for tasks that give none (`PADDOCK_AGENT_DOCKER_TIMEOUT_MS` for `docker`);
    /// `None`: the protocol's default.
    fn default_timeout(&self) -> Option<std::time::Duration> {
        None
    }

    /// Runs one attempt to completion: starts the process, forwards output chunks to
    /// `output` (until the cap), enforces the timeout, and honours `cancel` by killing the
    /// process tree (SIGTERM, then SIGKILL after the grace). No process the task started
    /// may outlive the returned future.
    fn run<'a>(
        &'a self,
        req: RunRequest,
        output: mpsc::Sender<OutputChunk>,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, Result<RunOutcome, SandboxError>>;

    /// Waits until the clean-up of finished runs is done. `run` returns as soon as the
    /// outcome is known and no process of the run is alive; removing what the run created
    /// (cgroups, containers, bundles) may go on in the background after that
    /// (`sandbox::cleanup`). Once this returns, nothing of a run that returned before the
    /// call is left. The agent awaits it before exiting; tests before checking for leftovers.
    fn settle(&self) -> BoxFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }
}

/// Backends found on this machine, and for each one left out, why.
pub type Detected = (Vec<std::sync::Arc<dyn Sandbox>>, Vec<(String, String)>);

/// The backends this machine can run, among `wanted` (all known ones when `None`): `host`
/// always; `process` when running as root with usable cgroups; `oci` when crun or runc works
/// (`oci_runtime` picks one); `docker` when dockerd answers.
pub async fn detect(
    settings: &crate::settings::AgentSettings,
    wanted: Option<&[String]>,
    init_exe: Option<PathBuf>,
    oci_runtime: Option<PathBuf>,
    docker: docker::DockerConfig,
) -> Detected {
    let want = |name: &str| wanted.is_none_or(|w| w.iter().any(|x| x == name));
    let mut found: Vec<std::sync::Arc<dyn Sandbox>> = Vec::new();
    let mut missing = Vec::new();
    if want(host::HostSandbox::NAME) {
        found.push(std::sync::Arc::new(host::HostSandbox::new()));
    }
    if want(process::ProcessSandbox::NAME) {
        let scratch = settings.workdir_root.join(".process");
        match init_exe
            .ok_or_else(|| "no sandbox init executable".to_string())
            .and_then(|exe| process::ProcessSandbox::detect(exe, scratch))
        {
            Ok(b) => found.push(std::sync::Arc::new(b)),
            Err(e) => missing.push((process::ProcessSandbox::NAME.to_string(), e)),
        }
    }
    if want(oci::OciSandbox::NAME) {
        let cfg = oci::OciConfig {
            runtime: oci_runtime,
            state_dir: settings.workdir_root.join(".oci"),
        };
        match tokio::task::spawn_blocking(move || oci::OciSandbox::detect(cfg)).await {
            Ok(Ok(b)) => found.push(std::sync::Arc::new(b)),
            Ok(Err(e)) => missing.push((oci::OciSandbox::NAME.to_string(), e)),
            Err(e) => missing.push((oci::OciSandbox::NAME.to_string(), e.to_string())),
        }
    }
    if want(docker::DockerSandbox::NAME) {
        match docker::DockerSandbox::connect(docker).await {
            Ok(b) => found.push(std::sync::Arc::new(b)),
            Err(e) => missing.push((docker::DockerSandbox::NAME.to_string(), e)),
        }
    }
    (found, missing)
}
