//! OpenAI-style error responses: `{"error": {"message", "type", "param", "code"}}` with the status
//! that says what went wrong.
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tandem_engine::EngineError;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
    pub retry_after_secs: Option<u64>,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>, param: Option<&str>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: param.map(String::from),
            retry_after_secs: None,
        }
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        ApiError::with_status(StatusCode::UNAUTHORIZED, message)
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        ApiError::with_status(StatusCode::FORBIDDEN, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError { status: StatusCode::NOT_FOUND, message: message.into(), param: None, retry_after_secs: None }
    }
    pub fn unavailable(message: impl Into<String>, retry_after_secs: u64) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: message.into(),
            param: None,
            retry_after_secs: Some(retry_after_secs),
        }
    }
    pub fn internal(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            param: None,
            retry_after_secs: None,
        }
    }
    pub fn with_status(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), param: None, retry_after_secs: None }
    }

    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            400 | 408 | 413 | 415 | 422 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            429 | 503 => "server_overloaded",
            _ => "internal_server_error",
        }
    }

    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind(),
            "param": self.param,
            "code": self.status.as_u16(),
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(secs) = self.retry_after_secs {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

/// The engine's refusals as OpenAI errors: the caller's mistakes are 400 with the parameter
/// named, a full queue or a stopping engine 503 with a retry hint.
impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::QueueFull(_) | EngineError::ShuttingDown => ApiError::unavailable(e.to_string(), 1),
            EngineError::PromptTooLong { .. } | EngineError::EmptyPrompt => {
                ApiError::bad_request(e.to_string(), Some("prompt"))
            }
            EngineError::InvalidParam { param, message } => ApiError::bad_request(message, Some(param)),
            EngineError::Invalid(m) => ApiError::bad_request(m, None),
        }
    }
}
