//! Talking to the engine: waiting for a container, its errors, its removal (also when the
//! run future is dropped, and again later when its creation is in doubt), and its attach
//! stream demultiplexed into two captures.

use std::pin::Pin;
use std::time::Duration;

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::errors::Error as DockerError;
use bollard::query_parameters::RemoveContainerOptionsBuilder;
use futures_util::StreamExt;
use paddock_proto::Stream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::super::output::{Capture, Captured, forward};
use super::super::supervise::drain_within;
use super::super::{OutputChunk, SandboxError};

/// When [`remove_eventually`] tries to remove a container whose creation is in doubt.
const REMOVAL_RETRY_DELAYS: &[Duration] = &[
    Duration::ZERO,
    Duration::from_secs(1),
    Duration::from_secs(5),
    Duration::from_secs(30),
];

/// The container's exit status, or why it is unknown.
pub(super) type WaitResult = Result<i64, String>;

/// Force-removes the container when dropped while armed, so that dropping the run future
/// mid-way leaves nothing behind.
pub(super) struct ContainerGuard {
    pub(super) docker: Docker,
    pub(super) name: String,
    pub(super) armed: bool,
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

/// A start failure: a program the runtime cannot execute is a spawn failure, anything else
/// a set-up failure.
pub(super) fn start_error(program: &str, err: &DockerError) -> SandboxError {
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
pub(super) fn status_of(err: &DockerError) -> Option<u16> {
    match err {
        DockerError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// The engine's message for an error response, else the error's text.
pub(super) fn server_message(err: &DockerError) -> String {
    match err {
        DockerError::DockerResponseServerError { message, .. } => message.trim().to_string(),
        other => other.to_string(),
    }
}

/// Waits for the container to stop and returns its exit status.
pub(super) async fn wait_exit(docker: Docker, name: String) -> WaitResult {
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
pub(super) enum Removal {
    Removed,
    NotFound,
    Failed,
}

/// Force-removes a container (with its anonymous volumes); "no such container" is not an
/// error.
pub(super) async fn remove_container(docker: &Docker, name: &str) -> Removal {
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
pub(super) async fn remove_eventually(docker: Docker, name: String) {
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
pub(super) async fn pump_output(
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

/// Waits for the output reader, at most the drain bound of [`drain_within`]; then stops it
/// and takes what it read.
pub(super) async fn drain_output(
    reader: JoinHandle<(Captured, Captured)>,
    io_stop: &CancellationToken,
    name: &str,
) -> (Captured, Captured) {
    drain_within(async { reader.await.unwrap_or_default() }, io_stop, || {
        tracing::warn!(
            container = %name,
            "docker sandbox: attach stream still open after the container stopped; giving up on it"
        );
    })
    .await
}
