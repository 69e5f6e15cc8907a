//! The agents connected to this replica: their declared capabilities, control-plane tags,
//! in-flight tasks, and the channel to their WebSocket session.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use paddock_proto::GatewayMessage;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// One live agent connection.
#[derive(Debug)]
pub struct AgentHandle {
    /// Agent id.
    pub agent_id: String,
    /// Org id.
    pub org_id: String,
    /// Connection number on this replica (distinguishes a replaced connection).
    pub conn_id: u64,
    /// Kinds from `hello`.
    pub kinds: Vec<String>,
    /// Backends from `hello`.
    pub backends: Vec<String>,
    /// `maxInFlight` from `hello`.
    pub max_in_flight: u32,
    /// An instance's agent (connected on `/ws/vm`): takes only targeted tasks, and its
    /// claims go through the instance's status and `max_use`.
    pub instance: bool,
    /// Control-plane tags (refreshed when changed through the API).
    tags: Mutex<Vec<String>>,
    /// Tasks in flight on this connection, and whether a freed slot should wake the
    /// dispatcher: one lock, so a round that finds the agent full and a result that frees a
    /// slot always see each other (see [`AgentHandle::free_slots_or_mark`]).
    slots: Mutex<Slots>,
    /// Outgoing messages to the session (see [`AgentHandle::send`]).
    tx: mpsc::UnboundedSender<GatewayMessage>,
    /// Messages put in `tx` that the session has not written yet: a frame written in place
    /// must not overtake them.
    queued: AtomicUsize,
    /// The session's socket, installed by the session once it is running, for writing a
    /// frame in place.
    direct: OnceLock<Arc<dyn DirectWrite>>,
    /// Asks the session to finish a write begun in place that the socket could not take
    /// at once.
    pub flush_wanted: tokio::sync::Notify,
    /// Fired to close the session (revocation, replacement, shutdown).
    pub close: CancellationToken,
    /// Why `close` was fired, sent to the agent as an `error` before closing.
    pub close_reason: Mutex<Option<(paddock_proto::ErrorCode, String)>>,
}

/// An agent's dispatch slots.
#[derive(Debug)]
struct Slots {
    /// Tasks dispatched to (or re-bound on) this connection and not yet finished, with the
    /// attempt held.
    in_flight: HashMap<String, u32>,
    /// Whether queued work may be waiting for this agent: a claim filled its last free slot
    /// while queued work was left, a round or a submission passed it over because it was
    /// full, or it has not claimed yet. A freed slot wakes the dispatcher only then;
    /// otherwise the claim would find nothing, and new work comes with a submission's claim
    /// or `TaskReady`.
    wants_more: bool,
}

/// Writes a frame to an agent's socket from the caller's task, without waiting.
pub trait DirectWrite: Send + Sync + std::fmt::Debug {
    /// Writes `msg` if the socket is free now and `queued` (messages the session has still
    /// to write) is zero, and returns `true`; a write the socket could not finish at once is
    /// completed by the session (`flush_wanted`). `false`: nothing was written.
    fn try_write(
        &self,
        msg: &GatewayMessage,
        queued: &AtomicUsize,
        flush_wanted: &tokio::sync::Notify,
    ) -> bool;
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl AgentHandle {
    /// Control-plane tags.
    pub fn tags(&self) -> Vec<String> {
        lock(&self.tags).clone()
    }

    /// Replaces the control-plane tags.
    pub fn set_tags(&self, tags: Vec<String>) {
        *lock(&self.tags) = tags;
    }

    /// Free dispatch slots.
    pub fn free_slots(&self) -> u32 {
        self.max_in_flight
            .saturating_sub(lock(&self.slots).in_flight.len() as u32)
    }

    /// Free dispatch slots, for a claim about to be made for this agent. When there are none,
    /// the agent is marked as wanting more first, under the lock a finished attempt takes:
    /// a slot freed after this call wakes the dispatcher, and one freed before it is counted.
    /// Work passed over for a full agent is therefore never left waiting for the sweep.
    pub fn free_slots_or_mark(&self) -> u32 {
        let mut slots = lock(&self.slots);
        let free = self
            .max_in_flight
            .saturating_sub(slots.in_flight.len() as u32);
        if free == 0 {
            slots.wants_more = true;
        }
        free
    }

    /// See [`Slots::wants_more`]: whether a freed slot should wake the dispatcher.
    pub fn wants_more(&self) -> bool {
        lock(&self.slots).wants_more
    }

    /// Set after a claim for this agent: whether it filled every free slot while queued work
    /// was left.
    pub fn set_wants_more(&self, more: bool) {
        lock(&self.slots).wants_more = more;
    }

    /// Number of tasks in flight.
    pub fn in_flight_count(&self) -> usize {
        lock(&self.slots).in_flight.len()
    }

    /// Records an attempt as in flight on this connection.
    pub fn add_in_flight(&self, task_id: &str, attempt: u32) {
        lock(&self.slots)
            .in_flight
            .insert(task_id.to_string(), attempt);
    }

    /// Whether a task is in flight on this connection.
    pub fn owns(&self, task_id: &str) -> bool {
        lock(&self.slots).in_flight.contains_key(task_id)
    }

    /// Forgets a task whatever its attempt; returns whether it was in flight here.
    pub fn remove_in_flight(&self, task_id: &str) -> bool {
        lock(&self.slots).in_flight.remove(task_id).is_some()
    }

    /// Forgets a task only if this exact attempt is the one held (a stale attempt's result
    /// must not free the slot of the attempt still running).
    pub fn finish_attempt(&self, task_id: &str, attempt: u32) -> bool {
        let mut slots = lock(&self.slots);
        if slots.in_flight.get(task_id) == Some(&attempt) {
            slots.in_flight.remove(task_id);
            true
        } else {
            false
        }
    }

    /// Sends a message to the agent: written to its socket at once by the caller when the
    /// session has nothing waiting and the socket is free (one task hand-off fewer between a
    /// claim and the agent), otherwise queued for the session. Order is kept: a message is
    /// never written ahead of one queued before it. `Err` gives the message back when the
    /// session has ended.
    pub fn send(&self, msg: GatewayMessage) -> Result<(), GatewayMessage> {
        if let Some(direct) = self.direct.get()
            && direct.try_write(&msg, &self.queued, &self.flush_wanted)
        {
            return Ok(());
        }
        self.queued.fetch_add(1, Ordering::SeqCst);
        self.tx.send(msg).map_err(|e| {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            e.0
        })
    }

    /// Called by the session once it has written a message taken from the queue (still
    /// holding its socket).
    pub fn written_from_queue(&self) {
        self.queued.fetch_sub(1, Ordering::SeqCst);
    }

    /// Installs the session's socket for [`AgentHandle::send`]'s writes in place.
    pub fn set_direct(&self, direct: Arc<dyn DirectWrite>) {
        let _ = self.direct.set(direct);
    }

    /// Asks the session to close with an error sent to the agent first.
    pub fn close_with(&self, code: paddock_proto::ErrorCode, message: impl Into<String>) {
        *lock(&self.close_reason) = Some((code, message.into()));
        self.close.cancel();
    }
}

/// Registry of live connections on this replica.
#[derive(Debug, Default)]
pub struct Hub {
    agents: Mutex<HashMap<String, Arc<AgentHandle>>>,
    next_conn: AtomicU64,
}

/// What `register` needs from `hello`.
#[derive(Debug)]
pub struct Registration {
    /// Agent id.
    pub agent_id: String,
    /// Org id.
    pub org_id: String,
    /// Control-plane tags from the database.
    pub tags: Vec<String>,
    /// Kinds.
    pub kinds: Vec<String>,
    /// Backends.
    pub backends: Vec<String>,
    /// Concurrency.
    pub max_in_flight: u32,
    /// An instance's agent.
    pub instance: bool,
}

impl Hub {
    /// Registers a connection; an earlier connection of the same agent is closed.
    pub fn register(
        &self,
        reg: Registration,
    ) -> (Arc<AgentHandle>, mpsc::UnboundedReceiver<GatewayMessage>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let handle = Arc::new(AgentHandle {
            agent_id: reg.agent_id,
            org_id: reg.org_id,
            conn_id: self.next_conn.fetch_add(1, Ordering::Relaxed),
            kinds: reg.kinds,
            backends: reg.backends,
            max_in_flight: reg.max_in_flight.max(1),
            instance: reg.instance,
            tags: Mutex::new(reg.tags),
            queued: AtomicUsize::new(0),
            direct: OnceLock::new(),
            flush_wanted: tokio::sync::Notify::new(),
            slots: Mutex::new(Slots {
                in_flight: HashMap::new(),
                wants_more: true,
            }),
            tx,
            close: CancellationToken::new(),
            close_reason: Mutex::new(None),
        });
        let old = lock(&self.agents).insert(handle.agent_id.clone(), handle.clone());
        if let Some(old) = old {
            old.close_with(
                paddock_proto::ErrorCode::ProtocolViolation,
                "replaced by a newer connection of the same agent",
            );
        }
        (handle, rx)
    }

    /// Removes a connection if it is still the registered one.
    pub fn unregister(&self, agent_id: &str, conn_id: u64) {
        let mut agents = lock(&self.agents);
        if agents.get(agent_id).is_some_and(|h| h.conn_id == conn_id) {
            agents.remove(agent_id);
        }
    }

    /// The live connection of an agent on this replica.
    pub fn get(&self, agent_id: &str) -> Option<Arc<AgentHandle>> {
        lock(&self.agents).get(agent_id).cloned()
    }

    /// All live connections.
    pub fn snapshot(&self) -> Vec<Arc<AgentHandle>> {
        lock(&self.agents).values().cloned().collect()
    }

    /// Number of live connections.
    pub fn len(&self) -> usize {
        lock(&self.agents).len()
    }

    /// Whether no agent is connected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
