//! Pairing, agents, control-plane tags, revocation and managed executors (seed 004).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use paddock_proto::ErrorCode;
use paddock_store::ApiPrincipal;
use paddock_store::{Agent, PairingError, Role};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::AppState;
use crate::auth::require_role;
use crate::bus::{self, BusEvent};
use crate::error::{ApiError, AppJson};

/// A pairing token (valid 15 minutes, single use).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PairingToken {
    /// The token.
    pub token: String,
    /// Expiry (ms since epoch).
    pub expires_at: i64,
    /// The org it pairs into.
    pub org_id: String,
    /// A ready-to-run connect command.
    pub connect_command: String,
}

/// Creates a pairing token (owner/admin).
#[utoipa::path(post, path = "/v1/orgs/{org_id}/agents/pairing-tokens",
    params(("org_id" = String, Path), ("X-Org-Id" = String, Header)),
    responses((status = 201, body = PairingToken), (status = 403, body = crate::error::ErrorResponse)))]
pub(crate) async fn create_pairing_token(
    State(state): State<AppState>,
    Extension(principal): Extension<ApiPrincipal>,
    Path(org_id): Path<String>,
) -> Result<(StatusCode, Json<PairingToken>), ApiError> {
    require_role(&principal, Role::Admin)?;
    let me = &principal;
    let (token, expires_at) = state
        .store
        .create_pairing_token(&org_id, &me.token_id)
        .await?;
    let connect_command = format!(
        "paddock agent connect --pairing-token {token} --api-base {}",
        state.cfg.http_url
    );
    Ok((
        StatusCode::CREATED,
        Json(PairingToken {
            token,
            expires_at,
            org_id,
            connect_command,
        }),
    ))
}

/// Body of `POST /v1/agents/pair`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct PairRequest {
    /// The pairing token.
    pub pairing_token: String,
    /// A display name (defaults to "agent").
    #[serde(default)]
    pub name: Option<String>,
}

/// Credentials of a new agent (the token is shown once).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct AgentCredentials {
    /// Agent id.
    pub agent_id: String,
    /// Org id.
    pub org_id: String,
    /// Agent token `<orgId>.<secret>`.
    pub agent_token: String,
    /// Where to connect.
    pub gateway_ws_url: String,
}

/// Exchanges a pairing token for an agent token.
#[utoipa::path(post, path = "/v1/agents/pair", request_body = PairRequest,
    responses((status = 201, body = AgentCredentials), (status = 401, body = crate::error::ErrorResponse)))]
pub(crate) async fn pair(
    State(state): State<AppState>,
    AppJson(body): AppJson<PairRequest>,
) -> Result<(StatusCode, Json<AgentCredentials>), ApiError> {
    let name = body
        .name
        .as_deref()
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .unwrap_or("agent");
    if name.len() > 200 {
        return Err(ApiError::invalid("name is longer than 200 characters"));
    }
    match state
        .store
        .pair_agent(body.pairing_token.trim(), name, paddock_proto::now_ms())
        .await?
    {
        Ok((agent, agent_token)) => {
            tracing::info!(agent = %agent.id, org = %agent.org_id, "agent paired");
            Ok((
                StatusCode::CREATED,
                Json(AgentCredentials {
                    agent_id: agent.id,
                    org_id: agent.org_id,
                    agent_token,
                    gateway_ws_url: state.cfg.ws_url.clone(),
                }),
            ))
        }
        Err(e) => {
            let code = match e {
                PairingError::Invalid => ErrorCode::PairingTokenInvalid,
                PairingError::Expired => ErrorCode::PairingTokenExpired,
                PairingError::Used => ErrorCode::PairingTokenUsed,
            };
            Err(ApiError::new(StatusCode::UNAUTHORIZED, code, e.to_string()))
        }
    }
}

/// An agent as shown by the API: stored fields plus `status`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct AgentView {
    /// Stored agent.
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub agent: Agent,
    /// `online` or `offline` (`last_seen_at` against `GATEWAY_AGENT_STALE_MS`), or `revoked`.
    pub status: &'static str,
}

fn view(state: &AppState, agent: Agent) -> AgentView {
    // Clamp the staleness window to [5 s, 1 h], as seed 004 asks.
    let stale = (state.cfg.agent_stale.as_millis() as i64).clamp(5_000, 3_600_000);
    let now = paddock_proto::now_ms();
    let status = if agent.revoked_at.is_some() {
        "revoked"
    } else if agent.connected_replica.is_some()
        && agent.last_seen_at.is_some_and(|t| now - t <= stale)
    {
        "online"
    } else {
        "offline"
    };
    AgentView { agent, status }
}

/// List of agents.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct AgentList {
    /// Agents, oldest first.
    pub agents: Vec<AgentView>,
}

/// Lists the org's agents.
#[utoipa::path(get, path = "/v1/orgs/{org_id}/agents",
    params(("org_id" = String, Path), ("X-Org-Id" = String, Header)),
    responses((status = 200, body = AgentList)))]
pub(crate) async fn list_agents(
    State(state): State<AppState>,
    Extension(principal): Extension<ApiPrincipal>,
    Path(org_id): Path<String>,
) -> Result<Json<AgentList>, ApiError> {
    require_role(&principal, Role::Member)?;
    let agents = state.store.list_agents(&org_id).await?;
    Ok(Json(AgentList {
        agents: agents.into_iter().map(|a| view(&state, a)).collect(),
    }))
}

/// Reads one agent.
#[utoipa::path(get, path = "/v1/orgs/{org_id}/agents/{agent_id}",
    params(("org_id" = String, Path), ("agent_id" = String, Path), ("X-Org-Id" = String, Header)),
    responses((status = 200, body = AgentView), (status = 404, body = crate::error::ErrorResponse)))]
pub(crate) async fn get_agent(
    State(state): State<AppState>,
    Extension(principal): Extension<ApiPrincipal>,
    Path((org_id, agent_id)): Path<(String, String)>,
) -> Result<Json<AgentView>, ApiError> {
    require_role(&principal, Role::Member)?;
    let agent = state
        .store
        .get_agent(&org_id, &agent_id)
        .await?
        .ok_or_else(|| ApiError::not_found("agent"))?;
    Ok(Json(view(&state, agent)))
}

/// Body of `PUT .../tags`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SetTags {
    /// Control-plane tags (`group:<name>` for groups).
    pub tags: Vec<String>,
}

pub(crate) fn validate_tags(tags: &[String]) -> Result<Vec<String>, ApiError> {
    if tags.len() > 64 {
        return Err(ApiError::invalid("at most 64 tags"));
    }
    let mut out: Vec<String> = Vec::new();
    for t in tags {
        let t = t.trim();
        if t.is_empty()
            || t.len() > 128
            || t.chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == ',')
        {
            return Err(ApiError::invalid(format!(
                "invalid tag {t:?}: 1-128 characters, no spaces or commas"
            )));
        }
        if !out.iter().any(|o| o == t) {
            out.push(t.to_string());
        }
    }
    Ok(out)
}

/// Replaces an agent's control-plane tags (owner/admin). Only these route work.
#[utoipa::path(put, path = "/v1/orgs/{org_id}/agents/{agent_id}/tags", request_body = SetTags,
    params(("org_id" = String, Path), ("agent_id" = String, Path), ("X-Org-Id" = String, Header)),
    responses((status = 200, body = AgentView), (status = 404, body = crate::error::ErrorResponse)))]
pub(crate) async fn set_tags(
    State(state): State<AppState>,
    Extension(principal): Extension<ApiPrincipal>,
    Path((org_id, agent_id)): Path<(String, String)>,
    AppJson(body): AppJson<SetTags>,
) -> Result<Json<AgentView>, ApiError> {
    require_role(&principal, Role::Admin)?;
    let tags = validate_tags(&body.tags)?;
    let agent = state
        .store
        .set_agent_tags(&org_id, &agent_id, &tags)
        .await?
        .ok_or_else(|| ApiError::not_found("agent"))?;
    bus::publish(
        &state,
        BusEvent::AgentTags {
            agent: agent_id,
            tags,
        },
    )
    .await;
    Ok(Json(view(&state, agent)))
}

/// Revokes an agent (owner/admin); its live connection is closed at once.
#[utoipa::path(post, path = "/v1/orgs/{org_id}/agents/{agent_id}/revoke",
    params(("org_id" = String, Path), ("agent_id" = String, Path), ("X-Org-Id" = String, Header)),
    responses((status = 200, body = AgentView), (status = 404, body = crate::error::ErrorResponse)))]
pub(crate) async fn revoke(
    State(state): State<AppState>,
    Extension(principal): Extension<ApiPrincipal>,
    Path((org_id, agent_id)): Path<(String, String)>,
) -> Result<Json<AgentView>, ApiError> {
    require_role(&principal, Role::Admin)?;
    let agent = state
        .store
        .revoke_agent(&org_id, &agent_id)
        .await?
        .ok_or_else(|| ApiError::not_found("agent"))?;
    tracing::info!(agent = %agent_id, org = %org_id, "agent revoked");
    bus::publish(&state, BusEvent::AgentRevoked { agent: agent_id }).await;
    Ok(Json(view(&state, agent)))
}

/// Body of `POST /internal/v1/managed-executors/issue`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct IssueManaged {
    /// Org the executor serves.
    pub org_id: String,
    /// Display name.
    #[serde(default)]
    pub name: Option<String>,
    /// Control-plane tags.
    #[serde(default)]
    pub tags: Vec<String>,
}

/// Credentials of a managed executor (seed 004 names).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ManagedCredentials {
    /// Executor (agent) id.
    pub executor_id: String,
    /// Executor token `<orgId>.<secret>`.
    pub executor_token: String,
    /// Org id.
    pub org_id: String,
    /// Where to connect.
    pub gateway_ws_url: String,
}

/// Issues a managed executor token (service token).
#[utoipa::path(post, path = "/internal/v1/managed-executors/issue", request_body = IssueManaged,
    params(("X-Service-Token" = String, Header)),
    responses((status = 201, body = ManagedCredentials), (status = 401, body = crate::error::ErrorResponse)))]
pub(crate) async fn issue_managed(
    State(state): State<AppState>,
    AppJson(body): AppJson<IssueManaged>,
) -> Result<(StatusCode, Json<ManagedCredentials>), ApiError> {
    if state.store.get_org(&body.org_id).await?.is_none() {
        return Err(ApiError::not_found("org"));
    }
    let tags = validate_tags(&body.tags)?;
    let name = body.name.as_deref().unwrap_or("managed");
    let (agent, token) = state
        .store
        .issue_managed_agent(&body.org_id, name, &tags)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(ManagedCredentials {
            executor_id: agent.id,
            executor_token: token,
            org_id: agent.org_id,
            gateway_ws_url: state.cfg.ws_url.clone(),
        }),
    ))
}

/// Revokes a managed executor (service token).
#[utoipa::path(post, path = "/internal/v1/managed-executors/{executor_id}/revoke",
    params(("executor_id" = String, Path), ("X-Service-Token" = String, Header)),
    responses((status = 200, body = AgentView), (status = 404, body = crate::error::ErrorResponse)))]
pub(crate) async fn revoke_managed(
    State(state): State<AppState>,
    Path(executor_id): Path<String>,
) -> Result<Json<AgentView>, ApiError> {
    let agent = state
        .store
        .find_agent(&executor_id)
        .await?
        .ok_or_else(|| ApiError::not_found("executor"))?;
    let agent = state
        .store
        .revoke_agent(&agent.org_id, &executor_id)
        .await?
        .ok_or_else(|| ApiError::not_found("executor"))?;
    bus::publish(&state, BusEvent::AgentRevoked { agent: executor_id }).await;
    Ok(Json(view(&state, agent)))
}
