//! The `process` backend: a namespaced process sandbox with no external runtime.
//!
//! Per run: a cgroup with the memory, CPU and pids limits (`sandbox::cgroup`), then the sandbox
//! init ([`init`]), forked by the backend's long-lived zygote (`paddock __sandbox-zygote`,
//! [`zygote`]) with fresh pipes for its stdio and supervised like the host backend's process
//! group (output caps, timeout, SIGTERM then SIGKILL). The init creates
//! mount, PID, IPC, UTS (and, for `networkMode: "none"`, network) namespaces, shows a
//! read-only view of the root with `/work` writable and a private `/tmp`, drops to an
//! unprivileged user, and applies rlimits, Landlock and seccomp ([`seccomp`]) before
//! executing the task. Afterwards the cgroup tells whether the OOM killer or the pids limit
//! struck, and everything left in it is killed. The outcome is returned then; removing the
//! cgroup and the run's status file is left to a background job (`sandbox::cleanup`,
//! awaited by [`Sandbox::settle`]). All runs mount their new root on one empty directory,
//! `<scratch>/root`, each in its own mount namespace, so a run creates no directory on the
//! host's file system besides its cgroups.

pub mod init;
mod seccomp;
pub mod zygote;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use paddock_proto::{ErrorCode, NetworkMode, ResultStatus, SandboxSpec};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::cgroup::{Cgroup, CgroupLayout, Counters, RunLayout};
use super::cleanup::Cleanups;
use super::policy;
use super::supervise::{Started, TaskIo, supervise_started};
use super::{BoxFuture, OutputChunk, RunOutcome, RunRequest, Sandbox, SandboxError, safe_name};

/// The `process` sandbox backend.
#[derive(Debug)]
pub struct ProcessSandbox {
    init_exe: PathBuf,
    layout: RunLayout,
    scratch: PathBuf,
    /// `<scratch>/root`: the empty directory every run mounts its new root on. Shared: each
    /// init mounts its tmpfs there in its own, private mount namespace.
    new_root: PathBuf,
    /// Removal of the runs' cgroups and status files, in the background.
    cleanups: Cleanups,
    /// The process that forks each run's init ([`zygote`]), started on the first run and
    /// again if it dies.
    zygote: std::sync::Mutex<Option<Arc<zygote::Zygote>>>,
}

impl ProcessSandbox {
    /// Backend name.
    pub const NAME: &'static str = "process";

    /// Checks the host can run it: root (to create namespaces and mount), usable cgroups,
    /// and the `paddock` executable that serves as the sandbox zygote. `scratch` holds the
    /// runs' mount point (shared) and status files (one per run); what an earlier agent left
    /// there is removed.
    ///
    /// # Errors
    /// Why the backend is unavailable.
    pub fn detect(init_exe: PathBuf, scratch: PathBuf) -> Result<ProcessSandbox, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("the process backend needs root (namespaces, mounts, cgroups)".into());
        }
        if !init_exe.is_file() {
            return Err(format!("sandbox init {} not found", init_exe.display()));
        }
        let layout = CgroupLayout::detect().run_layout()?;
        std::fs::create_dir_all(&scratch)
            .map_err(|e| format!("creating {}: {e}", scratch.display()))?;
        let new_root = scratch.join("root");
        if let Ok(entries) = std::fs::read_dir(&scratch) {
            for entry in entries.flatten() {
                let path = entry.path();
                if path == new_root {
                    continue;
                }
                let _ = if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
            }
        }
        std::fs::create_dir_all(&new_root)
            .map_err(|e| format!("creating {}: {e}", new_root.display()))?;
        Ok(ProcessSandbox {
            init_exe,
            layout,
            scratch,
            new_root,
            cleanups: Cleanups::default(),
            zygote: std::sync::Mutex::new(None),
        })
    }
}

impl Sandbox for ProcessSandbox {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn check(&self, _spec: &SandboxSpec) -> Result<(), SandboxError> {
        Ok(())
    }

    fn run<'a>(
        &'a self,
        req: RunRequest,
        output: mpsc::Sender<OutputChunk>,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, Result<RunOutcome, SandboxError>> {
        Box::pin(self.run_process(req, output, cancel))
    }

    fn settle(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.cleanups.settle())
    }
}

/// Kills what is left in the run's cgroup and removes it and the status file, also when the
/// run future is dropped: the kill at once, the removal in the background ([`Cleanups`]).
struct RunGuard {
    cgroup: Option<Cgroup>,
    status_file: PathBuf,
    cleanups: Cleanups,
}

impl RunGuard {
    /// Kills everything left in the cgroup, reads its counters, then hands the removal over.
    fn finish(&mut self) -> Counters {
        let cgroup = self.cgroup.take();
        let counters = match &cgroup {
            Some(cg) => {
                cg.kill_all();
                cg.counters()
            }
            None => Counters::default(),
        };
        let status_file = std::mem::take(&mut self.status_file);
        self.cleanups.spawn("process", move || {
            if let Some(cg) = cgroup {
                cg.remove();
            }
            if !status_file.as_os_str().is_empty() {
                let _ = std::fs::remove_file(&status_file);
            }
        });
        counters
    }
}

impl Drop for RunGuard {
    fn drop(&mut self) {
        if self.cgroup.is_some() || !self.status_file.as_os_str().is_empty() {
            let _ = self.finish();
        }
    }
}

/// What the init reported in the status file.
#[derive(Debug, Default, PartialEq, Eq)]
struct Reported {
    setup: Option<String>,
    spawn: Option<String>,
    exit: Option<i32>,
    signal: Option<i32>,
}

fn read_status(path: &Path) -> Reported {
    let mut r = Reported::default();
    for line in std::fs::read_to_string(path).unwrap_or_default().lines() {
        let (kind, rest) = line.split_once(' ').unwrap_or((line, ""));
        match kind {
            "setup" => r.setup = Some(rest.to_string()),
            "spawn" => r.spawn = Some(rest.to_string()),
            "exit" => r.exit = rest.parse().ok(),
            "signal" => r.signal = rest.parse().ok(),
            _ => {}
        }
    }
    r
}

fn sanitize(s: &str) -> String {
    safe_name(s, &['-'])
}

impl ProcessSandbox {
    /// The running zygote, started when there is none or it died.
    fn zygote(&self) -> Result<Arc<zygote::Zygote>, String> {
        let mut slot = self
            .zygote
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(z) = slot.as_ref().filter(|z| z.alive()) {
            return Ok(z.clone());
        }
        let z = Arc::new(
            zygote::Zygote::spawn(&self.init_exe)
                .map_err(|e| format!("starting the sandbox zygote: {e}"))?,
        );
        *slot = Some(z.clone());
        Ok(z)
    }

    /// Has the zygote start the run's init with fresh pipes for its stdio; returns it ready
    /// to supervise.
    async fn start(
        &self,
        spec: &init::InitSpec,
        req: &RunRequest,
        output: mpsc::Sender<OutputChunk>,
    ) -> Result<Started, String> {
        let pipe_err = |e: std::io::Error| format!("creating a pipe: {e}");
        let (stdin_tx, stdin_fd): (_, OwnedFd) = if req.stdin.is_some() {
            let (tx, rx) = tokio::net::unix::pipe::pipe().map_err(pipe_err)?;
            (Some(tx), rx.into_blocking_fd().map_err(pipe_err)?)
        } else {
            let null = std::fs::File::open("/dev/null").map_err(|e| format!("/dev/null: {e}"))?;
            (None, null.into())
        };
        let (out_tx, out_rx) = tokio::net::unix::pipe::pipe().map_err(pipe_err)?;
        let (err_tx, err_rx) = tokio::net::unix::pipe::pipe().map_err(pipe_err)?;
        let stdio = [
            stdin_fd,
            out_tx.into_blocking_fd().map_err(pipe_err)?,
            err_tx.into_blocking_fd().map_err(pipe_err)?,
        ];
        let started_at_ms = paddock_proto::now_ms();
        let run = self.zygote()?.start(spec, stdio).await?;
        Ok(Started {
            pgid: run.pid,
            exit: Box::pin(zygote::exit_status(run.exit)),
            io: TaskIo::start_pipes(
                stdin_tx,
                Some(out_rx),
                Some(err_rx),
                req.stdin.clone(),
                req.output_max_chars,
                output,
            ),
            started_at_ms,
        })
    }

    async fn run_process(
        &self,
        req: RunRequest,
        output: mpsc::Sender<OutputChunk>,
        cancel: CancellationToken,
    ) -> Result<RunOutcome, SandboxError> {
        let program = req.program()?.to_string();
        let id = sanitize(&format!("{}-{}", req.task_id, req.attempt));
        let status_file = self.scratch.join(format!("{id}.status"));
        match std::fs::remove_file(&status_file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(SandboxError::Setup(format!(
                    "removing {}: {e}",
                    status_file.display()
                )));
            }
        }
        let mut guard = RunGuard {
            cgroup: None,
            status_file: status_file.clone(),
            cleanups: self.cleanups.clone(),
        };
        nix::unistd::chown(
            &req.workdir,
            Some(nix::unistd::Uid::from_raw(policy::SANDBOX_UID)),
            Some(nix::unistd::Gid::from_raw(policy::SANDBOX_GID)),
        )
        .map_err(|e| SandboxError::Setup(format!("chown {}: {e}", req.workdir.display())))?;
        let cg = Cgroup::create(&self.layout, &id, &req.limits).map_err(SandboxError::Setup)?;
        let spec = init::InitSpec {
            argv: req.argv.clone(),
            env: req
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            rootfs: req.rootfs.clone().unwrap_or_else(|| PathBuf::from("/")),
            new_root: self.new_root.clone(),
            workdir: req.workdir.clone(),
            network_none: req.network == NetworkMode::None,
            cgroup_procs: cg.procs_files(),
            uid: policy::SANDBOX_UID,
            gid: policy::SANDBOX_GID,
            hostname: policy::SANDBOX_HOSTNAME.into(),
            status_file: status_file.clone(),
        };
        guard.cgroup = Some(cg);
        let limits = req.limits;
        let started =
            self.start(&spec, &req, output)
                .await
                .map_err(|reason| SandboxError::SpawnFailed {
                    program: program.clone(),
                    reason,
                })?;
        let mut outcome = supervise_started(started, &program, req, cancel).await?;

        // Whatever is still in the cgroup goes; then read what happened. The cgroup and the
        // status file are removed in the background.
        let reported = read_status(&status_file);
        let counters = guard.finish();
        if let Some(msg) = reported.setup {
            return Err(SandboxError::Setup(msg));
        }
        if let Some(msg) = reported.spawn {
            return Err(SandboxError::SpawnFailed {
                program,
                reason: msg,
            });
        }
        if let Some(sig) = reported.signal {
            outcome.exit_code = None;
            outcome.signal = Some(sig);
        } else if let Some(code) = reported.exit {
            outcome.exit_code = Some(code);
            outcome.signal = None;
        }
        if outcome.status == ResultStatus::Failed || outcome.status == ResultStatus::Succeeded {
            if counters.oom_kills > 0 {
                outcome.status = ResultStatus::Failed;
                outcome.error_code = Some(ErrorCode::MemoryLimitExceeded);
                outcome.error_message = Some(format!(
                    "killed by the OOM killer: over the {} MiB memory limit",
                    limits.memory_bytes / (1024 * 1024)
                ));
            } else if counters.pids_max > 0 && outcome.status == ResultStatus::Failed {
                outcome.error_code = Some(ErrorCode::PidsLimitExceeded);
                outcome.error_message = Some(format!(
                    "process limit of {} reached ({} forks refused)",
                    limits.pids, counters.pids_max
                ));
            }
        }
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_parse() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        std::fs::write(&p, "spawn cannot execute x: ENOENT\nexit 127\n").unwrap();
        let r = read_status(&p);
        assert_eq!(r.spawn.as_deref(), Some("cannot execute x: ENOENT"));
        assert_eq!(r.exit, Some(127));
        std::fs::write(&p, "signal 9\n").unwrap();
        assert_eq!(read_status(&p).signal, Some(9));
        assert_eq!(
            read_status(&dir.path().join("missing")),
            Reported::default()
        );
        assert_eq!(sanitize("a/b-1"), "a_b-1");
    }
}
