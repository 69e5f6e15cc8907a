//! Supervision of a local process tree, shared by the backends that start one: `host` and
//! `process` run the task's process group through [`supervise`] (capped output capture,
//! stdin, the timeout, cancellation, SIGTERM then SIGKILL to the whole group after the
//! grace, and nothing left in the group at the end); `oci` starts its runtime the same way
//! and uses [`TaskIo`] and [`signal_group`] for it; `docker` feeds its attach stream with
//! [`spawn_stdin_writer`] and bounds its final read with [`drain_within`].

use std::future::Future;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use paddock_proto::{ResultStatus, Stream, now_ms};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::outcome::{Ending, captured_outcome};
use super::output::{Captured, capture_stream_until};
use super::{OutputChunk, RunOutcome, RunRequest, SandboxError};

/// How long the output pipes are still read after the process group was killed (or the
/// container exited). A process that left the group (`setsid`) may hold a pipe open; past
/// this bound the pipe is abandoned with whatever was read.
const PIPE_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);

/// Poll interval while waiting for the rest of the group to exit during the grace.
const GROUP_POLL_INTERVAL: Duration = Duration::from_millis(50);

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

/// The stdin writer and the output readers of a started child, and the token that stops
/// them: after the drain bound, or when this is dropped (the run future was dropped).
pub(crate) struct TaskIo {
    stop: CancellationToken,
    _stop_on_drop: DropGuard,
    stdin: Option<JoinHandle<()>>,
    stdout: Option<JoinHandle<Captured>>,
    stderr: Option<JoinHandle<Captured>>,
}

impl TaskIo {
    /// Starts writing `stdin` to the child's standard input (then closing it) and capturing
    /// its standard output and error, at most `max_chars` characters each, forwarding kept
    /// text to `output`.
    pub(crate) fn start(
        child: &mut Child,
        stdin: Option<String>,
        max_chars: usize,
        output: mpsc::Sender<OutputChunk>,
    ) -> TaskIo {
        TaskIo::start_pipes(
            child.stdin.take(),
            child.stdout.take(),
            child.stderr.take(),
            stdin,
            max_chars,
            output,
        )
    }

    /// [`TaskIo::start`] on pipes that were not made by a `Command` (the `process`
    /// backend's zygote starts its runs itself).
    pub(crate) fn start_pipes<W, R1, R2>(
        stdin_pipe: Option<W>,
        stdout: Option<R1>,
        stderr: Option<R2>,
        stdin: Option<String>,
        max_chars: usize,
        output: mpsc::Sender<OutputChunk>,
    ) -> TaskIo
    where
        W: AsyncWrite + Unpin + Send + 'static,
        R1: AsyncRead + Unpin + Send + 'static,
        R2: AsyncRead + Unpin + Send + 'static,
    {
        let stop = CancellationToken::new();
        let stop_on_drop = stop.clone().drop_guard();
        let stdin = match (stdin_pipe, stdin) {
            (Some(pipe), Some(data)) => Some(spawn_stdin_writer(pipe, data, stop.clone())),
            _ => None,
        };
        let stdout =
            stdout.map(|pipe| spawn_capture(pipe, Stream::Stdout, max_chars, &output, &stop));
        let stderr =
            stderr.map(|pipe| spawn_capture(pipe, Stream::Stderr, max_chars, &output, &stop));
        TaskIo {
            stop,
            _stop_on_drop: stop_on_drop,
            stdin,
            stdout,
            stderr,
        }
    }

    /// Waits for both readers, at most [`PIPE_DRAIN_TIMEOUT`] (then `on_overrun` is called
    /// and they are stopped), stops the stdin writer, and returns what was captured.
    pub(crate) async fn finish(self, on_overrun: impl FnOnce()) -> (Captured, Captured) {
        let TaskIo {
            stop,
            _stop_on_drop,
            stdin,
            stdout,
            stderr,
        } = self;
        let joined = async { tokio::join!(captured(stdout), captured(stderr)) };
        let captured = drain_within(joined, &stop, on_overrun).await;
        if let Some(task) = stdin {
            task.abort();
        }
        captured
    }
}

/// What a reader captured (nothing when there was no pipe or the reader panicked).
async fn captured(reader: Option<JoinHandle<Captured>>) -> Captured {
    match reader {
        Some(task) => task.await.unwrap_or_default(),
        None => Captured::default(),
    }
}

/// Captures one output pipe until EOF or `stop` (see [`capture_stream_until`]).
fn spawn_capture<R>(
    pipe: R,
    stream: Stream,
    max_chars: usize,
    output: &mpsc::Sender<OutputChunk>,
    stop: &CancellationToken,
) -> JoinHandle<Captured>
where
    R: AsyncRead + Unpin + Send + 'static,
{
    tokio::spawn(capture_stream_until(
        pipe,
        stream,
        max_chars,
        output.clone(),
        stop.clone(),
    ))
}

/// Writes `data` to `pipe` and closes it, unless `stop` fires first. Errors (EPIPE when the
/// task does not read) are not the task's failure; closing the pipe is all that matters.
pub(crate) fn spawn_stdin_writer<W>(
    mut pipe: W,
    data: String,
    stop: CancellationToken,
) -> JoinHandle<()>
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        tokio::select! {
            () = stop.cancelled() => {}
            _ = async {
                pipe.write_all(data.as_bytes()).await?;
                pipe.shutdown().await
            } => {}
        }
    })
}

/// Awaits `readers`, at most [`PIPE_DRAIN_TIMEOUT`]; past that, calls `on_overrun`, fires
/// `stop` (the readers then return what they have) and awaits them again.
pub(crate) async fn drain_within<T>(
    readers: impl Future<Output = T>,
    stop: &CancellationToken,
    on_overrun: impl FnOnce(),
) -> T {
    tokio::pin!(readers);
    tokio::select! {
        captured = &mut readers => captured,
        () = tokio::time::sleep(PIPE_DRAIN_TIMEOUT) => {
            on_overrun();
            stop.cancel();
            readers.await
        }
    }
}

/// A started process tree to supervise: its process group (led by the main process), the
/// future of the main process's exit status, and its I/O already being captured.
pub(crate) struct Started {
    /// Process group id (the pid of the main process, which leads the group).
    pub(crate) pgid: Pid,
    /// Resolves when the main process exits. Polled again after a timeout, so boxed.
    pub(crate) exit: ExitFuture,
    /// The stdin writer and output readers.
    pub(crate) io: TaskIo,
    /// When it was started (ms since the epoch).
    pub(crate) started_at_ms: i64,
}

/// The exit status of a started main process.
pub(crate) type ExitFuture =
    std::pin::Pin<Box<dyn Future<Output = io::Result<ExitStatus>> + Send + 'static>>;

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
    let started_at_ms = now_ms();
    let mut child = cmd.spawn().map_err(|err| SandboxError::SpawnFailed {
        program: program.to_string(),
        reason: err.to_string(),
    })?;
    let Some(pgid) = child.id().and_then(|pid| i32::try_from(pid).ok()) else {
        // Only possible if the child was already reaped, which it cannot have been.
        return Err(SandboxError::SpawnFailed {
            program: program.to_string(),
            reason: "the started process has no pid".into(),
        });
    };
    let io = TaskIo::start(&mut child, req.stdin.clone(), req.output_max_chars, output);
    let started = Started {
        pgid: Pid::from_raw(pgid),
        exit: Box::pin(async move { child.wait().await }),
        io,
        started_at_ms,
    };
    supervise_started(started, program, req, cancel).await
}

/// Supervises a process tree already started as its own process group (see [`supervise`]).
/// Dropping the future SIGKILLs the group.
pub(crate) async fn supervise_started(
    started: Started,
    program: &str,
    req: RunRequest,
    cancel: CancellationToken,
) -> Result<RunOutcome, SandboxError> {
    let Started {
        pgid,
        mut exit,
        io,
        started_at_ms,
    } = started;
    let mut group = GroupGuard { pgid, armed: true };
    tracing::debug!(
        task_id = %req.task_id,
        attempt = req.attempt,
        pid = pgid.as_raw(),
        program = %program,
        "sandbox: process started"
    );

    let (ending, exited) = Ending::race(&mut exit, req.timeout, &cancel).await;
    let status = match exited {
        Some(status) => status,
        None => {
            tracing::debug!(
                task_id = %req.task_id,
                ending = ?ending,
                "sandbox: terminating process group"
            );
            terminate(&mut exit, pgid, req.kill_grace).await
        }
    };

    // Whatever the task left running in its group goes now; this also lets the pipe
    // readers reach EOF.
    signal_group(pgid, Signal::SIGKILL);
    group.armed = false;

    let (stdout, stderr) = io
        .finish(|| {
            tracing::warn!(
                task_id = %req.task_id,
                "sandbox: output pipe still open after the process group was killed \
                 (a process escaped the group?); giving up on it"
            );
        })
        .await;

    let mut outcome = captured_outcome(stdout, stderr, started_at_ms, now_ms());
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
        stopped => stopped.mark_stopped(&mut outcome, req.timeout, ""),
    }
    Ok(outcome)
}

/// SIGTERM to the group; waits up to `grace` for the main process and then for the rest
/// of the group to exit; SIGKILL to the group. Returns the main process's exit status.
async fn terminate(exit: &mut ExitFuture, pgid: Pid, grace: Duration) -> io::Result<ExitStatus> {
    signal_group(pgid, Signal::SIGTERM);
    let now = Instant::now();
    let deadline = now
        .checked_add(grace)
        .unwrap_or(now + Duration::from_secs(86_400));
    let status = tokio::time::timeout_at(deadline, &mut *exit).await.ok();
    if status.is_some() {
        // The main process is gone; give the rest of the group what is left of the grace.
        while group_exists(pgid) && Instant::now() < deadline {
            tokio::time::sleep(GROUP_POLL_INTERVAL).await;
        }
    }
    signal_group(pgid, Signal::SIGKILL);
    match status {
        Some(status) => status,
        None => exit.await,
    }
}

/// Sends `signal` to the process group, ignoring errors (ESRCH: the group is empty).
pub(crate) fn signal_group(pgid: Pid, signal: Signal) {
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
