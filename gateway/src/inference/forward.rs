//! Sending a request to a backend: try the candidates in order, retry the next one on a refused
//! connection or a 5xx before the first byte, then stream the answer back while metering it.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use garage_node_protocol::RECEIPT_TRAILER;
use garage_node_protocol::receipt::AnswerHasher;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;

use crate::backends::{Backend, InFlight};
use crate::error::{AnthropicErrorBody, ApiError, ErrorShape};
use crate::inference::sse::{self, SseTap, Usage, usage_of_body};
use crate::ledger::UsageEvent;
use crate::ledger::billing::{Correction, OutputCount, RequestBounds, TextKind, bill};
use crate::ledger::{Counted, CountedBy, tokens};
use crate::metrics::RouteSeries;
use crate::nodes::receipts::{Answer, Served};
use crate::nodes::trust::CheckKind;
use crate::state::AppState;
use crate::store::ApiKeyRecord;
use crate::telemetry::{KeyValue, Phase, RequestTrace, Served as TraceServed};
use crate::upstream::{UpstreamBody, UpstreamResponse};

/// One request on the inference path, from its arrival to its end: what each phase learned of
/// it. Made when the request arrives ([`RequestCtx::new`]); admission fills in the key, the
/// model, the body and the reservation; [`forward`] takes it to a backend; and whichever way
/// the request ends, [`finish`] ends it, once.
pub struct RequestCtx {
    /// The route's metrics label (`chat_completions`...).
    pub route: &'static str,
    /// Path under the backend's base URL (`/chat/completions`...).
    pub path: &'static str,
    /// Empty until the body is parsed.
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
    /// The API key, for usage events and the rate limiter, once authenticated.
    pub key: Option<Arc<ApiKeyRecord>>,
    pub started: Instant,
    /// Wall-clock start, Unix milliseconds.
    pub started_at_ms: u64,
    /// Tokens the rate limiter reserved at admission, settled when the request ends.
    pub reserved_tokens: u32,
    /// What the request allows its usage to be, for the bill.
    pub bounds: RequestBounds,
    /// The rate limiter version that admitted the request, which its settlement goes to.
    pub reservation: Option<crate::plugins::Reservation>,
    /// The metrics of this route and model, once the model is one some backend serves (a
    /// model nobody serves is not recorded by name: the label stays bounded).
    pub series: Option<Arc<RouteSeries>>,
    /// The shape of the route's errors, a backend's refusals and a broken stream's last event
    /// included.
    pub error_shape: ErrorShape,
    /// Whether the request is charged; one that is not (counting tokens) is recorded at zero
    /// tokens, and settled with the rate limiter at the tokens it had counted.
    pub charged: bool,
    /// The price the meter quoted at admission: what the request is charged.
    pub price: Option<crate::plugins::Price>,
    /// What the key's account holds for the request: released if it ends without usage.
    pub hold: Option<crate::accounts::Hold>,
    /// The request's trace: its spans when traces are on, or a client's `traceparent` to pass
    /// on when they are off; `None` otherwise (boxed: most requests have none).
    pub trace: Option<Box<RequestTrace>>,
}

impl RequestCtx {
    /// A request that just arrived on `route`, to go to `path` of a backend.
    pub fn new(route: &'static str, path: &'static str, request_id: Option<HeaderValue>) -> Self {
        RequestCtx {
            route,
            path,
            model: String::new(),
            body: Bytes::new(),
            stream: false,
            hide_usage_chunk: false,
            first_token_is_an_event: false,
            request_id,
            key: None,
            started: Instant::now(),
            started_at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            reserved_tokens: 0,
            bounds: RequestBounds::default(),
            reservation: None,
            series: None,
            error_shape: ErrorShape::OpenAi,
            charged: true,
            price: None,
            hold: None,
            trace: None,
        }
    }

    pub fn request_id(&self) -> &str {
        self.request_id
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    fn key_id(&self) -> &str {
        self.key.as_ref().map_or("", |key| key.id.as_str())
    }
}

/// The usage event of a finished request.
fn usage_event(
    out: &RequestCtx,
    backend: &Backend,
    usage: Usage,
    counted: Counted,
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
        key_id: out.key_id().to_owned(),
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
        counted,
        trust: backend.trust(),
        price: out.price,
    }
}

/// Forwards `out` to the first candidate that takes it. A request that ends in an error here
/// gives its whole rate-limit reservation back. A request whose client goes away while the
/// backend works on a whole answer is billed its prompt: see [`Abandoned`].
pub async fn forward(
    state: &AppState,
    candidates: &[Arc<Backend>],
    out: RequestCtx,
) -> Result<Response, ApiError> {
    let mut abandoned = Abandoned {
        state,
        candidates,
        trying: AtomicUsize::new(NOT_YET),
        out: Some(out),
    };
    let sent = send(state, candidates, abandoned.out(), &abandoned.trying).await;
    let (backend, in_flight, response) = match sent {
        Ok(sent) => sent,
        Err(err) => {
            let out = abandoned.disarm();
            finish(state, &out, Outcome::Failed(err.status()));
            return Err(err);
        }
    };
    // From the answer's head to its end (the first token and the end of a stream as events).
    let response_span = abandoned
        .out()
        .trace
        .as_deref()
        .and_then(|trace| trace.phase("response"));
    let is_event_stream = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|ct| ct.as_bytes().starts_with(b"text/event-stream"));
    if abandoned.out().stream && response.status().is_success() && is_event_stream {
        // From here the stream's body ends the request, however it ends.
        let out = abandoned.disarm();
        return Ok(stream_response(
            state,
            backend,
            in_flight,
            response,
            out,
            response_span,
        ));
    }
    let result = whole_response(state, backend, response, abandoned.out()).await;
    if let (Some(span), Err(err)) = (&response_span, &result) {
        span.fail(err.to_string());
    }
    drop(response_span);
    let out = abandoned.disarm();
    match result {
        Ok((response, outcome)) => {
            finish(state, &out, outcome.with_status(response.status()));
            Ok(response)
        }
        Err(err) => {
            finish(state, &out, Outcome::Failed(err.status()));
            Err(err)
        }
    }
}

/// A request on its way to a backend, or waiting for its answer. Dropped armed, the client
/// went away (hyper drops the handler's future, and with it the backend's request, which the
/// engine then aborts): the backend being tried had the prompt, so the request is billed the
/// gateway's estimate of it, and settled with the rate limiter at that. A non-streamed answer
/// sends nothing before it is whole, so this is how a client that gives up on one is billed.
struct Abandoned<'a> {
    state: &'a AppState,
    candidates: &'a [Arc<Backend>],
    /// Index of the candidate tried last (set by [`send`] before each attempt), or
    /// [`NOT_YET`].
    trying: AtomicUsize,
    out: Option<RequestCtx>,
}

/// No candidate tried yet.
const NOT_YET: usize = usize::MAX;

impl Abandoned<'_> {
    fn out(&self) -> &RequestCtx {
        match &self.out {
            Some(out) => out,
            None => unreachable!("read before it is disarmed"),
        }
    }

    fn disarm(&mut self) -> RequestCtx {
        match self.out.take() {
            Some(out) => out,
            None => unreachable!("disarmed once"),
        }
    }
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        let trying = self.candidates.get(self.trying.load(Ordering::Relaxed));
        let (Some(out), Some(backend)) = (self.out.take(), trying) else {
            return;
        };
        tracing::debug!(backend = %backend.id, "client gone before the answer; billed its prompt");
        finish(self.state, &out, Outcome::Abandoned { backend });
    }
}

/// Settles the rate limiter's reservation of `out` with the tokens the request `used`.
fn settle(state: &AppState, out: &RequestCtx, used: u64) {
    crate::inference::policy::settle(
        state.plugins(),
        out.reservation.as_ref(),
        out.request_id(),
        out.key_id(),
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
    out: &RequestCtx,
    trying: &AtomicUsize,
) -> Result<(&'a Arc<Backend>, InFlight, UpstreamResponse), ApiError> {
    let dispatch = &state.config().dispatch;
    let mut last_error = None;
    // Backends that answered 5xx, not cooled down yet: a 5xx may be the request's doing (a
    // body that makes the engine fail), and cooling a backend for it would let one client take
    // every backend of a model out of rotation for everyone. A backend is cooled only once
    // another one answered the same body; two 5xx in a row end the attempts, with nobody
    // cooled.
    let mut failed_5xx: Vec<&Arc<Backend>> = Vec::new();
    for (index, backend) in candidates.iter().take(dispatch.max_attempts).enumerate() {
        trying.store(index, Ordering::Relaxed);
        let in_flight = backend.track();
        let (span, trace) = match out.trace.as_deref() {
            Some(trace) => {
                let rig = backend.rig.as_ref().map(|rig| rig.node_id.as_str());
                let (span, headers) = trace.dispatch(&backend.id, rig);
                (span, Some(headers))
            }
            None => (None, None),
        };
        let send = backend.post(
            out.path,
            out.body.clone(),
            out.request_id.as_ref(),
            trace.as_ref(),
        );
        let sent = tokio::time::timeout(dispatch.first_byte_timeout(), send).await;
        if let Some(span) = &span {
            match &sent {
                Err(_) => span.fail("no answer within dispatch.first_byte_timeout_secs".into()),
                Ok(Err(err)) => span.fail(err.to_string()),
                Ok(Ok(response)) => span.set(KeyValue::new(
                    "http.response.status_code",
                    i64::from(response.status().as_u16()),
                )),
            }
        }
        drop(span);
        let response = match sent {
            // The backend may still be working on it: retrying elsewhere would double the load
            // of a slow request, so a timeout ends the attempt.
            Err(_) => {
                state.metrics().backend_error(&backend.id, "timeout");
                return Err(ApiError::GatewayTimeout(format!(
                    "The backend did not answer within {} s.",
                    dispatch.first_byte_timeout_secs
                )));
            }
            Ok(Err(err)) => {
                let kind = if err.connect { "connect" } else { "send" };
                state.metrics().backend_error(&backend.id, kind);
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
        // A 401: the client's key was checked here, so a backend's 401 refuses the gateway's
        // own upstream key, and passing it on would tell the client that *their* key is bad.
        // The next backend, this one cooled: that is the backend's fault, whatever the body.
        if status == StatusCode::UNAUTHORIZED {
            state.metrics().backend_error(&backend.id, "unauthorized");
            tracing::warn!(backend = %backend.id, "backend refused the gateway's credentials; trying the next");
            backend.cool_down(dispatch.cooldown());
            last_error = Some(ApiError::BadGateway(
                "The backend refused the gateway's credentials.".into(),
            ));
            continue;
        }
        if status.is_server_error() {
            state.metrics().backend_error(&backend.id, "status_5xx");
            failed_5xx.push(backend);
            last_error = Some(ApiError::BadGateway(format!(
                "The backend failed with status {}.",
                status.as_u16()
            )));
            if failed_5xx.len() >= 2 {
                tracing::warn!(
                    status = status.as_u16(),
                    backends = failed_5xx.len(),
                    "backends failed on the same request; none cooled down"
                );
                break;
            }
            tracing::warn!(backend = %backend.id, status = status.as_u16(), "backend failed; trying the next");
            continue;
        }
        // Another backend took the body the failed ones refused: they failed on their own.
        for failed in failed_5xx {
            failed.cool_down(dispatch.cooldown());
        }
        return Ok((backend, in_flight, response));
    }
    let error =
        last_error.unwrap_or_else(|| ApiError::Unavailable("No backend could be tried.".into()));
    Err(error)
}

/// A non-streamed answer: read it whole (bounded in time and size), meter it, pass it on
/// untouched; an error in another shape than OpenAI's is wrapped in it.
async fn whole_response<'a>(
    state: &AppState,
    backend: &'a Backend,
    response: UpstreamResponse,
    out: &RequestCtx,
) -> Result<(Response, Outcome<'a>), ApiError> {
    let (parts, body) = response.into_parts();
    let limit = state.config().dispatch.max_response_bytes;
    let limited = http_body_util::Limited::new(body, limit);
    let body = match tokio::time::timeout(
        state.config().dispatch.request_timeout(),
        limited.collect(),
    )
    .await
    {
        Ok(Ok(body)) => body,
        Ok(Err(err)) if err.is::<http_body_util::LengthLimitError>() => {
            state.metrics().backend_error(&backend.id, "too_large");
            tracing::warn!(backend = %backend.id, limit, "backend answer over dispatch.max_response_bytes; dropped");
            return Err(ApiError::BadGateway(format!(
                "The backend's answer is larger than this gateway passes on ({limit} bytes)."
            )));
        }
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
    // A rig's receipt comes after the body, as a trailer.
    let receipt = receipt_of(body.trailers());
    let mut body = body.to_bytes();
    let mut outcome = if parts.status.is_success() {
        let answer = backend.rig.is_some().then(|| {
            let mut hasher = AnswerHasher::default();
            hasher.update(&body);
            answer_of(hasher, parts.status, receipt)
        });
        let mut output = OutputCount::default();
        let tokenizer = state.tokenizers().get(&out.model);
        let mut text = tokenizer.map(|_| String::new());
        output.scan_into(&body, whole_text_kind(out.bounds.text), text.as_mut());
        Outcome::Answered {
            backend,
            status: parts.status,
            reported: usage_of_body(&body),
            output,
            counted_completion: tokenizer.zip(text).map(|(t, text)| t.count(&text)),
            ttft: out.started.elapsed(),
            answer,
            accounted: None,
        }
    } else {
        // The engine refused the request (a 4xx: 5xx were retried). Nothing to bill.
        Outcome::Refused(parts.status)
    };
    // A quoted request's cost, known before its answer goes: in the answer's usage and a
    // header. (Its receipt was checked against the answer as the rig sent it.)
    let mut cost = None;
    if let (
        Some(price),
        Outcome::Answered {
            backend,
            reported,
            output,
            counted_completion,
            accounted,
            ..
        },
    ) = (out.price, &mut outcome)
    {
        let billed = account(state, out, backend, *reported, output, *counted_completion);
        let credits = billed.cost(out, &price);
        if let Some(with_cost) = super::cost::with_cost(&body, credits) {
            body = with_cost;
        }
        cost = Some(credits);
        *accounted = Some(Box::new(billed));
    }
    let mut response = Response::new(Body::from(body));
    if let Some(credits) = cost
        && let Ok(value) = HeaderValue::from_str(&credits.to_string())
    {
        response
            .headers_mut()
            .insert(super::cost::COST_HEADER, value);
    }
    *response.status_mut() = parts.status;
    if let Some(ct) = parts.headers.get(header::CONTENT_TYPE) {
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, ct.clone());
    }
    if !parts.status.is_success() {
        return Ok((upstream_error(response, out.error_shape).await, outcome));
    }
    Ok((response, outcome))
}

/// The receipt a rig sent in its answer's trailers.
fn receipt_of(trailers: Option<&http::HeaderMap>) -> Option<String> {
    let value = trailers?.get(RECEIPT_TRAILER)?;
    value.to_str().ok().map(str::to_owned)
}

/// What the gateway received from a rig, for checking its receipt.
fn answer_of(hasher: AnswerHasher, status: StatusCode, receipt: Option<String>) -> Answer {
    let (sha256, bytes) = hasher.finish();
    Answer {
        status: status.as_u16(),
        bytes,
        sha256,
        receipt,
    }
}

/// The members holding text in a whole answer of an endpoint whose streams use `kind`.
fn whole_text_kind(kind: TextKind) -> TextKind {
    match kind {
        TextKind::ResponsesStream => TextKind::Responses,
        TextKind::ChatStream => TextKind::Chat,
        other => other,
    }
}

/// An engine's error answer in the route's shape. OpenAI's: passed as it is when it already
/// has an `error` object with a message. Anthropic's: passed as it is when it is Anthropic's
/// envelope with Anthropic's type for its status; vLLM's Anthropic routes put their own types
/// in it (`BadRequestError`), and an engine may answer in OpenAI's shape: its message is kept,
/// in Anthropic's envelope. Anything else (plain text, FastAPI's `{"detail": ...}`, vLLM's
/// older `{"object": "error", "message": ...}`) is wrapped, its status kept and its text in the
/// message.
async fn upstream_error(response: Response, shape: ErrorShape) -> Response {
    #[derive(serde::Deserialize)]
    struct Other {
        #[serde(default)]
        message: Option<String>,
        #[serde(default)]
        detail: Option<serde_json::Value>,
    }
    let (parts, body) = response.into_parts();
    let Ok(bytes) = body.collect().await.map(|b| b.to_bytes()) else {
        return Response::from_parts(parts, Body::empty());
    };
    let status = parts.status;
    let anthropic_kind = AnthropicErrorBody::kind_of_status(status);
    let value = serde_json::from_slice::<serde_json::Value>(&bytes).unwrap_or_default();
    let structured = value["error"]["message"].as_str();
    let passes = structured.is_some()
        && match shape {
            ErrorShape::OpenAi => true,
            ErrorShape::Anthropic => {
                value["type"] == "error" && value["error"]["type"] == anthropic_kind
            }
        };
    if passes {
        return Response::from_parts(parts, Body::from(bytes));
    }
    let message = match structured {
        // Bounded: an engine's error page is no message.
        Some(message) => message.chars().take(ENGINE_ERROR_CHARS).collect(),
        None => {
            let text = match serde_json::from_slice::<Other>(&bytes) {
                Ok(Other {
                    message: Some(message),
                    ..
                }) => message,
                Ok(Other {
                    detail: Some(serde_json::Value::String(detail)),
                    ..
                }) => detail,
                Ok(Other {
                    detail: Some(detail),
                    ..
                }) => detail.to_string(),
                _ => String::from_utf8_lossy(&bytes).trim().to_owned(),
            };
            let text: String = text.chars().take(ENGINE_ERROR_CHARS).collect();
            if text.is_empty() {
                format!(
                    "The backend refused the request (status {}).",
                    status.as_u16()
                )
            } else {
                format!(
                    "The backend refused the request (status {}): {text}",
                    status.as_u16()
                )
            }
        }
    };
    let mut response = match shape {
        ErrorShape::OpenAi => {
            let kind = match status {
                StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
                s if s.is_server_error() => "server_error",
                _ => "invalid_request_error",
            };
            let body = crate::error::ErrorBody::new(message, kind, Some("upstream_error"));
            (status, axum::Json(body)).into_response()
        }
        ErrorShape::Anthropic => {
            let body = AnthropicErrorBody::new(anthropic_kind, message);
            (status, axum::Json(body)).into_response()
        }
    };
    response.headers_mut().remove(header::CONTENT_LENGTH);
    response
}

/// Characters of an engine's own error text kept in the message the client gets.
const ENGINE_ERROR_CHARS: usize = 500;

/// What a request is billed, and who counted it: the bill within the request's bounds, and
/// the gateway's own count where it has the model's tokenizer (a disagreement is a failed
/// check of the rig that served it). Worked out once per request: when its answer's cost is
/// written into it, or else when it ends.
pub struct Accounted {
    billed: crate::ledger::billing::Billed,
    counted: Counted,
}

impl Accounted {
    /// What the request costs at `price`: its billed tokens, or nothing for a request that is
    /// not charged (counting tokens).
    fn cost(&self, ctx: &RequestCtx, price: &crate::plugins::Price) -> f64 {
        if !ctx.charged {
            return 0.0;
        }
        let usage = self.billed.usage;
        super::cost::cost(price, usage.prompt_tokens, usage.completion_tokens)
    }
}

fn account(
    state: &AppState,
    ctx: &RequestCtx,
    backend: &Backend,
    reported: Option<Usage>,
    output: &OutputCount,
    counted_completion: Option<u64>,
) -> Accounted {
    let mut billed = bill(reported, output, &ctx.bounds, || {
        crate::ledger::billing::media_parts(&ctx.body)
    });
    // With the model's tokenizer, the gateway's own count is what is billed and rewarded.
    let mut counted = Counted::default();
    if let Some(completion) = counted_completion
        && let Some(tokenizer) = state.tokenizers().get(&ctx.model)
        && let Some(prompt) = tokenizer.count_prompt(ctx.path, &ctx.body)
    {
        let check = tokens::check(
            reported,
            Usage {
                prompt_tokens: prompt,
                completion_tokens: completion,
            },
        );
        if !check.agreed {
            billed.corrections.push(Correction::Disputed);
            // A failed check of the rig that served it (off the request's path).
            if let (Some(rig), Some(reported)) = (&backend.rig, reported) {
                let nodes = Arc::clone(state.nodes());
                let rig = rig.node_id.clone();
                let discrepancy = format!(
                    "reported {} prompt and {} completion tokens; the gateway counted {} and {}",
                    reported.prompt_tokens,
                    reported.completion_tokens,
                    check.counted.prompt_tokens,
                    check.counted.completion_tokens
                );
                tokio::spawn(async move {
                    let failed = nodes
                        .record_check(&rig, CheckKind::Usage, Some(&discrepancy))
                        .await;
                    if let Err(err) = failed {
                        tracing::warn!(node = %rig, error = %err, "cannot record a failed usage check");
                    }
                });
            }
        }
        billed.usage = check.counted;
        counted = Counted {
            by: CountedBy::Gateway,
            reported_prompt_tokens: reported.map(|r| r.prompt_tokens),
            reported_completion_tokens: reported.map(|r| r.completion_tokens),
            agreed: check.agreed,
        };
        state.usage().note_check(&counted);
    }
    state.usage().note_corrections(
        &billed.corrections,
        &backend.id,
        ctx.request_id(),
        reported,
        billed.usage,
    );
    Accounted { billed, counted }
}

/// How a request ended, for [`finish`].
pub enum Outcome<'a> {
    /// Before any backend answered: refused at admission (a bad key, a limit, no healthy
    /// backend...) or every backend failed. Its status; nothing to bill.
    Failed(StatusCode),
    /// The backend refused the request (a 4xx): its status; nothing to bill.
    Refused(StatusCode),
    /// The backend answered, whole or as a stream that ended however it did: its reported
    /// usage, if any, and the output the gateway forwarded (see [`crate::ledger::billing`]).
    Answered {
        backend: &'a Backend,
        status: StatusCode,
        reported: Option<Usage>,
        output: OutputCount,
        /// The gateway's own count of the completion, for a model whose tokenizer it has.
        counted_completion: Option<u64>,
        /// Time to the first token (the whole answer's time for one that is not streamed).
        ttft: std::time::Duration,
        /// From a rig, ended whole: what came, for its receipt.
        answer: Option<Answer>,
        /// What it is billed, when that was worked out before the end (to write its cost
        /// into the answer). Boxed: most answers have none, and an outcome is moved about.
        accounted: Option<Box<Accounted>>,
    },
    /// The client went away before a whole answer came: the prompt is billed. Counted as
    /// nginx's 499, as no status went out.
    Abandoned { backend: &'a Backend },
}

impl Outcome<'_> {
    /// The same outcome, with the status the client was sent.
    fn with_status(self, sent: StatusCode) -> Self {
        match self {
            Outcome::Refused(_) => Outcome::Refused(sent),
            Outcome::Answered {
                backend,
                reported,
                output,
                counted_completion,
                ttft,
                answer,
                accounted,
                ..
            } => Outcome::Answered {
                backend,
                status: sent,
                accounted,
                reported,
                output,
                counted_completion,
                ttft,
                answer,
            },
            other => other,
        }
    }
}

/// Status label of a request whose client went away before an answer (nginx's).
const CLIENT_CLOSED: u16 = 499;

/// The one place a request ends, whichever way it does: its status counted, its duration, the
/// usage event (what the gateway bills, see [`crate::ledger::billing`]), the backend's measured
/// speed, and the rate limiter's settlement.
pub fn finish(state: &AppState, ctx: &RequestCtx, outcome: Outcome<'_>) {
    let total = ctx.started.elapsed();
    let status = match &outcome {
        Outcome::Failed(status) | Outcome::Refused(status) => *status,
        Outcome::Answered { status, .. } => *status,
        Outcome::Abandoned { .. } => {
            StatusCode::from_u16(CLIENT_CLOSED).unwrap_or(StatusCode::BAD_REQUEST)
        }
    };
    match &ctx.series {
        Some(series) => {
            state.metrics().count(series, status);
            series.duration.observe(total.as_secs_f64());
        }
        None => state
            .metrics()
            .requests
            .with_label_values(&[ctx.route, "", status.as_str()])
            .inc(),
    }
    let (backend, reported, output, counted_completion, ttft, answer, accounted) = match outcome {
        Outcome::Failed(_) | Outcome::Refused(_) => {
            if let Some(trace) = &ctx.trace {
                trace.end(status, None);
            }
            settle(state, ctx, 0);
            if let Some(hold) = &ctx.hold {
                crate::accounts::holds::release_later(state.accounts(), hold, ctx.request_id());
            }
            return;
        }
        Outcome::Answered {
            backend,
            reported,
            output,
            counted_completion,
            ttft,
            answer,
            accounted,
            ..
        } => (
            backend,
            reported,
            output,
            counted_completion,
            ttft,
            answer,
            accounted,
        ),
        Outcome::Abandoned { backend } => (
            backend,
            None,
            OutputCount::default(),
            None,
            total,
            None,
            None,
        ),
    };
    // Worked out already when the answer carried its cost.
    let Accounted { billed, counted } = match accounted {
        Some(accounted) => *accounted,
        None => account(state, ctx, backend, reported, &output, counted_completion),
    };
    // A request that is not charged (counting tokens) is recorded at zero tokens, which the
    // token metrics agree with; the rate limiter is settled at what it counted.
    let used = billed.usage;
    let usage = if ctx.charged { used } else { Usage::default() };
    if let Some(series) = &ctx.series {
        series.prompt_tokens.inc_by(usage.prompt_tokens);
        series.completion_tokens.inc_by(usage.completion_tokens);
    }
    if reported.is_some() {
        backend.observe(ttft, total.saturating_sub(ttft), usage.completion_tokens);
    }
    if let Some(trace) = &ctx.trace {
        trace.end(
            status,
            Some(TraceServed {
                backend: &backend.id,
                rig: backend.rig.as_ref().map(|rig| rig.node_id.as_str()),
                input_tokens: usage.prompt_tokens,
                output_tokens: usage.completion_tokens,
            }),
        );
    }
    let event = usage_event(ctx, backend, usage, counted, ttft, total);
    if let Some(rig) = &backend.rig {
        // Its receipt checked and its statement entry kept, off the request's path.
        state.nodes().note_served(Served {
            node: rig.node_id.clone(),
            request_id: event.request_id.clone(),
            model: event.model.clone(),
            finished_at_ms: event.finished_at_ms,
            billed: usage,
            reported,
            answer,
            receipt_expected: true,
        });
    }
    state.usage().record(event);
    maybe_replay(state, ctx, backend);
    settle(
        state,
        ctx,
        used.prompt_tokens.saturating_add(used.completion_tokens),
    );
}

/// Replays a share of real temperature-0 chat requests as spot checks of the rig that served
/// them (see `nodes::challenge`), off the request's path; never for a key that said no.
fn maybe_replay(state: &AppState, ctx: &RequestCtx, backend: &Backend) {
    let share = state.config().trust.replay_share;
    let Some(rig) = &backend.rig else {
        return;
    };
    if share <= 0.0
        || ctx.path != "/chat/completions"
        || !rand::Rng::random_bool(&mut rand::rng(), share.min(1.0))
        || ctx.key.as_ref().is_some_and(|key| {
            key.metadata.get(crate::keys::REPLAY) == Some(&serde_json::Value::Bool(false))
        })
    {
        return;
    }
    let nodes = Arc::clone(state.nodes());
    let config = state.config().trust.clone();
    let (id, model, body) = (rig.node_id.clone(), ctx.model.clone(), ctx.body.clone());
    tokio::spawn(async move {
        if let Err(err) = nodes.replay_check(&id, &config, &model, &body).await {
            tracing::debug!(node = %id, error = %err, "replay not run");
        }
    });
}

fn stream_response(
    state: &AppState,
    backend: &Arc<Backend>,
    in_flight: InFlight,
    response: UpstreamResponse,
    out: RequestCtx,
    response_span: Option<Phase>,
) -> Response {
    let generated = state.tokenizers().get(&out.model).map(|_| String::new());
    let status = response.status();
    let body = MeteredBody {
        upstream: response.into_body(),
        hasher: backend.rig.is_some().then(AnswerHasher::default),
        receipt: None,
        status,
        tap: SseTap::new(out.hide_usage_chunk),
        state: state.clone(),
        backend: Arc::clone(backend),
        out,
        first_chunk_at: None,
        finished: false,
        output: OutputCount::default(),
        generated,
        terminal: None,
        gathered: Gathered::default(),
        yielded: 0,
        done: false,
        accounted: None,
        response_span,
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
    /// A rig's answer: its bytes as they came, before the tap took anything out.
    hasher: Option<AnswerHasher>,
    /// A rig's receipt, from the stream's trailers.
    receipt: Option<String>,
    /// The backend's status.
    status: StatusCode,
    tap: SseTap,
    state: AppState,
    backend: Arc<Backend>,
    out: RequestCtx,
    /// Time to first token, once it came.
    first_chunk_at: Option<std::time::Duration>,
    /// Whether [`finish`] ran: when the backend ended the stream (before its last bytes go
    /// out), or when the body is dropped (the client went away).
    finished: bool,
    /// The output forwarded so far: what the request is billed if it ends without a usage
    /// report, and the bound of what a report may claim.
    output: OutputCount,
    /// The text forwarded so far, for a model whose tokens the gateway counts.
    generated: Option<String>,
    /// How the backend's stream ended (`None` inside: cleanly), seen while gathering frames
    /// and acted on at the next poll.
    terminal: Option<Option<hyper::Error>>,
    /// Events read but not sent yet (see `poll_frame`).
    gathered: Gathered,
    /// Rounds the body yielded in a row with events gathered (see [`GATHER_YIELDS`]).
    yielded: u8,
    done: bool,
    /// What the request is billed, once the stream's last usage report carried its cost.
    accounted: Option<Box<Accounted>>,
    /// The trace's `response` span, ended with the stream.
    response_span: Option<Phase>,
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
                // Trailers are not forwarded: a rig's receipt is for the gateway (and none come
                // from OpenAI-style servers).
                let chunk = match frame.into_data() {
                    Ok(chunk) => chunk,
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            self.receipt = receipt_of(Some(&trailers));
                        }
                        return Poll::Ready(Some(Bytes::new()));
                    }
                };
                if let Some(hasher) = &mut self.hasher {
                    hasher.update(&chunk);
                }
                if self.first_chunk_at.is_none()
                    && (!self.out.first_token_is_an_event || sse::carries_output(&chunk))
                {
                    let ttft = self.out.started.elapsed();
                    self.first_chunk_at = Some(ttft);
                    if let Some(span) = &self.response_span {
                        span.event("first_token");
                    }
                    if let Some(series) = &self.out.series {
                        series.time_to_first_token.observe(ttft.as_secs_f64());
                    }
                }
                let forwarded = self.tap.feed(chunk);
                self.count(&forwarded);
                let forwarded = if self.tap.take_final_usage() {
                    self.with_cost(forwarded)
                } else {
                    forwarded
                };
                Poll::Ready(Some(forwarded))
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
        self.count(&rest);
        // Ended (cleanly or not): finished now, before the last bytes go out, so that the
        // request's metrics and bill are there by the time its client has read it all.
        self.end();
        match self.terminal.take().flatten() {
            None => (!rest.is_empty()).then_some(rest),
            Some(err) => {
                // The rig or engine went away mid-stream.
                self.state
                    .metrics()
                    .backend_error(&self.backend.id, "stream");
                tracing::warn!(backend = %self.backend.id, error = %err, "backend stream broke off");
                let mut out = rest.to_vec();
                out.extend_from_slice(&self.out.error_shape.stream_error(
                    "The backend stopped in the middle of the response; retry the request.",
                ));
                Some(Bytes::from(out))
            }
        }
    }
}

impl MeteredBody {
    /// The gateway's count of the completion so far, for a model whose tokens it counts.
    fn counted_completion(&self) -> Option<u64> {
        let text = self.generated.as_deref()?;
        let tokenizer = self.state.tokenizers().get(&self.out.model)?;
        Some(tokenizer.count(text))
    }

    /// `forwarded`, whose last usage report is the stream's last (all its output came
    /// before), with the request's cost written into it: the bill is worked out now, once.
    fn with_cost(&mut self, forwarded: Bytes) -> Bytes {
        let Some(price) = self.out.price else {
            return forwarded;
        };
        let accounted = account(
            &self.state,
            &self.out,
            &self.backend,
            self.tap.usage(),
            &self.output,
            self.counted_completion(),
        );
        let credits = accounted.cost(&self.out, &price);
        self.accounted = Some(Box::new(accounted));
        let Some(event) = sse::events(&forwarded)
            .filter(|range| sse::reports_usage(&forwarded[range.clone()]))
            .last()
        else {
            return forwarded;
        };
        let Some(changed) = super::cost::event_with_cost(&forwarded[event.clone()], credits) else {
            return forwarded;
        };
        let mut out = Vec::with_capacity(forwarded.len() + changed.len() - event.len());
        out.extend_from_slice(&forwarded[..event.start]);
        out.extend_from_slice(&changed);
        out.extend_from_slice(&forwarded[event.end..]);
        Bytes::from(out)
    }

    /// Counts output on its way to the client: the tap hands over whole events only.
    fn count(&mut self, forwarded: &[u8]) {
        if !forwarded.is_empty() {
            self.output
                .scan_into(forwarded, self.out.bounds.text, self.generated.as_mut());
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

impl MeteredBody {
    /// Ends the request ([`finish`]), once.
    fn end(&mut self) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        // A Responses stream whose output came all at once, with its end, or never.
        let ttft = match self.first_chunk_at {
            Some(ttft) => ttft,
            None if self.out.first_token_is_an_event => self.out.started.elapsed(),
            None => std::time::Duration::ZERO,
        };
        // Only an answer the rig ended cleanly is whole enough to check its receipt against.
        let answer = match (&self.terminal, self.hasher.take()) {
            (Some(None), Some(hasher)) => Some(answer_of(hasher, self.status, self.receipt.take())),
            _ => None,
        };
        if let Some(span) = self.response_span.take() {
            let end = match &self.terminal {
                Some(None) => "done",
                Some(Some(_)) => "broken",
                None => "client_gone",
            };
            span.set(KeyValue::new("garage.stream.end", end));
            span.set(KeyValue::new(
                "garage.time_to_first_token_ms",
                ttft.as_millis() as i64,
            ));
            if let Some(Some(err)) = &self.terminal {
                span.fail(format!("the backend's stream broke off: {err}"));
            }
            span.event("end_of_stream");
        }
        finish(
            &self.state,
            &self.out,
            Outcome::Answered {
                backend: &self.backend,
                status: StatusCode::OK,
                reported: self.tap.usage(),
                output: self.output,
                counted_completion: self.counted_completion(),
                ttft,
                answer,
                accounted: self.accounted.take(),
            },
        );
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        self.end();
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
