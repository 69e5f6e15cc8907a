//! The dispatcher: matches queued tasks to the agents connected to this replica.
//!
//! Woken by submissions (locally or through `NOTIFY` from another replica), freed slots and
//! new connections, and by a periodic sweep. Each round looks only at orgs that have queued
//! work, and asks the store to claim, for each such agent with free slots, the oldest tasks
//! it is eligible for (selector, kind, backend, org cap). Claims are atomic in the database,
//! so replicas never hand one attempt to two agents.
//!
//! A wake-up names the orgs it is about when it can ([`Wake::org`]: a submission, a freed
//! slot, a new connection): a round for named orgs only goes straight to the claims. Any
//! other wake-up ([`Wake::notify_one`]), the periodic sweep and a round after a full batch
//! first ask the database which orgs have queued work.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use paddock_proto::{Dispatch, GatewayMessage, now_ms};
use paddock_store::{ClaimRequest, ClaimedTask, Handed};

use crate::AppState;
use crate::hub::AgentHandle;

/// Most tasks claimed for one agent in one query (the claim also writes their `dispatched`
/// events, in the same transaction).
const MAX_BATCH: u32 = 64;

/// What wakes the dispatcher, and which orgs it should look at.
#[derive(Debug, Default)]
pub struct Wake {
    notify: Notify,
    pending: Mutex<Pending>,
    /// Held for a whole round: the dispatcher's and a submission's ([`dispatch_now`]) never
    /// run together, so an agent's free slots are read and filled by one round at a time.
    round: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct Pending {
    /// Some wake-up did not say which orgs: look at all of them.
    all: bool,
    orgs: BTreeSet<String>,
}

/// The orgs a round looks at.
enum Scope {
    All,
    Orgs(BTreeSet<String>),
}

impl Scope {
    fn union(self, other: Scope) -> Scope {
        match (self, other) {
            (Scope::Orgs(mut a), Scope::Orgs(b)) => {
                a.extend(b);
                Scope::Orgs(a)
            }
            _ => Scope::All,
        }
    }
}

impl Wake {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Something changed that may let any org's work be dispatched.
    pub fn notify_one(&self) {
        self.lock().all = true;
        self.notify.notify_one();
    }

    /// An org may have work to dispatch now (queued work, or a slot freed).
    pub fn org(&self, org: &str) {
        {
            let mut p = self.lock();
            if !p.all && !p.orgs.contains(org) {
                p.orgs.insert(org.to_string());
            }
        }
        self.notify.notify_one();
    }

    /// Whether a wake-up about `org` (or about every org) waits for a round. Read under the
    /// round lock: a round takes the pending wake-ups under it too.
    fn has_pending(&self, org: &str) -> bool {
        let p = self.lock();
        p.all || p.orgs.contains(org)
    }

    fn take(&self) -> Scope {
        let mut p = self.lock();
        let scope = if p.all {
            Scope::All
        } else {
            Scope::Orgs(std::mem::take(&mut p.orgs))
        };
        *p = Pending::default();
        scope
    }
}

/// Runs until shutdown.
pub(crate) async fn run(state: AppState) {
    let mut scope = Scope::All;
    loop {
        let more = match round(&state, scope).await {
            Ok(more) => more,
            Err(e) => {
                tracing::warn!("dispatch round failed: {e}");
                false
            }
        };
        if state.shutdown.is_cancelled() {
            return;
        }
        // The round takes the pending wake-ups itself, under its lock.
        scope = if more {
            Scope::All
        } else {
            tokio::select! {
                () = state.dispatch_wake.notify.notified() => Scope::Orgs(BTreeSet::new()),
                () = tokio::time::sleep(state.cfg.tick) => Scope::All,
                () = state.shutdown.cancelled() => return,
            }
        };
    }
}

/// A round for orgs that just got new tasks, run by the submission's writer
/// ([`crate::inserter`]) instead of waking the dispatcher: one hop fewer between a
/// submission and its dispatch. If some agent filled its batch, the dispatcher goes on.
pub(crate) async fn dispatch_now(state: &AppState, orgs: BTreeSet<String>) {
    match round(state, Scope::Orgs(orgs)).await {
        Ok(true) => state.dispatch_wake.notify_one(),
        Ok(false) => {}
        Err(e) => {
            tracing::warn!("dispatch round failed: {e}");
            state.dispatch_wake.notify_one();
        }
    }
}

/// One pass over the connected agents of the orgs in scope and of the pending wake-ups
/// (taken under the round lock, so a submission that sees none pending knows every earlier
/// wake-up's round is over). Returns whether some agent filled its batch (so there may be
/// more to claim right away).
async fn round(state: &AppState, scope: Scope) -> Result<bool, paddock_store::StoreError> {
    let _round = state.dispatch_wake.round.lock().await;
    let scope = scope.union(state.dispatch_wake.take());
    let agents = state.hub.snapshot();
    if agents.is_empty() {
        return Ok(false);
    }
    let in_scope = |org: &str| match &scope {
        Scope::All => true,
        Scope::Orgs(named) => named.contains(org),
    };
    // A full agent in scope is marked (see `free_slots_or_mark`): its freed slot brings a
    // round.
    let mut candidates: Vec<&str> = agents
        .iter()
        .filter(|h| !h.close.is_cancelled() && in_scope(&h.org_id) && h.free_slots_or_mark() > 0)
        .map(|h| h.org_id.as_str())
        .collect();
    candidates.sort_unstable();
    candidates.dedup();
    if candidates.is_empty() {
        return Ok(false);
    }
    let orgs: Vec<String> = match scope {
        Scope::All => state.store.orgs_with_queued_among(&candidates).await?,
        // Named orgs: the claims themselves find out whether there is work.
        Scope::Orgs(_) => candidates.iter().map(|o| (*o).to_string()).collect(),
    };
    if orgs.is_empty() {
        return Ok(false);
    }
    let mut more = false;
    for handle in agents {
        if handle.close.is_cancelled() || !orgs.contains(&handle.org_id) {
            continue;
        }
        let free = handle.free_slots_or_mark().min(MAX_BATCH);
        if free == 0 {
            continue;
        }
        let sent = claim_for(state, &handle, free).await?;
        // Fewer than asked: nothing more is queued for it now.
        handle.set_wants_more(sent == free);
        if sent == free {
            more = true;
        }
    }
    Ok(more)
}

/// The claim for `handle`'s `free` slots (`tags`: the agent's, read once).
fn request<'a>(
    state: &AppState,
    handle: &'a AgentHandle,
    tags: &'a [String],
    free: u32,
    now: i64,
) -> ClaimRequest<'a> {
    ClaimRequest {
        org_id: &handle.org_id,
        agent_id: &handle.agent_id,
        tags,
        kinds: &handle.kinds,
        backends: &handle.backends,
        limit: free,
        lease_until: lease_until(state, now),
        org_max_inflight: state.cfg.org_max_inflight,
        now,
        instance: handle.instance,
    }
}

fn lease_until(state: &AppState, now: i64) -> i64 {
    now + state.cfg.lease.as_millis() as i64
}

/// Claims made with a submission's insert ([`insert_and_claim`]), to hand to the agents
/// with [`deliver`]. Holds the round lock until then.
pub(crate) struct Claims<'a> {
    _round: tokio::sync::MutexGuard<'a, ()>,
    lease_until: i64,
    /// Each agent with its claimed tasks and whether it may want more (it filled its free
    /// slots and queued work of its org was left).
    agents: Vec<(Arc<AgentHandle>, Vec<ClaimedTask>, bool)>,
    /// Orgs of instance agents with free slots: their claims lock the instance's row, so
    /// the dispatcher makes them.
    instance_orgs: BTreeSet<String>,
}

/// When [`insert_and_claim`]'s claims go to their agents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hand {
    /// Before the commit (SQLite; on PostgreSQL the claims are committed by then): the
    /// dispatches leave while the commit is written. A commit that fails after them takes
    /// them back ([`recall`]).
    BeforeCommit,
    /// Returned to the caller, which answers its callers first and then calls [`deliver`].
    AfterCommit,
}

/// Why [`insert_and_claim`] stored nothing.
#[derive(Debug)]
pub(crate) struct NotStored {
    pub(crate) error: paddock_store::StoreError,
    /// Dispatches had gone out before the commit failed (they were recalled): the tasks may
    /// have started, so they must not be stored again under the same ids.
    pub(crate) dispatched: bool,
}

/// SQLite: stores a batch of submissions and, in the same transaction, claims for this
/// replica's agents of the batch's orgs (each for its free slots, oldest queued work first,
/// as a round would): one commit where an insert and a round took two. Nothing is stored if
/// it fails. With [`Hand::AfterCommit`] the claims are returned, for [`deliver`].
///
/// With [`Hand::BeforeCommit`], when every task (each with its id) has a free agent and no
/// queued work can be ahead of it ([`pick_free_agents`]), there is no claim: the tasks are
/// sent first and then stored as dispatched ([`hand_directly`]), so the insert's statements
/// run while the agents work instead of before the dispatch.
pub(crate) async fn insert_and_claim<'a>(
    state: &'a AppState,
    tasks: &[paddock_store::NewTask],
    hand: Hand,
) -> Result<(Vec<String>, Option<Claims<'a>>), NotStored> {
    let round = state.dispatch_wake.round.lock().await;
    let (open, instance_orgs) = open_agents(state, tasks);
    let now = now_ms();
    // The dispatch names the task before its row exists: it needs its id.
    if hand == Hand::BeforeCommit
        && tasks.iter().all(|t| t.id.is_some())
        && let Some(picks) = pick_free_agents(state, tasks, &open, now)
    {
        return hand_directly(state, round, tasks, &open, &picks, now).await;
    }
    let requests: Vec<ClaimRequest<'_>> = open
        .iter()
        .map(|(h, free, tags)| request(state, h, tags, *free, now))
        .collect();
    let handles: Vec<Arc<AgentHandle>> = open.iter().map(|(h, _, _)| h.clone()).collect();
    let mut later = None;
    let mut sent = Vec::new();
    let stored = state
        .store
        .insert_tasks_and_claim(tasks, &requests, |claimed, more| {
            let claims = Claims {
                _round: round,
                lease_until: lease_until(state, now),
                agents: handles
                    .into_iter()
                    .zip(claimed.into_iter().zip(more))
                    .map(|(h, (c, more))| (h, c, more))
                    .collect(),
                instance_orgs,
            };
            match hand {
                Hand::BeforeCommit => sent = deliver(state, claims),
                Hand::AfterCommit => later = Some(claims),
            }
        })
        .await;
    match stored {
        Ok(ids) => Ok((ids, later)),
        // Only `Hand::BeforeCommit` sends anything before the commit.
        Err(error) => Err(not_stored(state, error, sent)),
    }
}

/// An agent open for new work of a submission, with its free slots and its tags.
type OpenAgent = (Arc<AgentHandle>, u32, Vec<String>);

/// The agents open for new work of a submission.
type Open = [OpenAgent];

/// The agents of this replica with free slots in the orgs of `tasks` (not instances'), and
/// the orgs where instances' agents have free slots (their claims lock the instance's row,
/// so the dispatcher makes them). A full agent is marked: the new work waits for its freed
/// slot. Call under the round lock.
fn open_agents(
    state: &AppState,
    tasks: &[paddock_store::NewTask],
) -> (Vec<OpenAgent>, BTreeSet<String>) {
    let orgs: BTreeSet<&str> = tasks.iter().map(|t| t.org_id.as_str()).collect();
    let mut open = Vec::new();
    let mut instance_orgs = BTreeSet::new();
    for handle in state.hub.snapshot() {
        if handle.close.is_cancelled() || !orgs.contains(handle.org_id.as_str()) {
            continue;
        }
        let free = handle.free_slots_or_mark().min(MAX_BATCH);
        if free == 0 {
            continue;
        }
        if handle.instance {
            instance_orgs.insert(handle.org_id.clone());
            continue;
        }
        let tags = handle.tags();
        open.push((handle, free, tags));
    }
    (open, instance_orgs)
}

/// What [`insert_assigned`] did with a batch: the new ids, and the orgs with tasks left
/// queued (their agents had queued work waiting, or a session ended), for the dispatcher.
pub(crate) struct Assigned {
    pub(crate) ids: Vec<String>,
    pub(crate) queued_orgs: BTreeSet<String>,
}

/// PostgreSQL: stores a batch of submissions with each task already dispatched to a free
/// agent of this replica that may take it ([`pick_free_agents`]), in one commit where an
/// insert and a claim took two (each an `fsync`), then sends the dispatches. The database
/// keeps the order: a task whose agent would claim queued work already waiting (from any
/// replica) is stored queued instead ([`paddock_store::Store::insert_assigned`]). `None`
/// when the batch does not all go to free agents: the caller stores it queued, for the
/// claims. On error nothing is stored or sent.
pub(crate) async fn insert_assigned(
    state: &AppState,
    tasks: &[paddock_store::NewTask],
) -> Option<Result<Assigned, paddock_store::StoreError>> {
    // Held until the dispatches are sent: no round fills the slots picked here meanwhile.
    let round = state.dispatch_wake.round.lock().await;
    let (open, _) = open_agents(state, tasks);
    let now = now_ms();
    let picks = pick_free_agents(state, tasks, &open, now)?;
    let requests: Vec<Option<ClaimRequest<'_>>> = picks
        .iter()
        .map(|&i| Some(request(state, &open[i].0, &open[i].2, 1, now)))
        .collect();
    let (ids, dispatched) = match state.store.insert_assigned(tasks, &requests).await {
        Ok(stored) => stored,
        Err(e) => return Some(Err(e)),
    };
    let lease_until = lease_until(state, now);
    let mut queued_orgs = BTreeSet::new();
    let mut unsent = Vec::new();
    for ((task, id), (&i, &sent_now)) in tasks.iter().zip(&ids).zip(picks.iter().zip(&dispatched)) {
        if !sent_now {
            queued_orgs.insert(task.org_id.clone());
            continue;
        }
        let claimed = ClaimedTask {
            id: id.clone(),
            attempt: 1,
            spec: task.spec.clone(),
            created_at: now,
        };
        unsent.extend(send_claimed(state, &open[i].0, vec![claimed], lease_until).unsent);
    }
    drop(round);
    if !unsent.is_empty() {
        // Sessions that ended since the snapshot: back to the queue (as `deliver` does).
        let state = state.clone();
        tokio::spawn(async move {
            if let Err(e) = release(&state, &unsent).await {
                tracing::warn!("releasing dispatches of an ended session failed: {e}");
            }
            state.dispatch_wake.notify_one();
        });
    }
    Some(Ok(Assigned { ids, queued_orgs }))
}

/// For a submission on SQLite, the agent each task can be handed to at once, without a
/// claim (an index into `open`): the first with a free slot that may take it, in the order a
/// round would try them, as long as no queued work of the task's org can be waiting for that
/// slot: the agent is not marked as wanting more (its last claim left no queued work of its
/// org behind, and it has not been passed over while full) and no wake-up of the dispatcher
/// about the org is pending (re-queued work, a freed slot, a new connection). `None` when a
/// task has no such agent, or an org cap is set: claims decide then.
fn pick_free_agents(
    state: &AppState,
    tasks: &[paddock_store::NewTask],
    open: &Open,
    now: i64,
) -> Option<Vec<usize>> {
    if state.cfg.org_max_inflight.is_some() {
        return None;
    }
    let mut free: Vec<u32> = open
        .iter()
        .map(|(h, free, _)| if h.wants_more() { 0 } else { *free })
        .collect();
    let mut picks = Vec::with_capacity(tasks.len());
    for task in tasks {
        if state.dispatch_wake.has_pending(&task.org_id) {
            return None;
        }
        let i = open.iter().enumerate().position(|(i, (h, _, tags))| {
            free[i] > 0 && request(state, h, tags, 1, now).would_take(task)
        })?;
        free[i] -= 1;
        picks.push(i);
    }
    Some(picks)
}

/// Sends each task to its picked agent ([`pick_free_agents`]), then stores the tasks as
/// dispatched ([`paddock_store::Store::insert_dispatched`]: the sends go out holding the
/// writer, so the agents' results wait for the commit). A task whose agent's session ended
/// meanwhile is stored queued, for the dispatcher. On failure, as [`insert_and_claim`].
async fn hand_directly<'a>(
    state: &'a AppState,
    round: tokio::sync::MutexGuard<'a, ()>,
    tasks: &[paddock_store::NewTask],
    open: &Open,
    picks: &[usize],
    now: i64,
) -> Result<(Vec<String>, Option<Claims<'a>>), NotStored> {
    let lease_until = lease_until(state, now);
    let mut sent = Vec::with_capacity(tasks.len());
    let mut left_queued = BTreeSet::new();
    let stored = state
        .store
        .insert_dispatched(tasks, || {
            let mut handed = Vec::with_capacity(tasks.len());
            for (task, &i) in tasks.iter().zip(picks) {
                let handle = &open[i].0;
                let claimed = ClaimedTask {
                    id: task.id.clone().unwrap_or_default(),
                    attempt: 1,
                    spec: task.spec.clone(),
                    created_at: now,
                };
                let out = send_claimed(state, handle, vec![claimed], lease_until);
                if out.sent.is_empty() {
                    left_queued.insert(task.org_id.as_str());
                    handed.push(None);
                    continue;
                }
                handed.push(Some(Handed {
                    agent_id: handle.agent_id.clone(),
                    lease_until,
                }));
                sent.extend(out.sent.into_iter().map(|(id, a)| (handle.clone(), id, a)));
            }
            drop(round);
            handed
        })
        .await;
    match stored {
        Ok(ids) => {
            for org in left_queued {
                state.dispatch_wake.org(org);
            }
            Ok((ids, None))
        }
        Err(error) => Err(not_stored(state, error, sent)),
    }
}

/// A batch whose commit failed: its dispatches already sent are recalled.
fn not_stored(state: &AppState, error: paddock_store::StoreError, sent: Vec<Sent>) -> NotStored {
    let dispatched = !sent.is_empty();
    if dispatched {
        recall(sent);
        // The freed slots may take other queued work.
        state.dispatch_wake.notify_one();
    }
    NotStored { error, dispatched }
}

/// Hands the claims of [`insert_and_claim`] to their agents; wakes the dispatcher if an
/// agent filled its batch with work left queued, or instances are waiting. Never waits: a
/// request handler that calls it cannot be dropped half-way through (claims of sessions
/// that ended meanwhile are released by a background task). Returns the dispatches sent.
pub(crate) fn deliver(state: &AppState, claims: Claims<'_>) -> Vec<Sent> {
    let mut more = false;
    let mut unsent = Vec::new();
    let mut sent = Vec::new();
    for (handle, claimed, wants_more) in claims.agents {
        // Before the dispatch leaves: its result must read the new mark.
        handle.set_wants_more(wants_more);
        more |= wants_more;
        let out = send_claimed(state, &handle, claimed, claims.lease_until);
        sent.extend(
            out.sent
                .into_iter()
                .map(|(id, attempt)| (handle.clone(), id, attempt)),
        );
        unsent.extend(out.unsent);
    }
    drop(claims._round);
    if !unsent.is_empty() {
        let state = state.clone();
        tokio::spawn(async move {
            if let Err(e) = release(&state, &unsent).await {
                // Their leases run out and the reaper re-queues them.
                tracing::warn!("releasing claims of an ended session failed: {e}");
            }
            state.dispatch_wake.notify_one();
        });
    }
    if more {
        state.dispatch_wake.notify_one();
    }
    for org in &claims.instance_orgs {
        state.dispatch_wake.org(org);
    }
    sent
}

/// A dispatch sent: the agent, the task and the attempt.
pub(crate) type Sent = (Arc<AgentHandle>, String, u32);

/// Takes back dispatches whose claims were not committed (the commit after
/// [`Hand::BeforeCommit`] failed): their slots are freed and the agents told to cancel them.
/// A result that still comes is not stored (there is no row for it).
fn recall(sent: Vec<Sent>) {
    for (handle, task_id, attempt) in sent {
        if handle.finish_attempt(&task_id, attempt) {
            tracing::warn!(task = %task_id, agent = %handle.agent_id, "dispatched task not stored; cancelled");
            let _ = handle.send(GatewayMessage::Cancel(paddock_proto::Cancel {
                task_id,
                attempt,
                reason: "the task could not be stored".into(),
            }));
        }
    }
}

async fn claim_for(
    state: &AppState,
    handle: &Arc<AgentHandle>,
    free: u32,
) -> Result<u32, paddock_store::StoreError> {
    let tags = handle.tags();
    let now = now_ms();
    let lease_until = lease_until(state, now);
    let claimed = state
        .store
        .claim_tasks(&request(state, handle, &tags, free, now))
        .await?;
    let n = claimed.len() as u32;
    if handle.instance && n > 0 {
        // Now `busy`: pool supervisors watching the org want to know.
        crate::bus::publish(
            state,
            crate::bus::BusEvent::InstanceChanged {
                org: handle.org_id.clone(),
                pool: None,
            },
        )
        .await;
    }
    let unsent = send_claimed(state, handle, claimed, lease_until).unsent;
    release(state, &unsent).await?;
    Ok(n)
}

/// What [`send_claimed`] did with each claim (task id, attempt).
struct Outcome {
    sent: Vec<(String, u32)>,
    /// Claims whose session ended between the snapshot and now, to release with
    /// [`release`].
    unsent: Vec<(String, u32)>,
}

/// Sends claimed tasks to their agent. The claims it could not send are returned for
/// [`release`] (this does not wait, so a caller that is dropped after it cannot leave a claim
/// neither sent nor returned).
fn send_claimed(
    state: &AppState,
    handle: &AgentHandle,
    claimed: Vec<ClaimedTask>,
    lease_until: i64,
) -> Outcome {
    let mut out = Outcome {
        sent: Vec::with_capacity(claimed.len()),
        unsent: Vec::new(),
    };
    for task in claimed {
        handle.add_in_flight(&task.id, task.attempt);
        let (id, attempt, created_at) = (task.id, task.attempt, task.created_at);
        let msg = GatewayMessage::Dispatch(Box::new(Dispatch {
            task_id: id.clone(),
            attempt,
            lease_deadline_ms: lease_until,
            spec: task.spec,
        }));
        if handle.send(msg).is_err() {
            handle.remove_in_flight(&id);
            out.unsent.push((id, attempt));
            continue;
        }
        state
            .metrics
            .dispatch_latency
            .observe((now_ms() - created_at).max(0) as f64 / 1000.0);
        state.metrics.dispatched.inc();
        tracing::debug!(task = %id, attempt, agent = %handle.agent_id, "dispatched");
        state.waiters.notify(&id);
        out.sent.push((id, attempt));
    }
    out
}

/// Puts claims whose session ended back in the queue without using their attempt (their
/// `dispatched` events, written with the claims, stay in the tasks' histories).
async fn release(
    state: &AppState,
    unsent: &[(String, u32)],
) -> Result<(), paddock_store::StoreError> {
    for (id, attempt) in unsent {
        state.store.release_claim(id, *attempt).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::{Hub, Registration};

    /// A dispatch whose claim was not committed is taken back: its slot is freed and the
    /// agent told to cancel it; an attempt the agent no longer holds is left alone.
    #[test]
    fn recall_frees_the_slot_and_cancels_at_the_agent() {
        let hub = Hub::default();
        let (handle, mut rx) = hub.register(Registration {
            agent_id: "a1".into(),
            org_id: "o1".into(),
            tags: vec![],
            kinds: vec!["agent.execute".into()],
            backends: vec![],
            max_in_flight: 2,
            instance: false,
        });
        handle.add_in_flight("t1", 1);
        handle.add_in_flight("t2", 3);
        assert_eq!(handle.free_slots(), 0);
        recall(vec![
            (handle.clone(), "t1".into(), 1),
            // Not the attempt held: nothing to take back.
            (handle.clone(), "t2".into(), 2),
        ]);
        assert_eq!(handle.free_slots(), 1);
        assert!(handle.owns("t2"));
        match rx.try_recv() {
            Ok(GatewayMessage::Cancel(c)) => {
                assert_eq!((c.task_id.as_str(), c.attempt), ("t1", 1));
            }
            other => panic!("expected a cancel, got {other:?}"),
        }
        assert!(rx.try_recv().is_err(), "one cancel only");
    }

    /// A submission skips the claim only for a free agent that may take it, with nothing
    /// that could be queued ahead of it: not while a wake-up about its org waits for a round
    /// (until the round has taken it), not for an agent marked as wanting more, and only if
    /// every task of the batch has a slot.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn submissions_skip_the_claim_only_when_nothing_can_be_ahead() {
        use std::time::{Duration, Instant};

        let (_dir, gw) = crate::test_gateway(|cfg| cfg.tick = Duration::from_secs(3600)).await;
        let state = gw.state().clone();
        let (handle, _rx) = state.hub.register(Registration {
            agent_id: "a1".into(),
            org_id: "o1".into(),
            tags: vec![],
            kinds: vec!["agent.noop".into()],
            backends: vec![],
            max_in_flight: 2,
            instance: false,
        });
        handle.set_wants_more(false);
        let task = |kind: &str| paddock_store::NewTask {
            id: Some(paddock_store::new_task_id()),
            org_id: "o1".into(),
            spec: serde_json::from_value(serde_json::json!({ "kind": kind }))
                .unwrap_or_else(|e| panic!("{e}")),
            max_attempts: 1,
            queue_deadline_at: now_ms() + 60_000,
        };
        let noop = task("agent.noop");
        let pick = |tasks: &[paddock_store::NewTask], free: u32| {
            let open = vec![(handle.clone(), free, Vec::<String>::new())];
            pick_free_agents(&state, tasks, &open, now_ms())
        };
        assert_eq!(pick(std::slice::from_ref(&noop), 2), Some(vec![0]));
        assert_eq!(
            pick(&[noop.clone(), task("agent.noop")], 2),
            Some(vec![0, 0])
        );
        assert_eq!(
            pick(&[noop.clone(), task("agent.noop")], 1),
            None,
            "one slot for two"
        );
        assert_eq!(
            pick(&[task("agent.execute")], 2),
            None,
            "a kind it does not run"
        );
        let taken = |org: &'static str| {
            let state = state.clone();
            async move {
                let t0 = Instant::now();
                while state.dispatch_wake.has_pending(org) {
                    assert!(
                        t0.elapsed() < Duration::from_secs(5),
                        "no round took the wake-up"
                    );
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        // A wake-up, taken by a round; then the dispatcher waits for the next one.
        state.dispatch_wake.org("o1");
        taken("o1").await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        {
            // As while the dispatcher runs a round: a wake-up waits for the next one, and
            // the dispatcher must not take it before that round can run.
            let _round = state.dispatch_wake.round.lock().await;
            state.dispatch_wake.org("o1");
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(
                pick(std::slice::from_ref(&noop), 2),
                None,
                "a wake-up about o1 waits"
            );
        }
        // The dispatcher's next round takes it.
        taken("o1").await;
        {
            let _round = state.dispatch_wake.round.lock().await;
            state.dispatch_wake.org("other");
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(
                pick(std::slice::from_ref(&noop), 2),
                Some(vec![0]),
                "another org's"
            );
        }
        // That round found nothing queued for the agent: it is not marked.
        assert!(!handle.wants_more());
        assert_eq!(pick(std::slice::from_ref(&noop), 2), Some(vec![0]));
        handle.set_wants_more(true);
        assert_eq!(
            pick(std::slice::from_ref(&noop), 2),
            None,
            "marked as wanting more"
        );
        gw.state().shutdown.cancel();
    }
}
