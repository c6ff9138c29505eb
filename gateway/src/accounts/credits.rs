//! Top-ups and adjustments: each one an entry of the account's append-only credit ledger, with
//! who made it, when, why and the balance after it, written in the same atomic step as the
//! balance changes (the store's `account_credit`).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use super::Accounts;
use super::money::{Credits, MAX_MONEY};
use crate::error::ApiError;

/// Longest reason, in characters.
const MAX_REASON_CHARS: usize = 500;

/// A top-up (a positive amount) or an adjustment (a negative one).
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreditRequest {
    /// Credits to add, or to take with a negative amount: a decimal with at most six places
    /// (a JSON number, or a string such as `"12.50"`), not 0, at most a billion.
    pub amount: Credits,
    /// Why: an invoice or payment reference, a refund, a correction.
    pub reason: String,
}

/// The ledger entry as stored; the balance after it is kept beside it by the store.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    id: String,
    amount_micro: i64,
    reason: String,
    by: String,
    request_id: String,
    at_ms: u64,
}

/// One entry of an account's credit ledger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CreditEntry {
    pub id: String,
    /// Credits added (negative: taken).
    pub amount: Credits,
    /// The same, in micro-credits (exact).
    pub amount_micro: i64,
    pub reason: String,
    /// Who made it: the admin credential the request came with (`admin_token:` and the first
    /// eight hex digits of its SHA-256), through the API or the console.
    pub by: String,
    /// The `x-request-id` of the request that made it.
    pub request_id: String,
    /// Unix milliseconds.
    pub created_at_ms: u64,
    /// The account's balance right after it.
    pub balance_after: Credits,
    pub balance_after_micro: i64,
}

/// An account's credit ledger, oldest first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreditLedger {
    /// Always `list`.
    pub object: String,
    pub data: Vec<CreditEntry>,
}

/// Who an admin request came from: its credential, by a fingerprint that tells tokens apart
/// without saying anything about them.
pub fn admin_principal(token: &str) -> String {
    let digest = hex::encode(Sha256::digest(token.as_bytes()));
    format!("admin_token:{}", &digest[..8])
}

fn check_reason(reason: &str) -> Result<String, ApiError> {
    let reason = reason.trim();
    if reason.is_empty()
        || reason.chars().count() > MAX_REASON_CHARS
        || reason.chars().any(char::is_control)
    {
        return Err(ApiError::bad_request(
            format!(
                "reason must say why, in 1 to {MAX_REASON_CHARS} characters without control \
                 characters"
            ),
            Some("reason"),
        ));
    }
    Ok(reason.to_owned())
}

impl Accounts {
    /// Credits an account (a negative amount takes credits, never below a zero balance) and
    /// writes the ledger entry, in one step. `by` is who asked, `request_id` their request.
    pub async fn credit(
        &self,
        account_id: &str,
        request: CreditRequest,
        by: &str,
        request_id: &str,
    ) -> Result<CreditEntry, ApiError> {
        let amount = request.amount.micro();
        if amount == 0 {
            return Err(ApiError::bad_request(
                "amount must not be 0",
                Some("amount"),
            ));
        }
        let reason = check_reason(&request.reason)?;
        let account = self.get_or_404(account_id).await?;
        if account.closed_at.is_some() && amount > 0 {
            return Err(ApiError::Conflict(format!(
                "The account `{account_id}` is closed: it takes no top-ups (a negative \
                 adjustment, a refund, is still taken)."
            )));
        }
        let stored = Stored {
            id: format!("cred_{}", crate::keys::random_token(20)),
            amount_micro: amount,
            reason,
            by: by.to_owned(),
            request_id: request_id.to_owned(),
            at_ms: self.now_ms(),
        };
        let json = serde_json::to_vec(&stored)
            .map_err(|err| ApiError::Internal(format!("cannot write a credit entry: {err}")))?;
        let outcome = self
            .store()
            .account_credit(account_id, amount, 0, MAX_MONEY, &json)
            .await?;
        let balance = match outcome {
            crate::store::CreditOutcome::Credited { balance } => balance,
            crate::store::CreditOutcome::Refused { balance } => {
                let message = if amount > 0 {
                    format!(
                        "A top-up of {} credits would take the balance ({}) past a billion \
                         credits.",
                        Credits(amount),
                        Credits(balance)
                    )
                } else {
                    format!(
                        "An adjustment of {} credits would take the balance ({}) below zero.",
                        Credits(amount),
                        Credits(balance)
                    )
                };
                return Err(ApiError::bad_request_code(
                    message,
                    Some("amount"),
                    "balance_out_of_range",
                ));
            }
        };
        tracing::info!(account = %account_id, amount = %Credits(amount), balance = %Credits(balance), by, "account credited");
        self.balance_moved(&account, balance.saturating_sub(amount), balance)
            .await;
        Ok(entry(stored, balance))
    }

    /// An account's credit ledger, oldest first.
    pub async fn credit_ledger(&self, account_id: &str) -> Result<Vec<CreditEntry>, ApiError> {
        self.get_or_404(account_id).await?;
        let records = self.store().account_credits(account_id).await?;
        records
            .into_iter()
            .map(|record| {
                let stored: Stored = serde_json::from_slice(&record.entry).map_err(|err| {
                    ApiError::Internal(format!("a credit entry is unreadable: {err}"))
                })?;
                Ok(entry(stored, record.balance_after))
            })
            .collect()
    }
}

fn entry(stored: Stored, balance_after: i64) -> CreditEntry {
    CreditEntry {
        id: stored.id,
        amount: Credits(stored.amount_micro),
        amount_micro: stored.amount_micro,
        reason: stored.reason,
        by: stored.by,
        request_id: stored.request_id,
        created_at_ms: stored.at_ms,
        balance_after: Credits(balance_after),
        balance_after_micro: balance_after,
    }
}
