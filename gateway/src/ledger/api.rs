//! Reading the ledgers: a key its own usage, the admin everyone's and the rewards leaderboard.

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ApiPath, ApiQuery, ErrorBody};
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
