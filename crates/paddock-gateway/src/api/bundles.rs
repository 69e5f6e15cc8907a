//! Workflow bundles (seed 001): upload into the object store, versions of a workflow, the
//! internal spawn config, and signed downloads from the local store.
//!
//! Bytes are content-addressed (`bundles/sha256/<hex>.tar.zst` in the object store) and
//! shared between orgs; what an org may use is recorded per org, and an org owns a digest
//! only after uploading bytes that hash to it, so knowing another org's digest gives nothing.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures_util::StreamExt;
use paddock_bundle::{BundleLocation, Digest};
use paddock_proto::{BUNDLE_RUNTIMES, ErrorCode, now_ms};
use paddock_store::{ApiPrincipal, Role, WorkflowVersion};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use utoipa::{IntoParams, ToSchema};

use crate::AppState;
use crate::auth::require_role;
use crate::error::{ApiError, AppJson};

/// Maps a bundle library error to an API error with its stable code.
pub(crate) fn bundle_error(e: &paddock_bundle::BundleError) -> ApiError {
    let code: ErrorCode = serde_json::from_value(serde_json::Value::String(e.code().into()))
        .unwrap_or(ErrorCode::Internal);
    let status = match code {
        ErrorCode::BundleNotFound => StatusCode::NOT_FOUND,
        ErrorCode::BundleStoreFailed | ErrorCode::BundleStoreConfig | ErrorCode::BundleIo => {
            return ApiError::internal(e);
        }
        _ => StatusCode::BAD_REQUEST,
    };
    ApiError::new(status, code, e.to_string())
}

fn parse_digest(s: &str) -> Result<Digest, ApiError> {
    s.parse::<Digest>().map_err(|e| bundle_error(&e))
}

/// A bundle an org has.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct BundleInfo {
    /// SHA-256, hex.
    pub digest: String,
    /// Bytes.
    pub size: u64,
    /// Whether this request sent bytes to the object store (`false`: already there).
    pub uploaded: bool,
}

/// Whether the org has this bundle (`404 BUNDLE_NOT_FOUND` if not): lets `paddock bundle
/// push` skip the upload of an identical tree.
#[utoipa::path(get, path = "/v1/orgs/{org_id}/bundles/{digest}", operation_id = "get_bundle",
    params(("org_id" = String, Path), ("digest" = String, Path), ("X-Org-Id" = String, Header)),
    responses((status = 200, body = BundleInfo), (status = 404, body = crate::error::ErrorResponse)))]
pub(crate) async fn get_bundle(
    State(state): State<AppState>,
    Extension(principal): Extension<ApiPrincipal>,
    Path((org_id, digest)): Path<(String, String)>,
) -> Result<Json<BundleInfo>, ApiError> {
    require_role(&principal, Role::Member)?;
    let d = parse_digest(&digest)?;
    match state.store.org_bundle(&org_id, &d.to_hex()).await? {
        Some(size) => Ok(Json(BundleInfo {
            digest: d.to_hex(),
            size,
            uploaded: false,
        })),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::BundleNotFound,
            "this org has no bundle with that digest",
        )),
    }
}

/// Uploads a bundle (the request body is the `.tar.zst` archive). The bytes are hashed as
/// they arrive; a body that is not `digest` is refused (`400 BUNDLE_HASH_MISMATCH`) and
/// nothing is kept. Bodies over `PADDOCK_BUNDLE_MAX_BYTES` get `413 BUNDLE_TOO_LARGE`.
#[utoipa::path(put, path = "/v1/orgs/{org_id}/bundles/{digest}", operation_id = "put_bundle",
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    params(("org_id" = String, Path), ("digest" = String, Path), ("X-Org-Id" = String, Header)),
    responses((status = 201, body = BundleInfo), (status = 200, body = BundleInfo), (status = 400, body = crate::error::ErrorResponse), (status = 413, body = crate::error::ErrorResponse)))]
pub(crate) async fn put_bundle(
    State(state): State<AppState>,
    Extension(principal): Extension<ApiPrincipal>,
    Path((org_id, digest)): Path<(String, String)>,
    body: Body,
) -> Result<(StatusCode, Json<BundleInfo>), ApiError> {
    require_role(&principal, Role::Admin)?;
    let d = parse_digest(&digest)?;
    let max = state.cfg.bundles.max_bytes;
    let tmp = tempfile::NamedTempFile::new().map_err(ApiError::internal)?;
    let mut file = tokio::fs::File::from_std(tmp.reopen().map_err(ApiError::internal)?);
    let mut hasher = sha2::Sha256::new();
    let mut size: u64 = 0;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::invalid(format!("reading the body: {e}")))?;
        size += chunk.len() as u64;
        if size > max {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::BundleTooLarge,
                format!("bundles are limited to {max} bytes (PADDOCK_BUNDLE_MAX_BYTES)"),
            ));
        }
        hasher.update(&chunk);
        file.write_all(&chunk).await.map_err(ApiError::internal)?;
    }
    file.flush().await.map_err(ApiError::internal)?;
    let got = hex::encode(hasher.finalize());
    if got != d.to_hex() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::BundleHashMismatch,
            format!("the body's SHA-256 is {got}, not {}", d.to_hex()),
        ));
    }
    let outcome = state
        .bundles
        .put_file(tmp.path(), &d, &mut |_| {})
        .await
        .map_err(|e| bundle_error(&e))?;
    state
        .store
        .record_bundle(&org_id, &d.to_hex(), size)
        .await?;
    let uploaded = matches!(outcome, paddock_bundle::PutOutcome::Uploaded { .. });
    Ok((
        if uploaded {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        },
        Json(BundleInfo {
            digest: d.to_hex(),
            size,
            uploaded,
        }),
    ))
}

/// Body of `POST /v1/orgs/{org}/workflows/{workflowId}/versions`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct NewVersion {
    /// A digest this org uploaded.
    pub digest: String,
    /// `node`, `python`, `shell` or `binary`.
    pub runtime: String,
    /// Entrypoint inside the bundle (relative path).
    pub entrypoint: String,
}

/// Answer of a registration.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Registered {
    /// The workflow's current version.
    #[serde(flatten)]
    pub version: WorkflowVersion,
    /// Whether this call made a new version (`false`: identical to the current one).
    pub created: bool,
}

fn valid_workflow_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Makes an uploaded bundle the workflow's current version (admin).
#[utoipa::path(post, path = "/v1/orgs/{org_id}/workflows/{workflow_id}/versions", operation_id = "register_version",
    request_body = NewVersion,
    params(("org_id" = String, Path), ("workflow_id" = String, Path), ("X-Org-Id" = String, Header)),
    responses((status = 201, body = Registered), (status = 200, body = Registered), (status = 404, body = crate::error::ErrorResponse)))]
pub(crate) async fn register_version(
    State(state): State<AppState>,
    Extension(principal): Extension<ApiPrincipal>,
    Path((org_id, workflow_id)): Path<(String, String)>,
    AppJson(body): AppJson<NewVersion>,
) -> Result<(StatusCode, Json<Registered>), ApiError> {
    require_role(&principal, Role::Admin)?;
    if !valid_workflow_id(&workflow_id) {
        return Err(ApiError::invalid(
            "workflow ids are 1 to 128 characters of letters, digits, `-`, `_` and `.`",
        ));
    }
    if !BUNDLE_RUNTIMES.contains(&body.runtime.as_str()) {
        return Err(ApiError::invalid(format!(
            "runtime must be one of {}",
            BUNDLE_RUNTIMES.join(", ")
        )));
    }
    if body.entrypoint.is_empty()
        || body.entrypoint.starts_with('/')
        || body.entrypoint.split('/').any(|c| c == "..")
    {
        return Err(ApiError::invalid(
            "entrypoint must be a relative path inside the bundle",
        ));
    }
    let d = parse_digest(&body.digest)?;
    let size = state
        .store
        .org_bundle(&org_id, &d.to_hex())
        .await?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::BundleNotFound,
                "upload the bundle first (PUT /v1/orgs/{org}/bundles/{digest})",
            )
        })?;
    let (version, created) = state
        .store
        .register_version(
            &org_id,
            &workflow_id,
            &d.to_hex(),
            size,
            &body.runtime,
            &body.entrypoint,
        )
        .await?;
    Ok((
        if created {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        },
        Json(Registered { version, created }),
    ))
}

/// A workflow's versions.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(crate) struct WorkflowView {
    /// Workflow id.
    pub workflow_id: String,
    /// Newest first; the first is current.
    pub versions: Vec<WorkflowVersion>,
}

/// A workflow and its versions.
#[utoipa::path(get, path = "/v1/orgs/{org_id}/workflows/{workflow_id}", operation_id = "get_workflow",
    params(("org_id" = String, Path), ("workflow_id" = String, Path), ("X-Org-Id" = String, Header)),
    responses((status = 200, body = WorkflowView), (status = 404, body = crate::error::ErrorResponse)))]
pub(crate) async fn get_workflow(
    State(state): State<AppState>,
    Extension(principal): Extension<ApiPrincipal>,
    Path((org_id, workflow_id)): Path<(String, String)>,
) -> Result<Json<WorkflowView>, ApiError> {
    require_role(&principal, Role::Member)?;
    let versions = state.store.list_versions(&org_id, &workflow_id).await?;
    if versions.is_empty() {
        return Err(workflow_not_found());
    }
    Ok(Json(WorkflowView {
        workflow_id,
        versions,
    }))
}

fn workflow_not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::WorkflowNotFound,
        "no bundle is registered for this workflow",
    )
}

/// The spawn config of seed 001 (`GET /api/internal/spawn/{workflowId}`).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(crate) struct SpawnConfig {
    /// Presigned S3 URL, or a short-lived signed gateway URL for the local store. A
    /// credential: do not log it.
    pub bundle_url: String,
    /// SHA-256 of the archive, hex.
    pub bundle_hash: String,
    /// `node`, `python`, `shell`, `binary`.
    pub runtime: String,
    /// Entrypoint inside the bundle.
    pub entrypoint: String,
    /// Archive size in bytes.
    pub size: u64,
    /// Workflow id.
    pub workflow_id: String,
    /// Version.
    pub version: u64,
    /// When `bundle_url` stops working (ms since the Unix epoch).
    pub expires_at: i64,
}

/// The spawn config of a workflow's current version.
pub(crate) async fn spawn_config(
    state: &AppState,
    org_id: &str,
    workflow_id: &str,
) -> Result<SpawnConfig, ApiError> {
    let v = state
        .store
        .current_version(org_id, workflow_id)
        .await?
        .ok_or_else(workflow_not_found)?;
    let d = parse_digest(&v.digest)?;
    let ttl = state.cfg.bundles.url_ttl;
    let expires_at = now_ms() + ttl.as_millis() as i64;
    let location = state
        .bundles
        .locate(&d, ttl)
        .await
        .map_err(|e| bundle_error(&e))?;
    let bundle_url = match location {
        BundleLocation::Presigned { url, .. } => url,
        BundleLocation::Local { .. } => {
            let sig = state
                .signer
                .sign_message(&download_message(org_id, &v.digest, expires_at));
            format!(
                "{}/v1/bundles/{}?org={org_id}&exp={expires_at}&sig={sig}",
                state.cfg.http_url, v.digest
            )
        }
    };
    Ok(SpawnConfig {
        bundle_url,
        bundle_hash: v.digest,
        runtime: v.runtime,
        entrypoint: v.entrypoint,
        size: v.size,
        workflow_id: v.workflow_id,
        version: v.version,
        expires_at,
    })
}

fn download_message(org_id: &str, digest: &str, expires_at: i64) -> String {
    format!("bundle-download:{org_id}:{digest}:{expires_at}")
}

/// The spawn config (seed 001), for the service token; `X-Org-Id` names the org.
#[utoipa::path(get, path = "/api/internal/spawn/{workflow_id}", operation_id = "internal_spawn_config",
    params(("workflow_id" = String, Path), ("X-Service-Token" = String, Header), ("X-Org-Id" = String, Header)),
    responses((status = 200, body = SpawnConfig), (status = 404, body = crate::error::ErrorResponse)))]
pub(crate) async fn internal_spawn_config(
    State(state): State<AppState>,
    Path(workflow_id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<SpawnConfig>, ApiError> {
    let org_id = headers
        .get("x-org-id")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::OrgHeaderRequired,
                "missing `X-Org-Id` header",
            )
        })?
        .to_string();
    Ok(Json(spawn_config(&state, &org_id, &workflow_id).await?))
}

/// Query of a signed download.
#[derive(Debug, Deserialize, IntoParams)]
pub(crate) struct DownloadQuery {
    /// Org the URL was made for.
    pub org: String,
    /// Expiry (ms since the Unix epoch).
    pub exp: i64,
    /// Signature.
    pub sig: String,
}

/// Downloads a bundle of the local object store through a signed, expiring URL (from the
/// spawn config). Supports `Range: bytes=N-` so fetches resume.
#[utoipa::path(get, path = "/v1/bundles/{digest}", operation_id = "download_bundle",
    params(("digest" = String, Path), DownloadQuery),
    responses((status = 200, description = "the archive"), (status = 206, description = "the rest of the archive"), (status = 403, body = crate::error::ErrorResponse)))]
pub(crate) async fn download(
    State(state): State<AppState>,
    Path(digest): Path<String>,
    Query(q): Query<DownloadQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let d = parse_digest(&digest)?;
    let expected = state
        .signer
        .sign_message(&download_message(&q.org, &d.to_hex(), q.exp));
    if !crate::vm_token::constant_time_eq(expected.as_bytes(), q.sig.as_bytes()) {
        return Err(ApiError::forbidden("invalid download signature"));
    }
    if q.exp <= now_ms() {
        return Err(ApiError::forbidden("this download URL has expired"));
    }
    let path = match state
        .bundles
        .locate(&d, Duration::from_secs(60))
        .await
        .map_err(|e| bundle_error(&e))?
    {
        BundleLocation::Local { path, .. } => path,
        BundleLocation::Presigned { .. } => return Err(ApiError::not_found("bundle")),
    };
    let mut file = tokio::fs::File::open(&path)
        .await
        .map_err(ApiError::internal)?;
    let len = file.metadata().await.map_err(ApiError::internal)?.len();
    let start = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.strip_suffix('-'))
        .and_then(|v| v.parse::<u64>().ok());
    let (status, start) = match start {
        Some(s) if s < len => (StatusCode::PARTIAL_CONTENT, s),
        Some(_) => {
            return Ok((
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{len}"))],
            )
                .into_response());
        }
        None => (StatusCode::OK, 0),
    };
    file.seek(std::io::SeekFrom::Start(start))
        .await
        .map_err(ApiError::internal)?;
    let stream = tokio_util::io::ReaderStream::new(file.take(len - start));
    let mut resp = Response::new(Body::from_stream(stream));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        "application/zstd".parse().map_err(ApiError::internal)?,
    );
    h.insert(
        header::ACCEPT_RANGES,
        "bytes".parse().map_err(ApiError::internal)?,
    );
    h.insert(
        header::CONTENT_LENGTH,
        (len - start)
            .to_string()
            .parse()
            .map_err(ApiError::internal)?,
    );
    if status == StatusCode::PARTIAL_CONTENT {
        h.insert(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{len}", len - 1)
                .parse()
                .map_err(ApiError::internal)?,
        );
    }
    Ok(resp)
}
