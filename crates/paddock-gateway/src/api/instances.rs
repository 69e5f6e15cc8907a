//! Instances: the seed-000 status and rebootstrap endpoints for the caller's own instance,
//! and the org-scoped endpoints a pool supervisor drives (token, deregister, terminate,
//! fail, list).

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::{Extension, Json};
use paddock_proto::ErrorCode;
use paddock_store::{ApiPrincipal, Instance, InstanceStatus, Role};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::{IntoParams, ToSchema};

use crate::AppState;
use crate::auth::require_role;
use crate::error::{ApiError, AppJson};
use crate::instances::{acting_user, instance_changed, ticket};

/// `GET /api/v1/vm/status` (seed 000).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct VmStatus {
    /// `none` when the caller has no instance yet, else the instance's status.
    pub status: String,
    /// Instance id.
    pub instance_id: Option<String>,
    /// Bootstrap attempts.
    pub bootstrap_attempts: u32,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// When a caller should look again (while starting or provisioning), else `null`.
    pub retry_after_ms: Option<u64>,
}

/// Authenticates an API token for the seed's `/api/v1/vm/*` paths: the org is the token's
/// (an `X-Org-Id` header, if sent, must match).
pub(crate) async fn vm_principal(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<ApiPrincipal, ApiError> {
    let principal = crate::auth::api_principal(state, headers).await?;
    if let Some(h) = headers.get("x-org-id").and_then(|v| v.to_str().ok())
        && h != principal.org_id
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::OrgMismatch,
            "the token and the X-Org-Id header name different orgs",
        ));
    }
    Ok(principal)
}

fn vm_status(inst: Option<&Instance>, cooldown_ms: u64) -> VmStatus {
    let Some(inst) = inst else {
        return VmStatus {
            status: "none".into(),
            instance_id: None,
            bootstrap_attempts: 0,
            last_error: None,
            retry_after_ms: None,
        };
    };
    let retry_after_ms = match inst.status {
        InstanceStatus::Provisioning => Some(1000),
        InstanceStatus::Starting | InstanceStatus::Disconnected => {
            let since = inst
                .last_bootstrap_at
                .map_or(cooldown_ms as i64, |t| paddock_proto::now_ms() - t);
            Some((cooldown_ms as i64 - since).max(0) as u64)
        }
        _ => None,
    };
    VmStatus {
        status: inst.status.as_str().into(),
        instance_id: Some(inst.id.clone()),
        bootstrap_attempts: inst.bootstrap_attempts,
        last_error: inst.last_error.clone(),
        retry_after_ms,
    }
}

/// The caller's instance (seed 000): `status` (`none` if there is none yet), `instanceId`,
/// `bootstrapAttempts`, `lastError`, `retryAfterMs`. Owner/admin tokens may name a user
/// with `X-User-Id`.
#[utoipa::path(operation_id = "vm_status", get, path = "/api/v1/vm/status",
    params(("X-User-Id" = Option<String>, Header)),
    responses((status = 200, body = VmStatus), (status = 401, body = crate::error::ErrorResponse)))]
pub(crate) async fn status(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<VmStatus>, ApiError> {
    let principal = vm_principal(&state, &headers).await?;
    let user = acting_user(&principal, &headers)?;
    let inst = state.store.user_instance(&principal.org_id, &user).await?;
    Ok(Json(vm_status(
        inst.as_ref(),
        state.cfg.instances.cooldown.as_millis() as u64,
    )))
}

/// Answer of `POST /api/v1/vm/rebootstrap`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Rebootstrapped {
    /// Whether a bootstrap was started (false when the instance is connected already).
    pub triggered: bool,
    /// The instance afterwards.
    #[serde(flatten)]
    pub vm: VmStatus,
}

/// Forces a bootstrap of the caller's instance (seed 000): bypasses the cooldown and the
/// spent attempts; the instance is `provisioning` when triggered. Creates the instance if
/// the caller has none.
#[utoipa::path(operation_id = "vm_rebootstrap", post, path = "/api/v1/vm/rebootstrap",
    params(("X-User-Id" = Option<String>, Header), ("X-VM-Ticket" = Option<String>, Header)),
    responses((status = 202, body = Rebootstrapped), (status = 200, body = Rebootstrapped), (status = 503, body = crate::error::ErrorResponse)))]
pub(crate) async fn rebootstrap(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<Rebootstrapped>), ApiError> {
    let principal = vm_principal(&state, &headers).await?;
    let user = acting_user(&principal, &headers)?;
    let (inst, triggered) =
        crate::instances::rebootstrap(&state, &principal.org_id, &user, ticket(&headers)).await?;
    let code = if triggered {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((
        code,
        Json(Rebootstrapped {
            triggered,
            vm: vm_status(Some(&inst), state.cfg.instances.cooldown.as_millis() as u64),
        }),
    ))
}

/// A token for an instance's runtime, and the environment to start it with.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct InstanceLaunch {
    /// The instance.
    pub instance: Instance,
    /// `VM_TOKEN`: short-lived, for this instance only. Treat as a secret.
    pub token: String,
    /// `CONTROL_PLANE_WS`.
    pub control_plane_ws: String,
    /// Every variable the runtime needs (`VM_*`, `CONTROL_PLANE_WS`).
    pub env: BTreeMap<String, String>,
}

pub(crate) fn launch(state: &AppState, inst: Instance, pool: Option<&str>) -> InstanceLaunch {
    let token = crate::instances::token_for(state, &inst);
    let env = crate::instances::runtime_env(state, &inst, &token, pool)
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    InstanceLaunch {
        instance: inst,
        token,
        control_plane_ws: state.cfg.vm_ws_url(),
        env,
    }
}

/// Query of the instance list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ListQuery {
    /// Only this pool's instances (by name).
    pub pool: Option<String>,
    /// Include terminated instances.
    #[serde(default)]
    pub all: bool,
}

/// The org's instances, oldest first (terminated ones with `all=true`).
#[utoipa::path(operation_id = "list_instances", get, path = "/v1/orgs/{org_id}/instances",
    params(("org_id" = String, Path), ("X-Org-Id" = String, Header), ListQuery),
    responses((status = 200, body = Vec<Instance>)))]
pub(crate) async fn list(
    State(state): State<AppState>,
    Extension(principal): Extension<ApiPrincipal>,
    Path(org_id): Path<String>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<Instance>>, ApiError> {
    require_role(&principal, Role::Member)?;
    let pool_id = match &q.pool {
        Some(name) => Some(
            state
                .store
                .get_pool(&org_id, name)
                .await?
                .ok_or_else(|| ApiError::not_found("pool"))?
                .id,
        ),
        None => None,
    };
    Ok(Json(
        state
            .store
            .list_instances(&org_id, pool_id.as_deref(), q.all)
            .await?,
    ))
}

async fn find(state: &AppState, org_id: &str, id: &str) -> Result<Instance, ApiError> {
    state
        .store
        .get_instance(org_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found("instance"))
}

/// One instance.
#[utoipa::path(operation_id = "get_instance", get, path = "/v1/orgs/{org_id}/instances/{instance_id}",
    params(("org_id" = String, Path), ("instance_id" = String, Path), ("X-Org-Id" = String, Header)),
    responses((status = 200, body = Instance), (status = 404, body = crate::error::ErrorResponse)))]
pub(crate) async fn get(
    State(state): State<AppState>,
    Extension(principal): Extension<ApiPrincipal>,
    Path((org_id, id)): Path<(String, String)>,
) -> Result<Json<Instance>, ApiError> {
    require_role(&principal, Role::Member)?;
    Ok(Json(find(&state, &org_id, &id).await?))
}

fn gone(inst: &Instance) -> ApiError {
    ApiError::new(
        StatusCode::GONE,
        ErrorCode::InstanceGone,
        format!("instance {} is {}", inst.id, inst.status.as_str()),
    )
    .with_instance(inst)
}

fn busy(inst: &Instance) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        ErrorCode::InstanceBusy,
        format!("instance {} is running a task", inst.id),
    )
    .with_instance(inst)
}

/// A fresh token for an instance's runtime (owner/admin), e.g. to restart it.
#[utoipa::path(operation_id = "instance_token", post, path = "/v1/orgs/{org_id}/instances/{instance_id}/token",
    params(("org_id" = String, Path), ("instance_id" = String, Path), ("X-Org-Id" = String, Header)),
    responses((status = 200, body = InstanceLaunch), (status = 410, body = crate::error::ErrorResponse)))]
pub(crate) async fn token(
    State(state): State<AppState>,
    Extension(principal): Extension<ApiPrincipal>,
    Path((org_id, id)): Path<(String, String)>,
) -> Result<Json<InstanceLaunch>, ApiError> {
    require_role(&principal, Role::Admin)?;
    let inst = find(&state, &org_id, &id).await?;
    if matches!(
        inst.status,
        InstanceStatus::Terminated | InstanceStatus::Failed
    ) {
        return Err(gone(&inst));
    }
    let pool = match &inst.pool_id {
        Some(p) => state.store.get_pool_by_id(p).await?.map(|p| p.name),
        None => None,
    };
    Ok(Json(launch(&state, inst, pool.as_deref())))
}

/// Deregisters an instance before its destruction: `draining`, it takes no more work.
/// `409 INSTANCE_BUSY` while it runs a task (never destroy it then).
#[utoipa::path(operation_id = "deregister_instance", post, path = "/v1/orgs/{org_id}/instances/{instance_id}/deregister",
    params(("org_id" = String, Path), ("instance_id" = String, Path), ("X-Org-Id" = String, Header)),
    responses((status = 200, body = Instance), (status = 409, body = crate::error::ErrorResponse)))]
pub(crate) async fn deregister(
    State(state): State<AppState>,
    Extension(principal): Extension<ApiPrincipal>,
    Path((org_id, id)): Path<(String, String)>,
) -> Result<Json<Instance>, ApiError> {
    require_role(&principal, Role::Admin)?;
    match state.store.deregister_instance(&org_id, &id).await? {
        None => Err(ApiError::not_found("instance")),
        Some(Ok(inst)) => {
            instance_changed(&state, &inst).await;
            Ok(Json(inst))
        }
        Some(Err(_)) => Err(busy(&find(&state, &org_id, &id).await?)),
    }
}

/// Body of terminate and fail.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct Reason {
    /// Why (kept as the instance's `lastError`).
    #[serde(default)]
    pub error: Option<String>,
}

/// Records an instance as destroyed: `terminated`, its token revoked and its live
/// connection (if any) closed. `409 INSTANCE_BUSY` while it runs a task.
#[utoipa::path(operation_id = "terminate_instance", post, path = "/v1/orgs/{org_id}/instances/{instance_id}/terminate",
    request_body = Reason,
    params(("org_id" = String, Path), ("instance_id" = String, Path), ("X-Org-Id" = String, Header)),
    responses((status = 200, body = Instance), (status = 409, body = crate::error::ErrorResponse)))]
pub(crate) async fn terminate(
    State(state): State<AppState>,
    Extension(principal): Extension<ApiPrincipal>,
    Path((org_id, id)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Result<Json<Instance>, ApiError> {
    require_role(&principal, Role::Admin)?;
    // The body is optional.
    let reason: Reason = if body.iter().all(u8::is_ascii_whitespace) {
        Reason::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::invalid(e.to_string()))?
    };
    match state
        .store
        .terminate_instance(&org_id, &id, reason.error.as_deref())
        .await?
    {
        None => Err(ApiError::not_found("instance")),
        Some(Ok(inst)) => {
            crate::bus::publish(
                &state,
                crate::bus::BusEvent::AgentRevoked {
                    agent: inst.id.clone(),
                },
            )
            .await;
            instance_changed(&state, &inst).await;
            Ok(Json(inst))
        }
        Some(Err(_)) => Err(busy(&find(&state, &org_id, &id).await?)),
    }
}

/// Marks an instance `failed` with a reason (the provider could not make it, or it missed
/// its boot deadline).
#[utoipa::path(operation_id = "fail_instance", post, path = "/v1/orgs/{org_id}/instances/{instance_id}/fail",
    request_body = Reason,
    params(("org_id" = String, Path), ("instance_id" = String, Path), ("X-Org-Id" = String, Header)),
    responses((status = 200, body = Instance), (status = 409, body = crate::error::ErrorResponse)))]
pub(crate) async fn fail(
    State(state): State<AppState>,
    Extension(principal): Extension<ApiPrincipal>,
    Path((org_id, id)): Path<(String, String)>,
    AppJson(reason): AppJson<Reason>,
) -> Result<Json<Instance>, ApiError> {
    require_role(&principal, Role::Admin)?;
    let error = reason.error.unwrap_or_else(|| "failed".into());
    let changed = state.store.fail_instance(&org_id, &id, &error).await?;
    let inst = find(&state, &org_id, &id).await?;
    if !changed && inst.status == InstanceStatus::Busy {
        return Err(busy(&inst));
    }
    if changed {
        instance_changed(&state, &inst).await;
    }
    Ok(Json(inst))
}
