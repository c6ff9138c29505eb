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
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::backends::{Backend, InFlight};
use crate::error::ApiError;
use crate::metrics::RouteSeries;
use crate::sse::{self, SseTap, Usage, error_event, usage_of_body};
use crate::state::AppState;
use crate::store::ApiKeyRecord;
use crate::upstream::{UpstreamBody, UpstreamResponse};
use crate::usage::UsageEvent;

/// One admitted request, ready to send.
pub struct Outgoing {
    /// Path under the backend's base URL (`/chat/completions`...).
    pub path: &'static str,
    pub model: String,
    pub body: Bytes,
    pub stream: bool,
    /// The client did not ask for the usage chunk; the gateway did, so hide it.
    pub hide_usage_chunk: bool,
    /// The first token is the first event that carries output (`response.*.delta`), not the
    /// first bytes: a Responses stream opens with events (`response.created`...) that a
    /// backend may send before it has generated anything.
    pub first_token_is_an_event: bool,
    pub request_id: Option<HeaderValue>,
    /// The API key, for usage events and the rate limiter.
    pub key: Arc<ApiKeyRecord>,
    pub started: Instant,
    /// Wall-clock start, Unix milliseconds.
    pub started_at_ms: u64,
    /// Tokens the rate limiter reserved at admission, settled when the request ends.
    pub reserved_tokens: u32,
    /// The metrics of this route and model.
    pub series: Arc<RouteSeries>,
}

impl Outgoing {
    fn request_id(&self) -> &str {
        self.request_id
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }
}

/// The usage event of a finished request.
fn usage_event(
    out: &Outgoing,
    backend: &Backend,
    usage: Usage,
    ttft: std::time::Duration,
    total: std::time::Duration,
) -> UsageEvent {
    let latency_ms = total.as_millis() as u64;
    let (rig, operator) = match &backend.rig {
        Some(rig) => (rig.node_id.clone(), rig.operator.clone()),
        None => (String::new(), String::new()),
    };
    UsageEvent {
        request_id: out.request_id().to_owned(),
        key_id: out.key.id.clone(),
        model: out.model.clone(),
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
        cached_tokens: 0,
        latency_ms,
        ttft_ms: ttft.as_millis() as u64,
        backend: backend.id.clone(),
        rig,
        operator,
        started_at_ms: out.started_at_ms,
        // The start's wall clock plus the monotonic duration: one clock read fewer, and an
        // end that cannot come before the start when the wall clock steps back.
        finished_at_ms: out.started_at_ms + latency_ms,
        batch: false,
    }
}

/// Forwards `out` to the first candidate that takes it. A request that ends in an error here
/// gives its whole rate-limit reservation back.
pub async fn forward(
    state: &AppState,
    candidates: &[Arc<Backend>],
    out: Outgoing,
) -> Result<Response, ApiError> {
    let (backend, in_flight, response) = match send(state, candidates, &out).await {
        Ok(sent) => sent,
        Err(err) => {
            settle(state, &out, 0);
            return Err(err);
        }
    };
    let is_event_stream = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|ct| ct.as_bytes().starts_with(b"text/event-stream"));
    if out.stream && response.status().is_success() && is_event_stream {
        return Ok(stream_response(state, backend, in_flight, response, out));
    }
    let result = whole_response(state, backend, response, &out).await;
    if result.is_err() {
        settle(state, &out, 0);
    }
    result
}

/// Settles the rate limiter's reservation of `out` with the tokens the request `used`.
fn settle(state: &AppState, out: &Outgoing, used: u64) {
    crate::policy::settle(
        state,
        out.request_id(),
        &out.key.id,
        &out.model,
        out.reserved_tokens,
        used,
    );
}

/// Sends `out` to the first candidate that answers it: that backend, its in-flight mark, and
/// the answer's head.
async fn send<'a>(
    state: &AppState,
    candidates: &'a [Arc<Backend>],
    out: &Outgoing,
) -> Result<(&'a Arc<Backend>, InFlight, UpstreamResponse), ApiError> {
    let dispatch = &state.config.dispatch;
    let mut last_error = None;
    for backend in candidates.iter().take(dispatch.max_attempts) {
        let in_flight = backend.track();
        let send = backend.post(out.path, out.body.clone(), out.request_id.as_ref());
        let response = match tokio::time::timeout(dispatch.first_byte_timeout(), send).await {
            // The backend may still be working on it: retrying elsewhere would double the load
            // of a slow request, so a timeout ends the attempt.
            Err(_) => {
                state.metrics.backend_error(&backend.id, "timeout");
                return Err(count(
                    state,
                    out,
                    ApiError::GatewayTimeout(format!(
                        "The backend did not answer within {} s.",
                        dispatch.first_byte_timeout_secs
                    )),
                ));
            }
            Ok(Err(err)) => {
                let kind = if err.connect { "connect" } else { "send" };
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
        // A 5xx before the first byte, or a 401: the client's key was checked here, so a
        // backend's 401 refuses the gateway's own upstream key, and passing it on would tell
        // the client that *their* key is bad. Either way: the next backend, this one cooled.
        let failed = if status == StatusCode::UNAUTHORIZED {
            Some((
                "unauthorized",
                "The backend refused the gateway's credentials.".into(),
            ))
        } else if status.is_server_error() {
            Some((
                "status_5xx",
                format!("The backend failed with status {}.", status.as_u16()),
            ))
        } else {
            None
        };
        if let Some((kind, message)) = failed {
            state.metrics.backend_error(&backend.id, kind);
            tracing::warn!(backend = %backend.id, status = status.as_u16(), kind, "backend failed; trying the next");
            backend.cool_down(dispatch.cooldown());
            last_error = Some(ApiError::BadGateway(message));
            continue;
        }
        state.metrics.count(&out.series, &out.model, status);
        return Ok((backend, in_flight, response));
    }
    let error =
        last_error.unwrap_or_else(|| ApiError::Unavailable("No backend could be tried.".into()));
    Err(count(state, out, error))
}

/// Counts a request that ended in a gateway error after admission.
fn count(state: &AppState, out: &Outgoing, error: ApiError) -> ApiError {
    state.metrics.count(&out.series, &out.model, error.status());
    error
}

/// A non-streamed answer: read it whole (bounded in time), meter it, pass it on untouched.
async fn whole_response(
    state: &AppState,
    backend: &Backend,
    response: UpstreamResponse,
    out: &Outgoing,
) -> Result<Response, ApiError> {
    let (parts, body) = response.into_parts();
    let body =
        match tokio::time::timeout(state.config.dispatch.request_timeout(), body.collect()).await {
            Ok(Ok(body)) => body.to_bytes(),
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
    let usage = parts
        .status
        .is_success()
        .then(|| usage_of_body(&body))
        .flatten();
    let total = out.started.elapsed();
    finish(state, backend, out, usage, total, total);
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = parts.status;
    if let Some(ct) = parts.headers.get(header::CONTENT_TYPE) {
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, ct.clone());
    }
    Ok(response)
}

/// Everything that happens when a request ends, `total` after it started: metrics, the usage
/// event, the backend's measured speed, and the rate limiter's settlement.
fn finish(
    state: &AppState,
    backend: &Backend,
    out: &Outgoing,
    usage: Option<Usage>,
    ttft: std::time::Duration,
    total: std::time::Duration,
) {
    out.series.duration.observe(total.as_secs_f64());
    let used = usage.map_or(0, |u| u.prompt_tokens + u.completion_tokens);
    if let Some(usage) = usage {
        out.series.prompt_tokens.inc_by(usage.prompt_tokens);
        out.series.completion_tokens.inc_by(usage.completion_tokens);
        backend.observe(ttft, total.saturating_sub(ttft), usage.completion_tokens);
        state
            .usage
            .record(usage_event(out, backend, usage, ttft, total));
    }
    settle(state, out, used);
}

fn stream_response(
    state: &AppState,
    backend: &Arc<Backend>,
    in_flight: InFlight,
    response: UpstreamResponse,
    out: Outgoing,
) -> Response {
    let body = MeteredBody {
        upstream: response.into_body(),
        tap: SseTap::new(out.hide_usage_chunk),
        state: state.clone(),
        backend: Arc::clone(backend),
        out,
        first_chunk_at: None,
        terminal: None,
        gathered: Gathered::default(),
        yielded: 0,
        done: false,
        _in_flight: in_flight,
    };
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::new(body))
        .unwrap_or_else(|_| ApiError::Internal("cannot build response".into()).into_response())
}

/// The backend's event stream on its way to the client: forwarded frame by frame as it
/// arrives, its usage read, metrics recorded when it ends (or when the client goes away, which
/// drops it).
struct MeteredBody {
    upstream: UpstreamBody,
    tap: SseTap,
    state: AppState,
    backend: Arc<Backend>,
    out: Outgoing,
    /// Time to first token, once it came.
    first_chunk_at: Option<std::time::Duration>,
    /// How the backend's stream ended (`None` inside: cleanly), seen while gathering frames
    /// and acted on at the next poll.
    terminal: Option<Option<hyper::Error>>,
    /// Events read but not sent yet (see `poll_frame`).
    gathered: Gathered,
    /// Rounds the body yielded in a row with events gathered (see [`GATHER_YIELDS`]).
    yielded: u8,
    done: bool,
    _in_flight: InFlight,
}

/// Events gathered for one write to the client. Most writes carry a single frame from the
/// backend: that one is held as it came, and only a second one makes a copy of both.
#[derive(Default)]
struct Gathered {
    /// The first frame, while it is the only one (`more` is then empty).
    first: Bytes,
    more: bytes::BytesMut,
}

impl Gathered {
    fn push(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        if self.is_empty() {
            self.first = bytes;
            return;
        }
        if !self.first.is_empty() {
            let first = std::mem::take(&mut self.first);
            self.more.reserve(first.len() + bytes.len());
            self.more.extend_from_slice(&first);
        }
        self.more.extend_from_slice(&bytes);
    }

    fn len(&self) -> usize {
        self.first.len() + self.more.len()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Everything gathered, in order; empty afterwards.
    fn take(&mut self) -> Bytes {
        if self.more.is_empty() {
            std::mem::take(&mut self.first)
        } else {
            self.more.split().freeze()
        }
    }
}

/// Most bytes gathered into one write to the client.
const GATHER_LIMIT: usize = 64 * 1024;
/// Scheduler rounds a tunneled body with events gathered waits for the connection to hand over more
/// before it sends them. One is not enough on a multi-threaded runtime: another worker may
/// steal and poll the body before the connection task has run. Measured (bench/run.sh,
/// streamed, concurrency 16): one write per request instead of one per event, about 40 % less
/// gateway CPU per streamed request.
const GATHER_YIELDS: u8 = 3;

impl MeteredBody {
    /// Takes the next frame of the backend's stream (or how it ended, noted earlier) and reads
    /// it: usage, time to first token. `Ready(Some(bytes))` is what the client may see of it
    /// (possibly empty); `Ready(None)` the end, clean or not (in `terminal`).
    fn poll_upstream(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        if self.terminal.is_some() {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.upstream).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => {
                // Trailers (none from OpenAI-style servers) are not forwarded.
                let Ok(chunk) = frame.into_data() else {
                    return Poll::Ready(Some(Bytes::new()));
                };
                if self.first_chunk_at.is_none()
                    && (!self.out.first_token_is_an_event || sse::carries_output(&chunk))
                {
                    let ttft = self.out.started.elapsed();
                    self.first_chunk_at = Some(ttft);
                    self.out
                        .series
                        .time_to_first_token
                        .observe(ttft.as_secs_f64());
                }
                Poll::Ready(Some(self.tap.feed(chunk)))
            }
            Poll::Ready(Some(Err(err))) => {
                self.terminal = Some(Some(err));
                Poll::Ready(None)
            }
            Poll::Ready(None) => {
                self.terminal = Some(None);
                Poll::Ready(None)
            }
        }
    }

    /// The stream's last frame, once the backend ended it: what the tap still holds, and for a
    /// backend that broke off, an error event the client can act on (never a silent
    /// truncation).
    fn last_frame(&mut self) -> Option<Bytes> {
        self.done = true;
        let rest = self.tap.finish();
        match self.terminal.take().flatten() {
            None => (!rest.is_empty()).then_some(rest),
            Some(err) => {
                // The rig or engine went away mid-stream.
                self.state.metrics.backend_error(&self.backend.id, "stream");
                tracing::warn!(backend = %self.backend.id, error = %err, "backend stream broke off");
                let mut out = rest.to_vec();
                out.extend_from_slice(&error_event(
                    "The backend stopped in the middle of the response; retry the request.",
                ));
                Some(Bytes::from(out))
            }
        }
    }
}

impl HttpBody for MeteredBody {
    type Data = Bytes;
    type Error = std::io::Error;

    /// Forwards the backend's events as they come, gathering into one write those that arrive
    /// together: hyper's server writes to the client whenever the body is not ready, and taken
    /// one by one, a burst of 18 events (an engine ahead of the network, a tunnel delivering
    /// several at once) would cost 18 writes and 18 wake-ups of the client. On a URL backend's
    /// connection, which this body drives, pending means nothing more has arrived, and what
    /// was gathered goes out at once. A rig's tunnel hands frames over one at a time from its
    /// connection's own task: there, when the backend has nothing more *right now*, the body
    /// yields to the executor (the connection task runs and hands over what it has already
    /// read) and sends what it gathered only after [`GATHER_YIELDS`] rounds brought nothing
    /// new. A paced stream through a tunnel pays those few scheduler rounds (microseconds) per
    /// event.
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        loop {
            if this.gathered.len() >= GATHER_LIMIT {
                return Poll::Ready(Some(Ok(Frame::data(this.gathered.take()))));
            }
            match this.poll_upstream(cx) {
                Poll::Ready(Some(out)) => {
                    this.gathered.push(out);
                    this.yielded = 0;
                }
                Poll::Ready(None) => {
                    if !this.gathered.is_empty() {
                        // The end (or the error) goes out at the next poll, after this data.
                        return Poll::Ready(Some(Ok(Frame::data(this.gathered.take()))));
                    }
                    return Poll::Ready(this.last_frame().map(|bytes| Ok(Frame::data(bytes))));
                }
                Poll::Pending if this.gathered.is_empty() => return Poll::Pending,
                Poll::Pending
                    if this.yielded < GATHER_YIELDS && !this.upstream.drives_its_connection() =>
                {
                    this.yielded += 1;
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Poll::Pending => {
                    this.yielded = 0;
                    return Poll::Ready(Some(Ok(Frame::data(this.gathered.take()))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        // A Responses stream whose output came all at once, with its end, or never.
        let ttft = match self.first_chunk_at {
            Some(ttft) => ttft,
            None if self.out.first_token_is_an_event => self.out.started.elapsed(),
            None => std::time::Duration::ZERO,
        };
        finish(
            &self.state,
            &self.backend,
            &self.out,
            self.tap.usage(),
            ttft,
            self.out.started.elapsed(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathered_frames_keep_their_order_and_a_lone_one_is_not_copied() {
        let mut gathered = Gathered::default();
        assert!(gathered.is_empty());
        let one = Bytes::from_static(b"data: 1\n\n");
        gathered.push(one.clone());
        gathered.push(Bytes::new());
        let taken = gathered.take();
        assert_eq!(
            taken.as_ptr(),
            one.as_ptr(),
            "a lone frame goes out as it came"
        );
        assert!(gathered.is_empty());

        for frames in [&["a", "b"][..], &["a", "", "b", "c"]] {
            for frame in frames {
                gathered.push(Bytes::copy_from_slice(frame.as_bytes()));
            }
            assert_eq!(gathered.len(), frames.concat().len());
            assert_eq!(gathered.take(), frames.concat());
            assert!(gathered.is_empty());
            assert_eq!(gathered.take(), "");
        }
    }
}
