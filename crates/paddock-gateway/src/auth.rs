//! Request authentication: org-scoped API tokens (`Authorization: Bearer` + `X-Org-Id`) and
//! the internal service token (`X-Service-Token`).

use axum::http::{HeaderMap, StatusCode};
use paddock_proto::ErrorCode;
use paddock_store::{ApiPrincipal, Role};
use subtle::ConstantTimeEq;

use crate::AppState;
use crate::error::ApiError;

/// Extracts the bearer token.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Authorises a request against an org-scoped endpoint: a valid API token of that org, the
/// `X-Org-Id` header naming the same org (seed 004), and at least `min_role`.
pub(crate) async fn org_principal(
    state: &AppState,
    headers: &HeaderMap,
    org_id: &str,
    min_role: Role,
) -> Result<ApiPrincipal, ApiError> {
    let token = bearer(headers)
        .ok_or_else(|| ApiError::unauthorized("missing `Authorization: Bearer <token>`"))?;
    let principal = state
        .store
        .authenticate_api_token(token)
        .await?
        .ok_or_else(|| ApiError::unauthorized("unknown or revoked API token"))?;
    let header_org = headers
        .get("x-org-id")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::OrgHeaderRequired,
                "missing `X-Org-Id` header",
            )
        })?;
    if header_org != org_id || principal.org_id != org_id {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::OrgMismatch,
            "the token, the X-Org-Id header and the path must name the same org",
        ));
    }
    if principal.role < min_role {
        return Err(ApiError::forbidden(format!(
            "this operation needs the {} role",
            min_role.as_str()
        )));
    }
    Ok(principal)
}

/// Authorises an internal service call (`X-Service-Token`), compared in constant time.
pub(crate) fn service(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = state.cfg.service_token.as_deref() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::GatewayNotConfigured,
            "GATEWAY_SERVICE_TOKEN is not set on this gateway",
        ));
    };
    let given = headers
        .get("x-service-token")
        .and_then(|v| v.to_str().ok())
        .or_else(|| bearer(headers))
        .ok_or_else(|| ApiError::unauthorized("missing `X-Service-Token`"))?;
    if bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::unauthorized("invalid service token"))
    }
}

/// Middleware for `/v1/orgs/{org_id}/...`: authenticates before anything else (so a bad
/// body never answers before a bad token) and stores the principal for the handler.
pub(crate) async fn org_layer(
    axum::extract::State(state): axum::extract::State<AppState>,
    axum::extract::Path(params): axum::extract::Path<std::collections::HashMap<String, String>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Result<axum::response::Response, ApiError> {
    let org_id = params.get("org_id").cloned().unwrap_or_default();
    let principal = org_principal(&state, req.headers(), &org_id, Role::Member).await?;
    req.extensions_mut().insert(principal);
    Ok(next.run(req).await)
}

/// Middleware for service-token routes.
pub(crate) async fn service_layer(
    axum::extract::State(state): axum::extract::State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Result<axum::response::Response, ApiError> {
    service(&state, req.headers())?;
    Ok(next.run(req).await)
}

/// Checks the role of an authenticated principal.
pub(crate) fn require_role(p: &ApiPrincipal, min_role: Role) -> Result<(), ApiError> {
    if p.role < min_role {
        return Err(ApiError::forbidden(format!(
            "this operation needs the {} role",
            min_role.as_str()
        )));
    }
    Ok(())
}
