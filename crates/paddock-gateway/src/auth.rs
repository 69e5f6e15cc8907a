//! Request authentication: org-scoped API tokens (`Authorization: Bearer` + `X-Org-Id`) and
//! the internal service token (`X-Service-Token`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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

/// How long a resolved API token is trusted without asking the database again. Revoking a
/// token forgets it at once on the replica that revoked it and, through the bus, on the
/// others; this bounds how long a replica that missed that event (its `LISTEN` connection
/// was down) can still accept it.
pub const TOKEN_CACHE_TTL: Duration = Duration::from_secs(10);

/// Most tokens remembered; past it, expired entries go, then everything.
const TOKEN_CACHE_MAX: usize = 10_000;

/// Valid API tokens seen recently, by SHA-256 of the token (the token itself is never
/// kept), so a request does not cost a database query for its credentials. Unknown and
/// revoked tokens are never cached: each such attempt is checked against the database.
#[derive(Debug, Default)]
pub struct TokenCache {
    map: Mutex<HashMap<String, (ApiPrincipal, Instant)>>,
}

impl TokenCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (ApiPrincipal, Instant)>> {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn get(&self, hash: &str) -> Option<ApiPrincipal> {
        let mut map = self.lock();
        match map.get(hash) {
            Some((p, at)) if at.elapsed() < TOKEN_CACHE_TTL => Some(p.clone()),
            Some(_) => {
                map.remove(hash);
                None
            }
            None => None,
        }
    }

    fn put(&self, hash: String, principal: ApiPrincipal) {
        let mut map = self.lock();
        if map.len() >= TOKEN_CACHE_MAX {
            map.retain(|_, (_, at)| at.elapsed() < TOKEN_CACHE_TTL);
            if map.len() >= TOKEN_CACHE_MAX {
                map.clear();
            }
        }
        map.insert(hash, (principal, Instant::now()));
    }

    /// Forgets a token (by its id): it was revoked.
    pub fn forget(&self, token_id: &str) {
        self.lock().retain(|_, (p, _)| p.token_id != token_id);
    }
}

/// The principal of the request's bearer API token: `401 UNAUTHORIZED` when it is missing,
/// unknown or revoked. Consults [`TokenCache`] first.
pub(crate) async fn api_principal(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<ApiPrincipal, ApiError> {
    let token = bearer(headers)
        .ok_or_else(|| ApiError::unauthorized("missing `Authorization: Bearer <token>`"))?;
    let hash = paddock_store::secret::hash(token);
    if let Some(p) = state.tokens.get(&hash) {
        return Ok(p);
    }
    let principal = state
        .store
        .authenticate_api_token(token)
        .await?
        .ok_or_else(|| ApiError::unauthorized("unknown or revoked API token"))?;
    state.tokens.put(hash, principal.clone());
    Ok(principal)
}

/// Authorises a request against an org-scoped endpoint: a valid API token of that org, the
/// `X-Org-Id` header naming the same org (seed 004), and at least `min_role`.
pub(crate) async fn org_principal(
    state: &AppState,
    headers: &HeaderMap,
    org_id: &str,
    min_role: Role,
) -> Result<ApiPrincipal, ApiError> {
    let principal = api_principal(state, headers).await?;
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
