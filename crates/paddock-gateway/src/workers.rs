//! Background workers: presence (heartbeats to the database, lease extension, revocation
//! sweep) on every replica, and the reapers (expired leases, queue deadlines, result TTL)
//! on replicas with the `brain` role. All of them are idempotent SQL, so running them on
//! several replicas at once is safe.

use paddock_proto::{ErrorCode, now_ms};

use crate::AppState;
use crate::bus::{self, BusEvent};

/// Presence: every heartbeat interval, one batched update marks this replica's agents as
/// seen and extends their tasks' leases; revoked agents found meanwhile are disconnected.
pub(crate) async fn presence(state: AppState) {
    let mut tick = tokio::time::interval(state.cfg.heartbeat_interval);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = state.shutdown.cancelled() => return,
        }
        let ids: Vec<String> = state
            .hub
            .snapshot()
            .iter()
            .map(|h| h.agent_id.clone())
            .collect();
        let now = now_ms();
        let lease_until = now + state.cfg.lease.as_millis() as i64;
        match state.store.touch_agents(&ids, now, lease_until).await {
            Ok(revoked) => {
                for id in revoked {
                    if let Some(h) = state.hub.get(&id) {
                        h.close_with(ErrorCode::AgentRevoked, "this agent has been revoked");
                    }
                }
            }
            Err(e) => tracing::warn!("presence update failed: {e}"),
        }
    }
}

/// The reapers.
pub(crate) async fn reaper(state: AppState) {
    let mut tick = tokio::time::interval(state.cfg.tick);
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = state.shutdown.cancelled() => return,
        }
        n += 1;
        if let Err(e) = reap_once(&state, n.is_multiple_of(10)).await {
            tracing::warn!("reaper pass failed: {e}");
        }
    }
}

async fn reap_once(state: &AppState, results_too: bool) -> Result<(), paddock_store::StoreError> {
    let now = now_ms();
    let ttl = state.cfg.results_ttl_ms();
    let requeue_deadline = now + state.cfg.queue_timeout.as_millis() as i64;
    let (failed, requeued) = state
        .store
        .expire_leases(now, ttl, requeue_deadline)
        .await?;
    for t in &failed {
        tracing::warn!(task = %t.id, "agent lost and no attempts left: AGENT_LOST");
        bus::publish(state, BusEvent::TaskChanged { task: t.id.clone() }).await;
    }
    for t in &requeued {
        tracing::warn!(task = %t.id, "agent lost; task re-queued for another attempt");
        let _ = state
            .store
            .add_event(
                &t.id,
                0,
                "requeued",
                &serde_json::json!({ "reason": "lease expired" }),
            )
            .await;
        bus::publish(
            state,
            BusEvent::TaskReady {
                org: t.org_id.clone(),
            },
        )
        .await;
        bus::publish(state, BusEvent::TaskChanged { task: t.id.clone() }).await;
    }
    for t in state.store.expire_queued(now, ttl).await? {
        tracing::info!(task = %t.id, "queue deadline passed");
        bus::publish(state, BusEvent::TaskChanged { task: t.id }).await;
    }
    crate::instances::expire_overdue(state).await?;
    if results_too {
        let deleted = state.store.delete_expired_results(now).await?;
        if deleted > 0 {
            tracing::info!(deleted, "expired results deleted");
        }
    }
    Ok(())
}
