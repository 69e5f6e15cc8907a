//! Group commit of task submissions.
//!
//! Each `POST .../tasks` (and `/tasks/run`) hands its task to one writer task, which stores
//! every submission waiting at that moment (up to [`paddock_store::INSERT_CHUNK`]) with one
//! multi-row `INSERT` — one statement and one commit for all of them — and then publishes one
//! `TaskReady` per org of the batch. A lone submission goes through at once (no timer, no
//! added wait); under concurrent load the batches grow by themselves. A submission is
//! answered only after its row is committed, so the durability of a `202` is unchanged.
//!
//! If a batch fails, its tasks are stored one by one, so one bad row does not fail the others
//! and each caller sees its own error.

use std::collections::BTreeSet;

use paddock_store::{INSERT_CHUNK, NewTask};
use tokio::sync::{mpsc, oneshot};

use axum::http::StatusCode;
use paddock_proto::ErrorCode;

use crate::AppState;
use crate::bus::{self, BusEvent};
use crate::error::ApiError;

/// Submissions waiting for the writer, at most; beyond, callers wait for room (backpressure).
const QUEUE: usize = 4096;

struct Pending {
    task: NewTask,
    reply: oneshot::Sender<Result<String, String>>,
}

/// The handle request handlers submit through.
#[derive(Debug, Clone)]
pub(crate) struct Inserter {
    tx: mpsc::Sender<Pending>,
}

/// The writer's end, handed to [`run`].
pub(crate) struct Receiver(mpsc::Receiver<Pending>);

/// A new inserter and the receiver its writer task drains.
pub(crate) fn channel() -> (Inserter, Receiver) {
    let (tx, rx) = mpsc::channel(QUEUE);
    (Inserter { tx }, Receiver(rx))
}

impl Inserter {
    /// Stores a queued task (batched with concurrent submissions) and returns its id once it
    /// is committed and its org's dispatchers are woken.
    ///
    /// # Errors
    /// `500 INTERNAL` (the database error is logged, not shown), or `503 UNAVAILABLE` when
    /// the gateway is shutting down.
    pub(crate) async fn insert(&self, task: NewTask) -> Result<String, ApiError> {
        let stopping = || {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unavailable,
                "the gateway is shutting down",
            )
        };
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Pending { task, reply })
            .await
            .map_err(|_| stopping())?;
        answer
            .await
            .map_err(|_| stopping())?
            .map_err(ApiError::internal)
    }
}

/// The writer: runs until shutdown (or until every [`Inserter`] is dropped).
pub(crate) async fn run(state: AppState, rx: Receiver) {
    let mut rx = rx.0;
    let mut batch: Vec<Pending> = Vec::with_capacity(INSERT_CHUNK);
    loop {
        let received = tokio::select! {
            n = rx.recv_many(&mut batch, INSERT_CHUNK) => n,
            () = state.shutdown.cancelled() => return,
        };
        if received == 0 {
            return;
        }
        write(&state, std::mem::take(&mut batch)).await;
        batch.reserve(INSERT_CHUNK);
    }
}

async fn write(state: &AppState, batch: Vec<Pending>) {
    let (tasks, replies): (Vec<NewTask>, Vec<_>) =
        batch.into_iter().map(|p| (p.task, p.reply)).unzip();
    let results: Vec<Result<String, String>> = match state.store.insert_tasks(&tasks).await {
        Ok(ids) => ids.into_iter().map(Ok).collect(),
        Err(e) if tasks.len() == 1 => vec![Err(e.to_string())],
        Err(e) => {
            tracing::warn!(
                tasks = tasks.len(),
                "batched insert failed ({e}); storing one by one"
            );
            let mut out = Vec::with_capacity(tasks.len());
            for t in &tasks {
                out.push(state.store.insert_task(t).await.map_err(|e| e.to_string()));
            }
            out
        }
    };
    let orgs: BTreeSet<&str> = tasks
        .iter()
        .zip(&results)
        .filter(|(_, r)| r.is_ok())
        .map(|(t, _)| t.org_id.as_str())
        .collect();
    bus::publish_all(
        state,
        orgs.into_iter()
            .map(|org| BusEvent::TaskReady {
                org: org.to_string(),
            })
            .collect(),
    )
    .await;
    for (reply, result) in replies.into_iter().zip(results) {
        // A caller that went away no longer needs its answer; the task is stored anyway.
        let _ = reply.send(result);
    }
}
