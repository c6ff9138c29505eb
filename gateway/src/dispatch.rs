//! Sending a request to a backend: try the candidates in order, retry the next one on a refused
//! connection or a 5xx before the first byte, then stream the answer back while metering it.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::Stream;

use crate::backends::{Backend, InFlight};
use crate::error::ApiError;
use crate::sse::{SseTap, Usage, error_event, usage_of_body};
use crate::state::AppState;

/// One admitted request, ready to send.
pub struct Outgoing {
    /// Metrics label of the route (`chat_completions`...).
    pub route: &'static str,
    /// Path under the backend's base URL (`/chat/completions`...).
    pub path: &'static str,
    pub model: String,
    pub body: Bytes,
    pub stream: bool,
    /// The client did not ask for the usage chunk; the gateway did, so hide it.
    pub hide_usage_chunk: bool,
    pub request_id: Option<HeaderValue>,
    pub started: Instant,
}

/// Forwards `out` to the first candidate that takes it.
pub async fn forward(
    state: &AppState,
    candidates: &[Arc<Backend>],
    out: Outgoing,
) -> Result<Response, ApiError> {
    let dispatch = &state.config.dispatch;
    let mut last_error = None;
    for backend in candidates.iter().take(dispatch.max_attempts) {
        let in_flight = backend.track();
        let mut request = state
            .http
            .post(format!("{}{}", backend.base_url, out.path))
            .header(header::CONTENT_TYPE, "application/json")
            .body(out.body.clone());
        if let Some(id) = &out.request_id {
            request = request.header("x-request-id", id.clone());
        }
        if let Some(key) = &backend.api_key {
            request = request.bearer_auth(key);
        }
        let response = match tokio::time::timeout(dispatch.first_byte_timeout(), request.send())
            .await
        {
            // The backend may still be working on it: retrying elsewhere would double the load
            // of a slow request, so a timeout ends the attempt.
            Err(_) => {
                state.metrics.backend_error(&backend.id, "timeout");
                return Err(ApiError::GatewayTimeout(format!(
                    "The backend did not answer within {} s.",
                    dispatch.first_byte_timeout_secs
                )));
            }
            Ok(Err(err)) => {
                let kind = if err.is_connect() { "connect" } else { "send" };
                state.metrics.backend_error(&backend.id, kind);
                tracing::warn!(backend = %backend.id, error = %err, "backend unreachable; trying the next");
                backend.cool_down(dispatch.cooldown());
                last_error = Some(ApiError::BadGateway(
                    "The backend could not be reached.".into(),
                ));
                continue;
            }
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        if status.is_server_error() {
            state.metrics.backend_error(&backend.id, "status_5xx");
            tracing::warn!(backend = %backend.id, status = status.as_u16(), "backend failed; trying the next");
            backend.cool_down(dispatch.cooldown());
            last_error = Some(ApiError::BadGateway(format!(
                "The backend failed with status {}.",
                status.as_u16()
            )));
            continue;
        }
        state
            .metrics
            .requests
            .with_label_values(&[out.route, &out.model, status.as_str()])
            .inc();
        let is_event_stream = response
            .headers()
            .get(header::CONTENT_TYPE)
            .is_some_and(|ct| ct.as_bytes().starts_with(b"text/event-stream"));
        return if out.stream && status.is_success() && is_event_stream {
            Ok(stream_response(state, backend, in_flight, response, out))
        } else {
            whole_response(state, response, out).await
        };
    }
    let error =
        last_error.unwrap_or_else(|| ApiError::Unavailable("No backend could be tried.".into()));
    state
        .metrics
        .requests
        .with_label_values(&[out.route, &out.model, error.status().as_str()])
        .inc();
    Err(error)
}

/// A non-streamed answer: read it whole (bounded in time), meter it, pass it on untouched.
async fn whole_response(
    state: &AppState,
    response: reqwest::Response,
    out: Outgoing,
) -> Result<Response, ApiError> {
    let status = response.status();
    let content_type = response.headers().get(header::CONTENT_TYPE).cloned();
    let body = match tokio::time::timeout(state.config.dispatch.request_timeout(), response.bytes())
        .await
    {
        Ok(Ok(body)) => body,
        Ok(Err(err)) => {
            return Err(ApiError::BadGateway(format!(
                "The backend's response broke off: {err}"
            )));
        }
        Err(_) => {
            return Err(ApiError::GatewayTimeout(
                "The backend did not finish its response in time.".into(),
            ));
        }
    };
    if status.is_success() {
        record_usage(state, &out.model, usage_of_body(&body));
    }
    state
        .metrics
        .request_duration
        .with_label_values(&[out.route, &out.model])
        .observe(out.started.elapsed().as_secs_f64());
    let mut builder = Response::builder().status(status);
    if let Some(ct) = content_type {
        builder = builder.header(header::CONTENT_TYPE, ct);
    }
    builder
        .body(Body::from(body))
        .map_err(|e| ApiError::Internal(e.to_string()))
}

fn record_usage(state: &AppState, model: &str, usage: Option<Usage>) {
    if let Some(usage) = usage {
        let tokens = &state.metrics.tokens;
        tokens
            .with_label_values(&[model, "prompt"])
            .inc_by(usage.prompt_tokens);
        tokens
            .with_label_values(&[model, "completion"])
            .inc_by(usage.completion_tokens);
    }
}

fn stream_response(
    state: &AppState,
    backend: &Arc<Backend>,
    in_flight: InFlight,
    response: reqwest::Response,
    out: Outgoing,
) -> Response {
    let tap = MeteredStream {
        upstream: Box::pin(response.bytes_stream()),
        tap: SseTap::new(out.hide_usage_chunk),
        state: state.clone(),
        backend_id: backend.id.clone(),
        route: out.route,
        model: out.model,
        started: out.started,
        first_chunk_seen: false,
        done: false,
        _in_flight: in_flight,
    };
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(tap))
        .unwrap_or_else(|_| ApiError::Internal("cannot build response".into()).into_response())
}

type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// The backend's event stream on its way to the client: forwarded as it arrives, its usage read,
/// metrics recorded when it ends (or when the client goes away, which drops it).
struct MeteredStream {
    upstream: ByteStream,
    tap: SseTap,
    state: AppState,
    backend_id: String,
    route: &'static str,
    model: String,
    started: Instant,
    first_chunk_seen: bool,
    done: bool,
    _in_flight: InFlight,
}

impl Stream for MeteredStream {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            match this.upstream.as_mut().poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(chunk))) => {
                    if !this.first_chunk_seen {
                        this.first_chunk_seen = true;
                        this.state
                            .metrics
                            .time_to_first_token
                            .with_label_values(&[&this.model])
                            .observe(this.started.elapsed().as_secs_f64());
                    }
                    let out = this.tap.feed(chunk);
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(out)));
                    }
                }
                Poll::Ready(Some(Err(err))) => {
                    // The rig or engine went away mid-stream. The client gets an error event it
                    // can act on, then the end of the stream (never a silent truncation).
                    this.done = true;
                    this.state.metrics.backend_error(&this.backend_id, "stream");
                    tracing::warn!(backend = %this.backend_id, error = %err, "backend stream broke off");
                    let mut out = this.tap.finish().to_vec();
                    out.extend_from_slice(&error_event(
                        "The backend stopped in the middle of the response; retry the request.",
                    ));
                    return Poll::Ready(Some(Ok(Bytes::from(out))));
                }
                Poll::Ready(None) => {
                    this.done = true;
                    let rest = this.tap.finish();
                    if !rest.is_empty() {
                        return Poll::Ready(Some(Ok(rest)));
                    }
                    return Poll::Ready(None);
                }
            }
        }
    }
}

impl Drop for MeteredStream {
    fn drop(&mut self) {
        record_usage(&self.state, &self.model, self.tap.usage());
        self.state
            .metrics
            .request_duration
            .with_label_values(&[self.route, &self.model])
            .observe(self.started.elapsed().as_secs_f64());
    }
}
