//! The contract's HTTP error shape: `{"error":{"code","message"}}` with a fitting status.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;

use crate::actors::ActorError;
use crate::metrics::metrics;

/// An error answer. Every handler returns `Result<_, ApiError>`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "bad_request", message)
    }

    pub fn invalid_id(what: &str) -> Self {
        Self::new(400, "invalid_id", format!("{what} is not a UUID"))
    }

    pub fn unauthorized() -> Self {
        ActorError::Unauthorized.into()
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        metrics().errors.with_label_values(&[self.code]).inc();
        HttpResponse::build(self.status)
            .json(json!({"error": {"code": self.code, "message": self.message}}))
    }
}

impl From<ActorError> for ApiError {
    fn from(e: ActorError) -> Self {
        if matches!(e, ActorError::Storage(_) | ActorError::Internal(_)) {
            tracing::error!(error = %e, "request failed");
        }
        ApiError::new(e.status(), e.code(), e.to_string())
    }
}
