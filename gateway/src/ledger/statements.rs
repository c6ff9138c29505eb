//! Payout statements: what one operator's line of a payout run paid for, request by request,
//! each with the rig's receipt and what the gateway made of it, so that every point paid can
//! be traced to the requests that earned it.
//!
//! A run pays the points counted since the run before it (docs/money.md), so its statement
//! lists the requests the ledger processed in that window whose awards went to the operator:
//! read from the usage export's copy of the ledger, an hour at a time, and each request's
//! receipt from its rig's statement. The points of the requests listed are the line's points
//! from requests; the rest of a line is rigs' uptime reports (not requests) and withheld
//! points taken back (docs/trust.md), which the statement says.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::payouts::{Payout, PayoutLine};
use super::{CountedBy, LedgerEntry};
use crate::backends::TrustStatus;
use crate::error::ApiError;
use crate::state::AppState;
use garage_node_protocol::ReceiptCheck;

/// Most requests one statement lists; past it, `truncated`.
pub const MAX_REQUESTS: usize = 10_000;
/// How far before the window the ledger's copy is read: a request is filed by the hour it
/// ended, and processed (awarded) seconds later, or after an outage, later still.
const PROCESSING_SLACK_MS: u64 = 3_600_000;
const MS_PER_HOUR: u64 = 3_600_000;

/// One operator's line of a payout run, and the requests behind it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct PayoutStatement {
    pub payout_id: String,
    pub operator: String,
    /// The run's window: points counted after `from_ms` (when the run before it read them,
    /// Unix milliseconds; 0 for the first run) and up to `to_ms` (when this run did).
    pub from_ms: u64,
    pub to_ms: u64,
    pub rate_per_point: f64,
    pub currency: String,
    /// The operator's line of the run; none when the run paid them nothing.
    pub line: Option<PayoutLine>,
    /// The points of the requests listed: the line's points from requests. The rest of the
    /// line is points for rigs' uptime reports, and points withheld earlier taken back.
    pub request_points: f64,
    /// The requests, oldest first, at most [`MAX_REQUESTS`].
    pub requests: Vec<StatementRequest>,
    /// More requests earned points in the window than are listed.
    pub truncated: bool,
}

/// A request that earned the operator points in a run's window.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct StatementRequest {
    pub request_id: String,
    /// The rig that served it.
    pub rig: String,
    pub model: String,
    pub batch: bool,
    /// Unix milliseconds.
    pub finished_at_ms: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// `gateway` (counted with the model's tokenizer) or `backend`.
    pub counted_by: CountedBy,
    /// The rig's trust when it served the request.
    pub trust: Option<TrustStatus>,
    /// Points awarded to the operator for it.
    pub points: f64,
    /// What the gateway made of the rig's receipt; none when the rig's statement no longer
    /// holds the request.
    pub receipt_check: Option<ReceiptCheck>,
    /// The receipt as the rig signed it.
    pub receipt: Option<String>,
}

/// The statement of `operator`'s line of payout run `payout_id`.
pub async fn statement(
    state: &AppState,
    payout_id: &str,
    operator: &str,
) -> Result<PayoutStatement, ApiError> {
    let runs = state.usage().payouts().await?;
    let Some(at) = runs.iter().position(|run| run.id == payout_id) else {
        return Err(ApiError::NotFound(format!("No payout run `{payout_id}`.")));
    };
    let run: &Payout = &runs[at];
    // Newest first: the run before it is the next one in the list.
    let from_ms = runs.get(at + 1).map_or(0, Payout::read_until_ms);
    let to_ms = run.read_until_ms();
    let mut requests = Vec::new();
    let mut truncated = false;
    let webhooks = state.webhooks();
    let first_hour = from_ms.saturating_sub(PROCESSING_SLACK_MS) / MS_PER_HOUR;
    let last_hour = to_ms / MS_PER_HOUR;
    let hours: Vec<u64> = webhooks
        .export_hours()
        .await?
        .into_iter()
        .filter(|hour| (first_hour..=last_hour).contains(hour))
        .collect();
    'hours: for hour in hours {
        let mut entries = webhooks.export_hour(hour).await?;
        entries.sort_by(|a, b| {
            (a.event.finished_at_ms, &a.event.request_id)
                .cmp(&(b.event.finished_at_ms, &b.event.request_id))
        });
        for entry in entries {
            let points = entry.points_for(operator);
            let counted_in_window =
                entry.processed_at_ms > from_ms && entry.processed_at_ms <= to_ms;
            if points == 0.0 || !counted_in_window {
                continue;
            }
            if requests.len() == MAX_REQUESTS {
                truncated = true;
                break 'hours;
            }
            requests.push(request_of(&entry, points));
        }
    }
    // Each request's receipt, from its rig's statement.
    let lookups = requests.iter().map(|request| {
        state
            .nodes()
            .statement_entry(&request.rig, &request.request_id, request.finished_at_ms)
    });
    let found = futures::future::join_all(lookups).await;
    for (request, found) in requests.iter_mut().zip(found) {
        if let Ok(Some(entry)) = found {
            request.receipt_check = Some(entry.receipt_check);
            request.receipt = entry.receipt;
        }
    }
    Ok(PayoutStatement {
        payout_id: run.id.clone(),
        operator: operator.to_owned(),
        from_ms,
        to_ms,
        rate_per_point: run.rate_per_point,
        currency: run.currency.clone(),
        line: run
            .lines
            .iter()
            .find(|line| line.operator == operator)
            .cloned(),
        request_points: requests.iter().map(|r| r.points).sum::<f64>() + 0.0,
        requests,
        truncated,
    })
}

fn request_of(entry: &LedgerEntry, points: f64) -> StatementRequest {
    let event = &entry.event;
    StatementRequest {
        request_id: event.request_id.clone(),
        rig: event.rig.clone(),
        model: event.model.clone(),
        batch: event.batch,
        finished_at_ms: event.finished_at_ms,
        prompt_tokens: event.prompt_tokens,
        completion_tokens: event.completion_tokens,
        counted_by: event.counted.by,
        trust: event.trust,
        points,
        receipt_check: None,
        receipt: None,
    }
}
