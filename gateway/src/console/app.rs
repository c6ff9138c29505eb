//! An app developer's console: their key's usage, spend and limits, their batches and their
//! results, and a playground.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use maud::html;

use super::view::{self, Section};
use super::{AppConsole, respond};
use crate::error::ApiError;
use crate::plugins::Slot;
use crate::state::AppState;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/console/app", get(home))
        .route("/console/app/batches", get(batches))
        .route("/console/app/files/{id}", get(file))
        .route("/console/app/playground", get(playground))
}

/// The key's budget under the active meter, when it is the default meter (its config's
/// `budgets` and `default_budget`).
fn budget(state: &AppState, key_id: &str) -> Option<f64> {
    let meter = state
        .plugins()
        .status()
        .into_iter()
        .find(|s| s.slot == Slot::Meter)?;
    let config = meter.active?.config;
    config
        .get("budgets")
        .and_then(|b| b.get(key_id))
        .or_else(|| config.get("default_budget"))
        .and_then(serde_json::Value::as_f64)
}

/// An app developer's usage, spend, budget and limits.
#[utoipa::path(
    get, path = "/console/app", tag = "console",
    responses(super::Page),
    security(("console_session" = []))
)]
pub(crate) async fn home(
    AppConsole(console, key_id): AppConsole,
    State(state): State<AppState>,
) -> Response {
    respond(
        async {
            let key = state
                .store()
                .key_by_id(&key_id)
                .await?
                .ok_or_else(|| ApiError::NotFound("Your key is gone.".into()))?;
            let rows = state.usage().daily(Some(&key_id)).await?;
            // `+ 0.0`: a sum of nothing is -0.0, which prints as `-0.0000`.
            let spent: f64 = rows.iter().map(|r| r.credits).sum::<f64>() + 0.0;
            let budget = budget(&state, &key_id);
            let body = html! {
                section.cards {
                    div.card { h2 { "Spent" } p { (format!("{spent:.4}")) } small { "credits" } }
                    div.card { h2 { "Budget" }
                        @match budget {
                            Some(b) => { p { (format!("{:.4}", (b - spent).max(0.0))) } small { "left of " (format!("{b:.4}")) } },
                            None => { p { "none" } small { "no budget is set for this key" } },
                        }
                    }
                    div.card { h2 { "Key" } p { code { (key.prefix) "…" } } small { (key.name) } }
                }
                section {
                    h2 { "Limits" }
                    p { "Models: " @match &key.allowed_models { Some(m) => { (m.join(", ")) }, None => { "all" } } }
                    p { "Metadata (limits, trust): " code { (serde_json::Value::Object(key.metadata.clone())) } }
                }
                h2 { "Usage" }
                (super::admin::usage_body(&rows, None))
            };
            Ok(view::page(&console.session, Section::AppUsage, "Your usage", body))
        }
        .await,
    )
}

/// An app developer's batches with their progress and results.
#[utoipa::path(
    get, path = "/console/app/batches", tag = "console",
    responses(super::Page),
    security(("console_session" = []))
)]
pub(crate) async fn batches(
    AppConsole(console, key_id): AppConsole,
    State(state): State<AppState>,
) -> Response {
    respond(
        async {
            let list = state.batches().list_batches(&key_id, None, 100).await?;
            let body = html! {
                table {
                    thead { tr { th { "Batch" } th { "Status" } th { "Lines" } th { "Created" } th { "Results" } } }
                    tbody {
                        @for batch in &list.data {
                            tr {
                                td { code { (batch.id) } br; small { (batch.endpoint) } }
                                (view::batch_progress(batch))
                                td { (view::ago(batch.created_at)) }
                                td {
                                    @if let Some(id) = &batch.output_file_id { a href=(format!("/console/app/files/{id}")) { "output" } " " }
                                    @if let Some(id) = &batch.error_file_id { a href=(format!("/console/app/files/{id}")) { "errors" } }
                                }
                            }
                        }
                        @if list.data.is_empty() { tr { td colspan="5" { "No batches yet (POST /v1/batches)." } } }
                    }
                }
            };
            Ok(view::page(&console.session, Section::AppBatches, "Your batches", body))
        }
        .await,
    )
}

/// One of the key's files (a batch's output or errors), as the Files API gives it.
/// One of the key's files (a batch's output or errors).
#[utoipa::path(
    get, path = "/console/app/files/{id}", tag = "console",
    params(("id" = String, Path, description = "Id")),
    responses(
        (status = 200, description = "The file", content_type = "application/jsonl"),
        (status = 404, description = "No such file of this key", content_type = "text/html"),
        (status = 303, description = "Not logged in: to the login page"),
        (status = 403, description = "Logged in as another kind of account", content_type = "text/html"),
        (status = 500, description = "Internal error", content_type = "text/html"),
        (status = 503, description = "The store is unreachable", content_type = "text/html"),
    ),
    security(("console_session" = []))
)]
pub(crate) async fn file(
    AppConsole(_session, key_id): AppConsole,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Response {
    match state.batches().file_content(&key_id, &id).await {
        Ok(bytes) => (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, "application/jsonl".to_owned()),
                (
                    header::CONTENT_DISPOSITION,
                    format!(
                        "attachment; filename=\"{}.jsonl\"",
                        id.replace(
                            |c: char| !c.is_ascii_alphanumeric() && c != '_' && c != '-',
                            ""
                        )
                    ),
                ),
            ],
            bytes,
        )
            .into_response(),
        Err(err) => respond(Err(err)),
    }
}

/// A playground that streams a chat answer from /v1/chat/completions.
#[utoipa::path(
    get, path = "/console/app/playground", tag = "console",
    responses(super::Page),
    security(("console_session" = []))
)]
pub(crate) async fn playground(
    AppConsole(console, key_id): AppConsole,
    State(state): State<AppState>,
) -> Response {
    respond(
        async {
            let key = state
                .store()
                .key_by_id(&key_id)
                .await?
                .ok_or_else(|| ApiError::NotFound("Your key is gone.".into()))?;
            let snapshot = state.backends().snapshot();
            let models: Vec<&str> = snapshot
                .healthy_models()
                .into_iter()
                .filter(|m| key.allowed_models.as_ref().is_none_or(|a| a.iter().any(|x| x == m)))
                .collect();
            let body = html! {
                p { "Streams a chat answer from " code { "/v1/chat/completions" } ", straight from your browser \
                     with your key: paste it below (the console keeps no key; it is sent with this chat only)." }
                form #playground {
                    label for="pg-key" { "API key" }
                    input #pg-key type="password" autocomplete="off" required;
                    label for="pg-model" { "Model" }
                    select #pg-model {
                        @for model in &models { option value=(model) { (model) } }
                    }
                    label for="pg-prompt" { "Message" }
                    textarea #pg-prompt rows="3" required { "Say hello in five words." }
                    button type="submit" { "Send" }
                }
                pre #pg-answer aria-live="polite" {}
                p #pg-status.note {}
            };
            Ok(view::page(&console.session, Section::Playground, "Playground", body))
        }
        .await,
    )
}
