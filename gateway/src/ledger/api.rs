//! Reading the ledgers: a key its own usage, the admin everyone's and the rewards leaderboard.

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ApiPath, ApiQuery, ErrorBody};
use crate::ledger::payouts::{Payout, PayoutRequest};
use crate::ledger::{DailyUsage, LedgerEntry, OperatorPoints};
use crate::state::AppState;

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct UsageList {
    /// Always `list`.
    pub object: String,
    /// Per key, model and UTC day; newest day first.
    pub data: Vec<DailyUsage>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Leaderboard {
    /// Always `list`.
    pub object: String,
    /// Operators by points, best first.
    pub data: Vec<OperatorPoints>,
}

/// Filters of the admin usage listing.
#[derive(Debug, Deserialize, IntoParams)]
pub struct UsageQuery {
    /// Only this key.
    pub key_id: Option<String>,
}

/// The calling key's own usage per model and day.
#[utoipa::path(
    get, path = "/v1/usage", tag = "openai",
    responses((status = 200, body = UsageList), (status = 401, body = ErrorBody)),
    security(("api_key" = []))
)]
pub async fn own_usage(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<UsageList>, ApiError> {
    let key = state.auth().authenticate(&headers).await?;
    Ok(Json(UsageList {
        object: "list".into(),
        data: state.usage().daily(Some(&key.id)).await?,
    }))
}

/// Usage of every key (or one) per model and day.
#[utoipa::path(
    get, path = "/admin/usage", tag = "admin",
    params(UsageQuery),
    responses((status = 200, body = UsageList), (status = 401, body = ErrorBody), (status = 400, description = "Malformed path or query", body = ErrorBody)),
    security(("admin_token" = []))
)]
pub async fn all_usage(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<UsageQuery>,
) -> Result<Json<UsageList>, ApiError> {
    Ok(Json(UsageList {
        object: "list".into(),
        data: state.usage().daily(query.key_id.as_deref()).await?,
    }))
}

/// The ledger entry of one request: the usage event and what was charged and awarded for it.
#[utoipa::path(
    get, path = "/admin/usage/requests/{request_id}", tag = "admin",
    params(("request_id" = String, Path, description = "The x-request-id the gateway gave the request")),
    responses((status = 200, body = LedgerEntry), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 400, description = "Malformed path or query", body = ErrorBody)),
    security(("admin_token" = []))
)]
pub async fn ledger_entry(
    State(state): State<AppState>,
    ApiPath(request_id): ApiPath<String>,
) -> Result<Json<LedgerEntry>, ApiError> {
    state
        .usage()
        .ledger_entry(&request_id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("No ledger entry for request `{request_id}`.")))
}

/// Rig operators by reward points.
#[utoipa::path(
    get, path = "/admin/rewards", tag = "admin",
    responses((status = 200, body = Leaderboard), (status = 401, body = ErrorBody)),
    security(("admin_token" = []))
)]
pub async fn leaderboard(State(state): State<AppState>) -> Result<Json<Leaderboard>, ApiError> {
    Ok(Json(Leaderboard {
        object: "list".into(),
        data: state.usage().leaderboard().await?,
    }))
}

/// Runs a payout: every operator's points not paid yet, at the given rate; a run twice pays
/// once. `Idempotency-Key` returns the first run's answer to a retry.
#[utoipa::path(
    post, path = "/admin/payouts", tag = "admin",
    request_body = PayoutRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "A retry with the same key and body gets the first run's answer; nothing is paid twice")),
    responses(
        (status = 201, body = Payout),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 409, description = "Another payout run, or a request with this Idempotency-Key, is in progress", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
    ),
    security(("admin_token" = []))
)]
pub async fn run_payout(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<PayoutRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let request = crate::error::json_body(body)?;
    let fingerprint = serde_json::to_vec(&request)
        .map_err(|err| ApiError::Internal(format!("cannot read the request back: {err}")))?;
    let (payout, replayed) = crate::http::idempotency::once(
        state.store().as_ref(),
        &headers,
        "admin",
        "payouts",
        &fingerprint,
        state.usage().run_payout(request),
    )
    .await?;
    // A run that paid someone is a `payout.completed` event, with the run's id: a retry's
    // replayed answer is the same run, and the event was emitted the first time.
    if !replayed && !payout.lines.is_empty() {
        let event = crate::webhooks::Event::payout_completed(&payout);
        if let Err(err) = state.webhooks().emit_now(&[event]).await {
            tracing::error!(payout = %payout.id, error = %err, "payout.completed not queued for webhooks");
        }
    }
    let mut response = (axum::http::StatusCode::CREATED, Json(payout)).into_response();
    if replayed {
        response.headers_mut().insert(
            crate::http::idempotency::REPLAYED,
            axum::http::HeaderValue::from_static("true"),
        );
    }
    Ok(response)
}

/// Payout runs.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PayoutList {
    /// Always `list`.
    pub object: String,
    /// Newest first.
    pub data: Vec<Payout>,
}

/// Every payout run, newest first.
#[utoipa::path(
    get, path = "/admin/payouts", tag = "admin",
    responses((status = 200, body = PayoutList), (status = 401, body = ErrorBody)),
    security(("admin_token" = []))
)]
pub async fn list_payouts(State(state): State<AppState>) -> Result<Json<PayoutList>, ApiError> {
    Ok(Json(PayoutList {
        object: "list".into(),
        data: state.usage().payouts().await?,
    }))
}

/// One payout run as CSV, a line per operator (for a bank or a payment provider's import).
#[utoipa::path(
    get, path = "/admin/payouts/{id}/csv", tag = "admin",
    params(("id" = String, Path, description = "Payout id")),
    responses(
        (status = 200, description = "CSV", content_type = "text/csv"),
        (status = 400, description = "Malformed path", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ),
    security(("admin_token" = []))
)]
pub async fn payout_csv(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let payout = state.usage().payout(&id).await?;
    Ok((
        [
            (axum::http::header::CONTENT_TYPE, "text/csv; charset=utf-8"),
            (
                axum::http::header::CONTENT_DISPOSITION,
                "attachment; filename=\"payout.csv\"",
            ),
        ],
        crate::ledger::payouts::csv(&payout),
    )
        .into_response())
}

/// One operator's line of a payout run.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OwnPayout {
    pub payout_id: String,
    /// Unix seconds.
    pub created_at: u64,
    pub points: f64,
    pub amount: f64,
    pub currency: String,
}

/// An operator's payouts.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OwnPayouts {
    /// Always `list`.
    pub object: String,
    /// Newest first.
    pub data: Vec<OwnPayout>,
}

/// What payout runs paid the operator, newest first.
#[utoipa::path(
    get, path = "/operator/v1/payouts", tag = "operator",
    responses(
        (status = 200, body = OwnPayouts),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The operator token was revoked", body = ErrorBody),
    ),
    security(("operator_token" = []))
)]
pub async fn own_payouts(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<OwnPayouts>, ApiError> {
    let operator = state.nodes().operator_of(&headers).await?;
    Ok(Json(OwnPayouts {
        object: "list".into(),
        data: own_lines(&state, &operator.name).await?,
    }))
}

/// An operator's lines of every payout run, newest first.
pub async fn own_lines(state: &AppState, operator: &str) -> Result<Vec<OwnPayout>, ApiError> {
    Ok(state
        .usage()
        .payouts()
        .await?
        .into_iter()
        .filter_map(|payout| {
            let line = payout.lines.iter().find(|l| l.operator == operator)?;
            Some(OwnPayout {
                payout_id: payout.id.clone(),
                created_at: payout.created_at,
                points: line.points,
                amount: line.amount,
                currency: payout.currency.clone(),
            })
        })
        .collect())
}

/// What one operator's line of a payout run paid for: the requests that earned its points in
/// the run's window, each with its tokens, who counted them, the rig's trust and its receipt.
#[utoipa::path(
    get, path = "/admin/payouts/{id}/statements/{operator}", tag = "admin",
    params(
        ("id" = String, Path, description = "Payout id"),
        ("operator" = String, Path, description = "The operator (rig owner) of a line"),
    ),
    responses(
        (status = 200, body = crate::ledger::statements::PayoutStatement),
        (status = 400, description = "Malformed path", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, description = "No such payout run", body = ErrorBody),
    ),
    security(("admin_token" = []))
)]
pub async fn payout_statement(
    State(state): State<AppState>,
    ApiPath((id, operator)): ApiPath<(String, String)>,
) -> Result<Json<crate::ledger::statements::PayoutStatement>, ApiError> {
    Ok(Json(
        crate::ledger::statements::statement(&state, &id, &operator).await?,
    ))
}

/// The operator's own statement of a payout run: the requests its points were paid for.
#[utoipa::path(
    get, path = "/operator/v1/payouts/{id}/statement", tag = "operator",
    params(("id" = String, Path, description = "Payout id")),
    responses(
        (status = 200, body = crate::ledger::statements::PayoutStatement),
        (status = 400, description = "Malformed path", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The operator token was revoked", body = ErrorBody),
        (status = 404, description = "No such payout run", body = ErrorBody),
    ),
    security(("operator_token" = []))
)]
pub async fn own_payout_statement(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<crate::ledger::statements::PayoutStatement>, ApiError> {
    let operator = state.nodes().operator_of(&headers).await?;
    Ok(Json(
        crate::ledger::statements::statement(&state, &id, &operator.name).await?,
    ))
}
