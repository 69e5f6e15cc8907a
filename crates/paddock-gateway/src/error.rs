//! The API error type: a stable code and an HTTP status. Internal causes are logged with a
//! correlation id and never sent to the client.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use paddock_proto::ErrorCode;
use serde::{Deserialize, Serialize};

/// Body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorResponse {
    /// Stable error code.
    pub code: String,
    /// Human-readable message.
    pub message: String,
    /// When to retry (retryable errors such as `INSTANCE_NOT_READY`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    /// The instance concerned (`INSTANCE_*` errors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// Its status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Its bootstrap attempts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap_attempts: Option<u32>,
    /// Its last error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// An API error.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: ErrorCode,
    message: String,
    retry_after_ms: Option<u64>,
    instance: Option<Box<paddock_store::Instance>>,
}

impl ApiError {
    /// An error with a status, code and client-facing message.
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after_ms: None,
            instance: None,
        }
    }

    /// Adds `retryAfterMs` (and a `Retry-After` header).
    pub fn with_retry_after(mut self, ms: u64) -> ApiError {
        self.retry_after_ms = Some(ms);
        self
    }

    /// Adds the instance's id, status, attempts and last error.
    pub fn with_instance(mut self, inst: &paddock_store::Instance) -> ApiError {
        self.instance = Some(Box::new(inst.clone()));
        self
    }

    /// 400 `INVALID_REQUEST`.
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::InvalidRequest, message)
    }

    /// 401 `UNAUTHORIZED`.
    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, message)
    }

    /// 403 `FORBIDDEN`.
    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, ErrorCode::Forbidden, message)
    }

    /// 404 `NOT_FOUND`.
    pub fn not_found(what: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            format!("{what} not found"),
        )
    }

    /// 500 `INTERNAL`; the cause is logged here with an id the client can quote.
    pub fn internal(cause: impl std::fmt::Display) -> ApiError {
        let id = uuid::Uuid::new_v4().simple().to_string();
        tracing::error!(error_id = %id, "internal error: {cause}");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            format!("internal error (id {id})"),
        )
    }

    /// The code.
    pub fn code(&self) -> ErrorCode {
        self.code
    }
}

impl From<paddock_store::StoreError> for ApiError {
    fn from(e: paddock_store::StoreError) -> ApiError {
        ApiError::internal(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let inst = self.instance.as_deref();
        let body = ErrorResponse {
            code: self.code.as_str().to_string(),
            message: self.message,
            retry_after_ms: self.retry_after_ms,
            instance_id: inst.map(|i| i.id.clone()),
            status: inst.map(|i| i.status.as_str().to_string()),
            bootstrap_attempts: inst.map(|i| i.bootstrap_attempts),
            last_error: inst.and_then(|i| i.last_error.clone()),
        };
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(ms) = self.retry_after_ms
            && let Ok(v) = axum::http::HeaderValue::from_str(&ms.div_ceil(1000).max(1).to_string())
        {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, v);
        }
        resp
    }
}

/// JSON body extractor whose rejections use the API error shape.
#[derive(Debug, Clone, Copy, Default)]
pub struct AppJson<T>(pub T);

impl<T, S> axum::extract::FromRequest<S> for AppJson<T>
where
    axum::Json<T>:
        axum::extract::FromRequest<S, Rejection = axum::extract::rejection::JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(AppJson(v)),
            Err(rejection) => Err(ApiError::invalid(rejection.body_text())),
        }
    }
}
