//! Group commit of task submissions.
//!
//! Each `POST .../tasks` (and `/tasks/run`) hands its task to one writer task, which stores
//! every submission waiting at that moment (up to [`paddock_store::INSERT_CHUNK`]) with one
//! multi-row `INSERT` — one statement and one commit for all of them. On SQLite the same
//! transaction claims the new work for this replica's agents
//! ([`crate::dispatcher::insert_and_claim`]: no wake-up of the dispatcher, and one commit
//! where an insert and a claim took two; with one writer the claim could not run beside the
//! next insert anyway). On PostgreSQL a batch whose every task has a free agent on this
//! replica is stored already dispatched to them ([`crate::dispatcher::insert_assigned`]:
//! one commit where an insert and a claim took two) and the dispatches follow the commit;
//! any other batch is inserted queued and wakes the dispatcher, which claims on another
//! connection while the next batch is inserted. One `TaskReady` per org of the batch goes to
//! the orgs' watchers and the other replicas. A lone submission goes through at once (no
//! timer, no added wait); under concurrent load the batches grow by themselves. A submission
//! is answered only after its row is committed, so the durability of a `202` is unchanged.
//!
//! If a batch fails, its tasks are stored one by one, so one bad row does not fail the others
//! and each caller sees its own error.

use std::collections::BTreeSet;

use paddock_store::{INSERT_CHUNK, NewTask};
use tokio::sync::{mpsc, oneshot};

use axum::http::StatusCode;
use paddock_proto::ErrorCode;

use crate::AppState;
use crate::bus;
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
    /// Held by whoever is writing submissions: the writer task for a batch, or a handler
    /// storing its lone submission itself ([`submit`]).
    slot: std::sync::Arc<tokio::sync::Mutex<()>>,
}

/// The writer's end, handed to [`run`].
pub(crate) struct Receiver(mpsc::Receiver<Pending>);

/// A new inserter and the receiver its writer task drains.
pub(crate) fn channel() -> (Inserter, Receiver) {
    let (tx, rx) = mpsc::channel(QUEUE);
    let slot = std::sync::Arc::new(tokio::sync::Mutex::new(()));
    (Inserter { tx, slot }, Receiver(rx))
}

/// Stores a submission and returns its id once committed. On SQLite, when nothing else is
/// being written or waiting, the handler stores it (and its claim) itself: no hand-off to
/// the writer task and back, each of which woke another worker thread (tokio schedules a
/// task woken from a task that came out of its LIFO slot through the shared queue).
/// Otherwise it joins the writer's next batch.
///
/// # Errors
/// As [`Inserter::insert`].
pub(crate) async fn submit(state: &AppState, mut task: NewTask) -> Result<String, ApiError> {
    let inserter = &state.inserter;
    // Named now: a dispatch may name it before its row is written.
    task.id.get_or_insert_with(paddock_store::new_task_id);
    if state.store.dialect() == paddock_store::Dialect::Sqlite
        && !state.shutdown.is_cancelled()
        && inserter.tx.capacity() == inserter.tx.max_capacity()
        && let Ok(slot) = inserter.slot.try_lock()
    {
        // The dispatch is written to the agent's socket before the commit, which is written
        // while the agent works; the caller is answered after the commit.
        let stored = crate::dispatcher::insert_and_claim(
            state,
            std::slice::from_ref(&task),
            crate::dispatcher::Hand::BeforeCommit,
        )
        .await;
        match stored {
            Ok((mut ids, _)) => {
                drop(slot);
                bus::publish_ready_dispatched(state, vec![task.org_id]).await;
                return ids
                    .pop()
                    .ok_or_else(|| ApiError::internal("an insert returned no id"));
            }
            // Dispatched, then the commit failed: the task may have started, so it is not
            // stored again under its id (a submit-and-wait chose it); the caller may retry.
            Err(e) if e.dispatched => {
                return Err(ApiError::internal(format_args!(
                    "a dispatched submission could not be stored: {}",
                    e.error
                )));
            }
            // Nothing stored: the writer's path stores it without the claims if it can
            // (a claim can fail where the insert would not, e.g. on an older corrupt row).
            Err(e) => tracing::debug!("insert with claims failed: {}", e.error),
        }
    }
    inserter.insert(task).await
}

impl Inserter {
    /// Stores a queued task (batched with concurrent submissions) and returns its id once it
    /// is committed (its dispatch follows at once, on the writer).
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
        let _slot = state.inserter.slot.lock().await;
        write(&state, std::mem::take(&mut batch)).await;
        batch.reserve(INSERT_CHUNK);
    }
}

async fn write(state: &AppState, batch: Vec<Pending>) {
    let (tasks, replies): (Vec<NewTask>, Vec<_>) =
        batch.into_iter().map(|p| (p.task, p.reply)).unzip();
    if state.store.dialect() == paddock_store::Dialect::Sqlite {
        // One writer: the batch and its dispatch to this replica's agents in one commit.
        match crate::dispatcher::insert_and_claim(
            state,
            &tasks,
            crate::dispatcher::Hand::AfterCommit,
        )
        .await
        {
            Ok((ids, claims)) => {
                // Answered before the dispatch: the agent session woken last is the one
                // this worker runs next (tokio's LIFO slot), so the dispatch is written on
                // this thread instead of waking another.
                for (reply, id) in replies.into_iter().zip(ids) {
                    let _ = reply.send(Ok(id));
                }
                if let Some(claims) = claims {
                    crate::dispatcher::deliver(state, claims);
                }
                let orgs: BTreeSet<String> = tasks.iter().map(|t| t.org_id.clone()).collect();
                bus::publish_ready_dispatched(state, orgs.into_iter().collect()).await;
                return;
            }
            // Nothing stored (nothing was dispatched: the claims are delivered after the
            // commit here): the general path below finds which tasks fail.
            Err(e) => tracing::debug!(
                tasks = tasks.len(),
                "insert with claims failed: {}",
                e.error
            ),
        }
    }
    if state.store.dialect() == paddock_store::Dialect::Postgres
        && let Some(done) = crate::dispatcher::insert_assigned(state, &tasks).await
    {
        match done {
            // Stored, and dispatched to this replica's free agents: one commit.
            Ok(assigned) => {
                for (reply, id) in replies.into_iter().zip(assigned.ids) {
                    let _ = reply.send(Ok(id));
                }
                let orgs: BTreeSet<String> = tasks.iter().map(|t| t.org_id.clone()).collect();
                let (queued, dispatched): (Vec<String>, Vec<String>) = orgs
                    .into_iter()
                    .partition(|o| assigned.queued_orgs.contains(o));
                bus::publish_ready_dispatched(state, dispatched).await;
                bus::publish_all(
                    state,
                    queued
                        .into_iter()
                        .map(|org| bus::BusEvent::TaskReady { org })
                        .collect(),
                )
                .await;
                return;
            }
            // Nothing stored: the general path below finds which tasks fail.
            Err(e) => tracing::debug!(tasks = tasks.len(), "assigned insert failed: {e}"),
        }
    }
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
    let orgs: BTreeSet<String> = tasks
        .iter()
        .zip(&results)
        .filter(|(_, r)| r.is_ok())
        .map(|(t, _)| t.org_id.clone())
        .collect();
    // Answered as soon as committed, before the dispatch (as above).
    for (reply, result) in replies.into_iter().zip(results) {
        // A caller that went away no longer needs its answer; the task is stored anyway.
        let _ = reply.send(result);
    }
    if state.store.dialect() == paddock_store::Dialect::Sqlite {
        // One writer: the claim could not run beside the next insert anyway, so this
        // replica's agents get the new work at once, without waking the dispatcher; the
        // orgs' watchers hear of it through the bus.
        crate::dispatcher::dispatch_now(state, orgs.clone()).await;
        bus::publish_ready_dispatched(state, orgs.into_iter().collect()).await;
    } else {
        // PostgreSQL: the dispatcher claims on its own connection while the next batch is
        // inserted on another.
        bus::publish_all(
            state,
            orgs.into_iter()
                .map(|org| bus::BusEvent::TaskReady { org })
                .collect(),
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use paddock_proto::{GatewayMessage, TaskSpec};
    use paddock_store::TaskState;

    use super::*;

    fn task(org: &str, id: Option<String>) -> NewTask {
        NewTask {
            id,
            org_id: org.to_string(),
            spec: serde_json::from_value::<TaskSpec>(serde_json::json!({"kind": "agent.noop"}))
                .unwrap_or_else(|e| panic!("spec: {e}")),
            max_attempts: 1,
            queue_deadline_at: paddock_proto::now_ms() + 60_000,
        }
    }

    /// Concurrent submissions are all stored, each with its own id; one that cannot be
    /// stored (its id is taken) fails alone, and the others of its batch are stored.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_submissions_are_stored_and_a_bad_one_fails_alone() {
        submissions_are_stored_and_a_bad_one_fails_alone(false).await;
    }

    /// The same through [`submit`], where a handler finding the writer idle stores its task
    /// itself and the others join batches.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn submit_stores_inline_or_batched_and_a_bad_one_fails_alone() {
        submissions_are_stored_and_a_bad_one_fails_alone(true).await;
    }

    async fn submissions_are_stored_and_a_bad_one_fails_alone(through_submit: bool) {
        let (_dir, gw) = crate::test_gateway(|_| {}).await;
        let state = gw.state().clone();
        let org = state
            .store
            .create_org("acme")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let taken = state
            .inserter
            .insert(task(&org.id, None))
            .await
            .unwrap_or_else(|e| panic!("{e:?}"));

        let mut calls = tokio::task::JoinSet::new();
        for i in 0..300 {
            let (state, org) = (state.clone(), org.id.clone());
            let id = (i == 150).then(|| taken.clone());
            calls.spawn(async move {
                let t = task(&org, id);
                let got = if through_submit {
                    submit(&state, t).await
                } else {
                    state.inserter.insert(t).await
                };
                (i, got)
            });
        }
        let mut ids = Vec::new();
        while let Some(joined) = calls.join_next().await {
            let (i, got) = joined.unwrap_or_else(|e| panic!("{e}"));
            match (i, got) {
                (150, Err(e)) => assert_eq!(e.code(), paddock_proto::ErrorCode::Internal),
                (150, Ok(id)) => panic!("a taken id was stored again as {id}"),
                (_, Ok(id)) => ids.push(id),
                (_, Err(e)) => panic!("submission {i} failed: {e:?}"),
            }
        }
        assert_eq!(ids.len(), 299);
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 299, "every submission has its own id");
        let queued = state
            .store
            .list_tasks(&org.id, Some(TaskState::Queued), 500)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(queued.len(), 300, "299 and the first one");
        gw.state().shutdown.cancel();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    /// A submission sent to a free agent before its row is written, whose insert then fails
    /// (its id is taken), is recalled at the agent (`cancel` after the `dispatch`, slot
    /// freed), answered `500` and not stored again: the row holding that id is left as it
    /// was. A good submission after it goes straight to the agent and is stored dispatched.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dispatched_submission_that_cannot_be_stored_is_recalled() {
        let (_dir, gw) = crate::test_gateway(|cfg| cfg.tick = Duration::from_secs(3600)).await;
        let state = gw.state().clone();
        let org = state
            .store
            .create_org("acme")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        // Queued for a tag the agent does not have: no round gives it to the agent.
        let mut gpu = task(&org.id, None);
        gpu.spec.selector = Some(paddock_proto::Selector {
            tag: Some("gpu".into()),
            group: None,
            instance: None,
        });
        let taken = state
            .inserter
            .insert(gpu)
            .await
            .unwrap_or_else(|e| panic!("{e:?}"));
        let (handle, mut rx) = state.hub.register(crate::hub::Registration {
            agent_id: "a1".into(),
            org_id: org.id.clone(),
            tags: vec![],
            kinds: vec!["agent.noop".into()],
            backends: vec![],
            max_in_flight: 2,
            instance: false,
        });
        let row = |id: String| {
            let state = state.clone();
            let org = org.id.clone();
            async move {
                state
                    .store
                    .get_task(&org, &id)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"))
                    .unwrap_or_else(|| panic!("no row {id}"))
            }
        };
        // As its first round would leave it, finding nothing it may take (no session woke
        // the dispatcher for it here, and the sweep is an hour away).
        handle.set_wants_more(false);
        let before = row(taken.clone()).await;
        assert_eq!(before.state, TaskState::Queued);

        let err = submit(&state, task(&org.id, Some(taken.clone())))
            .await
            .expect_err("a taken id cannot be stored");
        assert_eq!(err.code(), paddock_proto::ErrorCode::Internal);
        match rx.try_recv() {
            Ok(GatewayMessage::Dispatch(d)) => {
                assert_eq!((d.task_id.as_str(), d.attempt), (taken.as_str(), 1))
            }
            other => panic!("expected the dispatch first, got {other:?}"),
        }
        match rx.try_recv() {
            Ok(GatewayMessage::Cancel(c)) => {
                assert_eq!((c.task_id.as_str(), c.attempt), (taken.as_str(), 1))
            }
            other => panic!("expected its cancel, got {other:?}"),
        }
        assert_eq!(handle.free_slots(), 2, "the recalled slot is free again");
        assert_eq!(
            row(taken.clone()).await,
            before,
            "the row holding the id is untouched"
        );

        let id = submit(&state, task(&org.id, None))
            .await
            .unwrap_or_else(|e| panic!("{e:?}"));
        match rx.try_recv() {
            Ok(GatewayMessage::Dispatch(d)) => assert_eq!(d.task_id, id),
            other => panic!("expected the dispatch, got {other:?}"),
        }
        let stored = row(id).await;
        assert_eq!(stored.state, TaskState::Dispatched);
        assert_eq!(stored.agent_id.as_deref(), Some("a1"));
        assert_eq!(handle.free_slots(), 1);
        gw.state().shutdown.cancel();
    }
}
