//! Orgs and API tokens.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::{Extension, Json};
use paddock_store::ApiPrincipal;
use paddock_store::{Org, Role};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::AppState;
use crate::auth::require_role;
use crate::error::{ApiError, AppJson};

/// Body of `POST /v1/orgs`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct CreateOrg {
    /// Display name.
    pub name: String,
}

/// A new org and its first owner token (shown once).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CreatedOrg {
    /// The org.
    #[schema(value_type = Object)]
    pub org: Org,
    /// Owner API token.
    pub owner_token: String,
}

/// Creates an org with an owner token (service token required).
#[utoipa::path(post, path = "/v1/orgs", request_body = CreateOrg,
    responses((status = 201, body = CreatedOrg), (status = 401, body = crate::error::ErrorResponse)),
    params(("X-Service-Token" = String, Header, description = "GATEWAY_SERVICE_TOKEN")))]
pub(crate) async fn create_org(
    State(state): State<AppState>,
    AppJson(body): AppJson<CreateOrg>,
) -> Result<(StatusCode, Json<CreatedOrg>), ApiError> {
    let name = body.name.trim();
    if name.is_empty() || name.len() > 200 {
        return Err(ApiError::invalid("name must be 1 to 200 characters"));
    }
    let org = state.store.create_org(name).await?;
    let (_, owner_token) = state
        .store
        .create_api_token(&org.id, Role::Owner, "owner")
        .await?;
    tracing::info!(org = %org.id, "org created");
    Ok((StatusCode::CREATED, Json(CreatedOrg { org, owner_token })))
}

/// Reads an org.
#[utoipa::path(get, path = "/v1/orgs/{org_id}",
    params(("org_id" = String, Path), ("X-Org-Id" = String, Header)),
    responses((status = 200, body = Object), (status = 403, body = crate::error::ErrorResponse)))]
pub(crate) async fn get_org(
    State(state): State<AppState>,
    Extension(principal): Extension<ApiPrincipal>,
    Path(org_id): Path<String>,
) -> Result<Json<Org>, ApiError> {
    require_role(&principal, Role::Member)?;
    let org = state
        .store
        .get_org(&org_id)
        .await?
        .ok_or_else(|| ApiError::not_found("org"))?;
    Ok(Json(org))
}

/// Body of `POST /v1/orgs/{org_id}/tokens`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct CreateToken {
    /// A label for the token.
    pub name: String,
    /// `owner`, `admin` or `member`.
    pub role: String,
}

/// A new API token (shown once).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CreatedToken {
    /// Token id (for revocation).
    pub id: String,
    /// The secret.
    pub token: String,
    /// Role.
    pub role: String,
}

/// Creates an API token (admin; only owners create owner tokens).
#[utoipa::path(post, path = "/v1/orgs/{org_id}/tokens", request_body = CreateToken,
    params(("org_id" = String, Path), ("X-Org-Id" = String, Header)),
    responses((status = 201, body = CreatedToken), (status = 403, body = crate::error::ErrorResponse)))]
pub(crate) async fn create_token(
    State(state): State<AppState>,
    Extension(principal): Extension<ApiPrincipal>,
    Path(org_id): Path<String>,
    AppJson(body): AppJson<CreateToken>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    require_role(&principal, Role::Admin)?;
    let me = &principal;
    let role = Role::parse(&body.role)
        .ok_or_else(|| ApiError::invalid("role must be owner, admin or member"))?;
    if role > me.role {
        return Err(ApiError::forbidden(
            "cannot create a token with a higher role than your own",
        ));
    }
    let (id, token) = state
        .store
        .create_api_token(&org_id, role, body.name.trim())
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            id,
            token,
            role: role.as_str().into(),
        }),
    ))
}

/// Revokes an API token (admin).
#[utoipa::path(delete, path = "/v1/orgs/{org_id}/tokens/{token_id}",
    params(("org_id" = String, Path), ("token_id" = String, Path), ("X-Org-Id" = String, Header)),
    responses((status = 204), (status = 404, body = crate::error::ErrorResponse)))]
pub(crate) async fn revoke_token(
    State(state): State<AppState>,
    Extension(principal): Extension<ApiPrincipal>,
    Path((org_id, token_id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    require_role(&principal, Role::Admin)?;
    if state.store.revoke_api_token(&org_id, &token_id).await? {
        crate::bus::publish(
            &state,
            crate::bus::BusEvent::ApiTokenRevoked {
                token: token_id.clone(),
            },
        )
        .await;
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("token"))
    }
}

/// Who a token is.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct WhoAmI {
    /// The token's org.
    pub org_id: String,
    /// The token's role.
    pub role: String,
    /// The token's id.
    pub token_id: String,
}

/// Describes the calling API token (no `X-Org-Id` needed): lets clients find their org.
#[utoipa::path(get, path = "/v1/whoami",
    responses((status = 200, body = WhoAmI), (status = 401, body = crate::error::ErrorResponse)))]
pub(crate) async fn whoami(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<WhoAmI>, ApiError> {
    let p = crate::auth::api_principal(&state, &headers).await?;
    Ok(Json(WhoAmI {
        org_id: p.org_id,
        role: p.role.as_str().into(),
        token_id: p.token_id,
    }))
}
