//! The `docker` backend: runs each attempt in a fresh, hardened container of a local image
//! through the Docker Engine API (`bollard`).
//!
//! One attempt is one container, named `paddock-<task>-<attempt>` (characters Docker does
//! not accept in names become `_`) and labelled `paddock.task-id`/`paddock.attempt`. It
//! is created, attached (stdout/stderr demultiplexed into two [`Capture`]s, so capping and
//! UTF-8 handling are the same as on every other backend), started, fed its stdin (then
//! stdin is closed), waited for, and **always** removed (force), also when set-up fails half
//! way and when the run future is dropped (a guard then spawns the removal). When a create
//! request got no answer (client-side timeout, dropped future) the engine may still
//! complete it, so the removal is retried in the background for about 40 s.
//!
//! What the container gets:
//! - the configured image, the task's argv as `Cmd` with the image's `Entrypoint` cleared,
//!   exactly [`RunRequest::env`] as `Env` (see "Environment" below), working directory
//!   [`WORK_DIR`], user `65534:65534` ([`SANDBOX_UID`]/[`SANDBOX_GID`]), host name
//!   [`SANDBOX_HOSTNAME`];
//! - Docker's init (`docker-init`, i.e. tini) as PID 1, so that the task gets signals the
//!   way it would on the host (a process that is PID 1 of its namespace ignores SIGTERM
//!   unless it installs a handler) and zombies are reaped. tini exits with the task's exit
//!   status, or 128+N when the task died of signal N;
//! - memory = min(task limit, [`DockerConfig::memory_mb`]) with swap equal to it (no swap),
//!   CPU = min(task limit, [`DockerConfig::cpus`], CPUs of the host) as `NanoCpus`, pids =
//!   min(task limit, [`DockerConfig::pids`]); Docker's lower bounds apply (6 MiB, 0.01 CPU);
//! - a read-only root file system; the work directory (chowned to 65534 first) bind-mounted
//!   read-write at `/work` (made mode 0777 instead when the agent may not chown); a
//!   64 MiB `/tmp` tmpfs (`rw,nosuid,nodev,mode=1777`); Docker's own private `/dev/shm`
//!   (64 MiB, counted in the memory limit) stays writable too;
//! - network `none` when the task asks for `networkMode: "none"`, else
//!   [`DockerConfig::network_default`] (itself `none` unless the operator opts in);
//! - every capability dropped, `no-new-privileges`, and a seccomp profile implementing
//!   [`policy`](super::policy): default allow, [`DENIED_SYSCALLS`] fail with `EPERM`,
//!   `clone3` fails with `ENOSYS` (so C libraries fall back to `clone`), and `clone` with
//!   any of [`CLONE_NAMESPACE_FLAGS`] fails with `EPERM` ([`seccomp_profile`]). This
//!   profile replaces Docker's default one; it needs Docker 20.10 (API 1.41) or newer
//!   (`errnoRet`), which [`DockerSandbox::connect`] checks;
//! - `nofile` limited to [`RLIMIT_NOFILE`]; logging driver `none` (output is only streamed
//!   to the agent, never written to the daemon's disk).
//!
//! Environment: Docker starts from the image's own `Env` and overrides it with the given
//! variables, so an image's variables the task does not set are still visible (the test
//! image has none; `node:24-alpine` sets e.g. `NODE_VERSION`). On top of that the engine
//! adds `HOSTNAME` (always, = [`SANDBOX_HOSTNAME`]) and `PATH`
//! (`/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin`) when neither the task
//! nor the image set it, and runc adds `HOME` when it is not set (`/` for a user without a
//! passwd entry).
//!
//! Outcome mapping (as the `host` backend): exit code 0 is `succeeded`; another exit is
//! `failed`; a status of 129..=192 is reported as death by signal (`signal` = status-128,
//! no `exit_code`), which is what tini reports for a killed task, so a task that itself
//! calls `exit 137` is indistinguishable from one killed by SIGKILL. On timeout or cancel
//! the container gets SIGTERM (forwarded by tini to the task), then SIGKILL after
//! `kill_grace`; the outcome is `timed_out` (`TASK_TIMEOUT`) or `canceled`
//! (`TASK_CANCELED`). A task whose container Docker reports `OOMKilled` is failed with
//! `MEMORY_LIMIT_EXCEEDED`, even if its main process then exited 0 (as in the process and
//! oci backends). Docker does not report that a task hit its pids limit, so a
//! **heuristic** is used: a failed task whose captured stderr says `can't fork`/`cannot
//! fork`, or mentions `fork` together with `Resource temporarily unavailable` (what
//! busybox, dash and bash print when `fork` fails with `EAGAIN`), is `PIDS_LIMIT_EXCEEDED`;
//! a program that handles the failure quietly is a plain `failed`.
//! A program that cannot be executed (tini reports `exec ... failed`, status 126/127) is a
//! [`SandboxError::SpawnFailed`], as on the host.
//!
//! The image is never pulled: it must exist in the local engine (`docker pull`/`docker
//! import`). `RunRequest::rootfs` is ignored (the image is the root file system). The work
//! directory must be a path of the machine dockerd runs on.
//!
//! Code: `container` defines the container and reads its end, `engine` waits for, removes
//! and streams from it; the seccomp profile is built with the `oci` backend's.
//!
//! [`WORK_DIR`]: super::policy::WORK_DIR
//! [`SANDBOX_UID`]: super::policy::SANDBOX_UID
//! [`SANDBOX_GID`]: super::policy::SANDBOX_GID
//! [`SANDBOX_HOSTNAME`]: super::policy::SANDBOX_HOSTNAME
//! [`DENIED_SYSCALLS`]: super::policy::DENIED_SYSCALLS
//! [`CLONE_NAMESPACE_FLAGS`]: super::policy::CLONE_NAMESPACE_FLAGS
//! [`RLIMIT_NOFILE`]: super::policy::RLIMIT_NOFILE
//! [`Capture`]: super::output::Capture

mod container;
mod engine;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bollard::Docker;
use bollard::models::{ContainerCreateBody, ContainerState};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, KillContainerOptionsBuilder,
};
use paddock_proto::{ErrorCode, ResultStatus, SandboxSpec, now_ms};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use self::container::container_name;
use self::container::{
    init_exec_failure, looks_like_fork_failure, memory_limit, oom_killed, pids_limit,
    prepare_workdir,
};
use self::engine::{
    ContainerGuard, WaitResult, drain_output, pump_output, remove_container, remove_eventually,
    server_message, start_error, status_of, wait_exit,
};
pub use super::oci::seccomp::docker_profile as seccomp_profile;
use super::outcome::{Ending, captured_outcome, format_bytes, split_exit_status};
use super::supervise::spawn_stdin_writer;
use super::{BoxFuture, OutputChunk, RunOutcome, RunRequest, Sandbox, SandboxError};

/// How long [`DockerSandbox::connect`] waits for dockerd to answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long to wait for the container to stop after SIGKILL before giving up on it (it is
/// force-removed either way).
const KILL_WAIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Oldest engine API this backend works with: Docker 20.10 (seccomp `errnoRet`).
const MIN_API_VERSION: (usize, usize) = (1, 41);

/// Settings of the `docker` backend: the seed's `VESPID_AGENT_DOCKER_*` variables, renamed
/// `PADDOCK_AGENT_DOCKER_*` (the binary maps the environment to this).
#[derive(Debug, Clone, PartialEq)]
pub struct DockerConfig {
    /// Image every task runs in; must exist locally, it is never pulled
    /// (`PADDOCK_AGENT_DOCKER_IMAGE`, default `node:24-alpine`).
    pub image: String,
    /// Docker network for tasks that do not ask for `networkMode: "none"`: `none`, `bridge`
    /// or the name of any Docker network (`PADDOCK_AGENT_DOCKER_NETWORK_DEFAULT`, default
    /// `none`, i.e. network is opt-in per agent).
    pub network_default: String,
    /// Timeout of a task that gives none, in milliseconds
    /// (`PADDOCK_AGENT_DOCKER_TIMEOUT_MS`, default 30000). Applied by the runner, see
    /// [`DockerSandbox::default_timeout`].
    pub timeout_ms: u64,
    /// Most memory a container may use, in MiB, swap included; 0: no cap beyond the
    /// task's limit (`PADDOCK_AGENT_DOCKER_MEMORY_MB`, default 256).
    pub memory_mb: u64,
    /// Most CPUs a container may use; 0: no cap beyond the task's limit
    /// (`PADDOCK_AGENT_DOCKER_CPUS`, default 1.0).
    pub cpus: f64,
    /// Most processes and threads in a container; 0: no cap beyond the task's limit
    /// (`PADDOCK_AGENT_DOCKER_PIDS`, default 256).
    pub pids: u32,
    /// Most characters captured per stream; the smaller of this and the request's cap
    /// applies (`PADDOCK_AGENT_DOCKER_OUTPUT_MAX_CHARS`, default 65536).
    pub output_max_chars: usize,
}

impl Default for DockerConfig {
    fn default() -> Self {
        DockerConfig {
            image: "node:24-alpine".into(),
            network_default: "none".into(),
            timeout_ms: 30_000,
            memory_mb: 256,
            cpus: 1.0,
            pids: 256,
            output_max_chars: 65_536,
        }
    }
}

/// The `docker` sandbox backend.
#[derive(Debug)]
pub struct DockerSandbox {
    docker: Docker,
    cfg: DockerConfig,
    /// The image was found locally (at connect time or at the last run).
    image_present: AtomicBool,
    /// CPUs of the engine's host, to keep `NanoCpus` within what Docker accepts.
    host_cpus: Option<u64>,
    /// The seccomp profile, serialized once.
    seccomp: String,
}

impl DockerSandbox {
    /// Backend name.
    pub const NAME: &'static str = "docker";

    /// Connects to the local engine (`DOCKER_HOST` if set, else
    /// `unix:///var/run/docker.sock`), negotiates the API version and pings it. A missing
    /// image is not an error here (it is logged, and runs fail with
    /// [`SandboxError::Setup`] until the image exists).
    ///
    /// # Errors
    /// Why the engine cannot be used: not reachable, not answering, or older than
    /// Docker 20.10.
    pub async fn connect(cfg: DockerConfig) -> Result<DockerSandbox, String> {
        if cfg.image.trim().is_empty() {
            return Err("the docker backend needs an image (PADDOCK_AGENT_DOCKER_IMAGE)".into());
        }
        if cfg.network_default.trim().is_empty() {
            return Err("PADDOCK_AGENT_DOCKER_NETWORK_DEFAULT is empty".into());
        }
        let host = std::env::var("DOCKER_HOST")
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "unix:///var/run/docker.sock".into());
        let unreachable = |why: String| {
            format!(
                "dockerd is not reachable at {host}: {why} (is dockerd running? \
                 DOCKER_HOST selects another engine)"
            )
        };
        let docker = Docker::connect_with_defaults().map_err(|e| unreachable(e.to_string()))?;
        let docker = tokio::time::timeout(CONNECT_TIMEOUT, docker.negotiate_version())
            .await
            .map_err(|_| unreachable(format!("no answer within {CONNECT_TIMEOUT:?}")))?
            .map_err(|e| unreachable(e.to_string()))?;
        tokio::time::timeout(CONNECT_TIMEOUT, docker.ping())
            .await
            .map_err(|_| unreachable(format!("no answer within {CONNECT_TIMEOUT:?}")))?
            .map_err(|e| unreachable(e.to_string()))?;
        let version = docker.client_version();
        if (version.major_version, version.minor_version) < MIN_API_VERSION {
            return Err(format!(
                "dockerd at {host} speaks engine API {}.{}; the docker backend needs {}.{} \
                 (Docker 20.10) or newer",
                version.major_version, version.minor_version, MIN_API_VERSION.0, MIN_API_VERSION.1
            ));
        }
        let host_cpus = match docker.info().await {
            Ok(info) => info
                .ncpu
                .and_then(|n| u64::try_from(n).ok())
                .filter(|n| *n > 0),
            Err(e) => {
                tracing::debug!(error = %e, "docker sandbox: engine info unavailable");
                None
            }
        };
        let image_present = match docker.inspect_image(&cfg.image).await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(
                    image = %cfg.image,
                    error = %server_message(&e),
                    "docker sandbox: image not found locally; \
                     tasks fail until it is pulled or imported"
                );
                false
            }
        };
        if cfg.network_default == "host" || cfg.network_default.starts_with("container:") {
            tracing::warn!(
                network = %cfg.network_default,
                "docker sandbox: tasks share a network namespace with the host or another container"
            );
        }
        let seccomp = seccomp_profile().to_string();
        tracing::info!(
            engine = %host,
            api = %format!("{}.{}", version.major_version, version.minor_version),
            image = %cfg.image,
            network_default = %cfg.network_default,
            "docker sandbox: connected"
        );
        Ok(DockerSandbox {
            docker,
            cfg,
            image_present: AtomicBool::new(image_present),
            host_cpus,
            seccomp,
        })
    }

    /// The settings this backend was connected with.
    pub fn config(&self) -> &DockerConfig {
        &self.cfg
    }

    /// Timeout for a task that gives none ([`DockerConfig::timeout_ms`]).
    pub fn default_timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.timeout_ms)
    }

    /// Whether the image was present locally when last looked at.
    pub fn image_present(&self) -> bool {
        self.image_present.load(Ordering::Relaxed)
    }

    fn missing_image(&self) -> SandboxError {
        SandboxError::Setup(format!(
            "image {} not found locally; docker pull/import it",
            self.cfg.image
        ))
    }

    /// Fails with [`SandboxError::Setup`] while the image is missing.
    async fn ensure_image(&self) -> Result<(), SandboxError> {
        if self.image_present() {
            return Ok(());
        }
        match self.docker.inspect_image(&self.cfg.image).await {
            Ok(_) => {
                self.image_present.store(true, Ordering::Relaxed);
                Ok(())
            }
            Err(e) if status_of(&e) == Some(404) => Err(self.missing_image()),
            Err(e) => Err(SandboxError::Setup(format!(
                "inspecting image {}: {}",
                self.cfg.image,
                server_message(&e)
            ))),
        }
    }

    /// Creates the container; a leftover container of the same name (an agent that died
    /// mid-run) is removed first. Sets `in_doubt` when the request failed without an
    /// answer from the engine (the container may still appear).
    async fn create(
        &self,
        name: &str,
        body: ContainerCreateBody,
        in_doubt: &mut bool,
    ) -> Result<(), SandboxError> {
        let options = CreateContainerOptionsBuilder::default().name(name).build();
        let mut replaced = false;
        loop {
            match self
                .docker
                .create_container(Some(options.clone()), body.clone())
                .await
            {
                Ok(created) => {
                    for warning in created.warnings {
                        tracing::warn!(
                            container = %name,
                            %warning,
                            "docker sandbox: engine warning"
                        );
                    }
                    return Ok(());
                }
                Err(e) if status_of(&e) == Some(409) && !replaced => {
                    tracing::warn!(
                        container = %name,
                        "docker sandbox: removing a leftover container of the same name"
                    );
                    remove_container(&self.docker, name).await;
                    replaced = true;
                }
                Err(e) if status_of(&e) == Some(404) && server_message(&e).contains("image") => {
                    self.image_present.store(false, Ordering::Relaxed);
                    return Err(self.missing_image());
                }
                Err(e) => {
                    *in_doubt = status_of(&e).is_none();
                    return Err(SandboxError::Setup(format!(
                        "creating container {name}: {}",
                        server_message(&e)
                    )));
                }
            }
        }
    }

    async fn run_docker(
        &self,
        req: RunRequest,
        output: mpsc::Sender<OutputChunk>,
        cancel: CancellationToken,
    ) -> Result<RunOutcome, SandboxError> {
        req.program()?;
        if req.rootfs.is_some() {
            tracing::debug!(
                task_id = %req.task_id,
                "docker sandbox: rootfs ignored (the image is the root)"
            );
        }
        self.ensure_image().await?;
        let workdir = prepare_workdir(&req.workdir)?;
        let name = container_name(&req.task_id, req.attempt);
        let body = self.container_body(&req, &workdir);
        // Armed before the container exists: removing a container that was never created
        // is a harmless 404.
        let mut guard = ContainerGuard {
            docker: self.docker.clone(),
            name: name.clone(),
            armed: true,
        };
        let mut in_doubt = false;
        let result = self
            .run_container(&name, body, req, output, cancel, &mut in_doubt)
            .await;
        if in_doubt {
            tokio::spawn(remove_eventually(self.docker.clone(), name));
        } else {
            remove_container(&self.docker, &name).await;
        }
        guard.armed = false;
        result
    }

    /// Create, attach, start, wait, terminate; the caller removes the container.
    async fn run_container(
        &self,
        name: &str,
        body: ContainerCreateBody,
        req: RunRequest,
        output: mpsc::Sender<OutputChunk>,
        cancel: CancellationToken,
        in_doubt: &mut bool,
    ) -> Result<RunOutcome, SandboxError> {
        let program = req.program()?.to_string();
        self.create(name, body, in_doubt).await?;

        let attach = self
            .docker
            .attach_container(
                name,
                Some(
                    AttachContainerOptionsBuilder::default()
                        .stdin(req.stdin.is_some())
                        .stdout(true)
                        .stderr(true)
                        .stream(true)
                        .build(),
                ),
            )
            .await
            .map_err(|e| {
                SandboxError::Setup(format!(
                    "attaching to container {name}: {}",
                    server_message(&e)
                ))
            })?;

        // Stops the output reader and the stdin writer: after the drain bound, or when this
        // future is dropped.
        let io_stop = CancellationToken::new();
        let _io_stop_on_drop = io_stop.clone().drop_guard();
        let max_chars = req.output_max_chars.min(self.cfg.output_max_chars);
        let reader = tokio::spawn(pump_output(
            attach.output,
            max_chars,
            output,
            io_stop.clone(),
        ));
        let mut input = Some(attach.input);

        let started_at_ms = now_ms();
        if let Err(e) = self.docker.start_container(name, None).await {
            return Err(start_error(&program, &e));
        }
        tracing::debug!(
            task_id = %req.task_id,
            attempt = req.attempt,
            container = %name,
            program = %program,
            "docker sandbox: container started"
        );

        let stdin_task = match (req.stdin, input.take()) {
            (Some(data), Some(pipe)) => Some(spawn_stdin_writer(pipe, data, io_stop.clone())),
            _ => None,
        };

        let wait = wait_exit(self.docker.clone(), name.to_string());
        tokio::pin!(wait);
        let (ending, exited) = Ending::race(wait.as_mut(), req.timeout, &cancel).await;
        let status = match exited {
            Some(status) => status,
            None => {
                tracing::debug!(
                    task_id = %req.task_id,
                    container = %name,
                    ending = ?ending,
                    "docker sandbox: stopping container"
                );
                self.terminate(name, wait.as_mut(), req.kill_grace).await
            }
        };

        // The exit code as the engine recorded it when the wait itself failed, and whether
        // the kernel OOM-killed something in the container.
        let mut state = None;
        if ending == Ending::Exited {
            state = self.inspect_state(name).await;
            if matches!(status, Ok(137)) && !state.as_ref().is_some_and(oom_killed) {
                // The OOM event and the exit event reach the engine separately; give the
                // first a moment if the exit looks like a SIGKILL nobody sent.
                tokio::time::sleep(Duration::from_millis(200)).await;
                state = self.inspect_state(name).await.or(state);
            }
        }
        let status = match status {
            Ok(code) => Ok(code),
            Err(err) => match state.as_ref().and_then(|s| s.exit_code) {
                Some(code) if state.as_ref().is_some_and(|s| s.running != Some(true)) => Ok(code),
                _ => Err(err),
            },
        };

        let (stdout, stderr) = drain_output(reader, &io_stop, name).await;
        if let Some(task) = stdin_task {
            task.abort();
        }

        if ending == Ending::Exited
            && let Ok(code @ (126 | 127)) = status
            && let Some(reason) = init_exec_failure(&stderr.text)
        {
            tracing::debug!(
                container = %name,
                code,
                "docker sandbox: program could not be executed"
            );
            return Err(SandboxError::SpawnFailed { program, reason });
        }

        let mut outcome = captured_outcome(stdout, stderr, started_at_ms, now_ms());
        match &status {
            Ok(code) => {
                let (exit_code, signal) = split_exit_status(*code);
                outcome.exit_code = exit_code;
                outcome.signal = signal;
            }
            Err(err) => {
                outcome.error_message = Some(format!("waiting for the container failed: {err}"));
            }
        }
        match ending {
            Ending::Exited => {
                // OOM wins even over exit 0 (a shell that survived its OOM-killed child), as in
                // the process and oci backends: the task did not get the memory it needed.
                if state.as_ref().is_some_and(oom_killed) {
                    outcome.status = ResultStatus::Failed;
                    let limit = memory_limit(req.limits.memory_bytes, self.cfg.memory_mb);
                    outcome.error_code = Some(ErrorCode::MemoryLimitExceeded);
                    outcome.error_message = Some(format!(
                        "killed: memory limit of {} exceeded",
                        format_bytes(limit.unsigned_abs())
                    ));
                } else if matches!(status, Ok(0)) {
                    outcome.status = ResultStatus::Succeeded;
                } else if status.is_ok() && looks_like_fork_failure(&outcome.stderr) {
                    outcome.error_code = Some(ErrorCode::PidsLimitExceeded);
                    outcome.error_message = Some(format!(
                        "fork failed: process limit of {} reached",
                        pids_limit(req.limits.pids, self.cfg.pids)
                    ));
                }
            }
            stopped => stopped.mark_stopped(&mut outcome, req.timeout, ""),
        }
        Ok(outcome)
    }

    /// SIGTERM to the container (tini forwards it to the task); waits up to `grace` for it
    /// to exit; SIGKILL. Returns the container's exit status.
    async fn terminate<F>(&self, name: &str, mut wait: Pin<&mut F>, grace: Duration) -> WaitResult
    where
        F: Future<Output = WaitResult>,
    {
        self.kill(name, "SIGTERM").await;
        if let Ok(status) = tokio::time::timeout(grace, wait.as_mut()).await {
            return status;
        }
        self.kill(name, "SIGKILL").await;
        match tokio::time::timeout(KILL_WAIT_TIMEOUT, wait).await {
            Ok(status) => status,
            Err(_) => Err(format!(
                "the container did not stop within {KILL_WAIT_TIMEOUT:?} of SIGKILL"
            )),
        }
    }

    /// Sends `signal` to the container, ignoring "not running" and "no such container".
    async fn kill(&self, name: &str, signal: &str) {
        let options = KillContainerOptionsBuilder::default()
            .signal(signal)
            .build();
        if let Err(e) = self.docker.kill_container(name, Some(options)).await {
            tracing::debug!(
                container = %name,
                signal,
                error = %server_message(&e),
                "docker sandbox: kill failed"
            );
        }
    }

    async fn inspect_state(&self, name: &str) -> Option<ContainerState> {
        match self.docker.inspect_container(name, None).await {
            Ok(info) => info.state,
            Err(e) => {
                tracing::debug!(
                    container = %name,
                    error = %server_message(&e),
                    "docker sandbox: inspect failed"
                );
                None
            }
        }
    }
}

impl Sandbox for DockerSandbox {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    /// Accepts every network mode: `none` is enforced by Docker's `none` network, `default`
    /// is [`DockerConfig::network_default`].
    fn check(&self, _spec: &SandboxSpec) -> Result<(), SandboxError> {
        Ok(())
    }

    fn default_timeout(&self) -> Option<Duration> {
        Some(DockerSandbox::default_timeout(self))
    }

    fn run<'a>(
        &'a self,
        req: RunRequest,
        output: mpsc::Sender<OutputChunk>,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, Result<RunOutcome, SandboxError>> {
        Box::pin(self.run_docker(req, output, cancel))
    }
}
