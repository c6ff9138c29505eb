//! `/admin/accounts`: accounts, their credits and their keys, behind the admin token.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::Accounts;
use super::account::{Account, Budgets, CreateAccount, UpdateAccount};
use super::alerts::Alert;
use super::credits::{CreditEntry, CreditLedger, CreditRequest, admin_principal};
use super::money::Credits;
use super::periods::Period;
use crate::error::{ApiError, ApiPath, ErrorBody, json_body};
use crate::http::idempotency;
use crate::keys::api::KeyInfo;
use crate::state::AppState;

/// Alerts `GET /admin/accounts/{id}` shows, newest first.
const ALERTS_SHOWN: usize = 20;

/// An account's spend in one period.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PeriodSpend {
    pub period: Period,
    /// `day:2026-12-07`, `week:2026-12-07` (its Monday), `month:2026-12`: local dates.
    pub name: String,
    /// Unix ms.
    pub starts_at_ms: u64,
    /// Unix ms: when the period's spend starts again from zero.
    pub resets_at_ms: u64,
    pub spent: Credits,
    pub spent_micro: i64,
    /// The cap, if the account has one for this period.
    pub budget: Option<Credits>,
}

/// A key an account owns.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AccountKey {
    pub id: String,
    pub name: String,
    pub prefix: String,
    pub revoked_at: Option<u64>,
}

/// An account with its money now.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AccountInfo {
    pub id: String,
    /// Always `account`.
    pub object: String,
    pub name: String,
    #[schema(value_type = Object)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub budgets: Budgets,
    pub alert_thresholds: Vec<u32>,
    pub low_balance_alert: Option<Credits>,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds, once closed.
    pub closed_at: Option<u64>,
    /// Credits in (top-ups, adjustments) minus credits debited.
    pub balance: Credits,
    pub balance_micro: i64,
    /// Held for requests in flight.
    pub reserved: Credits,
    pub reserved_micro: i64,
    /// What new requests may hold: the balance minus what is reserved.
    pub available: Credits,
    pub available_micro: i64,
    /// Debited, in all.
    pub spent: Credits,
    pub spent_micro: i64,
    /// Requests in flight holding credits.
    pub holds: u64,
    /// Spend this day, week and month (local calendar).
    pub periods: Vec<PeriodSpend>,
    /// The keys it owns (`GET /admin/accounts/{id}` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<Vec<AccountKey>>,
    /// Thresholds crossed, newest first (`GET /admin/accounts/{id}` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alerts: Option<Vec<Alert>>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AccountList {
    /// Always `list`.
    pub object: String,
    /// Oldest first.
    pub data: Vec<AccountInfo>,
}

impl Accounts {
    /// An account as the API shows it, with its money now.
    pub async fn info(&self, account: Account, detailed: bool) -> Result<AccountInfo, ApiError> {
        let now_ms = self.now_ms();
        let windows: Vec<_> = Period::ALL
            .into_iter()
            .map(|period| self.window(period, now_ms))
            .collect();
        let names: Vec<String> = windows.iter().map(|w| w.name.clone()).collect();
        let money = self
            .store()
            .account_money(&account.id, now_ms, &names)
            .await?;
        let periods = windows
            .into_iter()
            .zip(&money.periods)
            .map(|(window, spent)| PeriodSpend {
                period: window.period,
                budget: account.budgets.get(window.period),
                name: window.name,
                starts_at_ms: window.start_ms,
                resets_at_ms: window.end_ms,
                spent: Credits(*spent),
                spent_micro: *spent,
            })
            .collect();
        let (keys, alerts) = if detailed {
            let keys = self
                .keys_of(&account.id)
                .await?
                .into_iter()
                .map(|key| AccountKey {
                    id: key.id,
                    name: key.name,
                    prefix: key.prefix,
                    revoked_at: key.revoked_at,
                })
                .collect();
            let mut alerts = self.alerts(&account.id).await?;
            alerts.truncate(ALERTS_SHOWN);
            (Some(keys), Some(alerts))
        } else {
            (None, None)
        };
        let available = money.balance.saturating_sub(money.reserved);
        Ok(AccountInfo {
            id: account.id,
            object: "account".into(),
            name: account.name,
            metadata: account.metadata,
            budgets: account.budgets,
            alert_thresholds: account.alert_thresholds,
            low_balance_alert: account.low_balance_alert,
            created_at: account.created_at,
            closed_at: account.closed_at,
            balance: Credits(money.balance),
            balance_micro: money.balance,
            reserved: Credits(money.reserved),
            reserved_micro: money.reserved,
            available: Credits(available),
            available_micro: available,
            spent: Credits(money.spent),
            spent_micro: money.spent,
            holds: money.holds,
            periods,
            keys,
            alerts,
        })
    }
}

/// Creates an account, with no credits (top it up with `POST /admin/accounts/{id}/credits`).
#[utoipa::path(
    post, path = "/admin/accounts", tag = "admin",
    request_body = CreateAccount,
    responses(
        (status = 201, body = AccountInfo),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
    ),
    security(("admin_token" = []))
)]
pub async fn create_account(
    State(state): State<AppState>,
    body: Result<Json<CreateAccount>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<AccountInfo>), ApiError> {
    let request = json_body(body)?;
    let accounts = state.accounts();
    let account = accounts.create(request).await?;
    Ok((
        StatusCode::CREATED,
        Json(accounts.info(account, true).await?),
    ))
}

/// Every account with its balance, what is reserved and what it spent, oldest first.
#[utoipa::path(
    get, path = "/admin/accounts", tag = "admin",
    responses((status = 200, body = AccountList), (status = 401, body = ErrorBody)),
    security(("admin_token" = []))
)]
pub async fn list_accounts(State(state): State<AppState>) -> Result<Json<AccountList>, ApiError> {
    let accounts = state.accounts();
    let mut data = Vec::new();
    for account in accounts.list().await? {
        data.push(accounts.info(account, false).await?);
    }
    Ok(Json(AccountList {
        object: "list".into(),
        data,
    }))
}

/// One account: its balance, what requests in flight hold, what it spent this day, week and
/// month, its keys and its latest alerts.
#[utoipa::path(
    get, path = "/admin/accounts/{id}", tag = "admin",
    params(("id" = String, Path, description = "Account id")),
    responses(
        (status = 200, body = AccountInfo),
        (status = 400, description = "Malformed path", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ),
    security(("admin_token" = []))
)]
pub async fn get_account(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<AccountInfo>, ApiError> {
    let accounts = state.accounts();
    let account = accounts.get_or_404(&id).await?;
    Ok(Json(accounts.info(account, true).await?))
}

/// Changes an account's name, metadata, budgets or alert thresholds.
#[utoipa::path(
    patch, path = "/admin/accounts/{id}", tag = "admin",
    params(("id" = String, Path, description = "Account id")),
    request_body = UpdateAccount,
    responses(
        (status = 200, body = AccountInfo),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
    ),
    security(("admin_token" = []))
)]
pub async fn update_account(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    body: Result<Json<UpdateAccount>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<AccountInfo>, ApiError> {
    let update = json_body(body)?;
    let accounts = state.accounts();
    let account = accounts.update(&id, update).await?;
    Ok(Json(accounts.info(account, true).await?))
}

/// Closes an account: its keys are refused (403 `account_closed`) and it takes no more
/// top-ups. Its record, credit ledger and balance stay.
#[utoipa::path(
    delete, path = "/admin/accounts/{id}", tag = "admin",
    params(("id" = String, Path, description = "Account id")),
    responses(
        (status = 200, body = AccountInfo),
        (status = 400, description = "Malformed path", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ),
    security(("admin_token" = []))
)]
pub async fn close_account(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<AccountInfo>, ApiError> {
    let accounts = state.accounts();
    let account = accounts.close(&id).await?;
    Ok(Json(accounts.info(account, true).await?))
}

/// Tops an account up (a positive amount) or adjusts it (a negative one, never below a zero
/// balance), with a reason; an entry of its credit ledger records who, when, why and the
/// balance after. With `Idempotency-Key`, a retry gets the first answer and credits nothing
/// twice.
#[utoipa::path(
    post, path = "/admin/accounts/{id}/credits", tag = "admin",
    params(
        ("id" = String, Path, description = "Account id"),
        ("Idempotency-Key" = Option<String>, Header, description = "A retry with the same key and body gets the first answer; nothing is credited twice"),
    ),
    request_body = CreditRequest,
    responses(
        (status = 201, body = CreditEntry),
        (status = 400, description = "A bad amount or reason, an adjustment below a zero balance, a top-up past a billion credits, a bad or reused Idempotency-Key", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 409, description = "The account is closed (a top-up), or a request with this Idempotency-Key is in progress", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
    ),
    security(("admin_token" = []))
)]
pub async fn credit_account(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    body: Result<Json<CreditRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    let request = json_body(body)?;
    let by = crate::keys::bearer(&headers).map_or_else(|| "admin".to_owned(), admin_principal);
    let request_id = headers
        .get(crate::request_id::X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let fingerprint = serde_json::to_vec(&(&id, request.amount.micro(), &request.reason))
        .map_err(|err| ApiError::Internal(format!("cannot read the request back: {err}")))?;
    let accounts = state.accounts();
    let (entry, replayed) = idempotency::once(
        state.store().as_ref(),
        &headers,
        "admin",
        &format!("account_credits:{id}"),
        &fingerprint,
        accounts.credit(&id, request, &by, &request_id),
    )
    .await?;
    let mut response = (StatusCode::CREATED, Json(entry)).into_response();
    if replayed {
        response.headers_mut().insert(
            idempotency::REPLAYED,
            axum::http::HeaderValue::from_static("true"),
        );
    }
    Ok(response)
}

/// An account's credit ledger: every top-up and adjustment, oldest first.
#[utoipa::path(
    get, path = "/admin/accounts/{id}/credits", tag = "admin",
    params(("id" = String, Path, description = "Account id")),
    responses(
        (status = 200, body = CreditLedger),
        (status = 400, description = "Malformed path", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ),
    security(("admin_token" = []))
)]
pub async fn list_credits(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<CreditLedger>, ApiError> {
    Ok(Json(CreditLedger {
        object: "list".into(),
        data: state.accounts().credit_ledger(&id).await?,
    }))
}

/// Gives an API key to the account: its requests spend the account's credits from now on.
#[utoipa::path(
    put, path = "/admin/accounts/{id}/keys/{key_id}", tag = "admin",
    params(
        ("id" = String, Path, description = "Account id"),
        ("key_id" = String, Path, description = "API key id"),
    ),
    responses(
        (status = 200, body = KeyInfo),
        (status = 400, description = "The account is closed, or a malformed path", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, description = "No such account or key", body = ErrorBody),
    ),
    security(("admin_token" = []))
)]
pub async fn assign_key(
    State(state): State<AppState>,
    ApiPath((id, key_id)): ApiPath<(String, String)>,
) -> Result<Json<KeyInfo>, ApiError> {
    let accounts = state.accounts();
    accounts.get_or_404(&id).await?;
    accounts.check_assignable(&id).await?;
    let key = accounts.set_key_account(&key_id, Some(&id)).await?;
    Ok(Json(key.into()))
}

/// Takes an API key from the account: its requests are no longer the account's.
#[utoipa::path(
    delete, path = "/admin/accounts/{id}/keys/{key_id}", tag = "admin",
    params(
        ("id" = String, Path, description = "Account id"),
        ("key_id" = String, Path, description = "API key id"),
    ),
    responses(
        (status = 200, body = KeyInfo),
        (status = 400, description = "Malformed path", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, description = "No such account, or the key is not the account's", body = ErrorBody),
    ),
    security(("admin_token" = []))
)]
pub async fn unassign_key(
    State(state): State<AppState>,
    ApiPath((id, key_id)): ApiPath<(String, String)>,
) -> Result<Json<KeyInfo>, ApiError> {
    let accounts = state.accounts();
    accounts.get_or_404(&id).await?;
    let owned = state
        .store()
        .key_by_id(&key_id)
        .await?
        .is_some_and(|key| key.account.as_deref() == Some(id.as_str()));
    if !owned {
        return Err(ApiError::NotFound(format!(
            "The account `{id}` has no API key with id `{key_id}`."
        )));
    }
    let key = accounts.set_key_account(&key_id, None).await?;
    Ok(Json(key.into()))
}
