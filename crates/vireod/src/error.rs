//! API errors: every failure maps to one [`ErrorKind`] and HTTP status here, in one place.
//! Internal errors are logged in full and answered with a short message.

use api::{ErrorBody, ErrorKind};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

/// An error answered to an API client.
#[derive(Debug)]
pub struct ApiError {
    /// Category.
    pub kind: ErrorKind,
    /// One-line message for the user.
    pub message: String,
}

impl ApiError {
    /// Invalid request.
    pub fn invalid(m: impl Into<String>) -> Self {
        ApiError {
            kind: ErrorKind::Invalid,
            message: m.into(),
        }
    }
    /// Unknown object.
    pub fn not_found(m: impl Into<String>) -> Self {
        ApiError {
            kind: ErrorKind::NotFound,
            message: m.into(),
        }
    }
    /// Already exists.
    pub fn conflict(m: impl Into<String>) -> Self {
        ApiError {
            kind: ErrorKind::Conflict,
            message: m.into(),
        }
    }
    /// Not allowed in the VM's current state.
    pub fn wrong_state(m: impl Into<String>) -> Self {
        ApiError {
            kind: ErrorKind::WrongState,
            message: m.into(),
        }
    }
    /// A component (guest, QEMU, worker) failed.
    pub fn failed(m: impl Into<String>) -> Self {
        ApiError {
            kind: ErrorKind::Failed,
            message: m.into(),
        }
    }
    /// Internal error: logged with its whole chain; the client gets a short message.
    pub fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!("internal error: {e:#}");
        ApiError {
            kind: ErrorKind::Internal,
            message: "internal error in vireod (see its log)".into(),
        }
    }
}

impl From<api::ClientError> for ApiError {
    fn from(e: api::ClientError) -> Self {
        match e {
            api::ClientError::Api { body, .. } => ApiError {
                kind: body.kind,
                message: body.error,
            },
            other => ApiError::failed(format!("the VM's worker did not answer: {other}")),
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::internal(anyhow::Error::new(e))
    }
}

/// HTTP status for an error kind.
pub fn status_of(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::Invalid => StatusCode::BAD_REQUEST,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Conflict => StatusCode::CONFLICT,
        ErrorKind::WrongState => StatusCode::CONFLICT,
        ErrorKind::Failed => StatusCode::BAD_GATEWAY,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            status_of(self.kind),
            Json(ErrorBody {
                kind: self.kind,
                error: self.message,
            }),
        )
            .into_response()
    }
}

/// Result of an API handler.
pub type ApiResult<T> = Result<T, ApiError>;
