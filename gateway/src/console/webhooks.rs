//! The operator's console: webhook endpoints (created with their secret shown once, deleted
//! with a confirmation) and each one's recent deliveries, as `/admin/webhooks` has them.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use maud::{Markup, html};

use super::view::{self, Section};
use super::{AdminConsole, Console, refuse_post, respond};
use crate::error::ApiError;
use crate::state::AppState;
use crate::webhooks::endpoint::CreateEndpoint;
use crate::webhooks::{DeliveryState, EventKind};

/// Deliveries an endpoint's page lists.
const DELIVERIES_SHOWN: usize = 100;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/console/webhooks", get(webhooks).post(create_webhook))
        .route("/console/webhooks/{id}", get(deliveries))
        .route("/console/webhooks/{id}/delete", post(delete_webhook))
}

/// Webhook endpoints: their events, and a form to add one.
#[utoipa::path(
    get, path = "/console/webhooks", tag = "console",
    responses(super::Page),
    security(("console_session" = []))
)]
pub(crate) async fn webhooks(
    AdminConsole(console): AdminConsole,
    State(state): State<AppState>,
) -> Response {
    respond(webhooks_page(&state, &console, None).await)
}

async fn webhooks_page(
    state: &AppState,
    console: &Console,
    created: Option<(String, String)>,
) -> Result<Markup, ApiError> {
    state.webhooks().reload().await?;
    let endpoints = state.webhooks().endpoints();
    let body = html! {
        @if let Some((url, secret)) = &created {
            section.secret {
                h2 { "Signing secret for " (url) }
                p { "Give it to the receiver, which checks each delivery's webhook-signature \
                     with it (docs/money.md). It is shown once." }
                pre { code data-secret { (secret) } }
            }
        }
        table {
            thead { tr { th { "URL" } th { "Events" } th { "Description" } th { "Created" } th { "" } } }
            tbody {
                @for endpoint in endpoints.iter() {
                    tr data-webhook=(endpoint.id) {
                        td { a href=(format!("/console/webhooks/{}", endpoint.id)) { (endpoint.url) } }
                        td { @for kind in &endpoint.events { code { (kind.as_str()) } " " } }
                        td { (endpoint.description) }
                        td { (view::ago(endpoint.created_at)) }
                        td.actions {
                            form method="post" action=(format!("/console/webhooks/{}/delete", endpoint.id)) {
                                (view::csrf(&console.session))
                                label { input type="checkbox" name="confirm" value="yes" required; " sure" }
                                button.danger type="submit" { "Delete" }
                            }
                        }
                    }
                }
                @if endpoints.is_empty() { tr { td colspan="5" { "No webhook endpoint yet." } } }
            }
        }
        section {
            h2 { "Add an endpoint" }
            form method="post" action="/console/webhooks" {
                (view::csrf(&console.session))
                label for="webhook-url" { "URL (http or https; deliveries are POSTed there)" }
                input id="webhook-url" name="url" type="url" required maxlength="2048";
                fieldset {
                    legend { "Events" }
                    @for kind in EventKind::ALL {
                        label { input type="checkbox" name="events" value=(kind.as_str()); " " code { (kind.as_str()) } }
                    }
                }
                label for="webhook-description" { "Description" }
                input id="webhook-description" name="description" maxlength="256";
                button type="submit" { "Create" }
            }
        }
    };
    Ok(view::page(
        &console.session,
        Section::Webhooks,
        "Webhooks",
        body,
    ))
}

/// How soon a Unix time in milliseconds comes, for people.
fn until(unix_ms: u64) -> String {
    let secs = (unix_ms / 1000).saturating_sub(crate::keys::unix_now());
    match secs {
        0 => "now".into(),
        1..=59 => format!("in {secs} s"),
        60..=3599 => format!("in {} min", secs / 60),
        _ => format!("in {} h", secs / 3600),
    }
}

/// The create form's fields: `events` repeats, once per box ticked.
fn form_fields(fields: Vec<(String, String)>) -> (Option<String>, CreateEndpoint) {
    let mut csrf = None;
    let mut request = CreateEndpoint {
        url: String::new(),
        events: Vec::new(),
        description: None,
    };
    for (name, value) in fields {
        match name.as_str() {
            "csrf" => csrf = Some(value),
            "url" => request.url = value,
            "events" => request.events.push(value),
            "description" if !value.is_empty() => request.description = Some(value),
            _ => {}
        }
    }
    (csrf, request)
}

/// Creates an endpoint; the page shows its signing secret once.
#[utoipa::path(
    post, path = "/console/webhooks", tag = "console",
    request_body(content = String, content_type = "application/x-www-form-urlencoded",
        description = "csrf, url, description, and events once per event type ticked"),
    responses(super::Action),
    security(("console_session" = []))
)]
pub(crate) async fn create_webhook(
    AdminConsole(console): AdminConsole,
    State(state): State<AppState>,
    headers: HeaderMap,
    form: Result<axum::Form<Vec<(String, String)>>, axum::extract::rejection::FormRejection>,
) -> Response {
    let Ok(axum::Form(fields)) = form else {
        return respond(Err(ApiError::bad_request("An unreadable form.", None)));
    };
    let (csrf, request) = form_fields(fields);
    if let Some(refused) = refuse_post(&console, &headers, csrf.as_deref()) {
        return refused;
    }
    match state.webhooks().create_endpoint(request).await {
        Ok((record, secret)) => {
            respond(webhooks_page(&state, &console, Some((record.url, secret))).await)
        }
        Err(err) => respond(Err(err)),
    }
}

#[derive(serde::Deserialize, utoipa::ToSchema)]
pub(crate) struct DeleteForm {
    csrf: Option<String>,
    confirm: Option<String>,
}

/// Deletes an endpoint (with confirm).
#[utoipa::path(
    post, path = "/console/webhooks/{id}/delete", tag = "console",
    params(("id" = String, Path, description = "Endpoint id")),
    responses(super::Action),
    security(("console_session" = []))
)]
pub(crate) async fn delete_webhook(
    AdminConsole(console): AdminConsole,
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    axum::Form(form): axum::Form<DeleteForm>,
) -> Response {
    if let Some(refused) = refuse_post(&console, &headers, form.csrf.as_deref()) {
        return refused;
    }
    if form.confirm.as_deref() != Some("yes") {
        return respond(Err(ApiError::bad_request(
            "Tick the box to confirm deleting the endpoint.",
            Some("confirm"),
        )));
    }
    match state.webhooks().delete_endpoint(&id).await {
        Ok(Some(_)) => Redirect::to("/console/webhooks").into_response(),
        Ok(None) => respond(Err(ApiError::NotFound("No such webhook endpoint.".into()))),
        Err(err) => respond(Err(err)),
    }
}

/// An endpoint's recent deliveries: attempts, last status or error, next attempt.
#[utoipa::path(
    get, path = "/console/webhooks/{id}", tag = "console",
    params(("id" = String, Path, description = "Endpoint id")),
    responses(super::Page, (status = 404, description = "No such endpoint", content_type = "text/html")),
    security(("console_session" = []))
)]
pub(crate) async fn deliveries(
    AdminConsole(console): AdminConsole,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Response {
    respond(deliveries_page(&state, &console, &id).await)
}

async fn deliveries_page(
    state: &AppState,
    console: &Console,
    id: &str,
) -> Result<Markup, ApiError> {
    let endpoint = state
        .webhooks()
        .endpoint(id)
        .await?
        .ok_or_else(|| ApiError::NotFound("No such webhook endpoint.".into()))?;
    let deliveries = state.webhooks().deliveries(id, DELIVERIES_SHOWN).await?;
    let body = html! {
        p { "Deliveries to " code { (endpoint.url) } ", newest first." }
        table {
            thead { tr { th { "Event" } th { "Type" } th { "State" } th { "Attempts" } th { "Last answer" } th { "Next attempt" } } }
            tbody {
                @for delivery in &deliveries {
                    tr data-delivery=(delivery.event_id) {
                        td { small.id { (delivery.event_id) } }
                        td { code { (delivery.kind.as_str()) } }
                        td {
                            @match delivery.state {
                                DeliveryState::Delivered => span.good { "delivered" },
                                DeliveryState::Failed => span.bad { "failed" },
                                DeliveryState::Pending => span { "pending" },
                            }
                        }
                        td { (delivery.attempts) }
                        td {
                            @if let Some(status) = delivery.last_status { (status) " " }
                            @if let Some(error) = &delivery.last_error { small { (error) } }
                        }
                        td {
                            @if let Some(at) = delivery.next_attempt_at_ms { (until(at)) }
                        }
                    }
                }
                @if deliveries.is_empty() { tr { td colspan="6" { "Nothing delivered yet." } } }
            }
        }
        p { a href="/console/webhooks" { "All endpoints" } }
    };
    Ok(view::page(
        &console.session,
        Section::Webhooks,
        "Webhook deliveries",
        body,
    ))
}
