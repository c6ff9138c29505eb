//! The HTTP surface: vLLM's OpenAI-compatible routes and its errors.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::logprobs::{self, Logprobs};
use crate::model::{self, Decoding, Generation, Prompt};
use crate::state::{Fate, Finish, Report, Running, SimState};
use crate::synth;

/// Streams are dropped after this many frames when the drop fault hits: late enough that the
/// client has seen a response start, early enough that it never sees `[DONE]`.
const DROP_AFTER_FRAMES: u32 = 2;

/// Context length the simulated model reports and enforces (Llama 3 8B's); it also bounds what a
/// request can make us allocate.
pub(crate) const MAX_MODEL_LEN: u32 = 8192;

/// The engine's routes on `state`; serve it on any listener.
pub fn router(state: SimState) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/responses", post(crate::responses::create))
        .route("/v1/messages", post(crate::messages::create))
        .route(
            "/v1/messages/count_tokens",
            post(crate::messages::count_tokens),
        )
        .route("/v1/rerank", post(crate::scoring::rerank))
        .route("/v1/score", post(crate::scoring::score))
        .route("/v1/models", get(models));
    // Only when asked for: the benchmarks' direct-to-engine numbers pay for no layer.
    let v1 = match &state.config().api_key {
        Some(key) => v1.route_layer(axum::middleware::from_fn_with_state(
            std::sync::Arc::<str>::from(key.as_str()),
            require_api_key,
        )),
        None => v1,
    };
    v1.route("/health", get(|| async {}))
        .route(
            "/version",
            get(|| async { Json(json!({"version": "0.10.1+garage.sim"})) }),
        )
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::NoRoute })
        .with_state(state)
}

/// vLLM's `--api-key`: the `/v1` routes want `Authorization: Bearer <key>`, and answer 401
/// with `{"error": "Unauthorized"}` (vLLM's own body, not the OpenAI shape) without it.
async fn require_api_key(
    State(expected): State<std::sync::Arc<str>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if presented != Some(&*expected) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "Unauthorized"})),
        )
            .into_response();
    }
    next.run(request).await
}

/// Every failure, answered in vLLM's OpenAI error shape.
#[derive(Debug)]
pub(crate) enum ApiError {
    BadRequest(String),
    /// A bad value of a named request field.
    Invalid {
        param: &'static str,
        message: String,
    },
    UnknownModel(String),
    NoRoute,
    Simulated,
    ShuttingDown,
}

impl ApiError {
    /// Status, vLLM's error type, the field at fault and the message.
    fn parts(self) -> (StatusCode, &'static str, Option<&'static str>, String) {
        match self {
            ApiError::BadRequest(message) => {
                (StatusCode::BAD_REQUEST, "BadRequestError", None, message)
            }
            ApiError::Invalid { param, message } => (
                StatusCode::BAD_REQUEST,
                "BadRequestError",
                Some(param),
                message,
            ),
            ApiError::UnknownModel(model) => (
                StatusCode::NOT_FOUND,
                "NotFoundError",
                Some("model"),
                format!("The model `{model}` does not exist."),
            ),
            ApiError::NoRoute => (
                StatusCode::NOT_FOUND,
                "NotFoundError",
                None,
                "Not Found".to_owned(),
            ),
            ApiError::Simulated => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalServerError",
                None,
                "simulated engine failure".to_owned(),
            ),
            ApiError::ShuttingDown => (
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailableError",
                None,
                "the engine is shutting down".to_owned(),
            ),
        }
    }

    /// The error as vLLM answers it on its Anthropic routes (`/v1/messages...`): Anthropic's
    /// envelope, `{"type": "error", "error": {"type", "message"}}`, holding vLLM's own error
    /// type (`BadRequestError`...) and status.
    pub(crate) fn anthropic(self) -> Response {
        let (status, kind, _, message) = self.parts();
        let body = json!({"type": "error", "error": {"type": kind, "message": message}});
        (status, Json(body)).into_response()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, kind, param, message) = self.parts();
        let body = json!({"error": {"message": message, "type": kind, "param": param, "code": status.as_u16()}});
        (status, Json(body)).into_response()
    }
}

/// A chat or text completion request; unknown fields are ignored, as vLLM does.
#[derive(Deserialize)]
struct GenerateRequest {
    model: Option<String>,
    messages: Option<Vec<ChatMessage>>,
    prompt: Option<Value>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    n: Option<u32>,
    temperature: Option<f64>,
    seed: Option<i64>,
    /// Chat: a boolean; text completions: how many top log-probabilities.
    logprobs: Option<Value>,
    /// Chat only: how many top log-probabilities.
    top_logprobs: Option<Value>,
    /// Strings that end generation where they appear (not included in the output).
    stop: Option<Stop>,
    /// Simulator extension: how many tokens the "model" wants to say before stopping.
    sim_tokens: Option<u32>,
}

#[derive(Deserialize)]
struct ChatMessage {
    #[serde(default)]
    role: String,
    #[serde(default)]
    content: Value,
}

/// `stop`: one string or a list of them.
#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(one) => vec![one],
            Stop::Many(many) => many,
        }
    }
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
    continuous_usage_stats: Option<bool>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

/// The response envelope shared by chat and text completions, streamed or not.
#[derive(Serialize)]
struct Envelope<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: &'a [Choice<'a>],
    /// Absent (not null) on stream chunks unless usage was asked for, as in vLLM.
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

#[derive(Serialize)]
struct Choice<'a> {
    index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<Message<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    delta: Option<Message<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
    /// `null` unless asked for, as in vLLM.
    logprobs: Option<Logprobs>,
    finish_reason: Option<&'static str>,
    /// The stop string that ended generation, else `null`, as in vLLM.
    stop_reason: Option<&'a str>,
}

#[derive(Serialize)]
struct Message<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
}

#[derive(Serialize, Clone, Copy)]
struct Usage {
    prompt_tokens: u64,
    total_tokens: u64,
    completion_tokens: u64,
}

impl Usage {
    fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        let total_tokens = prompt_tokens.saturating_add(completion_tokens);
        Self {
            prompt_tokens,
            total_tokens,
            completion_tokens,
        }
    }
}

/// One admitted generation: what to answer and how.
struct Job {
    kind: Kind,
    id: String,
    created: u64,
    out: Generated,
}

impl Job {
    /// Tokens generated.
    fn tokens(&self) -> u32 {
        self.out.tokens()
    }

    /// The usage this job reports after `generated` tokens.
    fn usage(&self, generated: u32) -> Usage {
        let (prompt, completion) = self.out.usage(generated);
        Usage::new(prompt, completion)
    }

    /// The log-probabilities of generated tokens `range`, if they were asked for; `offset` is
    /// where the first one starts in the completion's text, in characters.
    fn logprobs(&self, range: std::ops::Range<usize>, offset: usize) -> Option<Logprobs> {
        let steps = self.out.generation.steps.as_ref()?;
        let tokens = &self.out.generation.tokens[range.clone()];
        Some(match self.kind {
            Kind::Chat => logprobs::chat(tokens, &steps[range]),
            Kind::Completion => logprobs::completion(tokens, &steps[range], offset),
        })
    }

    fn object(&self, streamed: bool) -> &'static str {
        match (self.kind, streamed) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    /// A choice carrying `content` in the shape of this job's kind.
    fn choice<'a>(
        &'a self,
        streamed: bool,
        role: bool,
        content: Option<&'a str>,
        logprobs: Option<Logprobs>,
        finish: Option<Finish>,
    ) -> Choice<'a> {
        let message = Message {
            role: role.then_some("assistant"),
            content,
        };
        let (message, delta, text) = match (self.kind, streamed) {
            (Kind::Chat, false) => (Some(message), None, None),
            (Kind::Chat, true) => (None, Some(message), None),
            (Kind::Completion, _) => (None, None, Some(content.unwrap_or(""))),
        };
        Choice {
            index: 0,
            message,
            delta,
            text,
            logprobs,
            finish_reason: finish.map(Finish::as_str),
            stop_reason: finish.and(self.out.stop_sequence.as_deref()),
        }
    }

    fn envelope<'a>(
        &'a self,
        streamed: bool,
        choices: &'a [Choice<'a>],
        usage: Option<Usage>,
    ) -> Envelope<'a> {
        Envelope {
            id: &self.id,
            object: self.object(streamed),
            created: self.created,
            model: &self.out.model,
            choices,
            usage,
        }
    }
}

async fn chat(State(state): State<SimState>, body: Bytes) -> Result<Response, ApiError> {
    generate(state, &body, Kind::Chat).await
}

async fn completions(State(state): State<SimState>, body: Bytes) -> Result<Response, ApiError> {
    generate(state, &body, Kind::Completion).await
}

pub(crate) fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|error| ApiError::BadRequest(format!("Invalid request body: {error}")))
}

pub(crate) fn resolve_model(
    state: &SimState,
    requested: Option<String>,
) -> Result<String, ApiError> {
    match state.model(requested.as_deref()) {
        Some(model) => Ok(model.to_owned()),
        None => Err(ApiError::UnknownModel(requested.unwrap_or_default())),
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// How many tokens a request of `prompt_tokens` generates and why it stops: the model "wants"
/// `sim_tokens` (or the default); a `limit` (max_tokens) below that cuts it at "length". More
/// than the context holds is vLLM's 400.
pub(crate) fn plan(
    state: &SimState,
    prompt_tokens: u32,
    sim_tokens: Option<u32>,
    limit: Option<u32>,
) -> Result<(u32, Finish), ApiError> {
    let wanted = sim_tokens
        .or(limit)
        .unwrap_or(state.config().default_max_tokens);
    let (tokens, finish) = match limit {
        Some(limit) if wanted >= limit => (limit, Finish::Length),
        _ => (wanted, Finish::Stop),
    };
    if u64::from(prompt_tokens) + u64::from(tokens) > u64::from(MAX_MODEL_LEN) {
        return Err(ApiError::BadRequest(format!(
            "This model's maximum context length is {MAX_MODEL_LEN} tokens. However, you requested \
             {} tokens ({prompt_tokens} in the messages, {tokens} in the completion). Please reduce \
             the length of the messages or completion.",
            u64::from(prompt_tokens) + u64::from(tokens)
        )));
    }
    Ok((tokens, finish))
}

/// Rolls the fault dice, fails or hangs as they say, and otherwise waits for a running slot.
pub(crate) async fn admit(state: &SimState, streamed: bool) -> Result<(Running, bool), ApiError> {
    let drop_stream = match state.roll(streamed) {
        Fate::Serve => false,
        Fate::DropStream => true,
        Fate::Fail => return Err(ApiError::Simulated),
        Fate::Hang => {
            // The client going away drops this future; only shutdown ends it otherwise.
            state.hang().await;
            return Err(ApiError::ShuttingDown);
        }
    };
    let running = state.admit().await.ok_or(ApiError::ShuttingDown)?;
    Ok((running, drop_stream))
}

/// The prompt of a conversation, as `(role, content)` pairs, and its tokens: each message's
/// text and the few tokens of framing the chat template adds around it.
pub(crate) fn conversation<'a>(
    messages: impl Iterator<Item = (&'a str, &'a Value)> + Clone,
) -> (Prompt, u32) {
    let tokens = messages
        .clone()
        .map(|(_, content)| {
            synth::count_tokens(content).saturating_add(crate::CHAT_TEMPLATE_TOKENS)
        })
        .fold(0, u32::saturating_add);
    (Prompt::chat(messages), tokens)
}

/// What a request asks the model to generate, whichever API it came by.
pub(crate) struct Ask<'a> {
    pub(crate) model: String,
    pub(crate) prompt: Prompt,
    pub(crate) prompt_tokens: u32,
    pub(crate) decoding: Decoding,
    /// `max_tokens` (or its other names).
    pub(crate) limit: Option<u32>,
    pub(crate) sim_tokens: Option<u32>,
    /// Stop strings: generation ends before the first that appears.
    pub(crate) stops: &'a [String],
    pub(crate) streamed: bool,
    pub(crate) top_logprobs: Option<usize>,
}

/// What a request generated, whichever API it came by.
pub(crate) struct Generated {
    pub(crate) model: String,
    pub(crate) prompt_tokens: u32,
    pub(crate) finish: Finish,
    /// The stop string that ended generation, if one did.
    pub(crate) stop_sequence: Option<String>,
    pub(crate) generation: Generation,
    /// How the counts are reported: honestly, or as a dishonest engine reports them.
    pub(crate) report: Report,
}

impl Generated {
    /// Tokens generated.
    pub(crate) fn tokens(&self) -> u32 {
        self.generation.count()
    }

    /// The `(prompt, completion)` tokens reported after `generated` tokens.
    pub(crate) fn usage(&self, generated: u32) -> (u64, u64) {
        self.report.usage(self.prompt_tokens, generated)
    }
}

/// The running slot a generation holds while it is sent, and how it is sent.
pub(crate) struct Slot {
    pub(crate) running: Running,
    /// When generation started: tokens are due from here.
    pub(crate) start: Instant,
    /// The drop fault hit this stream: cut it after a few events.
    pub(crate) drop_stream: bool,
}

impl Slot {
    /// For an answer sent whole: waits until its last token is due, and counts it done.
    pub(crate) async fn complete(
        &mut self,
        state: &SimState,
        generated: &Generated,
    ) -> Result<(), ApiError> {
        let tokens = generated.tokens();
        if !state
            .pace(state.token_due(self.start, tokens.saturating_sub(1)))
            .await
        {
            return Err(ApiError::ShuttingDown);
        }
        self.done(generated);
        Ok(())
    }

    /// Counts the request done, its tokens all generated.
    pub(crate) fn done(&mut self, generated: &Generated) {
        (self.running).finish(
            generated.prompt_tokens,
            generated.tokens(),
            generated.finish,
        );
    }
}

/// Plans, admits and generates what `ask` asks for: the shared core of chat, completions and
/// Anthropic's Messages.
pub(crate) async fn start(state: &SimState, ask: Ask<'_>) -> Result<(Generated, Slot), ApiError> {
    let prompt_tokens = ask.prompt_tokens.max(1);
    let (tokens, finish) = plan(state, prompt_tokens, ask.sim_tokens, ask.limit)?;
    let (running, drop_stream) = admit(state, ask.streamed).await?;
    let start = Instant::now();
    let (mut generation, report) = state.generate(model::Request {
        model: &ask.model,
        prompt: ask.prompt,
        decoding: ask.decoding,
        tokens,
        top_logprobs: ask.top_logprobs,
    });
    let stop_sequence = generation.cut_at_stop(ask.stops);
    let generated = Generated {
        model: ask.model,
        prompt_tokens,
        finish: if stop_sequence.is_some() {
            Finish::Stop
        } else {
            finish
        },
        stop_sequence,
        generation,
        report,
    };
    let slot = Slot {
        running,
        start,
        drop_stream,
    };
    Ok((generated, slot))
}

/// `temperature` (and `seed`) as a way of decoding; a bad temperature is vLLM's 400.
pub(crate) fn decoding(temperature: Option<f64>, seed: Option<i64>) -> Result<Decoding, ApiError> {
    Decoding::new(temperature, seed).map_err(|message| ApiError::Invalid {
        param: "temperature",
        message,
    })
}

async fn generate(state: SimState, body: &[u8], kind: Kind) -> Result<Response, ApiError> {
    let request: GenerateRequest = parse(body)?;
    let model = resolve_model(&state, request.model)?;
    let (prompt, prompt_tokens, top_logprobs) = match kind {
        Kind::Chat => {
            let messages = request
                .messages
                .ok_or_else(|| ApiError::BadRequest("Field required: messages".to_owned()))?;
            let (prompt, tokens) =
                conversation(messages.iter().map(|m| (m.role.as_str(), &m.content)));
            let top_logprobs =
                logprobs::chat_request(request.logprobs.as_ref(), request.top_logprobs.as_ref())?;
            (prompt, tokens, top_logprobs)
        }
        Kind::Completion => {
            let prompt = request
                .prompt
                .ok_or_else(|| ApiError::BadRequest("Field required: prompt".to_owned()))?;
            let top_logprobs = logprobs::completion_request(request.logprobs.as_ref())?;
            (
                Prompt::completion(&prompt),
                synth::count_tokens(&prompt),
                top_logprobs,
            )
        }
    };
    if request.n.unwrap_or(1) != 1 {
        return Err(ApiError::BadRequest(
            "sim-engine supports only n=1".to_owned(),
        ));
    }
    let decoding = decoding(request.temperature, request.seed)?;
    let stops = request.stop.map(Stop::into_vec).unwrap_or_default();
    let streamed = request.stream.unwrap_or(false);
    let (out, mut slot) = start(
        &state,
        Ask {
            model,
            prompt,
            prompt_tokens,
            decoding,
            limit: request.max_completion_tokens.or(request.max_tokens),
            sim_tokens: request.sim_tokens,
            stops: &stops,
            streamed,
            top_logprobs,
        },
    )
    .await?;
    let job = Job {
        kind,
        id: match kind {
            Kind::Chat => format!("chatcmpl-{:032x}", rand::random::<u128>()),
            Kind::Completion => format!("cmpl-{:032x}", rand::random::<u128>()),
        },
        created: unix_now(),
        out,
    };
    if streamed {
        let options = request.stream_options;
        let include_usage = options
            .as_ref()
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        let continuous_usage = include_usage
            && options
                .and_then(|o| o.continuous_usage_stats)
                .unwrap_or(false);
        let stream = Streamer {
            state,
            job,
            slot,
            include_usage,
            continuous_usage,
            frames: 0,
            streamed_chars: 0,
            phase: if kind == Kind::Chat {
                Phase::Role
            } else {
                Phase::Token(0)
            },
        };
        let frames = futures::stream::unfold(stream, |mut stream| async move {
            let frame = stream.next_frame().await?;
            Some((frame, stream))
        });
        return Ok(event_stream(frames));
    }
    slot.complete(&state, &job.out).await?;
    let text = model::text(&job.out.generation.tokens);
    let logprobs = job.logprobs(0..job.out.generation.tokens.len(), 0);
    let choices = [job.choice(false, true, Some(&text), logprobs, Some(job.out.finish))];
    Ok(Json(job.envelope(false, &choices, Some(job.usage(job.tokens())))).into_response())
}

/// Where a stream is: chat opens with a role chunk; `Token(tokens)` emits the finish chunk.
#[derive(Clone, Copy)]
enum Phase {
    Role,
    Token(u32),
    Usage,
    Done,
    End,
}

/// Produces a streamed answer one SSE frame at a time, paced like a real engine.
struct Streamer {
    state: SimState,
    job: Job,
    slot: Slot,
    include_usage: bool,
    continuous_usage: bool,
    frames: u32,
    phase: Phase,
    /// Characters of text streamed so far: where the next token starts (`text_offset`).
    streamed_chars: usize,
}

impl Streamer {
    async fn next_frame(&mut self) -> Option<std::io::Result<Bytes>> {
        let job = &self.job;
        let tokens = job.tokens();
        let usage = |generated| self.continuous_usage.then(|| job.usage(generated));
        let frame = match self.phase {
            Phase::Role => {
                // vLLM sends the role with the first output, so it too waits for the TTFT.
                if !self
                    .state
                    .pace(self.state.token_due(self.slot.start, 0))
                    .await
                {
                    return self.abort("engine shutting down");
                }
                self.phase = Phase::Token(0);
                sse(&job.envelope(
                    true,
                    &[job.choice(true, true, Some(""), None, None)],
                    usage(0),
                ))
            }
            Phase::Token(index)
                if self.slot.drop_stream
                    && (self.frames >= DROP_AFTER_FRAMES || index == tokens) =>
            {
                // Hyper writes out buffered frames only once the body is pending; without this
                // yield the error would arrive first and the client would see no response at all.
                tokio::task::yield_now().await;
                return self.abort("simulated connection drop");
            }
            Phase::Token(index) if index < tokens => {
                if !self
                    .state
                    .pace(self.state.token_due(self.slot.start, index))
                    .await
                {
                    return self.abort("engine shutting down");
                }
                self.phase = Phase::Token(index + 1);
                let at = index as usize;
                let text = model::token_text(job.out.generation.tokens[at]);
                let logprobs = job.logprobs(at..at + 1, self.streamed_chars);
                self.streamed_chars += text.chars().count();
                sse(&job.envelope(
                    true,
                    &[job.choice(true, false, Some(text), logprobs, None)],
                    usage(index + 1),
                ))
            }
            Phase::Token(_) => {
                self.slot.done(&job.out);
                self.phase = if self.include_usage {
                    Phase::Usage
                } else {
                    Phase::Done
                };
                let content = if job.kind == Kind::Chat {
                    None
                } else {
                    Some("")
                };
                sse(&job.envelope(
                    true,
                    &[job.choice(true, false, content, None, Some(job.out.finish))],
                    usage(tokens),
                ))
            }
            Phase::Usage => {
                self.phase = Phase::Done;
                sse(&job.envelope(true, &[], Some(job.usage(tokens))))
            }
            Phase::Done => {
                self.phase = Phase::End;
                Ok(Bytes::from_static(b"data: [DONE]\n\n"))
            }
            Phase::End => return None,
        };
        self.frames += 1;
        Some(frame)
    }

    /// Ends the body with an error, which makes hyper cut the connection without the final chunk.
    fn abort(&mut self, why: &'static str) -> Option<std::io::Result<Bytes>> {
        self.phase = Phase::End;
        Some(Err(std::io::Error::other(why)))
    }
}

/// A streamed answer: `frames` as a `text/event-stream` body.
pub(crate) fn event_stream(
    frames: impl futures::Stream<Item = std::io::Result<Bytes>> + Send + 'static,
) -> Response {
    (
        [(header::CONTENT_TYPE, "text/event-stream")],
        Body::from_stream(frames),
    )
        .into_response()
}

/// One server-sent event, `data: <json>\n\n`, in a single allocation.
fn sse(value: &impl Serialize) -> std::io::Result<Bytes> {
    let mut buf = Vec::with_capacity(320);
    buf.extend_from_slice(b"data: ");
    serde_json::to_writer(&mut buf, value)?;
    buf.extend_from_slice(b"\n\n");
    Ok(Bytes::from(buf))
}

#[derive(Deserialize)]
struct EmbeddingRequest {
    model: Option<String>,
    input: Option<Value>,
    encoding_format: Option<String>,
}

#[derive(Serialize)]
struct EmbeddingResponse {
    id: String,
    object: &'static str,
    created: u64,
    model: String,
    data: Vec<EmbeddingData>,
    usage: EmbeddingUsage,
}

#[derive(Serialize)]
struct EmbeddingUsage {
    prompt_tokens: u64,
    total_tokens: u64,
}

#[derive(Serialize)]
struct EmbeddingData {
    object: &'static str,
    index: usize,
    embedding: EmbeddingVector,
}

#[derive(Serialize)]
#[serde(untagged)]
enum EmbeddingVector {
    Float(Vec<f32>),
    /// Little-endian f32s in base64, what the openai Python SDK asks for by default.
    Base64(String),
}

/// Splits `input` into the items to embed: a string, a list of strings, one list of token ids
/// or a list of such lists.
fn embedding_inputs(input: &Value) -> Result<Vec<&Value>, ApiError> {
    let invalid = || {
        ApiError::BadRequest("input must be a string, a list of strings or token ids".to_owned())
    };
    match input {
        Value::String(_) => Ok(vec![input]),
        Value::Array(items) if items.is_empty() => Err(invalid()),
        Value::Array(items) if items.iter().all(Value::is_u64) => Ok(vec![input]),
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(_) => Ok(item),
                Value::Array(ids) if !ids.is_empty() && ids.iter().all(Value::is_u64) => Ok(item),
                _ => Err(invalid()),
            })
            .collect(),
        _ => Err(invalid()),
    }
}

async fn embeddings(State(state): State<SimState>, body: Bytes) -> Result<Response, ApiError> {
    let request: EmbeddingRequest = parse(&body)?;
    let model = resolve_model(&state, request.model)?;
    let input = request
        .input
        .ok_or_else(|| ApiError::BadRequest("Field required: input".to_owned()))?;
    let items = embedding_inputs(&input)?;
    let base64 = match request.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "unsupported encoding_format `{other}`"
            )));
        }
    };
    let (mut running, _) = admit(&state, false).await?;
    if !state.pace(state.token_due(Instant::now(), 0)).await {
        return Err(ApiError::ShuttingDown);
    }
    let dim = state.config().embedding_dim;
    let mut prompt_tokens = 0u32;
    let data: Vec<EmbeddingData> = items
        .into_iter()
        .enumerate()
        .map(|(index, item)| {
            prompt_tokens = prompt_tokens.saturating_add(synth::count_tokens(item).max(1));
            let vector = synth::embedding(item, dim);
            let embedding = if base64 {
                let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
                EmbeddingVector::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                EmbeddingVector::Float(vector)
            };
            EmbeddingData {
                object: "embedding",
                index,
                embedding,
            }
        })
        .collect();
    running.finish(prompt_tokens, 0, Finish::Stop);
    let reported = state.report().tokens(prompt_tokens);
    let body = EmbeddingResponse {
        id: format!("embd-{:032x}", rand::random::<u128>()),
        object: "list",
        created: unix_now(),
        model,
        data,
        usage: EmbeddingUsage {
            prompt_tokens: reported,
            total_tokens: reported,
        },
    };
    Ok(Json(body).into_response())
}

async fn models(State(state): State<SimState>) -> Json<Value> {
    let created = unix_now();
    let data: Vec<Value> = state
        .config()
        .models
        .iter()
        .map(|id| {
            json!({
                "id": id, "object": "model", "created": created, "owned_by": "vllm",
                "root": id, "parent": null, "max_model_len": MAX_MODEL_LEN, "permission": [],
            })
        })
        .collect();
    Json(json!({"object": "list", "data": data}))
}

async fn metrics(State(state): State<SimState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.render_metrics(),
    )
}
