//! The `oci` backend: runs each attempt as an OCI container through `crun` or `runc`.
//!
//! For every attempt a bundle is written under `<state_dir>/bundles/<task>-<attempt>/`: a
//! `config.json` built from [`policy`] (read-only root, fresh `/proc`, `/dev`, `/tmp`, the work
//! directory at `/work`, user `nobody`, no capabilities, `no_new_privs`, the seccomp deny
//! list, pid/ipc/uts/mount namespaces and a network namespace for `networkMode: "none"`) and
//! the request's limits as cgroup resources. Then `<runtime> run` runs it in the
//! foreground; its standard output and error are the task's.
//!
//! - **Root.** Without `rootfs` the root is an empty, read-only directory in the bundle with
//!   the [`policy::root_entries`] of the host bound read-only (non-recursively) and the host's
//!   top-level symlinks (`/bin -> usr/bin`) recreated. A `rootfs` directory is used as is
//!   (read-only); a `.tar`/`.tar.gz`/`.tgz` is extracted once into
//!   `<state_dir>/rootfs/<name>-<key>/`, where the key is derived from the tarball's
//!   canonical path, size, mtime, inode and device (not from its content: that needs a
//!   SHA-256 implementation, which is not a dependency of this crate).
//! - **Setup failures.** The runtime is started with `--log <bundle>/runtime.log
//!   --log-format json`, where it records its own errors (runc also repeats them on
//!   stderr). Both runtimes exit with the container process's status, so a non-zero exit
//!   alone cannot tell a runtime failure from the task's: a run whose runtime exits
//!   non-zero *and* logged an entry of level `error` is a set-up failure
//!   ([`SandboxError::SpawnFailed`] when the error is about executing the program, e.g. it
//!   does not exist; [`SandboxError::Setup`] otherwise, e.g. a mount that fails); a non-zero
//!   exit without a logged error is the task's own.
//! - **Exit status.** The runtime's status is the container process's, `128 + n` when it was
//!   killed by signal `n`; so 129..=192 is reported as that signal (a task that itself
//!   exits with such a code is reported the same way).
//! - **Environment.** Exactly the request's, except that both runtimes add `HOME` (the
//!   user's home in the root's `/etc/passwd`, `/nonexistent` for `nobody`) when it is
//!   missing.
//! - **Timeout and cancellation.** `<runtime> kill --all <id> SIGTERM`, up to `kill_grace`,
//!   then `SIGKILL`; as a last resort the runtime's own process group is killed. Note that
//!   the task is PID 1 of its namespace: the kernel drops signals it has no handler for, so
//!   a plain `sleep` ignores SIGTERM and dies only of the SIGKILL after the grace.
//! - **Memory and process limits.** After the runtime exits, and before the container is
//!   deleted, the container's cgroup counters are read: `oom_kill` (v1
//!   `memory.oom_control`, v2 `memory.events`) and `max` of `pids.events`. `runc run --keep`
//!   keeps the container (and its cgroup) until `delete`. crun 1.8 has no `--keep` and
//!   removes its cgroup (recursively, also at `poststop` time) as soon as the container
//!   exits, so with such a crun on cgroup v1 the backend owns the cgroup instead: it creates
//!   `paddock-<task>-<attempt>` under its own cgroup of the memory, pids, cpu and devices
//!   controllers, writes the limits (and runc's default device allow-list) itself, and
//!   starts crun with
//!   `--cgroup-manager=disabled` from inside it (a `/bin/sh` wrapper joins the cgroup, then
//!   execs crun). crun itself is then in that cgroup too: the pids limit gets one more
//!   process for it, and its own memory (about 0.4 MiB) counts against the limit. A runtime
//!   without `--keep` on cgroup v2 (or one that is not crun) runs with its own cgroup
//!   manager and the two limit codes are not reported.
//! - **Cleanup.** `<runtime> delete -f <id>`, the owned cgroup (if any) and the bundle are
//!   removed after every run, after set-up failures, and (from a thread) when the run
//!   future is dropped. The work directory belongs to the runner and is left alone (it is
//!   only chowned to the sandbox user before the start).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use oci_spec::OciSpecError;
use oci_spec::runtime::{
    Arch, Capabilities, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder,
    LinuxDeviceCgroupBuilder, LinuxMemoryBuilder, LinuxNamespace, LinuxNamespaceBuilder,
    LinuxNamespaceType, LinuxPidsBuilder, LinuxResourcesBuilder, LinuxSeccomp, LinuxSeccompAction,
    LinuxSeccompArgBuilder, LinuxSeccompBuilder, LinuxSeccompOperator, LinuxSyscall,
    LinuxSyscallBuilder, Mount, MountBuilder, PosixRlimit, PosixRlimitBuilder, PosixRlimitType,
    ProcessBuilder, RootBuilder, Spec, SpecBuilder, UserBuilder,
};
use paddock_proto::{ErrorCode, NetworkMode, ResultStatus, SandboxSpec, Stream, now_ms};
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::output::{Captured, capture_stream_until};
use super::policy::{self, RootEntry};
use super::supervise::format_duration;
use super::{BoxFuture, Limits, OutputChunk, RunOutcome, RunRequest, Sandbox, SandboxError};

/// How long the output pipes are still read after the runtime exited.
const PIPE_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Bound on one `kill`/`delete`/`list` invocation of the runtime.
const RUNTIME_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the runtime may take to exit after the container got SIGKILL, before its own
/// process group is killed.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// How long removing an owned cgroup is retried (its last processes may still be exiting).
const CGROUP_REMOVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Directories searched for the runtime after `PATH` (runc lives in `/usr/sbin` on Debian).
const SEARCH_DIRS: &[&str] = &[
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

/// `PATH` of the runtime process (its environment is not the task's).
const RUNTIME_PATH_ENV: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Mount points created in a root this backend builds (host view, extracted tarballs).
const MOUNT_POINTS: &[&str] = &["proc", "dev", "tmp", "work"];

/// CFS period for the CPU quota, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;

/// Where crun needs the hugetlb controller mounted on hybrid cgroup hosts.
const HUGETLB_V1_MOUNT: &str = "/sys/fs/cgroup/hugetlb";

/// `EPERM`, for denied system calls.
const ERRNO_EPERM: u32 = 1;
/// `ENOSYS`, for `clone3` (so C libraries fall back to `clone`, whose flags can be checked).
const ERRNO_ENOSYS: u32 = 38;

/// Masked paths of `runc spec`.
const MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/proc/scsi",
];

/// Read-only paths of `runc spec`.
const READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Joins the cgroups given as `cgroup.procs` files, then execs the rest of the arguments.
/// `$1` is the runtime log (a failure is logged there as a runtime error), `$2` the number
/// of files that follow.
const JOIN_CGROUPS_SCRIPT: &str = r#"log=$1; n=$2; shift 2
while [ "$n" -gt 0 ]; do
  if ! echo 0 > "$1"; then
    printf '{"level":"error","msg":"cannot join the cgroup %s"}\n' "$1" >> "$log"
    exit 125
  fi
  shift; n=$((n - 1))
done
exec "$@"
"#;

/// The v1 controllers of the cgroups this backend creates itself (crun without `--keep`).
const OWNED_CONTROLLERS: &[&str] = &["memory", "pids", "cpu", "devices"];

/// Device rules of an owned cgroup, after denying everything: the default allow-list of
/// runc (and crun), which the runtimes apply themselves when they manage the cgroup.
const DEVICE_ALLOW: &[&str] = &[
    "c *:* m",
    "b *:* m",
    "c 1:3 rwm",   // null
    "c 1:5 rwm",   // zero
    "c 1:7 rwm",   // full
    "c 1:8 rwm",   // random
    "c 1:9 rwm",   // urandom
    "c 5:0 rwm",   // tty
    "c 5:2 rwm",   // ptmx
    "c 136:* rwm", // pts
];

/// Serialises the check-then-mount of the hugetlb hierarchy within this process.
static HUGETLB_LOCK: Mutex<()> = Mutex::new(());

/// Configuration of the `oci` backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciConfig {
    /// `PADDOCK_AGENT_OCI_RUNTIME`: a path, or a name looked up in `PATH` (`crun`, `runc`).
    /// `None`: `crun` if found, else `runc`.
    pub runtime: Option<PathBuf>,
    /// Bundles, extracted root file systems and the runtime's `--root` live here (for
    /// example `<workdir_root>/.oci`).
    pub state_dir: PathBuf,
}

/// Which runtime this is (they differ in small ways).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RuntimeKind {
    Crun,
    Runc,
    Other,
}

/// The `oci` sandbox backend.
#[derive(Debug, Clone)]
pub struct OciSandbox {
    runtime: PathBuf,
    runtime_name: String,
    runtime_version: String,
    kind: RuntimeKind,
    /// `run --keep` is supported.
    keep: bool,
    state_dir: PathBuf,
    cgroups: CgroupLayout,
}

impl OciSandbox {
    /// Backend name.
    pub const NAME: &'static str = "oci";

    /// Finds and checks the runtime (`<runtime> --version` must succeed) and prepares the
    /// state directory. For crun on a cgroup v1 host whose hugetlb controller is not mounted
    /// as v1, mounts it at `/sys/fs/cgroup/hugetlb` (crun 1.8 refuses to start otherwise).
    ///
    /// # Errors
    /// Why the backend cannot be used here.
    pub fn detect(cfg: OciConfig) -> Result<OciSandbox, String> {
        let runtime = resolve_runtime(cfg.runtime.as_deref())?;
        let version = std::process::Command::new(&runtime)
            .arg("--version")
            .env_clear()
            .env("PATH", RUNTIME_PATH_ENV)
            .stdin(Stdio::null())
            .output()
            .map_err(|err| format!("cannot run {} --version: {err}", runtime.display()))?;
        if !version.status.success() {
            return Err(format!(
                "{} --version failed ({}): {}",
                runtime.display(),
                version.status,
                String::from_utf8_lossy(&version.stderr).trim()
            ));
        }
        let version = String::from_utf8_lossy(&version.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_string();
        let kind = if version.starts_with("crun") {
            RuntimeKind::Crun
        } else if version.starts_with("runc") {
            RuntimeKind::Runc
        } else {
            RuntimeKind::Other
        };
        let runtime_name = match kind {
            RuntimeKind::Crun => "crun".to_string(),
            RuntimeKind::Runc => "runc".to_string(),
            RuntimeKind::Other => runtime.file_name().map_or_else(
                || "oci-runtime".into(),
                |n| n.to_string_lossy().into_owned(),
            ),
        };
        let help = std::process::Command::new(&runtime)
            .args(["run", "--help"])
            .env_clear()
            .env("PATH", RUNTIME_PATH_ENV)
            .stdin(Stdio::null())
            .output()
            .map_err(|err| format!("cannot run {} run --help: {err}", runtime.display()))?;
        let keep = String::from_utf8_lossy(&help.stdout).contains("--keep")
            || String::from_utf8_lossy(&help.stderr).contains("--keep");

        if kind == RuntimeKind::Crun {
            ensure_hugetlb_v1()?;
        }
        let cgroups = CgroupLayout::detect();

        let state_dir = std::path::absolute(&cfg.state_dir)
            .map_err(|err| format!("state directory {}: {err}", cfg.state_dir.display()))?;
        for dir in [
            state_dir.clone(),
            state_dir.join("state"),
            state_dir.join("bundles"),
            state_dir.join("rootfs"),
        ] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
        }
        let sandbox = OciSandbox {
            runtime,
            runtime_name,
            runtime_version: version,
            kind,
            keep,
            state_dir,
            cgroups,
        };
        sandbox.sweep();
        if !sandbox.keep && !sandbox.owns_cgroups() {
            tracing::warn!(
                runtime = %sandbox.runtime.display(),
                "this OCI runtime has no `run --keep` and the cgroups are not v1: \
                 MEMORY_LIMIT_EXCEEDED and PIDS_LIMIT_EXCEEDED cannot be reported"
            );
        }
        tracing::info!(
            runtime = %sandbox.runtime.display(),
            version = %sandbox.runtime_version,
            keep = sandbox.keep,
            owned_cgroups = sandbox.owns_cgroups(),
            cgroups = sandbox.cgroups.describe(),
            "oci sandbox ready"
        );
        Ok(sandbox)
    }

    /// Removes what an earlier agent (one that crashed) left in the state directory:
    /// containers still known to the runtime (killed: `delete -f`), their owned cgroups,
    /// bundles and interrupted tarball extractions.
    fn sweep(&self) {
        let owned = self.owns_cgroups();
        let global = self.global_args(owned);
        if let Ok(entries) = fs::read_dir(self.state_root()) {
            for entry in entries.flatten() {
                let id = entry.file_name().to_string_lossy().into_owned();
                if !id.starts_with("paddock-") {
                    continue;
                }
                tracing::warn!(container = %id, "oci sandbox: removing a container left by an earlier run");
                runtime_command_blocking(&self.runtime, &global, &["delete", "-f", &id]);
                if let Some(cgroups) = self.owned_cgroups(&id) {
                    cgroups.remove();
                }
            }
        }
        for dir in [
            self.state_dir.join("bundles"),
            self.state_dir.join("rootfs"),
        ] {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let stale = dir.ends_with("bundles")
                    || entry.file_name().to_string_lossy().starts_with(".extract-");
                if stale {
                    let _ = fs::remove_dir_all(entry.path());
                }
            }
        }
    }

    /// `crun`, `runc`, or the file name of another runtime.
    pub fn runtime_name(&self) -> &str {
        &self.runtime_name
    }

    /// Path of the runtime binary.
    pub fn runtime_path(&self) -> &Path {
        &self.runtime
    }

    /// First line of `<runtime> --version`.
    pub fn runtime_version(&self) -> &str {
        &self.runtime_version
    }

    /// The runtime's `--root` (container state).
    fn state_root(&self) -> PathBuf {
        self.state_dir.join("state")
    }

    /// Whether this backend creates the containers' cgroups itself (crun without
    /// `run --keep` on cgroup v1; see the module documentation).
    fn owns_cgroups(&self) -> bool {
        self.kind == RuntimeKind::Crun
            && !self.keep
            && self.cgroups.v1("memory").is_some()
            && self.cgroups.v1("pids").is_some()
    }

    /// The cgroups this backend creates for container `id`, if it owns them.
    fn owned_cgroups(&self, id: &str) -> Option<OwnedCgroups> {
        if !self.owns_cgroups() {
            return None;
        }
        let dirs = OWNED_CONTROLLERS
            .iter()
            .filter_map(|name| {
                self.cgroups
                    .v1(name)
                    .map(|c| ((*name).to_string(), c.own.join(id)))
            })
            .collect();
        Some(OwnedCgroups {
            dirs,
            memsw: self.cgroups.memsw,
        })
    }

    /// Global options of every runtime invocation.
    fn global_args(&self, owned: bool) -> Vec<OsString> {
        let mut args = vec![OsString::from("--root"), self.state_root().into_os_string()];
        if owned {
            args.push("--cgroup-manager=disabled".into());
        }
        args
    }

    async fn run_oci(
        &self,
        req: RunRequest,
        output: mpsc::Sender<OutputChunk>,
        cancel: CancellationToken,
    ) -> Result<RunOutcome, SandboxError> {
        let Some(program) = req.argv.first().cloned() else {
            return Err(SandboxError::Invalid("argv is empty".into()));
        };
        let name = sanitize_name(&format!("{}-{}", req.task_id, req.attempt));
        let id = format!("paddock-{name}");
        let bundle = self.state_dir.join("bundles").join(&name);
        let log = bundle.join("runtime.log");
        let owned = self.owned_cgroups(&id);
        let global = self.global_args(owned.is_some());
        let mut cleanup = CleanupGuard {
            job: Some(Cleanup {
                runtime: self.runtime.clone(),
                global: global.clone(),
                state_root: self.state_root(),
                id: id.clone(),
                bundle: bundle.clone(),
                owned: owned.clone(),
            }),
        };

        // Bundle, root and cgroups (blocking file system work).
        let prepare = Prepare {
            runtime: self.runtime.clone(),
            global: global.clone(),
            state_root: self.state_root(),
            rootfs_cache: self.state_dir.join("rootfs"),
            id: id.clone(),
            bundle: bundle.clone(),
            argv: req.argv.clone(),
            env: req.env.clone(),
            workdir: req.workdir.clone(),
            rootfs: req.rootfs.clone(),
            network: req.network,
            limits: req.limits,
            swap: self.cgroups.swap_limit_supported(),
            owned: owned.clone(),
        };
        let prepared = tokio::task::spawn_blocking(move || prepare.run())
            .await
            .unwrap_or_else(|err| Err(format!("preparing the bundle panicked: {err}")));
        if let Err(err) = prepared {
            cleanup.finish().await;
            return Err(SandboxError::Setup(err));
        }
        if cancel.is_cancelled() {
            // Canceled while the bundle was prepared (e.g. a large rootfs extracted).
            cleanup.finish().await;
            let now = now_ms();
            return Ok(RunOutcome {
                status: ResultStatus::Canceled,
                exit_code: None,
                signal: None,
                error_code: Some(ErrorCode::TaskCanceled),
                error_message: Some("canceled".into()),
                stdout: String::new(),
                stderr: String::new(),
                stdout_truncated: false,
                stderr_truncated: false,
                started_at_ms: now,
                finished_at_ms: now,
            });
        }

        let mut cmd = match &owned {
            Some(cgroups) => {
                let files = cgroups.procs_files();
                let mut cmd = Command::new("/bin/sh");
                cmd.arg("-c")
                    .arg(JOIN_CGROUPS_SCRIPT)
                    .arg("paddock-oci-join")
                    .arg(&log)
                    .arg(files.len().to_string())
                    .args(&files)
                    .arg(&self.runtime);
                cmd
            }
            None => Command::new(&self.runtime),
        };
        cmd.args(&global)
            .arg("--log")
            .arg(&log)
            .arg("--log-format")
            .arg("json")
            .arg("run")
            .arg("--bundle")
            .arg(&bundle);
        if self.keep {
            cmd.arg("--keep");
        }
        cmd.arg(&id)
            .env_clear()
            .env("PATH", RUNTIME_PATH_ENV)
            .stdin(if req.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);

        let started_at_ms = now_ms();
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(err) => {
                cleanup.finish().await;
                return Err(SandboxError::Setup(format!(
                    "could not start {}: {err}",
                    self.runtime.display()
                )));
            }
        };
        let Some(run_pid) = child.id().and_then(|pid| i32::try_from(pid).ok()) else {
            cleanup.finish().await;
            return Err(SandboxError::Setup(
                "the runtime process has no pid".to_string(),
            ));
        };
        let run_pid = Pid::from_raw(run_pid);
        tracing::debug!(
            task_id = %req.task_id,
            attempt = req.attempt,
            container = %id,
            runtime = %self.runtime_name,
            "oci sandbox: container starting"
        );

        // Stops the pipe readers and the stdin writer after the drain bound, or when this
        // future is dropped.
        let io_stop = CancellationToken::new();
        let _io_stop_on_drop = io_stop.clone().drop_guard();
        let stdin_task = match (child.stdin.take(), req.stdin.clone()) {
            (Some(mut pipe), Some(data)) => {
                let stop = io_stop.clone();
                Some(tokio::spawn(async move {
                    tokio::select! {
                        () = stop.cancelled() => {}
                        // EPIPE when the task does not read is not its failure.
                        _ = async {
                            pipe.write_all(data.as_bytes()).await?;
                            pipe.shutdown().await
                        } => {}
                    }
                }))
            }
            _ => None,
        };
        let stdout_task = child.stdout.take().map(|pipe| {
            tokio::spawn(capture_stream_until(
                pipe,
                Stream::Stdout,
                req.output_max_chars,
                output.clone(),
                io_stop.clone(),
            ))
        });
        let stderr_task = child.stderr.take().map(|pipe| {
            tokio::spawn(capture_stream_until(
                pipe,
                Stream::Stderr,
                req.output_max_chars,
                output.clone(),
                io_stop.clone(),
            ))
        });
        drop(output);

        let mut exited = None;
        let ending = tokio::select! {
            status = child.wait() => {
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
                    container = %id,
                    ending = ?ending,
                    "oci sandbox: terminating container"
                );
                let killer = Killer {
                    runtime: &self.runtime,
                    global: &global,
                    id: &id,
                    owned: owned.as_ref(),
                    run_pid,
                };
                killer.terminate(&mut child, req.kill_grace).await
            }
        };
        // Anything the runtime left in its own group (not the container: its pid namespace
        // died with its init).
        signal_group(run_pid, Signal::SIGKILL);

        let (stdout, stderr) = drain_pipes(stdout_task, stderr_task, &io_stop, &req.task_id).await;
        if let Some(task) = stdin_task {
            task.abort();
        }

        // Counters and runtime errors are read before the container and bundle go.
        let job = cleanup.take();
        let cgroup_dirs = match &owned {
            Some(cgroups) => (cgroups.dir("memory"), cgroups.dir("pids")),
            None => (None, None),
        };
        let cgroups = self.cgroups.clone();
        let read_id = id.clone();
        let log_path = log.clone();
        let post = tokio::task::spawn_blocking(move || {
            let (memory_dir, pids_dir) = match cgroup_dirs {
                (None, None) => (
                    cgroups.container_dir("memory", &read_id),
                    cgroups.container_dir("pids", &read_id),
                ),
                dirs => dirs,
            };
            let counters = Counters::read(memory_dir.as_deref(), pids_dir.as_deref(), &cgroups);
            let errors = runtime_errors(&log_path);
            if let Some(job) = job {
                job.run();
            }
            (counters, errors)
        })
        .await
        .unwrap_or_default();
        let (counters, runtime_errors) = post;

        let (exit_code, signal) = match &status {
            Ok(status) => exit_of(*status),
            Err(_) => (None, None),
        };
        if ending == Ending::Exited && exit_code != Some(0) && !runtime_errors.is_empty() {
            return Err(setup_error(&program, &runtime_errors));
        }

        let mut outcome = RunOutcome {
            status: ResultStatus::Failed,
            exit_code,
            signal,
            error_code: None,
            error_message: None,
            stdout: stdout.text,
            stderr: stderr.text,
            stdout_truncated: stdout.truncated,
            stderr_truncated: stderr.truncated,
            started_at_ms,
            finished_at_ms: now_ms(),
        };
        if let Err(err) = &status {
            outcome.error_message = Some(format!("waiting for the runtime failed: {err}"));
        }
        match ending {
            Ending::Exited => {
                if exit_code == Some(0) && signal.is_none() {
                    outcome.status = ResultStatus::Succeeded;
                }
                if counters.oom_kills > 0 {
                    outcome.status = ResultStatus::Failed;
                    outcome.error_code = Some(ErrorCode::MemoryLimitExceeded);
                    outcome.error_message = Some(format!(
                        "killed: over the {} memory limit",
                        format_bytes(req.limits.memory_bytes)
                    ));
                } else if counters.pids_max > 0 && outcome.status != ResultStatus::Succeeded {
                    outcome.error_code = Some(ErrorCode::PidsLimitExceeded);
                    outcome.error_message = Some(format!(
                        "could not start a process: the limit of {} processes was reached",
                        req.limits.pids
                    ));
                }
            }
            Ending::TimedOut => {
                outcome.status = ResultStatus::TimedOut;
                outcome.error_code = Some(ErrorCode::TaskTimeout);
                outcome.error_message = Some(format!(
                    "killed after timeout of {}{}",
                    format_duration(req.timeout),
                    limits_note(counters, req.limits)
                ));
            }
            Ending::Canceled => {
                outcome.status = ResultStatus::Canceled;
                outcome.error_code = Some(ErrorCode::TaskCanceled);
                outcome.error_message =
                    Some(format!("canceled{}", limits_note(counters, req.limits)));
            }
        }
        Ok(outcome)
    }
}

impl Sandbox for OciSandbox {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    /// Every network mode is enforced (`none`: a new, empty network namespace; `default`:
    /// the host's).
    fn check(&self, _spec: &SandboxSpec) -> Result<(), SandboxError> {
        Ok(())
    }

    fn run<'a>(
        &'a self,
        req: RunRequest,
        output: mpsc::Sender<OutputChunk>,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, Result<RunOutcome, SandboxError>> {
        Box::pin(self.run_oci(req, output, cancel))
    }
}

/// How the wait for the runtime ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Exited,
    TimedOut,
    Canceled,
}

/// For a timed-out or canceled run, which limit the task had hit before (the code stays
/// the timeout's or cancellation's).
fn limits_note(counters: Counters, limits: Limits) -> String {
    if counters.oom_kills > 0 {
        format!(
            " (a process had been killed over the {} memory limit)",
            format_bytes(limits.memory_bytes)
        )
    } else if counters.pids_max > 0 {
        format!(" (the limit of {} processes had been reached)", limits.pids)
    } else {
        String::new()
    }
}

/// Exit code and signal from the runtime's status (`128 + n` is signal `n`).
fn exit_of(status: ExitStatus) -> (Option<i32>, Option<i32>) {
    match status.code() {
        Some(code) if (129..=128 + 64).contains(&code) => (None, Some(code - 128)),
        Some(code) => (Some(code), None),
        None => (None, status.signal()),
    }
}

/// The error for a runtime that failed before the task ran.
fn setup_error(program: &str, errors: &[String]) -> SandboxError {
    let text = errors.join("; ");
    if text.contains(program) && text.contains("exec") {
        SandboxError::SpawnFailed {
            program: program.to_string(),
            reason: text,
        }
    } else {
        SandboxError::Setup(text)
    }
}

/// Messages of the error entries of a runtime's JSON log.
fn runtime_errors(log: &Path) -> Vec<String> {
    let Ok(text) = fs::read_to_string(log) else {
        return Vec::new();
    };
    parse_runtime_errors(&text)
}

fn parse_runtime_errors(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|entry| {
            matches!(
                entry.get("level").and_then(|l| l.as_str()),
                Some("error" | "fatal" | "panic")
            )
        })
        .map(|entry| {
            entry
                .get("msg")
                .and_then(|m| m.as_str())
                .unwrap_or("unknown runtime error")
                .to_string()
        })
        .collect()
}

/// `64 MiB`, `1536 KiB`, `1000 bytes`.
fn format_bytes(bytes: u64) -> String {
    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * 1024;
    if bytes >= MIB && bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else if bytes >= KIB && bytes.is_multiple_of(KIB) {
        format!("{} KiB", bytes / KIB)
    } else {
        format!("{bytes} bytes")
    }
}

/// `[A-Za-z0-9_.-]` only (others become `_`); long names are cut and suffixed with a hash
/// of the whole name so they stay unique.
fn sanitize_name(raw: &str) -> String {
    const MAX: usize = 96;
    let clean: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let clean = match clean.strip_prefix('.') {
        Some(rest) => format!("_{rest}"),
        None => clean,
    };
    if clean.len() <= MAX {
        clean
    } else {
        format!("{}-{:016x}", &clean[..MAX - 17], fnv1a(raw.as_bytes()))
    }
}

/// FNV-1a, 64 bits: a stable (across builds and versions) hash for names and cache keys.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

// ---------------------------------------------------------------------------------------
// Runtime discovery and the hugetlb fix.

fn resolve_runtime(runtime: Option<&Path>) -> Result<PathBuf, String> {
    match runtime {
        Some(path) if path.components().count() > 1 => {
            if path.is_file() {
                Ok(path.to_path_buf())
            } else {
                Err(format!("OCI runtime {} not found", path.display()))
            }
        }
        Some(name) => find_in_path(name)
            .ok_or_else(|| format!("OCI runtime {} not found in PATH", name.display())),
        None => find_in_path(Path::new("crun"))
            .or_else(|| find_in_path(Path::new("runc")))
            .ok_or_else(|| "no OCI runtime found: neither crun nor runc is in PATH".to_string()),
    }
}

/// An executable file named `name` in `PATH` or [`SEARCH_DIRS`].
fn find_in_path(name: &Path) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(SEARCH_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| {
            fs::metadata(candidate)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// crun 1.8 fails on hybrid hosts (controllers on v1, an empty cgroup2 at
/// `/sys/fs/cgroup/unified`) unless hugetlb, which the kernel leaves on the v2 hierarchy,
/// is mounted as a v1 hierarchy. Mounts it when cgroup v1 is in use and no v1 hierarchy
/// has it yet.
fn ensure_hugetlb_v1() -> Result<(), String> {
    let _lock = HUGETLB_LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let cgroups = fs::read_to_string("/proc/cgroups").unwrap_or_default();
    let hugetlb_enabled = cgroups.lines().any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        f.len() >= 4 && f[0] == "hugetlb" && f[3] == "1"
    });
    if !hugetlb_enabled {
        return Ok(());
    }
    let mounts = parse_mountinfo(&fs::read_to_string("/proc/self/mountinfo").unwrap_or_default());
    let v1_in_use = mounts
        .iter()
        .any(|m| m.fstype == "cgroup" && m.super_opts.split(',').any(|o| o == "memory"));
    if !v1_in_use {
        return Ok(());
    }
    let hugetlb_mounted = mounts.iter().any(|m| {
        (m.fstype == "cgroup" && m.super_opts.split(',').any(|o| o == "hugetlb"))
            || m.mount_point == Path::new(HUGETLB_V1_MOUNT)
    });
    if hugetlb_mounted {
        return Ok(());
    }
    fs::create_dir_all(HUGETLB_V1_MOUNT).map_err(|err| {
        format!(
            "crun needs the hugetlb cgroup v1 hierarchy: cannot create {HUGETLB_V1_MOUNT}: {err} \
             (run: mkdir -p {HUGETLB_V1_MOUNT} && mount -t cgroup -o hugetlb cgroup {HUGETLB_V1_MOUNT})"
        )
    })?;
    nix::mount::mount(
        Some("cgroup"),
        HUGETLB_V1_MOUNT,
        Some("cgroup"),
        nix::mount::MsFlags::MS_NOSUID
            | nix::mount::MsFlags::MS_NODEV
            | nix::mount::MsFlags::MS_NOEXEC,
        Some("hugetlb"),
    )
    .map_err(|err| {
        format!(
            "crun needs the hugetlb cgroup v1 hierarchy: mounting it at {HUGETLB_V1_MOUNT} \
             failed: {err} (run: mount -t cgroup -o hugetlb cgroup {HUGETLB_V1_MOUNT})"
        )
    })?;
    tracing::info!("mounted the hugetlb cgroup v1 hierarchy at {HUGETLB_V1_MOUNT} for crun");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Cgroups.

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MountInfo {
    root: String,
    mount_point: PathBuf,
    fstype: String,
    super_opts: String,
}

fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let mut right = right.split(' ');
            let fstype = right.next()?;
            let _source = right.next()?;
            let super_opts = right.next().unwrap_or_default();
            Some(MountInfo {
                root: unescape_mountinfo(left.get(3)?),
                mount_point: PathBuf::from(unescape_mountinfo(left.get(4)?)),
                fstype: fstype.to_string(),
                super_opts: super_opts.to_string(),
            })
        })
        .collect()
}

/// Undoes the octal escapes (`\040` for a space) of mountinfo fields.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value =
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A cgroup v1 controller: its hierarchy's mount point and this process's cgroup in it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct V1Controller {
    name: String,
    mount: PathBuf,
    own: PathBuf,
}

/// The cgroup v2 hierarchy and this process's cgroup in it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct V2Hierarchy {
    mount: PathBuf,
    own: PathBuf,
}

/// Where the cgroups of this host are (as seen at start).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct CgroupLayout {
    /// memory, pids, cpu and devices, where mounted as v1.
    v1: Vec<V1Controller>,
    /// The unified hierarchy, when it has the memory controller and v1 does not.
    v2: Option<V2Hierarchy>,
    /// v1 swap accounting (`memory.memsw.*`) exists.
    memsw: bool,
}

impl CgroupLayout {
    fn detect() -> CgroupLayout {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let mut layout = Self::parse(&mountinfo, &own);
        if let Some(memory) = layout.v1("memory") {
            layout.memsw = memory.mount.join("memory.memsw.limit_in_bytes").exists();
        }
        if let Some(v2) = &layout.v2 {
            let controllers =
                fs::read_to_string(v2.mount.join("cgroup.controllers")).unwrap_or_default();
            if layout.v1("memory").is_some()
                || !controllers.split_whitespace().any(|c| c == "memory")
            {
                layout.v2 = None;
            }
        }
        layout
    }

    /// The layout from the texts of `/proc/self/mountinfo` and `/proc/self/cgroup`.
    fn parse(mountinfo: &str, proc_cgroup: &str) -> CgroupLayout {
        let mounts = parse_mountinfo(mountinfo);
        let mut layout = CgroupLayout::default();
        for &name in OWNED_CONTROLLERS {
            let Some(mount) = mounts
                .iter()
                .find(|m| m.fstype == "cgroup" && m.super_opts.split(',').any(|o| o == name))
            else {
                continue;
            };
            let Some(path) = proc_cgroup.lines().find_map(|line| {
                let mut parts = line.splitn(3, ':');
                let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
                controllers
                    .split(',')
                    .any(|c| c == name)
                    .then(|| path.to_string())
            }) else {
                continue;
            };
            layout.v1.push(V1Controller {
                name: name.to_string(),
                mount: mount.mount_point.clone(),
                own: own_dir(&mount.mount_point, &mount.root, &path),
            });
        }
        if let Some(mount) = mounts.iter().find(|m| m.fstype == "cgroup2") {
            let path = proc_cgroup
                .lines()
                .find_map(|line| line.strip_prefix("0::").map(str::to_string))
                .unwrap_or_else(|| "/".to_string());
            layout.v2 = Some(V2Hierarchy {
                mount: mount.mount_point.clone(),
                own: own_dir(&mount.mount_point, &mount.root, &path),
            });
        }
        layout
    }

    fn v1(&self, name: &str) -> Option<&V1Controller> {
        self.v1.iter().find(|c| c.name == name)
    }

    /// Whether the OCI `swap` (memory + swap) limit can be applied.
    fn swap_limit_supported(&self) -> bool {
        if self.v1("memory").is_some() {
            self.memsw
        } else {
            self.v2.is_some()
        }
    }

    /// Whether the counters are read from cgroup v2 files.
    fn counters_v2(&self) -> bool {
        self.v1("memory").is_none() && self.v2.is_some()
    }

    /// The directory of a runtime-created container cgroup (`cgroupsPath` = `id`, relative):
    /// runc puts it under its own cgroup, crun under the hierarchy's root.
    fn container_dir(&self, controller: &str, id: &str) -> Option<PathBuf> {
        let candidates = match (self.v1(controller), &self.v2) {
            (Some(c), _) => [c.own.join(id), c.mount.join(id)],
            (None, Some(v2)) => [v2.own.join(id), v2.mount.join(id)],
            (None, None) => return None,
        };
        candidates.into_iter().find(|dir| dir.is_dir())
    }

    fn describe(&self) -> String {
        if self.v1("memory").is_some() {
            let names: Vec<&str> = self.v1.iter().map(|c| c.name.as_str()).collect();
            format!("v1 ({})", names.join(","))
        } else if let Some(v2) = &self.v2 {
            format!("v2 ({})", v2.mount.display())
        } else {
            "none".to_string()
        }
    }
}

/// `mount` + `path` relative to the mount's root.
fn own_dir(mount: &Path, root: &str, path: &str) -> PathBuf {
    let rel = if root != "/" {
        path.strip_prefix(root).unwrap_or(path)
    } else {
        path
    };
    mount.join(rel.trim_start_matches('/'))
}

/// Limit counters of a finished container.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counters {
    /// Processes killed by the OOM killer.
    oom_kills: u64,
    /// Forks refused by the pids limit.
    pids_max: u64,
}

impl Counters {
    fn read(memory_dir: Option<&Path>, pids_dir: Option<&Path>, layout: &CgroupLayout) -> Counters {
        let memory_file = if layout.counters_v2() {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        let field = |dir: Option<&Path>, file: &str, key: &str| -> u64 {
            dir.and_then(|d| fs::read_to_string(d.join(file)).ok())
                .and_then(|text| keyed_value(&text, key))
                .unwrap_or(0)
        };
        Counters {
            oom_kills: field(memory_dir, memory_file, "oom_kill"),
            pids_max: field(pids_dir, "pids.events", "max"),
        }
    }
}

/// The value of `key value` line `key` (`oom_kill 1`).
fn keyed_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// The cgroups this backend creates and removes itself (crun without `--keep`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct OwnedCgroups {
    /// Controller name and directory.
    dirs: Vec<(String, PathBuf)>,
    memsw: bool,
}

impl OwnedCgroups {
    fn dir(&self, controller: &str) -> Option<PathBuf> {
        self.dirs
            .iter()
            .find(|(name, _)| name == controller)
            .map(|(_, dir)| dir.clone())
    }

    fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs
            .iter()
            .map(|(_, dir)| dir.join("cgroup.procs"))
            .collect()
    }

    /// Creates the cgroups (removing a stale one of the same name) and writes the limits.
    fn create(&self, limits: Limits) -> Result<(), String> {
        self.remove();
        for (_, dir) in &self.dirs {
            if dir.exists() {
                return Err(format!("stale cgroup {} cannot be removed", dir.display()));
            }
        }
        let result = self.create_and_limit(limits);
        if result.is_err() {
            self.remove();
        }
        result
    }

    fn create_and_limit(&self, limits: Limits) -> Result<(), String> {
        let write = |dir: &Path, file: &str, value: String| -> Result<(), String> {
            fs::write(dir.join(file), &value).map_err(|err| {
                format!(
                    "cannot write {value} to {}: {err}",
                    dir.join(file).display()
                )
            })
        };
        for (name, dir) in &self.dirs {
            fs::create_dir(dir)
                .map_err(|err| format!("cannot create cgroup {}: {err}", dir.display()))?;
            match name.as_str() {
                "memory" if limits.memory_bytes > 0 => {
                    let bytes = limits.memory_bytes.min(i64::MAX as u64).to_string();
                    write(dir, "memory.limit_in_bytes", bytes.clone())?;
                    if self.memsw {
                        write(dir, "memory.memsw.limit_in_bytes", bytes)?;
                    }
                }
                // One more process: crun itself lives in this cgroup.
                "pids" if limits.pids > 0 => {
                    write(dir, "pids.max", (u64::from(limits.pids) + 1).to_string())?;
                }
                "devices" => {
                    write(dir, "devices.deny", "a".to_string())?;
                    for rule in DEVICE_ALLOW {
                        write(dir, "devices.allow", (*rule).to_string())?;
                    }
                }
                "cpu" if limits.cpu_millis > 0 => {
                    write(dir, "cpu.cfs_period_us", CPU_PERIOD_US.to_string())?;
                    write(
                        dir,
                        "cpu.cfs_quota_us",
                        (u64::from(limits.cpu_millis) * CPU_PERIOD_US / 1000).to_string(),
                    )?;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Processes in the cgroups.
    fn pids(&self) -> Vec<Pid> {
        let mut pids: Vec<Pid> = self
            .procs_files()
            .iter()
            .filter_map(|file| fs::read_to_string(file).ok())
            .flat_map(|text| {
                text.lines()
                    .filter_map(|l| l.trim().parse::<i32>().ok())
                    .collect::<Vec<_>>()
            })
            .map(Pid::from_raw)
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Sends `signal` to every process in the cgroups except `except`.
    fn signal_all(&self, signal: Signal, except: Option<Pid>) {
        for pid in self.pids() {
            if Some(pid) != except {
                let _ = kill(pid, signal);
            }
        }
    }

    /// Kills what is left and removes the cgroups, retrying while processes exit.
    fn remove(&self) {
        let deadline = std::time::Instant::now() + CGROUP_REMOVE_TIMEOUT;
        for (_, dir) in &self.dirs {
            loop {
                if !dir.exists() {
                    break;
                }
                let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
                match fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(err) if err.kind() == io::ErrorKind::NotFound => break,
                    Err(err) => {
                        if std::time::Instant::now() > deadline {
                            tracing::warn!(cgroup = %dir.display(), error = %err, "cannot remove cgroup");
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Bundle preparation.

/// Everything the blocking preparation needs.
struct Prepare {
    runtime: PathBuf,
    global: Vec<OsString>,
    state_root: PathBuf,
    rootfs_cache: PathBuf,
    id: String,
    bundle: PathBuf,
    argv: Vec<String>,
    env: BTreeMap<String, String>,
    workdir: PathBuf,
    rootfs: Option<PathBuf>,
    network: NetworkMode,
    limits: Limits,
    swap: bool,
    owned: Option<OwnedCgroups>,
}

impl Prepare {
    fn run(self) -> Result<(), String> {
        // Leftovers of an earlier attempt with the same id (agent crash).
        if self.state_root.join(&self.id).exists() {
            runtime_command_blocking(&self.runtime, &self.global, &["delete", "-f", &self.id]);
        }
        match fs::remove_dir_all(&self.bundle) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => {
                return Err(format!(
                    "cannot remove stale bundle {}: {err}",
                    self.bundle.display()
                ));
            }
        }
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&self.bundle)
            .map_err(|err| format!("cannot create bundle {}: {err}", self.bundle.display()))?;

        let workdir = std::path::absolute(&self.workdir)
            .map_err(|err| format!("work directory {}: {err}", self.workdir.display()))?;
        if !workdir.is_dir() {
            return Err(format!(
                "work directory {} does not exist",
                workdir.display()
            ));
        }
        chown_tree(&workdir, policy::SANDBOX_UID, policy::SANDBOX_GID)
            .map_err(|err| format!("cannot chown the work directory: {err}"))?;

        let (root, host_dirs) = match &self.rootfs {
            None => {
                let root = self.bundle.join("rootfs");
                let dirs = build_host_view(&root)
                    .map_err(|err| format!("cannot build the root view: {err}"))?;
                (root, dirs)
            }
            Some(path) => (resolve_rootfs(path, &self.rootfs_cache)?, Vec::new()),
        };

        let spec = build_spec(&SpecParams {
            argv: &self.argv,
            env: &self.env,
            root: &root,
            host_dirs: &host_dirs,
            workdir: &workdir,
            network: self.network,
            limits: self.limits,
            cgroups_path: &self.id,
            swap: self.swap,
        })
        .map_err(|err| format!("invalid OCI spec: {err}"))?;
        let json = serde_json::to_vec_pretty(&spec)
            .map_err(|err| format!("cannot serialise the OCI spec: {err}"))?;
        fs::write(self.bundle.join("config.json"), json)
            .map_err(|err| format!("cannot write config.json: {err}"))?;

        if let Some(cgroups) = &self.owned {
            cgroups.create(self.limits)?;
        }
        Ok(())
    }
}

/// Makes `path` and everything below it (not following symlinks) owned by `uid:gid`.
fn chown_tree(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let mut stack = vec![path.to_path_buf()];
    while let Some(current) = stack.pop() {
        std::os::unix::fs::lchown(&current, Some(uid), Some(gid))?;
        let meta = fs::symlink_metadata(&current)?;
        if meta.is_dir() {
            for entry in fs::read_dir(&current)? {
                stack.push(entry?.path());
            }
        }
    }
    Ok(())
}

/// Creates the empty root of the host view: symlinks for the host's top-level links, mount
/// points for the bound directories and the fresh mounts. Returns the directories to bind.
fn build_host_view(root: &Path) -> io::Result<Vec<String>> {
    fs::DirBuilder::new().mode(0o755).create(root)?;
    fs::set_permissions(root, fs::Permissions::from_mode(0o755))?;
    let mut dirs = Vec::new();
    for entry in policy::root_entries(Path::new("/")) {
        match entry {
            RootEntry::Dir(name) => {
                fs::DirBuilder::new().mode(0o755).create(root.join(&name))?;
                dirs.push(name);
            }
            RootEntry::Link(name, target) => {
                std::os::unix::fs::symlink(&target, root.join(&name))?;
            }
        }
    }
    for name in MOUNT_POINTS {
        create_mount_point(&root.join(name))?;
    }
    Ok(dirs)
}

/// Creates a mount point directory. `tmp` gets mode 1777: runc gives a tmpfs the mode of
/// the directory it is mounted on, whatever the `mode=` option says.
fn create_mount_point(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new().mode(0o755).create(path)?;
    if path.file_name().is_some_and(|n| n == "tmp") {
        fs::set_permissions(path, fs::Permissions::from_mode(0o1777))?;
    }
    Ok(())
}

/// The root directory for a `rootfs` request: the directory itself, or the extraction of a
/// tarball (cached).
fn resolve_rootfs(path: &Path, cache: &Path) -> Result<PathBuf, String> {
    let meta = fs::metadata(path).map_err(|err| format!("rootfs {}: {err}", path.display()))?;
    if meta.is_dir() {
        return std::path::absolute(path)
            .map_err(|err| format!("rootfs {}: {err}", path.display()));
    }
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = [".tar.gz", ".tgz", ".tar"]
        .iter()
        .find_map(|ext| file_name.strip_suffix(ext))
        .ok_or_else(|| {
            format!(
                "rootfs {} is neither a directory nor a .tar, .tar.gz or .tgz file",
                path.display()
            )
        })?;
    let canonical =
        fs::canonicalize(path).map_err(|err| format!("rootfs {}: {err}", path.display()))?;
    let dest = cache.join(format!(
        "{}-{:016x}",
        sanitize_name(stem),
        rootfs_cache_key(&canonical, &meta)
    ));
    if dest.is_dir() {
        return Ok(dest);
    }
    extract_tarball(&canonical, cache, &dest)?;
    Ok(dest)
}

/// Identity of a tarball for the extraction cache: canonical path, size, mtime, inode,
/// device (a content digest would need SHA-256, which this crate does not depend on).
fn rootfs_cache_key(canonical: &Path, meta: &fs::Metadata) -> u64 {
    let mut key = canonical.as_os_str().as_encoded_bytes().to_vec();
    for n in [
        meta.len(),
        meta.mtime() as u64,
        meta.mtime_nsec() as u64,
        meta.ino(),
        meta.dev(),
    ] {
        key.extend_from_slice(&n.to_le_bytes());
    }
    fnv1a(&key)
}

/// Extracts `tarball` into a temporary directory of `cache`, adds the mount points and
/// renames it to `dest` (another run may have won the race: then its result is used).
fn extract_tarball(tarball: &Path, cache: &Path, dest: &Path) -> Result<(), String> {
    let tmp = cache.join(format!(
        ".extract-{}-{}-{}",
        std::process::id(),
        now_ms(),
        fnv1a(dest.as_os_str().as_encoded_bytes())
    ));
    fs::DirBuilder::new()
        .mode(0o755)
        .create(&tmp)
        .map_err(|err| format!("cannot create {}: {err}", tmp.display()))?;
    let result = (|| {
        let out = std::process::Command::new("tar")
            .arg("-xf")
            .arg(tarball)
            .arg("-C")
            .arg(&tmp)
            .arg("--numeric-owner")
            .env_clear()
            .env("PATH", RUNTIME_PATH_ENV)
            .stdin(Stdio::null())
            .output()
            .map_err(|err| format!("cannot run tar: {err}"))?;
        if !out.status.success() {
            return Err(format!(
                "extracting {} failed: {}",
                tarball.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))
            .map_err(|err| format!("chmod {}: {err}", tmp.display()))?;
        for name in MOUNT_POINTS {
            let point = tmp.join(name);
            if fs::symlink_metadata(&point).is_err() {
                create_mount_point(&point)
                    .map_err(|err| format!("cannot create {}: {err}", point.display()))?;
            }
        }
        match fs::rename(&tmp, dest) {
            Ok(()) => Ok(()),
            Err(_) if dest.is_dir() => {
                let _ = fs::remove_dir_all(&tmp);
                Ok(())
            }
            Err(err) => Err(format!("cannot rename to {}: {err}", dest.display())),
        }
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

// ---------------------------------------------------------------------------------------
// The OCI spec.

/// Inputs of [`build_spec`].
struct SpecParams<'a> {
    argv: &'a [String],
    env: &'a BTreeMap<String, String>,
    /// `root.path`.
    root: &'a Path,
    /// Host directories bound read-only at the same place (host view only).
    host_dirs: &'a [String],
    workdir: &'a Path,
    network: NetworkMode,
    limits: Limits,
    cgroups_path: &'a str,
    /// Apply the OCI `swap` (memory + swap) limit.
    swap: bool,
}

fn mount(
    destination: &str,
    typ: &str,
    source: &Path,
    options: &[&str],
) -> Result<Mount, OciSpecError> {
    MountBuilder::default()
        .destination(destination)
        .typ(typ)
        .source(source)
        .options(options.iter().map(|o| (*o).to_string()).collect::<Vec<_>>())
        .build()
}

fn rlimit(typ: PosixRlimitType, value: u64) -> Result<PosixRlimit, OciSpecError> {
    PosixRlimitBuilder::default()
        .typ(typ)
        .soft(value)
        .hard(value)
        .build()
}

fn namespace(typ: LinuxNamespaceType) -> Result<LinuxNamespace, OciSpecError> {
    LinuxNamespaceBuilder::default().typ(typ).build()
}

/// The container's `config.json`: exactly the [`policy`] plus the request.
fn build_spec(p: &SpecParams<'_>) -> Result<Spec, OciSpecError> {
    let mut mounts = vec![
        mount(
            "/proc",
            "proc",
            Path::new("proc"),
            &["nosuid", "noexec", "nodev"],
        )?,
        mount(
            "/dev",
            "tmpfs",
            Path::new("tmpfs"),
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
        mount(
            "/dev/pts",
            "devpts",
            Path::new("devpts"),
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
            ],
        )?,
        mount(
            "/dev/shm",
            "tmpfs",
            Path::new("shm"),
            &["nosuid", "noexec", "nodev", "mode=1777", "size=64m"],
        )?,
    ];
    for dir in p.host_dirs {
        let path = Path::new("/").join(dir);
        mounts.push(mount(
            &format!("/{dir}"),
            "bind",
            &path,
            &["bind", "ro", "nosuid", "nodev"],
        )?);
    }
    mounts.push(mount(
        "/tmp",
        "tmpfs",
        Path::new("tmpfs"),
        &["nosuid", "nodev", "mode=1777"],
    )?);
    mounts.push(mount(
        policy::WORK_DIR,
        "bind",
        p.workdir,
        &["bind", "rw", "nosuid", "nodev"],
    )?);

    let no_caps = LinuxCapabilitiesBuilder::default()
        .bounding(Capabilities::new())
        .effective(Capabilities::new())
        .inheritable(Capabilities::new())
        .permitted(Capabilities::new())
        .ambient(Capabilities::new())
        .build()?;
    let process = ProcessBuilder::default()
        .terminal(false)
        .user(
            UserBuilder::default()
                .uid(policy::SANDBOX_UID)
                .gid(policy::SANDBOX_GID)
                .build()?,
        )
        .args(p.argv.to_vec())
        .env(
            p.env
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>(),
        )
        .cwd(policy::WORK_DIR)
        .no_new_privileges(true)
        .capabilities(no_caps)
        .rlimits(vec![
            rlimit(PosixRlimitType::RlimitNofile, policy::RLIMIT_NOFILE)?,
            rlimit(PosixRlimitType::RlimitCore, 0)?,
        ])
        .build()?;

    let mut namespaces = vec![
        namespace(LinuxNamespaceType::Pid)?,
        namespace(LinuxNamespaceType::Ipc)?,
        namespace(LinuxNamespaceType::Uts)?,
        namespace(LinuxNamespaceType::Mount)?,
    ];
    if p.network == NetworkMode::None {
        namespaces.push(namespace(LinuxNamespaceType::Network)?);
    }

    let mut resources = LinuxResourcesBuilder::default().devices(vec![
        LinuxDeviceCgroupBuilder::default()
            .allow(false)
            .access("rwm")
            .build()?,
    ]);
    if p.limits.memory_bytes > 0 {
        let bytes = i64::try_from(p.limits.memory_bytes).unwrap_or(i64::MAX);
        let mut memory = LinuxMemoryBuilder::default().limit(bytes);
        if p.swap {
            memory = memory.swap(bytes);
        }
        resources = resources.memory(memory.build()?);
    }
    if p.limits.cpu_millis > 0 {
        resources = resources.cpu(
            LinuxCpuBuilder::default()
                .quota(i64::from(p.limits.cpu_millis) * (CPU_PERIOD_US as i64) / 1000)
                .period(CPU_PERIOD_US)
                .build()?,
        );
    }
    if p.limits.pids > 0 {
        resources = resources.pids(
            LinuxPidsBuilder::default()
                .limit(i64::from(p.limits.pids))
                .build()?,
        );
    }

    let linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .resources(resources.build()?)
        .cgroups_path(PathBuf::from(p.cgroups_path))
        .masked_paths(
            MASKED_PATHS
                .iter()
                .map(|s| (*s).to_string())
                .collect::<Vec<_>>(),
        )
        .readonly_paths(
            READONLY_PATHS
                .iter()
                .map(|s| (*s).to_string())
                .collect::<Vec<_>>(),
        )
        .seccomp(seccomp()?)
        .build()?;

    SpecBuilder::default()
        .version("1.0.2")
        .root(RootBuilder::default().path(p.root).readonly(true).build()?)
        .mounts(mounts)
        .process(process)
        .hostname(policy::SANDBOX_HOSTNAME)
        .linux(linux)
        .build()
}

fn errno_rule(names: &[&str], errno: u32) -> Result<LinuxSyscall, OciSpecError> {
    LinuxSyscallBuilder::default()
        .names(names.iter().map(|n| (*n).to_string()).collect::<Vec<_>>())
        .action(LinuxSeccompAction::ScmpActErrno)
        .errno_ret(errno)
        .build()
}

/// Allow by default; [`policy::DENIED_SYSCALLS`] fail with `EPERM`, `clone3` with `ENOSYS`,
/// and a `clone` with any of [`policy::CLONE_NAMESPACE_FLAGS`] with `EPERM`.
/// `SCMP_CMP_MASKED_EQ` matches when `(arg & value) == valueTwo`: with both set to the flag,
/// when the flag is set.
fn seccomp() -> Result<LinuxSeccomp, OciSpecError> {
    let mut syscalls = vec![
        errno_rule(policy::DENIED_SYSCALLS, ERRNO_EPERM)?,
        errno_rule(&["clone3"], ERRNO_ENOSYS)?,
    ];
    for &flag in policy::CLONE_NAMESPACE_FLAGS {
        syscalls.push(
            LinuxSyscallBuilder::default()
                .names(vec!["clone".to_string()])
                .action(LinuxSeccompAction::ScmpActErrno)
                .errno_ret(ERRNO_EPERM)
                .args(vec![
                    LinuxSeccompArgBuilder::default()
                        .index(0usize)
                        .value(flag)
                        .value_two(flag)
                        .op(LinuxSeccompOperator::ScmpCmpMaskedEq)
                        .build()?,
                ])
                .build()?,
        );
    }
    let mut builder = LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActAllow)
        .syscalls(syscalls);
    if let Some(arches) = seccomp_architectures() {
        builder = builder.architectures(arches);
    }
    builder.build()
}

/// The native architecture and its compat ABIs.
fn seccomp_architectures() -> Option<Vec<Arch>> {
    if cfg!(target_arch = "x86_64") {
        Some(vec![
            Arch::ScmpArchX86_64,
            Arch::ScmpArchX86,
            Arch::ScmpArchX32,
        ])
    } else if cfg!(target_arch = "aarch64") {
        Some(vec![Arch::ScmpArchAarch64, Arch::ScmpArchArm])
    } else {
        None
    }
}

// ---------------------------------------------------------------------------------------
// Killing and cleanup.

/// Signals a running container.
struct Killer<'a> {
    runtime: &'a Path,
    global: &'a [OsString],
    id: &'a str,
    owned: Option<&'a OwnedCgroups>,
    run_pid: Pid,
}

impl Killer<'_> {
    /// SIGTERM to every process of the container; waits up to `grace` for the runtime to
    /// exit; SIGKILL; waits up to [`KILL_WAIT`]; then kills the runtime's process group.
    async fn terminate(&self, child: &mut Child, grace: Duration) -> io::Result<ExitStatus> {
        self.signal(Signal::SIGTERM).await;
        let now = Instant::now();
        let deadline = now
            .checked_add(grace)
            .unwrap_or(now + Duration::from_secs(86_400));
        if let Ok(status) = tokio::time::timeout_at(deadline, child.wait()).await {
            return status;
        }
        self.signal(Signal::SIGKILL).await;
        if let Ok(status) = tokio::time::timeout(KILL_WAIT, child.wait()).await {
            return status;
        }
        tracing::warn!(
            container = %self.id,
            "oci sandbox: runtime still running after SIGKILL; killing its process group"
        );
        signal_group(self.run_pid, Signal::SIGKILL);
        child.wait().await
    }

    async fn signal(&self, signal: Signal) {
        let name = signal.as_str();
        match self.owned {
            // crun without a cgroup manager: the init through crun, the rest directly.
            Some(cgroups) => {
                runtime_command(self.runtime, self.global, &["kill", self.id, name]).await;
                cgroups.signal_all(signal, Some(self.run_pid));
            }
            None => {
                if !runtime_command(self.runtime, self.global, &["kill", "--all", self.id, name])
                    .await
                {
                    runtime_command(self.runtime, self.global, &["kill", self.id, name]).await;
                }
            }
        }
    }
}

/// Runs `<runtime> <global> <args>`, bounded by [`RUNTIME_COMMAND_TIMEOUT`]. Whether it
/// succeeded.
async fn runtime_command(runtime: &Path, global: &[OsString], args: &[&str]) -> bool {
    let mut cmd = Command::new(runtime);
    cmd.args(global)
        .args(args)
        .env_clear()
        .env("PATH", RUNTIME_PATH_ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    match tokio::time::timeout(RUNTIME_COMMAND_TIMEOUT, cmd.output()).await {
        Ok(Ok(out)) if out.status.success() => true,
        Ok(Ok(out)) => {
            tracing::debug!(
                args = ?args,
                stderr = %String::from_utf8_lossy(&out.stderr).trim(),
                "oci runtime command failed"
            );
            false
        }
        Ok(Err(err)) => {
            tracing::debug!(args = ?args, error = %err, "oci runtime command could not run");
            false
        }
        Err(_) => {
            tracing::warn!(args = ?args, "oci runtime command timed out");
            false
        }
    }
}

/// Blocking [`runtime_command`].
fn runtime_command_blocking(runtime: &Path, global: &[OsString], args: &[&str]) -> bool {
    let child = std::process::Command::new(runtime)
        .args(global)
        .args(args)
        .env_clear()
        .env("PATH", RUNTIME_PATH_ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        return false;
    };
    let deadline = std::time::Instant::now() + RUNTIME_COMMAND_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

/// What has to go after a run: the container, the owned cgroups, the bundle.
#[derive(Debug)]
struct Cleanup {
    runtime: PathBuf,
    global: Vec<OsString>,
    state_root: PathBuf,
    id: String,
    bundle: PathBuf,
    owned: Option<OwnedCgroups>,
}

impl Cleanup {
    /// Blocking.
    fn run(&self) {
        if let Some(cgroups) = &self.owned {
            cgroups.signal_all(Signal::SIGKILL, None);
        }
        if self.state_root.join(&self.id).exists()
            && !runtime_command_blocking(&self.runtime, &self.global, &["delete", "-f", &self.id])
        {
            tracing::warn!(container = %self.id, "oci sandbox: delete -f failed");
        }
        if let Some(cgroups) = &self.owned {
            cgroups.remove();
        }
        match fs::remove_dir_all(&self.bundle) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => {
                tracing::warn!(bundle = %self.bundle.display(), error = %err, "cannot remove bundle");
            }
        }
    }
}

/// Runs the cleanup when dropped (from a thread: `Drop` cannot wait), unless it was taken.
struct CleanupGuard {
    job: Option<Cleanup>,
}

impl CleanupGuard {
    fn take(&mut self) -> Option<Cleanup> {
        self.job.take()
    }

    /// Runs the cleanup now and waits for it.
    async fn finish(&mut self) {
        if let Some(job) = self.job.take() {
            let _ = tokio::task::spawn_blocking(move || job.run()).await;
        }
    }
}

impl Drop for CleanupGuard {
    fn drop(&mut self) {
        if let Some(job) = self.job.take() {
            let spawned = std::thread::Builder::new()
                .name("paddock-oci-cleanup".into())
                .spawn(move || job.run());
            if let Err(err) = spawned {
                tracing::warn!(error = %err, "oci sandbox: cannot start the cleanup thread");
            }
        }
    }
}

/// Waits for both readers, at most [`PIPE_DRAIN_TIMEOUT`]; then stops them.
async fn drain_pipes(
    stdout_task: Option<JoinHandle<Captured>>,
    stderr_task: Option<JoinHandle<Captured>>,
    io_stop: &CancellationToken,
    task_id: &str,
) -> (Captured, Captured) {
    let join = async {
        let out = async {
            match stdout_task {
                Some(task) => task.await.unwrap_or_default(),
                None => Captured::default(),
            }
        };
        let err = async {
            match stderr_task {
                Some(task) => task.await.unwrap_or_default(),
                None => Captured::default(),
            }
        };
        tokio::join!(out, err)
    };
    tokio::pin!(join);
    tokio::select! {
        captured = &mut join => captured,
        () = tokio::time::sleep(PIPE_DRAIN_TIMEOUT) => {
            tracing::warn!(
                task_id = %task_id,
                "oci sandbox: output pipe still open after the container exited; giving up on it"
            );
            io_stop.cancel();
            join.await
        }
    }
}

/// Sends `signal` to a process group, ignoring errors (ESRCH: the group is empty).
fn signal_group(pgid: Pid, signal: Signal) {
    if let Err(err) = killpg(pgid, signal)
        && err != nix::errno::Errno::ESRCH
    {
        tracing::debug!(pgid = pgid.as_raw(), %signal, error = %err, "killpg failed");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Instant as StdInstant;

    use super::*;

    const PATH: &str = "/usr/local/bin:/usr/bin:/bin";
    const MIB: u64 = 1024 * 1024;

    static COUNTER: AtomicU32 = AtomicU32::new(0);

    /// A detected backend with its own state directory.
    struct Rt {
        sandbox: OciSandbox,
        _state: tempfile::TempDir,
    }

    /// Every runtime installed here (crun, runc), each with a fresh state directory. None
    /// installed (or not root): prints why and returns nothing, except under `CI=true`,
    /// where that (or an installed runtime that cannot be used) is a failure.
    fn runtimes() -> Vec<Rt> {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true");
        let mut found = Vec::new();
        let mut problems = Vec::new();
        if !nix::unistd::Uid::effective().is_root() {
            problems.push("the OCI backend tests need root".to_string());
        } else {
            for name in ["crun", "runc"] {
                if find_in_path(Path::new(name)).is_none() {
                    eprintln!("{name} is not installed; its OCI tests are skipped");
                    continue;
                }
                let state = tempfile::tempdir().unwrap();
                match OciSandbox::detect(OciConfig {
                    runtime: Some(name.into()),
                    state_dir: state.path().join(".oci"),
                }) {
                    Ok(sandbox) => found.push(Rt {
                        sandbox,
                        _state: state,
                    }),
                    Err(err) => problems.push(format!("{name}: {err}")),
                }
            }
            if found.is_empty() && problems.is_empty() {
                problems.push("neither crun nor runc is installed".to_string());
            }
        }
        if !problems.is_empty() {
            let text = problems.join("; ");
            assert!(!ci, "OCI backend tests cannot run under CI: {text}");
            eprintln!("OCI backend tests partly or fully skipped: {text}");
        }
        found
    }

    fn request(dir: &tempfile::TempDir, argv: &[&str]) -> RunRequest {
        RunRequest {
            task_id: format!(
                "t{}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ),
            attempt: 1,
            argv: argv.iter().map(|s| (*s).to_string()).collect(),
            env: BTreeMap::from([("PATH".to_string(), PATH.to_string())]),
            stdin: None,
            workdir: dir.path().to_path_buf(),
            timeout: Duration::from_secs(30),
            kill_grace: Duration::from_secs(1),
            network: NetworkMode::Default,
            output_max_chars: 100_000,
            limits: Limits::default(),
            rootfs: None,
        }
    }

    fn sh(dir: &tempfile::TempDir, script: &str) -> RunRequest {
        request(dir, &["/bin/sh", "-c", script])
    }

    async fn run_collect(
        sandbox: &OciSandbox,
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
        (result, collector.await.unwrap())
    }

    /// Runs `req`, checks that nothing of the container is left, returns the outcome.
    async fn run(sandbox: &OciSandbox, req: RunRequest) -> RunOutcome {
        let name = sanitize_name(&format!("{}-{}", req.task_id, req.attempt));
        let result = run_collect(sandbox, req, CancellationToken::new()).await.0;
        let outcome = match result {
            Ok(outcome) => outcome,
            Err(err) => panic!("[{}] run failed: {err}", sandbox.runtime_name()),
        };
        assert_clean(sandbox, &name);
        outcome
    }

    /// Container ids the runtime still lists.
    fn listed(sandbox: &OciSandbox) -> String {
        let out = std::process::Command::new(sandbox.runtime_path())
            .arg("--root")
            .arg(sandbox.state_root())
            .arg("list")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// No container, bundle or cgroup of run `name` is left.
    fn assert_clean(sandbox: &OciSandbox, name: &str) {
        let leftovers = leftovers(sandbox, name);
        assert!(
            leftovers.is_empty(),
            "[{}] left behind: {leftovers:?}",
            sandbox.runtime_name()
        );
    }

    fn leftovers(sandbox: &OciSandbox, name: &str) -> Vec<String> {
        let id = format!("paddock-{name}");
        let mut left = Vec::new();
        if listed(sandbox).contains(&id) {
            left.push(format!("container {id}"));
        }
        let bundle = sandbox.state_dir.join("bundles").join(name);
        if bundle.exists() {
            left.push(format!("bundle {}", bundle.display()));
        }
        if sandbox.state_root().join(&id).exists() {
            left.push(format!("state of {id}"));
        }
        for controller in OWNED_CONTROLLERS {
            if let Some(dir) = sandbox.cgroups.container_dir(controller, &id) {
                left.push(format!("cgroup {}", dir.display()));
            }
        }
        left
    }

    fn tag(sandbox: &OciSandbox) -> &str {
        sandbox.runtime_name()
    }

    /// Interface names in a `/proc/net/dev` text.
    fn interfaces(text: &str) -> Vec<String> {
        let mut names: Vec<String> = text
            .lines()
            .skip(2)
            .filter_map(|l| l.split_once(':').map(|(n, _)| n.trim().to_string()))
            .collect();
        names.sort_unstable();
        names
    }

    #[tokio::test]
    async fn captures_output_and_exit_status() {
        for rt in runtimes() {
            let sb = &rt.sandbox;
            let dir = tempfile::tempdir().unwrap();
            let req = sh(&dir, "echo out; echo err >&2; echo ünï");
            let name = sanitize_name(&format!("{}-1", req.task_id));
            let (result, chunks) = run_collect(sb, req, CancellationToken::new()).await;
            let out = result.unwrap();
            assert_clean(sb, &name);
            assert_eq!(out.status, ResultStatus::Succeeded, "[{}] {out:?}", tag(sb));
            assert_eq!(out.exit_code, Some(0));
            assert_eq!(out.signal, None);
            assert_eq!(out.error_code, None);
            assert_eq!(out.stdout, "out\nünï\n", "[{}]", tag(sb));
            assert_eq!(out.stderr, "err\n", "[{}]", tag(sb));
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

            let out = run(sb, sh(&dir, "exit 7")).await;
            assert_eq!(out.status, ResultStatus::Failed, "[{}]", tag(sb));
            assert_eq!(out.exit_code, Some(7));
            assert_eq!(out.signal, None);
            assert_eq!(out.error_code, None);
            assert_eq!(out.error_message, None);
        }
    }

    #[tokio::test]
    async fn environment_is_exactly_the_given_one() {
        for rt in runtimes() {
            let sb = &rt.sandbox;
            let dir = tempfile::tempdir().unwrap();
            let mut req = request(&dir, &["/usr/bin/env"]);
            req.env.insert("FOO".into(), "bar baz".into());
            req.env.insert("HOME".into(), "/work".into());
            let out = run(sb, req).await;
            assert_eq!(out.status, ResultStatus::Succeeded, "[{}] {out:?}", tag(sb));
            let mut lines: Vec<&str> = out.stdout.lines().collect();
            lines.sort_unstable();
            assert_eq!(
                lines,
                vec![
                    "FOO=bar baz".to_string(),
                    "HOME=/work".to_string(),
                    format!("PATH={PATH}")
                ],
                "[{}]",
                tag(sb)
            );
        }
    }

    #[tokio::test]
    async fn runs_as_nobody_in_work_with_the_sandbox_hostname() {
        for rt in runtimes() {
            let sb = &rt.sandbox;
            let dir = tempfile::tempdir().unwrap();
            let out = run(sb, sh(&dir, "id -u; id -g; id -G; pwd; hostname")).await;
            assert_eq!(out.status, ResultStatus::Succeeded, "[{}] {out:?}", tag(sb));
            assert_eq!(
                out.stdout,
                "65534\n65534\n65534\n/work\npaddock\n",
                "[{}]",
                tag(sb)
            );
        }
    }

    #[tokio::test]
    async fn only_work_and_tmp_are_writable_and_secrets_are_hidden() {
        let script = "echo hi > /work/f && cat /work/f
            touch /etc/x 2>/dev/null && echo etc-writable
            touch /usr/x 2>/dev/null && echo usr-writable
            touch /x 2>/dev/null && echo root-writable
            touch /tmp/x && echo tmp-ok
            for d in /root /home /var /srv /mnt /sys; do test -e $d && echo visible:$d; done
            test -r /proc/self/status && echo proc-ok
            test -c /dev/null && echo dev-ok
            cat /proc/kcore 2>/dev/null | head -c 1 | wc -c
            echo x 2>/dev/null > /proc/sys/kernel/hostname || echo proc-sys-ro";
        for rt in runtimes() {
            let sb = &rt.sandbox;
            let dir = tempfile::tempdir().unwrap();
            let out = run(sb, sh(&dir, script)).await;
            assert_eq!(
                out.stdout,
                "hi\ntmp-ok\nproc-ok\ndev-ok\n0\nproc-sys-ro\n",
                "[{}] {out:?}",
                tag(sb)
            );
            let meta = fs::metadata(dir.path().join("f")).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
        }
    }

    #[tokio::test]
    async fn network_none_has_only_loopback() {
        for rt in runtimes() {
            let sb = &rt.sandbox;
            let dir = tempfile::tempdir().unwrap();
            let mut req = request(&dir, &["cat", "/proc/net/dev"]);
            req.network = NetworkMode::None;
            let out = run(sb, req).await;
            assert_eq!(out.status, ResultStatus::Succeeded, "[{}] {out:?}", tag(sb));
            assert_eq!(interfaces(&out.stdout), vec!["lo"], "[{}]", tag(sb));
        }
    }

    #[tokio::test]
    async fn network_default_shares_the_host() {
        let host = interfaces(&fs::read_to_string("/proc/net/dev").unwrap());
        if host.iter().all(|i| i == "lo") {
            eprintln!("the host has no interface besides lo; nothing to compare");
            return;
        }
        for rt in runtimes() {
            let sb = &rt.sandbox;
            let dir = tempfile::tempdir().unwrap();
            let out = run(sb, request(&dir, &["cat", "/proc/net/dev"])).await;
            assert_eq!(out.status, ResultStatus::Succeeded, "[{}] {out:?}", tag(sb));
            assert_eq!(interfaces(&out.stdout), host, "[{}]", tag(sb));
        }
    }

    #[tokio::test]
    async fn memory_limit_kill_is_reported() {
        for rt in runtimes() {
            let sb = &rt.sandbox;
            let dir = tempfile::tempdir().unwrap();
            for argv in [
                vec!["dd", "if=/dev/zero", "of=/dev/null", "bs=300M", "count=1"],
                // The shell (PID 1) survives; only dd is killed.
                vec![
                    "/bin/sh",
                    "-c",
                    "dd if=/dev/zero of=/dev/null bs=300M count=1; echo after",
                ],
            ] {
                let mut req = request(&dir, &argv);
                req.limits.memory_bytes = 64 * MIB;
                let out = run(sb, req).await;
                assert_eq!(out.status, ResultStatus::Failed, "[{}] {out:?}", tag(sb));
                assert_eq!(
                    out.error_code,
                    Some(ErrorCode::MemoryLimitExceeded),
                    "[{}] {out:?}",
                    tag(sb)
                );
                assert_eq!(
                    out.error_message.as_deref(),
                    Some("killed: over the 64 MiB memory limit")
                );
            }
            // Within the limit nothing is reported.
            let mut req = request(
                &dir,
                &["dd", "if=/dev/zero", "of=/dev/null", "bs=8M", "count=1"],
            );
            req.limits.memory_bytes = 64 * MIB;
            let out = run(sb, req).await;
            assert_eq!(out.status, ResultStatus::Succeeded, "[{}] {out:?}", tag(sb));
            assert_eq!(out.error_code, None);
        }
    }

    #[tokio::test]
    async fn pids_limit_is_reported() {
        for rt in runtimes() {
            let sb = &rt.sandbox;
            let dir = tempfile::tempdir().unwrap();
            let mut req = sh(
                &dir,
                "i=0; while [ $i -lt 64 ]; do sleep 30 & i=$((i + 1)); done; wait",
            );
            req.limits.pids = 32;
            req.timeout = Duration::from_secs(10);
            let start = StdInstant::now();
            let out = run(sb, req).await;
            assert!(start.elapsed() < Duration::from_secs(20));
            assert!(
                matches!(out.status, ResultStatus::Failed | ResultStatus::TimedOut),
                "[{}] {out:?}",
                tag(sb)
            );
            if out.status == ResultStatus::Failed {
                assert_eq!(
                    out.error_code,
                    Some(ErrorCode::PidsLimitExceeded),
                    "[{}] {out:?}",
                    tag(sb)
                );
                assert_eq!(
                    out.error_message.as_deref(),
                    Some("could not start a process: the limit of 32 processes was reached")
                );
            }
            assert!(
                out.stderr.to_lowercase().contains("fork"),
                "[{}] {out:?}",
                tag(sb)
            );

            // A task that survives the failed forks and runs into its timeout.
            let mut req = sh(
                &dir,
                "i=0; while [ $i -lt 40 ]; do (sleep 30 &) 2>/dev/null; i=$((i + 1)); done; exec sleep 30",
            );
            req.limits.pids = 16;
            req.timeout = Duration::from_secs(1);
            req.kill_grace = Duration::from_millis(200);
            let out = run(sb, req).await;
            assert_eq!(out.status, ResultStatus::TimedOut, "[{}] {out:?}", tag(sb));
            assert_eq!(out.error_code, Some(ErrorCode::TaskTimeout));
            assert_eq!(
                out.error_message.as_deref(),
                Some("killed after timeout of 1s (the limit of 16 processes had been reached)"),
                "[{}]",
                tag(sb)
            );
        }
    }

    #[tokio::test]
    async fn timeout_kills_init_that_ignores_sigterm() {
        for rt in runtimes() {
            let sb = &rt.sandbox;
            let dir = tempfile::tempdir().unwrap();
            // `sleep` as PID 1 has no handler: SIGTERM is dropped, SIGKILL after the grace.
            let mut req = request(&dir, &["sleep", "100"]);
            req.timeout = Duration::from_millis(500);
            req.kill_grace = Duration::from_millis(700);
            let start = StdInstant::now();
            let out = run(sb, req).await;
            let elapsed = start.elapsed();
            assert!(
                elapsed >= Duration::from_millis(1200),
                "[{}] {elapsed:?}",
                tag(sb)
            );
            assert!(
                elapsed < Duration::from_secs(8),
                "[{}] {elapsed:?}",
                tag(sb)
            );
            assert_eq!(out.status, ResultStatus::TimedOut, "[{}] {out:?}", tag(sb));
            assert_eq!(out.error_code, Some(ErrorCode::TaskTimeout));
            assert_eq!(
                out.error_message.as_deref(),
                Some("killed after timeout of 500ms")
            );
            assert_eq!(out.signal, Some(Signal::SIGKILL as i32), "[{}]", tag(sb));
        }
    }

    #[tokio::test]
    async fn timeout_kills_a_child_that_ignores_sigterm() {
        for rt in runtimes() {
            let sb = &rt.sandbox;
            let dir = tempfile::tempdir().unwrap();
            let mut req = sh(&dir, "trap '' TERM; sleep 100 & echo started; wait");
            req.timeout = Duration::from_millis(500);
            req.kill_grace = Duration::from_millis(700);
            let start = StdInstant::now();
            let out = run(sb, req).await;
            let elapsed = start.elapsed();
            assert!(
                elapsed >= Duration::from_millis(1200),
                "[{}] {elapsed:?}",
                tag(sb)
            );
            assert!(
                elapsed < Duration::from_secs(8),
                "[{}] {elapsed:?}",
                tag(sb)
            );
            assert_eq!(out.status, ResultStatus::TimedOut);
            assert_eq!(out.stdout, "started\n");

            // A task that handles SIGTERM ends within the grace: the signal reached it.
            let mut req = sh(&dir, "trap 'echo term; exit 3' TERM; sleep 100 & wait");
            req.timeout = Duration::from_millis(500);
            req.kill_grace = Duration::from_secs(5);
            let start = StdInstant::now();
            let out = run(sb, req).await;
            assert!(start.elapsed() < Duration::from_secs(4), "[{}]", tag(sb));
            assert_eq!(out.status, ResultStatus::TimedOut);
            assert_eq!(out.stdout, "term\n", "[{}] {out:?}", tag(sb));
            assert_eq!(out.exit_code, Some(3));
        }
    }

    #[tokio::test]
    async fn cancel_stops_the_container() {
        for rt in runtimes() {
            let sb = &rt.sandbox;
            let dir = tempfile::tempdir().unwrap();
            let cancel = CancellationToken::new();
            let trigger = cancel.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(500)).await;
                trigger.cancel();
            });
            let mut req = request(&dir, &["sleep", "100"]);
            req.kill_grace = Duration::from_millis(300);
            let name = sanitize_name(&format!("{}-1", req.task_id));
            let start = StdInstant::now();
            let (result, _) = run_collect(sb, req, cancel).await;
            let out = result.unwrap();
            assert!(start.elapsed() < Duration::from_secs(6), "[{}]", tag(sb));
            assert_eq!(out.status, ResultStatus::Canceled, "[{}] {out:?}", tag(sb));
            assert_eq!(out.error_code, Some(ErrorCode::TaskCanceled));
            assert_clean(sb, &name);
        }
    }

    #[tokio::test]
    async fn dropping_the_run_removes_the_container() {
        for rt in runtimes() {
            let sb = &rt.sandbox;
            let dir = tempfile::tempdir().unwrap();
            let req = sh(&dir, "echo up; sleep 100");
            let name = sanitize_name(&format!("{}-1", req.task_id));
            let (tx, mut rx) = mpsc::channel(64);
            let mut fut = sb.run(req, tx, CancellationToken::new());
            let first = async move { rx.recv().await };
            tokio::select! {
                chunk = first => assert_eq!(chunk.unwrap().data, "up\n"),
                _ = &mut fut => panic!("the run ended early"),
            }
            drop(fut);
            let deadline = StdInstant::now() + Duration::from_secs(15);
            while !leftovers(sb, &name).is_empty() && StdInstant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert_clean(sb, &name);
        }
    }

    #[tokio::test]
    async fn detect_removes_containers_left_by_a_crashed_agent() {
        for rt in runtimes() {
            let sb = &rt.sandbox;
            let dir = tempfile::tempdir().unwrap();
            let req = sh(&dir, "echo up; sleep 100");
            let name = sanitize_name(&format!("{}-1", req.task_id));
            let (tx, mut rx) = mpsc::channel(64);
            let mut fut = sb.run(req, tx, CancellationToken::new());
            tokio::select! {
                chunk = rx.recv() => assert_eq!(chunk.unwrap().data, "up\n"),
                _ = &mut fut => panic!("the run ended early"),
            }
            // A crash: the future is forgotten, nothing is cleaned up, the runtime is killed.
            let id = format!("paddock-{name}");
            let runtime_pid = fs::read_dir("/proc")
                .unwrap()
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .find(|pid| {
                    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                    let cmdline = String::from_utf8_lossy(&cmdline);
                    cmdline.contains(&id) && cmdline.contains("\0run\0")
                })
                .unwrap();
            std::mem::forget(fut);
            kill(Pid::from_raw(runtime_pid), Signal::SIGKILL).unwrap();
            assert!(!leftovers(sb, &name).is_empty());

            let again = OciSandbox::detect(OciConfig {
                runtime: Some(sb.runtime_path().to_path_buf()),
                state_dir: sb.state_dir.clone(),
            })
            .unwrap();
            assert_clean(&again, &name);
        }
    }

    #[tokio::test]
    async fn output_flood_is_capped_and_completes() {
        for rt in runtimes() {
            let sb = &rt.sandbox;
            let dir = tempfile::tempdir().unwrap();
            let mut req = sh(&dir, "head -c 50000000 /dev/zero | tr '\\0' a");
            req.output_max_chars = 1000;
            req.timeout = Duration::from_secs(60);
            let name = sanitize_name(&format!("{}-1", req.task_id));
            let (result, chunks) = run_collect(sb, req, CancellationToken::new()).await;
            let out = result.unwrap();
            assert_clean(sb, &name);
            assert_eq!(out.status, ResultStatus::Succeeded, "[{}]", tag(sb));
            assert_eq!(out.stdout.len(), 1000);
            assert!(out.stdout.chars().all(|c| c == 'a'));
            assert!(out.stdout_truncated);
            assert!(!out.stderr_truncated);
            let live: usize = chunks.iter().map(|c| c.data.len()).sum();
            assert_eq!(live, 1000);
        }
    }

    #[tokio::test]
    async fn stdin_is_delivered_then_closed() {
        for rt in runtimes() {
            let sb = &rt.sandbox;
            let dir = tempfile::tempdir().unwrap();
            let mut req = request(&dir, &["cat"]);
            req.stdin = Some("hello\nwörld".into());
            let out = run(sb, req).await;
            assert_eq!(out.stdout, "hello\nwörld", "[{}] {out:?}", tag(sb));
            let out = run(sb, request(&dir, &["cat"])).await;
            assert_eq!(out.status, ResultStatus::Succeeded);
            assert_eq!(out.stdout, "");
        }
    }

    #[tokio::test]
    async fn seccomp_and_privileges_are_applied() {
        let script = "grep -E '^(Seccomp|NoNewPrivs|CapEff|CapBnd|CapAmb):' /proc/self/status
            unshare -U true 2>/dev/null && echo unshare-allowed
            mount -t tmpfs none /tmp 2>/dev/null && echo mount-allowed
            if [ -x /usr/bin/perl ] && [ \"$(uname -m)\" = x86_64 ]; then
              perl -e '$r = syscall(56, 0x10000000 | 17, 0, 0, 0, 0); exit 0 if $r == 0;
                       print $r < 0 ? \"clone-newuser: $!\\n\" : \"clone-newuser allowed\\n\";
                       $r = syscall(435, 0, 0); print \"clone3: $!\\n\"'
            fi";
        for rt in runtimes() {
            let sb = &rt.sandbox;
            let dir = tempfile::tempdir().unwrap();
            let out = run(sb, sh(&dir, script)).await;
            let mut expected = "Seccomp:\t2\nNoNewPrivs:\t1\nCapEff:\t0000000000000000\n\
                                CapBnd:\t0000000000000000\nCapAmb:\t0000000000000000\n"
                .to_string();
            let mut lines: Vec<&str> = out.stdout.lines().collect();
            let perl = Path::new("/usr/bin/perl").exists() && cfg!(target_arch = "x86_64");
            if perl {
                expected.push_str(
                    "clone-newuser: Operation not permitted\nclone3: Function not implemented\n",
                );
            }
            lines.sort_by_key(|l| {
                [
                    "NoNewPrivs",
                    "Seccomp",
                    "CapEff",
                    "CapBnd",
                    "CapAmb",
                    "clone-",
                    "clone3",
                ]
                .iter()
                .position(|p| l.starts_with(p))
            });
            let mut want: Vec<&str> = expected.lines().collect();
            want.sort_by_key(|l| {
                [
                    "NoNewPrivs",
                    "Seccomp",
                    "CapEff",
                    "CapBnd",
                    "CapAmb",
                    "clone-",
                    "clone3",
                ]
                .iter()
                .position(|p| l.starts_with(p))
            });
            assert_eq!(lines, want, "[{}] {out:?}", tag(sb));
        }
    }

    /// A minimal root: busybox-static as /bin/busybox and /bin/sh.
    fn busybox_root(dir: &Path) -> bool {
        let busybox = Path::new("/usr/bin/busybox");
        if !busybox.exists() {
            return false;
        }
        fs::create_dir_all(dir.join("bin")).unwrap();
        fs::copy(busybox, dir.join("bin/busybox")).unwrap();
        std::os::unix::fs::symlink("busybox", dir.join("bin/sh")).unwrap();
        fs::write(dir.join("marker"), "from-rootfs\n").unwrap();
        true
    }

    #[tokio::test]
    async fn rootfs_directory_and_cached_tarball() {
        let src = tempfile::tempdir().unwrap();
        let root = src.path().join("root");
        if !busybox_root(&root) {
            eprintln!("busybox is not installed; rootfs test skipped");
            return;
        }
        let tarball = src.path().join("mini.tar.gz");
        let status = std::process::Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-czf")
            .arg(&tarball)
            .arg(".")
            .status()
            .unwrap();
        assert!(status.success());
        let argv = [
            "/bin/busybox",
            "sh",
            "-c",
            "busybox cat /marker; busybox test -e /usr/bin || echo no-usr; busybox id -u",
        ];
        for rt in runtimes() {
            let sb = &rt.sandbox;
            let dir = tempfile::tempdir().unwrap();

            let mut req = request(&dir, &argv);
            req.rootfs = Some(root.clone());
            let out = run(sb, req).await;
            assert_eq!(
                out.stdout,
                "from-rootfs\nno-usr\n65534\n",
                "[{}] {out:?}",
                tag(sb)
            );

            let cache = sb.state_dir.join("rootfs");
            let cached = || -> Vec<PathBuf> {
                let mut v: Vec<PathBuf> = fs::read_dir(&cache)
                    .unwrap()
                    .map(|e| e.unwrap().path())
                    .collect();
                v.sort();
                v
            };
            assert!(cached().is_empty());
            let mut req = request(&dir, &argv);
            req.rootfs = Some(tarball.clone());
            let out = run(sb, req).await;
            assert_eq!(
                out.stdout,
                "from-rootfs\nno-usr\n65534\n",
                "[{}] {out:?}",
                tag(sb)
            );
            let first = cached();
            assert_eq!(first.len(), 1, "{first:?}");
            assert!(
                first[0]
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("mini-")
            );
            let inode = fs::metadata(&first[0]).unwrap().ino();

            // Second run: the extraction is reused.
            let mut req = request(&dir, &argv);
            req.rootfs = Some(tarball.clone());
            let out = run(sb, req).await;
            assert_eq!(out.status, ResultStatus::Succeeded);
            assert_eq!(cached(), first);
            assert_eq!(fs::metadata(&first[0]).unwrap().ino(), inode);

            // A changed tarball is extracted again.
            let file = fs::OpenOptions::new().append(true).open(&tarball).unwrap();
            file.set_modified(std::time::SystemTime::now() + Duration::from_secs(5))
                .unwrap();
            drop(file);
            let mut req = request(&dir, &argv);
            req.rootfs = Some(tarball.clone());
            let out = run(sb, req).await;
            assert_eq!(out.status, ResultStatus::Succeeded);
            assert_eq!(cached().len(), 2);
        }
    }

    #[tokio::test]
    async fn device_nodes_outside_the_allow_list_cannot_be_opened() {
        let src = tempfile::tempdir().unwrap();
        let root = src.path().join("root");
        if !busybox_root(&root) {
            eprintln!("busybox is not installed; device test skipped");
            return;
        }
        // /dev/fuse's numbers, world-writable: anyone may open /dev/fuse, so only the device
        // cgroup stands in the way (EPERM before any driver is looked up).
        nix::sys::stat::mknod(
            &root.join("fuse"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(10, 229),
        )
        .unwrap();
        fs::set_permissions(root.join("fuse"), fs::Permissions::from_mode(0o666)).unwrap();
        for rt in runtimes() {
            let sb = &rt.sandbox;
            let dir = tempfile::tempdir().unwrap();
            let mut req = request(
                &dir,
                &["/bin/busybox", "sh", "-c", "exec 3<>/fuse && echo opened"],
            );
            req.rootfs = Some(root.clone());
            let out = run(sb, req).await;
            assert_eq!(out.status, ResultStatus::Failed, "[{}] {out:?}", tag(sb));
            assert!(
                out.stderr.contains("Operation not permitted"),
                "[{}] {out:?}",
                tag(sb)
            );
        }
    }

    #[tokio::test]
    async fn setup_and_spawn_failures_are_errors() {
        let src = tempfile::tempdir().unwrap();
        let broken = src.path().join("broken");
        fs::create_dir_all(broken.join("work")).unwrap();
        // `/proc` cannot be mounted on a regular file.
        fs::write(broken.join("proc"), "not a directory").unwrap();
        for rt in runtimes() {
            let sb = &rt.sandbox;
            let dir = tempfile::tempdir().unwrap();

            let req = request(&dir, &["/nonexistent/paddock-no-such-program", "x"]);
            let name = sanitize_name(&format!("{}-1", req.task_id));
            let (result, _) = run_collect(sb, req, CancellationToken::new()).await;
            match result {
                Err(SandboxError::SpawnFailed { program, reason }) => {
                    assert_eq!(program, "/nonexistent/paddock-no-such-program");
                    assert!(!reason.is_empty());
                }
                other => panic!("[{}] expected SpawnFailed, got {other:?}", tag(sb)),
            }
            assert_clean(sb, &name);

            let mut req = request(&dir, &["/bin/true"]);
            req.rootfs = Some(broken.clone());
            let name = sanitize_name(&format!("{}-1", req.task_id));
            let (result, _) = run_collect(sb, req, CancellationToken::new()).await;
            let err = result.unwrap_err();
            assert_eq!(
                err.code(),
                ErrorCode::SandboxSetupFailed,
                "[{}] {err:?}",
                tag(sb)
            );
            assert_clean(sb, &name);

            let mut req = request(&dir, &["/bin/true"]);
            req.rootfs = Some(src.path().join("nothing-here.tar"));
            let (result, _) = run_collect(sb, req, CancellationToken::new()).await;
            assert!(matches!(result, Err(SandboxError::Setup(_))), "{result:?}");

            let (result, _) = run_collect(sb, request(&dir, &[]), CancellationToken::new()).await;
            assert!(matches!(result, Err(SandboxError::Invalid(_))));
        }
    }

    #[tokio::test]
    async fn a_task_exiting_128_plus_n_is_reported_as_signal_n() {
        for rt in runtimes() {
            let sb = &rt.sandbox;
            let dir = tempfile::tempdir().unwrap();
            let out = run(sb, sh(&dir, "sh -c 'kill -9 $$'")).await;
            assert_eq!(out.status, ResultStatus::Failed);
            assert_eq!(out.exit_code, None);
            assert_eq!(out.signal, Some(9), "[{}] {out:?}", tag(sb));
        }
    }

    // ---- no runtime needed ------------------------------------------------------------

    fn spec_json(network: NetworkMode, limits: Limits) -> serde_json::Value {
        let env = BTreeMap::from([("A".to_string(), "1".to_string())]);
        let argv = vec!["/bin/echo".to_string(), "hi".to_string()];
        let spec = build_spec(&SpecParams {
            argv: &argv,
            env: &env,
            root: Path::new("/b/rootfs"),
            host_dirs: &["usr".to_string(), "etc".to_string()],
            workdir: Path::new("/w/run-1"),
            network,
            limits,
            cgroups_path: "paddock-t-1",
            swap: true,
        })
        .unwrap();
        serde_json::to_value(&spec).unwrap()
    }

    #[test]
    fn spec_applies_the_policy() {
        let limits = Limits {
            memory_bytes: 64 * MIB,
            cpu_millis: 500,
            pids: 32,
        };
        let j = spec_json(NetworkMode::None, limits);
        assert_eq!(j["root"]["path"], "/b/rootfs");
        assert_eq!(j["root"]["readonly"], true);
        assert_eq!(j["hostname"], "paddock");
        let p = &j["process"];
        assert_eq!(p["args"], serde_json::json!(["/bin/echo", "hi"]));
        assert_eq!(p["env"], serde_json::json!(["A=1"]));
        assert_eq!(p["cwd"], "/work");
        assert_eq!(p["terminal"], false);
        assert_eq!(p["noNewPrivileges"], true);
        assert_eq!(p["user"]["uid"], 65534);
        assert_eq!(p["user"]["gid"], 65534);
        assert!(p["user"].get("additionalGids").is_none());
        for set in [
            "bounding",
            "effective",
            "inheritable",
            "permitted",
            "ambient",
        ] {
            assert_eq!(p["capabilities"][set], serde_json::json!([]), "{set}");
        }
        assert_eq!(
            p["rlimits"],
            serde_json::json!([
                {"type": "RLIMIT_NOFILE", "hard": 4096, "soft": 4096},
                {"type": "RLIMIT_CORE", "hard": 0, "soft": 0},
            ])
        );
        let mounts: Vec<(String, String)> = j["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["destination"].as_str().unwrap().to_string(),
                    m["options"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|o| o.as_str().unwrap())
                        .collect::<Vec<_>>()
                        .join(","),
                )
            })
            .collect();
        let dests: Vec<&str> = mounts.iter().map(|(d, _)| d.as_str()).collect();
        assert_eq!(
            dests,
            [
                "/proc", "/dev", "/dev/pts", "/dev/shm", "/usr", "/etc", "/tmp", "/work"
            ]
        );
        assert_eq!(mounts[4].1, "bind,ro,nosuid,nodev");
        assert_eq!(j["mounts"][4]["source"], "/usr");
        assert_eq!(j["mounts"][7]["source"], "/w/run-1");
        assert_eq!(mounts[7].1, "bind,rw,nosuid,nodev");
        assert_eq!(mounts[6].1, "nosuid,nodev,mode=1777");

        let l = &j["linux"];
        let ns: Vec<&str> = l["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(ns, ["pid", "ipc", "uts", "mount", "network"]);
        assert_eq!(l["cgroupsPath"], "paddock-t-1");
        let r = &l["resources"];
        assert_eq!(r["memory"]["limit"], 64 * MIB);
        assert_eq!(r["memory"]["swap"], 64 * MIB);
        assert_eq!(r["cpu"]["quota"], 50_000);
        assert_eq!(r["cpu"]["period"], 100_000);
        assert_eq!(r["pids"]["limit"], 32);
        assert_eq!(
            r["devices"],
            serde_json::json!([{"allow": false, "access": "rwm"}])
        );
        assert_eq!(
            l["maskedPaths"].as_array().unwrap().len(),
            MASKED_PATHS.len()
        );
        assert!(
            l["readonlyPaths"]
                .as_array()
                .unwrap()
                .contains(&serde_json::json!("/proc/sys"))
        );

        let s = &l["seccomp"];
        assert_eq!(s["defaultAction"], "SCMP_ACT_ALLOW");
        if cfg!(target_arch = "x86_64") {
            assert_eq!(
                s["architectures"],
                serde_json::json!(["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"])
            );
        }
        let rules = s["syscalls"].as_array().unwrap();
        assert_eq!(rules.len(), 2 + policy::CLONE_NAMESPACE_FLAGS.len());
        assert_eq!(rules[0]["action"], "SCMP_ACT_ERRNO");
        assert_eq!(rules[0]["errnoRet"], 1);
        assert_eq!(
            rules[0]["names"].as_array().unwrap().len(),
            policy::DENIED_SYSCALLS.len()
        );
        assert_eq!(rules[1]["names"], serde_json::json!(["clone3"]));
        assert_eq!(rules[1]["errnoRet"], 38);
        for (rule, flag) in rules[2..].iter().zip(policy::CLONE_NAMESPACE_FLAGS) {
            assert_eq!(rule["names"], serde_json::json!(["clone"]));
            assert_eq!(rule["errnoRet"], 1);
            assert_eq!(
                rule["args"],
                serde_json::json!([
                    {"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}
                ])
            );
        }
    }

    #[test]
    fn default_network_shares_the_host_namespace_and_zero_limits_are_unset() {
        let j = spec_json(
            NetworkMode::Default,
            Limits {
                memory_bytes: 0,
                cpu_millis: 0,
                pids: 0,
            },
        );
        let ns: Vec<&str> = j["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(ns, ["pid", "ipc", "uts", "mount"]);
        let r = &j["linux"]["resources"];
        assert!(r.get("memory").is_none() && r.get("cpu").is_none() && r.get("pids").is_none());
    }

    #[test]
    fn names_are_sanitised() {
        assert_eq!(sanitize_name("task/1 ü-2"), "task_1__-2");
        assert_eq!(sanitize_name(".hidden-1"), "_hidden-1");
        let long = sanitize_name(&"x".repeat(300));
        assert_eq!(long.len(), 96);
        assert_ne!(long, sanitize_name(&"x".repeat(301)));
    }

    #[test]
    fn runtime_log_errors_are_parsed() {
        let log = "{\"level\":\"warning\",\"msg\":\"meh\"}\n\
                   {\"msg\":\"executable file `/x` not found\",\"level\":\"error\",\"time\":\"t\"}\n\
                   not json\n\
                   {\"level\":\"error\",\"msg\":\"runc run failed: exec: \\\"/x\\\": no such file\"}\n";
        let errors = parse_runtime_errors(log);
        assert_eq!(errors.len(), 2);
        assert!(matches!(
            setup_error("/x", &errors),
            SandboxError::SpawnFailed { .. }
        ));
        assert!(matches!(
            setup_error("/y", &["mount failed".to_string()]),
            SandboxError::Setup(_)
        ));
        assert!(parse_runtime_errors("").is_empty());
    }

    #[test]
    fn exit_statuses_map_to_codes_and_signals() {
        let code = |c: i32| ExitStatus::from_raw(c << 8);
        assert_eq!(exit_of(code(0)), (Some(0), None));
        assert_eq!(exit_of(code(7)), (Some(7), None));
        assert_eq!(exit_of(code(128)), (Some(128), None));
        assert_eq!(exit_of(code(137)), (None, Some(9)));
        assert_eq!(exit_of(code(143)), (None, Some(15)));
        assert_eq!(exit_of(code(255)), (Some(255), None));
        assert_eq!(exit_of(ExitStatus::from_raw(9)), (None, Some(9)));
    }

    #[test]
    fn counters_and_sizes_are_parsed() {
        let oom = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(keyed_value(oom, "oom_kill"), Some(3));
        assert_eq!(keyed_value(oom, "oom"), None);
        assert_eq!(keyed_value("max 12\n", "max"), Some(12));
        assert_eq!(format_bytes(64 * MIB), "64 MiB");
        assert_eq!(format_bytes(1536 * 1024), "1536 KiB");
        assert_eq!(format_bytes(1000), "1000 bytes");
    }

    #[test]
    fn cgroup_layout_is_parsed() {
        let mountinfo = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 /docker/abc /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/uni\\040fied rw,relatime - cgroup2 cgroup2 rw";
        let proc_cgroup = "8:pids:/docker/abc/inner\n4:memory:/process_api/x\n1:cpu:/\n0::/\n";
        let layout = CgroupLayout::parse(mountinfo, proc_cgroup);
        assert_eq!(
            layout.v1("memory").unwrap().own,
            Path::new("/sys/fs/cgroup/memory/process_api/x")
        );
        assert_eq!(
            layout.v1("pids").unwrap().own,
            Path::new("/sys/fs/cgroup/pids/inner")
        );
        assert_eq!(
            layout.v1("cpu").unwrap().own,
            Path::new("/sys/fs/cgroup/cpu")
        );
        assert_eq!(
            layout.v2.as_ref().unwrap().mount,
            Path::new("/sys/fs/cgroup/uni fied")
        );
    }

    #[test]
    fn check_accepts_every_network_mode() {
        let sandbox = OciSandbox {
            runtime: PathBuf::from("/usr/bin/crun"),
            runtime_name: "crun".into(),
            runtime_version: "crun version 1.8.1".into(),
            kind: RuntimeKind::Crun,
            keep: false,
            state_dir: PathBuf::from("/nonexistent"),
            cgroups: CgroupLayout::default(),
        };
        assert_eq!(sandbox.name(), "oci");
        for mode in [None, Some(NetworkMode::None), Some(NetworkMode::Default)] {
            sandbox
                .check(&SandboxSpec {
                    network_mode: mode,
                    ..Default::default()
                })
                .unwrap();
        }
    }
}
