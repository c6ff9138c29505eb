//! Events and their shapes: what the gateway emits, as CloudEvents 1.0 in structured mode
//! (<https://github.com/cloudevents/spec/blob/v1.0.2/cloudevents/formats/json-format.md>).
//!
//! An event's `id` is the same however often the happening is reported (a request's id, a
//! payout run's id): it is the `webhook-id` of every delivery attempt and the CloudEvent's
//! `id`, so a receiver that keeps the ids it has seen processes each event once.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::ledger::payouts::{Payout, PayoutLine};
use crate::ledger::{CountedBy, LedgerEntry};

/// The CloudEvents `source` of every event: this gateway.
pub const SOURCE: &str = "urn:garage:gateway";

/// The kinds of event an endpoint can subscribe to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum EventKind {
    /// A metered request was charged in the usage ledger ([`UsageRecorded`]).
    #[serde(rename = "usage.recorded")]
    UsageRecorded,
    /// A payout run paid operators ([`PayoutCompleted`]).
    #[serde(rename = "payout.completed")]
    PayoutCompleted,
    /// A key's or an account's spend crossed a share of its budget ([`BudgetThreshold`]).
    #[serde(rename = "budget.threshold")]
    BudgetThreshold,
    /// An account's prepaid balance fell to or below a threshold ([`BalanceLow`]).
    #[serde(rename = "balance.low")]
    BalanceLow,
}

impl EventKind {
    pub const ALL: [EventKind; 4] = [
        EventKind::UsageRecorded,
        EventKind::PayoutCompleted,
        EventKind::BudgetThreshold,
        EventKind::BalanceLow,
    ];

    /// The name an endpoint subscribes with.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::UsageRecorded => "usage.recorded",
            EventKind::PayoutCompleted => "payout.completed",
            EventKind::BudgetThreshold => "budget.threshold",
            EventKind::BalanceLow => "balance.low",
        }
    }

    pub fn parse(name: &str) -> Option<EventKind> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == name)
    }

    /// The CloudEvents `type`: reverse-DNS, as the specification suggests.
    pub fn cloudevents_type(self) -> &'static str {
        match self {
            EventKind::UsageRecorded => "dev.garage.usage.recorded",
            EventKind::PayoutCompleted => "dev.garage.payout.completed",
            EventKind::BudgetThreshold => "dev.garage.budget.threshold",
            EventKind::BalanceLow => "dev.garage.balance.low",
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something that happened, for the endpoints subscribed to its kind.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The same for every report of one happening, unique among events (a request id, a
    /// payout id; for a budget, see [`BudgetThreshold::event_id`]): 1 to 200 visible ASCII
    /// characters, or the event is dropped (and counted as such).
    pub id: String,
    pub kind: EventKind,
    /// What it is about: a key, an account, a payout run.
    pub subject: String,
    /// The kind's data, as JSON ([`UsageRecorded`], [`PayoutCompleted`], [`BudgetThreshold`],
    /// [`BalanceLow`]).
    pub data: serde_json::Value,
    /// When it happened, Unix milliseconds.
    pub time_ms: u64,
}

impl Event {
    /// A request charged in the usage ledger. Its id is the request's id.
    pub fn usage_recorded(entry: &LedgerEntry) -> Event {
        let data = UsageRecorded::of(entry);
        Event {
            id: data.request_id.clone(),
            kind: EventKind::UsageRecorded,
            subject: data.key_id.clone(),
            time_ms: entry.processed_at_ms,
            data: to_value(&data),
        }
    }

    /// A payout run that paid someone. Its id is the run's id.
    pub fn payout_completed(payout: &Payout) -> Event {
        let data = PayoutCompleted {
            payout_id: payout.id.clone(),
            created_at: payout.created_at,
            rate_per_point: payout.rate_per_point,
            currency: payout.currency.clone(),
            lines: payout.lines.clone(),
            total_amount: payout.total_amount,
        };
        Event {
            id: payout.id.clone(),
            kind: EventKind::PayoutCompleted,
            subject: payout.id.clone(),
            time_ms: payout.created_at.saturating_mul(1000),
            data: to_value(&data),
        }
    }

    /// A budget crossed a threshold: one event per scope, period and threshold.
    pub fn budget_threshold(data: &BudgetThreshold, time_ms: u64) -> Event {
        Event {
            id: data.event_id(),
            kind: EventKind::BudgetThreshold,
            subject: data.scope_id.clone(),
            time_ms,
            data: to_value(data),
        }
    }

    /// A prepaid balance fell to a threshold: `id` says which fall (say `{account}:{top-up
    /// id}:{threshold}`, so that one fall is one event however often it is noticed).
    pub fn balance_low(id: String, data: &BalanceLow, time_ms: u64) -> Event {
        Event {
            id,
            kind: EventKind::BalanceLow,
            subject: data.account_id.clone(),
            time_ms,
            data: to_value(data),
        }
    }

    /// The event as a CloudEvent (structured mode), the body of every delivery.
    pub fn to_cloudevent(&self) -> CloudEvent {
        CloudEvent {
            specversion: "1.0".into(),
            id: self.id.clone(),
            source: SOURCE.into(),
            kind: self.kind.cloudevents_type().into(),
            time: rfc3339(self.time_ms),
            subject: self.subject.clone(),
            datacontenttype: "application/json".into(),
            data: self.data.clone(),
        }
    }
}

fn to_value(data: &impl Serialize) -> serde_json::Value {
    // Structs of strings and numbers: serializing them cannot fail.
    serde_json::to_value(data).unwrap_or_default()
}

/// A CloudEvent in structured mode, as delivered and as the usage export's JSON lines.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct CloudEvent {
    /// `1.0`.
    pub specversion: String,
    /// The event's id: the same on every retry and in every export.
    pub id: String,
    /// `urn:garage:gateway`.
    pub source: String,
    /// `dev.garage.usage.recorded`, `dev.garage.payout.completed`,
    /// `dev.garage.budget.threshold` or `dev.garage.balance.low`.
    #[serde(rename = "type")]
    pub kind: String,
    /// RFC 3339, UTC.
    pub time: String,
    pub subject: String,
    /// `application/json`.
    pub datacontenttype: String,
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
}

/// `usage.recorded`: one metered request, as the usage ledger charged it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct UsageRecorded {
    /// The request's `x-request-id` (a batch line's is `{batch id}:{line}`).
    pub request_id: String,
    pub key_id: String,
    pub model: String,
    /// From the Batch API. The ledger keeps no other route: a chat request and an embeddings
    /// request look alike here.
    pub batch: bool,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    /// `gateway` (counted with the model's tokenizer) or `backend` (reported by it, within
    /// the bounds the gateway checks).
    pub counted_by: String,
    /// Credits charged to the key (0 with no meter installed).
    pub credits: f64,
    /// The rig that served it (empty for a static upstream) and its operator.
    pub rig: String,
    pub operator: String,
    /// Unix milliseconds.
    pub started_at_ms: u64,
    pub finished_at_ms: u64,
}

impl UsageRecorded {
    pub fn of(entry: &LedgerEntry) -> UsageRecorded {
        let event = &entry.event;
        UsageRecorded {
            request_id: event.request_id.clone(),
            key_id: event.key_id.clone(),
            model: event.model.clone(),
            batch: event.batch,
            prompt_tokens: event.prompt_tokens,
            completion_tokens: event.completion_tokens,
            cached_tokens: event.cached_tokens,
            counted_by: match event.counted.by {
                CountedBy::Gateway => "gateway",
                CountedBy::Backend => "backend",
            }
            .into(),
            credits: entry.outcome.credits,
            rig: event.rig.clone(),
            operator: event.operator.clone(),
            started_at_ms: event.started_at_ms,
            finished_at_ms: event.finished_at_ms,
        }
    }
}

/// `payout.completed`: a payout run and its lines (emitted only for a run that paid someone).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct PayoutCompleted {
    pub payout_id: String,
    /// Unix seconds.
    pub created_at: u64,
    pub rate_per_point: f64,
    pub currency: String,
    pub lines: Vec<PayoutLine>,
    pub total_amount: f64,
}

/// `budget.threshold`: a key's or an account's spend crossed a share of one of its budgets.
///
/// Emit one per crossing with [`Event::budget_threshold`]: its id is made of the scope, the
/// period's start and the threshold, so noticing the same crossing twice (a retried usage
/// event, two replicas) is one event, and the next period's crossing is another.
///
/// ```
/// use garage_gateway::webhooks::{BudgetThreshold, Event};
/// let crossed = BudgetThreshold {
///     scope: "key".into(),
///     scope_id: "key_123".into(),
///     period: "month".into(),
///     period_start_ms: 1_780_272_000_000,
///     resets_at_ms: Some(1_782_864_000_000),
///     threshold_percent: 80,
///     spent: 8.2,
///     budget: 10.0,
/// };
/// let event = Event::budget_threshold(&crossed, 1_781_000_000_000);
/// assert_eq!(event.id, "budget:key:key_123:month:1780272000000:80");
/// // state.webhooks().emit(event): queued for the endpoints subscribed to `budget.threshold`.
/// ```
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct BudgetThreshold {
    /// `key` or `account`.
    pub scope: String,
    /// The key's or the account's id.
    pub scope_id: String,
    /// `day`, `week` or `month` (calendar periods in the operator's time zone), or
    /// `lifetime`.
    pub period: String,
    /// When the period began, Unix milliseconds (0 for `lifetime`).
    pub period_start_ms: u64,
    /// When it resets, Unix milliseconds; none for `lifetime`.
    pub resets_at_ms: Option<u64>,
    /// The share of the budget crossed, in percent (the operator's thresholds, e.g. 50, 80,
    /// 100).
    pub threshold_percent: u32,
    /// Credits spent in the period when it was noticed.
    pub spent: f64,
    /// The period's budget, in credits.
    pub budget: f64,
}

impl BudgetThreshold {
    /// `budget:{scope}:{scope id}:{period}:{period start ms}:{threshold}`.
    pub fn event_id(&self) -> String {
        format!(
            "budget:{}:{}:{}:{}:{}",
            self.scope, self.scope_id, self.period, self.period_start_ms, self.threshold_percent
        )
    }
}

/// `balance.low`: an account's prepaid balance fell to or below a threshold the operator set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct BalanceLow {
    pub account_id: String,
    /// Credits left when it was noticed.
    pub balance: f64,
    /// The threshold crossed, in credits.
    pub threshold: f64,
}

/// A Unix time in milliseconds as RFC 3339 in UTC, to the millisecond:
/// `2026-11-22T06:40:44.041Z`.
pub fn rfc3339(unix_ms: u64) -> String {
    let day = crate::ledger::day_of(unix_ms);
    let in_day = unix_ms % 86_400_000;
    let (h, m, s, ms) = (
        in_day / 3_600_000,
        in_day / 60_000 % 60,
        in_day / 1000 % 60,
        in_day % 1000,
    );
    format!("{day}T{h:02}:{m:02}:{s:02}.{ms:03}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_329_644_041), "2026-11-22T06:40:44.041Z");
        assert_eq!(rfc3339(951_868_799_999), "2000-02-29T23:59:59.999Z");
    }

    #[test]
    fn kinds_parse_back_and_serialize_as_their_names() {
        for kind in EventKind::ALL {
            assert_eq!(EventKind::parse(kind.as_str()), Some(kind));
            assert_eq!(
                serde_json::to_value(kind).unwrap(),
                serde_json::json!(kind.as_str())
            );
            assert!(kind.cloudevents_type().ends_with(kind.as_str()));
        }
        assert_eq!(EventKind::parse("usage.*"), None);
    }

    #[test]
    fn a_cloudevent_has_every_required_attribute() {
        let event = Event {
            id: "evt-1".into(),
            kind: EventKind::UsageRecorded,
            subject: "key_1".into(),
            data: serde_json::json!({"a": 1}),
            time_ms: 0,
        };
        let json = serde_json::to_value(event.to_cloudevent()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "specversion": "1.0",
                "id": "evt-1",
                "source": SOURCE,
                "type": "dev.garage.usage.recorded",
                "time": "1970-01-01T00:00:00.000Z",
                "subject": "key_1",
                "datacontenttype": "application/json",
                "data": {"a": 1},
            })
        );
    }
}
