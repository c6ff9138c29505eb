//! Usage events: recorded when a request ends, queued durably in the store, then metered and
//! rewarded off the hot path into append-only ledgers.
//!
//! - **Durable**: an event is written to the store's `usage_queue` (a work queue, in batches:
//!   one round trip for many requests) before anything else happens to it. While the store is
//!   unreachable, events wait in memory and are retried.
//! - **At least once, charged once**: a worker leases events (a worker that dies mid-way loses
//!   its lease and another takes the events over), and the ledger is keyed by request id, so an
//!   event processed twice is charged and rewarded once. The meter keeps its own mark of each
//!   request it charged (the event can reach it again when the reward plugin, or the meter
//!   itself, fails after the charge); on the embedded store the ledger drops that mark once the
//!   request's entry is written, so the marks held are those of events in flight.
//! - **Replayable**: the ledger keeps each event with what was charged and awarded for it. It is
//!   the record; the per-day and per-operator counters are a view of it, updated once per
//!   leased batch of events (a crash between a batch's ledger writes and its counter update
//!   leaves the counters short by that batch, never counts anything twice). On the embedded
//!   store the ledger keeps the newest `usage.ledger_max_entries` entries; the counters go on.
//!
//! With the embedded store ([`Usage::in_process`]) events go from memory straight to the worker:
//! there, the store's queue would be a second in-memory copy, bought with encoding, storing,
//! leasing, decoding and acknowledging every event (about a fifth of the gateway's instructions
//! per request, measured with `bench/`), and what it gives a Redis deployment (events that
//! outlive a crash, a lease another replica takes over) does not exist in one process.

pub mod alerts;
pub mod api;
pub mod billing;
pub mod payouts;
pub mod statements;
pub mod tokens;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::backends::TrustStatus;
use crate::store::{QueueItem, Store, StoreError, read_counter};

/// Aborts a task when dropped (the worker's flusher goes with the worker).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Record kind of the ledger: one entry per request, keyed by its request id.
pub use crate::store::keyspace::USAGE_LEDGER as LEDGER;
use crate::store::keyspace::{
    REWARD_OPERATOR_INDEX as OPERATOR_INDEX, USAGE_DAILY_INDEX as DAILY_INDEX,
    USAGE_QUEUE as QUEUE, WITHHELD, awarded, meter_charged_into, operator_points,
    operator_points_day, unconfirmed_points, usage_counter, withheld_points,
};
/// How long a worker owns an event it claimed. Meter and reward calls take milliseconds; a
/// claim older than this belongs to a worker that died.
const CLAIM_LEASE: Duration = Duration::from_secs(30);
/// Credits and points are kept as integer millionths in counters, so that concurrent workers
/// on several replicas add them up atomically.
const MICRO: f64 = 1_000_000.0;
/// Events kept in memory while the store is down. Past this the oldest are dropped (and
/// counted): bounded memory beats an out-of-memory crash that would lose them all.
const PENDING_CAP: usize = 100_000;

/// A finished request, as metering and rewards see it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct UsageEvent {
    pub request_id: String,
    pub key_id: String,
    pub model: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cached_tokens: u64,
    pub latency_ms: u64,
    pub ttft_ms: u64,
    /// Backend id that served it.
    pub backend: String,
    /// Node id of the rig that served it; empty for static upstreams.
    pub rig: String,
    /// Operator of that rig; empty for static upstreams.
    pub operator: String,
    pub started_at_ms: u64,
    pub finished_at_ms: u64,
    /// From the Batch API.
    pub batch: bool,
    /// Who counted the tokens billed.
    #[serde(default)]
    pub counted: Counted,
    /// The rig's trust when it served the request; none for a static upstream (the operator's
    /// own) or an entry written before trust was recorded.
    #[serde(default)]
    pub trust: Option<TrustStatus>,
    /// The price the meter quoted at admission, which the request is charged; none when the
    /// meter quoted nothing (or for an entry written before prices were quoted).
    #[serde(default)]
    pub price: Option<crate::plugins::Price>,
}

/// Who counted the tokens of a request (see [`tokens`]).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Counted {
    pub by: CountedBy,
    /// With `by: gateway`: what the backend reported (nothing, for a stream cut short).
    pub reported_prompt_tokens: Option<u64>,
    pub reported_completion_tokens: Option<u64>,
    /// With `by: gateway`: the backend's report agreed with the count, within the tolerance.
    pub agreed: bool,
}

/// Who counted the tokens billed.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CountedBy {
    /// The backend, within the bounds the gateway checks (no tokenizer for the model), or the
    /// gateway's estimate of a stream cut short.
    #[default]
    Backend,
    /// The gateway, with the model's tokenizer: what is billed.
    Gateway,
}

const MS_PER_DAY: u64 = 86_400_000;

/// `YYYY-MM-DD` of a Unix time in milliseconds (civil-from-days, proleptic Gregorian).
pub fn day_of(unix_ms: u64) -> String {
    let days = (unix_ms / MS_PER_DAY) as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Points for an operator.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Award {
    pub operator: String,
    pub points: f64,
    pub reason: String,
}

/// What metering and rewards made of an event.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Outcome {
    /// Credits charged to the key (0 when no meter is installed).
    pub credits: f64,
    /// The key's budget is spent.
    pub budget_exhausted: bool,
    pub awards: Vec<Award>,
}

/// Turns an event into an outcome: the meter and reward plugins, in the gateway.
#[async_trait]
pub trait UsageProcessor: Send + Sync {
    /// `Err` leaves the event queued, to be retried (a faulting plugin).
    async fn process(&self, event: &UsageEvent) -> Result<Outcome, String>;

    /// The outcomes of a batch of events, in order. By default [`process`](Self::process) of
    /// each, up to [`EVENTS_IN_FLIGHT`] at once (a meter waiting on its store is not waited for
    /// one event at a time); a processor that can take many events in one go does.
    async fn process_many(&self, events: &[&UsageEvent]) -> Vec<Result<Outcome, String>> {
        use futures::StreamExt;
        let calls: Vec<_> = events.iter().map(|event| self.process(event)).collect();
        futures::stream::iter(calls)
            .buffered(EVENTS_IN_FLIGHT)
            .collect()
            .await
    }

    /// Whether every event's outcome is `Outcome::default()` right now (no meter and no
    /// reward installed), so that the worker need not ask for each one.
    fn is_idle(&self) -> bool {
        false
    }
}

/// Told of ledger entries once they are written (webhooks, the usage export).
#[async_trait]
pub trait LedgerObserver: Send + Sync {
    /// `entries` were just written. `replayed` are request ids whose event came again though
    /// the ledger had their entry (a worker stopped after writing it, before it told anyone):
    /// an observer that must see every entry reads those. An error leaves the events queued
    /// (on a shared store), to come again as `replayed`.
    async fn recorded(&self, entries: &[&LedgerEntry], replayed: &[&str])
    -> Result<(), StoreError>;
}

/// The ledger entry of one request: append-only, keyed by request id.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct LedgerEntry {
    pub event: UsageEvent,
    pub outcome: Outcome,
    /// Unix milliseconds.
    pub processed_at_ms: u64,
}

/// First byte of a ledger entry stored in the compact encoding: postcard (the fields in
/// declaration order, integers as varints, strings as length and bytes), about a third of the
/// JSON's size and a tenth of its cost to write. Entries written as JSON by earlier versions
/// start with `{` and still read. Postcard carries no field names: a change to the fields of
/// [`LedgerEntry`], [`UsageEvent`], [`Outcome`] or [`Award`] needs a new version byte (a test
/// pins the encoding, so such a change cannot go unnoticed).
const LEDGER_POSTCARD_V1: u8 = 1;
/// Version 2: [`UsageEvent::counted`] added.
const LEDGER_POSTCARD_V2: u8 = 2;
/// Version 3: [`UsageEvent::trust`] added.
const LEDGER_POSTCARD_V3: u8 = 3;
/// Version 4: [`UsageEvent::price`] added.
const LEDGER_POSTCARD_V4: u8 = 4;

impl LedgerEntry {
    /// The points the entry's awards gave `operator` (0, not -0, for none).
    pub fn points_for(&self, operator: &str) -> f64 {
        self.outcome
            .awards
            .iter()
            .filter(|award| award.operator == operator)
            .map(|award| award.points)
            .sum::<f64>()
            + 0.0
    }

    /// The entry as the store keeps it.
    pub fn encode(&self) -> Result<Vec<u8>, StoreError> {
        let mut buf = Vec::with_capacity(LEDGER_ENTRY_BYTES);
        buf.push(LEDGER_POSTCARD_V4);
        postcard::to_extend(self, buf).map_err(corrupt)
    }

    /// An entry as the store keeps it: compact, or JSON from an earlier version.
    pub fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        match bytes.split_first() {
            Some((&LEDGER_POSTCARD_V4, rest)) => postcard::from_bytes(rest).map_err(corrupt),
            Some((&LEDGER_POSTCARD_V3, rest)) => postcard::from_bytes::<older::V3Entry>(rest)
                .map(Into::into)
                .map_err(corrupt),
            Some((&LEDGER_POSTCARD_V2, rest)) => postcard::from_bytes::<older::V2Entry>(rest)
                .map(Into::into)
                .map_err(corrupt),
            Some((&LEDGER_POSTCARD_V1, rest)) => postcard::from_bytes::<older::V1Entry>(rest)
                .map(Into::into)
                .map_err(corrupt),
            Some((b'{', _)) => serde_json::from_slice(bytes).map_err(corrupt),
            _ => Err(StoreError::Corrupt(
                "ledger entry in an unknown encoding".to_owned(),
            )),
        }
    }
}

/// The layouts of earlier compact entries, to read them: version 1 (before
/// [`UsageEvent::counted`]), version 2 (before [`UsageEvent::trust`]) and version 3 (before
/// [`UsageEvent::price`]).
mod older {
    use serde::Deserialize;

    /// The fields every version has, in their order.
    #[derive(Deserialize)]
    struct Served {
        request_id: String,
        key_id: String,
        model: String,
        prompt_tokens: u64,
        completion_tokens: u64,
        cached_tokens: u64,
        latency_ms: u64,
        ttft_ms: u64,
        backend: String,
        rig: String,
        operator: String,
        started_at_ms: u64,
        finished_at_ms: u64,
        batch: bool,
    }

    impl Served {
        fn into_event(
            self,
            counted: super::Counted,
            trust: Option<super::TrustStatus>,
        ) -> super::UsageEvent {
            super::UsageEvent {
                request_id: self.request_id,
                key_id: self.key_id,
                model: self.model,
                prompt_tokens: self.prompt_tokens,
                completion_tokens: self.completion_tokens,
                cached_tokens: self.cached_tokens,
                latency_ms: self.latency_ms,
                ttft_ms: self.ttft_ms,
                backend: self.backend,
                rig: self.rig,
                operator: self.operator,
                started_at_ms: self.started_at_ms,
                finished_at_ms: self.finished_at_ms,
                batch: self.batch,
                counted,
                trust,
                price: None,
            }
        }
    }

    #[derive(Deserialize)]
    pub struct V1Entry {
        event: Served,
        outcome: super::Outcome,
        processed_at_ms: u64,
    }

    /// Postcard puts a struct's fields one after the other with nothing around them, so
    /// `counted` beside the event reads what version 2 wrote as the event's last field.
    #[derive(Deserialize)]
    pub struct V2Entry {
        event: Served,
        counted: super::Counted,
        outcome: super::Outcome,
        processed_at_ms: u64,
    }

    /// Version 3: the event's fields up to its trust.
    #[derive(Deserialize)]
    pub struct V3Entry {
        event: Served,
        counted: super::Counted,
        trust: Option<super::TrustStatus>,
        outcome: super::Outcome,
        processed_at_ms: u64,
    }

    impl From<V3Entry> for super::LedgerEntry {
        fn from(old: V3Entry) -> Self {
            super::LedgerEntry {
                event: old.event.into_event(old.counted, old.trust),
                outcome: old.outcome,
                processed_at_ms: old.processed_at_ms,
            }
        }
    }

    impl From<V1Entry> for super::LedgerEntry {
        fn from(old: V1Entry) -> Self {
            super::LedgerEntry {
                event: old.event.into_event(super::Counted::default(), None),
                outcome: old.outcome,
                processed_at_ms: old.processed_at_ms,
            }
        }
    }

    impl From<V2Entry> for super::LedgerEntry {
        fn from(old: V2Entry) -> Self {
            super::LedgerEntry {
                event: old.event.into_event(old.counted, None),
                outcome: old.outcome,
                processed_at_ms: old.processed_at_ms,
            }
        }
    }
}

/// Counter updates gathered over a batch of events, borrowing from them: the counter names are
/// formatted once per counter, not once per event.
#[derive(Default)]
struct Totals<'a> {
    /// By key, model and day (days since the Unix epoch, UTC).
    slots: std::collections::BTreeMap<(&'a str, &'a str, u64), SlotSums>,
    /// By operator.
    points_micro: std::collections::BTreeMap<&'a str, i64>,
    /// By operator and day (days since the Unix epoch, UTC).
    day_points_micro: std::collections::BTreeMap<(&'a str, u64), i64>,
    /// By rig: what its operator was awarded for its requests, unconfirmed until it passes a
    /// spot check.
    rig_points_micro: std::collections::BTreeMap<&'a str, i64>,
}

#[derive(Default)]
struct SlotSums {
    requests: i64,
    prompt_tokens: i64,
    completion_tokens: i64,
    credits_micro: i64,
}

impl<'a> Totals<'a> {
    fn add(&mut self, event: &'a UsageEvent, outcome: &'a Outcome) {
        let day = event.finished_at_ms / MS_PER_DAY;
        let sums = self
            .slots
            .entry((&event.key_id, &event.model, day))
            .or_default();
        // Saturating, every one: the counts come from backends and the amounts from plugins,
        // and a sum that wraps turns a huge charge into a credit.
        sums.requests = sums.requests.saturating_add(1);
        sums.prompt_tokens = sums
            .prompt_tokens
            .saturating_add(to_i64(event.prompt_tokens));
        sums.completion_tokens = sums
            .completion_tokens
            .saturating_add(to_i64(event.completion_tokens));
        sums.credits_micro = sums.credits_micro.saturating_add(micro(outcome.credits));
        for award in &outcome.awards {
            if !award.operator.is_empty() {
                let points = self.points_micro.entry(&award.operator).or_default();
                *points = points.saturating_add(micro(award.points));
                let points = self
                    .day_points_micro
                    .entry((&award.operator, day))
                    .or_default();
                *points = points.saturating_add(micro(award.points));
                if !event.rig.is_empty() && award.operator == event.operator {
                    let points = self.rig_points_micro.entry(&event.rig).or_default();
                    *points = points.saturating_add(micro(award.points));
                }
            }
        }
    }
}

/// A count as a counter increment, saturating instead of wrapping to a negative.
fn to_i64(count: u64) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

/// An amount in millionths. A float to integer cast saturates (and NaN is 0); the plugin host
/// refuses negative and non-finite amounts before they get here.
fn micro(amount: f64) -> i64 {
    (amount * MICRO) as i64
}

/// Usage of one key for one model on one day.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct DailyUsage {
    pub key_id: String,
    pub model: String,
    /// `YYYY-MM-DD`, UTC.
    pub day: String,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub credits: f64,
}

/// An operator's standing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct OperatorPoints {
    pub operator: String,
    pub points: f64,
    /// Points withheld from its rigs that were quarantined (not in `points`).
    pub withheld_points: f64,
}

/// Points withheld from a quarantined rig: the awards for its requests since it last passed a
/// spot check, taken out of its operator's points and kept apart (see docs/trust.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Withheld {
    pub rig: String,
    pub operator: String,
    pub points: f64,
    pub reason: String,
    /// Unix milliseconds.
    pub at_ms: u64,
}

/// The rig passed a spot check: what its operator was awarded so far stands.
pub async fn confirm_points(store: &dyn Store, rig: &str) -> Result<(), StoreError> {
    store.kv_delete(&unconfirmed_points(rig)).await
}

/// The rig was quarantined: withholds its operator's points for its requests since it last
/// passed a spot check (out of `points`, into `withheld_points`, with a record of why).
pub async fn withhold_points(
    store: &dyn Store,
    rig: &str,
    operator: &str,
    reason: &str,
) -> Result<f64, StoreError> {
    let unconfirmed = read_counter(store, &unconfirmed_points(rig)).await?;
    if unconfirmed <= 0 {
        return Ok(0.0);
    }
    // Moved before it is cleared: a crash in between withholds twice from `points` at worst,
    // never pays what a quarantined rig earned.
    store
        .kv_incr(&operator_points(operator), -unconfirmed, None)
        .await?;
    store
        .kv_incr(&withheld_points(operator), unconfirmed, None)
        .await?;
    store
        .kv_incr(&unconfirmed_points(rig), -unconfirmed, None)
        .await?;
    let at_ms = now_ms();
    let record = Withheld {
        rig: rig.to_owned(),
        operator: operator.to_owned(),
        points: unconfirmed as f64 / MICRO,
        reason: reason.to_owned(),
        at_ms,
    };
    store
        .record_put(
            WITHHELD,
            &format!("{rig}:{at_ms}"),
            &serde_json::to_vec(&record).map_err(corrupt)?,
        )
        .await?;
    Ok(record.points)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Events handled between two yields to the scheduler. A batch of events is CPU work that
/// never waits (with the embedded store nothing does): done in one go, a few hundred events
/// would hold a worker thread for a millisecond or more while requests wait behind it.
const EVENTS_PER_YIELD: usize = 16;

/// Events of a batch being processed at once. A meter or reward plugin on a Redis store waits
/// for a round trip per key-value operation, a few per event: one at a time, a worker processed
/// 265 events a second while the gateway served 6,700 requests a second (bench/run.sh with
/// BENCH_STORE=redis), and the queue, with the budgets it enforces, fell further behind every
/// second. Calls in flight at once each hold a plugin instance.
const EVENTS_IN_FLIGHT: usize = 16;

/// Yields to the scheduler before every [`EVENTS_PER_YIELD`]th event but the first.
async fn yield_now_and_then(i: usize) {
    if i > 0 && i.is_multiple_of(EVENTS_PER_YIELD) {
        tokio::task::yield_now().await;
    }
}

fn corrupt(err: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(err.to_string())
}

/// Records usage events and works the queue.
pub struct Usage {
    store: Arc<dyn Store>,
    /// The worker takes events from `pending` itself; the store's queue is not used.
    in_process: bool,
    /// Events not yet in the store's queue: just recorded, or held while the store is down.
    /// In process: every event not yet taken by the worker.
    pending: Mutex<VecDeque<UsageEvent>>,
    /// Wakes the flusher: events are pending.
    flush_wake: tokio::sync::Notify,
    /// Wakes the worker: events were queued.
    wake: tokio::sync::Notify,
    dropped: std::sync::atomic::AtomicU64,
    /// The last flush failed (logged once per outage, not per retry).
    store_down: std::sync::atomic::AtomicBool,
    /// The worker stops after the batch in hand (a gateway shutting down).
    stopping: std::sync::atomic::AtomicBool,
    /// Held through a flush: events taken from `pending` are in no one else's sight until
    /// they are in the store's queue (or back in `pending`).
    flushing: tokio::sync::Mutex<()>,
    /// `garage_usage_corrections_total{kind}`: reported usage the gateway did not believe, and
    /// requests billed on an estimate (see [`crate::ledger::billing`]).
    corrections: prometheus::IntCounterVec,
    /// Requests whose tokens the gateway counted, by whether the backend's report agreed.
    checks: prometheus::IntCounterVec,
    /// When a correction was last logged: a rig that misreports every answer logs once a
    /// second, the counter counts them all.
    last_correction_log: Mutex<Option<std::time::Instant>>,
    /// Told of every entry written ([`Usage::observe`]).
    observer: std::sync::OnceLock<Arc<dyn LedgerObserver>>,
}

/// Room for a typical encoded ledger entry (about 150 bytes), so that encoding one allocates
/// once.
const LEDGER_ENTRY_BYTES: usize = 256;

/// Events written to the store's queue per call, and leased per call: one round trip for many
/// requests' events.
const FLUSH_BATCH: usize = 512;
const LEASE_BATCH: usize = 128;
/// How long the flusher lets events gather before writing them: a bound on how late an event
/// reaches the store, and what makes a busy gateway write many events per round trip (at
/// 10,000 requests/s, about 50).
const FLUSH_WINDOW: Duration = Duration::from_millis(5);

/// An event in the worker's hands, and where it came from.
struct Taken {
    /// Id of the store's queue item (acknowledged or released by it); `None` in process.
    lease: Option<String>,
    event: UsageEvent,
}

impl Usage {
    /// Events go through the store's queue: durable with Redis, shared by every replica.
    pub fn new(store: Arc<dyn Store>) -> Arc<Self> {
        Self::build(store, false)
    }

    /// Events go from memory straight to the worker, for a store that lives in this process
    /// (see the module's documentation). Nothing is dropped while the worker is behind: the
    /// embedded store's queue did not drop either.
    pub fn in_process(store: Arc<dyn Store>) -> Arc<Self> {
        Self::build(store, true)
    }

    fn build(store: Arc<dyn Store>, in_process: bool) -> Arc<Self> {
        Arc::new(Usage {
            store,
            in_process,
            pending: Mutex::new(VecDeque::new()),
            flush_wake: tokio::sync::Notify::new(),
            wake: tokio::sync::Notify::new(),
            dropped: std::sync::atomic::AtomicU64::new(0),
            store_down: std::sync::atomic::AtomicBool::new(false),
            stopping: std::sync::atomic::AtomicBool::new(false),
            flushing: tokio::sync::Mutex::new(()),
            corrections: prometheus::IntCounterVec::new(
                prometheus::Opts::new(
                    "garage_usage_corrections_total",
                    "Usage the gateway billed otherwise than reported, by kind \
                     (prompt_over_request, completion_over_max_tokens, completion_over_output, \
                     completion_under_output; estimated: nothing reported; disputed: unlike the \
                     gateway's count)",
                ),
                &["kind"],
            )
            .unwrap_or_else(|e| unreachable!("static metric definition: {e}")),
            checks: prometheus::IntCounterVec::new(
                prometheus::Opts::new(
                    "garage_usage_checks_total",
                    "Requests whose tokens the gateway counted with the model's tokenizer, by \
                     whether the backend's report agreed (agreed, disputed, unreported)",
                ),
                &["outcome"],
            )
            .unwrap_or_else(|e| unreachable!("static metric definition: {e}")),
            last_correction_log: Mutex::new(None),
            observer: std::sync::OnceLock::new(),
        })
    }

    /// Tells `observer` of every entry written from now on (one observer; a second is
    /// ignored).
    pub fn observe(&self, observer: Arc<dyn LedgerObserver>) {
        let _ = self.observer.set(observer);
    }

    /// The metrics this registers.
    pub fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.corrections.clone()),
            Box::new(self.checks.clone()),
        ]
    }

    /// Counts a request whose tokens the gateway counted.
    pub fn note_check(&self, counted: &Counted) {
        let outcome = match counted {
            Counted {
                by: CountedBy::Backend,
                ..
            } => return,
            Counted {
                reported_completion_tokens: None,
                ..
            } => "unreported",
            Counted { agreed: true, .. } => "agreed",
            Counted { agreed: false, .. } => "disputed",
        };
        self.checks.with_label_values(&[outcome]).inc();
    }

    /// Counts the corrections made to one request's reported usage, and logs the anomalies
    /// (at most one line a second).
    pub fn note_corrections(
        &self,
        corrections: &[crate::ledger::billing::Correction],
        backend: &str,
        request_id: &str,
        reported: Option<billing::Usage>,
        billed: billing::Usage,
    ) {
        if corrections.is_empty() {
            return;
        }
        for correction in corrections {
            self.corrections
                .with_label_values(&[correction.as_str()])
                .inc();
        }
        let Some(anomaly) = corrections.iter().find(|c| c.is_anomaly()) else {
            return;
        };
        let now = std::time::Instant::now();
        {
            let mut last = self
                .last_correction_log
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|at| now.duration_since(at) < Duration::from_secs(1)) {
                return;
            }
            *last = Some(now);
        }
        let reported = reported.unwrap_or_default();
        tracing::warn!(
            backend,
            request_id,
            kind = anomaly.as_str(),
            reported_prompt = reported.prompt_tokens,
            reported_completion = reported.completion_tokens,
            billed_prompt = billed.prompt_tokens,
            billed_completion = billed.completion_tokens,
            "usage reported by a backend is not what it served; billed what the gateway can check"
        );
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, VecDeque<UsageEvent>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues an event; never blocks the request that produced it. The flusher writes it to
    /// the store's queue within [`FLUSH_WINDOW`], together with whatever else arrived
    /// meanwhile.
    pub fn record(&self, event: UsageEvent) {
        // The first event of a batch wakes the flusher; the others ride along.
        if self.hold(event) == 1 {
            self.flush_wake.notify_one();
        }
    }

    /// Holds an event for the flusher; returns how many are held now.
    fn hold(&self, event: UsageEvent) -> usize {
        let mut pending = self.pending();
        if !self.in_process && pending.len() >= PENDING_CAP {
            pending.pop_front();
            self.dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        pending.push_back(event);
        pending.len()
    }

    /// Writes pending events to the store's queue, in batches; on a store error they stay
    /// pending (in order) and the error is returned. The flusher calls it; so does a gateway
    /// shutting down, for the events the flusher has not written yet. In process, the events
    /// stay where the worker takes them; returns how many wait there.
    pub async fn flush(&self) -> Result<usize, StoreError> {
        if self.in_process {
            return Ok(self.pending_len());
        }
        // One flush at a time: a shutdown's flush waits for the flusher's batch to be written.
        let _flushing = self.flushing.lock().await;
        let mut flushed = 0;
        loop {
            let batch: Vec<UsageEvent> = {
                let mut pending = self.pending();
                let n = pending.len().min(FLUSH_BATCH);
                pending.drain(..n).collect()
            };
            if batch.is_empty() {
                return Ok(flushed);
            }
            let mut items = Vec::with_capacity(batch.len());
            for (i, event) in batch.iter().enumerate() {
                yield_now_and_then(i).await;
                items.push(QueueItem {
                    id: event.request_id.clone(),
                    payload: serde_json::to_vec(event).map_err(corrupt)?,
                });
            }
            if let Err(err) = self.store.queue_push(QUEUE, &items).await {
                let mut pending = self.pending();
                for event in batch.into_iter().rev() {
                    pending.push_front(event);
                }
                return Err(err);
            }
            flushed += batch.len();
        }
    }

    /// Events waiting in memory for the store (just recorded, or held through an outage).
    pub fn pending_len(&self) -> usize {
        self.pending().len()
    }

    /// Events in the store's queue, not yet processed (in process: waiting in memory).
    pub async fn queued_len(&self) -> Result<usize, StoreError> {
        if self.in_process {
            return Ok(self.pending_len());
        }
        let counts = self.store.queue_counts(QUEUE).await?;
        Ok((counts.waiting + counts.leased) as usize)
    }

    /// Works the queue forever: a flusher writes recorded events to the store, a worker leases
    /// and processes them.
    pub async fn run_worker(self: Arc<Self>, processor: Arc<dyn UsageProcessor>) {
        let mut flusher = AbortOnDrop(tokio::spawn(Arc::clone(&self).run_flusher()));
        while !self.is_stopping() {
            let worked = match self.process_queued(processor.as_ref()).await {
                Ok(n) => n,
                Err(err) => {
                    tracing::warn!(error = %err, "usage queue unavailable; retrying");
                    0
                }
            };
            if worked == 0 {
                // Idle: wait for a new event, or poll now and then for events other replicas
                // queued or leases that expired.
                let _ =
                    tokio::time::timeout(Duration::from_millis(500), self.wake.notified()).await;
            }
        }
        // Stopped: the flusher goes too, but not in the middle of a flush (the events it took
        // from `pending` would be lost with it). Holding the flush lock keeps it out of one.
        let _flushing = self.flushing.lock().await;
        flusher.0.abort();
        let _ = (&mut flusher.0).await;
    }

    /// Asks the worker to stop once the batch in hand is done: its events are then processed
    /// and acknowledged, or still waiting in the queue, never left leased to a stopped worker
    /// (which would hide them from every replica until the lease ran out).
    pub fn stop(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.wake.notify_one();
    }

    fn is_stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn run_flusher(self: Arc<Self>) {
        use std::sync::atomic::Ordering;
        loop {
            // Woken by a new event; while the store is down, retried twice a second.
            let woken =
                tokio::time::timeout(Duration::from_millis(500), self.flush_wake.notified()).await;
            if woken.is_ok() && self.pending_len() < FLUSH_BATCH {
                // Let the events of the next few milliseconds join this one: one store write
                // and one worker pass for all of them, instead of one per request.
                tokio::time::sleep(FLUSH_WINDOW).await;
            }
            match self.flush().await {
                Ok(0) => {}
                Ok(_) => {
                    if self.store_down.swap(false, Ordering::Relaxed) {
                        tracing::info!("store back; held usage events queued");
                    }
                    self.wake.notify_one();
                }
                Err(err) => {
                    if !self.store_down.swap(true, Ordering::Relaxed) {
                        tracing::warn!(error = %err, pending = self.pending_len(), "store unavailable; usage events kept in memory for retry");
                    }
                }
            }
        }
    }

    /// One pass: writes pending events to the queue, then processes what is queued; returns
    /// how many events were processed.
    pub async fn work_once(&self, processor: &dyn UsageProcessor) -> Result<usize, StoreError> {
        self.flush().await?;
        self.process_queued(processor).await
    }

    /// Takes the next batch of events: leased from the store's queue (a worker that dies
    /// mid-way loses its lease and another takes the events over), or in process from memory.
    /// Also returns the ids of queue items that could not be read, to acknowledge.
    async fn take(&self) -> Result<(Vec<Taken>, Vec<String>), StoreError> {
        if self.in_process {
            let mut pending = self.pending();
            let n = pending.len().min(LEASE_BATCH);
            let taken = pending
                .drain(..n)
                .map(|event| Taken { lease: None, event })
                .collect();
            return Ok((taken, Vec::new()));
        }
        let leased = self
            .store
            .queue_lease(QUEUE, LEASE_BATCH, CLAIM_LEASE)
            .await?;
        let mut taken = Vec::with_capacity(leased.len());
        let mut unreadable = Vec::new();
        for item in leased {
            match serde_json::from_slice::<UsageEvent>(&item.payload) {
                Ok(event) => taken.push(Taken {
                    lease: Some(item.id),
                    event,
                }),
                Err(err) => {
                    tracing::error!(id = %item.id, error = %err, "unreadable usage event dropped");
                    unreadable.push(item.id);
                }
            }
        }
        Ok((taken, unreadable))
    }

    /// Hands back events the processor failed on (and those after them) for a later pass:
    /// released to the store's queue now, not when the lease runs out; in process, back at the
    /// front of `pending`, in order.
    async fn give_back(&self, events: Vec<Taken>) -> Result<(), StoreError> {
        let mut in_memory = Vec::new();
        for taken in events {
            match taken.lease {
                Some(id) => {
                    self.store.queue_release(QUEUE, &id).await?;
                }
                None => in_memory.push(taken.event),
            }
        }
        let mut pending = self.pending();
        for event in in_memory.into_iter().rev() {
            pending.push_front(event);
        }
        Ok(())
    }

    /// Takes events and processes them, until none are left or the processor fails (the events
    /// it failed on go back for a later pass). The store sees a handful of round trips per
    /// batch of events, not several per event.
    async fn process_queued(&self, processor: &dyn UsageProcessor) -> Result<usize, StoreError> {
        let mut processed = 0;
        loop {
            if self.is_stopping() {
                return Ok(processed);
            }
            let (taken, mut done) = self.take().await?;
            if taken.is_empty() && done.is_empty() {
                return Ok(processed);
            }
            // Already in the ledger: processed before (a crash after the ledger write, before
            // the ack). The meter must not see those again. Events taken from memory were
            // never processed: nothing to look up.
            let known = if self.in_process {
                vec![false; taken.len()]
            } else {
                let ids: Vec<&str> = taken.iter().map(|t| t.event.request_id.as_str()).collect();
                self.store.records_exist(LEDGER, &ids).await?
            };
            let mut entries = Vec::with_capacity(taken.len());
            let mut failed = Vec::new();
            // One clock read per batch: its events are processed within a few milliseconds.
            let processed_at_ms = now_ms();
            let idle = processor.is_idle();
            // The events the ledger does not have yet, processed together; their outcomes in
            // order. An event that fails goes back to the queue; the others are recorded,
            // whether they came before or after it (each was charged once, and is not charged
            // again).
            let fresh: Vec<&UsageEvent> = taken
                .iter()
                .zip(&known)
                .filter(|(_, known)| !**known)
                .map(|(taken, _)| &taken.event)
                .collect();
            let mut fresh_outcomes = if idle {
                fresh.iter().map(|_| Ok(Outcome::default())).collect()
            } else {
                processor.process_many(&fresh).await
            }
            .into_iter();
            let outcomes: Vec<Option<Result<Outcome, String>>> = known
                .iter()
                .map(|known| {
                    (!known).then(|| {
                        fresh_outcomes
                            .next()
                            .unwrap_or_else(|| Err("the processor gave no outcome".to_owned()))
                    })
                })
                .collect();
            let mut replayed = Vec::new();
            for (taken, outcome) in taken.into_iter().zip(outcomes) {
                match outcome {
                    None => {
                        processed += 1;
                        done.extend(taken.lease);
                        replayed.push(taken.event.request_id);
                    }
                    Some(outcome) => match outcome {
                        Ok(outcome) => entries.push((
                            taken.lease,
                            LedgerEntry {
                                event: taken.event,
                                outcome,
                                processed_at_ms,
                            },
                        )),
                        Err(err) => {
                            tracing::warn!(request_id = %taken.event.request_id, error = %err, "usage processing failed; will retry");
                            failed.push(taken);
                        }
                    },
                }
            }
            let mut encoded = Vec::with_capacity(entries.len());
            for (i, (_, entry)) in entries.iter().enumerate() {
                yield_now_and_then(i).await;
                encoded.push(entry.encode()?);
            }
            let records: Vec<(&str, &[u8])> = entries
                .iter()
                .zip(&encoded)
                .map(|((_, entry), bytes)| (entry.event.request_id.as_str(), bytes.as_slice()))
                .collect();
            // First writer wins: an event delivered twice (a crash before its ack, two workers
            // on an expired lease) has one ledger entry and is counted once.
            let inserted = self.store.record_put_new_many(LEDGER, &records).await?;
            let mut totals = Totals::default();
            let mut written = Vec::with_capacity(entries.len());
            for ((_, entry), inserted) in entries.iter().zip(inserted) {
                if inserted {
                    totals.add(&entry.event, &entry.outcome);
                    written.push(entry);
                }
            }
            // Counters before acks: a crash in between replays events whose ledger entries
            // exist, which count nothing twice.
            self.apply(totals).await?;
            // So is the observer told (an entry another worker wrote, it tells of).
            if let Some(observer) = self.observer.get()
                && (!written.is_empty() || !replayed.is_empty())
            {
                let replayed: Vec<&str> = replayed.iter().map(String::as_str).collect();
                observer.recorded(&written, &replayed).await?;
            }
            // In process, an event is taken from memory once and comes back only if it failed
            // (given back below, unwritten): once its entry is written, the meter never sees it
            // again, and its mark of the request as charged has done its work. Dropped now, the
            // marks held are those of events in flight, not an hour of requests (gigabytes, on
            // a saturated gateway). On a shared store a replica that
            // dies leaves its events to another, which reads the ledger first; there the marks
            // expire (a delete per event would be a round trip per event).
            // The same holds for an account's mark of the request as settled (a day of ids
            // per account, else).
            if self.in_process && !idle {
                let mut mark = String::new();
                for entry in &written {
                    mark.clear();
                    meter_charged_into(&mut mark, &entry.event.request_id);
                    self.store.kv_delete(&mark).await?;
                }
                let settled: Vec<&str> = written
                    .iter()
                    .map(|entry| entry.event.request_id.as_str())
                    .collect();
                self.store.account_forget_settled(&settled).await?;
            }
            processed += entries.len();
            done.extend(entries.into_iter().filter_map(|(lease, _)| lease));
            if !done.is_empty() {
                let done: Vec<&str> = done.iter().map(String::as_str).collect();
                self.store.queue_ack_many(QUEUE, &done).await?;
            }
            if !failed.is_empty() {
                self.give_back(failed).await?;
                return Ok(processed);
            }
        }
    }

    /// Adds a batch of events to the daily and per-operator counters: one update per counter
    /// however many events fed it.
    async fn apply(&self, totals: Totals<'_>) -> Result<(), StoreError> {
        for ((key_id, model, day), sums) in totals.slots {
            let slot = format!("{key_id}|{model}|{}", day_of(day * MS_PER_DAY));
            // Index records hold their own id, so listing the index lists the ids.
            self.store
                .record_put(DAILY_INDEX, &slot, slot.as_bytes())
                .await?;
            let counter = |name: &str| usage_counter(&slot, name);
            for (name, value) in [
                ("requests", sums.requests),
                ("prompt", sums.prompt_tokens),
                ("completion", sums.completion_tokens),
                ("credits_micro", sums.credits_micro),
            ] {
                if value != 0 {
                    self.store.kv_incr(&counter(name), value, None).await?;
                }
            }
        }
        for (operator, points_micro) in totals.points_micro {
            self.store
                .record_put(OPERATOR_INDEX, operator, operator.as_bytes())
                .await?;
            self.store
                .kv_incr(&Self::points_key(operator), points_micro, None)
                .await?;
        }
        for ((operator, day), points_micro) in totals.day_points_micro {
            let day = day_of(day * MS_PER_DAY);
            self.store
                .kv_incr(&operator_points_day(operator, &day), points_micro, None)
                .await?;
        }
        for (rig, points_micro) in totals.rig_points_micro {
            self.store
                .kv_incr(&unconfirmed_points(rig), points_micro, None)
                .await?;
        }
        Ok(())
    }

    fn points_key(operator: &str) -> String {
        operator_points(operator)
    }

    async fn credit(&self, awards: &[Award]) -> Result<(), StoreError> {
        for award in awards {
            if award.operator.is_empty() {
                continue;
            }
            self.store
                .record_put(OPERATOR_INDEX, &award.operator, award.operator.as_bytes())
                .await?;
            self.store
                .kv_incr(
                    &Self::points_key(&award.operator),
                    (award.points * MICRO) as i64,
                    None,
                )
                .await?;
            let today = day_of(crate::keys::unix_now() * 1000);
            self.store
                .kv_incr(
                    &operator_points_day(&award.operator, &today),
                    (award.points * MICRO) as i64,
                    None,
                )
                .await?;
        }
        Ok(())
    }

    /// Credits awards that did not come from a usage event (a rig's periodic report), once per
    /// `id` however often it is called.
    pub async fn award(&self, id: &str, awards: &[Award]) -> Result<(), StoreError> {
        let guard = awarded(id);
        if self
            .store
            .kv_incr(&guard, 1, Some(Duration::from_secs(7 * 86_400)))
            .await?
            == 1
        {
            self.credit(awards).await?;
        }
        Ok(())
    }

    async fn index(&self, kind: &str) -> Result<Vec<String>, StoreError> {
        Ok(self
            .store
            .record_list(kind)
            .await?
            .into_iter()
            .filter_map(|id| String::from_utf8(id).ok())
            .collect())
    }

    async fn counter(&self, key: &str) -> Result<i64, StoreError> {
        read_counter(self.store.as_ref(), key).await
    }

    /// Daily usage, optionally only one key's, newest day first.
    pub async fn daily(&self, key_id: Option<&str>) -> Result<Vec<DailyUsage>, StoreError> {
        let mut rows = Vec::new();
        for slot in self.index(DAILY_INDEX).await? {
            let mut parts = slot.splitn(3, '|');
            let (Some(key), Some(model), Some(day)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if key_id.is_some_and(|k| k != key) {
                continue;
            }
            let counter = |name: &str| usage_counter(&slot, name);
            rows.push(DailyUsage {
                key_id: key.to_owned(),
                model: model.to_owned(),
                day: day.to_owned(),
                requests: self.counter(&counter("requests")).await?.max(0) as u64,
                prompt_tokens: self.counter(&counter("prompt")).await?.max(0) as u64,
                completion_tokens: self.counter(&counter("completion")).await?.max(0) as u64,
                credits: self.counter(&counter("credits_micro")).await? as f64 / MICRO,
            });
        }
        rows.sort_by(|a, b| {
            (b.day.as_str(), a.key_id.as_str(), a.model.as_str()).cmp(&(
                a.day.as_str(),
                b.key_id.as_str(),
                b.model.as_str(),
            ))
        });
        Ok(rows)
    }

    /// An operator's points per UTC day over the last `days` days (today last), before any
    /// withholding.
    pub async fn daily_points(
        &self,
        operator: &str,
        days: u64,
    ) -> Result<Vec<(String, f64)>, StoreError> {
        let today = crate::keys::unix_now() * 1000 / MS_PER_DAY;
        let mut rows = Vec::with_capacity(days as usize);
        for day in (today + 1).saturating_sub(days)..=today {
            let day = day_of(day * MS_PER_DAY);
            let points = self.counter(&operator_points_day(operator, &day)).await? as f64 / MICRO;
            rows.push((day, points));
        }
        Ok(rows)
    }

    /// An operator's standing: points and withheld points.
    pub async fn operator_standing(&self, operator: &str) -> Result<OperatorPoints, StoreError> {
        Ok(OperatorPoints {
            operator: operator.to_owned(),
            points: self.counter(&Self::points_key(operator)).await? as f64 / MICRO,
            withheld_points: self.counter(&withheld_points(operator)).await? as f64 / MICRO,
        })
    }

    /// Operators by points, best first.
    pub async fn leaderboard(&self) -> Result<Vec<OperatorPoints>, StoreError> {
        let mut rows = Vec::new();
        for operator in self.index(OPERATOR_INDEX).await? {
            let points = self.counter(&Self::points_key(&operator)).await? as f64 / MICRO;
            let withheld_points = self.counter(&withheld_points(&operator)).await? as f64 / MICRO;
            rows.push(OperatorPoints {
                operator,
                points,
                withheld_points,
            });
        }
        rows.sort_by(|a, b| {
            b.points
                .total_cmp(&a.points)
                .then(a.operator.cmp(&b.operator))
        });
        Ok(rows)
    }

    /// The ledger entry of one request.
    pub async fn ledger_entry(&self, request_id: &str) -> Result<Option<LedgerEntry>, StoreError> {
        match self.store.record_get(LEDGER, request_id).await? {
            Some(bytes) => Ok(Some(LedgerEntry::decode(&bytes)?)),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_are_utc_calendar_days() {
        assert_eq!(day_of(0), "1970-01-01");
        assert_eq!(day_of(951_782_400_000), "2000-02-29");
        assert_eq!(day_of(1_795_329_644_000), "2026-11-22");
    }

    fn entry() -> LedgerEntry {
        LedgerEntry {
            event: UsageEvent {
                request_id: "019ab2c4-7e1f-7c3a-9d2e-5b6f8a1c0d3e".into(),
                key_id: "key-1".into(),
                model: "sim-llama-3-8b".into(),
                prompt_tokens: 12,
                completion_tokens: 300,
                cached_tokens: 0,
                latency_ms: 41,
                ttft_ms: 7,
                backend: "rig:node-a".into(),
                rig: "node-a".into(),
                operator: "op \"quoted\"".into(),
                started_at_ms: 1_795_329_644_000,
                finished_at_ms: 1_795_329_644_041,
                batch: false,
                counted: Default::default(),
                trust: None,
                price: None,
            },
            outcome: Outcome {
                credits: 0.25,
                budget_exhausted: false,
                awards: vec![Award {
                    operator: "op \"quoted\"".into(),
                    points: 1.5,
                    reason: "served".into(),
                }],
            },
            processed_at_ms: 1_795_329_644_050,
        }
    }

    #[test]
    fn ledger_entries_are_stored_compact_and_read_back() {
        let entry = entry();
        let bytes = entry.encode().unwrap();
        let json = serde_json::to_vec(&entry).unwrap();
        assert!(
            bytes.len() * 2 < json.len(),
            "{} bytes, JSON {}",
            bytes.len(),
            json.len()
        );
        assert_eq!(LedgerEntry::decode(&bytes).unwrap(), entry);
        // Pinned: postcard has no field names, so a change to the entry's fields changes these
        // bytes, and must come with a new version byte that reads the old layout.
        assert_eq!(
            hex::encode(&bytes),
            PINNED_V4.replace(char::is_whitespace, "")
        );
        let verified = LedgerEntry {
            event: UsageEvent {
                trust: Some(TrustStatus::Verified),
                price: Some(crate::plugins::Price {
                    prompt_per_1k: 0.5,
                    completion_per_1k: 1.25,
                }),
                ..entry.event.clone()
            },
            ..entry
        };
        let bytes = verified.encode().unwrap();
        assert_eq!(LedgerEntry::decode(&bytes).unwrap(), verified);
    }

    /// Version 1 (before `counted`), as earlier gateways wrote it.
    const PINNED_V1: &str = "012430313961623263342d376531662d376333612d396432652d356236663861316330643365056b65\
             792d310e73696d2d6c6c616d612d332d38620cac020029070a7269673a6e6f64652d61066e6f6465\
             2d610b6f70202271756f74656422e0abf18fa03489acf18fa03400000000000000d03f00010b6f7020\
             2271756f74656422000000000000f83f0673657276656492acf18fa034";

    /// The same entry in version 2.
    const PINNED_V2: &str = "022430313961623263342d376531662d376333612d396432652d356236663861316330643365056b\
             65792d310e73696d2d6c6c616d612d332d38620cac020029070a7269673a6e6f64652d61066e6f64\
             652d610b6f70202271756f74656422e0abf18fa03489acf18fa0340000000000000000000000d03f\
             00010b6f70202271756f74656422000000000000f83f0673657276656492acf18fa034";

    /// The same entry in version 3.
    const PINNED_V3: &str = "032430313961623263342d376531662d376333612d396432652d356236663861316330643365056b\
             65792d310e73696d2d6c6c616d612d332d38620cac020029070a7269673a6e6f64652d61066e6f64\
             652d610b6f70202271756f74656422e0abf18fa03489acf18fa034000000000000000000000000d0\
             3f00010b6f70202271756f74656422000000000000f83f0673657276656492acf18fa034";

    /// The same entry in version 4.
    const PINNED_V4: &str = "042430313961623263342d376531662d376333612d396432652d356236663861316330643365056b\
             65792d310e73696d2d6c6c616d612d332d38620cac020029070a7269673a6e6f64652d61066e6f64\
             652d610b6f70202271756f74656422e0abf18fa03489acf18fa03400000000000000000000000000\
             d03f00010b6f70202271756f74656422000000000000f83f0673657276656492acf18fa034";

    #[test]
    fn version_3_entries_still_read() {
        let bytes = hex::decode(PINNED_V3.replace(char::is_whitespace, "")).unwrap();
        assert_eq!(LedgerEntry::decode(&bytes).unwrap(), entry());
    }

    #[test]
    fn version_2_entries_still_read() {
        let bytes = hex::decode(PINNED_V2.replace(char::is_whitespace, "")).unwrap();
        assert_eq!(LedgerEntry::decode(&bytes).unwrap(), entry());
    }

    #[test]
    fn version_1_entries_still_read() {
        let bytes = hex::decode(PINNED_V1.replace(char::is_whitespace, "")).unwrap();
        assert_eq!(LedgerEntry::decode(&bytes).unwrap(), entry());
    }

    #[test]
    fn ledger_entries_written_as_json_still_read() {
        let entry = entry();
        let json = serde_json::to_vec(&entry).unwrap();
        assert_eq!(LedgerEntry::decode(&json).unwrap(), entry);
    }

    #[test]
    fn unreadable_ledger_entries_are_corrupt_not_a_panic() {
        let bytes = entry().encode().unwrap();
        for bad in [
            &b""[..],
            b"\x07abc",
            b"{\"event\":",
            &bytes[..bytes.len() / 2],
        ] {
            assert!(
                matches!(LedgerEntry::decode(bad), Err(StoreError::Corrupt(_))),
                "{bad:?}"
            );
        }
    }
}
