//! How a run ends, shared by every backend: the race between the task's exit, the timeout
//! and cancellation; the outcome of a run that was stopped (`timed_out`/`TASK_TIMEOUT`,
//! `canceled`/`TASK_CANCELED`); the `128 + n` convention of container runtimes, tini and
//! shells for death by signal `n`; and the formatting of durations and sizes in messages.

use std::future::Future;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use paddock_proto::{ErrorCode, ResultStatus};
use tokio_util::sync::CancellationToken;

use super::RunOutcome;
use super::output::Captured;

/// How the wait for a run's main process (or container) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// It exited by itself.
    Exited,
    /// The timeout expired first.
    TimedOut,
    /// The run was canceled first.
    Canceled,
}

impl Ending {
    /// Waits for `exit`, the timeout or cancellation, whichever comes first. The output of
    /// `exit` is returned only when it came first.
    pub(crate) async fn race<T>(
        exit: impl Future<Output = T>,
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> (Ending, Option<T>) {
        tokio::select! {
            status = exit => (Ending::Exited, Some(status)),
            () = tokio::time::sleep(timeout) => (Ending::TimedOut, None),
            () = cancel.cancelled() => (Ending::Canceled, None),
        }
    }

    /// For a run that was stopped (timed out or canceled): sets its status, error code and
    /// message, with `note` appended to the message. An exited run is left to the backend,
    /// which alone knows how to judge its exit.
    pub(crate) fn mark_stopped(self, outcome: &mut RunOutcome, timeout: Duration, note: &str) {
        match self {
            Ending::Exited => {}
            Ending::TimedOut => {
                outcome.status = ResultStatus::TimedOut;
                outcome.error_code = Some(ErrorCode::TaskTimeout);
                outcome.error_message = Some(format!(
                    "killed after timeout of {}{note}",
                    format_duration(timeout)
                ));
            }
            Ending::Canceled => {
                outcome.status = ResultStatus::Canceled;
                outcome.error_code = Some(ErrorCode::TaskCanceled);
                outcome.error_message = Some(format!("canceled{note}"));
            }
        }
    }
}

/// The outcome of a run before its ending is judged: `failed`, no exit status, no error,
/// with the captured output.
pub(crate) fn captured_outcome(
    stdout: Captured,
    stderr: Captured,
    started_at_ms: i64,
    finished_at_ms: i64,
) -> RunOutcome {
    RunOutcome {
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
        finished_at_ms,
    }
}

/// Splits an exit status into (exit code, signal): 129..=192 is death by signal
/// status-128 (the convention of container runtimes, tini and the shells), so a task that
/// itself exits with such a status is reported the same way.
pub(crate) fn split_exit_status(status: i64) -> (Option<i32>, Option<i32>) {
    if (129..=192).contains(&status) {
        (None, i32::try_from(status - 128).ok())
    } else {
        (i32::try_from(status).ok(), None)
    }
}

/// [`split_exit_status`] of a process whose status is its child's (a container runtime); a
/// process that was itself killed by a signal reports that signal.
pub(crate) fn split_runtime_status(status: ExitStatus) -> (Option<i32>, Option<i32>) {
    match status.code() {
        Some(code) => split_exit_status(i64::from(code)),
        None => (None, status.signal()),
    }
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

/// `64 MiB`, `1536 KiB`, `1000 bytes`.
pub(crate) fn format_bytes(bytes: u64) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_formatted() {
        assert_eq!(format_duration(Duration::from_secs(2)), "2s");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn durations_and_sizes_are_formatted() {
        assert_eq!(format_duration(Duration::from_secs(2)), "2s");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_bytes(64 * 1_048_576), "64 MiB");
        assert_eq!(format_bytes(1000), "1000 bytes");
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
    fn exit_statuses_map_to_codes_and_signals() {
        let code = |c: i32| ExitStatus::from_raw(c << 8);
        assert_eq!(split_runtime_status(code(0)), (Some(0), None));
        assert_eq!(split_runtime_status(code(7)), (Some(7), None));
        assert_eq!(split_runtime_status(code(128)), (Some(128), None));
        assert_eq!(split_runtime_status(code(137)), (None, Some(9)));
        assert_eq!(split_runtime_status(code(143)), (None, Some(15)));
        assert_eq!(split_runtime_status(code(255)), (Some(255), None));
        assert_eq!(
            split_runtime_status(ExitStatus::from_raw(9)),
            (None, Some(9))
        );
    }
}
