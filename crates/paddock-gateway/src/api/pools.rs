//! Pools: their definition, their state as a supervisor sees it (instances and queued
//! demand), instance creation under the pool's ceiling, and a change feed (SSE) that wakes
//! supervisors before their interval.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::{Extension, Json};
use futures_util::Stream;
use paddock_proto::{ErrorCode, now_ms};
use paddock_store::{ApiPrincipal, Instance, InstanceStatus, NewPool, Pool, Role};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::AppState;
use crate::api::instances::{InstanceLaunch, launch};
use crate::auth::require_role;
use crate::error::{ApiError, AppJson};
use crate::instances::instance_changed;

/// Providers a pool may name (the supervisor implements them).
pub(crate) const PROVIDERS: &[&str] = &["process", "docker", "command"];

/// Body of `PUT /v1/orgs/{org}/pools/{name}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct PoolBody {
    /// `process`, `docker` or `command`.
    pub provider: String,
    /// Control-plane tags of its agents (what tasks select with `selector.tag`).
    #[serde(default)]
    pub labels: Vec<String>,
    /// Idle floor.
    pub min: u32,
    /// Ceiling.
    pub max: u32,
    /// Desired size, clamped into `[min, max]`.
    #[serde(default)]
    pub target: Option<u32>,
    /// Tasks per instance before it is destroyed (0 = unlimited; default 1).
    #[serde(default = "one")]
    pub max_use: u32,
    /// Destroy an instance not ready this long after its creation (default 120000).
    #[serde(default = "boot_deadline")]
    pub boot_deadline_ms: u64,
}

fn one() -> u32 {
    1
}

fn boot_deadline() -> u64 {
    120_000
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Creates or updates a pool (owner/admin).
#[utoipa::path(operation_id = "upsert_pool", put, path = "/v1/orgs/{org_id}/pools/{name}", request_body = PoolBody,
    params(("org_id" = String, Path), ("name" = String, Path), ("X-Org-Id" = String, Header)),
    responses((status = 200, body = Pool), (status = 400, body = crate::error::ErrorResponse)))]
pub(crate) async fn upsert(
    State(state): State<AppState>,
    Extension(principal): Extension<ApiPrincipal>,
    Path((org_id, name)): Path<(String, String)>,
    AppJson(body): AppJson<PoolBody>,
) -> Result<Json<Pool>, ApiError> {
    require_role(&principal, Role::Admin)?;
    if !valid_name(&name) {
        return Err(ApiError::invalid(
            "pool names are 1 to 64 characters of letters, digits, `-`, `_` and `.`",
        ));
    }
    if !PROVIDERS.contains(&body.provider.as_str()) {
        return Err(ApiError::invalid(format!(
            "unknown provider `{}` (expected one of {})",
            body.provider,
            PROVIDERS.join(", ")
        )));
    }
    if body.max == 0 || body.min > body.max {
        return Err(ApiError::invalid("need 0 <= min <= max and max >= 1"));
    }
    if body
        .labels
        .iter()
        .any(|l| l.trim().is_empty() || l.len() > 128)
    {
        return Err(ApiError::invalid("labels must be 1 to 128 characters"));
    }
    let pool = state
        .store
        .upsert_pool(
            &org_id,
            &NewPool {
                name: &name,
                provider: &body.provider,
                labels: &body.labels,
                min: body.min,
                max: body.max,
                target: body.target,
                max_use: body.max_use,
                boot_deadline_ms: body.boot_deadline_ms,
            },
        )
        .await?;
    Ok(Json(pool))
}

/// The org's pools.
#[utoipa::path(operation_id = "list_pools", get, path = "/v1/orgs/{org_id}/pools",
    params(("org_id" = String, Path), ("X-Org-Id" = String, Header)),
    responses((status = 200, body = Vec<Pool>)))]
pub(crate) async fn list(
    State(state): State<AppState>,
    Extension(principal): Extension<ApiPrincipal>,
    Path(org_id): Path<String>,
) -> Result<Json<Vec<Pool>>, ApiError> {
    require_role(&principal, Role::Member)?;
    Ok(Json(state.store.list_pools(&org_id).await?))
}

/// Demand and counts of a pool.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Demand {
    /// Queued tasks that select one of the pool's labels or `pool:<name>`.
    pub queued: u32,
    /// Instances running a task.
    pub busy: u32,
    /// Connected, idle instances.
    pub idle: u32,
    /// Instances not yet ready (`starting`, `provisioning`).
    pub starting: u32,
    /// Non-terminated instances (what counts against `max`).
    pub live: u32,
    /// `min(max, busy + queued + floor)`, never below the floor.
    pub desired: u32,
}

/// A pool as its supervisor sees it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PoolState {
    /// The pool.
    pub pool: Pool,
    /// Its non-terminated instances, oldest first.
    pub instances: Vec<Instance>,
    /// Demand and counts.
    pub demand: Demand,
}

async fn find(state: &AppState, org_id: &str, name: &str) -> Result<Pool, ApiError> {
    state
        .store
        .get_pool(org_id, name)
        .await?
        .ok_or_else(|| ApiError::not_found("pool"))
}

/// Counts of a pool's instances and its demand.
pub(crate) async fn demand(
    state: &AppState,
    pool: &Pool,
    instances: &[Instance],
) -> Result<Demand, ApiError> {
    let queued = state.store.pool_queued_demand(pool, now_ms()).await?;
    let count = |f: &dyn Fn(InstanceStatus) -> bool| {
        instances.iter().filter(|i| f(i.status)).count() as u32
    };
    let busy = count(&|s| s == InstanceStatus::Busy);
    Ok(Demand {
        queued,
        busy,
        idle: count(&|s| s == InstanceStatus::Ready),
        starting: count(&|s| matches!(s, InstanceStatus::Starting | InstanceStatus::Provisioning)),
        live: count(&|s| s != InstanceStatus::Terminated),
        desired: pool.desired(busy, queued),
    })
}

/// A pool with its live instances and demand.
#[utoipa::path(operation_id = "get_pool", get, path = "/v1/orgs/{org_id}/pools/{name}",
    params(("org_id" = String, Path), ("name" = String, Path), ("X-Org-Id" = String, Header)),
    responses((status = 200, body = PoolState), (status = 404, body = crate::error::ErrorResponse)))]
pub(crate) async fn get(
    State(state): State<AppState>,
    Extension(principal): Extension<ApiPrincipal>,
    Path((org_id, name)): Path<(String, String)>,
) -> Result<Json<PoolState>, ApiError> {
    require_role(&principal, Role::Member)?;
    let pool = find(&state, &org_id, &name).await?;
    let instances = state
        .store
        .list_instances(&org_id, Some(&pool.id), false)
        .await?;
    let demand = demand(&state, &pool, &instances).await?;
    Ok(Json(PoolState {
        pool,
        instances,
        demand,
    }))
}

/// Creates an instance of the pool (`starting`) and a token for its runtime;
/// `409 POOL_AT_CAPACITY` when the pool already has `max` live instances.
#[utoipa::path(operation_id = "create_pool_instance", post, path = "/v1/orgs/{org_id}/pools/{name}/instances",
    params(("org_id" = String, Path), ("name" = String, Path), ("X-Org-Id" = String, Header)),
    responses((status = 201, body = InstanceLaunch), (status = 409, body = crate::error::ErrorResponse)))]
pub(crate) async fn create_instance(
    State(state): State<AppState>,
    Extension(principal): Extension<ApiPrincipal>,
    Path((org_id, name)): Path<(String, String)>,
) -> Result<(StatusCode, Json<InstanceLaunch>), ApiError> {
    require_role(&principal, Role::Admin)?;
    let pool = find(&state, &org_id, &name).await?;
    match state.store.create_pool_instance(&pool).await? {
        Ok(inst) => {
            instance_changed(&state, &inst).await;
            Ok((
                StatusCode::CREATED,
                Json(launch(&state, inst, Some(&pool.name))),
            ))
        }
        Err(full) => Err(ApiError::new(
            StatusCode::CONFLICT,
            ErrorCode::PoolAtCapacity,
            full.to_string(),
        )),
    }
}

/// Server-sent events: `change` whenever a task is queued in the org or an instance of the
/// org changes status (a supervisor re-reads the pool then); keep-alive comments between.
#[utoipa::path(operation_id = "watch_pool", get, path = "/v1/orgs/{org_id}/pools/{name}/watch",
    params(("org_id" = String, Path), ("name" = String, Path), ("X-Org-Id" = String, Header)),
    responses((status = 200, description = "text/event-stream")))]
pub(crate) async fn watch(
    State(state): State<AppState>,
    Extension(principal): Extension<ApiPrincipal>,
    Path((org_id, name)): Path<(String, String)>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    require_role(&principal, Role::Member)?;
    let pool = find(&state, &org_id, &name).await?;
    let mut rx = state.org_events.subscribe();
    let shutdown = state.shutdown.clone();
    let stream = async_stream(move |tx| async move {
        // One event at once, so a watcher that (re)connects looks at least once.
        if tx
            .send(Event::default().event("change").data("{}"))
            .await
            .is_err()
        {
            return;
        }
        loop {
            tokio::select! {
                got = rx.recv() => match got {
                    Ok(sig) if sig.org == pool.org_id && sig.pool.as_ref().is_none_or(|p| *p == pool.id) => {
                        if tx.send(Event::default().event("change").data("{}")).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        if tx.send(Event::default().event("change").data("{}")).await.is_err() {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
                () = shutdown.cancelled() => return,
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(10))))
}

/// A stream fed by a task through a small channel.
fn async_stream<F, Fut>(f: F) -> impl Stream<Item = Result<Event, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Event>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    use futures_util::StreamExt;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok)
}
