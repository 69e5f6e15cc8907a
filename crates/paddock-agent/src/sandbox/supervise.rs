//! Supervision shared by the backends that run a local process (`host`, `process`): the
//! task's process group, capped output capture, stdin, the timeout, cancellation, SIGTERM
//! then SIGKILL to the whole group after the grace, and nothing left in the group at the end.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use paddock_proto::{ErrorCode, ResultStatus, Stream, now_ms};
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::output::{Captured, capture_stream_until};
use super::{OutputChunk, RunOutcome, RunRequest, SandboxError};

/// How long the output pipes are still read after the process group was killed. A
/// process that left the group (`setsid`) may hold a pipe open; past this bound the pipe
/// is abandoned with whatever was read.
const PIPE_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Poll interval while waiting for the rest of the group to exit during the grace.
const GROUP_POLL_INTERVAL: Duration = Duration::from_millis(50);

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

/// Runs a prepared command as the task's process group and supervises it: output capture
/// with caps, the timeout, cancellation, SIGTERM then SIGKILL to the whole group, and the
/// final kill of anything left in the group. `program` names the command in errors. The
/// command must not have been given stdio or a process group yet.
pub(crate) async fn supervise(
    mut cmd: Command,
    program: &str,
    req: RunRequest,
    output: mpsc::Sender<OutputChunk>,
    cancel: CancellationToken,
) -> Result<RunOutcome, SandboxError> {
    cmd.stdin(if req.stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .process_group(0)
    .kill_on_drop(true);
    let program = program.to_string();
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
        "sandbox: process started"
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
                "sandbox: terminating process group"
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
                "sandbox: output pipe still open after the process group was killed \
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
pub(crate) fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}
