//! The spawn API (seed 001): run a workflow's current bundle on an instance.
//!
//! `POST /api/spawn {workflow_id}` builds the spawn config (as
//! `GET /api/internal/spawn/{workflowId}` does) into a `bundle.run` task and sends it to an
//! instance: a warm one of the pool named in the request, or of the org's pool labelled
//! `spawn`, or else the caller's own instance (created and bootstrapped on demand; then the
//! answer may be `503 INSTANCE_NOT_READY` with `retryAfterMs`). The spawn id is the seed's
//! `vmId`. A one-shot pool (`maxUse` 1) destroys the instance after the run.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use paddock_proto::{BundleTask, KIND_BUNDLE_RUN, Selector, TaskSpec, now_ms};
use paddock_store::{SpawnRow, TaskRow};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::ToSchema;

use crate::AppState;
use crate::api::bundles::spawn_config;
use crate::api::instances::vm_principal;
use crate::api::tasks::{insert, request_cancel};
use crate::error::{ApiError, AppJson};

/// Pools labelled with this serve spawns when the request names none.
pub(crate) const SPAWN_LABEL: &str = "spawn";

/// Most output returned by the status endpoint (the end of it).
const LOG_TAIL_CHARS: usize = 16 * 1024;

/// Body of `POST /api/spawn`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SpawnRequest {
    /// The workflow whose current bundle to run.
    pub workflow_id: String,
    /// A pool to take a warm instance from (default: the org's pool labelled `spawn`, else
    /// the caller's own instance).
    #[serde(default)]
    pub pool: Option<String>,
    /// Arguments for the entrypoint.
    #[serde(default)]
    pub args: Vec<String>,
    /// Environment for the entrypoint.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Run time limit (ms).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// A spawn as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SpawnView {
    /// Spawn id (seed 001's `vmId`).
    pub vm_id: String,
    /// `queued`, `dispatched`, `running`, `succeeded`, `failed`, `timed_out`, `canceled`, or
    /// `released` after `DELETE`.
    pub status: String,
    /// Workflow.
    pub workflow_id: String,
    /// Version run.
    pub version: u64,
    /// The `bundle.run` task.
    pub task_id: String,
    /// The instance running it, once known.
    pub instance_id: Option<String>,
    /// Times (ms since the Unix epoch).
    pub created_at: i64,
    /// Start of the run.
    pub started_at: Option<i64>,
    /// End of the run.
    pub finished_at: Option<i64>,
    /// Exit code of the entrypoint.
    pub exit_code: Option<i32>,
    /// Stable error code, when it failed.
    pub error_code: Option<String>,
    /// Error detail.
    pub error_message: Option<String>,
    /// The end of the output (stdout and stderr interleaved as received), at most 16 KiB.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logs: Option<String>,
    /// Whether `logs` lost its beginning.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logs_truncated: Option<bool>,
}

fn view(s: &SpawnRow, task: Option<&TaskRow>) -> SpawnView {
    let status = if s.released_at.is_some() {
        "released".to_string()
    } else {
        task.map_or("unknown".into(), |t| t.state.as_str().to_string())
    };
    SpawnView {
        vm_id: s.id.clone(),
        status,
        workflow_id: s.workflow_id.clone(),
        version: s.version,
        task_id: s.task_id.clone(),
        instance_id: s
            .instance_id
            .clone()
            .or_else(|| task.and_then(|t| t.agent_id.clone())),
        created_at: s.created_at,
        started_at: task.and_then(|t| t.started_at),
        finished_at: task.and_then(|t| t.finished_at),
        exit_code: task.and_then(|t| t.exit_code),
        error_code: task.and_then(|t| t.error_code.clone()),
        error_message: task.and_then(|t| t.error_message.clone()),
        logs: None,
        logs_truncated: None,
    }
}

/// Runs a workflow's current bundle on an instance; `202 {vmId, status}`.
#[utoipa::path(post, path = "/api/spawn", operation_id = "spawn", request_body = SpawnRequest,
    params(("X-User-Id" = Option<String>, Header)),
    responses((status = 202, body = SpawnView), (status = 404, body = crate::error::ErrorResponse), (status = 503, body = crate::error::ErrorResponse)))]
pub(crate) async fn spawn(
    State(state): State<AppState>,
    headers: HeaderMap,
    AppJson(req): AppJson<SpawnRequest>,
) -> Result<(StatusCode, Json<SpawnView>), ApiError> {
    let principal = vm_principal(&state, &headers).await?;
    let org_id = principal.org_id.clone();
    let cfg = spawn_config(&state, &org_id, &req.workflow_id).await?;
    // Where it runs.
    let pool = match &req.pool {
        Some(name) => Some(
            state
                .store
                .get_pool(&org_id, name)
                .await?
                .ok_or_else(|| ApiError::not_found("pool"))?,
        ),
        None => state
            .store
            .list_pools(&org_id)
            .await?
            .into_iter()
            .find(|p| p.labels.iter().any(|l| l == SPAWN_LABEL)),
    };
    let (selector, instance_id) = match &pool {
        Some(p) => (
            Selector {
                tag: Some(format!("pool:{}", p.name)),
                ..Default::default()
            },
            None,
        ),
        None => {
            let user = crate::instances::acting_user(&principal, &headers)?;
            let inst = crate::instances::ready_instance(
                &state,
                &org_id,
                &user,
                crate::instances::ticket(&headers),
            )
            .await?;
            (
                Selector {
                    instance: Some(inst.id.clone()),
                    ..Default::default()
                },
                Some(inst.id),
            )
        }
    };
    let spec = TaskSpec {
        kind: KIND_BUNDLE_RUN.into(),
        selector: Some(selector),
        shell: None,
        bundle: Some(BundleTask {
            url: cfg.bundle_url,
            sha256: cfg.bundle_hash.clone(),
            size: cfg.size,
            runtime: cfg.runtime,
            entrypoint: cfg.entrypoint,
            args: req.args,
            env: req.env,
            workflow_id: Some(cfg.workflow_id.clone()),
            version: Some(cfg.version),
        }),
        sandbox: Default::default(),
        timeout_ms: req.timeout_ms,
        queue_timeout_ms: None,
        max_attempts: None,
    };
    spec.validate().map_err(ApiError::invalid)?;
    let task_id = insert(&state, &org_id, spec).await?;
    let row = SpawnRow {
        id: uuid::Uuid::new_v4().to_string(),
        org_id: org_id.clone(),
        workflow_id: cfg.workflow_id,
        version: cfg.version,
        digest: cfg.bundle_hash,
        task_id,
        instance_id,
        pool: pool.map(|p| p.name),
        created_by: principal.token_id.clone(),
        created_at: now_ms(),
        released_at: None,
    };
    state.store.insert_spawn(&row).await?;
    let task = state.store.get_task(&org_id, &row.task_id).await?;
    Ok((StatusCode::ACCEPTED, Json(view(&row, task.as_ref()))))
}

/// The caller's org's active spawns.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct SpawnList {
    /// Newest first.
    pub spawns: Vec<SpawnView>,
}

/// Lists active (not released) spawns of the caller's org.
#[utoipa::path(get, path = "/api/spawn", operation_id = "list_spawns",
    responses((status = 200, body = SpawnList)))]
pub(crate) async fn list(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<SpawnList>, ApiError> {
    let principal = vm_principal(&state, &headers).await?;
    let rows = state.store.list_active_spawns(&principal.org_id).await?;
    let mut spawns = Vec::with_capacity(rows.len());
    for r in &rows {
        let task = state.store.get_task(&principal.org_id, &r.task_id).await?;
        spawns.push(view(r, task.as_ref()));
    }
    Ok(Json(SpawnList { spawns }))
}

async fn find(state: &AppState, org_id: &str, id: &str) -> Result<SpawnRow, ApiError> {
    state
        .store
        .get_spawn(org_id, id)
        .await?
        .ok_or_else(|| ApiError::not_found("spawn"))
}

/// State, timings, exit code and the end of the output of a spawn.
#[utoipa::path(get, path = "/api/spawn/{vm_id}/status", operation_id = "spawn_status",
    params(("vm_id" = String, Path)),
    responses((status = 200, body = SpawnView), (status = 404, body = crate::error::ErrorResponse)))]
pub(crate) async fn status(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(vm_id): Path<String>,
) -> Result<Json<SpawnView>, ApiError> {
    let principal = vm_principal(&state, &headers).await?;
    let row = find(&state, &principal.org_id, &vm_id).await?;
    let task = state
        .store
        .get_task(&principal.org_id, &row.task_id)
        .await?;
    let mut v = view(&row, task.as_ref());
    if let Some(t) = &task {
        let (logs, truncated) = log_tail(&state, t).await?;
        v.logs = Some(logs);
        v.logs_truncated = Some(truncated);
    }
    Ok(Json(v))
}

/// The end of a task's output: the stored result's when finished, else the live chunks.
async fn log_tail(state: &AppState, t: &TaskRow) -> Result<(String, bool), ApiError> {
    let mut text = String::new();
    let mut truncated = false;
    if let Some(r) = &t.result {
        text.push_str(&r.stdout);
        text.push_str(&r.stderr);
        truncated = r.stdout_truncated || r.stderr_truncated;
    } else if t.attempt > 0 {
        let mut after = 0;
        loop {
            let page = state
                .store
                .read_output(&t.id, t.attempt, after, 500)
                .await?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            for c in &page {
                text.push_str(&c.data);
            }
            if text.len() > 4 * LOG_TAIL_CHARS {
                let cut = text.len() - LOG_TAIL_CHARS;
                let cut = (cut..text.len())
                    .find(|i| text.is_char_boundary(*i))
                    .unwrap_or(text.len());
                text.drain(..cut);
                truncated = true;
            }
        }
    }
    if text.len() > LOG_TAIL_CHARS {
        let cut = text.len() - LOG_TAIL_CHARS;
        let cut = (cut..text.len())
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(text.len());
        text.drain(..cut);
        truncated = true;
    }
    Ok((text, truncated))
}

/// Stops a spawn's run (if still going) and releases it; a one-shot pool then destroys its
/// instance.
#[utoipa::path(delete, path = "/api/spawn/{vm_id}", operation_id = "release_spawn",
    params(("vm_id" = String, Path)),
    responses((status = 200, body = SpawnView), (status = 404, body = crate::error::ErrorResponse)))]
pub(crate) async fn release(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(vm_id): Path<String>,
) -> Result<Json<SpawnView>, ApiError> {
    let principal = vm_principal(&state, &headers).await?;
    let row = find(&state, &principal.org_id, &vm_id).await?;
    // Finished tasks need no cancel; `None` is fine.
    let _ = request_cancel(&state, &principal.org_id, &row.task_id).await?;
    state.store.release_spawn(&principal.org_id, &vm_id).await?;
    let row = find(&state, &principal.org_id, &vm_id).await?;
    let task = state
        .store
        .get_task(&principal.org_id, &row.task_id)
        .await?;
    Ok(Json(view(&row, task.as_ref())))
}
