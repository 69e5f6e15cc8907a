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

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerCreateBody, ContainerState, HostConfig, HostConfigLogConfig, Mount, MountType,
    ResourcesUlimits,
};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, KillContainerOptionsBuilder,
    RemoveContainerOptionsBuilder,
};
use futures_util::StreamExt;
use paddock_proto::{ErrorCode, NetworkMode, ResultStatus, SandboxSpec, Stream, now_ms};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::output::{Capture, Captured};
use super::policy::{
    CLONE_NAMESPACE_FLAGS, DENIED_SYSCALLS, RLIMIT_NOFILE, SANDBOX_GID, SANDBOX_HOSTNAME,
    SANDBOX_UID, WORK_DIR,
};
use super::{BoxFuture, OutputChunk, RunOutcome, RunRequest, Sandbox, SandboxError};

/// How long [`DockerSandbox::connect`] waits for dockerd to answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the attach stream is still read after the container exited.
const OUTPUT_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// How long to wait for the container to stop after SIGKILL before giving up on it (it is
/// force-removed either way).
const KILL_WAIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Oldest engine API this backend works with: Docker 20.10 (seccomp `errnoRet`).
const MIN_API_VERSION: (usize, usize) = (1, 41);

/// When [`remove_eventually`] tries to remove a container whose creation is in doubt.
const REMOVAL_RETRY_DELAYS: &[Duration] = &[
    Duration::ZERO,
    Duration::from_secs(1),
    Duration::from_secs(5),
    Duration::from_secs(30),
];

/// Docker's smallest memory limit (6 MiB).
const MIN_MEMORY_BYTES: u64 = 6 * 1024 * 1024;

/// Docker's smallest CPU quota (0.01 CPU), in thousandths of a CPU.
const MIN_CPU_MILLIS: u64 = 10;

/// One MiB.
const MIB: u64 = 1024 * 1024;

/// Options of `/tmp` inside the container.
const TMP_TMPFS_OPTIONS: &str = "rw,nosuid,nodev,size=64m,mode=1777";

/// `EPERM`, returned by the denied system calls.
const EPERM: u32 = 1;

/// `ENOSYS`, returned by `clone3`.
const ENOSYS: u32 = 38;

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

    /// The container definition for `req`.
    fn container_body(&self, req: &RunRequest, workdir: &Path) -> ContainerCreateBody {
        let memory = memory_limit(req.limits.memory_bytes, self.cfg.memory_mb);
        let host_config = HostConfig {
            memory: Some(memory),
            memory_swap: Some(memory),
            nano_cpus: Some(nano_cpus(
                req.limits.cpu_millis,
                self.cfg.cpus,
                self.host_cpus,
            )),
            pids_limit: Some(pids_limit(req.limits.pids, self.cfg.pids)),
            ulimits: Some(vec![ResourcesUlimits {
                name: Some("nofile".into()),
                soft: Some(i64::try_from(RLIMIT_NOFILE).unwrap_or(i64::MAX)),
                hard: Some(i64::try_from(RLIMIT_NOFILE).unwrap_or(i64::MAX)),
            }]),
            init: Some(true),
            readonly_rootfs: Some(true),
            mounts: Some(vec![Mount {
                target: Some(WORK_DIR.into()),
                source: Some(workdir.display().to_string()),
                typ: Some(MountType::BIND),
                read_only: Some(false),
                ..Default::default()
            }]),
            tmpfs: Some(HashMap::from([(
                "/tmp".to_string(),
                TMP_TMPFS_OPTIONS.to_string(),
            )])),
            network_mode: Some(match req.network {
                NetworkMode::None => "none".into(),
                NetworkMode::Default => self.cfg.network_default.clone(),
            }),
            cap_drop: Some(vec!["ALL".into()]),
            security_opt: Some(vec![
                "no-new-privileges".into(),
                format!("seccomp={}", self.seccomp),
            ]),
            log_config: Some(HostConfigLogConfig {
                typ: Some("none".into()),
                config: None,
            }),
            auto_remove: Some(false),
            ..Default::default()
        };
        ContainerCreateBody {
            image: Some(self.cfg.image.clone()),
            entrypoint: Some(Vec::new()),
            cmd: Some(req.argv.clone()),
            env: Some(req.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            working_dir: Some(WORK_DIR.into()),
            user: Some(format!("{SANDBOX_UID}:{SANDBOX_GID}")),
            hostname: Some(SANDBOX_HOSTNAME.into()),
            attach_stdin: Some(req.stdin.is_some()),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            open_stdin: Some(req.stdin.is_some()),
            stdin_once: Some(req.stdin.is_some()),
            tty: Some(false),
            labels: Some(HashMap::from([
                ("paddock.task-id".to_string(), req.task_id.clone()),
                ("paddock.attempt".to_string(), req.attempt.to_string()),
            ])),
            host_config: Some(host_config),
            ..Default::default()
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
        if req.argv.is_empty() {
            return Err(SandboxError::Invalid("argv is empty".into()));
        }
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
        let program = req.argv.first().cloned().unwrap_or_default();
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
            (Some(data), Some(mut pipe)) => {
                let stop = io_stop.clone();
                Some(tokio::spawn(async move {
                    tokio::select! {
                        () = stop.cancelled() => {}
                        // Errors (the task exited without reading) are not the task's
                        // failure; closing stdin is all that matters.
                        _ = async {
                            pipe.write_all(data.as_bytes()).await?;
                            pipe.shutdown().await
                        } => {}
                    }
                }))
            }
            _ => None,
        };

        let wait = wait_exit(self.docker.clone(), name.to_string());
        tokio::pin!(wait);
        let mut exited = None;
        let ending = tokio::select! {
            status = &mut wait => {
                exited = Some(status);
                Ending::Exited
            }
            () = tokio::time::sleep(req.timeout) => Ending::TimedOut,
            () = cancel.cancelled() => Ending::Canceled,
        };
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

        let mut outcome = RunOutcome {
            status: ResultStatus::Failed,
            exit_code: None,
            signal: None,
            error_code: None,
            error_message: None,
            stdout: stdout.text,
            stderr: stderr.text,
            stdout_truncated: stdout.truncated,
            stderr_truncated: stderr.truncated,
            started_at_ms,
            finished_at_ms: now_ms(),
        };
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
                        format_bytes(limit)
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
            Ending::TimedOut => {
                outcome.status = ResultStatus::TimedOut;
                outcome.error_code = Some(ErrorCode::TaskTimeout);
                outcome.error_message = Some(format!(
                    "killed after timeout of {}",
                    format_duration(req.timeout)
                ));
            }
            Ending::Canceled => {
                outcome.status = ResultStatus::Canceled;
                outcome.error_code = Some(ErrorCode::TaskCanceled);
                outcome.error_message = Some("canceled".into());
            }
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

/// How the wait for the container ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Exited,
    TimedOut,
    Canceled,
}

/// The container's exit status, or why it is unknown.
type WaitResult = Result<i64, String>;

/// Force-removes the container when dropped while armed, so that dropping the run future
/// mid-way leaves nothing behind.
struct ContainerGuard {
    docker: Docker,
    name: String,
    armed: bool,
}

impl Drop for ContainerGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let docker = self.docker.clone();
        let name = std::mem::take(&mut self.name);
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                // The future may have been dropped while the create request was in
                // flight.
                handle.spawn(remove_eventually(docker, name));
            }
            Err(_) => {
                tracing::warn!(
                    container = %name,
                    "docker sandbox: no runtime to remove the container"
                );
            }
        }
    }
}

/// The container name of an attempt: `paddock-<task>-<attempt>`, with every character
/// Docker does not allow in a name (`[a-zA-Z0-9_.-]`) replaced by `_`.
pub fn container_name(task_id: &str, attempt: u32) -> String {
    let task: String = task_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("paddock-{task}-{attempt}")
}

/// The seccomp profile (Docker's JSON format) implementing the shared policy: default
/// allow; [`DENIED_SYSCALLS`] fail with `EPERM`; `clone3` fails with `ENOSYS`; `clone`
/// with any of [`CLONE_NAMESPACE_FLAGS`] (first argument, masked compare) fails with
/// `EPERM`. Architectures: the native one and its compat ABIs, as in Docker's own profile,
/// so 32-bit system calls are filtered the same way.
pub fn seccomp_profile() -> serde_json::Value {
    let mut syscalls = vec![
        serde_json::json!({
            "names": DENIED_SYSCALLS,
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": EPERM,
        }),
        serde_json::json!({
            "names": ["clone3"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": ENOSYS,
        }),
    ];
    for flag in CLONE_NAMESPACE_FLAGS {
        syscalls.push(serde_json::json!({
            "names": ["clone"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": EPERM,
            "args": [{
                "index": 0,
                "value": flag,
                "valueTwo": flag,
                "op": "SCMP_CMP_MASKED_EQ",
            }],
        }));
    }
    let architectures: &[&str] = if cfg!(target_arch = "x86_64") {
        &["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    } else if cfg!(target_arch = "aarch64") {
        &["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]
    } else {
        &[]
    };
    let mut profile = serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": syscalls,
    });
    if !architectures.is_empty() {
        profile["architectures"] = serde_json::json!(architectures);
    }
    profile
}

/// Memory limit in bytes: the smaller of the task's limit and the backend's cap (0: none),
/// at least Docker's minimum.
fn memory_limit(task_bytes: u64, cfg_mb: u64) -> i64 {
    let mut bytes = task_bytes;
    if cfg_mb > 0 {
        bytes = bytes.min(cfg_mb.saturating_mul(MIB));
    }
    i64::try_from(bytes.max(MIN_MEMORY_BYTES)).unwrap_or(i64::MAX)
}

/// CPU quota in billionths of a CPU: the smallest of the task's limit, the backend's cap
/// (0: none) and the engine host's CPUs (Docker refuses more), at least Docker's minimum.
fn nano_cpus(task_millis: u32, cfg_cpus: f64, host_cpus: Option<u64>) -> i64 {
    let mut millis = u64::from(task_millis);
    if cfg_cpus.is_finite() && cfg_cpus > 0.0 {
        // Saturating float-to-int conversion.
        millis = millis.min((cfg_cpus * 1000.0).round() as u64);
    }
    if let Some(cpus) = host_cpus {
        millis = millis.min(cpus.saturating_mul(1000));
    }
    i64::try_from(millis.max(MIN_CPU_MILLIS).saturating_mul(1_000_000)).unwrap_or(i64::MAX)
}

/// Process limit: the smaller of the task's limit and the backend's cap (0: none), at
/// least 1.
fn pids_limit(task_pids: u32, cfg_pids: u32) -> i64 {
    let mut pids = task_pids;
    if cfg_pids > 0 {
        pids = pids.min(cfg_pids);
    }
    i64::from(pids.max(1))
}

/// Splits a container exit status into (exit code, signal): 129..=192 is death by signal
/// status-128 (tini's and the shells' convention).
fn split_exit_status(status: i64) -> (Option<i32>, Option<i32>) {
    if (129..=192).contains(&status) {
        (None, i32::try_from(status - 128).ok())
    } else {
        (i32::try_from(status).ok(), None)
    }
}

/// The pids-limit heuristic: what shells and C libraries print when `fork` fails with
/// `EAGAIN` (Docker does not report pids-limit hits).
fn looks_like_fork_failure(stderr: &str) -> bool {
    let text = stderr.to_ascii_lowercase();
    text.contains("can't fork")
        || text.contains("cannot fork")
        || (text.contains("fork") && text.contains("resource temporarily unavailable"))
}

fn oom_killed(state: &ContainerState) -> bool {
    state.oom_killed == Some(true)
}

/// tini's message when it cannot execute the program (`[FATAL tini (7)] exec x failed:
/// No such file or directory`), without its prefix.
fn init_exec_failure(stderr: &str) -> Option<String> {
    stderr.lines().find_map(|line| {
        let rest = line.strip_prefix("[FATAL tini")?;
        let (_, message) = rest.split_once("] ")?;
        (message.starts_with("exec ") && message.contains(" failed"))
            .then(|| message.trim().to_string())
    })
}

/// A start failure: a program the runtime cannot execute is a spawn failure, anything else
/// a set-up failure.
fn start_error(program: &str, err: &DockerError) -> SandboxError {
    let message = server_message(err);
    let lower = message.to_ascii_lowercase();
    if lower.contains("executable file not found")
        || (lower.contains("exec") && lower.contains("no such file or directory"))
        || (lower.contains("exec") && lower.contains("permission denied"))
    {
        SandboxError::SpawnFailed {
            program: program.to_string(),
            reason: message,
        }
    } else {
        SandboxError::Setup(format!("starting container: {message}"))
    }
}

/// The HTTP status of an engine error response.
fn status_of(err: &DockerError) -> Option<u16> {
    match err {
        DockerError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// The engine's message for an error response, else the error's text.
fn server_message(err: &DockerError) -> String {
    match err {
        DockerError::DockerResponseServerError { message, .. } => message.trim().to_string(),
        other => other.to_string(),
    }
}

/// Hands the work directory to the sandbox user (falling back to mode 0777 when the agent
/// may not chown) and returns its absolute path.
fn prepare_workdir(dir: &Path) -> Result<PathBuf, SandboxError> {
    let dir = std::fs::canonicalize(dir)
        .map_err(|e| SandboxError::Setup(format!("work directory {}: {e}", dir.display())))?;
    match std::os::unix::fs::chown(&dir, Some(SANDBOX_UID), Some(SANDBOX_GID)) {
        Ok(()) => Ok(dir),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            use std::os::unix::fs::PermissionsExt;
            tracing::debug!(
                dir = %dir.display(),
                "docker sandbox: cannot chown the work directory; making it mode 0777"
            );
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).map_err(
                |e| SandboxError::Setup(format!("work directory {}: {e}", dir.display())),
            )?;
            Ok(dir)
        }
        Err(e) => Err(SandboxError::Setup(format!(
            "cannot hand the work directory {} to uid {SANDBOX_UID}: {e}",
            dir.display()
        ))),
    }
}

/// Waits for the container to stop and returns its exit status.
async fn wait_exit(docker: Docker, name: String) -> WaitResult {
    let mut stream = docker.wait_container(&name, None);
    match stream.next().await {
        Some(Ok(response)) => Ok(response.status_code),
        // bollard turns a non-zero status into this error.
        Some(Err(DockerError::DockerContainerWaitError { code, .. })) => Ok(code),
        Some(Err(e)) => Err(server_message(&e)),
        None => Err("the engine ended the wait without a status".into()),
    }
}

/// What a removal found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Removal {
    Removed,
    NotFound,
    Failed,
}

/// Force-removes a container (with its anonymous volumes); "no such container" is not an
/// error.
async fn remove_container(docker: &Docker, name: &str) -> Removal {
    let options = RemoveContainerOptionsBuilder::default()
        .force(true)
        .v(true)
        .build();
    match docker.remove_container(name, Some(options)).await {
        Ok(()) => Removal::Removed,
        Err(e) if status_of(&e) == Some(404) => Removal::NotFound,
        Err(e) => {
            tracing::warn!(
                container = %name,
                error = %server_message(&e),
                "docker sandbox: could not remove container"
            );
            Removal::Failed
        }
    }
}

/// Removes a container that may not exist *yet*: when the create request was abandoned
/// (client-side timeout, dropped future) the engine may still complete it. Tries now, then
/// again after 1, 5 and 30 seconds until something was removed.
async fn remove_eventually(docker: Docker, name: String) {
    for delay in REMOVAL_RETRY_DELAYS {
        tokio::time::sleep(*delay).await;
        if remove_container(&docker, &name).await == Removal::Removed {
            return;
        }
    }
}

/// The attach stream of the container.
type LogStream = Pin<Box<dyn futures_util::Stream<Item = Result<LogOutput, DockerError>> + Send>>;

/// Reads the attach stream to its end (or until `stop`), demultiplexing it into the two
/// captures and forwarding kept text to `tx`.
async fn pump_output(
    mut stream: LogStream,
    max_chars: usize,
    tx: mpsc::Sender<OutputChunk>,
    stop: CancellationToken,
) -> (Captured, Captured) {
    let mut stdout = Capture::new(max_chars);
    let mut stderr = Capture::new(max_chars);
    let mut tx = Some(tx);
    loop {
        let item = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            item = stream.next() => item,
        };
        let (which, capture, bytes) = match item {
            None => break,
            Some(Ok(LogOutput::StdOut { message } | LogOutput::Console { message })) => {
                (Stream::Stdout, &mut stdout, message)
            }
            Some(Ok(LogOutput::StdErr { message })) => (Stream::Stderr, &mut stderr, message),
            Some(Ok(LogOutput::StdIn { .. })) => continue,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "docker sandbox: attach stream failed");
                break;
            }
        };
        if let Some(data) = capture.push(&bytes) {
            forward(&mut tx, which, data, &stop).await;
        }
    }
    if let Some(data) = stdout.finish() {
        forward(&mut tx, Stream::Stdout, data, &stop).await;
    }
    if let Some(data) = stderr.finish() {
        forward(&mut tx, Stream::Stderr, data, &stop).await;
    }
    (stdout.into_captured(), stderr.into_captured())
}

/// Sends one chunk; forgets the sender when the receiver is gone or `stop` fired.
async fn forward(
    tx: &mut Option<mpsc::Sender<OutputChunk>>,
    stream: Stream,
    data: String,
    stop: &CancellationToken,
) {
    let Some(sender) = tx.as_ref() else {
        return;
    };
    let chunk = OutputChunk { stream, data };
    let sent = tokio::select! {
        biased;
        sent = sender.send(chunk) => sent.is_ok(),
        () = stop.cancelled() => false,
    };
    if !sent {
        *tx = None;
    }
}

/// Waits for the output reader, at most [`OUTPUT_DRAIN_TIMEOUT`]; then stops it and takes
/// what it read.
async fn drain_output(
    mut reader: JoinHandle<(Captured, Captured)>,
    io_stop: &CancellationToken,
    name: &str,
) -> (Captured, Captured) {
    match tokio::time::timeout(OUTPUT_DRAIN_TIMEOUT, &mut reader).await {
        Ok(joined) => joined.unwrap_or_default(),
        Err(_) => {
            tracing::warn!(
                container = %name,
                "docker sandbox: attach stream still open after the container stopped; giving up on it"
            );
            io_stop.cancel();
            reader.await.unwrap_or_default()
        }
    }
}

/// `2s`, `1500ms`.
fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// `64 MiB`, or bytes when not a whole number of MiB.
fn format_bytes(bytes: i64) -> String {
    if bytes % 1_048_576 == 0 {
        format!("{} MiB", bytes / 1_048_576)
    } else {
        format!("{bytes} bytes")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Instant;

    use bollard::query_parameters::{CreateImageOptionsBuilder, ListContainersOptionsBuilder};

    use super::*;
    use crate::sandbox::Limits;

    /// The image the tests run in: busybox from the host's `busybox-static`, imported.
    const TEST_IMAGE: &str = "paddock/busybox:test";
    const PATH: &str = "/usr/local/bin:/usr/bin:/bin";
    /// What Docker sets when neither the task nor the image sets `PATH`.
    const DOCKER_DEFAULT_PATH: &str =
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

    /// Serializes building the test image between the tests of this process.
    static IMAGE_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    fn in_ci() -> bool {
        std::env::var("CI").is_ok_and(|v| v == "true")
    }

    /// Skips (prints why), except under `CI=true` where the docker tests must run.
    fn skip(reason: &str) {
        assert!(
            !in_ci(),
            "docker tests cannot run under CI=true: {reason} (start dockerd first)"
        );
        eprintln!("skipping docker test: {reason}");
    }

    /// Imports `paddock/busybox:test` from `/usr/bin/busybox` when the engine lacks it.
    async fn ensure_test_image(docker: &Docker) -> Result<(), String> {
        let _lock = IMAGE_LOCK.lock().await;
        if docker.inspect_image(TEST_IMAGE).await.is_ok() {
            return Ok(());
        }
        let Some(busybox) = ["/usr/bin/busybox", "/bin/busybox"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.exists())
        else {
            return Err(format!(
                "image {TEST_IMAGE} is missing and /usr/bin/busybox (busybox-static) is not installed"
            ));
        };
        let root = tempfile::tempdir().map_err(|e| e.to_string())?;
        let bin = root.path().join("bin");
        std::fs::create_dir(&bin).map_err(|e| e.to_string())?;
        std::fs::copy(busybox, bin.join("busybox")).map_err(|e| e.to_string())?;
        let list = std::process::Command::new(busybox)
            .arg("--list")
            .output()
            .map_err(|e| e.to_string())?;
        for applet in String::from_utf8_lossy(&list.stdout).lines() {
            let applet = applet.trim();
            if !applet.is_empty() && applet != "busybox" {
                std::os::unix::fs::symlink("busybox", bin.join(applet))
                    .map_err(|e| e.to_string())?;
            }
        }
        let tar = std::process::Command::new("tar")
            .arg("-C")
            .arg(root.path())
            .args(["-c", "."])
            .output()
            .map_err(|e| format!("tar: {e}"))?;
        if !tar.status.success() {
            return Err(format!(
                "tar failed: {}",
                String::from_utf8_lossy(&tar.stderr)
            ));
        }
        let (repo, tag) = TEST_IMAGE.split_once(':').unwrap();
        let options = CreateImageOptionsBuilder::default()
            .from_src("-")
            .repo(repo)
            .tag(tag)
            .build();
        let mut progress = std::pin::pin!(docker.create_image(
            Some(options),
            Some(bollard::body_full(tar.stdout.into())),
            None
        ));
        while let Some(item) = progress.next().await {
            item.map_err(|e| format!("importing {TEST_IMAGE}: {e}"))?;
        }
        docker
            .inspect_image(TEST_IMAGE)
            .await
            .map(|_| ())
            .map_err(|e| format!("{TEST_IMAGE} still missing after import: {e}"))
    }

    /// A backend on the test image, or `None` (test skipped) without a usable engine.
    async fn sandbox_with(adjust: impl FnOnce(&mut DockerConfig)) -> Option<DockerSandbox> {
        let mut cfg = DockerConfig {
            image: TEST_IMAGE.into(),
            ..DockerConfig::default()
        };
        adjust(&mut cfg);
        let sandbox = match DockerSandbox::connect(cfg).await {
            Ok(s) => s,
            Err(e) => {
                skip(&e);
                return None;
            }
        };
        if let Err(e) = ensure_test_image(&sandbox.docker).await {
            skip(&e);
            return None;
        }
        Some(sandbox)
    }

    async fn sandbox() -> Option<DockerSandbox> {
        sandbox_with(|_| {}).await
    }

    macro_rules! sandbox_or_skip {
        ($e:expr) => {
            match $e.await {
                Some(s) => s,
                None => return,
            }
        };
    }

    /// Task ids unique to this process, so concurrent runs on one engine do not collide.
    fn task_id(name: &str) -> String {
        format!("dkt{}-{name}", std::process::id())
    }

    fn request(name: &str, dir: &tempfile::TempDir, argv: &[&str]) -> RunRequest {
        RunRequest {
            task_id: task_id(name),
            attempt: 1,
            argv: argv.iter().map(|s| (*s).to_string()).collect(),
            env: BTreeMap::from([("PATH".to_string(), PATH.to_string())]),
            stdin: None,
            workdir: dir.path().to_path_buf(),
            timeout: Duration::from_secs(30),
            kill_grace: Duration::from_secs(1),
            network: NetworkMode::None,
            output_max_chars: 100_000,
            limits: Limits::default(),
            rootfs: None,
        }
    }

    async fn run_collect(
        sandbox: &DockerSandbox,
        req: RunRequest,
        cancel: CancellationToken,
    ) -> (Result<RunOutcome, SandboxError>, Vec<OutputChunk>) {
        let (tx, mut rx) = mpsc::channel(64);
        let collector = tokio::spawn(async move {
            let mut chunks = Vec::new();
            while let Some(chunk) = rx.recv().await {
                chunks.push(chunk);
            }
            chunks
        });
        let result = sandbox.run(req, tx, cancel).await;
        let chunks = collector.await.unwrap();
        (result, chunks)
    }

    /// Runs `req`, checks that its container is gone, returns the outcome.
    async fn run(sandbox: &DockerSandbox, req: RunRequest) -> RunOutcome {
        let task = req.task_id.clone();
        let out = run_collect(sandbox, req, CancellationToken::new())
            .await
            .0
            .unwrap();
        assert_no_containers(sandbox, &task).await;
        out
    }

    /// Names of the containers (any state) of `task`.
    async fn containers_of(sandbox: &DockerSandbox, task: &str) -> Vec<String> {
        let prefix = format!("paddock-{task}");
        let filters = HashMap::from([("name", vec![prefix.as_str()])]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let list = sandbox.docker.list_containers(Some(options)).await.unwrap();
        list.into_iter()
            .flat_map(|c| c.names.unwrap_or_default())
            .filter(|n| n.trim_start_matches('/').starts_with(&prefix))
            .collect()
    }

    async fn assert_no_containers(sandbox: &DockerSandbox, task: &str) {
        let left = containers_of(sandbox, task).await;
        assert!(left.is_empty(), "containers left behind: {left:?}");
    }

    fn sorted_lines(text: &str) -> Vec<String> {
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        lines.sort_unstable();
        lines
    }

    // ---- without an engine ----

    #[test]
    fn config_defaults_are_the_seed_profile() {
        let cfg = DockerConfig::default();
        assert_eq!(cfg.image, "node:24-alpine");
        assert_eq!(cfg.network_default, "none");
        assert_eq!(cfg.timeout_ms, 30_000);
        assert_eq!(cfg.memory_mb, 256);
        assert!((cfg.cpus - 1.0).abs() < f64::EPSILON);
        assert_eq!(cfg.pids, 256);
        assert_eq!(cfg.output_max_chars, 65_536);
    }

    #[test]
    fn container_names_are_valid() {
        assert_eq!(container_name("t-1", 2), "paddock-t-1-2");
        assert_eq!(container_name("a/b c:ü", 1), "paddock-a_b_c__-1");
        assert_eq!(
            container_name("0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b", 3),
            "paddock-0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b-3"
        );
    }

    #[test]
    fn limits_are_the_smaller_of_task_and_backend() {
        assert_eq!(memory_limit(512 * MIB, 256), 256 * MIB as i64);
        assert_eq!(memory_limit(64 * MIB, 256), 64 * MIB as i64);
        assert_eq!(memory_limit(64 * MIB, 0), 64 * MIB as i64);
        assert_eq!(memory_limit(1, 256), MIN_MEMORY_BYTES as i64);
        assert_eq!(nano_cpus(1000, 1.0, Some(2)), 1_000_000_000);
        assert_eq!(nano_cpus(500, 1.0, Some(2)), 500_000_000);
        assert_eq!(nano_cpus(4000, 8.0, Some(2)), 2_000_000_000);
        assert_eq!(nano_cpus(4000, 0.0, None), 4_000_000_000);
        assert_eq!(nano_cpus(1, 1.0, None), 10_000_000);
        assert_eq!(nano_cpus(1000, f64::NAN, None), 1_000_000_000);
        assert_eq!(pids_limit(256, 32), 32);
        assert_eq!(pids_limit(32, 256), 32);
        assert_eq!(pids_limit(32, 0), 32);
    }

    #[test]
    fn exit_status_mapping() {
        assert_eq!(split_exit_status(0), (Some(0), None));
        assert_eq!(split_exit_status(7), (Some(7), None));
        assert_eq!(split_exit_status(128), (Some(128), None));
        assert_eq!(split_exit_status(137), (None, Some(9)));
        assert_eq!(split_exit_status(143), (None, Some(15)));
        assert_eq!(split_exit_status(255), (Some(255), None));
    }

    #[test]
    fn fork_failure_heuristic() {
        assert!(looks_like_fork_failure(
            "sh: can't fork: Resource temporarily unavailable\n"
        ));
        assert!(looks_like_fork_failure(
            "bash: fork: retry: Resource temporarily unavailable\n"
        ));
        assert!(looks_like_fork_failure("dash: 1: Cannot fork\n"));
        assert!(!looks_like_fork_failure(
            "Resource temporarily unavailable\n"
        ));
        assert!(!looks_like_fork_failure("error: forked repository\n"));
    }

    #[test]
    fn tini_exec_failures_are_recognised() {
        assert_eq!(
            init_exec_failure("[FATAL tini (7)] exec nope failed: No such file or directory\n")
                .as_deref(),
            Some("exec nope failed: No such file or directory")
        );
        assert_eq!(init_exec_failure("exec nope failed\n"), None);
        assert_eq!(init_exec_failure("[WARN  tini (7)] something\n"), None);
    }

    #[test]
    fn seccomp_profile_implements_the_policy() {
        let p = seccomp_profile();
        assert_eq!(p["defaultAction"], "SCMP_ACT_ALLOW");
        let rules = p["syscalls"].as_array().unwrap();
        let denied: Vec<&str> = rules[0]["names"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap())
            .collect();
        assert_eq!(denied, DENIED_SYSCALLS);
        assert_eq!(rules[0]["action"], "SCMP_ACT_ERRNO");
        assert_eq!(rules[0]["errnoRet"], 1);
        assert_eq!(rules[1]["names"], serde_json::json!(["clone3"]));
        assert_eq!(rules[1]["errnoRet"], 38);
        let clone_rules: Vec<&serde_json::Value> = rules[2..].iter().collect();
        assert_eq!(clone_rules.len(), CLONE_NAMESPACE_FLAGS.len());
        for (rule, flag) in clone_rules.iter().zip(CLONE_NAMESPACE_FLAGS) {
            assert_eq!(rule["names"], serde_json::json!(["clone"]));
            assert_eq!(rule["errnoRet"], 1);
            let arg = &rule["args"][0];
            assert_eq!(arg["index"], 0);
            assert_eq!(arg["value"], *flag);
            assert_eq!(arg["valueTwo"], *flag);
            assert_eq!(arg["op"], "SCMP_CMP_MASKED_EQ");
        }
    }

    #[test]
    fn durations_and_sizes_are_formatted() {
        assert_eq!(format_duration(Duration::from_secs(2)), "2s");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_bytes(64 * 1_048_576), "64 MiB");
        assert_eq!(format_bytes(1000), "1000 bytes");
    }

    // ---- against the local engine ----

    #[tokio::test]
    async fn captures_stdout_stderr_and_exit_code() {
        let sb = sandbox_or_skip!(sandbox());
        assert_eq!(sb.name(), "docker");
        let dir = tempfile::tempdir().unwrap();
        let req = request(
            "echo",
            &dir,
            &["/bin/sh", "-c", "echo out; echo err >&2; echo ünï; exit 3"],
        );
        let task = req.task_id.clone();
        let (result, chunks) = run_collect(&sb, req, CancellationToken::new()).await;
        let out = result.unwrap();
        assert_eq!(out.status, ResultStatus::Failed);
        assert_eq!(out.exit_code, Some(3));
        assert_eq!(out.signal, None);
        assert_eq!(out.error_code, None);
        assert_eq!(out.stdout, "out\nünï\n");
        assert_eq!(out.stderr, "err\n");
        assert!(!out.stdout_truncated && !out.stderr_truncated);
        assert!(out.started_at_ms > 0 && out.finished_at_ms >= out.started_at_ms);
        let live = |s: Stream| -> String {
            chunks
                .iter()
                .filter(|c| c.stream == s)
                .map(|c| c.data.as_str())
                .collect()
        };
        assert_eq!(live(Stream::Stdout), out.stdout);
        assert_eq!(live(Stream::Stderr), out.stderr);
        assert_no_containers(&sb, &task).await;

        let out = run(&sb, request("echo-ok", &dir, &["echo", "hello"])).await;
        assert_eq!(out.status, ResultStatus::Succeeded);
        assert_eq!(out.exit_code, Some(0));
        assert_eq!(out.stdout, "hello\n");
    }

    #[tokio::test]
    async fn death_by_signal_is_reported() {
        let sb = sandbox_or_skip!(sandbox());
        let dir = tempfile::tempdir().unwrap();
        let out = run(&sb, request("sig", &dir, &["/bin/sh", "-c", "kill -9 $$"])).await;
        assert_eq!(out.status, ResultStatus::Failed);
        assert_eq!(out.exit_code, None);
        assert_eq!(out.signal, Some(9));
        assert_eq!(out.error_code, None);
    }

    /// The container sees exactly the given variables, plus what the engine adds:
    /// `HOSTNAME` always, `HOME=/` when not given (runc, user without passwd entry), and
    /// Docker's default `PATH` when not given (the test image sets no `Env`).
    #[tokio::test]
    async fn environment_is_the_given_one_plus_what_docker_adds() {
        let sb = sandbox_or_skip!(sandbox());
        let dir = tempfile::tempdir().unwrap();
        let mut req = request("env", &dir, &["env"]);
        req.env.insert("FOO".into(), "bar baz=qux".into());
        req.env.insert("LANG".into(), "C.UTF-8".into());
        let out = run(&sb, req).await;
        assert_eq!(out.status, ResultStatus::Succeeded);
        assert_eq!(
            sorted_lines(&out.stdout),
            vec![
                "FOO=bar baz=qux".to_string(),
                "HOME=/".to_string(),
                format!("HOSTNAME={SANDBOX_HOSTNAME}"),
                "LANG=C.UTF-8".to_string(),
                format!("PATH={PATH}"),
            ]
        );

        // Without PATH: Docker's default; a given HOME is kept.
        let mut req = request("env2", &dir, &["/bin/env"]);
        req.env = BTreeMap::from([("HOME".to_string(), "/work".to_string())]);
        let out = run(&sb, req).await;
        assert_eq!(out.status, ResultStatus::Succeeded);
        assert_eq!(
            sorted_lines(&out.stdout),
            vec![
                "HOME=/work".to_string(),
                format!("HOSTNAME={SANDBOX_HOSTNAME}"),
                format!("PATH={DOCKER_DEFAULT_PATH}"),
            ]
        );
    }

    #[tokio::test]
    async fn runs_as_nobody_in_work_with_the_sandbox_hostname() {
        let sb = sandbox_or_skip!(sandbox());
        let dir = tempfile::tempdir().unwrap();
        let out = run(
            &sb,
            request(
                "ident",
                &dir,
                &["/bin/sh", "-c", "id -u; id -g; pwd; hostname"],
            ),
        )
        .await;
        assert_eq!(out.status, ResultStatus::Succeeded, "{}", out.stderr);
        assert_eq!(
            out.stdout,
            format!("65534\n65534\n/work\n{SANDBOX_HOSTNAME}\n")
        );
    }

    #[tokio::test]
    async fn only_work_and_tmp_are_writable() {
        let sb = sandbox_or_skip!(sandbox());
        let dir = tempfile::tempdir().unwrap();
        let script = "echo data > /work/f && echo work-ok; \
                      echo x > /tmp/t && cat /tmp/t && echo tmp-ok; \
                      if echo x > /etc/x; then echo etc-writable; else echo etc-ro; fi; \
                      if touch /x; then echo root-writable; else echo root-ro; fi";
        let out = run(&sb, request("fs", &dir, &["/bin/sh", "-c", script])).await;
        assert_eq!(out.status, ResultStatus::Succeeded, "{}", out.stderr);
        assert_eq!(out.stdout, "work-ok\nx\ntmp-ok\netc-ro\nroot-ro\n");
        assert!(
            out.stderr.contains("Read-only file system"),
            "{}",
            out.stderr
        );
        // The file is on the host, owned by the sandbox user.
        let path = dir.path().join("f");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "data\n");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&path).unwrap().uid(), SANDBOX_UID);
    }

    #[tokio::test]
    async fn stdin_is_delivered_then_closed() {
        let sb = sandbox_or_skip!(sandbox());
        let dir = tempfile::tempdir().unwrap();
        let mut req = request("stdin", &dir, &["cat"]);
        req.stdin = Some("hello\nwörld".into());
        let out = run(&sb, req).await;
        assert_eq!(out.status, ResultStatus::Succeeded);
        assert_eq!(out.stdout, "hello\nwörld");

        // Without stdin, the process reads EOF at once.
        let out = run(&sb, request("stdin2", &dir, &["cat"])).await;
        assert_eq!(out.status, ResultStatus::Succeeded);
        assert_eq!(out.stdout, "");
    }

    #[tokio::test]
    async fn network_none_has_only_loopback() {
        let sb = sandbox_or_skip!(sandbox_with(|c| c.network_default = "bridge".into()));
        assert!(
            sb.check(&SandboxSpec {
                network_mode: Some(NetworkMode::None),
                ..Default::default()
            })
            .is_ok()
        );
        let dir = tempfile::tempdir().unwrap();
        let devices = |stdout: &str| -> Vec<String> {
            let mut names: Vec<String> = stdout
                .lines()
                .skip(2)
                .filter_map(|l| l.split(':').next())
                .map(|n| n.trim().to_string())
                .collect();
            names.sort_unstable();
            names
        };
        let out = run(&sb, request("net", &dir, &["cat", "/proc/net/dev"])).await;
        assert_eq!(out.status, ResultStatus::Succeeded);
        assert_eq!(devices(&out.stdout), vec!["lo".to_string()]);

        // networkMode default: the configured network (here bridge) is attached.
        let mut req = request("net2", &dir, &["cat", "/proc/net/dev"]);
        req.network = NetworkMode::Default;
        let out = run(&sb, req).await;
        assert_eq!(out.status, ResultStatus::Succeeded);
        assert_eq!(
            devices(&out.stdout),
            vec!["eth0".to_string(), "lo".to_string()]
        );
    }

    #[tokio::test]
    async fn memory_limit_kill_is_reported() {
        let sb = sandbox_or_skip!(sandbox());
        let dir = tempfile::tempdir().unwrap();
        let mut req = request(
            "oom",
            &dir,
            &["dd", "if=/dev/zero", "of=/dev/null", "bs=300M", "count=1"],
        );
        req.limits.memory_bytes = 64 * MIB;
        let out = run(&sb, req).await;
        assert_eq!(out.status, ResultStatus::Failed);
        assert_eq!(out.error_code, Some(ErrorCode::MemoryLimitExceeded));
        assert_eq!(out.signal, Some(9));
        assert_eq!(
            out.error_message.as_deref(),
            Some("killed: memory limit of 64 MiB exceeded")
        );
    }

    #[tokio::test]
    async fn pids_limit_is_reported() {
        let sb = sandbox_or_skip!(sandbox());
        let dir = tempfile::tempdir().unwrap();
        let mut req = request(
            "pids",
            &dir,
            &[
                "/bin/sh",
                "-c",
                "i=0; while [ $i -lt 100 ]; do sleep 30 & i=$((i+1)); done; wait",
            ],
        );
        req.limits.pids = 32;
        let start = Instant::now();
        let out = run(&sb, req).await;
        assert!(start.elapsed() < Duration::from_secs(20));
        assert_eq!(out.status, ResultStatus::Failed);
        assert_eq!(
            out.error_code,
            Some(ErrorCode::PidsLimitExceeded),
            "{out:?}"
        );
        assert!(out.stderr.contains("fork"), "{}", out.stderr);
    }

    #[tokio::test]
    async fn timeout_stops_the_container() {
        let sb = sandbox_or_skip!(sandbox());
        let dir = tempfile::tempdir().unwrap();
        let mut req = request("timeout", &dir, &["sleep", "100"]);
        req.timeout = Duration::from_secs(1);
        req.kill_grace = Duration::from_secs(5);
        let start = Instant::now();
        let out = run(&sb, req).await;
        let elapsed = start.elapsed();
        // SIGTERM ends `sleep` at once: the grace is not used.
        assert!(elapsed >= Duration::from_secs(1));
        assert!(elapsed < Duration::from_secs(4), "took {elapsed:?}");
        assert_eq!(out.status, ResultStatus::TimedOut);
        assert_eq!(out.error_code, Some(ErrorCode::TaskTimeout));
        assert_eq!(
            out.error_message.as_deref(),
            Some("killed after timeout of 1s")
        );
        assert_eq!(out.signal, Some(15));
    }

    #[tokio::test]
    async fn process_ignoring_sigterm_is_killed_after_the_grace() {
        let sb = sandbox_or_skip!(sandbox());
        let dir = tempfile::tempdir().unwrap();
        let mut req = request(
            "noterm",
            &dir,
            &[
                "/bin/sh",
                "-c",
                "trap '' TERM; echo ready; sleep 100; echo survived",
            ],
        );
        req.timeout = Duration::from_millis(800);
        req.kill_grace = Duration::from_millis(1000);
        let start = Instant::now();
        let out = run(&sb, req).await;
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(1800),
            "grace not honoured: {elapsed:?}"
        );
        assert!(elapsed < Duration::from_secs(6), "took {elapsed:?}");
        assert_eq!(out.status, ResultStatus::TimedOut);
        assert_eq!(out.signal, Some(9));
        assert_eq!(out.stdout, "ready\n");
        assert_eq!(
            out.error_message.as_deref(),
            Some("killed after timeout of 800ms")
        );
    }

    /// bollard bounds each request by a client timeout (2 min by default) until the
    /// response headers arrive; the engine sends the headers of `wait` at once, so a task
    /// may run longer than that timeout.
    #[tokio::test]
    async fn task_may_outlive_the_client_request_timeout() {
        let mut sb = sandbox_or_skip!(sandbox());
        // Long enough for the set-up requests, even on a loaded machine.
        sb.docker = sb.docker.clone().with_timeout(Duration::from_secs(4));
        let dir = tempfile::tempdir().unwrap();
        let req = request("long", &dir, &["/bin/sh", "-c", "sleep 7; echo done"]);
        let out = run(&sb, req).await;
        assert_eq!(out.status, ResultStatus::Succeeded, "{out:?}");
        assert_eq!(out.stdout, "done\n");
    }

    #[tokio::test]
    async fn cancel_stops_the_container() {
        let sb = sandbox_or_skip!(sandbox());
        let dir = tempfile::tempdir().unwrap();
        let cancel = CancellationToken::new();
        let trigger = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1000)).await;
            trigger.cancel();
        });
        let req = request("cancel", &dir, &["sleep", "100"]);
        let task = req.task_id.clone();
        let start = Instant::now();
        let (result, _) = run_collect(&sb, req, cancel).await;
        let out = result.unwrap();
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(out.status, ResultStatus::Canceled);
        assert_eq!(out.error_code, Some(ErrorCode::TaskCanceled));
        assert_no_containers(&sb, &task).await;
    }

    #[tokio::test]
    async fn output_flood_is_capped_and_completes() {
        let sb = sandbox_or_skip!(sandbox());
        let dir = tempfile::tempdir().unwrap();
        let mut req = request("flood", &dir, &["/bin/sh", "-c", "yes | head -c 50000000"]);
        req.output_max_chars = 1_000_000;
        req.timeout = Duration::from_secs(120);
        let cap = sb.config().output_max_chars;
        let task = req.task_id.clone();
        let start = Instant::now();
        let (result, chunks) = run_collect(&sb, req, CancellationToken::new()).await;
        let out = result.unwrap();
        eprintln!("50 MB flood took {:?}", start.elapsed());
        assert_eq!(out.status, ResultStatus::Succeeded);
        // The backend's cap (65536) is below the request's.
        assert_eq!(out.stdout.len(), cap);
        assert_eq!(out.stdout, "y\n".repeat(cap / 2));
        assert!(out.stdout_truncated);
        assert!(!out.stderr_truncated);
        let live: usize = chunks.iter().map(|c| c.data.len()).sum();
        assert_eq!(live, cap);
        assert_no_containers(&sb, &task).await;
    }

    #[tokio::test]
    async fn seccomp_refuses_namespaces() {
        let sb = sandbox_or_skip!(sandbox());
        let dir = tempfile::tempdir().unwrap();
        // A network namespace needs CAP_SYS_ADMIN too; a user namespace needs no
        // capability, only seccomp stops it (`docker run --security-opt
        // seccomp=unconfined ... unshare -U true` succeeds).
        for (name, flag) in [("seccomp-n", "-n"), ("seccomp-u", "-U")] {
            let out = run(&sb, request(name, &dir, &["unshare", flag, "true"])).await;
            assert_eq!(out.status, ResultStatus::Failed, "unshare {flag}");
            assert_eq!(out.exit_code, Some(1), "unshare {flag}");
            assert!(
                out.stderr.contains("Operation not permitted"),
                "unshare {flag}: {}",
                out.stderr
            );
        }

        // Threads and fork still work (clone without namespace flags, clone3 -> ENOSYS).
        let out = run(
            &sb,
            request(
                "seccomp2",
                &dir,
                &["/bin/sh", "-c", "(echo sub) & wait; echo done"],
            ),
        )
        .await;
        assert_eq!(out.status, ResultStatus::Succeeded, "{}", out.stderr);
        assert_eq!(out.stdout, "sub\ndone\n");
    }

    #[tokio::test]
    async fn missing_program_is_a_spawn_failure() {
        let sb = sandbox_or_skip!(sandbox());
        let dir = tempfile::tempdir().unwrap();
        let req = request(
            "noprog",
            &dir,
            &["/nonexistent/paddock-no-such-program", "x"],
        );
        let task = req.task_id.clone();
        let (result, _) = run_collect(&sb, req, CancellationToken::new()).await;
        let err = result.unwrap_err();
        assert_eq!(err.code(), ErrorCode::SpawnFailed);
        match err {
            SandboxError::SpawnFailed { program, reason } => {
                assert_eq!(program, "/nonexistent/paddock-no-such-program");
                assert!(reason.contains("No such file or directory"), "{reason}");
            }
            other => panic!("expected SpawnFailed, got {other:?}"),
        }
        assert_no_containers(&sb, &task).await;
    }

    #[tokio::test]
    async fn empty_argv_is_invalid() {
        let sb = sandbox_or_skip!(sandbox());
        let dir = tempfile::tempdir().unwrap();
        let (result, _) =
            run_collect(&sb, request("empty", &dir, &[]), CancellationToken::new()).await;
        assert!(matches!(result, Err(SandboxError::Invalid(_))));
    }

    #[tokio::test]
    async fn missing_image_is_a_setup_error() {
        let sb = sandbox_or_skip!(sandbox_with(
            |c| c.image = "paddock/no-such-image:none".into()
        ));
        assert!(!sb.image_present());
        let dir = tempfile::tempdir().unwrap();
        let req = request("noimage", &dir, &["true"]);
        let task = req.task_id.clone();
        let (result, _) = run_collect(&sb, req, CancellationToken::new()).await;
        let err = result.unwrap_err();
        assert_eq!(err.code(), ErrorCode::SandboxSetupFailed);
        assert_eq!(
            err.to_string(),
            "sandbox set-up failed: image paddock/no-such-image:none not found locally; \
             docker pull/import it"
        );
        assert_no_containers(&sb, &task).await;
    }

    #[tokio::test]
    async fn leftover_container_of_the_same_name_is_replaced() {
        let sb = sandbox_or_skip!(sandbox());
        let dir = tempfile::tempdir().unwrap();
        let req = request("stale", &dir, &["echo", "fresh"]);
        let stale = ContainerCreateBody {
            image: Some(TEST_IMAGE.into()),
            cmd: Some(vec!["true".into()]),
            ..Default::default()
        };
        sb.docker
            .create_container(
                Some(
                    CreateContainerOptionsBuilder::default()
                        .name(&container_name(&req.task_id, req.attempt))
                        .build(),
                ),
                stale,
            )
            .await
            .unwrap();
        let out = run(&sb, req).await;
        assert_eq!(out.status, ResultStatus::Succeeded);
        assert_eq!(out.stdout, "fresh\n");
    }

    #[tokio::test]
    async fn dropping_the_run_removes_the_container() {
        let sb = sandbox_or_skip!(sandbox());
        let dir = tempfile::tempdir().unwrap();
        let req = request("drop", &dir, &["sleep", "100"]);
        let task = req.task_id.clone();
        let (tx, _rx) = mpsc::channel(64);
        let run = sb.run(req, tx, CancellationToken::new());
        assert!(
            tokio::time::timeout(Duration::from_secs(2), run)
                .await
                .is_err(),
            "the run should still be going"
        );
        assert_eq!(
            containers_of(&sb, &task).await.len(),
            1,
            "container was running"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !containers_of(&sb, &task).await.is_empty() {
            assert!(
                Instant::now() < deadline,
                "container not removed after drop"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Cold start of `/bin/true` through the backend next to `docker run --rm`: median of
    /// 20. Run by hand: `cargo test -p paddock-agent --lib docker::tests::cold_start --
    /// --ignored --nocapture`.
    #[tokio::test]
    #[ignore = "timing report, run by hand"]
    async fn cold_start_timing() {
        let sb = sandbox_or_skip!(sandbox());
        let dir = tempfile::tempdir().unwrap();
        let median = |mut v: Vec<Duration>| {
            v.sort_unstable();
            (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2
        };
        let mut backend = Vec::new();
        for i in 0..20 {
            let req = request(&format!("cold{i}"), &dir, &["/bin/true"]);
            let start = Instant::now();
            let out = run_collect(&sb, req, CancellationToken::new())
                .await
                .0
                .unwrap();
            backend.push(start.elapsed());
            assert_eq!(out.status, ResultStatus::Succeeded);
        }
        let mut cli = Vec::new();
        for _ in 0..20 {
            let start = Instant::now();
            let status = tokio::process::Command::new("docker")
                .args(["run", "--rm", "--network", "none", TEST_IMAGE, "true"])
                .status()
                .await
                .unwrap();
            cli.push(start.elapsed());
            assert!(status.success());
        }
        eprintln!(
            "cold start /bin/true, median of 20: docker backend {:?}, docker run --rm {:?}",
            median(backend),
            median(cli)
        );
    }
}
