//! The operator's console: accounts with their balance and what requests in flight hold, an
//! account's credit ledger, keys and alerts, and forms to create an account and to top it up,
//! as `/admin/accounts` does.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::Response;
use axum::routing::{get, post};
use maud::{Markup, html};
use serde::Deserialize;

use super::view::{self, Section};
use super::{AdminConsole, Console, refuse_post, respond};
use crate::accounts::Credits;
use crate::accounts::account::CreateAccount;
use crate::accounts::api::AccountInfo;
use crate::accounts::credits::{CreditEntry, CreditRequest, admin_principal};
use crate::error::ApiError;
use crate::http::idempotency;
use crate::state::AppState;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/console/accounts", get(accounts).post(create_account))
        .route("/console/accounts/{id}", get(account))
        .route("/console/accounts/{id}/credits", post(top_up))
}

fn credits(amount: Credits) -> String {
    amount.to_string()
}

/// Every account: balance, reserved, available, spent; a form to create one.
#[utoipa::path(
    get, path = "/console/accounts", tag = "console",
    responses(super::Page),
    security(("console_session" = []))
)]
pub(crate) async fn accounts(
    AdminConsole(console): AdminConsole,
    State(state): State<AppState>,
) -> Response {
    respond(accounts_page(&state, &console).await)
}

async fn accounts_page(state: &AppState, console: &Console) -> Result<Markup, ApiError> {
    let accounts = state.accounts();
    let mut shown: Vec<AccountInfo> = Vec::new();
    for account in accounts.list().await? {
        shown.push(accounts.info(account, false).await?);
    }
    let body = html! {
        table.accounts {
            thead { tr {
                th { "Account" } th { "Balance" } th { "Reserved" } th { "Available" }
                th { "Spent" } th { "In flight" } th { "Created" }
            } }
            tbody {
                @for account in &shown {
                    tr data-account=(account.id) {
                        td {
                            a href=(format!("/console/accounts/{}", account.id)) { (account.name) }
                            br; small.id { (account.id) }
                            @if account.closed_at.is_some() { " " span.bad { "closed" } }
                        }
                        td data-balance { (credits(account.balance)) }
                        td data-reserved { (credits(account.reserved)) }
                        td { (credits(account.available)) }
                        td { (credits(account.spent)) }
                        td { (view::count(account.holds)) }
                        td { (view::ago(account.created_at)) }
                    }
                }
                @if shown.is_empty() { tr { td colspan="7" { "No account yet." } } }
            }
        }
        section {
            h2 { "Create an account" }
            form method="post" action="/console/accounts" {
                (view::csrf(&console.session))
                label for="name" { "Name" }
                input id="name" name="name" required maxlength="200";
                label for="day" { "Daily budget (credits; empty for none)" }
                input id="day" name="day" inputmode="decimal";
                label for="week" { "Weekly budget" }
                input id="week" name="week" inputmode="decimal";
                label for="month" { "Monthly budget" }
                input id="month" name="month" inputmode="decimal";
                label for="alert_thresholds" { "Alert at these percentages of a budget (comma-separated)" }
                input id="alert_thresholds" name="alert_thresholds" placeholder="50, 80, 100";
                button type="submit" { "Create" }
            }
        }
    };
    Ok(view::page(
        &console.session,
        Section::Accounts,
        "Accounts",
        body,
    ))
}

#[derive(Deserialize, utoipa::ToSchema)]
pub(crate) struct AccountForm {
    csrf: Option<String>,
    name: String,
    day: Option<String>,
    week: Option<String>,
    month: Option<String>,
    alert_thresholds: Option<String>,
}

/// Creates an account; back to the list.
#[utoipa::path(
    post, path = "/console/accounts", tag = "console",
    responses(super::Action),
    security(("console_session" = []))
)]
pub(crate) async fn create_account(
    AdminConsole(console): AdminConsole,
    State(state): State<AppState>,
    headers: HeaderMap,
    axum::Form(form): axum::Form<AccountForm>,
) -> Response {
    if let Some(refused) = refuse_post(&console, &headers, form.csrf.as_deref()) {
        return refused;
    }
    let result = async {
        let budget = |value: &Option<String>| -> Result<Option<Credits>, ApiError> {
            match value.as_deref().map(str::trim) {
                None | Some("") => Ok(None),
                Some(text) => text.parse().map(Some).map_err(|err| {
                    ApiError::bad_request(
                        format!("`{text}` is not an amount: {err}"),
                        Some("budgets"),
                    )
                }),
            }
        };
        let thresholds = form
            .alert_thresholds
            .as_deref()
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(|t| {
                t.parse::<u32>().map_err(|_| {
                    ApiError::bad_request(
                        format!("`{t}` is not a percentage"),
                        Some("alert_thresholds"),
                    )
                })
            })
            .collect::<Result<Vec<u32>, ApiError>>()?;
        let request = CreateAccount {
            name: form.name,
            metadata: serde_json::Map::new(),
            budgets: crate::accounts::account::Budgets {
                day: budget(&form.day)?,
                week: budget(&form.week)?,
                month: budget(&form.month)?,
            },
            alert_thresholds: thresholds,
            low_balance_alert: None,
        };
        let account = state.accounts().create(request).await?;
        account_page(&state, &console, &account.id, None).await
    }
    .await;
    respond(result)
}

/// One account: its money, periods, keys, alerts, credit ledger and a top-up form.
#[utoipa::path(
    get, path = "/console/accounts/{id}", tag = "console",
    params(("id" = String, Path, description = "Account id")),
    responses(super::Page),
    security(("console_session" = []))
)]
pub(crate) async fn account(
    AdminConsole(console): AdminConsole,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Response {
    respond(account_page(&state, &console, &id, None).await)
}

async fn account_page(
    state: &AppState,
    console: &Console,
    id: &str,
    credited: Option<&CreditEntry>,
) -> Result<Markup, ApiError> {
    let accounts = state.accounts();
    let account = accounts.get_or_404(id).await?;
    let info = accounts.info(account, true).await?;
    let mut ledger = accounts.credit_ledger(id).await?;
    ledger.reverse();
    // A fresh key per form: a form posted twice (a double click, a reload) credits once.
    let once = crate::keys::random_token(24);
    let body = html! {
        @if let Some(entry) = credited {
            section.notice { p { "Credited " (credits(entry.amount)) "; the balance is now " (credits(entry.balance_after)) "." } }
        }
        section {
            h2 { (info.name) " " small.id { (info.id) } }
            @if info.closed_at.is_some() { p.bad { "Closed: its keys are refused." } }
            dl.money {
                dt { "Balance" } dd data-balance { (credits(info.balance)) }
                dt { "Reserved" } dd data-reserved { (credits(info.reserved)) " (" (view::count(info.holds)) " requests in flight)" }
                dt { "Available" } dd { (credits(info.available)) }
                dt { "Spent" } dd { (credits(info.spent)) }
            }
            table.periods {
                thead { tr { th { "Period" } th { "Spent" } th { "Budget" } } }
                tbody {
                    @for period in &info.periods {
                        tr {
                            td { (period.name) }
                            td { (credits(period.spent)) }
                            td { @match period.budget { Some(cap) => { (credits(cap)) }, None => { "none" } } }
                        }
                    }
                }
            }
        }
        @if info.closed_at.is_none() {
            section {
                h2 { "Top up or adjust" }
                form method="post" action=(format!("/console/accounts/{}/credits", info.id)) {
                    (view::csrf(&console.session))
                    input type="hidden" name="idempotency_key" value=(once);
                    label for="amount" { "Credits (negative to take)" }
                    input id="amount" name="amount" required inputmode="decimal";
                    label for="reason" { "Why (an invoice, a payment, a refund)" }
                    input id="reason" name="reason" required maxlength="500";
                    button type="submit" { "Credit" }
                }
            }
        }
        section {
            h2 { "Credit ledger" }
            table.ledger {
                thead { tr { th { "When" } th { "Amount" } th { "Balance after" } th { "Why" } th { "By" } } }
                tbody {
                    @for entry in &ledger {
                        tr {
                            td { (view::ago(entry.created_at_ms / 1000)) }
                            td { (credits(entry.amount)) }
                            td { (credits(entry.balance_after)) }
                            td { (entry.reason) }
                            td { code { (entry.by) } }
                        }
                    }
                    @if ledger.is_empty() { tr { td colspan="5" { "No credits yet." } } }
                }
            }
        }
        section {
            h2 { "Keys" }
            ul {
                @for key in info.keys.iter().flatten() {
                    li { (key.name) " " code { (key.prefix) "…" } " " small.id { (key.id) }
                         @if key.revoked_at.is_some() { " " span.bad { "revoked" } } }
                }
            }
            p { "Give a key to this account with " code { "PUT /admin/accounts/" (info.id) "/keys/{key id}" } "." }
        }
        section {
            h2 { "Alerts" }
            ul {
                @for alert in info.alerts.iter().flatten() {
                    li {
                        (view::ago(alert.at_ms / 1000)) ": "
                        @match (&alert.period_name, alert.threshold_percent) {
                            (Some(period), Some(percent)) => { (percent) " % of the " (period) " budget" },
                            _ => { "balance below " (alert.low_balance_alert.map(credits).unwrap_or_default()) },
                        }
                    }
                }
            }
        }
    };
    Ok(view::page(
        &console.session,
        Section::Accounts,
        "Account",
        body,
    ))
}

#[derive(Deserialize, utoipa::ToSchema)]
pub(crate) struct CreditForm {
    csrf: Option<String>,
    idempotency_key: Option<String>,
    amount: String,
    reason: String,
}

/// Tops an account up (or adjusts it); the page shows the entry.
#[utoipa::path(
    post, path = "/console/accounts/{id}/credits", tag = "console",
    params(("id" = String, Path, description = "Account id")),
    responses(super::Action),
    security(("console_session" = []))
)]
pub(crate) async fn top_up(
    AdminConsole(console): AdminConsole,
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    axum::Form(form): axum::Form<CreditForm>,
) -> Response {
    if let Some(refused) = refuse_post(&console, &headers, form.csrf.as_deref()) {
        return refused;
    }
    let result = async {
        let amount: Credits = form.amount.parse().map_err(|err| {
            ApiError::bad_request(
                format!(
                    "`{}` is not an amount of credits: {err}",
                    form.amount.trim()
                ),
                Some("amount"),
            )
        })?;
        let request = CreditRequest {
            amount,
            reason: form.reason,
        };
        // The form's one-time key, as the API's Idempotency-Key.
        let mut once = HeaderMap::new();
        if let Some(key) = form.idempotency_key.as_deref()
            && let Ok(value) = HeaderValue::from_str(key)
        {
            once.insert(idempotency::HEADER, value);
        }
        let fingerprint = serde_json::to_vec(&(&id, request.amount.micro(), &request.reason))
            .map_err(|err| ApiError::Internal(format!("cannot read the form back: {err}")))?;
        let by = format!("console:{}", admin_principal(state.admin_token()));
        let request_id = headers
            .get(crate::request_id::X_REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let (entry, _) = idempotency::once(
            state.store().as_ref(),
            &once,
            "admin",
            &format!("account_credits:{id}"),
            &fingerprint,
            state.accounts().credit(&id, request, &by, &request_id),
        )
        .await?;
        account_page(&state, &console, &id, Some(&entry)).await
    }
    .await;
    respond(result)
}
