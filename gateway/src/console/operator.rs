//! A rig owner's console: their rigs with health and trust, what they earned per day, each
//! rig's statement with its receipts, and how to add a rig.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::{get, post};
use maud::{Markup, html};
use serde::Deserialize;

use super::view::{self, Section};
use super::{Console, OperatorConsole, refuse_post, respond};
use crate::error::ApiError;
use crate::nodes::CreateEnrollmentToken;
use crate::state::AppState;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/console/operator", get(home))
        .route("/console/operator/enroll", post(enroll))
        .route("/console/operator/rigs/{id}/statement", get(statement))
}

/// The rig owner's page.
#[utoipa::path(
    get, path = "/console/operator", tag = "console",
    responses(super::Page),
    security(("console_session" = []))
)]
pub(crate) async fn home(
    OperatorConsole(console, name): OperatorConsole,
    State(state): State<AppState>,
) -> Response {
    respond(page(&state, &console, &name, None).await)
}

async fn page(
    state: &AppState,
    console: &Console,
    name: &str,
    enrolled: Option<String>,
) -> Result<Markup, ApiError> {
    let rigs = state.nodes().rigs_of(name).await?;
    let earnings = crate::nodes::operator_api::earnings(state, name, 30).await?;
    let payouts = crate::ledger::api::own_lines(state, name).await?;
    let points: Vec<(String, f64)> = earnings
        .days
        .iter()
        .map(|d| (d.day.clone(), d.points))
        .collect();
    let body = html! {
        @if let Some(token) = &enrolled {
            section.secret {
                h2 { "Enrollment token" }
                p { "Shown once. On the new rig, with node-runner installed:" }
                (view::enrollment_command(state, token))
            }
        }
        section.cards {
            div.card { h2 { "Points" } p { (format!("{:.4}", earnings.points)) } small { "now" } }
            div.card { h2 { "Withheld" } p { (format!("{:.4}", earnings.withheld_points)) } small { "from quarantined rigs" } }
            div.card { h2 { "Rigs" } p { (rigs.len()) } small { (rigs.iter().filter(|r| r.routable).count()) " in routing" } }
        }
        h2 { "Points per day (30 days)" }
        (view::bars(&points, "points"))
        h2 { "Your rigs" }
        table.rigs {
            thead { tr { th { "Rig" } th { "Operator" } th { "GPUs" } th { "Engines" } th { "Health" } th { "Trust" } th { "Hardware" } th { "Statement" } } }
            tbody {
                @for rig in &rigs {
                    (super::admin::rig_row(console, rig, false))
                }
                @if rigs.is_empty() { tr { td colspan="8" { "No rig yet: add one below." } } }
            }
        }
        p {
            @for rig in &rigs {
                a href=(format!("/console/operator/rigs/{}/statement", rig.id)) { "Statement of " (rig.name) } " "
            }
        }
        h2 { "Payouts" }
        table {
            thead { tr { th { "Run" } th { "When" } th { "Points" } th { "Amount" } } }
            tbody {
                @for payout in &payouts {
                    tr {
                        td { code { (payout.payout_id) } }
                        td { (view::ago(payout.created_at)) }
                        td { (format!("{:.4}", payout.points)) }
                        td { (format!("{:.2}", payout.amount)) " " (payout.currency) }
                    }
                }
                @if payouts.is_empty() { tr { td colspan="4" { "Nothing paid yet." } } }
            }
        }
        section {
            h2 { "Add a rig" }
            p { "A token for one rig, valid for a day by default. The rig's work earns under "
                strong { (name) } "." }
            form method="post" action="/console/operator/enroll" {
                (view::csrf(&console.session))
                button type="submit" { "Make an enrollment token" }
            }
        }
    };
    Ok(view::page(
        &console.session,
        Section::OwnRigs,
        "Your rigs and earnings",
        body,
    ))
}

#[derive(Deserialize, utoipa::ToSchema)]
pub(crate) struct CsrfOnly {
    csrf: Option<String>,
}

/// Makes an enrollment token for a new rig of the operator's own, shown once with the command.
#[utoipa::path(
    post, path = "/console/operator/enroll", tag = "console",
    responses(
        (status = 200, description = "The page with the token", content_type = "text/html"),
        (status = 303, description = "Not logged in: to the login page"),
        (status = 403, description = "Another kind of account, or no valid CSRF token, or another site's request", content_type = "text/html"),
        (status = 500, description = "Internal error", content_type = "text/html"),
        (status = 503, description = "The store is unreachable", content_type = "text/html"),
    ),
    security(("console_session" = []))
)]
pub(crate) async fn enroll(
    OperatorConsole(console, name): OperatorConsole,
    State(state): State<AppState>,
    headers: HeaderMap,
    axum::Form(form): axum::Form<CsrfOnly>,
) -> Response {
    if let Some(refused) = refuse_post(&console, &headers, form.csrf.as_deref()) {
        return refused;
    }
    let created = state
        .nodes()
        .create_enrollment_token(CreateEnrollmentToken {
            operator: name.clone(),
            expires_in_secs: None,
            max_uses: None,
        })
        .await;
    match created {
        Ok(token) => respond(page(&state, &console, &name, Some(token.token)).await),
        Err(err) => respond(Err(err)),
    }
}

/// A statement of one of the operator's rigs: each request as billed, with its receipt check.
#[utoipa::path(
    get, path = "/console/operator/rigs/{id}/statement", tag = "console",
    params(("id" = String, Path, description = "Node id")),
    responses(
        (status = 200, description = "The page", content_type = "text/html"),
        (status = 303, description = "Not logged in: to the login page"),
        (status = 403, description = "Logged in as another kind of account", content_type = "text/html"),
        (status = 404, description = "No rig of yours with that id", content_type = "text/html"),
        (status = 500, description = "Internal error", content_type = "text/html"),
        (status = 503, description = "The store is unreachable", content_type = "text/html"),
    ),
    security(("console_session" = []))
)]
pub(crate) async fn statement(
    OperatorConsole(console, name): OperatorConsole,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Response {
    respond(
        async {
            let rig = state.nodes().rig_of(&name, &id).await?;
            let statement = state
                .nodes()
                .statement(&rig.id, &rig.operator, None, 1000)
                .await?;
            let body = html! {
                p { "Every request " strong { (rig.name) } " served, as the gateway billed it, with \
                     the receipt your rig signed and what the gateway's check of it found. \
                     `node-runner statement` checks the receipts against your rig's own key." }
                table {
                    thead { tr { th { "Request" } th { "Model" } th { "Billed tokens" } th { "Reported" } th { "Receipt" } } }
                    tbody {
                        @for entry in &statement.data {
                            tr {
                                td { code { (entry.request_id) } }
                                td { (entry.model) }
                                td { (entry.prompt_tokens) " + " (entry.completion_tokens) }
                                td {
                                    @match (entry.reported_prompt_tokens, entry.reported_completion_tokens) {
                                        (Some(p), Some(c)) => { (p) " + " (c) },
                                        _ => { "–" },
                                    }
                                }
                                td {
                                    (format!("{:?}", entry.receipt_check).to_lowercase())
                                    @if let Some(detail) = &entry.detail { br; small.why { (detail) } }
                                }
                            }
                        }
                        @if statement.data.is_empty() { tr { td colspan="5" { "No requests yet." } } }
                    }
                }
            };
            Ok(view::page(
                &console.session,
                Section::OwnRigs,
                &format!("Statement of {}", rig.name),
                body,
            ))
        }
        .await,
    )
}
