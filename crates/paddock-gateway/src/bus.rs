//! Events between gateway replicas. Locally they wake the dispatcher and waiters directly;
//! on PostgreSQL they also travel through `LISTEN/NOTIFY` on channel `paddock_events`, so a
//! task submitted to replica B wakes replica A that holds the eligible agent's connection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::AppState;

/// Channel name used with `NOTIFY`.
pub const CHANNEL: &str = "paddock_events";

/// A cross-replica event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "k", rename_all = "snake_case")]
pub enum BusEvent {
    /// New queued work for an org (or a slot freed): dispatchers should look.
    TaskReady {
        /// Org.
        org: String,
    },
    /// A task finished or produced output: waiters should re-read it.
    TaskChanged {
        /// Task id.
        task: String,
    },
    /// An agent was revoked: its holder closes the connection.
    AgentRevoked {
        /// Agent id.
        agent: String,
    },
    /// An API token was revoked: replicas forget it from their token cache.
    ApiTokenRevoked {
        /// Token id.
        token: String,
    },
    /// An agent's control-plane tags changed.
    AgentTags {
        /// Agent id.
        agent: String,
        /// New tags.
        tags: Vec<String>,
    },
    /// An instance changed status (pool supervisors watching the org wake up).
    InstanceChanged {
        /// Org.
        org: String,
        /// Its pool's id, if a pool member.
        pool: Option<String>,
    },
    /// Cancel a running attempt on whichever replica holds its agent.
    Cancel {
        /// Agent id.
        agent: String,
        /// Task id.
        task: String,
        /// Attempt.
        attempt: u32,
    },
}

/// A change watchers of an org care about: queued work (`pool: None`) or an instance of a
/// pool changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrgSignal {
    /// Org.
    pub org: String,
    /// Pool id, for instance changes of a pool member.
    pub pool: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    from: String,
    #[serde(flatten)]
    event: BusEvent,
}

/// Several events in one notification (`publish_all`).
#[derive(Debug, Serialize, Deserialize)]
struct Batch {
    from: String,
    events: Vec<BusEvent>,
}

/// What a notification holds: one event (the form older replicas send too) or a batch.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Incoming {
    Batch(Batch),
    One(Envelope),
}

/// Most events in one notification: PostgreSQL caps a payload at 8000 bytes, and the
/// largest event (`AgentTags` aside) is about 100.
const EVENTS_PER_NOTIFY: usize = 40;

/// Per-task wake-ups for long-polls and streams: [`Waiters::subscribe`] for every change
/// (dispatch, start, output, end: the event stream), [`Waiters::subscribe_changes`] for
/// state changes published on the bus (`TaskChanged`: a result stored, a cancel, a reap),
/// which is all a submit-and-wait needs, so it does not re-read the task on every chunk.
#[derive(Debug, Default)]
pub struct Waiters {
    all: Registry,
    changes: Registry,
    /// Rows of tasks finished on this replica that a submit-and-wait is waiting for, handed
    /// over so the waiter need not read them back.
    finished: Mutex<HashMap<String, paddock_store::TaskRow>>,
}

#[derive(Debug, Default)]
struct Registry {
    map: Mutex<HashMap<String, Weak<Notify>>>,
}

impl Registry {
    fn subscribe(&self, task_id: &str) -> Arc<Notify> {
        let mut map = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = map.get(task_id).and_then(Weak::upgrade) {
            return n;
        }
        if map.len() > 1024 {
            map.retain(|_, w| w.strong_count() > 0);
        }
        let n = Arc::new(Notify::new());
        map.insert(task_id.to_string(), Arc::downgrade(&n));
        n
    }

    fn is_subscribed(&self, task_id: &str) -> bool {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(task_id)
            .is_some_and(|w| w.strong_count() > 0)
    }

    fn notify(&self, task_id: &str) {
        let map = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = map.get(task_id).and_then(Weak::upgrade) {
            n.notify_waiters();
        }
    }
}

impl Waiters {
    /// A notifier for every change of a task; hold it while waiting.
    pub fn subscribe(&self, task_id: &str) -> Arc<Notify> {
        self.all.subscribe(task_id)
    }

    /// A notifier for a task's state changes published on the bus; hold it while waiting.
    pub fn subscribe_changes(&self, task_id: &str) -> Arc<Notify> {
        self.changes.subscribe(task_id)
    }

    /// Progress of a task (dispatched, started, output): wakes [`Waiters::subscribe`]rs.
    pub fn notify(&self, task_id: &str) {
        self.all.notify(task_id);
    }

    /// Keeps a finished task's row for its waiter, if one is subscribed to its changes.
    pub fn offer_finished(&self, row: paddock_store::TaskRow) {
        if self.changes.is_subscribed(&row.id) {
            let mut map = self
                .finished
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if map.len() > 1024 {
                // Waiters that gave up before taking theirs.
                map.retain(|id, _| self.changes.is_subscribed(id));
            }
            map.insert(row.id.clone(), row);
        }
    }

    /// The row [`Waiters::offer_finished`] kept for a task, once.
    pub fn take_finished(&self, task_id: &str) -> Option<paddock_store::TaskRow> {
        self.finished
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(task_id)
    }

    /// A state change (`TaskChanged`): wakes every subscriber.
    pub fn notify_changed(&self, task_id: &str) {
        self.all.notify(task_id);
        self.changes.notify(task_id);
    }
}

/// Applies an event on this replica.
pub(crate) fn apply_local(state: &AppState, event: &BusEvent) {
    match event {
        BusEvent::TaskReady { org } => {
            state.dispatch_wake.org(org);
            signal_queued(state, org);
        }
        BusEvent::InstanceChanged { org, pool } => {
            let _ = state.org_events.send(OrgSignal {
                org: org.clone(),
                pool: pool.clone(),
            });
        }
        BusEvent::TaskChanged { task } => state.waiters.notify_changed(task),
        BusEvent::AgentRevoked { agent } => {
            if let Some(h) = state.hub.get(agent) {
                h.close_with(
                    paddock_proto::ErrorCode::AgentRevoked,
                    "this agent has been revoked",
                );
            }
        }
        BusEvent::ApiTokenRevoked { token } => state.tokens.forget(token),
        BusEvent::AgentTags { agent, tags } => {
            if let Some(h) = state.hub.get(agent) {
                h.set_tags(tags.clone());
                state.dispatch_wake.notify_one();
            }
        }
        BusEvent::Cancel {
            agent,
            task,
            attempt,
        } => {
            if let Some(h) = state.hub.get(agent) {
                let _ = h.send(paddock_proto::GatewayMessage::Cancel(
                    paddock_proto::Cancel {
                        task_id: task.clone(),
                        attempt: *attempt,
                        reason: "canceled by request".into(),
                    },
                ));
            }
        }
    }
}

/// Tells the org's watchers (pool supervisors) that it has queued work.
fn signal_queued(state: &AppState, org: &str) {
    let _ = state.org_events.send(OrgSignal {
        org: org.to_string(),
        pool: None,
    });
}

/// `TaskReady` for orgs whose new tasks this replica has just offered to its own agents (the
/// submission's own claims, [`crate::dispatcher::insert_and_claim`], or its own round,
/// [`crate::dispatcher::dispatch_now`]): the local
/// dispatcher is not woken for them again; the org's watchers and the other replicas are.
pub(crate) async fn publish_ready_dispatched(state: &AppState, orgs: Vec<String>) {
    for org in &orgs {
        signal_queued(state, org);
    }
    let events: Vec<BusEvent> = orgs
        .into_iter()
        .map(|org| BusEvent::TaskReady { org })
        .collect();
    notify_others(state, &events).await;
}

/// Publishes an event: applied locally at once, and sent to other replicas on PostgreSQL.
pub(crate) async fn publish(state: &AppState, event: BusEvent) {
    publish_all(state, vec![event]).await;
}

/// Publishes events: each applied locally at once; on PostgreSQL sent to the other replicas
/// in as few notifications as fit (one query for up to [`EVENTS_PER_NOTIFY`]), not one per
/// event.
pub(crate) async fn publish_all(state: &AppState, events: Vec<BusEvent>) {
    for event in &events {
        apply_local(state, event);
    }
    notify_others(state, &events).await;
}

/// Sends events to the other replicas (PostgreSQL only), in as few notifications as fit.
async fn notify_others(state: &AppState, events: &[BusEvent]) {
    if state.store.dialect() != paddock_store::Dialect::Postgres || events.is_empty() {
        return;
    }
    let from = &state.cfg.replica_id;
    let mut payloads = Vec::new();
    if let [event] = events {
        payloads.push(serde_json::to_string(&Envelope {
            from: from.clone(),
            event: event.clone(),
        }));
    } else {
        for chunk in events.chunks(EVENTS_PER_NOTIFY) {
            payloads.push(serde_json::to_string(&Batch {
                from: from.clone(),
                events: chunk.to_vec(),
            }));
        }
    }
    for text in payloads {
        let text = text.unwrap_or_default();
        if let Err(e) = sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(text)
            .execute(state.store.pool())
            .await
        {
            tracing::warn!("pg_notify failed: {e}");
        }
    }
}

/// Listens for other replicas' events (PostgreSQL only) until shutdown. Reconnects on error.
pub(crate) async fn listen(state: AppState) {
    if state.store.dialect() != paddock_store::Dialect::Postgres {
        return;
    }
    loop {
        let mut listener = match sqlx::postgres::PgListener::connect(&state.cfg.database_url).await
        {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("LISTEN connection failed: {e}; retrying");
                tokio::select! {
                    () = tokio::time::sleep(std::time::Duration::from_secs(1)) => continue,
                    () = state.shutdown.cancelled() => return,
                }
            }
        };
        if let Err(e) = listener.listen(CHANNEL).await {
            tracing::warn!("LISTEN failed: {e}; retrying");
            continue;
        }
        // Anything missed while (re)connecting is picked up by the periodic sweeps.
        state.dispatch_wake.notify_one();
        loop {
            tokio::select! {
                msg = listener.recv() => match msg {
                    Ok(n) => match serde_json::from_str::<Incoming>(n.payload()) {
                        Ok(Incoming::One(env)) if env.from != state.cfg.replica_id => apply_local(&state, &env.event),
                        Ok(Incoming::Batch(b)) if b.from != state.cfg.replica_id => {
                            for event in &b.events {
                                apply_local(&state, event);
                            }
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!("ignoring malformed bus event: {e}"),
                    },
                    Err(e) => {
                        tracing::warn!("LISTEN connection lost: {e}; reconnecting");
                        break;
                    }
                },
                () = state.shutdown.cancelled() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_parse_as_one_event_or_a_batch() {
        let one = serde_json::to_string(&Envelope {
            from: "r1".into(),
            event: BusEvent::TaskReady { org: "o".into() },
        })
        .unwrap();
        match serde_json::from_str::<Incoming>(&one).unwrap() {
            Incoming::One(env) => {
                assert_eq!(
                    (env.from.as_str(), env.event),
                    ("r1", BusEvent::TaskReady { org: "o".into() })
                );
            }
            Incoming::Batch(_) => panic!("a single event parsed as a batch"),
        }
        // A full batch of the events sent in batches fits PostgreSQL's 8000-byte payload.
        let events: Vec<BusEvent> = (0..EVENTS_PER_NOTIFY)
            .map(|_| BusEvent::TaskChanged {
                task: uuid::Uuid::now_v7().to_string(),
            })
            .collect();
        let batch = serde_json::to_string(&Batch {
            from: uuid::Uuid::new_v4().to_string(),
            events: events.clone(),
        })
        .unwrap();
        assert!(batch.len() < 8000, "{} bytes", batch.len());
        match serde_json::from_str::<Incoming>(&batch).unwrap() {
            Incoming::Batch(b) => assert_eq!(b.events, events),
            Incoming::One(_) => panic!("a batch parsed as one event"),
        }
        assert!(serde_json::from_str::<Incoming>(r#"{"from":"r1","k":"nope"}"#).is_err());
    }
}
