//! The `oci` backend: runs each attempt as an OCI container through `crun` or `runc`.
//!
//! For every attempt a bundle is written under `<state_dir>/bundles/<task>-<attempt>/`: a
//! `config.json` built from [`policy`] (read-only root, fresh `/proc`, `/dev`, `/tmp`, the work
//! directory at `/work`, user `nobody`, no capabilities, `no_new_privs`, the seccomp deny
//! list, pid/ipc/uts/mount namespaces and a network namespace for `networkMode: "none"`) and
//! the request's limits as cgroup resources. Then `<runtime> run` runs it in the
//! foreground; its standard output and error are the task's.
//!
//! - **Root.** Without `rootfs` the root is an empty, read-only directory with the
//!   [`policy::root_entries`] of the host bound read-only (non-recursively) and the host's
//!   top-level symlinks (`/bin -> usr/bin`) recreated: `<state_dir>/hostview`, built once at
//!   start and shared by all runs (the runtimes only mount onto it, each in the container's
//!   own mount namespace, and the root is read-only inside). A `rootfs` directory is used as is
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
//! - **Timeout and cancellation.** `<runtime> kill --all <id> SIGTERM` (with an owned
//!   cgroup, below: the signal to every process of that cgroup but the runtime), up to
//!   `kill_grace`, then `SIGKILL`; as a last resort the runtime's own process group is killed. Note that
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
//!   removed after every run, after set-up failures, and when the run future is dropped.
//!   After a run they go in the background (`sandbox::cleanup`, awaited by
//!   [`Sandbox::settle`]), once the counters and the runtime's log have been read: `runc
//!   delete` alone takes 20-30 ms, and the result does not depend on it. The work directory belongs to the runner and is left alone (it is
//!   only chowned to the sandbox user before the start).
//!
//! Code: `spec` writes `config.json` (with the section of `seccomp`, which also gives the
//! `docker` backend its profile), `rootfs` builds the root, `runtime` finds, runs, stops
//! and cleans up after the runtime; the cgroups (owned or the runtime's) are those of the
//! shared `sandbox::cgroup`, and the runtime's output and stdin are handled by
//! `sandbox::supervise` as for the `host` and `process` backends.

mod rootfs;
mod runtime;
pub(super) mod seccomp;
mod spec;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use paddock_proto::{ErrorCode, NetworkMode, ResultStatus, SandboxSpec, now_ms};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use self::rootfs::{build_host_view, chown_tree, resolve_rootfs};
use self::runtime::{
    Cleanup, CleanupGuard, Killer, RuntimeInfo, RuntimeKind, clean_command, ensure_hugetlb_v1,
    probe, resolve_runtime, runtime_command_blocking, runtime_errors, setup_error,
};
use self::spec::{SpecParams, build_spec};
use super::cgroup::{Cgroup, CgroupLayout, Counters};
use super::cleanup::Cleanups;
use super::outcome::{Ending, captured_outcome, format_bytes, split_runtime_status};
use super::output::Captured;
use super::policy;
use super::supervise::{TaskIo, signal_group};
use super::{
    BoxFuture, Limits, OutputChunk, RunOutcome, RunRequest, Sandbox, SandboxError, safe_name,
};

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
    /// The host view (`<state_dir>/hostview`, built once at start and shared by every run
    /// without `rootfs`: the runtimes only mount onto it, in the container's own mount
    /// namespace) and the host directories to bind into it.
    host_view: (PathBuf, Vec<String>),
    /// Removal of the runs' containers, cgroups and bundles, in the background.
    cleanups: Cleanups,
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
        let RuntimeInfo {
            version,
            kind,
            name: runtime_name,
            keep,
        } = probe(&runtime)?;
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
        let mut sandbox = OciSandbox {
            runtime,
            runtime_name,
            runtime_version: version,
            kind,
            keep,
            host_view: (state_dir.join("hostview"), Vec::new()),
            state_dir,
            cgroups,
            cleanups: Cleanups::default(),
        };
        sandbox.sweep();
        let view = sandbox.host_view.0.clone();
        match fs::remove_dir_all(&view) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(format!("cannot remove {}: {err}", view.display())),
        }
        sandbox.host_view.1 = build_host_view(&view)
            .map_err(|err| format!("cannot build the root view {}: {err}", view.display()))?;
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
    fn owned_cgroups(&self, id: &str) -> Option<Cgroup> {
        self.owns_cgroups()
            .then(|| Cgroup::owned(&self.cgroups, id))
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
        let program = req.program()?.to_string();
        let name = sanitize_name(&format!("{}-{}", req.task_id, req.attempt));
        let run = Run {
            id: format!("paddock-{name}"),
            bundle: self.state_dir.join("bundles").join(&name),
        };
        let owned = self.owned_cgroups(&run.id);
        let global = self.global_args(owned.is_some());
        let mut cleanup = CleanupGuard {
            cleanups: self.cleanups.clone(),
            job: Some(Cleanup {
                runtime: self.runtime.clone(),
                global: global.clone(),
                state_root: self.state_root(),
                id: run.id.clone(),
                bundle: run.bundle.clone(),
                owned: owned.clone(),
            }),
        };

        // Bundle, root and cgroups (blocking file system work).
        let prepare = Prepare {
            runtime: self.runtime.clone(),
            global: global.clone(),
            state_root: self.state_root(),
            rootfs_cache: self.state_dir.join("rootfs"),
            id: run.id.clone(),
            bundle: run.bundle.clone(),
            argv: req.argv.clone(),
            env: req.env.clone(),
            workdir: req.workdir.clone(),
            rootfs: req.rootfs.clone(),
            host_view: self.host_view.clone(),
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
            let mut outcome = captured_outcome(Captured::default(), Captured::default(), now, now);
            Ending::Canceled.mark_stopped(&mut outcome, req.timeout, "");
            return Ok(outcome);
        }

        let mut cmd = self.run_command(&run, &global, owned.as_ref(), req.stdin.is_some());
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
            container = %run.id,
            runtime = %self.runtime_name,
            "oci sandbox: container starting"
        );

        let io = TaskIo::start(&mut child, req.stdin.clone(), req.output_max_chars, output);
        let (ending, exited) = Ending::race(child.wait(), req.timeout, &cancel).await;
        let status = match exited {
            Some(status) => status,
            None => {
                tracing::debug!(
                    task_id = %req.task_id,
                    container = %run.id,
                    ending = ?ending,
                    "oci sandbox: terminating container"
                );
                let killer = Killer {
                    runtime: &self.runtime,
                    global: &global,
                    id: &run.id,
                    owned: owned.as_ref(),
                    run_pid,
                };
                killer.terminate(&mut child, req.kill_grace).await
            }
        };
        // Anything the runtime left in its own group (not the container: its pid namespace
        // died with its init).
        signal_group(run_pid, Signal::SIGKILL);
        let (stdout, stderr) = io
            .finish(|| {
                tracing::warn!(
                    task_id = %req.task_id,
                    "oci sandbox: output pipe still open after the container exited; giving up on it"
                );
            })
            .await;

        // Counters and runtime errors are read before the container and bundle go (in the
        // background).
        let (counters, runtime_errors) = self.read_counters(&run, owned).await;
        if let Some(job) = cleanup.take() {
            self.cleanups.spawn("oci", move || job.run());
        }

        let (exit_code, signal) = match &status {
            Ok(status) => split_runtime_status(*status),
            Err(_) => (None, None),
        };
        if ending == Ending::Exited && exit_code != Some(0) && !runtime_errors.is_empty() {
            return Err(setup_error(&program, &runtime_errors));
        }

        let mut outcome = captured_outcome(stdout, stderr, started_at_ms, now_ms());
        outcome.exit_code = exit_code;
        outcome.signal = signal;
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
            stopped => {
                stopped.mark_stopped(
                    &mut outcome,
                    req.timeout,
                    &limits_note(counters, req.limits),
                );
            }
        }
        Ok(outcome)
    }

    /// `<runtime> run` of the prepared bundle, in the foreground, as its own process group;
    /// with owned cgroups, through a `/bin/sh` wrapper that joins them first.
    fn run_command(
        &self,
        run: &Run,
        global: &[OsString],
        owned: Option<&Cgroup>,
        stdin: bool,
    ) -> Command {
        let log = run.log();
        let mut cmd = match owned {
            Some(cgroups) => {
                let files = cgroups.procs_files();
                let mut cmd = clean_command("/bin/sh");
                cmd.arg("-c")
                    .arg(JOIN_CGROUPS_SCRIPT)
                    .arg("paddock-oci-join")
                    .arg(&log)
                    .arg(files.len().to_string())
                    .args(&files)
                    .arg(&self.runtime);
                cmd
            }
            None => clean_command(&self.runtime),
        };
        cmd.args(global)
            .arg("--log")
            .arg(&log)
            .arg("--log-format")
            .arg("json")
            .arg("run")
            .arg("--bundle")
            .arg(&run.bundle);
        if self.keep {
            cmd.arg("--keep");
        }
        cmd.arg(&run.id)
            .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut cmd = Command::from(cmd);
        cmd.process_group(0).kill_on_drop(true);
        cmd
    }

    /// After the runtime exited: the container's limit counters (from the owned cgroups, or
    /// from the runtime's cgroup while the container is kept) and the errors the runtime
    /// logged.
    async fn read_counters(&self, run: &Run, owned: Option<Cgroup>) -> (Counters, Vec<String>) {
        let cgroups = self.cgroups.clone();
        let id = run.id.clone();
        let log = run.log();
        tokio::task::spawn_blocking(move || {
            let counters = match &owned {
                Some(owned) => owned.counters(),
                None => Counters::read(
                    cgroups.container_dir("memory", &id).as_deref(),
                    cgroups.container_dir("pids", &id).as_deref(),
                    cgroups.counters_v2(),
                ),
            };
            let errors = runtime_errors(&log);
            (counters, errors)
        })
        .await
        .unwrap_or_default()
    }
}

/// Names of one run: the container id and its bundle directory.
struct Run {
    id: String,
    bundle: PathBuf,
}

impl Run {
    /// The runtime's JSON log, in the bundle.
    fn log(&self) -> PathBuf {
        self.bundle.join("runtime.log")
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

    fn settle(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.cleanups.settle())
    }
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

/// `[A-Za-z0-9_.-]` only (others become `_`); long names are cut and suffixed with a hash
/// of the whole name so they stay unique.
fn sanitize_name(raw: &str) -> String {
    const MAX: usize = 96;
    let clean = safe_name(raw, &['_', '.', '-']);
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
    host_view: (PathBuf, Vec<String>),
    network: NetworkMode,
    limits: Limits,
    swap: bool,
    owned: Option<Cgroup>,
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
                let (root, dirs) = self.host_view.clone();
                if !root.is_dir() {
                    return Err(format!("the root view {} is gone", root.display()));
                }
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
            cgroups.create_owned(self.limits)?;
        }
        Ok(())
    }
}
