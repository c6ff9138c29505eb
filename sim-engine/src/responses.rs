//! vLLM's Responses API, `POST /v1/responses`: the simulated generation of chat, answered as a
//! `response` object, or streamed as vLLM streams it: typed events (an `event: <type>` line
//! before each `data:` line) numbered by `sequence_number`, and no `[DONE]`. The usage is in
//! the `response` of the last event, `response.completed`, always: the Responses API has no
//! `stream_options`.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::api::{self, ApiError};
use crate::model::{self, Generation, Prompt};
use crate::state::{Finish, Report, Running, SimState};
use crate::synth;

/// The fields the simulator reads; others are ignored, as vLLM ignores what it does not use.
#[derive(Deserialize)]
struct ResponsesRequest {
    model: Option<String>,
    input: Option<Value>,
    instructions: Option<String>,
    max_output_tokens: Option<u32>,
    stream: Option<bool>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    metadata: Option<Value>,
    /// Simulator extension, as for chat: how many tokens the "model" wants to say.
    sim_tokens: Option<u32>,
}

/// One admitted response.
struct Reply {
    id: String,
    message_id: String,
    created_at: u64,
    model: String,
    instructions: Option<String>,
    max_output_tokens: Option<u32>,
    temperature: f64,
    top_p: f64,
    metadata: Value,
    prompt_tokens: u32,
    tokens: u32,
    finish: Finish,
    generation: Generation,
    /// The whole generated text.
    text: String,
    /// How the counts are reported: honestly, or inflated.
    report: Report,
}

impl Reply {
    /// How the response ended: cut by `max_output_tokens` is `incomplete`.
    fn status(&self) -> &'static str {
        match self.finish {
            Finish::Stop => "completed",
            Finish::Length => "incomplete",
        }
    }

    /// The assistant message, an output item: empty while in progress, then with the text.
    fn message(&self, status: &str) -> Value {
        let content = if status == "in_progress" {
            json!([])
        } else {
            json!([output_text(&self.text)])
        };
        json!({
            "id": self.message_id, "type": "message", "role": "assistant", "status": status,
            "content": content,
        })
    }

    /// The `response` object: in progress (no output, no usage), or `done`.
    fn response(&self, done: bool) -> Value {
        let (status, output, usage, incomplete) = if done {
            let incomplete = match self.finish {
                Finish::Length => json!({"reason": "max_output_tokens"}),
                Finish::Stop => Value::Null,
            };
            let (input, output) = (
                self.report.tokens(self.prompt_tokens),
                self.report.tokens(self.tokens),
            );
            let usage = json!({
                "input_tokens": input,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": output,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": input.saturating_add(output),
            });
            let output = json!([self.message(self.status())]);
            (self.status(), output, usage, incomplete)
        } else {
            ("in_progress", json!([]), Value::Null, Value::Null)
        };
        json!({
            "id": self.id, "object": "response", "created_at": self.created_at,
            "status": status, "background": false, "error": null,
            "incomplete_details": incomplete, "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens, "max_tool_calls": null,
            "metadata": self.metadata, "model": self.model, "output": output,
            "parallel_tool_calls": true, "previous_response_id": null, "reasoning": null,
            "service_tier": "auto", "store": false, "temperature": self.temperature,
            "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [],
            "top_logprobs": 0, "top_p": self.top_p, "truncation": "disabled",
            "usage": usage, "user": null,
        })
    }
}

/// A text content part.
fn output_text(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

/// `POST /v1/responses`.
pub(crate) async fn create(
    State(state): State<SimState>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: ResponsesRequest = api::parse(&body)?;
    let model = api::resolve_model(&state, request.model)?;
    let input = request
        .input
        .ok_or_else(|| ApiError::BadRequest("Field required: input".to_owned()))?;
    // Like chat's messages, each input item gets a few tokens of framing.
    let framing = match &input {
        Value::String(_) => 0,
        Value::Array(items) => u32::try_from(items.len())
            .unwrap_or(u32::MAX)
            .saturating_mul(4),
        _ => {
            return Err(ApiError::BadRequest(
                "input must be a string or a list of input items".to_owned(),
            ));
        }
    };
    let instructions = request.instructions.as_deref().map_or(0, |text| {
        synth::count_tokens(&Value::String(text.to_owned()))
    });
    let prompt_tokens = synth::count_tokens(&input)
        .saturating_add(framing)
        .saturating_add(instructions)
        .max(1);
    let (tokens, finish) = api::plan(
        &state,
        prompt_tokens,
        request.sim_tokens,
        request.max_output_tokens,
    )?;
    // The Responses API has no seed: temperature 0 is greedy, anything else the script.
    let decoding = api::decoding(request.temperature, None)?;
    let prompt = chat_prompt(request.instructions.as_deref(), &input);
    let streamed = request.stream.unwrap_or(false);
    let (mut running, drop_stream) = api::admit(&state, streamed).await?;
    let start = Instant::now();
    let (generation, report) = state.generate(model::Request {
        model: &model,
        prompt,
        decoding,
        tokens,
        top_logprobs: None,
    });
    let reply = Reply {
        id: format!("resp_{:032x}", rand::random::<u128>()),
        message_id: format!("msg_{:032x}", rand::random::<u128>()),
        created_at: api::unix_now(),
        model,
        instructions: request.instructions,
        max_output_tokens: request.max_output_tokens,
        temperature: request.temperature.unwrap_or(1.0),
        top_p: request.top_p.unwrap_or(1.0),
        metadata: request.metadata.unwrap_or(Value::Null),
        prompt_tokens,
        tokens,
        finish,
        text: model::text(&generation.tokens),
        generation,
        report,
    };
    if streamed {
        let stream = Streamer {
            state,
            reply,
            running,
            start,
            drop_stream,
            sequence: 0,
            phase: Phase::Created,
        };
        let frames = futures::stream::unfold(stream, |mut stream| async move {
            let frame = stream.next_frame().await?;
            Some((frame, stream))
        });
        return Ok(api::event_stream(frames));
    }
    if !state
        .pace(state.token_due(start, tokens.saturating_sub(1)))
        .await
    {
        return Err(ApiError::ShuttingDown);
    }
    running.finish(prompt_tokens, tokens, finish);
    Ok(Json(reply.response(true)).into_response())
}

/// Where a stream is, in the order vLLM sends a text answer's events.
#[derive(Clone, Copy)]
enum Phase {
    Created,
    InProgress,
    ItemAdded,
    PartAdded,
    /// The delta of token `n` next; past the last, the text is done.
    Token(u32),
    PartDone,
    ItemDone,
    Completed,
    End,
}

/// Produces a streamed response one event at a time, paced like a real engine.
struct Streamer {
    state: SimState,
    reply: Reply,
    running: Running,
    start: Instant,
    drop_stream: bool,
    sequence: u64,
    phase: Phase,
}

impl Streamer {
    async fn next_frame(&mut self) -> Option<std::io::Result<Bytes>> {
        let reply = &self.reply;
        // Every event about the text names where it is: the first content of the first item.
        let at = |mut fields: Value| {
            fields["item_id"] = json!(reply.message_id);
            fields["output_index"] = json!(0);
            fields["content_index"] = json!(0);
            fields
        };
        let (kind, fields) = match self.phase {
            Phase::Created => {
                // vLLM opens the event stream with the first output, after the TTFT.
                if !self.state.pace(self.state.token_due(self.start, 0)).await {
                    return self.abort("engine shutting down");
                }
                self.phase = Phase::InProgress;
                (
                    "response.created",
                    json!({"response": reply.response(false)}),
                )
            }
            Phase::InProgress => {
                self.phase = Phase::ItemAdded;
                (
                    "response.in_progress",
                    json!({"response": reply.response(false)}),
                )
            }
            Phase::ItemAdded => {
                self.phase = Phase::PartAdded;
                (
                    "response.output_item.added",
                    json!({"output_index": 0, "item": reply.message("in_progress")}),
                )
            }
            Phase::PartAdded => {
                self.phase = Phase::Token(0);
                (
                    "response.content_part.added",
                    at(json!({"part": output_text("")})),
                )
            }
            Phase::Token(index) if self.drop_stream && (index >= 1 || index == reply.tokens) => {
                // As in chat: let hyper write out what is buffered before the body fails.
                tokio::task::yield_now().await;
                return self.abort("simulated connection drop");
            }
            Phase::Token(index) if index < reply.tokens => {
                if !self
                    .state
                    .pace(self.state.token_due(self.start, index))
                    .await
                {
                    return self.abort("engine shutting down");
                }
                self.phase = Phase::Token(index + 1);
                (
                    "response.output_text.delta",
                    at(json!({
                        "delta": model::token_text(reply.generation.tokens[index as usize]),
                        "logprobs": [],
                    })),
                )
            }
            Phase::Token(_) => {
                self.running
                    .finish(reply.prompt_tokens, reply.tokens, reply.finish);
                self.phase = Phase::PartDone;
                (
                    "response.output_text.done",
                    at(json!({"text": reply.text, "logprobs": []})),
                )
            }
            Phase::PartDone => {
                self.phase = Phase::ItemDone;
                (
                    "response.content_part.done",
                    at(json!({"part": output_text(&reply.text)})),
                )
            }
            Phase::ItemDone => {
                self.phase = Phase::Completed;
                (
                    "response.output_item.done",
                    json!({"output_index": 0, "item": reply.message(reply.status())}),
                )
            }
            Phase::Completed => {
                self.phase = Phase::End;
                (
                    "response.completed",
                    json!({"response": reply.response(true)}),
                )
            }
            Phase::End => return None,
        };
        let frame = event(kind, self.sequence, fields);
        self.sequence += 1;
        Some(frame)
    }

    /// Ends the body with an error, which makes hyper cut the connection without the final chunk.
    fn abort(&mut self, why: &'static str) -> Option<std::io::Result<Bytes>> {
        self.phase = Phase::End;
        Some(Err(std::io::Error::other(why)))
    }
}

/// The conversation a Responses request makes, as vLLM renders it for the chat template:
/// the instructions as a system message, then the input (a string is one user message), so
/// that the same conversation generates the same answer here and in chat.
fn chat_prompt(instructions: Option<&str>, input: &Value) -> Prompt {
    let instructions = instructions.map(|text| Value::String(text.to_owned()));
    let system = instructions.as_ref().map(|text| ("system", text));
    let items: Vec<(&str, &Value)> = match input {
        Value::Array(items) => items
            .iter()
            .map(|item| {
                let role = item.get("role").and_then(Value::as_str).unwrap_or("user");
                (role, item.get("content").unwrap_or(item))
            })
            .collect(),
        text => vec![("user", text)],
    };
    Prompt::chat(system.into_iter().chain(items))
}

/// One typed event: `event: <kind>`, then its data, `fields` with `type` and `sequence_number`.
fn event(kind: &str, sequence: u64, mut fields: Value) -> std::io::Result<Bytes> {
    fields["type"] = json!(kind);
    fields["sequence_number"] = json!(sequence);
    let mut buf = Vec::with_capacity(512);
    buf.extend_from_slice(b"event: ");
    buf.extend_from_slice(kind.as_bytes());
    buf.extend_from_slice(b"\ndata: ");
    serde_json::to_writer(&mut buf, &fields)?;
    buf.extend_from_slice(b"\n\n");
    Ok(Bytes::from(buf))
}
