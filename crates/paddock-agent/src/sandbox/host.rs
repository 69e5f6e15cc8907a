//! The `host` backend: runs the task as a plain child process of the agent, in its own
//! process group, with exactly the environment and work directory the runner prepared.
//!
//! It isolates nothing beyond that (same user, same network, same filesystem), which is
//! why it refuses `networkMode: "none"`. What it does guarantee: output is capped, the
//! timeout and cancellation kill the whole process group (SIGTERM, then SIGKILL after the
//! grace), and nothing left in the group survives the end of the run.

use paddock_proto::{NetworkMode, SandboxSpec};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::supervise::supervise;
use super::{BoxFuture, OutputChunk, RunOutcome, RunRequest, Sandbox, SandboxError};

/// The `host` sandbox backend.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostSandbox;

impl HostSandbox {
    /// Backend name.
    pub const NAME: &'static str = "host";

    /// A host backend.
    pub fn new() -> Self {
        HostSandbox
    }
}

impl Sandbox for HostSandbox {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn workdir_inside(&self) -> Option<&'static str> {
        None
    }

    fn check(&self, spec: &SandboxSpec) -> Result<(), SandboxError> {
        if spec.network_mode == Some(NetworkMode::None) {
            return Err(SandboxError::NetworkModeUnsupported {
                backend: Self::NAME,
            });
        }
        Ok(())
    }

    fn run<'a>(
        &'a self,
        req: RunRequest,
        output: mpsc::Sender<OutputChunk>,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, Result<RunOutcome, SandboxError>> {
        Box::pin(run_host(req, output, cancel))
    }
}

async fn run_host(
    req: RunRequest,
    output: mpsc::Sender<OutputChunk>,
    cancel: CancellationToken,
) -> Result<RunOutcome, SandboxError> {
    if req.network == NetworkMode::None {
        return Err(SandboxError::NetworkModeUnsupported {
            backend: HostSandbox::NAME,
        });
    }
    let program = req.program()?.to_string();
    // Resolved here against the task's own PATH, so that the standard library can start it
    // with posix_spawn (vfork) instead of a full fork of the agent: it falls back to fork
    // when a bare name must be looked up in a PATH given in the child's environment.
    let mut cmd = Command::new(resolve_program(&program, req.env.get("PATH")));
    cmd.args(&req.argv[1..])
        .env_clear()
        .envs(&req.env)
        .current_dir(&req.workdir);
    supervise(cmd, &program, req, output, cancel).await
}

/// `program` as a path: itself when it contains a slash, else the first executable file of
/// that name in `path` (default `/usr/bin:/bin`); itself when none is found, so that
/// spawning reports the usual "not found".
fn resolve_program(program: &str, path: Option<&String>) -> std::path::PathBuf {
    if program.contains('/') {
        return program.into();
    }
    super::find_in_path(program, path.map(String::as_str)).unwrap_or_else(|| program.into())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    #[test]
    fn programs_resolve_against_the_tasks_path() {
        use super::resolve_program;
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("tool");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, "").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = format!("/nonexistent::{}", dir.path().display());
        assert_eq!(resolve_program("tool", Some(&path)), exe);
        // Not executable, or absent: left as given (spawn reports it).
        assert_eq!(
            resolve_program("plain", Some(&path)).to_str(),
            Some("plain")
        );
        assert_eq!(resolve_program("nope", Some(&path)).to_str(), Some("nope"));
        assert_eq!(resolve_program("./x", Some(&path)).to_str(), Some("./x"));
        assert_eq!(
            resolve_program("sh", None),
            std::path::PathBuf::from("/usr/bin/sh")
        );
    }

    use std::time::Duration;
    use std::time::Instant as StdInstant;

    use nix::sys::signal::Signal;
    use paddock_proto::{ErrorCode, ResultStatus, Stream};

    use super::*;
    use crate::sandbox::testing::{self, PATH, live};

    fn request(dir: &tempfile::TempDir, argv: &[&str]) -> RunRequest {
        RunRequest {
            timeout: Duration::from_secs(20),
            ..testing::request("t-test".into(), dir.path(), argv)
        }
    }

    /// Runs `req` with a receiver that collects the forwarded chunks.
    async fn run_collect(
        req: RunRequest,
        cancel: CancellationToken,
    ) -> (Result<RunOutcome, SandboxError>, Vec<OutputChunk>) {
        testing::run_collect(&HostSandbox::new(), req, cancel).await
    }

    async fn run(req: RunRequest) -> RunOutcome {
        run_collect(req, CancellationToken::new()).await.0.unwrap()
    }

    /// Whether `pid` is gone (or a zombie), polling for up to 2 s.
    async fn pid_gone(pid: i32) -> bool {
        let deadline = StdInstant::now() + Duration::from_secs(2);
        loop {
            match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                Err(_) => return true,
                Ok(stat) => {
                    let state = stat
                        .rsplit_once(')')
                        .and_then(|(_, rest)| rest.trim_start().chars().next());
                    if matches!(state, Some('Z' | 'X')) {
                        return true;
                    }
                }
            }
            if StdInstant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn first_pid(stdout: &str) -> i32 {
        stdout.lines().next().unwrap().trim().parse().unwrap()
    }

    #[tokio::test]
    async fn captures_stdout_and_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let req = request(&dir, &["/bin/sh", "-c", "echo out; echo err >&2; echo ünï"]);
        let (result, chunks) = run_collect(req, CancellationToken::new()).await;
        let out = result.unwrap();
        assert_eq!(out.status, ResultStatus::Succeeded);
        assert_eq!(out.exit_code, Some(0));
        assert_eq!(out.signal, None);
        assert_eq!(out.error_code, None);
        assert_eq!(out.stdout, "out\nünï\n");
        assert_eq!(out.stderr, "err\n");
        assert!(!out.stdout_truncated && !out.stderr_truncated);
        assert!(out.started_at_ms > 0 && out.finished_at_ms >= out.started_at_ms);
        assert_eq!(live(&chunks, Stream::Stdout), out.stdout);
        assert_eq!(live(&chunks, Stream::Stderr), out.stderr);
    }

    #[tokio::test]
    async fn exit_code_is_propagated() {
        let dir = tempfile::tempdir().unwrap();
        let out = run(request(&dir, &["/bin/sh", "-c", "exit 7"])).await;
        assert_eq!(out.status, ResultStatus::Failed);
        assert_eq!(out.exit_code, Some(7));
        assert_eq!(out.signal, None);
        assert_eq!(out.error_code, None);
    }

    #[tokio::test]
    async fn death_by_signal_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let out = run(request(&dir, &["/bin/sh", "-c", "kill -9 $$"])).await;
        assert_eq!(out.status, ResultStatus::Failed);
        assert_eq!(out.exit_code, None);
        assert_eq!(out.signal, Some(9));
    }

    #[tokio::test]
    async fn environment_is_exactly_the_given_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut req = request(&dir, &["/usr/bin/env"]);
        req.env.insert("FOO".into(), "bar".into());
        let out = run(req).await;
        assert_eq!(out.status, ResultStatus::Succeeded);
        let mut lines: Vec<&str> = out.stdout.lines().collect();
        lines.sort_unstable();
        assert_eq!(lines, vec!["FOO=bar".to_string(), format!("PATH={PATH}")]);
    }

    #[tokio::test]
    async fn workdir_is_the_current_directory() {
        let dir = tempfile::tempdir().unwrap();
        let out = run(request(&dir, &["/bin/sh", "-c", "pwd -P"])).await;
        let expected = dir.path().canonicalize().unwrap();
        assert_eq!(out.stdout.trim_end(), expected.to_str().unwrap());
    }

    #[tokio::test]
    async fn stdin_is_delivered_then_closed() {
        let dir = tempfile::tempdir().unwrap();
        let mut req = request(&dir, &["cat"]);
        req.stdin = Some("hello\nwörld".into());
        let out = run(req).await;
        assert_eq!(out.status, ResultStatus::Succeeded);
        assert_eq!(out.stdout, "hello\nwörld");

        // Without stdin the process reads /dev/null (EOF at once).
        let out = run(request(&dir, &["cat"])).await;
        assert_eq!(out.status, ResultStatus::Succeeded);
        assert_eq!(out.stdout, "");
    }

    #[test]
    fn network_none_is_refused() {
        let host = HostSandbox::new();
        assert_eq!(host.name(), "host");
        let spec = SandboxSpec {
            network_mode: Some(NetworkMode::None),
            ..Default::default()
        };
        let err = host.check(&spec).unwrap_err();
        assert!(matches!(
            err,
            SandboxError::NetworkModeUnsupported { backend: "host" }
        ));
        assert_eq!(err.code(), ErrorCode::HostNetworkModeUnsupported);
        host.check(&SandboxSpec::default()).unwrap();
        host.check(&SandboxSpec {
            network_mode: Some(NetworkMode::Default),
            ..Default::default()
        })
        .unwrap();
    }

    #[tokio::test]
    async fn missing_program_is_a_spawn_failure() {
        let dir = tempfile::tempdir().unwrap();
        let req = request(&dir, &["/nonexistent/paddock-no-such-program", "x"]);
        let (result, _) = run_collect(req, CancellationToken::new()).await;
        let err = result.unwrap_err();
        assert_eq!(err.code(), ErrorCode::SpawnFailed);
        match err {
            SandboxError::SpawnFailed { program, reason } => {
                assert_eq!(program, "/nonexistent/paddock-no-such-program");
                assert!(!reason.is_empty());
            }
            other => panic!("expected SpawnFailed, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn empty_argv_is_invalid() {
        let dir = tempfile::tempdir().unwrap();
        let (result, _) = run_collect(request(&dir, &[]), CancellationToken::new()).await;
        assert!(matches!(result, Err(SandboxError::Invalid(_))));
    }

    #[tokio::test]
    async fn timeout_kills_the_process() {
        let dir = tempfile::tempdir().unwrap();
        let mut req = request(&dir, &["sleep", "30"]);
        req.timeout = Duration::from_secs(1);
        let start = StdInstant::now();
        let out = run(req).await;
        let elapsed = start.elapsed();
        assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
        assert!(elapsed >= Duration::from_secs(1));
        assert_eq!(out.status, ResultStatus::TimedOut);
        assert_eq!(out.error_code, Some(ErrorCode::TaskTimeout));
        assert_eq!(
            out.error_message.as_deref(),
            Some("killed after timeout of 1s")
        );
        assert_eq!(out.signal, Some(Signal::SIGTERM as i32));
    }

    #[tokio::test]
    async fn process_ignoring_sigterm_is_killed_after_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        // 1.5 s: the shell must have installed its trap before the timeout, even on a
        // loaded machine.
        let mut req = request(&dir, &["/bin/sh", "-c", "trap '' TERM; sleep 30"]);
        req.timeout = Duration::from_millis(1500);
        req.kill_grace = Duration::from_millis(700);
        let start = StdInstant::now();
        let out = run(req).await;
        let elapsed = start.elapsed();
        assert!(elapsed < Duration::from_secs(7), "took {elapsed:?}");
        assert!(elapsed >= Duration::from_millis(2200), "grace not honoured");
        assert_eq!(out.status, ResultStatus::TimedOut);
        assert_eq!(out.signal, Some(Signal::SIGKILL as i32));
        assert_eq!(
            out.error_message.as_deref(),
            Some("killed after timeout of 1500ms")
        );
    }

    #[tokio::test]
    async fn timeout_kills_grandchildren() {
        let dir = tempfile::tempdir().unwrap();
        let mut req = request(&dir, &["/bin/sh", "-c", "sleep 300 & echo $!; wait"]);
        // Long enough for the shell to print the pid on a loaded machine.
        req.timeout = Duration::from_millis(1500);
        let start = StdInstant::now();
        let out = run(req).await;
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(out.status, ResultStatus::TimedOut);
        let pid = first_pid(&out.stdout);
        assert!(pid_gone(pid).await, "grandchild {pid} survived");
    }

    #[tokio::test]
    async fn background_process_is_killed_after_normal_exit() {
        let dir = tempfile::tempdir().unwrap();
        let start = StdInstant::now();
        let out = run(request(&dir, &["/bin/sh", "-c", "sleep 300 & echo $!"])).await;
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(out.status, ResultStatus::Succeeded);
        let pid = first_pid(&out.stdout);
        assert!(pid_gone(pid).await, "background process {pid} survived");
    }

    #[tokio::test]
    async fn output_flood_is_capped_and_completes() {
        let dir = tempfile::tempdir().unwrap();
        let mut req = request(
            &dir,
            &["/bin/sh", "-c", "head -c 100000000 /dev/zero | tr '\\0' a"],
        );
        req.output_max_chars = 1000;
        req.timeout = Duration::from_secs(60);
        let (result, chunks) = run_collect(req, CancellationToken::new()).await;
        let out = result.unwrap();
        assert_eq!(out.status, ResultStatus::Succeeded);
        assert_eq!(out.stdout.len(), 1000);
        assert!(out.stdout.chars().all(|c| c == 'a'));
        assert!(out.stdout_truncated);
        assert!(!out.stderr_truncated);
        let live: usize = chunks.iter().map(|c| c.data.len()).sum();
        assert_eq!(live, 1000);
    }

    #[tokio::test]
    async fn cancel_stops_the_process() {
        let dir = tempfile::tempdir().unwrap();
        let cancel = CancellationToken::new();
        let trigger = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            trigger.cancel();
        });
        let start = StdInstant::now();
        let (result, _) = run_collect(request(&dir, &["sleep", "30"]), cancel).await;
        let out = result.unwrap();
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(out.status, ResultStatus::Canceled);
        assert_eq!(out.error_code, Some(ErrorCode::TaskCanceled));
    }
}
