//! Helpers shared by the backends' tests.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use paddock_proto::{NetworkMode, Stream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Limits, OutputChunk, RunOutcome, RunRequest, Sandbox, SandboxError};

/// `PATH` of the test tasks.
pub(crate) const PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Attempt 1 of `argv` in `workdir` with only [`PATH`] in the environment, no stdin, a
/// 30 s timeout, a 1 s grace, the default network, 100 000 characters per stream, the
/// default limits and the host's root.
pub(crate) fn request(task_id: String, workdir: &Path, argv: &[&str]) -> RunRequest {
    RunRequest {
        task_id,
        attempt: 1,
        argv: argv.iter().map(|s| (*s).to_string()).collect(),
        env: BTreeMap::from([("PATH".to_string(), PATH.to_string())]),
        stdin: None,
        workdir: workdir.to_path_buf(),
        timeout: Duration::from_secs(30),
        kill_grace: Duration::from_secs(1),
        network: NetworkMode::Default,
        output_max_chars: 100_000,
        limits: Limits::default(),
        rootfs: None,
    }
}

/// Runs `req` on `sandbox` with a receiver that collects the forwarded chunks.
pub(crate) async fn run_collect(
    sandbox: &dyn Sandbox,
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

/// The text forwarded live on `stream`.
pub(crate) fn live(chunks: &[OutputChunk], stream: Stream) -> String {
    chunks
        .iter()
        .filter(|c| c.stream == stream)
        .map(|c| c.data.as_str())
        .collect()
}
