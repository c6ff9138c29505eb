//! The OpenAI-compatible API under `/v1`, and Anthropic's Messages API beside it.

use std::borrow::Cow;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::response::Response;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::ToSchema;

use crate::error::{AnthropicErrorBody, ApiError, ApiPath, ErrorBody, ErrorShape, from_rejection};
use crate::inference::forward::{Outcome, RequestCtx, finish, forward};
use crate::inference::policy::{self, RequestFacts};
use crate::ledger::billing::{RequestBounds, TextKind};
use crate::request_id::X_REQUEST_ID;
use crate::state::AppState;
use crate::store::ApiKeyRecord;
use crate::telemetry::KeyValue;

/// The inference endpoints; they differ in path, required input field, and how a stream
/// reports its usage.
#[derive(Clone, Copy)]
enum Endpoint {
    Chat,
    Completions,
    Embeddings,
    /// OpenAI's Responses API, as vLLM serves it (`/v1/responses`).
    Responses,
    /// vLLM's scoring APIs for reranker models: documents ranked against a query, and pairs
    /// of texts scored.
    Rerank,
    Score,
    /// Anthropic's Messages API, as vLLM serves it (`/v1/messages`), and its token count.
    Messages,
    CountTokens,
}

impl Endpoint {
    fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/chat/completions",
            Endpoint::Completions => "/completions",
            Endpoint::Embeddings => "/embeddings",
            Endpoint::Responses => "/responses",
            Endpoint::Rerank => "/rerank",
            Endpoint::Score => "/score",
            Endpoint::Messages => "/messages",
            Endpoint::CountTokens => "/messages/count_tokens",
        }
    }
    fn route(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat_completions",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Responses => "responses",
            Endpoint::Rerank => "rerank",
            Endpoint::Score => "score",
            Endpoint::Messages => "messages",
            Endpoint::CountTokens => "messages_count_tokens",
        }
    }
    fn input_field(self) -> &'static str {
        match self {
            Endpoint::Chat | Endpoint::Messages | Endpoint::CountTokens => "messages",
            Endpoint::Completions => "prompt",
            Endpoint::Embeddings | Endpoint::Responses => "input",
            Endpoint::Rerank => "query",
            Endpoint::Score => "text_1",
        }
    }
    /// Whether the endpoint answers `"stream": true` with events.
    fn streams(self) -> bool {
        matches!(
            self,
            Endpoint::Chat | Endpoint::Completions | Endpoint::Responses | Endpoint::Messages
        )
    }
    /// Which members of this endpoint's answers hold generated text.
    fn text_kind(self, stream: bool) -> TextKind {
        match self {
            Endpoint::Chat if stream => TextKind::ChatStream,
            Endpoint::Chat => TextKind::Chat,
            Endpoint::Completions => TextKind::Completions,
            Endpoint::Responses if stream => TextKind::ResponsesStream,
            Endpoint::Responses => TextKind::Responses,
            Endpoint::Messages => TextKind::Messages,
            Endpoint::Embeddings | Endpoint::Rerank | Endpoint::Score | Endpoint::CountTokens => {
                TextKind::None
            }
        }
    }
    /// Whether a stream reports its usage only when asked, with `stream_options.include_usage`
    /// (chat and completions). A Responses stream always does, in its last event.
    fn usage_on_request(self) -> bool {
        matches!(self, Endpoint::Chat | Endpoint::Completions)
    }
    /// Anthropic's routes answer errors in Anthropic's shape, and take its SDKs' `x-api-key`.
    fn is_anthropic(self) -> bool {
        matches!(self, Endpoint::Messages | Endpoint::CountTokens)
    }
    fn error_shape(self) -> ErrorShape {
        if self.is_anthropic() {
            ErrorShape::Anthropic
        } else {
            ErrorShape::OpenAi
        }
    }
    /// Whether the request is charged. Counting tokens generates nothing and Anthropic charges
    /// nothing for it: it is recorded in the ledger at zero tokens, and rate-limited at the
    /// tokens the rig counted (see docs/money.md).
    fn charged(self) -> bool {
        !matches!(self, Endpoint::CountTokens)
    }
}

/// One of the inference routes, answered without the router (see
/// `api::InferenceFirst`). Matched as the router matches them, the method and the path exactly
/// as registered, so a request gets the same answer either way.
#[derive(Clone, Copy)]
pub struct InferenceRoute(Endpoint);

impl InferenceRoute {
    /// The inference route `request` is for, if it is for one: `/v1` and the endpoint's path,
    /// the path the backend is sent to under its own `/v1` base.
    pub fn of(request: &Request) -> Option<Self> {
        if request.method() != http::Method::POST {
            return None;
        }
        let path = request.uri().path().strip_prefix("/v1")?;
        ENDPOINTS
            .into_iter()
            .find(|endpoint| endpoint.path() == path)
            .map(InferenceRoute)
    }

    /// Answers `request`, as the route's handler does.
    pub fn serve(
        self,
        state: &AppState,
        request: Request,
    ) -> impl Future<Output = Response> + Send + 'static {
        let state = state.clone();
        respond(state, self.0, request)
    }
}

/// The answer to a request on `endpoint`, or its error in the endpoint's shape. Anthropic's
/// routes also carry the request's id as Anthropic names it, `request-id`, which its SDKs show
/// in their errors (`x-request-id` is there too).
async fn respond(state: AppState, endpoint: Endpoint, request: Request) -> Response {
    let request_id = endpoint
        .is_anthropic()
        .then(|| request.headers().get(X_REQUEST_ID).cloned())
        .flatten();
    let mut response = match proxy(state, endpoint, request).await {
        Ok(response) => response,
        Err(error) => error.into_response_as(endpoint.error_shape()),
    };
    if let Some(id) = request_id {
        response.headers_mut().insert(ANTHROPIC_REQUEST_ID, id);
    }
    response
}

/// The header Anthropic's API names a request's id in.
const ANTHROPIC_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("request-id");

const ENDPOINTS: [Endpoint; 8] = [
    Endpoint::Chat,
    Endpoint::Completions,
    Endpoint::Embeddings,
    Endpoint::Responses,
    Endpoint::Rerank,
    Endpoint::Score,
    Endpoint::Messages,
    Endpoint::CountTokens,
];

/// The paths [`InferenceRoute`] answers (`POST`), for the test that the router has them too.
pub fn inference_paths() -> impl Iterator<Item = String> {
    ENDPOINTS
        .into_iter()
        .map(|endpoint| format!("/v1{}", endpoint.path()))
}

/// The few fields the gateway reads; everything else passes through unread.
#[derive(Deserialize)]
struct RequestHead<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
    /// Outer `Some` when the member is there at all (`null` included), however the client
    /// spelled its name (`"stream\u005foptions"` is the same member).
    #[serde(default, deserialize_with = "present")]
    stream_options: Option<Option<StreamOptionsHead>>,
    #[serde(borrow, default)]
    messages: Option<&'a RawValue>,
    #[serde(borrow, default)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow, default)]
    input: Option<&'a RawValue>,
    #[serde(borrow, default)]
    query: Option<&'a RawValue>,
    #[serde(borrow, default)]
    documents: Option<&'a RawValue>,
    #[serde(borrow, default)]
    text_1: Option<&'a RawValue>,
    #[serde(borrow, default)]
    text_2: Option<&'a RawValue>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    /// The Responses API's name for it.
    #[serde(default)]
    max_output_tokens: Option<u32>,
    /// Choices to generate for each prompt.
    #[serde(default)]
    n: Option<u32>,
}

/// A member that is there, as `Some` (its value may be `null`); a missing one is `None` through
/// `#[serde(default)]`.
fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

#[derive(Deserialize)]
struct StreamOptionsHead {
    #[serde(default)]
    include_usage: Option<bool>,
}

struct Admitted {
    model: String,
    /// Outputs the request asks for: `n` for each prompt (a completions request may send a
    /// list of prompts).
    choices: u32,
    stream: bool,
    client_wants_usage: bool,
    /// The body has a `stream_options` member (under any spelling of its name).
    has_stream_options: bool,
    facts: RequestFacts,
}

/// OpenAI's codes for a request missing a field, or with a field of the wrong type.
const MISSING: &str = "missing_required_parameter";
const INVALID_TYPE: &str = "invalid_type";

fn parse(endpoint: Endpoint, body: &[u8]) -> Result<Admitted, ApiError> {
    let head: RequestHead<'_> = serde_json::from_slice(body).map_err(|err| {
        ApiError::bad_request_code(
            format!(
                "We could not parse the JSON body of your request ({err}). The body must be a \
                 JSON object."
            ),
            None,
            "invalid_json",
        )
    })?;
    let model = match head.model {
        Some(model) if !model.is_empty() => model.into_owned(),
        _ => {
            return Err(ApiError::bad_request_code(
                "You must provide a model parameter.",
                Some("model"),
                MISSING,
            ));
        }
    };
    let field = endpoint.input_field();
    let input = match endpoint {
        Endpoint::Chat | Endpoint::Messages | Endpoint::CountTokens => head.messages,
        Endpoint::Completions => head.prompt,
        Endpoint::Embeddings | Endpoint::Responses => head.input,
        Endpoint::Rerank => head.query,
        Endpoint::Score => head.text_1,
    };
    // The second field a scoring request needs, and its value.
    let other = match endpoint {
        Endpoint::Rerank => Some(("documents", head.documents)),
        Endpoint::Score => Some(("text_2", head.text_2)),
        _ => None,
    };
    // A scoring request's bulk is in both fields (the documents, most of all), and an
    // Anthropic request's beside its messages (the system prompt, the tools, which the chat
    // template renders into the prompt): their prompt is estimated from the whole body.
    let facts = RequestFacts::new(
        match other {
            _ if endpoint.is_anthropic() => body,
            Some(_) => body,
            None => input.map_or(&b""[..], |raw| raw.get().as_bytes()),
        },
        head.max_completion_tokens
            .or(head.max_tokens)
            .or(head.max_output_tokens),
    );
    match input.map(|raw| raw.get().trim_start().as_bytes().first().copied()) {
        None | Some(Some(b'n')) => {
            return Err(ApiError::bad_request_code(
                format!("Missing required parameter: '{field}'."),
                Some(field),
                MISSING,
            ));
        }
        Some(first)
            if matches!(
                endpoint,
                Endpoint::Chat | Endpoint::Messages | Endpoint::CountTokens
            ) && first != Some(b'[') =>
        {
            return Err(ApiError::bad_request_code(
                "Invalid type for 'messages': expected an array of messages.",
                Some("messages"),
                INVALID_TYPE,
            ));
        }
        Some(first)
            if matches!(endpoint, Endpoint::Responses) && !matches!(first, Some(b'"' | b'[')) =>
        {
            return Err(ApiError::bad_request_code(
                "Invalid type for 'input': expected a string or an array of input items.",
                Some("input"),
                INVALID_TYPE,
            ));
        }
        _ => {}
    }
    if let Some((field, value)) = other
        && value.is_none_or(|raw| raw.get().trim_start().starts_with('n'))
    {
        return Err(ApiError::bad_request_code(
            format!("Missing required parameter: '{field}'."),
            Some(field),
            MISSING,
        ));
    }
    // Anthropic's API requires `max_tokens` of a Messages request, and at least 1.
    if matches!(endpoint, Endpoint::Messages) {
        match head.max_tokens {
            None => {
                return Err(ApiError::bad_request_code(
                    "Missing required parameter: 'max_tokens'.",
                    Some("max_tokens"),
                    MISSING,
                ));
            }
            Some(0) => {
                return Err(ApiError::bad_request_code(
                    "Invalid 'max_tokens': it must be at least 1.",
                    Some("max_tokens"),
                    "invalid_value",
                ));
            }
            Some(_) => {}
        }
    }
    let stream = endpoint.streams() && head.stream.unwrap_or(false);
    let prompts = match endpoint {
        Endpoint::Completions => input.map_or(1, prompt_count),
        _ => 1,
    };
    let choices = head.n.unwrap_or(1).max(1).saturating_mul(prompts);
    let has_stream_options = head.stream_options.is_some();
    let client_wants_usage = head
        .stream_options
        .flatten()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    Ok(Admitted {
        model,
        choices,
        stream,
        client_wants_usage,
        has_stream_options,
        facts,
    })
}

/// Prompts in a completions request's `prompt`: a string or a list of token ids is one; a list
/// of strings or of token lists is one per item.
fn prompt_count(prompt: &RawValue) -> u32 {
    let text = prompt.get().trim_start();
    if !text.starts_with('[') {
        return 1;
    }
    match serde_json::from_str::<Vec<&RawValue>>(text) {
        Ok(items)
            if items.first().is_some_and(|first| {
                matches!(
                    first.get().trim_start().as_bytes().first(),
                    Some(b'"' | b'[')
                )
            }) =>
        {
            u32::try_from(items.len()).unwrap_or(u32::MAX).max(1)
        }
        _ => 1,
    }
}

/// The body with `stream_options.include_usage` set, so the backend reports usage on a stream.
/// Key order and every other field are kept, and the result has one `stream_options` member
/// however the client wrote its name: `has_stream_options` comes from the parse, which reads
/// `"stream\u005foptions"` as the name it is.
fn with_include_usage(body: &[u8], has_stream_options: bool) -> Result<Bytes, ApiError> {
    // Usually the client sent no `stream_options` at all: the member goes in before the
    // closing brace, and the client's bytes stay as they were (no parse and re-serialization).
    // The body parsed as an object with a model, so it is not empty.
    if !has_stream_options
        && let Some(end) = body.iter().rposition(|b| !b.is_ascii_whitespace())
        && body[end] == b'}'
    {
        const MEMBER: &[u8] = br#","stream_options":{"include_usage":true}"#;
        let mut out = Vec::with_capacity(body.len() + MEMBER.len());
        out.extend_from_slice(&body[..end]);
        out.extend_from_slice(MEMBER);
        out.extend_from_slice(&body[end..]);
        return Ok(Bytes::from(out));
    }
    let mut map: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("Invalid JSON body: {e}"), None))?;
    let options = map
        .entry("stream_options")
        .or_insert_with(|| serde_json::Value::Object(Default::default()));
    if !options.is_object() {
        *options = serde_json::Value::Object(Default::default());
    }
    if let Some(options) = options.as_object_mut() {
        options.insert("include_usage".into(), serde_json::Value::Bool(true));
    }
    serde_json::to_vec(&map)
        .map(Bytes::from)
        .map_err(|e| ApiError::Internal(e.to_string()))
}

fn check_model_allowed(key: &ApiKeyRecord, model: &str) -> Result<(), ApiError> {
    match &key.allowed_models {
        Some(allowed) if !allowed.iter().any(|m| m == model) => Err(ApiError::Forbidden {
            message: format!("This API key may not use the model `{model}`."),
            code: "model_not_allowed",
        }),
        _ => Ok(()),
    }
}

/// Takes the whole request rather than `HeaderMap` and `Bytes` extractors: the `HeaderMap`
/// extractor clones every header, and the body is read only once the key is known good.
async fn proxy(
    state: AppState,
    endpoint: Endpoint,
    mut request: Request,
) -> Result<Response, ApiError> {
    // Set by `RequestIdLayer` on every request.
    let request_id = request.headers().get(X_REQUEST_ID).cloned();
    let mut ctx = RequestCtx::new(endpoint.route(), endpoint.path(), request_id);
    ctx.trace = state.telemetry().request(
        request.headers(),
        endpoint.route(),
        endpoint.path(),
        ctx.request_id.as_ref(),
    );
    let mut unforwarded = Unforwarded {
        state: &state,
        ctx: Some(ctx),
        status: None,
    };
    let headers = std::mem::take(request.headers_mut());
    let result = admit_and_forward(&state, endpoint, &headers, request, &mut unforwarded.ctx).await;
    if let Err(err) = &result {
        unforwarded.status = Some(err.status());
    }
    result
}

/// A request's context until it is forwarded. Dropped still holding it, the request ended
/// before any backend had it: refused (a bad key or body, a limit, no healthy backend, the
/// store down), with the status it was sent, or abandoned by its client (499) while it waited
/// for its body or a policy. Once forwarded, `forward` ends it.
struct Unforwarded<'a> {
    state: &'a AppState,
    ctx: Option<RequestCtx>,
    status: Option<http::StatusCode>,
}

impl Drop for Unforwarded<'_> {
    fn drop(&mut self) {
        if let Some(ctx) = self.ctx.take() {
            let status = self.status.unwrap_or_else(|| {
                http::StatusCode::from_u16(499).unwrap_or(http::StatusCode::BAD_REQUEST)
            });
            finish(self.state, &ctx, Outcome::Failed(status));
        }
    }
}

/// The phases up to the backend: admit (the key, the body, the model, the limits), route (the
/// router's order over the healthy candidates), then forward, which takes the request's
/// context from `slot` and ends it however it ends.
async fn admit_and_forward(
    state: &AppState,
    endpoint: Endpoint,
    headers: &http::HeaderMap,
    request: Request,
    slot: &mut Option<RequestCtx>,
) -> Result<Response, ApiError> {
    let Some(ctx) = slot.as_mut() else {
        return Err(ApiError::Internal("request context taken twice".into()));
    };
    // ---- admit
    ctx.error_shape = endpoint.error_shape();
    ctx.charged = endpoint.charged();
    let trace = ctx.trace.as_deref();
    let admission = trace.and_then(|trace| trace.phase("admission"));
    let auth = admission.as_ref().map(|span| span.child("auth"));
    let key = if endpoint.is_anthropic() {
        state.auth().authenticate_anthropic(headers).await?
    } else {
        state.auth().authenticate(headers).await?
    };
    drop(auth);
    ctx.key = Some(Arc::clone(&key));
    let body = read_body(request.into_body(), state.config().max_body_bytes).await?;
    let admitted = parse(endpoint, &body)?;
    check_model_allowed(&key, &admitted.model)?;
    let candidates = policy::trusted_enough(
        &key,
        &admitted.model,
        state.backends().snapshot().candidates(&admitted.model)?,
    )?;
    // A model some backend serves: its requests are counted by name from here on.
    ctx.series = Some(
        state
            .metrics()
            .route_series(endpoint.route(), &admitted.model),
    );
    ctx.model = admitted.model.clone();
    ctx.stream = admitted.stream;
    ctx.first_token_is_an_event = matches!(endpoint, Endpoint::Responses | Endpoint::Messages);
    ctx.bounds = RequestBounds {
        request_bytes: body.len() as u64,
        prompt_estimate: u64::from(admitted.facts.prompt_tokens),
        max_tokens: (admitted.facts.max_tokens > 0).then_some(admitted.facts.max_tokens),
        choices: admitted.choices,
        text: endpoint.text_kind(admitted.stream),
    };
    if let Some(trace) = trace {
        trace.set(KeyValue::new(
            "gen_ai.request.model",
            admitted.model.clone(),
        ));
        trace.set(KeyValue::new("garage.stream", admitted.stream));
        trace.set(KeyValue::new("garage.key_id", key.id.clone()));
    }
    let limiter = admission.as_ref().map(|span| span.child("limiter"));
    let policy::Admitted {
        headers: rate_limit_headers,
        reservation,
        price,
        hold,
    } = policy::admit(
        state.policy(),
        state.store().as_ref(),
        state.plugins(),
        &key,
        &admitted.model,
        ctx.request_id(),
        &admitted.facts,
        &candidates,
        state.accounts(),
        crate::accounts::HoldFor::of(&key, &ctx.bounds, &body),
    )
    .await?;
    drop(limiter);
    drop(admission);
    ctx.hold = hold;
    ctx.reserved_tokens = admitted.facts.reserved_tokens();
    ctx.reservation = reservation;
    ctx.price = price;
    // ---- route
    let route = trace.and_then(|trace| trace.phase("route"));
    let candidates = policy::order(
        state.plugins(),
        &key.id,
        &admitted.model,
        admitted.stream,
        &admitted.facts,
        candidates,
    )
    .await;
    if let Some(route) = &route {
        route.set(KeyValue::new("garage.candidates", candidates.len() as i64));
    }
    drop(route);
    ctx.hide_usage_chunk =
        admitted.stream && endpoint.usage_on_request() && !admitted.client_wants_usage;
    ctx.body = if ctx.hide_usage_chunk {
        with_include_usage(&body, admitted.has_stream_options)?
    } else {
        body
    };
    // ---- forward, respond, finish
    let Some(ctx) = slot.take() else {
        return Err(ApiError::Internal("request context taken twice".into()));
    };
    let mut response = forward(state, &candidates, ctx).await?;
    let map = response.headers_mut();
    for (name, value) in rate_limit_headers {
        map.insert(name, value);
    }
    // The price it is charged, on every answer that was quoted one.
    if let Some(price) = price
        && let Ok(value) = http::HeaderValue::from_str(&super::cost::price_header(&price))
    {
        map.insert(super::cost::PRICE_HEADER, value);
    }
    Ok(response)
}

/// The whole request body, at most `limit` bytes (more is a 413). These routes are answered
/// before the router and its `DefaultBodyLimit` layer (see `api::InferenceFirst`), so the limit
/// is applied here. A body that came in one piece, as nearly all do, is that piece: no list of
/// pieces to gather it in.
async fn read_body(body: axum::body::Body, limit: usize) -> Result<Bytes, ApiError> {
    use http_body::Body as _;
    use http_body_util::BodyExt;
    let too_large = || from_rejection(axum::http::StatusCode::PAYLOAD_TOO_LARGE, String::new());
    let broken = |err: axum::BoxError| {
        if err.is::<http_body_util::LengthLimitError>() {
            too_large()
        } else {
            ApiError::bad_request(format!("Failed to read the request body: {err}"), None)
        }
    };
    // A declared length over the limit is refused before anything is read.
    if body.size_hint().lower() > limit as u64 {
        return Err(too_large());
    }
    let mut body = http_body_util::Limited::new(body, limit);
    let first = loop {
        let Some(frame) = body.frame().await else {
            return Ok(Bytes::new());
        };
        match frame.map_err(broken)?.into_data() {
            Ok(data) if data.is_empty() => {}
            Ok(data) => break data,
            // Trailers carry no body bytes; they end it.
            Err(_) => return Ok(Bytes::new()),
        }
    };
    if body.is_end_stream() {
        return Ok(first);
    }
    let rest = body.collect().await.map_err(broken)?.to_bytes();
    let mut whole = Vec::with_capacity(first.len() + rest.len());
    whole.extend_from_slice(&first);
    whole.extend_from_slice(&rest);
    Ok(Bytes::from(whole))
}

/// Creates a model response for the given chat conversation; with `"stream": true` the answer
/// arrives as server-sent events.
#[utoipa::path(
    post, path = "/v1/chat/completions", tag = "openai",
    request_body = ChatCompletionRequest,
    responses(
        (status = 200, description = "A chat completion (or an event stream of chunks)", body = serde_json::Value),
        (status = 400, description = "Malformed request", body = ErrorBody),
        (status = 401, description = "Missing or unknown API key", body = ErrorBody),
        (status = 403, description = "Revoked key, a model the key may not use, or the key's account closed (`account_closed`) or missing (`account_not_found`)", body = ErrorBody),
        (status = 429, description = "Rate limited (`rate_limit_exceeded`), or out of credits or budget (`insufficient_quota`, with `retry-after` when a period resets)", body = ErrorBody),
        (status = 404, description = "Unknown model", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 502, description = "Backends failed", body = ErrorBody),
        (status = 503, description = "No healthy backend or the store is down (`no_backend_available`), or the rate limiter faulted and fails closed (`policy_unavailable`, with `retry-after`)", body = ErrorBody),
        (status = 504, description = "Backend timed out", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn chat_completions(
    State(state): State<AppState>,
    request: Request,
) -> Result<Response, ApiError> {
    proxy(state, Endpoint::Chat, request).await
}

/// Creates a completion for the given prompt (legacy completions API).
#[utoipa::path(
    post, path = "/v1/completions", tag = "openai",
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "A completion (or an event stream of chunks)", body = serde_json::Value),
        (status = 400, description = "Malformed request", body = ErrorBody),
        (status = 401, description = "Missing or unknown API key", body = ErrorBody),
        (status = 403, description = "Revoked key, a model the key may not use, or the key's account closed (`account_closed`) or missing (`account_not_found`)", body = ErrorBody),
        (status = 429, description = "Rate limited (`rate_limit_exceeded`), or out of credits or budget (`insufficient_quota`, with `retry-after` when a period resets)", body = ErrorBody),
        (status = 404, description = "Unknown model", body = ErrorBody),
        (status = 502, description = "Backends failed", body = ErrorBody),
        (status = 503, description = "No healthy backend or the store is down (`no_backend_available`), or the rate limiter faulted and fails closed (`policy_unavailable`, with `retry-after`)", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn completions(
    State(state): State<AppState>,
    request: Request,
) -> Result<Response, ApiError> {
    proxy(state, Endpoint::Completions, request).await
}

/// Creates embedding vectors for the input.
#[utoipa::path(
    post, path = "/v1/embeddings", tag = "openai",
    request_body = EmbeddingRequest,
    responses(
        (status = 200, description = "Embeddings", body = serde_json::Value),
        (status = 400, description = "Malformed request", body = ErrorBody),
        (status = 401, description = "Missing or unknown API key", body = ErrorBody),
        (status = 403, description = "Revoked key, a model the key may not use, or the key's account closed (`account_closed`) or missing (`account_not_found`)", body = ErrorBody),
        (status = 429, description = "Rate limited (`rate_limit_exceeded`), or out of credits or budget (`insufficient_quota`, with `retry-after` when a period resets)", body = ErrorBody),
        (status = 404, description = "Unknown model", body = ErrorBody),
        (status = 502, description = "Backends failed", body = ErrorBody),
        (status = 503, description = "No healthy backend or the store is down (`no_backend_available`), or the rate limiter faulted and fails closed (`policy_unavailable`, with `retry-after`)", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn embeddings(
    State(state): State<AppState>,
    request: Request,
) -> Result<Response, ApiError> {
    proxy(state, Endpoint::Embeddings, request).await
}

/// Creates a model response (OpenAI's Responses API, as vLLM serves it): `input` is a string or
/// a list of input items. With `"stream": true` the answer arrives as typed server-sent events
/// (`event: response.output_text.delta`...), the usage in the last one, `response.completed`.
/// The gateway keeps no responses: `previous_response_id` and `GET /v1/responses/{id}` need the
/// backend that made the response, which round robin does not promise.
#[utoipa::path(
    post, path = "/v1/responses", tag = "openai",
    request_body = ResponsesRequest,
    responses(
        (status = 200, description = "A response (or an event stream of typed events)", body = serde_json::Value),
        (status = 400, description = "Malformed request", body = ErrorBody),
        (status = 401, description = "Missing or unknown API key", body = ErrorBody),
        (status = 403, description = "Revoked key, a model the key may not use, or the key's account closed (`account_closed`) or missing (`account_not_found`)", body = ErrorBody),
        (status = 429, description = "Rate limited (`rate_limit_exceeded`), or out of credits or budget (`insufficient_quota`, with `retry-after` when a period resets)", body = ErrorBody),
        (status = 404, description = "Unknown model", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 502, description = "Backends failed", body = ErrorBody),
        (status = 503, description = "No healthy backend or the store is down (`no_backend_available`), or the rate limiter faulted and fails closed (`policy_unavailable`, with `retry-after`)", body = ErrorBody),
        (status = 504, description = "Backend timed out", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn responses(
    State(state): State<AppState>,
    request: Request,
) -> Result<Response, ApiError> {
    proxy(state, Endpoint::Responses, request).await
}

/// Creates a message (Anthropic's Messages API, as vLLM serves it), for Anthropic's SDKs and
/// the coding agents built on them: `max_tokens` is required; `system`, `stop_sequences`,
/// `temperature`, `tools` and the rest pass to the rig as they are. With `"stream": true` the
/// answer arrives as Anthropic's typed events (`message_start`, `content_block_delta`...,
/// `message_delta` with the usage, `message_stop`); a stream that fails midway ends with an
/// `error` event. The key may come as `x-api-key` (what the SDKs send) or as a bearer token;
/// errors are in Anthropic's shape, with the gateway's statuses (an overload is 503,
/// `overloaded_error`). Metered like chat, under the route label `messages`.
#[utoipa::path(
    post, path = "/v1/messages", tag = "anthropic",
    request_body = MessagesRequest,
    responses(
        (status = 200, description = "A message (or an event stream of Anthropic's typed events)", body = serde_json::Value),
        AnthropicErrors,
    ),
    security(("api_key" = []), ("x_api_key" = []))
)]
pub async fn messages(State(state): State<AppState>, request: Request) -> Response {
    respond(state, Endpoint::Messages, request).await
}

/// The errors of Anthropic's routes, for the OpenAPI document (`responses(AnthropicErrors)`):
/// the gateway's statuses, each with Anthropic's error type.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code, reason = "describes responses for the OpenAPI document")]
pub enum AnthropicErrors {
    #[response(
        status = 400,
        description = "Malformed request (`invalid_request_error`)"
    )]
    BadRequest(AnthropicErrorBody),
    #[response(
        status = 401,
        description = "Missing or unknown API key (`authentication_error`)"
    )]
    Unauthorized(AnthropicErrorBody),
    #[response(
        status = 403,
        description = "Revoked key, or a model the key may not use (`permission_error`)"
    )]
    Forbidden(AnthropicErrorBody),
    #[response(status = 404, description = "Unknown model (`not_found_error`)")]
    NotFound(AnthropicErrorBody),
    #[response(status = 413, description = "Body too large (`request_too_large`)")]
    TooLarge(AnthropicErrorBody),
    #[response(
        status = 429,
        description = "Rate limited (`rate_limit_error`) or budget spent (`billing_error`); \
                       `retry-after` when it is known"
    )]
    TooMany(AnthropicErrorBody),
    #[response(status = 500, description = "The gateway failed (`api_error`)")]
    Internal(AnthropicErrorBody),
    #[response(status = 502, description = "Backends failed (`api_error`)")]
    BadGateway(AnthropicErrorBody),
    #[response(
        status = 503,
        description = "No healthy backend, the store is down, or the rate limiter faulted and fails closed (`overloaded_error`, with `retry-after` for the limiter)"
    )]
    Unavailable(AnthropicErrorBody),
    #[response(status = 504, description = "Backend timed out (`timeout_error`)")]
    Timeout(AnthropicErrorBody),
}

/// Counts the input tokens of a Messages request, as the rig that serves the model renders
/// it (Anthropic's `messages.count_tokens`). Authenticated and rate-limited as the other
/// routes, recorded in the ledger, and not charged: it generates nothing.
#[utoipa::path(
    post, path = "/v1/messages/count_tokens", tag = "anthropic",
    request_body = CountTokensRequest,
    responses(
        (status = 200, description = "`{\"input_tokens\": N}`", body = serde_json::Value),
        AnthropicErrors,
    ),
    security(("api_key" = []), ("x_api_key" = []))
)]
pub async fn count_tokens(State(state): State<AppState>, request: Request) -> Response {
    respond(state, Endpoint::CountTokens, request).await
}

/// Ranks documents by relevance to a query, with a reranker (cross-encoder) model: vLLM's
/// rerank API, in Jina's and Cohere's shape. Not part of OpenAI's API.
#[utoipa::path(
    post, path = "/v1/rerank", tag = "openai",
    request_body = RerankRequest,
    responses(
        (status = 200, description = "The documents, best first", body = serde_json::Value),
        (status = 400, description = "Malformed request", body = ErrorBody),
        (status = 401, description = "Missing or unknown API key", body = ErrorBody),
        (status = 403, description = "Revoked key, a model the key may not use, or the key's account closed (`account_closed`) or missing (`account_not_found`)", body = ErrorBody),
        (status = 429, description = "Rate limited (`rate_limit_exceeded`), or out of credits or budget (`insufficient_quota`, with `retry-after` when a period resets)", body = ErrorBody),
        (status = 404, description = "Unknown model", body = ErrorBody),
        (status = 502, description = "Backends failed", body = ErrorBody),
        (status = 503, description = "No healthy backend or the store is down (`no_backend_available`), or the rate limiter faulted and fails closed (`policy_unavailable`, with `retry-after`)", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn rerank(State(state): State<AppState>, request: Request) -> Result<Response, ApiError> {
    proxy(state, Endpoint::Rerank, request).await
}

/// Scores pairs of texts with a reranker or cross-encoder model: `text_1` against each of
/// `text_2`, or pair by pair (vLLM's score API). Not part of OpenAI's API.
#[utoipa::path(
    post, path = "/v1/score", tag = "openai",
    request_body = ScoreRequest,
    responses(
        (status = 200, description = "A score per pair", body = serde_json::Value),
        (status = 400, description = "Malformed request", body = ErrorBody),
        (status = 401, description = "Missing or unknown API key", body = ErrorBody),
        (status = 403, description = "Revoked key, a model the key may not use, or the key's account closed (`account_closed`) or missing (`account_not_found`)", body = ErrorBody),
        (status = 429, description = "Rate limited (`rate_limit_exceeded`), or out of credits or budget (`insufficient_quota`, with `retry-after` when a period resets)", body = ErrorBody),
        (status = 404, description = "Unknown model", body = ErrorBody),
        (status = 502, description = "Backends failed", body = ErrorBody),
        (status = 503, description = "No healthy backend or the store is down (`no_backend_available`), or the rate limiter faulted and fails closed (`policy_unavailable`, with `retry-after`)", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn score(State(state): State<AppState>, request: Request) -> Result<Response, ApiError> {
    proxy(state, Endpoint::Score, request).await
}

/// A model, as OpenAI lists it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Model {
    pub id: String,
    /// Always `model`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    pub owned_by: String,
    /// What the model's tokens cost now, as the meter quotes them (absent when it quotes
    /// nothing). A request is charged the price quoted when it is admitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pricing: Option<ModelPricing>,
}

/// A model's prices in credits per token, as decimal strings (as OpenRouter's model list
/// writes them), and per 1,000 tokens as numbers.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ModelPricing {
    /// Credits per prompt token.
    pub prompt: String,
    /// Credits per completion token.
    pub completion: String,
    /// Credits per 1,000 prompt and completion tokens.
    pub per_thousand: crate::plugins::Price,
    /// The price of a line of the Batch API, when the meter quotes one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<crate::plugins::Price>,
}

impl ModelPricing {
    fn new(price: crate::plugins::Price, batch: Option<crate::plugins::Price>) -> Self {
        ModelPricing {
            prompt: per_token(price.prompt_per_1k),
            completion: per_token(price.completion_per_1k),
            per_thousand: price,
            batch,
        }
    }
}

/// A price per 1,000 tokens as a decimal string per token, without float noise (`0.000002`,
/// not `2.0000000000000003e-6`).
fn per_token(per_thousand: f64) -> String {
    let text = format!("{:.12}", per_thousand / 1000.0);
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text.is_empty() {
        "0".to_owned()
    } else {
        text.to_owned()
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ModelList {
    /// Always `list`.
    pub object: String,
    pub data: Vec<Model>,
}

/// Request id the model list's quotes are asked under (a canary meter is picked by it).
const MODEL_LIST_QUOTE: &str = "model-list";

/// What `model`'s tokens cost now (for a Batch API line with `batch`), as the meter quotes
/// them, without counting a request in its demand: for the model list and the console.
pub async fn current_price(
    state: &AppState,
    model: &str,
    batch: bool,
) -> Option<crate::plugins::Price> {
    let plugins = state.plugins();
    if !plugins.is_active(crate::plugins::Slot::Meter) {
        return None;
    }
    let candidates = state
        .backends()
        .snapshot()
        .candidates(model)
        .unwrap_or_default();
    let demand = state.policy().current_demand(model);
    policy::quote(plugins, MODEL_LIST_QUOTE, model, batch, &candidates, demand).await
}

async fn model(state: &AppState, id: &str) -> Model {
    let mut pricing = None;
    if let Some(price) = current_price(state, id, false).await {
        pricing = Some(ModelPricing::new(
            price,
            current_price(state, id, true).await,
        ));
    }
    Model {
        id: id.to_owned(),
        object: "model".into(),
        created: state.started_at(),
        owned_by: "garage".into(),
        pricing,
    }
}

/// Lists the models that healthy backends serve right now (and this key may use).
#[utoipa::path(
    get, path = "/v1/models", tag = "openai",
    responses(
        (status = 200, body = ModelList),
        (status = 401, description = "Missing or unknown API key", body = ErrorBody),
        (status = 403, description = "Revoked key", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn list_models(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<ModelList>, ApiError> {
    let key = state.auth().authenticate(&headers).await?;
    let backends = state.backends().snapshot();
    let mut data = Vec::new();
    for id in backends
        .healthy_models()
        .into_iter()
        .filter(|m| check_model_allowed(&key, m).is_ok())
    {
        data.push(model(&state, id).await);
    }
    Ok(Json(ModelList {
        object: "list".into(),
        data,
    }))
}

/// One model, if a healthy backend serves it.
#[utoipa::path(
    get, path = "/v1/models/{model}", tag = "openai",
    params(("model" = String, Path, description = "Model name; a slash in it (`org/name`) may be sent encoded, `%2F`, or as is")),
    responses(
        (status = 200, body = Model),
        (status = 401, description = "Missing or unknown API key", body = ErrorBody),
        (status = 403, description = "Revoked key", body = ErrorBody),
        (status = 404, description = "Not served", body = ErrorBody),
        (status = 400, description = "Malformed path or query", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn get_model(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Model>, ApiError> {
    let key = state.auth().authenticate(&headers).await?;
    let served = state
        .backends()
        .snapshot()
        .healthy_models()
        .contains(id.as_str());
    if !served || check_model_allowed(&key, &id).is_err() {
        return Err(ApiError::ModelNotFound(id));
    }
    Ok(Json(model(&state, &id).await))
}

// Request schemas for the spec. The gateway forwards bodies without deserializing them into
// these, so any field OpenAI or a backend adds passes through.

/// A chat completion request (the fields the gateway documents; any other passes through).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ChatCompletionRequest {
    /// Model name, as listed by `GET /v1/models`.
    model: String,
    /// The conversation so far.
    messages: Vec<ChatMessage>,
    /// Stream the answer as server-sent events.
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    /// Tools, response_format, logprobs, vendor extensions...: passed to the backend as is.
    #[schema(additional_properties)]
    extra: Option<serde_json::Value>,
}

/// One chat message.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    role: String,
    /// Text, or an array of content parts.
    content: serde_json::Value,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct StreamOptions {
    /// Send a last chunk with the token usage of the whole request.
    include_usage: Option<bool>,
}

/// A completion request.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct CompletionRequest {
    model: String,
    /// A string, an array of strings, or token arrays.
    prompt: serde_json::Value,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u32>,
    temperature: Option<f32>,
}

/// An embeddings request.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct EmbeddingRequest {
    model: String,
    /// A string, an array of strings, or token arrays.
    input: serde_json::Value,
    /// `float` or `base64`.
    encoding_format: Option<String>,
}

/// A Responses API request.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ResponsesRequest {
    model: String,
    /// A string, or an array of input items (messages such as
    /// `{"role": "user", "content": "..."}`).
    input: serde_json::Value,
    /// A system message put first.
    instructions: Option<String>,
    /// Stream the answer as typed server-sent events.
    stream: Option<bool>,
    max_output_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    /// Tools, text.format, reasoning, vendor extensions...: passed to the backend as is.
    #[schema(additional_properties)]
    extra: Option<serde_json::Value>,
}

/// An Anthropic Messages request (the fields the gateway documents; any other passes through).
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct MessagesRequest {
    /// Model name, as listed by `GET /v1/models`.
    model: String,
    /// The conversation: `{"role": "user" | "assistant", "content": text or content blocks}`.
    messages: Vec<ChatMessage>,
    /// The most tokens to generate; required.
    max_tokens: u32,
    /// A string, or text blocks.
    system: Option<serde_json::Value>,
    /// Strings that end the answer where they would appear.
    stop_sequences: Option<Vec<String>>,
    /// Stream the answer as Anthropic's typed server-sent events.
    stream: Option<bool>,
    temperature: Option<f32>,
    /// Tools, tool_choice, top_p, top_k, metadata, thinking...: passed to the backend as is.
    #[schema(additional_properties)]
    extra: Option<serde_json::Value>,
}

/// A request to count a Messages request's input tokens.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct CountTokensRequest {
    model: String,
    messages: Vec<ChatMessage>,
    system: Option<serde_json::Value>,
    #[schema(additional_properties)]
    extra: Option<serde_json::Value>,
}

/// A rerank request.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct RerankRequest {
    model: String,
    query: String,
    /// Strings, or objects with a `text`.
    documents: Vec<serde_json::Value>,
    /// How many of the best to return; 0 or absent for all.
    top_n: Option<u32>,
    #[schema(additional_properties)]
    extra: Option<serde_json::Value>,
}

/// A score request.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ScoreRequest {
    model: String,
    /// A string, or a list as long as `text_2`.
    text_1: serde_json::Value,
    /// A string or a list of strings.
    text_2: serde_json::Value,
    #[schema(additional_properties)]
    extra: Option<serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 400 says what went wrong for programs too, as OpenAI's does (it was always null).
    #[test]
    fn refusals_carry_openai_codes() {
        let code = |e: Endpoint, b: &str| {
            parse(e, b.as_bytes())
                .err()
                .map(|e| e.body().error.code.unwrap_or_default())
        };
        assert_eq!(
            code(Endpoint::Chat, r#"{"model":"m"}"#).as_deref(),
            Some(MISSING)
        );
        assert_eq!(
            code(Endpoint::Chat, r#"{"messages":[]}"#).as_deref(),
            Some(MISSING)
        );
        assert_eq!(
            code(Endpoint::Chat, r#"{"model":"m","messages":"hi"}"#).as_deref(),
            Some(INVALID_TYPE)
        );
        assert_eq!(code(Endpoint::Chat, "{").as_deref(), Some("invalid_json"));
    }

    #[test]
    fn parse_rejects_what_openai_rejects() {
        let err = |e: Endpoint, b: &str| parse(e, b.as_bytes()).err().map(|e| e.to_string());
        assert!(err(Endpoint::Chat, "{").unwrap().contains("parse the JSON"));
        assert!(
            err(Endpoint::Chat, "[1]")
                .unwrap()
                .contains("parse the JSON")
        );
        assert!(
            err(Endpoint::Chat, r#"{"messages":[]}"#)
                .unwrap()
                .contains("model")
        );
        assert!(
            err(Endpoint::Chat, r#"{"model":"m"}"#)
                .unwrap()
                .contains("messages")
        );
        assert!(
            err(Endpoint::Chat, r#"{"model":"m","messages":"hi"}"#)
                .unwrap()
                .contains("array")
        );
        assert!(
            err(Endpoint::Completions, r#"{"model":"m","prompt":null}"#)
                .unwrap()
                .contains("prompt")
        );
        assert!(err(Endpoint::Embeddings, r#"{"model":"m","input":"x"}"#).is_none());
        assert!(err(Endpoint::Responses, r#"{"model":"m","input":"x"}"#).is_none());
        assert!(err(Endpoint::Responses, r#"{"model":"m","input":[]}"#).is_none());
        assert!(
            err(Endpoint::Responses, r#"{"model":"m","input":{}}"#)
                .unwrap()
                .contains("input")
        );
        let responses = parse(
            Endpoint::Responses,
            br#"{"model":"m","input":"hi","stream":true,"max_output_tokens":7}"#,
        )
        .unwrap();
        assert!(responses.stream);
        assert_eq!(responses.facts.reserved_tokens(), 1 + 7);
        assert!(
            err(
                Endpoint::Rerank,
                r#"{"model":"m","query":"q","documents":["d"]}"#
            )
            .is_none()
        );
        assert!(
            err(Endpoint::Rerank, r#"{"model":"m","query":"q"}"#)
                .unwrap()
                .contains("documents")
        );
        assert!(
            err(Endpoint::Rerank, r#"{"model":"m","documents":["d"]}"#)
                .unwrap()
                .contains("query")
        );
        assert!(
            err(
                Endpoint::Score,
                r#"{"model":"m","text_1":"a","text_2":null}"#
            )
            .unwrap()
            .contains("text_2")
        );
        let scored = parse(
            Endpoint::Score,
            br#"{"model":"m","text_1":"a","text_2":"b","stream":true}"#,
        )
        .unwrap();
        assert!(!scored.stream, "scoring answers are never streamed");
        let ok = parse(Endpoint::Chat, br#"{"model":"m\u0031","messages":[],"stream":true,"stream_options":{"include_usage":true}}"#).unwrap();
        assert_eq!(ok.model, "m1");
        assert!(ok.stream && ok.client_wants_usage);
    }

    /// Anthropic's Messages need a model, an array of messages and a positive `max_tokens`;
    /// counting tokens needs no `max_tokens`. Their prompt is estimated from the whole body (the
    /// system prompt and tools are prompt too).
    #[test]
    fn messages_are_checked_as_anthropic_checks_them() {
        let code = |e: Endpoint, b: &str| {
            parse(e, b.as_bytes())
                .err()
                .map(|e| (e.body().error.param, e.body().error.code))
        };
        let missing = |param: &str| Some((Some(param.to_owned()), Some(MISSING.to_owned())));
        let user = r#"[{"role":"user","content":"hi"}]"#;
        assert_eq!(
            code(
                Endpoint::Messages,
                &format!(r#"{{"model":"m","messages":{user}}}"#)
            ),
            missing("max_tokens")
        );
        assert_eq!(
            code(Endpoint::Messages, r#"{"model":"m","max_tokens":5}"#),
            missing("messages")
        );
        assert_eq!(
            code(
                Endpoint::Messages,
                &format!(r#"{{"max_tokens":5,"messages":{user}}}"#)
            ),
            missing("model")
        );
        assert_eq!(
            code(
                Endpoint::Messages,
                &format!(r#"{{"model":"m","max_tokens":0,"messages":{user}}}"#)
            ),
            Some((Some("max_tokens".into()), Some("invalid_value".into())))
        );
        assert_eq!(
            code(
                Endpoint::Messages,
                r#"{"model":"m","max_tokens":5,"messages":"hi"}"#
            ),
            Some((Some("messages".into()), Some(INVALID_TYPE.into())))
        );
        let system = "be brief ".repeat(100);
        let body = format!(
            r#"{{"model":"m","max_tokens":7,"stream":true,"system":"{system}","messages":{user}}}"#
        );
        let admitted = parse(Endpoint::Messages, body.as_bytes()).unwrap();
        assert!(admitted.stream);
        assert_eq!(admitted.facts.max_tokens, 7);
        assert_eq!(admitted.facts.prompt_tokens as usize, body.len() / 4);
        let count = format!(r#"{{"model":"m","messages":{user},"stream":true}}"#);
        let admitted = parse(Endpoint::CountTokens, count.as_bytes()).unwrap();
        assert!(!admitted.stream, "a count is never streamed");
    }

    /// Every inference path can be forwarded to a rig tunnelled to another replica, which
    /// takes the paths it knows only.
    #[test]
    fn every_endpoint_is_a_path_replicas_forward() {
        for endpoint in ENDPOINTS {
            assert!(
                crate::backends::INFERENCE_PATHS.contains(&endpoint.path()),
                "{}",
                endpoint.path()
            );
            assert_eq!(
                endpoint.error_shape(),
                ErrorShape::of_path(&format!("/v1{}", endpoint.path()))
            );
        }
    }

    /// `with_include_usage` as the request path calls it: whether the member is there comes
    /// from the parse (of a chat request, here).
    fn include(body: &[u8]) -> Bytes {
        let object: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(body).unwrap();
        let mut chat = object.clone();
        chat.insert("messages".into(), serde_json::json!([]));
        let admitted = parse(Endpoint::Chat, &serde_json::to_vec(&chat).unwrap()).unwrap();
        assert_eq!(
            admitted.has_stream_options,
            object.contains_key("stream_options")
        );
        with_include_usage(body, admitted.has_stream_options).unwrap()
    }

    /// A client that spells the member's name with an escape still sends one member: the
    /// engine refuses a body with two (`"stream\u005foptions"` is `"stream_options"`).
    #[test]
    fn an_escaped_stream_options_name_is_the_same_member() {
        for body in [
            r#"{"model":"m","stream":true,"stream\u005foptions":{"include_usage":false}}"#,
            r#"{"model":"m","stream":true,"\u0073tream_options":null}"#,
        ] {
            let out = include(body.as_bytes());
            let text = std::str::from_utf8(&out).unwrap();
            let members = serde_json::from_str::<serde_json::Value>(text).unwrap();
            assert_eq!(
                members["stream_options"],
                serde_json::json!({"include_usage": true}),
                "{text}"
            );
            assert_eq!(text.matches("stream_options").count(), 1, "{text}");
        }
        // Two members of that name, however spelled, are the client's mistake: a 400.
        let twice = br#"{"model":"m","messages":[],"stream_options":{},"stream\u005foptions":{}}"#;
        assert!(parse(Endpoint::Chat, twice).is_err());
    }

    #[test]
    fn include_usage_keeps_everything_else() {
        let body = br#"{"model":"m","tools":[{"type":"function"}],"stream":true,"x_vendor":1.5}"#;
        let out = include(body);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"model":"m","tools":[{"type":"function"}],"stream":true,"x_vendor":1.5,"stream_options":{"include_usage":true}}"#
        );
        let set = |body: &str| {
            let out = include(body.as_bytes());
            serde_json::from_slice::<serde_json::Value>(&out).unwrap()
        };
        // The client's bytes are kept as they were (spacing, number forms), member added last.
        let out = include(b"{ \"model\" : \"m\", \"temperature\": 1.50 }\n");
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "{ \"model\" : \"m\", \"temperature\": 1.50 ,\"stream_options\":{\"include_usage\":true}}\n"
        );
        // Options the client set are kept; a null or malformed one is replaced.
        assert_eq!(
            set(r#"{"model":"m","stream_options":{"include_usage":false,"x":1}}"#)["stream_options"],
            serde_json::json!({"include_usage": true, "x": 1})
        );
        assert_eq!(
            set(r#"{"model":"m","stream_options":null}"#)["stream_options"],
            serde_json::json!({"include_usage": true})
        );
        // The name as a value takes the general path, and still gets exactly one member.
        let out = set(r#"{"model":"m","user":"stream_options"}"#);
        assert_eq!(out["user"], "stream_options");
        assert_eq!(
            out["stream_options"],
            serde_json::json!({"include_usage": true})
        );
    }
}
