//! Payouts: a run closes what rig operators earned since the last run and turns their points
//! into money at the rate the gateway's operator gives it, one line per operator.
//!
//! A line pays the operator's points not yet paid: their points now (withheld ones already
//! taken out, docs/trust.md) less everything earlier runs paid them, kept in a counter per
//! operator. So a run twice pays once, and a second run pays only what was earned in between.
//! One run at a time, on any replica (a lock in the store: 409 for another meanwhile); the
//! counters move before the run's record is written, so a crash between the two can lose a
//! run's record but never pays a point twice. `Idempotency-Key` on the run returns the first
//! run's answer to a retry.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{MICRO, Usage};
use crate::error::ApiError;
use crate::store::keyspace::{PAYOUT_LOCK, PAYOUTS, operator_points_paid};
use crate::store::read_counter;

/// How long a run may hold the lock (it takes a store round trip per operator).
const LOCK: Duration = Duration::from_secs(120);

/// `POST /admin/payouts` body.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PayoutRequest {
    /// Money per point, as the gateway's operator pays it (e.g. `0.01`).
    pub rate_per_point: f64,
    /// The money's unit, for the statement (`USD`, `EUR`, `credits`…); default `credits`.
    #[serde(default = "default_currency")]
    pub currency: String,
}

fn default_currency() -> String {
    "credits".into()
}

/// One operator's line of a payout.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct PayoutLine {
    pub operator: String,
    /// Points paid by this line: earned since the last run, withheld ones not included.
    pub points: f64,
    /// `points × rate_per_point`.
    pub amount: f64,
    /// The operator's points withheld from quarantined rigs, in all (not paid).
    pub withheld_points: f64,
}

/// A payout run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Payout {
    pub id: String,
    /// Unix seconds.
    pub created_at: u64,
    /// The points counted up to this time (Unix milliseconds, when the run read them) are
    /// what it paid: the end of its statements' window. None for runs before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counted_until_ms: Option<u64>,
    pub rate_per_point: f64,
    pub currency: String,
    /// Operators with points to pay; none when nobody earned since the last run.
    pub lines: Vec<PayoutLine>,
    pub total_amount: f64,
}

impl Payout {
    /// When the run read the points it paid (Unix milliseconds): the end of its statements'
    /// window. Runs from before `counted_until_ms` was recorded: the end of their second.
    pub fn read_until_ms(&self) -> u64 {
        self.counted_until_ms
            .unwrap_or_else(|| self.created_at.saturating_mul(1000) + 999)
    }
}

impl Usage {
    /// Runs a payout: pays every operator their points not paid yet.
    pub async fn run_payout(&self, request: PayoutRequest) -> Result<Payout, ApiError> {
        if !(request.rate_per_point.is_finite() && request.rate_per_point > 0.0) {
            return Err(ApiError::bad_request(
                "rate_per_point must be a number above 0.",
                Some("rate_per_point"),
            ));
        }
        let currency = request.currency.trim().to_owned();
        if currency.is_empty()
            || currency.len() > 16
            || !currency.chars().all(|c| c.is_ascii_alphanumeric())
        {
            return Err(ApiError::bad_request(
                "currency must be 1 to 16 letters or digits.",
                Some("currency"),
            ));
        }
        let store = self.store.as_ref();
        if store.kv_incr(PAYOUT_LOCK, 1, Some(LOCK)).await? > 1 {
            return Err(ApiError::Conflict(
                "A payout run is in progress; retry when it ends.".into(),
            ));
        }
        let result = self.pay(request.rate_per_point, currency).await;
        if let Err(err) = store.kv_delete(PAYOUT_LOCK).await {
            tracing::warn!(error = %err, "cannot release the payout lock; it runs out by itself");
        }
        result
    }

    async fn pay(&self, rate: f64, currency: String) -> Result<Payout, ApiError> {
        let store = self.store.as_ref();
        let mut lines = Vec::new();
        let counted_until_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        for standing in self.leaderboard().await? {
            let points = (standing.points * MICRO).round() as i64;
            let paid_key = operator_points_paid(&standing.operator);
            let paid = read_counter(store, &paid_key).await?;
            let due = points - paid;
            if due <= 0 {
                continue;
            }
            store.kv_incr(&paid_key, due, None).await?;
            let points = due as f64 / MICRO;
            lines.push(PayoutLine {
                operator: standing.operator,
                points,
                amount: points * rate,
                withheld_points: standing.withheld_points,
            });
        }
        let payout = Payout {
            id: format!("payout_{}", crate::keys::random_token(16)),
            created_at: crate::keys::unix_now(),
            counted_until_ms: Some(counted_until_ms),
            rate_per_point: rate,
            currency,
            total_amount: lines.iter().map(|l| l.amount).sum::<f64>() + 0.0,
            lines,
        };
        let json = serde_json::to_vec(&payout)
            .map_err(|err| ApiError::Internal(format!("cannot write a payout: {err}")))?;
        store.record_put(PAYOUTS, &payout.id, &json).await?;
        tracing::info!(payout = %payout.id, lines = payout.lines.len(), total = payout.total_amount, "payout run");
        Ok(payout)
    }

    /// Every payout run, newest first.
    pub async fn payouts(&self) -> Result<Vec<Payout>, ApiError> {
        let mut payouts: Vec<Payout> = self
            .store
            .record_list(PAYOUTS)
            .await?
            .iter()
            .filter_map(|bytes| serde_json::from_slice(bytes).ok())
            .collect();
        // By when each run read the points, to the millisecond: `created_at` is in seconds, and
        // two runs within one second were ordered by their random ids (a statement then took
        // the later run for the earlier one and listed requests already paid).
        payouts.sort_by(|a, b| {
            (b.read_until_ms(), b.created_at, &b.id).cmp(&(a.read_until_ms(), a.created_at, &a.id))
        });
        Ok(payouts)
    }

    pub async fn payout(&self, id: &str) -> Result<Payout, ApiError> {
        let bytes = self
            .store
            .record_get(PAYOUTS, id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("No payout with id `{id}`.")))?;
        serde_json::from_slice(&bytes)
            .map_err(|err| ApiError::Internal(format!("an unreadable payout: {err}")))
    }
}

/// A CSV field: quoted when it holds a comma, a quote or a line break, and defused when a
/// spreadsheet would read it as a formula.
pub fn csv_field(value: &str) -> String {
    let value = if value.starts_with(['=', '+', '-', '@']) {
        format!("'{value}")
    } else {
        value.to_owned()
    };
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value
    }
}

/// A payout as CSV: one line per operator (see [`csv_field`]).
pub fn csv(payout: &Payout) -> String {
    let mut out = String::from(
        "payout_id,created_at,operator,points,rate_per_point,amount,currency,withheld_points\n",
    );
    for line in &payout.lines {
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{}\n",
            csv_field(&payout.id),
            payout.created_at,
            csv_field(&line.operator),
            line.points,
            payout.rate_per_point,
            line.amount,
            csv_field(&payout.currency),
            line.withheld_points
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_and_defused() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=cmd()"), "'=cmd()");
    }
}
