//! Where the request path meets the policy plugins: admission (rate limits and budgets),
//! routing, settlement, and the metering and rewards of usage events.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use http::{HeaderName, HeaderValue};

use crate::backends::{Backend, TrustStatus};
use crate::error::ApiError;
use crate::ledger::{Award, CountedBy, Outcome, UsageEvent, UsageProcessor};
use crate::plugins::{self, PluginHost, Slot};
use crate::store::{ApiKeyRecord, Store};

/// Bytes of the prompt that make its "prefix" for affinity routing: about the system prompt and
/// first turn, which is what repeats across a conversation and what a KV cache keeps.
const PREFIX_BYTES: usize = 2048;
/// Completion tokens a rate limiter reserves for a request that sets no `max_tokens`.
const DEFAULT_RESERVED_COMPLETION: u32 = 256;
/// How long a "budget spent" verdict is trusted in process before asking the store again.
const BUDGET_CACHE: Duration = Duration::from_secs(1);

/// What policies need to know about a request, read once at admission.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts {
    pub prefix_hash: u64,
    pub prompt_tokens: u32,
    pub max_tokens: u32,
}

impl RequestFacts {
    /// `input` is the raw JSON of the prompt (`messages`, `prompt` or `input`).
    pub fn new(input: &[u8], max_tokens: Option<u32>) -> Self {
        let prefix = &input[..input.len().min(PREFIX_BYTES)];
        // SipHash with fixed keys: equal prefixes hash equally on every replica.
        let mut hasher = std::hash::DefaultHasher::new();
        prefix.hash(&mut hasher);
        RequestFacts {
            prefix_hash: hasher.finish(),
            // About four bytes of JSON-escaped text per token.
            prompt_tokens: (input.len() / 4).max(1).min(u32::MAX as usize) as u32,
            max_tokens: max_tokens.unwrap_or(0),
        }
    }

    /// Tokens a limiter must hold for this request.
    pub fn reserved_tokens(&self) -> u32 {
        let completion = if self.max_tokens > 0 {
            self.max_tokens
        } else {
            DEFAULT_RESERVED_COMPLETION
        };
        self.prompt_tokens.saturating_add(completion)
    }
}

/// Per-process policy state: the budget verdict cache, read by every request, and each
/// model's recent demand (foldhash, not std's SipHash, as the other per-request maps; seeded
/// per process, like std's).
#[derive(Default)]
pub struct Policy {
    budgets: Mutex<HashMap<String, (Instant, Spent), foldhash::quality::RandomState>>,
    demand: Mutex<HashMap<String, Demand, foldhash::quality::RandomState>>,
}

/// How often a model's demand estimate takes in the requests counted since the last time.
const DEMAND_WINDOW: Duration = Duration::from_secs(10);

/// Requests for a model admitted per minute: a moving average over [`DEMAND_WINDOW`]s, each
/// window weighing half (about the last minute counts).
#[derive(Debug, Clone, Copy)]
struct Demand {
    since: Instant,
    count: u32,
    per_minute: f64,
}

impl Demand {
    fn new(now: Instant) -> Self {
        Demand {
            since: now,
            count: 0,
            per_minute: 0.0,
        }
    }

    /// Counts one request at `now`.
    fn add(&mut self, now: Instant) {
        self.roll(now);
        self.count = self.count.saturating_add(1);
    }

    /// Folds the windows that ended by `now` into the average.
    fn roll(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.since);
        if elapsed < DEMAND_WINDOW {
            return;
        }
        let windows = (elapsed.as_secs_f64() / DEMAND_WINDOW.as_secs_f64()).floor();
        let rate = f64::from(self.count) * 60.0 / DEMAND_WINDOW.as_secs_f64();
        // The window just ended weighs half; each empty one after it halves the average again.
        self.per_minute = (self.per_minute + rate) / 2.0 / 2f64.powf(windows - 1.0);
        self.count = 0;
        self.since += DEMAND_WINDOW.mul_f64(windows);
    }

    /// The average at `now`, with the requests of the window in progress counted at its rate
    /// so far (a burst shows before its window ends).
    fn per_minute(&self, now: Instant) -> f64 {
        let mut demand = *self;
        demand.roll(now);
        let so_far = now
            .saturating_duration_since(demand.since)
            .as_secs_f64()
            .max(1.0);
        let current = f64::from(demand.count) * 60.0 / so_far;
        demand.per_minute.max(current)
    }
}

/// Whether a key's budget is spent: not, for good, or until a period ends (Unix ms).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Spent {
    No,
    ForGood,
    Until(u64),
}

impl Spent {
    /// The flag's value in the store: `1` for good (as earlier gateways wrote it), else the
    /// reset time in Unix milliseconds.
    fn read(value: Option<&[u8]>) -> Spent {
        match value {
            None => Spent::No,
            Some(b"1") => Spent::ForGood,
            Some(text) => std::str::from_utf8(text)
                .ok()
                .and_then(|t| t.parse::<u64>().ok())
                .map_or(Spent::ForGood, Spent::Until),
        }
    }
}

fn budget_key(key_id: &str) -> String {
    crate::store::keyspace::budget_exhausted(key_id)
}

impl Policy {
    /// The demand for `model` now, without counting a request.
    pub fn current_demand(&self, model: &str) -> f64 {
        let demand = self.demand.lock().unwrap_or_else(|p| p.into_inner());
        demand
            .get(model)
            .map_or(0.0, |d| d.per_minute(Instant::now()))
    }

    /// Counts a request for `model` in its demand, and answers the demand now.
    fn demand(&self, model: &str) -> f64 {
        let now = Instant::now();
        let mut demand = self.demand.lock().unwrap_or_else(|p| p.into_inner());
        match demand.get_mut(model) {
            Some(d) => {
                d.add(now);
                d.per_minute(now)
            }
            None => {
                let mut d = Demand::new(now);
                d.add(now);
                let per_minute = d.per_minute(now);
                demand.insert(model.to_owned(), d);
                per_minute
            }
        }
    }

    async fn budget_spent(&self, store: &dyn Store, key_id: &str) -> Result<Spent, ApiError> {
        let cached = self
            .budgets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key_id)
            .copied();
        let spent = match cached {
            Some((at, spent)) if at.elapsed() < BUDGET_CACHE => spent,
            _ => {
                let spent = Spent::read(store.kv_get(&budget_key(key_id)).await?.as_deref());
                self.budgets
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key_id.to_owned(), (Instant::now(), spent));
                spent
            }
        };
        // A period's end passed since the flag was read: spent no more.
        Ok(match spent {
            Spent::Until(at) if at <= crate::keys::unix_now() * 1000 => Spent::No,
            spent => spent,
        })
    }
}

fn header(name: &'static str, value: u64) -> (HeaderName, HeaderValue) {
    (HeaderName::from_static(name), HeaderValue::from(value))
}

/// OpenAI's `x-ratelimit-*` headers from a limiter's answer (resets as durations, e.g. `6s`).
fn rate_limit_headers(h: &plugins::RateLimitHeaders) -> Vec<(HeaderName, HeaderValue)> {
    let mut out = Vec::new();
    let reset = |name: &'static str, ms: u64| {
        let text = if ms >= 1000 && ms.is_multiple_of(1000) {
            format!("{}s", ms / 1000)
        } else {
            format!("{ms}ms")
        };
        HeaderValue::from_str(&text)
            .ok()
            .map(|v| (HeaderName::from_static(name), v))
    };
    if let Some(v) = h.limit_requests {
        out.push(header("x-ratelimit-limit-requests", v));
    }
    if let Some(v) = h.remaining_requests {
        out.push(header("x-ratelimit-remaining-requests", v));
    }
    if let Some(pair) = h
        .reset_requests_ms
        .and_then(|ms| reset("x-ratelimit-reset-requests", ms))
    {
        out.push(pair);
    }
    if let Some(v) = h.limit_tokens {
        out.push(header("x-ratelimit-limit-tokens", v));
    }
    if let Some(v) = h.remaining_tokens {
        out.push(header("x-ratelimit-remaining-tokens", v));
    }
    if let Some(pair) = h
        .reset_tokens_ms
        .and_then(|ms| reset("x-ratelimit-reset-tokens", ms))
    {
        out.push(pair);
    }
    out
}

/// What admission decided: the rate limit headers for the response, the limiter version
/// that reserved capacity for the request (its settlement goes there), and the price the
/// meter quoted (what the request is charged).
pub struct Admitted {
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub reservation: Option<plugins::Reservation>,
    pub price: Option<plugins::Price>,
    /// What the key's account holds for the request (see `accounts::holds`).
    pub hold: Option<crate::accounts::Hold>,
}

/// Supply and demand for `model` among `candidates` (the healthy backends serving it), for a
/// meter that prices by the market.
pub fn market(model: &str, candidates: &[Arc<Backend>], demand_per_minute: f64) -> plugins::Market {
    let mut market = plugins::Market {
        model: model.to_owned(),
        rigs: candidates.len().min(u32::MAX as usize) as u32,
        capacity_tokens_per_second: 0.0,
        utilization: 0.0,
        queue_depth: 0,
        in_flight: 0,
        demand_requests_per_minute: demand_per_minute,
    };
    let mut busy = 0.0;
    for backend in candidates {
        let load = **backend.load.load();
        let (_, tokens_per_second) = backend.measured();
        market.capacity_tokens_per_second += f64::from(tokens_per_second);
        busy += f64::from(load.kv_cache_usage.max(load.gpu_utilization)).clamp(0.0, 1.0);
        market.queue_depth = market.queue_depth.saturating_add(load.engine_waiting);
        market.in_flight = market.in_flight.saturating_add(backend.in_flight());
    }
    if !candidates.is_empty() {
        market.utilization = busy / candidates.len() as f64;
    }
    market
}

/// The meter's price for a request for `model` now (see [`PluginHost::quote`]), with the
/// model's demand at `demand_per_minute`.
pub async fn quote(
    plugins: &PluginHost,
    request_id: &str,
    model: &str,
    batch: bool,
    candidates: &[Arc<Backend>],
    demand_per_minute: f64,
) -> Option<plugins::Price> {
    plugins
        .quote(request_id, model, batch, || {
            market(model, candidates, demand_per_minute)
        })
        .await
}

/// Admission: the key's budget, then the rate limiter; and the meter's price. The headers go
/// on the response.
#[allow(clippy::too_many_arguments)]
pub async fn admit(
    policy: &Policy,
    store: &dyn Store,
    plugins: &PluginHost,
    key: &ApiKeyRecord,
    model: &str,
    request_id: &str,
    facts: &RequestFacts,
    candidates: &[Arc<Backend>],
    accounts: &crate::accounts::Accounts,
    hold: crate::accounts::HoldFor,
) -> Result<Admitted, ApiError> {
    match policy.budget_spent(store, &key.id).await? {
        Spent::No => {}
        Spent::ForGood => {
            return Err(ApiError::TooManyRequests {
                message: "You exceeded your current quota: this key's budget is spent.".into(),
                code: "insufficient_quota",
                retry_after_secs: None,
                headers: Vec::new(),
            });
        }
        Spent::Until(at) => {
            let secs = at
                .saturating_sub(crate::keys::unix_now() * 1000)
                .div_ceil(1000);
            return Err(ApiError::TooManyRequests {
                message: format!(
                    "You exceeded your current quota: this key's budget for the period is \
                     spent; it resets in {secs} s."
                ),
                code: "insufficient_quota",
                retry_after_secs: Some(secs),
                headers: Vec::new(),
            });
        }
    }
    // Counted in the model's demand only when a meter may price by it.
    let price = if plugins.is_active(Slot::Meter) {
        let demand = policy.demand(model);
        quote(plugins, request_id, model, false, candidates, demand).await
    } else {
        None
    };
    // The key's account holds what the request can cost at the quoted price; released below if
    // the rate limiter refuses it.
    let hold = accounts
        .admit(key, request_id, &crate::accounts::HoldFor { price, ..hold })
        .await?;
    let nothing = || Admitted {
        headers: Vec::new(),
        reservation: None,
        price,
        hold: hold.clone(),
    };
    if !plugins.is_active(plugins::Slot::RateLimiter) {
        return Ok(nothing());
    }
    let admission = plugins::Admission {
        request_id: request_id.to_owned(),
        key_id: key.id.clone(),
        model: model.to_owned(),
        reserved_tokens: facts.reserved_tokens(),
        // Written from the key's map as it is (a JSON object cannot fail to serialize).
        key_metadata: serde_json::to_string(&key.metadata).unwrap_or_else(|_| "{}".to_owned()),
    };
    let Some(plugins::LimiterAnswer {
        decision,
        reservation,
        by_fallback,
    }) = plugins.admit_reserving(&admission).await
    else {
        return Ok(nothing());
    };
    let headers = rate_limit_headers(&decision.headers);
    if decision.allow {
        return Ok(Admitted {
            headers,
            reservation,
            price,
            hold,
        });
    }
    if let Some(hold) = &hold {
        accounts.release(hold, request_id).await;
    }
    if by_fallback {
        // The limiter faulted and the gateway fails closed: the policy's failure, not this
        // key's limit (a 503 the SDKs retry, counted apart from the key's 429s).
        return Err(ApiError::PolicyUnavailable {
            message: decision.reason,
            retry_after_secs: decision.retry_after_ms.div_ceil(1000).max(1),
        });
    }
    let message = if decision.reason.is_empty() {
        "Rate limit reached for this key; retry later.".to_owned()
    } else {
        decision.reason
    };
    Err(ApiError::TooManyRequests {
        message,
        code: "rate_limit_exceeded",
        retry_after_secs: Some(decision.retry_after_ms.div_ceil(1000).max(1)),
        headers,
    })
}

/// The candidates trusted enough for the key: with `"min_trust": "verified"` in its metadata,
/// verified rigs and the operator's own upstreams only; 503 when none is.
pub fn trusted_enough(
    key: &ApiKeyRecord,
    model: &str,
    candidates: Vec<Arc<Backend>>,
) -> Result<Vec<Arc<Backend>>, ApiError> {
    if !crate::keys::wants_verified_rigs(key) {
        return Ok(candidates);
    }
    let verified: Vec<Arc<Backend>> = candidates
        .into_iter()
        .filter(|b| b.trust().is_none_or(|t| t == TrustStatus::Verified))
        .collect();
    if verified.is_empty() {
        return Err(ApiError::Unavailable(format!(
            "No verified rig serves `{model}` right now (this key takes verified rigs only); \
             retry shortly."
        )));
    }
    Ok(verified)
}

/// Orders the healthy candidates by the router plugin's preference; the built-in round robin
/// order when there is no router or it faulted.
pub async fn order(
    plugins: &PluginHost,
    key_id: &str,
    model: &str,
    stream: bool,
    facts: &RequestFacts,
    candidates: Vec<Arc<Backend>>,
) -> Vec<Arc<Backend>> {
    // One candidate leaves nothing to choose (a router may only reorder or leave out), and
    // without a router there is nobody to describe the candidates to.
    if candidates.len() < 2 || !plugins.is_active(plugins::Slot::Router) {
        return candidates;
    }
    let input = route_input(key_id, model, stream, facts, &candidates);
    match plugins.route(input).await {
        Some(order) => order
            .into_iter()
            .filter_map(|i| candidates.get(i as usize).cloned())
            .collect(),
        None => candidates,
    }
}

/// What the router is asked about `candidates`: the request, each candidate's numbers and who
/// it is, read from the backends now, index for index, in one pass.
pub fn route_input(
    key_id: &str,
    model: &str,
    stream: bool,
    facts: &RequestFacts,
    candidates: &[Arc<Backend>],
) -> Arc<plugins::RouteInput> {
    let request = plugins::RouteRequest {
        model: model.to_owned(),
        key_id: key_id.to_owned(),
        prefix_hash: facts.prefix_hash,
        prompt_tokens: facts.prompt_tokens,
        max_tokens: facts.max_tokens,
        stream,
    };
    let mut rows = Vec::with_capacity(candidates.len());
    let infos: Arc<[Arc<plugins::CandidateInfo>]> = candidates
        .iter()
        .map(|b| {
            rows.push(describe(b));
            b.info.load_full()
        })
        .collect();
    Arc::new(plugins::RouteInput {
        request,
        candidates: rows,
        infos,
    })
}

fn describe(backend: &Backend) -> plugins::Candidate {
    let load = **backend.load.load();
    let (latency_ms, tokens_per_second) = backend.measured();
    plugins::Candidate {
        key: backend.key,
        in_flight: backend.in_flight(),
        engine_running: load.engine_running,
        engine_waiting: load.engine_waiting,
        kv_cache_usage: load.kv_cache_usage,
        tokens_per_second,
        latency_ms,
        gpu_utilization: load.gpu_utilization,
        gpu_memory_free_bytes: load.gpu_memory_free_bytes,
        trust: plugin_trust(backend.trust()),
    }
}

/// A backend's trust as plugins see it: `configured` for the operator's static upstreams.
fn plugin_trust(trust: Option<TrustStatus>) -> plugins::Trust {
    match trust {
        None => plugins::Trust::Configured,
        Some(TrustStatus::Unverified) => plugins::Trust::Unverified,
        Some(TrustStatus::Verified) => plugins::Trust::Verified,
        Some(TrustStatus::Suspect) => plugins::Trust::Suspect,
        Some(TrustStatus::Quarantined) => plugins::Trust::Quarantined,
    }
}

/// Tells the rate limiter version that admitted a request (`reservation`) what it really used,
/// off the request's path. Nothing to do for a request no limiter reserved for.
pub fn settle(
    plugins: &Arc<PluginHost>,
    reservation: Option<&plugins::Reservation>,
    request_id: &str,
    key_id: &str,
    model: &str,
    reserved: u32,
    used: u64,
) {
    let Some(reservation) = reservation else {
        return;
    };
    let settlement = plugins::Settlement {
        request_id: request_id.to_owned(),
        key_id: key_id.to_owned(),
        model: model.to_owned(),
        reserved_tokens: reserved,
        used_tokens: used.min(u64::from(u32::MAX)) as u32,
    };
    let (host, reservation) = (Arc::clone(plugins), reservation.clone());
    plugins.spawn(async move { host.settle_with(&reservation, &settlement).await });
}

/// Meters and rewards usage events with the meter and reward plugins.
pub struct PluginProcessor {
    pub plugins: Arc<PluginHost>,
    pub store: Arc<dyn Store>,
    /// Debits accounts their keys' charges (and releases the requests' holds).
    pub accounts: Arc<crate::accounts::Accounts>,
    /// Where keys' budget alerts go (`budget.threshold`).
    pub webhooks: Arc<crate::webhooks::Webhooks>,
    /// The shares of a key's budgets, in percent, whose crossing is an alert.
    pub budget_alert_thresholds: Vec<u32>,
}

fn to_plugin_event(e: &UsageEvent) -> plugins::UsageEvent {
    plugins::UsageEvent {
        request_id: e.request_id.clone(),
        key_id: e.key_id.clone(),
        model: e.model.clone(),
        prompt_tokens: e.prompt_tokens,
        completion_tokens: e.completion_tokens,
        cached_tokens: e.cached_tokens,
        latency_ms: e.latency_ms,
        ttft_ms: e.ttft_ms,
        backend: e.backend.clone(),
        rig: e.rig.clone(),
        operator: e.operator.clone(),
        started_at_ms: e.started_at_ms,
        finished_at_ms: e.finished_at_ms,
        batch: e.batch,
        counted_by: match e.counted.by {
            CountedBy::Gateway => plugins::CountedBy::Gateway,
            CountedBy::Backend => plugins::CountedBy::Backend,
        },
        reported_prompt_tokens: e.counted.reported_prompt_tokens,
        reported_completion_tokens: e.counted.reported_completion_tokens,
        // A rig's event written before trust was recorded counts as unverified.
        trust: match (e.trust, e.rig.is_empty()) {
            (None, true) => plugins::Trust::Configured,
            (trust, _) => plugin_trust(Some(trust.unwrap_or_default())),
        },
        price: e.price.map(|p| plugins::QuotedPrice {
            prompt_per_thousand: p.prompt_per_1k,
            completion_per_thousand: p.completion_per_1k,
        }),
    }
}

impl PluginProcessor {
    /// Sends the `budget.threshold` alerts of the budgets `charge` took past a threshold.
    fn alert_budgets(&self, event: &UsageEvent, charge: &plugins::Charge) {
        if charge.budgets.is_empty() {
            return;
        }
        let crossed = crate::ledger::alerts::crossings(
            &event.key_id,
            charge.credits,
            &charge.budgets,
            &self.budget_alert_thresholds,
        );
        for crossing in crossed {
            tracing::info!(
                key_id = %event.key_id,
                period = %crossing.period,
                percent = crossing.threshold_percent,
                "a key's budget crossed an alert threshold"
            );
            self.webhooks.emit(crate::webhooks::Event::budget_threshold(
                &crossing,
                event.finished_at_ms,
            ));
        }
    }
}

#[async_trait]
impl UsageProcessor for PluginProcessor {
    fn is_idle(&self) -> bool {
        !self.plugins.is_active(Slot::Meter) && !self.plugins.is_active(Slot::Reward)
    }

    async fn process(&self, event: &UsageEvent) -> Result<Outcome, String> {
        self.process_many(&[event])
            .await
            .pop()
            .unwrap_or_else(|| Err("no outcome".to_owned()))
    }

    /// The meter prices the events, then the reward plugin awards those the meter priced (an
    /// event the meter failed on is retried whole, so it is not awarded twice): a plugin of
    /// `garage:policy@0.3.0` in one call per run of events, one of 0.2.0 per event.
    async fn process_many(&self, events: &[&UsageEvent]) -> Vec<Result<Outcome, String>> {
        // No meter and no reward plugin: nothing to charge or award, and no copy of the events
        // to make for them.
        if self.is_idle() {
            return events.iter().map(|_| Ok(Outcome::default())).collect();
        }
        let plugin_events: Vec<plugins::UsageEvent> =
            events.iter().map(|event| to_plugin_event(event)).collect();
        // Until when each event's spent budget holds (a period budget resets): not part of the
        // ledger's outcome, only of the 429 the key gets.
        let mut resets: Vec<Option<u64>> = vec![None; events.len()];
        let mut outcomes: Vec<Result<Outcome, String>> =
            match self.plugins.charge_many(&plugin_events).await {
                None => events.iter().map(|_| Ok(Outcome::default())).collect(),
                Some(charges) => charges
                    .into_iter()
                    .zip(&mut resets)
                    .zip(events)
                    .map(|((charge, reset), event)| {
                        charge
                            .map(|charge| {
                                *reset = charge.exhausted_until_ms;
                                self.alert_budgets(event, &charge);
                                Outcome {
                                    credits: charge.credits,
                                    budget_exhausted: charge.budget_exhausted,
                                    awards: Vec::new(),
                                }
                            })
                            .map_err(|fault| format!("meter: {fault}"))
                    })
                    .collect(),
            };
        let priced: Vec<usize> = (0..events.len()).filter(|&i| outcomes[i].is_ok()).collect();
        let to_award: Vec<plugins::UsageEvent> =
            priced.iter().map(|&i| plugin_events[i].clone()).collect();
        if let Some(awards) = self.plugins.reward_usage_many(&to_award).await {
            for (i, awards) in priced.iter().zip(awards) {
                match awards {
                    Ok(awards) => {
                        if let Ok(outcome) = &mut outcomes[*i] {
                            outcome.awards = awards
                                .into_iter()
                                .map(|a| Award {
                                    operator: a.operator,
                                    points: a.points,
                                    reason: a.reason,
                                })
                                .collect();
                        }
                    }
                    Err(fault) => outcomes[*i] = Err(format!("reward: {fault}")),
                }
            }
        }
        // A spent budget: the key gets 429 insufficient_quota from now on, or until its period
        // ends (once per key).
        let mut spent: Vec<&str> = Vec::new();
        let now_ms = crate::keys::unix_now() * 1000;
        for ((event, outcome), reset) in events.iter().zip(&mut outcomes).zip(resets) {
            let exhausted = outcome.as_ref().is_ok_and(|o| o.budget_exhausted);
            if !exhausted || spent.contains(&event.key_id.as_str()) {
                continue;
            }
            let ttl = match reset {
                // A reset already past: nothing to hold.
                Some(at) if at <= now_ms => continue,
                Some(at) => Some(Duration::from_millis(at - now_ms)),
                None => None,
            };
            let value = match reset {
                Some(at) => at.to_string(),
                None => "1".to_owned(),
            };
            match self
                .store
                .kv_set(&budget_key(&event.key_id), value.as_bytes(), ttl)
                .await
            {
                Ok(()) => {
                    spent.push(&event.key_id);
                    tracing::info!(key_id = %event.key_id, "budget spent; the key gets 429 insufficient_quota");
                }
                Err(err) => *outcome = Err(err.to_string()),
            }
        }
        // The charges of keys with an account: debited once per request, holds released.
        self.accounts.settle_events(events, &mut outcomes).await;
        outcomes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_prefixes_hash_equally() {
        let a = RequestFacts::new(br#"[{"role":"system","content":"You are helpful."}]"#, None);
        let b = RequestFacts::new(
            br#"[{"role":"system","content":"You are helpful."}]"#,
            Some(9),
        );
        let c = RequestFacts::new(br#"[{"role":"system","content":"You are terse."}]"#, None);
        assert_eq!(a.prefix_hash, b.prefix_hash);
        assert_ne!(a.prefix_hash, c.prefix_hash);
        assert_eq!(
            a.reserved_tokens(),
            a.prompt_tokens + DEFAULT_RESERVED_COMPLETION
        );
        assert_eq!(b.reserved_tokens(), b.prompt_tokens + 9);
    }

    #[test]
    fn headers_in_openai_form() {
        let headers = rate_limit_headers(&plugins::RateLimitHeaders {
            limit_requests: Some(60),
            remaining_requests: Some(59),
            reset_requests_ms: Some(1000),
            limit_tokens: None,
            remaining_tokens: None,
            reset_tokens_ms: Some(250),
        });
        let text: Vec<String> = headers
            .iter()
            .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap()))
            .collect();
        assert_eq!(
            text,
            [
                "x-ratelimit-limit-requests: 60",
                "x-ratelimit-remaining-requests: 59",
                "x-ratelimit-reset-requests: 1s",
                "x-ratelimit-reset-tokens: 250ms",
            ]
        );
    }
}
