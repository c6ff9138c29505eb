//! Every failure the gateway reports, and the one place that turns it into a response: OpenAI's
//! error shape everywhere, Anthropic's on the Messages API's routes ([`ErrorShape`]).

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::store::StoreError;

/// OpenAI's error envelope, shared with node-runner (see [`garage_node_protocol::ErrorBody`]).
pub use garage_node_protocol::{ErrorBody, ErrorDetail};

/// The shape errors are written in: OpenAI's on every route but Anthropic's Messages API
/// (`/v1/messages` and what is under it), where Anthropic's SDKs expect theirs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ErrorShape {
    #[default]
    OpenAi,
    Anthropic,
}

impl ErrorShape {
    /// The shape of the errors of a request for `path`.
    pub fn of_path(path: &str) -> Self {
        match path.strip_prefix("/v1/messages") {
            Some(rest) if rest.is_empty() || rest.starts_with('/') => ErrorShape::Anthropic,
            _ => ErrorShape::OpenAi,
        }
    }

    /// An error event for a stream that already started, in this shape: OpenAI's error object
    /// as a `data:` event (the openai SDKs raise it as an `APIError`), or Anthropic's `error`
    /// event (its SDK raises it as an `APIStatusError`).
    pub fn stream_error(self, message: &str) -> bytes::Bytes {
        match self {
            ErrorShape::OpenAi => {
                let body = ErrorBody::new(message, "server_error", Some("upstream_error"));
                format!("data: {}\n\n", body.to_json()).into()
            }
            ErrorShape::Anthropic => {
                let body = AnthropicErrorBody::new("api_error", message);
                format!("event: error\ndata: {}\n\n", body.to_json()).into()
            }
        }
    }
}

/// Anthropic's error envelope: `{"type": "error", "error": {"type", "message"}}`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, utoipa::ToSchema)]
pub struct AnthropicErrorBody {
    /// Always `error`.
    #[serde(rename = "type")]
    pub kind: String,
    pub error: AnthropicErrorDetail,
}

/// The inside of [`AnthropicErrorBody`].
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, utoipa::ToSchema)]
pub struct AnthropicErrorDetail {
    /// `invalid_request_error` (400), `authentication_error` (401), `permission_error` (403),
    /// `not_found_error` (404), `request_too_large` (413), `rate_limit_error` (429),
    /// `billing_error` (429: the key's budget is spent), `api_error` (500, 502),
    /// `overloaded_error` (503), `timeout_error` (504).
    #[serde(rename = "type")]
    pub kind: String,
    /// Human-readable explanation.
    pub message: String,
}

impl AnthropicErrorBody {
    pub fn new(kind: &str, message: impl Into<String>) -> Self {
        AnthropicErrorBody {
            kind: "error".to_owned(),
            error: AnthropicErrorDetail {
                kind: kind.to_owned(),
                message: message.into(),
            },
        }
    }

    /// Anthropic's error type for a status. The statuses are the gateway's own, the same on
    /// every route: an overload is 503 here (Anthropic's API says 529), which Anthropic's SDKs
    /// retry as they retry 529.
    pub fn kind_of_status(status: StatusCode) -> &'static str {
        match status.as_u16() {
            401 => "authentication_error",
            402 => "billing_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            503 | 529 => "overloaded_error",
            504 => "timeout_error",
            500..=599 => "api_error",
            _ => "invalid_request_error",
        }
    }

    /// The JSON text of it.
    pub fn to_json(&self) -> String {
        // A struct of strings always serializes.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Where a failure came from: the client, a backend, or the gateway itself. Decides the status
/// class and whether another backend may help.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    BadRequest {
        message: String,
        param: Option<&'static str>,
        /// What went wrong, for programs (`file_quota_exceeded`...); `None` for most.
        code: Option<&'static str>,
    },
    #[error("{0}")]
    Unauthorized(String),
    #[error("{message}")]
    Forbidden { message: String, code: &'static str },
    #[error("The model `{0}` does not exist or is not served right now.")]
    ModelNotFound(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The request conflicts with what is there (a rig's receipt key cannot be replaced).
    #[error("{0}")]
    Conflict(String),

    /// Refused by the rate limiter (`rate_limit_exceeded`) or the meter (`insufficient_quota`).
    #[error("{message}")]
    TooManyRequests {
        message: String,
        code: &'static str,
        /// Seconds, for the `retry-after` header.
        retry_after_secs: Option<u64>,
        /// `x-ratelimit-*` headers.
        headers: Vec<(http::HeaderName, http::HeaderValue)>,
    },
    /// Backends answered, but with failures (5xx, refused connections, broken streams).
    #[error("{0}")]
    BadGateway(String),
    /// No backend can take the request: none healthy.
    #[error("{0}")]
    Unavailable(String),
    /// The gateway's state store did not answer.
    #[error("The gateway's state store is unavailable; retry shortly.")]
    StoreDown,
    /// A policy plugin the request needs faulted and the gateway fails closed (the rate
    /// limiter, unless `rate_limiter_fail_open`).
    #[error("{message}")]
    PolicyUnavailable {
        message: String,
        /// Seconds, for the `retry-after` header.
        retry_after_secs: u64,
    },
    /// A backend took too long to answer.
    #[error("{0}")]
    GatewayTimeout(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>, param: Option<&'static str>) -> Self {
        ApiError::BadRequest {
            message: message.into(),
            param,
            code: None,
        }
    }

    /// A 400 with a machine-readable `code`.
    pub fn bad_request_code(
        message: impl Into<String>,
        param: Option<&'static str>,
        code: &'static str,
    ) -> Self {
        ApiError::BadRequest {
            message: message.into(),
            param,
            code: Some(code),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden { .. } => StatusCode::FORBIDDEN,
            ApiError::ModelNotFound(_) | ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            ApiError::Unavailable(_) | ApiError::StoreDown | ApiError::PolicyUnavailable { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::GatewayTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            ApiError::BadRequest { .. }
            | ApiError::Unauthorized(_)
            | ApiError::ModelNotFound(_)
            | ApiError::NotFound(_)
            | ApiError::MethodNotAllowed(_)
            | ApiError::PayloadTooLarge(_)
            | ApiError::Conflict(_) => "invalid_request_error",
            ApiError::Forbidden { .. } => "permission_error",
            ApiError::TooManyRequests { code, .. } if *code == "insufficient_quota" => {
                "insufficient_quota"
            }
            ApiError::TooManyRequests { .. } => "rate_limit_error",
            ApiError::BadGateway(_)
            | ApiError::Unavailable(_)
            | ApiError::StoreDown
            | ApiError::PolicyUnavailable { .. }
            | ApiError::GatewayTimeout(_)
            | ApiError::Internal(_) => "server_error",
        }
    }

    fn param(&self) -> Option<&'static str> {
        match self {
            ApiError::BadRequest { param, .. } => *param,
            ApiError::ModelNotFound(_) => Some("model"),
            _ => None,
        }
    }

    fn code(&self) -> Option<&'static str> {
        match self {
            ApiError::BadRequest { code, .. } => *code,
            ApiError::Unauthorized(_) => Some("invalid_api_key"),
            ApiError::Forbidden { code, .. } => Some(code),
            ApiError::TooManyRequests { code, .. } => Some(code),
            ApiError::ModelNotFound(_) => Some("model_not_found"),
            ApiError::NotFound(_) => Some("not_found"),
            ApiError::PayloadTooLarge(_) => Some("request_too_large"),
            ApiError::Conflict(_) => Some("conflict"),
            ApiError::BadGateway(_) => Some("upstream_error"),
            ApiError::Unavailable(_) | ApiError::StoreDown => Some("no_backend_available"),
            ApiError::PolicyUnavailable { .. } => Some("policy_unavailable"),
            ApiError::GatewayTimeout(_) => Some("upstream_timeout"),
            _ => None,
        }
    }

    /// The Anthropic-shaped body of this error: its type follows the status, but a spent
    /// budget is a `billing_error`.
    pub fn anthropic_body(&self) -> AnthropicErrorBody {
        let kind = match self {
            ApiError::TooManyRequests { code, .. } if *code == "insufficient_quota" => {
                "billing_error"
            }
            other => AnthropicErrorBody::kind_of_status(other.status()),
        };
        AnthropicErrorBody::new(kind, self.to_string())
    }

    /// The OpenAI-shaped body of this error.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: self.to_string(),
                kind: self.kind().to_owned(),
                param: self.param().map(str::to_owned),
                code: self.code().map(str::to_owned),
            },
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        tracing::error!(error = %err, "store failure");
        ApiError::StoreDown
    }
}

/// Where a failure came from (as Pingora's errors say): the client's request, a backend (a
/// rig or a configured upstream), a policy plugin, the gateway's store, or the gateway itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Client,
    Backend,
    Plugin,
    Store,
    Gateway,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Client => "client",
            Origin::Backend => "backend",
            Origin::Plugin => "plugin",
            Origin::Store => "store",
            Origin::Gateway => "gateway",
        }
    }
}

impl ApiError {
    /// Where the failure came from.
    pub fn origin(&self) -> Origin {
        match self {
            ApiError::BadGateway(_) | ApiError::GatewayTimeout(_) | ApiError::Unavailable(_) => {
                Origin::Backend
            }
            ApiError::StoreDown => Origin::Store,
            ApiError::PolicyUnavailable { .. } => Origin::Plugin,
            ApiError::Internal(_) => Origin::Gateway,
            _ => Origin::Client,
        }
    }

    /// Whether the same request may succeed if sent again: a busy or failing backend, a store
    /// that comes back, a rate limit that resets. Not a bad request, a refused key or a spent
    /// budget. Clients are told so in `x-should-retry`, which the OpenAI SDKs obey (they would
    /// otherwise retry a spent budget's 429 for nothing).
    pub fn retryable(&self) -> bool {
        match self {
            ApiError::TooManyRequests { code, .. } => *code != "insufficient_quota",
            other => other.origin() != Origin::Client,
        }
    }
}

/// The header that tells an OpenAI SDK whether to retry (it obeys it over its own rules).
const X_SHOULD_RETRY: http::HeaderName = http::HeaderName::from_static("x-should-retry");

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.into_response_as(ErrorShape::OpenAi)
    }
}

impl ApiError {
    /// The response of this error, its body in `shape`: the status, `x-should-retry` (which
    /// Anthropic's SDKs obey too), `retry-after` and the rate limit's headers are the same in
    /// both.
    pub fn into_response_as(self, shape: ErrorShape) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), origin = self.origin().as_str(), error = %self, "request failed");
        }
        let mut response = match shape {
            ErrorShape::OpenAi => (status, Json(self.body())).into_response(),
            ErrorShape::Anthropic => (status, Json(self.anthropic_body())).into_response(),
        };
        response.headers_mut().insert(
            X_SHOULD_RETRY,
            http::HeaderValue::from_static(if self.retryable() { "true" } else { "false" }),
        );
        match self {
            ApiError::TooManyRequests {
                retry_after_secs,
                headers,
                ..
            } => {
                let map = response.headers_mut();
                if let Some(secs) = retry_after_secs {
                    map.insert(http::header::RETRY_AFTER, http::HeaderValue::from(secs));
                }
                for (name, value) in headers {
                    map.insert(name, value);
                }
            }
            ApiError::PolicyUnavailable {
                retry_after_secs, ..
            } => {
                response.headers_mut().insert(
                    http::header::RETRY_AFTER,
                    http::HeaderValue::from(retry_after_secs),
                );
            }
            _ => {}
        }
        response
    }
}

/// Maps axum's extractor rejections (body too large, unreadable body...) into the OpenAI shape,
/// keeping their status.
pub fn from_rejection(status: StatusCode, text: String) -> ApiError {
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge(
            "request body is larger than this gateway accepts (max_body_bytes)".into(),
        ),
        s if s.is_server_error() => ApiError::Internal(text),
        _ => ApiError::bad_request(text, None),
    }
}

/// A JSON body, or axum's rejection in OpenAI's shape: 413 for a body over the route's limit,
/// 400 for the rest (a missing JSON content type included).
pub fn json_body<T>(
    body: Result<Json<T>, axum::extract::rejection::JsonRejection>,
) -> Result<T, ApiError> {
    body.map(|Json(value)| value).map_err(ApiError::from)
}

impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(rejection: axum::extract::rejection::JsonRejection) -> Self {
        from_rejection(rejection.status(), rejection.body_text())
    }
}

impl From<axum::extract::rejection::PathRejection> for ApiError {
    fn from(rejection: axum::extract::rejection::PathRejection) -> Self {
        // A segment that is not UTF-8 once decoded (`%FF`), or that does not parse: either way
        // the client's, and nothing by that name exists.
        from_rejection(rejection.status(), rejection.body_text())
    }
}

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(rejection: axum::extract::rejection::QueryRejection) -> Self {
        from_rejection(rejection.status(), rejection.body_text())
    }
}

/// axum's `Path`, its rejections in OpenAI's shape (a plain-text 400 otherwise).
#[derive(axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

/// axum's `Query`, its rejections in OpenAI's shape (`limit=abc`, `canary=-1`).
#[derive(axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anthropic_routes_get_anthropic_errors_and_the_rest_openai_ones() {
        for path in [
            "/v1/messages",
            "/v1/messages/count_tokens",
            "/v1/messages/batches",
        ] {
            assert_eq!(ErrorShape::of_path(path), ErrorShape::Anthropic, "{path}");
        }
        for path in ["/v1/messagesx", "/v1/chat/completions", "/messages", "/"] {
            assert_eq!(ErrorShape::of_path(path), ErrorShape::OpenAi, "{path}");
        }
    }

    /// Anthropic's type follows the status, the same status as on the OpenAI routes, and the
    /// headers that tell a client when to retry are there in both shapes.
    #[tokio::test]
    async fn anthropic_errors_keep_the_gateways_statuses_and_headers() {
        use http_body_util::BodyExt;
        let spent = ApiError::TooManyRequests {
            message: "spent".into(),
            code: "insufficient_quota",
            retry_after_secs: Some(30),
            headers: Vec::new(),
        };
        let limited = ApiError::TooManyRequests {
            message: "slow down".into(),
            code: "rate_limit_exceeded",
            retry_after_secs: Some(2),
            headers: Vec::new(),
        };
        for (error, status, kind, retry) in [
            (
                ApiError::bad_request("x", None),
                400,
                "invalid_request_error",
                "false",
            ),
            (
                ApiError::Unauthorized("x".into()),
                401,
                "authentication_error",
                "false",
            ),
            (
                ApiError::Forbidden {
                    message: "x".into(),
                    code: "model_not_allowed",
                },
                403,
                "permission_error",
                "false",
            ),
            (
                ApiError::ModelNotFound("m".into()),
                404,
                "not_found_error",
                "false",
            ),
            (
                ApiError::PayloadTooLarge("x".into()),
                413,
                "request_too_large",
                "false",
            ),
            (limited, 429, "rate_limit_error", "true"),
            (spent, 429, "billing_error", "false"),
            (ApiError::Internal("x".into()), 500, "api_error", "true"),
            (ApiError::BadGateway("x".into()), 502, "api_error", "true"),
            (
                ApiError::Unavailable("x".into()),
                503,
                "overloaded_error",
                "true",
            ),
            (ApiError::StoreDown, 503, "overloaded_error", "true"),
            (
                ApiError::GatewayTimeout("x".into()),
                504,
                "timeout_error",
                "true",
            ),
        ] {
            let message = error.to_string();
            let response = error.into_response_as(ErrorShape::Anthropic);
            assert_eq!(response.status().as_u16(), status, "{kind}");
            assert_eq!(response.headers()[X_SHOULD_RETRY], retry, "{kind}");
            if status == 429 {
                assert!(response.headers().contains_key(http::header::RETRY_AFTER));
            }
            let body = response.into_body().collect().await.unwrap().to_bytes();
            let body: AnthropicErrorBody = serde_json::from_slice(&body).unwrap();
            assert_eq!(body, AnthropicErrorBody::new(kind, message));
        }
        // Mid-stream, the same shapes as events.
        let event = ErrorShape::Anthropic.stream_error("cut");
        assert_eq!(
            event,
            "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"api_error\",\"message\":\"cut\"}}\n\n"
        );
        let event = ErrorShape::OpenAi.stream_error("cut");
        assert!(
            event.starts_with(b"data: {\"error\":{\"message\":\"cut\""),
            "{event:?}"
        );
    }

    /// What clients are told about retrying, by kind of failure.
    #[test]
    fn retries_are_advised_where_they_can_help() {
        let limited = |code| ApiError::TooManyRequests {
            message: String::new(),
            code,
            retry_after_secs: None,
            headers: Vec::new(),
        };
        for (error, retry, origin) in [
            (ApiError::bad_request("x", None), false, Origin::Client),
            (ApiError::Unauthorized("x".into()), false, Origin::Client),
            (ApiError::PayloadTooLarge("x".into()), false, Origin::Client),
            (limited("rate_limit_exceeded"), true, Origin::Client),
            (limited("insufficient_quota"), false, Origin::Client),
            (ApiError::BadGateway("x".into()), true, Origin::Backend),
            (ApiError::Unavailable("x".into()), true, Origin::Backend),
            (ApiError::StoreDown, true, Origin::Store),
            (
                ApiError::PolicyUnavailable {
                    message: "x".into(),
                    retry_after_secs: 1,
                },
                true,
                Origin::Plugin,
            ),
            (ApiError::Internal("x".into()), true, Origin::Gateway),
        ] {
            assert_eq!(error.retryable(), retry, "{error:?}");
            assert_eq!(error.origin(), origin, "{error:?}");
            let response = error.into_response();
            let header = response.headers()[X_SHOULD_RETRY]
                .to_str()
                .unwrap()
                .to_owned();
            assert_eq!(header, retry.to_string());
        }
    }
}
