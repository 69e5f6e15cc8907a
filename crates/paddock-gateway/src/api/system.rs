//! Health, readiness, metrics and the OpenAPI document.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use paddock_store::TaskState;

use crate::AppState;

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", responses((status = 200, body = Object)))]
pub(crate) async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

/// Readiness: the database answers and the gateway is not shutting down.
#[utoipa::path(get, path = "/readyz", responses((status = 200, body = Object), (status = 503, body = Object)))]
pub(crate) async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<serde_json::Value>) {
    if state.shutdown.is_cancelled() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": "shutting_down" })),
        );
    }
    match state.store.ping().await {
        Ok(()) => (
            StatusCode::OK,
            Json(serde_json::json!({ "status": "ready", "replica": state.cfg.replica_id })),
        ),
        Err(e) => {
            tracing::warn!("readiness check failed: {e}");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(serde_json::json!({ "status": "database_unavailable" })),
            )
        }
    }
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format")))]
pub(crate) async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    if let Ok(counts) = state.store.count_tasks_by_state().await {
        for s in TaskState::ALL {
            let n = counts.iter().find(|c| c.state == s).map_or(0, |c| c.count);
            state
                .metrics
                .tasks
                .get_or_create(&crate::metrics::StateLabel {
                    state: s.as_str().into(),
                })
                .set(n);
            if s == TaskState::Queued {
                state.metrics.queue_depth.set(n);
            }
        }
    }
    state.metrics.connected_agents.set(state.hub.len() as i64);
    if let Ok(counts) = state.store.count_instances_by_status().await {
        for s in paddock_store::InstanceStatus::ALL {
            let n = counts.iter().find(|c| c.0 == s).map_or(0, |c| c.1);
            state
                .metrics
                .instances
                .get_or_create(&crate::metrics::StateLabel {
                    state: s.as_str().into(),
                })
                .set(n as i64);
        }
    }
    if let Ok(pools) = state.store.list_all_pools().await {
        for pool in pools {
            let Ok(instances) = state
                .store
                .list_instances(&pool.org_id, Some(&pool.id), false)
                .await
            else {
                continue;
            };
            let Ok(d) = crate::api::pools::demand(&state, &pool, &instances).await else {
                continue;
            };
            let label = crate::metrics::PoolLabel {
                org: pool.org_id.clone(),
                pool: pool.name.clone(),
            };
            state
                .metrics
                .pool_desired
                .get_or_create(&label)
                .set(i64::from(d.desired));
            state
                .metrics
                .pool_actual
                .get_or_create(&label)
                .set(i64::from(d.live));
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

/// The OpenAPI document of this API.
#[utoipa::path(get, path = "/openapi.json", responses((status = 200, body = Object)))]
pub(crate) async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(crate::openapi::document())
}
