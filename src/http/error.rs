//! The one error type of the HTTP layer and the one place it becomes a status and body.
//!
//! Every error is a JSON `{"error": "..."}`; 4xx bodies explain, 5xx bodies are opaque
//! and their cause is logged instead.

use axum::{
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use bytes::Bytes;

use crate::input::InputError;

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    BadInput(#[from] InputError),
    #[error("no such resource: see /openapi.json for the endpoints")]
    NotFound,
    #[error("method not allowed: this endpoint answers GET and HEAD")]
    MethodNotAllowed,
    #[error("{message}")]
    RateLimited {
        message: String,
        retry_after_secs: u64,
    },
    #[error("unauthorized: {0}")]
    Unauthorized(#[from] crate::auth::AuthError),
    #[error(
        "tokens cannot be checked yet: the identity provider's keys are not loaded; retry shortly"
    )]
    AuthUnavailable,
    #[error("the service is at capacity: retry shortly")]
    Overloaded,
    #[error("the request took too long and was cancelled: retry shortly")]
    Timeout,
    #[error("internal error")]
    Internal(String),
}

impl From<crate::cache::StoreError> for ApiError {
    fn from(e: crate::cache::StoreError) -> Self {
        use crate::cache::StoreError;
        match e {
            StoreError::Timeout => Self::Timeout,
            StoreError::Overloaded => Self::Overloaded,
            StoreError::Failed(cause) => Self::Internal(cause),
        }
    }
}

impl ApiError {
    /// The status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadInput(_) => StatusCode::BAD_REQUEST,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Overloaded | Self::Timeout | Self::AuthUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// A JSON error body, escaped by serde so any message is safe to send.
pub fn error_body(message: &str) -> Bytes {
    Bytes::from(serde_json::json!({ "error": message }).to_string())
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Internal(cause) = &self {
            tracing::error!(cause = %cause, "request failed");
        }
        let mut response = (
            self.status(),
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            error_body(&self.to_string()),
        )
            .into_response();
        let retry_after = match &self {
            Self::RateLimited {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            Self::Overloaded | Self::Timeout => Some(1),
            Self::AuthUnavailable => Some(5),
            _ => None,
        };
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Self::Unauthorized(e) = &self {
            // RFC 6750: the challenge names the scheme and, for a bad token, the error.
            let challenge = match e {
                crate::auth::AuthError::Missing => r#"Bearer realm="fibonacci-api""#.to_owned(),
                e => format!(
                    r#"Bearer realm="fibonacci-api", error="invalid_token", error_description="{e}""#
                ),
            };
            if let Ok(value) = HeaderValue::from_str(&challenge) {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, value);
            }
        }
        if matches!(self, Self::MethodNotAllowed) {
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET,HEAD"));
        }
        response
    }
}
