//! Tasks: queued submission, submit-and-wait, reads, live output stream, cancel.
//!
//! Two submission modes (documented in `docs/protocol.md`):
//! - `POST /v1/orgs/{org}/tasks` queues the task and answers `202` at once; the task waits
//!   for an eligible agent until its queue deadline, then fails with `QUEUE_TIMEOUT`.
//! - `POST /v1/orgs/{org}/tasks/run` (and the seed's `POST /internal/v1/dispatch`) answers
//!   `503 NO_AGENT_AVAILABLE` at once when no connected agent could run the task, otherwise
//!   waits for the result.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::{Extension, Json};
use futures_util::Stream;
use paddock_proto::{ErrorCode, TaskSpec, now_ms};
use paddock_store::ApiPrincipal;
use paddock_store::{EventRow, NewTask, OutputRow, Role, TaskRow, TaskState};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use utoipa::{IntoParams, ToSchema};

use crate::AppState;
use crate::auth::require_role;
use crate::bus::{self, BusEvent};
use crate::error::{ApiError, AppJson};

/// Answer to a queued submission.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Submitted {
    /// Task id.
    pub task_id: String,
    /// Always `queued`.
    pub state: &'static str,
}

fn validate(spec: &TaskSpec) -> Result<(), ApiError> {
    spec.validate().map_err(ApiError::invalid)
}

/// The stored form of a submission: the spec with the gateway's defaults applied.
fn new_task(state: &AppState, org_id: &str, spec: TaskSpec) -> NewTask {
    let queue_timeout = spec
        .queue_timeout_ms
        .map_or(state.cfg.queue_timeout, Duration::from_millis);
    NewTask {
        id: None,
        org_id: org_id.to_string(),
        max_attempts: spec.max_attempts.unwrap_or(state.cfg.max_attempts),
        queue_deadline_at: now_ms() + queue_timeout.as_millis() as i64,
        spec,
    }
}

/// Stores a queued task (group-committed with concurrent submissions, see
/// [`crate::inserter`]) and wakes the dispatchers; returns its id.
pub(crate) async fn insert(
    state: &AppState,
    org_id: &str,
    spec: TaskSpec,
) -> Result<String, ApiError> {
    crate::inserter::submit(state, new_task(state, org_id, spec)).await
}

/// Query of `POST .../tasks`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SubmitQuery {
    /// Refuse with `503 NO_AGENT_AVAILABLE` instead of queueing when no connected agent
    /// could run the task.
    #[serde(default)]
    pub require_agent: bool,
}

/// Queues a task: `202` at once; it waits for an eligible agent until its queue deadline.
#[utoipa::path(post, path = "/v1/orgs/{org_id}/tasks", request_body(content = Object, description = "TaskSpec (docs/protocol.md)"),
    params(("org_id" = String, Path), ("X-Org-Id" = String, Header), SubmitQuery),
    responses((status = 202, body = Submitted), (status = 400, body = crate::error::ErrorResponse)))]
pub(crate) async fn submit(
    State(state): State<AppState>,
    Extension(principal): Extension<ApiPrincipal>,
    Path(org_id): Path<String>,
    Query(q): Query<SubmitQuery>,
    headers: HeaderMap,
    AppJson(mut spec): AppJson<TaskSpec>,
) -> Result<(StatusCode, Json<Submitted>), ApiError> {
    require_role(&principal, Role::Member)?;
    validate(&spec)?;
    resolve_instance(&state, Some(&principal), &headers, &org_id, &mut spec).await?;
    if q.require_agent && !any_eligible_agent(&state, &org_id, &spec).await? {
        return Err(no_agent());
    }
    let task_id = insert(&state, &org_id, spec).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(Submitted {
            task_id,
            state: "queued",
        }),
    ))
}

/// Most tasks in one `POST .../tasks/batch`.
pub(crate) const BATCH_MAX: usize = 1000;

/// Body of `POST .../tasks/batch`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BatchSubmit {
    /// Task specs (docs/protocol.md), 1 to 1,000.
    #[schema(value_type = Vec<Object>)]
    pub tasks: Vec<TaskSpec>,
}

/// Answer to a batch submission.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct BatchSubmitted {
    /// One entry per submitted spec, in order.
    pub tasks: Vec<Submitted>,
}

/// Queues up to 1,000 tasks in one request, all or none: every spec is checked first (a bad
/// one answers `400` naming its index and nothing is stored), then all are stored in one
/// transaction. Same semantics per task as `POST .../tasks` (without `requireAgent`).
#[utoipa::path(post, path = "/v1/orgs/{org_id}/tasks/batch", request_body = BatchSubmit,
    params(("org_id" = String, Path), ("X-Org-Id" = String, Header)),
    responses((status = 202, body = BatchSubmitted), (status = 400, body = crate::error::ErrorResponse)))]
pub(crate) async fn submit_batch(
    State(state): State<AppState>,
    Extension(principal): Extension<ApiPrincipal>,
    Path(org_id): Path<String>,
    headers: HeaderMap,
    AppJson(body): AppJson<BatchSubmit>,
) -> Result<(StatusCode, Json<BatchSubmitted>), ApiError> {
    require_role(&principal, Role::Member)?;
    if body.tasks.is_empty() || body.tasks.len() > BATCH_MAX {
        return Err(ApiError::invalid(format!(
            "`tasks` must hold 1 to {BATCH_MAX} task specs (got {})",
            body.tasks.len()
        )));
    }
    let mut new = Vec::with_capacity(body.tasks.len());
    for (i, mut spec) in body.tasks.into_iter().enumerate() {
        spec.validate()
            .map_err(|e| ApiError::invalid(format!("tasks[{i}]: {e}")))?;
        resolve_instance(&state, Some(&principal), &headers, &org_id, &mut spec).await?;
        new.push(new_task(&state, &org_id, spec));
    }
    let ids = state.store.insert_tasks(&new).await?;
    bus::publish(
        &state,
        BusEvent::TaskReady {
            org: org_id.clone(),
        },
    )
    .await;
    Ok((
        StatusCode::ACCEPTED,
        Json(BatchSubmitted {
            tasks: ids
                .into_iter()
                .map(|task_id| Submitted {
                    task_id,
                    state: "queued",
                })
                .collect(),
        }),
    ))
}

/// `selector.instance`: `self` becomes the caller's own instance (created and bootstrapped
/// on demand; `503 INSTANCE_NOT_READY` with `retryAfterMs` until its runtime connects); an
/// instance id must name one of the org's instances, and a user's instance only serves that
/// user (or an owner/admin). `principal` is `None` for the service token, which names the
/// user with `X-User-Id`.
async fn resolve_instance(
    state: &AppState,
    principal: Option<&ApiPrincipal>,
    headers: &HeaderMap,
    org_id: &str,
    spec: &mut TaskSpec,
) -> Result<(), ApiError> {
    let Some(sel) = spec.selector.as_mut() else {
        return Ok(());
    };
    let Some(wanted) = sel.instance.clone() else {
        return Ok(());
    };
    let user = match principal {
        Some(p) => Some(crate::instances::acting_user(p, headers)?),
        None => headers
            .get("x-user-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    };
    if wanted == crate::instances::SELF_INSTANCE {
        let user = user.ok_or_else(|| {
            ApiError::invalid("selector.instance `self` with the service token needs `X-User-Id`")
        })?;
        let ticket = crate::instances::ticket(headers);
        let inst = crate::instances::ready_instance(state, org_id, &user, ticket).await?;
        sel.instance = Some(inst.id);
        return Ok(());
    }
    let inst = state
        .store
        .get_instance(org_id, &wanted)
        .await?
        .ok_or_else(|| ApiError::not_found("instance"))?;
    let privileged = principal.is_none_or(|p| p.role >= Role::Admin);
    if let Some(owner) = &inst.user_id
        && !privileged
        && user.as_deref() != Some(owner.as_str())
    {
        return Err(ApiError::forbidden("this instance belongs to another user"));
    }
    Ok(())
}

/// Whether some live agent of the org could run this spec.
async fn any_eligible_agent(
    state: &AppState,
    org_id: &str,
    spec: &TaskSpec,
) -> Result<bool, ApiError> {
    let fresh_after = now_ms() - state.cfg.agent_stale.as_millis() as i64;
    let required = spec
        .selector
        .as_ref()
        .and_then(|s| s.required_tag().ok().flatten());
    // An agent connected to this replica answers without a query; the database knows the
    // agents connected to the other replicas.
    let local = state.hub.snapshot().iter().any(|h| {
        h.org_id == org_id
            && !h.close.is_cancelled()
            && (required.is_some() || !h.instance)
            && required.as_ref().is_none_or(|t| h.tags().contains(t))
            && h.kinds.contains(&spec.kind)
            && spec
                .sandbox
                .backend
                .as_ref()
                .is_none_or(|b| h.backends.contains(b))
    });
    if local {
        return Ok(true);
    }
    let agents = state.store.list_live_agents(org_id, fresh_after).await?;
    Ok(agents.iter().any(|a| {
        let caps = a.capabilities.clone().unwrap_or_default();
        // Instances take only work that selects them.
        let targeted_ok = required.is_some() || !crate::executor_ws::is_instance(a);
        targeted_ok
            && required.as_ref().is_none_or(|t| a.tags.contains(t))
            && caps.kinds.contains(&spec.kind)
            && spec
                .sandbox
                .backend
                .as_ref()
                .is_none_or(|b| caps.backends.contains(b))
    }))
}

fn no_agent() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::NoAgentAvailable,
        "no connected agent of this org can run the task (check the agent is running, its control-plane tags match the selector, and it offers the kind and backend)",
    )
}

/// Query of `POST .../tasks/run`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RunQuery {
    /// Longest time to hold the request open (default: the task's timeout plus 30 s).
    pub wait_ms: Option<u64>,
}

async fn submit_and_wait(
    state: &AppState,
    org_id: &str,
    spec: TaskSpec,
    wait_ms: Option<u64>,
) -> Result<(StatusCode, Json<TaskRow>), ApiError> {
    validate(&spec)?;
    if !any_eligible_agent(state, org_id, &spec).await? {
        return Err(no_agent());
    }
    let wait = Duration::from_millis(wait_ms.unwrap_or(spec.timeout_ms() + 30_000));
    // Subscribed before the task exists, so no change can be missed, and the first look is
    // after the first change (a task just stored is `queued`: no need to read it back).
    let task_id = paddock_store::new_task_id();
    let notify = state.waiters.subscribe_changes(&task_id);
    let notified = notify.notified();
    let mut new = new_task(state, org_id, spec);
    new.id = Some(task_id.clone());
    crate::inserter::submit(state, new).await?;
    let deadline = tokio::time::Instant::now() + wait;
    tokio::select! {
        () = notified => {}
        () = tokio::time::sleep(Duration::from_millis(1000)) => {}
        () = tokio::time::sleep_until(deadline) => {}
        () = state.shutdown.cancelled() => {}
    }
    let task = wait_terminal(state, org_id, &task_id, deadline).await?;
    let status = if task.state.is_terminal() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((status, Json(task)))
}

/// Waits until the task is finished or `deadline` passes; returns its latest row.
pub(crate) async fn wait_terminal(
    state: &AppState,
    org_id: &str,
    task_id: &str,
    deadline: tokio::time::Instant,
) -> Result<TaskRow, ApiError> {
    let notify = state.waiters.subscribe_changes(task_id);
    loop {
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let task = match state.waiters.take_finished(task_id) {
            Some(row) if row.org_id == org_id => row,
            _ => find_task(state, org_id, task_id).await?,
        };
        if task.state.is_terminal() || tokio::time::Instant::now() >= deadline {
            return Ok(task);
        }
        // The notification covers this replica; the timeout covers results stored elsewhere
        // when NOTIFY is not available.
        tokio::select! {
            () = notified => {}
            () = tokio::time::sleep(Duration::from_millis(1000)) => {}
            () = tokio::time::sleep_until(deadline) => {}
            () = state.shutdown.cancelled() => return Ok(task),
        }
    }
}

/// Submits a task and waits for its result; `503 NO_AGENT_AVAILABLE` when no connected agent
/// could run it. `200` with the finished task, or `202` if still running when the wait ends.
#[utoipa::path(post, path = "/v1/orgs/{org_id}/tasks/run", request_body(content = Object, description = "TaskSpec"),
    params(("org_id" = String, Path), ("X-Org-Id" = String, Header), RunQuery),
    responses((status = 200, body = Object), (status = 202, body = Object), (status = 503, body = crate::error::ErrorResponse)))]
pub(crate) async fn run(
    State(state): State<AppState>,
    Extension(principal): Extension<ApiPrincipal>,
    Path(org_id): Path<String>,
    Query(q): Query<RunQuery>,
    headers: HeaderMap,
    AppJson(mut spec): AppJson<TaskSpec>,
) -> Result<(StatusCode, Json<TaskRow>), ApiError> {
    require_role(&principal, Role::Member)?;
    validate(&spec)?;
    resolve_instance(&state, Some(&principal), &headers, &org_id, &mut spec).await?;
    submit_and_wait(&state, &org_id, spec, q.wait_ms).await
}

/// Body of `POST /internal/v1/dispatch`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct InternalDispatch {
    /// Org the task belongs to.
    pub org_id: String,
    /// The task.
    #[schema(value_type = Object)]
    pub task: TaskSpec,
    /// Longest wait.
    #[serde(default)]
    pub wait_ms: Option<u64>,
}

/// Service-to-service submit-and-wait (seed 004); never expose publicly.
#[utoipa::path(post, path = "/internal/v1/dispatch", request_body = InternalDispatch,
    params(("X-Service-Token" = String, Header)),
    responses((status = 200, body = Object), (status = 503, body = crate::error::ErrorResponse)))]
pub(crate) async fn internal_dispatch(
    State(state): State<AppState>,
    headers: HeaderMap,
    AppJson(body): AppJson<InternalDispatch>,
) -> Result<(StatusCode, Json<TaskRow>), ApiError> {
    if state.store.get_org(&body.org_id).await?.is_none() {
        return Err(ApiError::not_found("org"));
    }
    let mut task = body.task;
    validate(&task)?;
    resolve_instance(&state, None, &headers, &body.org_id, &mut task).await?;
    submit_and_wait(&state, &body.org_id, task, body.wait_ms).await
}

/// Reads a task with its result.
#[utoipa::path(get, path = "/v1/orgs/{org_id}/tasks/{task_id}",
    params(("org_id" = String, Path), ("task_id" = String, Path), ("X-Org-Id" = String, Header)),
    responses((status = 200, body = Object), (status = 404, body = crate::error::ErrorResponse)))]
pub(crate) async fn get(
    State(state): State<AppState>,
    Extension(principal): Extension<ApiPrincipal>,
    Path((org_id, task_id)): Path<(String, String)>,
) -> Result<Json<TaskRow>, ApiError> {
    require_role(&principal, Role::Member)?;
    let task = find_task(&state, &org_id, &task_id).await?;
    Ok(Json(task))
}

/// A task of the org, or `404 NOT_FOUND`.
async fn find_task(state: &AppState, org_id: &str, task_id: &str) -> Result<TaskRow, ApiError> {
    state
        .store
        .get_task(org_id, task_id)
        .await?
        .ok_or_else(|| ApiError::not_found("task"))
}

/// Query of the task list.
#[derive(Debug, Deserialize, IntoParams)]
pub(crate) struct ListQuery {
    /// Only tasks in this state.
    pub state: Option<String>,
    /// At most this many (default 50, max 500).
    pub limit: Option<u32>,
}

/// A page of tasks.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct TaskList {
    /// Newest first.
    #[schema(value_type = Vec<Object>)]
    pub tasks: Vec<TaskRow>,
}

/// Lists recent tasks.
#[utoipa::path(get, path = "/v1/orgs/{org_id}/tasks",
    params(("org_id" = String, Path), ("X-Org-Id" = String, Header), ListQuery),
    responses((status = 200, body = TaskList)))]
pub(crate) async fn list(
    State(state): State<AppState>,
    Extension(principal): Extension<ApiPrincipal>,
    Path(org_id): Path<String>,
    Query(q): Query<ListQuery>,
) -> Result<Json<TaskList>, ApiError> {
    require_role(&principal, Role::Member)?;
    let filter = match q.state.as_deref() {
        None => None,
        Some(s) => Some(
            TaskState::parse(s).ok_or_else(|| ApiError::invalid(format!("unknown state {s:?}")))?,
        ),
    };
    let tasks = state
        .store
        .list_tasks(&org_id, filter, q.limit.unwrap_or(50).clamp(1, 500))
        .await?;
    Ok(Json(TaskList { tasks }))
}

/// Query of the output endpoint.
#[derive(Debug, Deserialize, IntoParams)]
pub(crate) struct OutputQuery {
    /// Attempt (default: the current one).
    pub attempt: Option<u32>,
    /// Only chunks with a greater sequence number.
    pub after: Option<u64>,
}

/// Output chunks.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct OutputPage {
    /// Attempt the chunks belong to.
    pub attempt: u32,
    /// Chunks in order.
    #[schema(value_type = Vec<Object>)]
    pub chunks: Vec<OutputRow>,
}

/// Reads live output chunks of an attempt.
#[utoipa::path(get, path = "/v1/orgs/{org_id}/tasks/{task_id}/output",
    params(("org_id" = String, Path), ("task_id" = String, Path), ("X-Org-Id" = String, Header), OutputQuery),
    responses((status = 200, body = OutputPage)))]
pub(crate) async fn output(
    State(state): State<AppState>,
    Extension(principal): Extension<ApiPrincipal>,
    Path((org_id, task_id)): Path<(String, String)>,
    Query(q): Query<OutputQuery>,
) -> Result<Json<OutputPage>, ApiError> {
    require_role(&principal, Role::Member)?;
    let task = find_task(&state, &org_id, &task_id).await?;
    let attempt = q.attempt.unwrap_or(task.attempt);
    let chunks = state
        .store
        .read_output(&task_id, attempt, q.after.unwrap_or(0), 1000)
        .await?;
    Ok(Json(OutputPage { attempt, chunks }))
}

/// Events.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct EventList {
    /// Oldest first.
    #[schema(value_type = Vec<Object>)]
    pub events: Vec<EventRow>,
}

/// Reads a task's events (dispatches, re-queues, agent events).
#[utoipa::path(get, path = "/v1/orgs/{org_id}/tasks/{task_id}/events",
    params(("org_id" = String, Path), ("task_id" = String, Path), ("X-Org-Id" = String, Header)),
    responses((status = 200, body = EventList)))]
pub(crate) async fn events(
    State(state): State<AppState>,
    Extension(principal): Extension<ApiPrincipal>,
    Path((org_id, task_id)): Path<(String, String)>,
) -> Result<Json<EventList>, ApiError> {
    require_role(&principal, Role::Member)?;
    find_task(&state, &org_id, &task_id).await?;
    Ok(Json(EventList {
        events: state.store.list_events(&task_id).await?,
    }))
}

/// Cancels a task: a queued one at once, a running one through its agent.
#[utoipa::path(post, path = "/v1/orgs/{org_id}/tasks/{task_id}/cancel",
    params(("org_id" = String, Path), ("task_id" = String, Path), ("X-Org-Id" = String, Header)),
    responses((status = 200, description = "queued task canceled", body = Object), (status = 202, description = "cancel sent to the agent", body = Object),
        (status = 404, body = crate::error::ErrorResponse), (status = 409, description = "already finished", body = crate::error::ErrorResponse)))]
pub(crate) async fn cancel(
    State(state): State<AppState>,
    Extension(principal): Extension<ApiPrincipal>,
    Path((org_id, task_id)): Path<(String, String)>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    require_role(&principal, Role::Member)?;
    match request_cancel(&state, &org_id, &task_id).await? {
        None => {
            find_task(&state, &org_id, &task_id).await?;
            Err(ApiError::new(
                StatusCode::CONFLICT,
                ErrorCode::InvalidRequest,
                "the task has already finished",
            ))
        }
        Some(Cancellation::Done) => Ok((
            StatusCode::OK,
            Json(serde_json::json!({ "taskId": task_id, "state": "canceled" })),
        )),
        Some(Cancellation::Sent) => Ok((
            StatusCode::ACCEPTED,
            Json(serde_json::json!({ "taskId": task_id, "state": "canceling" })),
        )),
    }
}

/// What a cancel request did.
pub(crate) enum Cancellation {
    /// A queued task is canceled.
    Done,
    /// The running agent was told to stop.
    Sent,
}

/// Cancels a task: a queued one at once, a running one through its agent (on whichever
/// replica holds it). `None` when it had already finished (or does not exist).
pub(crate) async fn request_cancel(
    state: &AppState,
    org_id: &str,
    task_id: &str,
) -> Result<Option<Cancellation>, ApiError> {
    match state
        .store
        .cancel_task(org_id, task_id, state.cfg.results_ttl_ms())
        .await?
    {
        None => Ok(None),
        Some((TaskState::Canceled, _, _)) => {
            bus::publish(
                state,
                BusEvent::TaskChanged {
                    task: task_id.to_string(),
                },
            )
            .await;
            Ok(Some(Cancellation::Done))
        }
        Some((_, agent, attempt)) => {
            if let Some(agent) = agent {
                bus::publish(
                    state,
                    BusEvent::Cancel {
                        agent,
                        task: task_id.to_string(),
                        attempt,
                    },
                )
                .await;
            }
            Ok(Some(Cancellation::Sent))
        }
    }
}

struct Streamer {
    state: AppState,
    org_id: String,
    task_id: String,
    notify: Arc<Notify>,
    attempt: u32,
    after: u64,
    pending: VecDeque<Event>,
    done: bool,
}

fn sse_json(name: &str, value: &impl Serialize) -> Event {
    Event::default()
        .event(name)
        .data(serde_json::to_string(value).unwrap_or_else(|_| "null".into()))
}

impl Streamer {
    async fn next_event(&mut self) -> Option<Event> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Some(ev);
            }
            if self.done || self.state.shutdown.is_cancelled() {
                return None;
            }
            let notify = self.notify.clone();
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let task = match self.state.store.get_task(&self.org_id, &self.task_id).await {
                Ok(Some(t)) => t,
                Ok(None) => {
                    self.done = true;
                    self.pending.push_back(sse_json(
                        "error",
                        &serde_json::json!({"code": "NOT_FOUND", "message": "task not found"}),
                    ));
                    continue;
                }
                Err(e) => {
                    tracing::warn!("stream read failed: {e}");
                    self.done = true;
                    self.pending.push_back(sse_json("error", &serde_json::json!({"code": "UNAVAILABLE", "message": "database unavailable"})));
                    continue;
                }
            };
            if task.attempt != self.attempt && task.attempt > 0 {
                self.attempt = task.attempt;
                self.after = 0;
                self.pending.push_back(sse_json(
                    "attempt",
                    &serde_json::json!({"attempt": task.attempt}),
                ));
            }
            let chunks = if self.attempt > 0 {
                self.state
                    .store
                    .read_output(&self.task_id, self.attempt, self.after, 500)
                    .await
                    .unwrap_or_default()
            } else {
                Vec::new()
            };
            if let Some(last) = chunks.last() {
                self.after = last.seq;
            }
            let had_chunks = !chunks.is_empty();
            for c in chunks {
                self.pending.push_back(sse_json("output", &c));
            }
            if !had_chunks && task.state.is_terminal() {
                self.pending.push_back(sse_json("result", &task));
                self.done = true;
                continue;
            }
            if !self.pending.is_empty() {
                continue;
            }
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
                () = self.state.shutdown.cancelled() => return None,
            }
        }
    }
}

/// Streams a task as server-sent events: `attempt`, `output` (chunks in order), then one
/// `result` with the finished task. Ends after `result`.
#[utoipa::path(get, path = "/v1/orgs/{org_id}/tasks/{task_id}/stream",
    params(("org_id" = String, Path), ("task_id" = String, Path), ("X-Org-Id" = String, Header)),
    responses((status = 200, description = "text/event-stream")))]
pub(crate) async fn stream(
    State(state): State<AppState>,
    Extension(principal): Extension<ApiPrincipal>,
    Path((org_id, task_id)): Path<(String, String)>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    require_role(&principal, Role::Member)?;
    find_task(&state, &org_id, &task_id).await?;
    let notify = state.waiters.subscribe(&task_id);
    let streamer = Streamer {
        state,
        org_id,
        task_id,
        notify,
        attempt: 0,
        after: 0,
        pending: VecDeque::new(),
        done: false,
    };
    let s = futures_util::stream::unfold(streamer, |mut st| async move {
        st.next_event().await.map(|ev| (Ok(ev), st))
    });
    Ok(Sse::new(s).keep_alive(KeepAlive::default()))
}
