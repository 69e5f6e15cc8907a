//! The `host` backend: runs the task as a plain child process of the agent, in its own
//! process group, with exactly the environment and work directory the runner prepared.
//!
//! It isolates nothing beyond that (same user, same network, same filesystem), which is
//! why it refuses `networkMode: "none"`. What it does guarantee: output is capped, the
//! timeout and cancellation kill the whole process group (SIGTERM, then SIGKILL after the
//! grace), and nothing left in the group survives the end of the run.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use paddock_proto::{ErrorCode, NetworkMode, ResultStatus, SandboxSpec, Stream, now_ms};
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::output::{Captured, capture_stream_until};
use super::{BoxFuture, OutputChunk, RunOutcome, RunRequest, Sandbox, SandboxError};

/// How long the output pipes are still read after the process group was killed. A
/// process that left the group (`setsid`) may hold a pipe open; past this bound the pipe
/// is abandoned with whatever was read.
const PIPE_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Poll interval while waiting for the rest of the group to exit during the grace.
const GROUP_POLL_INTERVAL: Duration = Duration::from_millis(50);

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

/// How the wait for the main process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Exited,
    TimedOut,
    Canceled,
}

/// SIGKILLs the process group when dropped, so that dropping the run future mid-way
/// leaves nothing behind.
struct GroupGuard {
    pgid: Pid,
    armed: bool,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.armed {
            signal_group(self.pgid, Signal::SIGKILL);
        }
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
    let Some((program, args)) = req.argv.split_first() else {
        return Err(SandboxError::Invalid("argv is empty".into()));
    };

    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .envs(&req.env)
        .current_dir(&req.workdir)
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
    let mut child = cmd.spawn().map_err(|err| SandboxError::SpawnFailed {
        program: program.clone(),
        reason: err.to_string(),
    })?;
    let Some(pgid) = child.id().and_then(|pid| i32::try_from(pid).ok()) else {
        // Only possible if the child was already reaped, which it cannot have been.
        return Err(SandboxError::SpawnFailed {
            program: program.clone(),
            reason: "the started process has no pid".into(),
        });
    };
    let pgid = Pid::from_raw(pgid);
    let mut group = GroupGuard { pgid, armed: true };
    tracing::debug!(
        task_id = %req.task_id,
        attempt = req.attempt,
        pid = pgid.as_raw(),
        program = %program,
        "host sandbox: process started"
    );

    // Stops the pipe readers and the stdin writer: after the drain bound, or when this
    // future is dropped.
    let io_stop = CancellationToken::new();
    let _io_stop_on_drop = io_stop.clone().drop_guard();

    let stdin_task = match (child.stdin.take(), req.stdin) {
        (Some(mut pipe), Some(data)) => {
            let stop = io_stop.clone();
            Some(tokio::spawn(async move {
                tokio::select! {
                    () = stop.cancelled() => {}
                    // Errors (EPIPE when the process does not read) are not the task's
                    // failure; closing the pipe is all that matters.
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
                ending = ?ending,
                "host sandbox: terminating process group"
            );
            terminate(&mut child, pgid, req.kill_grace).await
        }
    };

    // Whatever the task left running in its group goes now; this also lets the pipe
    // readers reach EOF.
    signal_group(pgid, Signal::SIGKILL);
    group.armed = false;

    let (stdout, stderr) = drain_pipes(stdout_task, stderr_task, &io_stop, &req.task_id).await;
    if let Some(task) = stdin_task {
        task.abort();
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
        Ok(status) => {
            outcome.exit_code = status.code();
            outcome.signal = status.signal();
        }
        Err(err) => {
            outcome.error_message = Some(format!("waiting for the process failed: {err}"));
        }
    }
    match ending {
        Ending::Exited => {
            if matches!(&status, Ok(s) if s.success()) {
                outcome.status = ResultStatus::Succeeded;
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

/// SIGTERM to the group; waits up to `grace` for the main process and then for the rest
/// of the group to exit; SIGKILL to the group. Returns the main process's exit status.
async fn terminate(child: &mut Child, pgid: Pid, grace: Duration) -> io::Result<ExitStatus> {
    signal_group(pgid, Signal::SIGTERM);
    let now = Instant::now();
    let deadline = now
        .checked_add(grace)
        .unwrap_or(now + Duration::from_secs(86_400));
    let status = tokio::time::timeout_at(deadline, child.wait()).await.ok();
    if status.is_some() {
        // The main process is gone; give the rest of the group what is left of the grace.
        while group_exists(pgid) && Instant::now() < deadline {
            tokio::time::sleep(GROUP_POLL_INTERVAL).await;
        }
    }
    signal_group(pgid, Signal::SIGKILL);
    match status {
        Some(status) => status,
        None => child.wait().await,
    }
}

/// Waits for both readers, at most [`PIPE_DRAIN_TIMEOUT`]; then stops them and takes what
/// they read.
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
                "host sandbox: output pipe still open after the process group was killed \
                 (a process escaped the group?); giving up on it"
            );
            io_stop.cancel();
            join.await
        }
    }
}

/// Sends `signal` to the process group, ignoring errors (ESRCH: the group is empty).
fn signal_group(pgid: Pid, signal: Signal) {
    if let Err(err) = killpg(pgid, signal)
        && err != nix::errno::Errno::ESRCH
    {
        tracing::debug!(pgid = pgid.as_raw(), %signal, error = %err, "killpg failed");
    }
}

/// Whether any process (zombies included) is still in the group.
fn group_exists(pgid: Pid) -> bool {
    killpg(pgid, None).is_ok()
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Instant as StdInstant;

    use super::*;

    const PATH: &str = "/usr/local/bin:/usr/bin:/bin";

    fn request(dir: &tempfile::TempDir, argv: &[&str]) -> RunRequest {
        RunRequest {
            task_id: "t-test".into(),
            attempt: 1,
            argv: argv.iter().map(|s| (*s).to_string()).collect(),
            env: BTreeMap::from([("PATH".to_string(), PATH.to_string())]),
            stdin: None,
            workdir: dir.path().to_path_buf(),
            timeout: Duration::from_secs(20),
            kill_grace: Duration::from_secs(1),
            network: NetworkMode::Default,
            output_max_chars: 100_000,
            limits: crate::sandbox::Limits::default(),
            rootfs: None,
        }
    }

    /// Runs `req` with a receiver that collects the forwarded chunks.
    async fn run_collect(
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
        let result = HostSandbox::new().run(req, tx, cancel).await;
        let chunks = collector.await.unwrap();
        (result, chunks)
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
        let live = |s: Stream| -> String {
            chunks
                .iter()
                .filter(|c| c.stream == s)
                .map(|c| c.data.as_str())
                .collect()
        };
        assert_eq!(live(Stream::Stdout), out.stdout);
        assert_eq!(live(Stream::Stderr), out.stderr);
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
        let mut req = request(&dir, &["/bin/sh", "-c", "trap '' TERM; sleep 30"]);
        req.timeout = Duration::from_millis(300);
        req.kill_grace = Duration::from_millis(700);
        let start = StdInstant::now();
        let out = run(req).await;
        let elapsed = start.elapsed();
        assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
        assert!(elapsed >= Duration::from_millis(1000), "grace not honoured");
        assert_eq!(out.status, ResultStatus::TimedOut);
        assert_eq!(out.signal, Some(Signal::SIGKILL as i32));
        assert_eq!(
            out.error_message.as_deref(),
            Some("killed after timeout of 300ms")
        );
    }

    #[tokio::test]
    async fn timeout_kills_grandchildren() {
        let dir = tempfile::tempdir().unwrap();
        let mut req = request(&dir, &["/bin/sh", "-c", "sleep 300 & echo $!; wait"]);
        req.timeout = Duration::from_millis(500);
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

    #[test]
    fn durations_are_formatted() {
        assert_eq!(format_duration(Duration::from_secs(2)), "2s");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    }
}
