//! vLLM's scoring APIs, served for cross-encoder (reranker) models: `POST /v1/rerank` (Jina's
//! and Cohere's shape: a query and documents, answered with the documents ranked) and
//! `POST /v1/score` (pairs of texts, a score each). The simulated model scores by word overlap
//! ([`synth::relevance`]), so the ranking is deterministic and makes sense to a reader.

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::api::{self, ApiError};
use crate::state::{Finish, Running, SimState};
use crate::synth;

#[derive(Deserialize)]
struct RerankRequest {
    model: Option<String>,
    query: Option<Value>,
    documents: Option<Value>,
    /// How many of the best to return; 0 (the default) for all.
    #[serde(default)]
    top_n: usize,
}

#[derive(Deserialize)]
struct ScoreRequest {
    model: Option<String>,
    text_1: Option<Value>,
    text_2: Option<Value>,
}

/// The texts of a field that takes a string or a list of strings (a document may also be
/// `{"text": ...}`, as in Cohere's API).
fn texts(field: &str, value: Option<Value>) -> Result<Vec<String>, ApiError> {
    let invalid = || ApiError::BadRequest(format!("{field} must be a string or a list of strings"));
    let text = |item: Value| match item {
        Value::String(text) => Ok(text),
        Value::Object(mut object) => match object.remove("text") {
            Some(Value::String(text)) => Ok(text),
            _ => Err(invalid()),
        },
        _ => Err(invalid()),
    };
    match value {
        None | Some(Value::Null) => Err(ApiError::BadRequest(format!("Field required: {field}"))),
        Some(Value::Array(items)) => items.into_iter().map(text).collect(),
        Some(item) => Ok(vec![text(item)?]),
    }
}

/// Waits for a slot and the simulated time a forward pass takes.
async fn run(state: &SimState) -> Result<Running, ApiError> {
    let (running, _) = api::admit(state, false).await?;
    if !state.pace(state.token_due(Instant::now(), 0)).await {
        return Err(ApiError::ShuttingDown);
    }
    Ok(running)
}

/// Tokens of the pair, as a cross-encoder reads it (both texts, a few special tokens).
fn pair_tokens(first: &str, second: &str) -> u32 {
    synth::count_words(first)
        .saturating_add(synth::count_words(second))
        .saturating_add(3)
}

/// `POST /v1/rerank`.
pub(crate) async fn rerank(
    State(state): State<SimState>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: RerankRequest = api::parse(&body)?;
    let model = api::resolve_model(&state, request.model)?;
    let query = match request.query {
        Some(Value::String(query)) => query,
        Some(_) => return Err(ApiError::BadRequest("query must be a string".to_owned())),
        None => return Err(ApiError::BadRequest("Field required: query".to_owned())),
    };
    let documents = texts("documents", request.documents)?;
    let mut running = run(&state).await?;
    let mut ranked: Vec<(usize, f64)> = documents
        .iter()
        .map(|document| synth::relevance(&query, document))
        .enumerate()
        .collect();
    // Best first; equal scores keep the documents' order.
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if request.top_n > 0 {
        ranked.truncate(request.top_n);
    }
    let prompt_tokens = documents
        .iter()
        .map(|document| pair_tokens(&query, document))
        .fold(0, u32::saturating_add);
    running.finish(prompt_tokens, 0, Finish::Stop);
    let prompt_tokens = state.report().tokens(prompt_tokens);
    let results: Vec<Value> = ranked
        .into_iter()
        .map(|(index, score)| {
            json!({"index": index, "document": {"text": documents[index]}, "relevance_score": score})
        })
        .collect();
    Ok(Json(json!({
        "id": format!("rerank-{:032x}", rand::random::<u128>()),
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        "results": results,
    }))
    .into_response())
}

/// `POST /v1/score`: `text_1` against each of `text_2` (one to many), or pair by pair.
pub(crate) async fn score(
    State(state): State<SimState>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: ScoreRequest = api::parse(&body)?;
    let model = api::resolve_model(&state, request.model)?;
    let first = texts("text_1", request.text_1)?;
    let second = texts("text_2", request.text_2)?;
    let pairs: Vec<(&String, &String)> = match (first.as_slice(), second.len()) {
        (_, 0) | ([], _) => {
            return Err(ApiError::BadRequest(
                "text_1 and text_2 must not be empty".to_owned(),
            ));
        }
        ([one], _) => second.iter().map(|text| (one, text)).collect(),
        (many, n) if many.len() == n => many.iter().zip(&second).collect(),
        _ => {
            return Err(ApiError::BadRequest(
                "text_1 must be one text, or as many as text_2".to_owned(),
            ));
        }
    };
    let mut running = run(&state).await?;
    let prompt_tokens = pairs
        .iter()
        .map(|(a, b)| pair_tokens(a, b))
        .fold(0, u32::saturating_add);
    running.finish(prompt_tokens, 0, Finish::Stop);
    let prompt_tokens = state.report().tokens(prompt_tokens);
    let data: Vec<Value> = pairs
        .iter()
        .enumerate()
        .map(|(index, (a, b))| {
            json!({"index": index, "object": "score", "score": synth::relevance(a, b)})
        })
        .collect();
    Ok(Json(json!({
        "id": format!("score-{:032x}", rand::random::<u128>()),
        "object": "list",
        "created": api::unix_now(),
        "model": model,
        "data": data,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens, "completion_tokens": 0},
    }))
    .into_response())
}
