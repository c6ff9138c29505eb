//! Default meter: quotes each model's price from a per-model table (moved with the market
//! when configured), charges each request the price it was quoted, keeps each key's running
//! spend and says when a key's budget is spent.
//!
//! Config (every field optional):
//!
//! ```json
//! {
//!   "prices": {"llama-3.1-70b": {"prompt": 0.9, "completion": 0.9, "cached_prompt": 0.45}},
//!   "default_price": {"prompt": 1.0, "completion": 1.0},
//!   "budgets": {"key_abc": 500.0},
//!   "default_budget": 100.0,
//!   "period_budgets": {"day": 5.0, "week": 20.0, "month": 50.0},
//!   "key_period_budgets": {"key_abc": {"day": 50.0}},
//!   "utc_offset_minutes": 60,
//!   "batch_discount": 0.5,
//!   "market": {"min_multiplier": 0.5, "max_multiplier": 3.0, "target_utilization": 0.6}
//! }
//! ```
//!
//! Prices are credits per 1,000 tokens; `cached_prompt` prices the prompt tokens the engine
//! served from its prefix cache (default: the `prompt` price). A model missing from `prices`
//! pays `default_price`, itself 1 credit per 1,000 tokens unless configured. A key's budget is
//! `budgets[key]`, else `default_budget`, else none; the charge says `budget_exhausted` once
//! the key's spend reaches it.
//!
//! **Period budgets** cap a key's spend per calendar `day`, `week` (from Monday) and `month`
//! (`key_period_budgets[key]`, else `period_budgets`), in the operator's time zone given as an
//! offset from UTC (`utc_offset_minutes`, e.g. 60 for CET in winter): a spent period budget's
//! charge says `budget_exhausted` with `exhausted_until_ms` at the period's end, when the key's
//! 429s stop by themselves. A lifetime budget has no end. Every charge reports each budget of
//! the key and how much of it is used, for the gateway's budget alerts.
//!
//! **Quotes.** The gateway asks for a model's price at admission and charges the request that
//! price (`quote`); a request the meter did not quote pays the table. A line of the Batch API
//! pays `1 - batch_discount` of the table's price (no discount unless configured), whatever
//! the market: batch lines run when capacity is free.
//!
//! **Market prices**, with `market`: the quote is the table's price times a multiplier that
//! follows how busy the model's rigs are: the *load* is the larger of their utilisation and
//! their requests in flight per `slots_per_rig` (default 8) request slots; with no rig serving
//! the model it is 1. At `target_utilization` (default 0.6) the multiplier is 1; it falls
//! linearly to `min_multiplier` (default 0.5) at load 0 and rises to `max_multiplier` (default
//! 3) at load 1. Damped: the multiplier moves at most once per `interval_ms` (default 10 s),
//! by `smoothing` (default 0.3) of the way to its target, kept in the plugin's state
//! (`market:<model>`) so that every replica quotes the same price.
//!
//! State: `spent:<key>`, the key's total spend in micro-credits (an integer, so replicas add to
//! it atomically), `spent:<key>:<period>:<first day>` per period (expiring a day after the
//! period), and `charged:<request id>` for an hour, so an event delivered twice is charged to
//! the spend once. A run of events charged in one call makes one `kv.reserve` per event (its
//! mark) and one `kv.incr` per spend counter it adds to, the run's sum, however many of its
//! events feed that counter; each charge reports the counters as they stood just after it.
//! The returned charge is the same on every delivery within its period. On the embedded store
//! the gateway drops a request's `charged:` mark once its ledger entry is written (the event
//! never reaches the meter again after that), so the marks held are those of events in flight,
//! not an hour of requests; the name is part of that agreement
//! (`store::keyspace::meter_charged_into` in the gateway).

use std::collections::BTreeMap;

mod market;

use garage_plugin_sdk::{
    BudgetPeriod, BudgetUse, Charge, Host, LogLevel, Meter, QuoteRequest, UsageEvent, config,
};
use serde::Deserialize;

/// Per-model price table with per-key budgets.
pub struct PriceTable;

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Config {
    prices: BTreeMap<String, Price>,
    default_price: Price,
    budgets: BTreeMap<String, f64>,
    default_budget: Option<f64>,
    period_budgets: PeriodBudgets,
    key_period_budgets: BTreeMap<String, PeriodBudgets>,
    utc_offset_minutes: i64,
    batch_discount: f64,
    market: Option<market::MarketConfig>,
}

/// Budgets per calendar period; a period without one is not capped.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct PeriodBudgets {
    day: Option<f64>,
    week: Option<f64>,
    month: Option<f64>,
}

impl PeriodBudgets {
    fn by_period(&self) -> [(Period, Option<f64>); 3] {
        [
            (Period::Day, self.day),
            (Period::Week, self.week),
            (Period::Month, self.month),
        ]
    }
}

#[derive(Debug, Clone, Copy)]
enum Period {
    Day,
    Week,
    Month,
}

impl Period {
    fn name(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
        }
    }

    fn budget_period(self) -> BudgetPeriod {
        match self {
            Period::Day => BudgetPeriod::Day,
            Period::Week => BudgetPeriod::Week,
            Period::Month => BudgetPeriod::Month,
        }
    }

    /// The period holding local day `day` (days since 1970-01-01 in the operator's zone): its
    /// first day and the first day of the next.
    fn bounds(self, day: i64) -> (i64, i64) {
        match self {
            Period::Day => (day, day + 1),
            // 1970-01-01 was a Thursday: Monday is day 4 of that week (0-based from Monday 3).
            Period::Week => {
                let start = day - (day + 3).rem_euclid(7);
                (start, start + 7)
            }
            Period::Month => {
                let (y, m, _) = civil_from_days(day);
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                (days_from_civil(y, m, 1), days_from_civil(ny, nm, 1))
            }
        }
    }
}

const MS_PER_DAY: i64 = 86_400_000;

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01 (proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Days since 1970-01-01 of a date (proleptic Gregorian).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl Default for Config {
    fn default() -> Self {
        Self {
            prices: BTreeMap::new(),
            default_price: Price {
                prompt: 1.0,
                completion: 1.0,
                cached_prompt: None,
            },
            budgets: BTreeMap::new(),
            default_budget: None,
            period_budgets: PeriodBudgets::default(),
            key_period_budgets: BTreeMap::new(),
            utc_offset_minutes: 0,
            batch_discount: 0.0,
            market: None,
        }
    }
}

/// Credits per 1,000 tokens.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Price {
    prompt: f64,
    completion: f64,
    #[serde(default)]
    cached_prompt: Option<f64>,
}

/// Spend is kept in millionths of a credit: fine enough for any price per token, and an integer
/// that `kv.incr` can add atomically across replicas.
const MICROS_PER_CREDIT: f64 = 1_000_000.0;

/// How long a request id is remembered as charged. The gateway retries a failed meter call
/// within minutes; an hour leaves a wide margin, and bounds what one small key per request
/// holds: an hour of request ids (a day of them, at a few thousand requests a second, was
/// gigabytes in the embedded store).
const CHARGED_TTL_MS: u64 = 60 * 60 * 1_000;

impl Config {
    fn price(&self, model: &str) -> &Price {
        self.prices.get(model).unwrap_or(&self.default_price)
    }

    /// What a request of a batch pays of the price.
    fn batch_share(&self, batch: bool) -> f64 {
        if batch {
            1.0 - self.batch_discount
        } else {
            1.0
        }
    }
}

impl Meter for PriceTable {
    fn quote(
        host: &dyn Host,
        request: &QuoteRequest,
    ) -> Result<Option<garage_plugin_sdk::Price>, String> {
        let config = load_config(host)?;
        let price = config.price(&request.model);
        // Batch lines run when capacity is free: the table's price with the batch discount,
        // whatever the market (and what an unquoted line is charged).
        let multiplier = match &config.market {
            Some(market) if !request.batch => market.multiplier(host, &request.model),
            _ => 1.0,
        } * config.batch_share(request.batch);
        Ok(Some(garage_plugin_sdk::Price {
            prompt_per_thousand: price.prompt * multiplier,
            completion_per_thousand: price.completion * multiplier,
        }))
    }

    fn charge(host: &dyn Host, event: &UsageEvent) -> Result<Charge, String> {
        let mut charges = Self::charge_all(host, std::slice::from_ref(event));
        charges.pop().unwrap_or_else(|| Err("no charge".into()))
    }

    /// The run's charges, with one store operation per event (its `charged:` mark) and one per
    /// spend counter the run adds to, however many of its events feed that counter: each
    /// event's charge reports the counters as they stood just after it, as if charged one by
    /// one.
    fn charge_all(host: &dyn Host, events: &[UsageEvent]) -> Vec<Result<Charge, String>> {
        let config = match load_config(host) {
            Ok(config) => config,
            Err(error) => return events.iter().map(|_| Err(error.clone())).collect(),
        };
        let now_ms = host.now_ms();
        // Period budgets, in the operator's zone: the spend of the period the run ends in.
        let offset_ms = config.utc_offset_minutes * 60_000;
        let local_day = (now_ms as i64 + offset_ms).div_euclid(MS_PER_DAY);

        // Each event's price, the spend counters it adds to, and what it adds (nothing when
        // its mark says it was charged before: it reads the spend back unchanged).
        let mut runs: Vec<EventRun> = Vec::with_capacity(events.len());
        let mut counters: BTreeMap<String, Counter> = BTreeMap::new();
        for event in events {
            let credits = config.credits(event);
            let first_delivery = host
                .kv_reserve(
                    &format!("charged:{}", event.request_id),
                    1,
                    1,
                    Some(CHARGED_TTL_MS),
                )
                .is_some();
            let micros = if first_delivery {
                (credits * MICROS_PER_CREDIT).round() as i64
            } else {
                0
            };
            let mut touches = vec![format!("spent:{}", event.key_id)];
            counters
                .entry(touches[0].clone())
                .or_insert(Counter { ttl: None, add: 0 })
                .add += micros;
            let periods = config
                .key_period_budgets
                .get(&event.key_id)
                .unwrap_or(&config.period_budgets);
            let mut period_budgets = Vec::new();
            for (period, budget) in periods.by_period() {
                let Some(budget) = budget else { continue };
                let (first, next) = period.bounds(local_day);
                let start_ms = (first * MS_PER_DAY - offset_ms).max(0) as u64;
                let end_ms = (next * MS_PER_DAY - offset_ms).max(0) as u64;
                let key = format!("spent:{}:{}:{first}", event.key_id, period.name());
                // Kept a day past the period's end: long enough for late deliveries.
                let ttl = end_ms.saturating_sub(now_ms) + MS_PER_DAY as u64;
                counters
                    .entry(key.clone())
                    .or_insert(Counter {
                        ttl: Some(ttl),
                        add: 0,
                    })
                    .add += micros;
                touches.push(key);
                period_budgets.push((period, budget, start_ms, end_ms));
            }
            runs.push(EventRun {
                credits,
                micros,
                touches,
                period_budgets,
            });
        }

        // One increment per counter; then, from the last event back, each counter's value
        // just after each event.
        let mut after: BTreeMap<&str, i64> = counters
            .iter()
            .map(|(key, counter)| (key.as_str(), host.kv_incr(key, counter.add, counter.ttl)))
            .collect();
        let mut stood: Vec<Vec<f64>> = vec![Vec::new(); runs.len()];
        for (run, stood) in runs.iter().zip(stood.iter_mut()).rev() {
            for key in &run.touches {
                let value = after
                    .get_mut(key.as_str())
                    .expect("every counter was added to");
                stood.push(*value as f64 / MICROS_PER_CREDIT);
                *value -= run.micros;
            }
        }

        events
            .iter()
            .zip(runs)
            .zip(stood)
            .map(|((event, run), stood)| Ok(config.charge(event, &run, &stood)))
            .collect()
    }
}

/// One event of a run: its price, what it adds to its spend counters and which they are (the
/// lifetime spend, then each period budget's).
struct EventRun {
    credits: f64,
    micros: i64,
    touches: Vec<String>,
    /// (period, budget, start, end) of each period budget of the event's key.
    period_budgets: Vec<(Period, f64, u64, u64)>,
}

/// A spend counter the run adds to: its TTL on creation, and the sum of the run's events.
struct Counter {
    ttl: Option<u64>,
    add: i64,
}

impl Config {
    /// An event's price in credits: the price quoted at admission, else the table's (with the
    /// batch discount); cached prompt tokens pay the table's ratio of cached to uncached.
    fn credits(&self, event: &UsageEvent) -> f64 {
        let table = self.price(&event.model);
        let (prompt, completion) = match event.price {
            Some(quoted) => (quoted.prompt_per_thousand, quoted.completion_per_thousand),
            None => {
                let share = self.batch_share(event.batch);
                (table.prompt * share, table.completion * share)
            }
        };
        let cached_ratio = match table.cached_prompt {
            Some(cached) if table.prompt > 0.0 => cached / table.prompt,
            _ => 1.0,
        };
        let cached = event.cached_tokens.min(event.prompt_tokens);
        ((event.prompt_tokens - cached) as f64 * prompt
            + cached as f64 * prompt * cached_ratio
            + event.completion_tokens as f64 * completion)
            / 1_000.0
    }

    /// The charge of an event whose spend counters stood at `stood` (credits; the lifetime
    /// spend, then each period's) just after it.
    fn charge(&self, event: &UsageEvent, run: &EventRun, stood: &[f64]) -> Charge {
        let spent = stood[0];
        let budget = self
            .budgets
            .get(&event.key_id)
            .copied()
            .or(self.default_budget);
        let lifetime_spent = budget.is_some_and(|budget| spent >= budget);
        let mut budgets: Vec<BudgetUse> = budget
            .map(|limit| BudgetUse {
                period: BudgetPeriod::Lifetime,
                spent,
                limit,
                starts_at_ms: None,
                resets_at_ms: None,
            })
            .into_iter()
            .collect();
        let mut period_spent_until: Option<u64> = None;
        for (&(period, budget, start_ms, end_ms), &spent) in
            run.period_budgets.iter().zip(&stood[1..])
        {
            if spent >= budget {
                period_spent_until = period_spent_until.max(Some(end_ms));
            }
            budgets.push(BudgetUse {
                period: period.budget_period(),
                spent,
                limit: budget,
                starts_at_ms: Some(start_ms),
                resets_at_ms: Some(end_ms),
            });
        }
        Charge {
            credits: run.credits,
            budget_exhausted: lifetime_spent || period_spent_until.is_some(),
            // A lifetime budget spent holds for good, whatever the periods say.
            exhausted_until_ms: if lifetime_spent {
                None
            } else {
                period_spent_until
            },
            budgets,
        }
    }
}

garage_plugin_sdk::export_meter!(PriceTable);

fn load_config(host: &dyn Host) -> Result<std::sync::Arc<Config>, String> {
    let config = config::cached::<Config>(host).map_err(|error| logged(host, error.to_string()))?;
    let prices = config
        .prices
        .iter()
        .map(|(model, price)| (model.as_str(), price))
        .chain([("default_price", &config.default_price)]);
    for (name, price) in prices {
        let values = [
            price.prompt,
            price.completion,
            price.cached_prompt.unwrap_or(0.0),
        ];
        if !values.iter().all(|v| v.is_finite() && *v >= 0.0) {
            return Err(invalid(
                host,
                format!("prices of {name} must be numbers >= 0"),
            ));
        }
    }
    let periods = std::iter::once(&config.period_budgets)
        .chain(config.key_period_budgets.values())
        .flat_map(|p| p.by_period().into_iter().filter_map(|(_, b)| b));
    let budgets: Vec<f64> = config
        .budgets
        .values()
        .copied()
        .chain(config.default_budget)
        .chain(periods)
        .collect();
    if !budgets.iter().all(|b| b.is_finite() && *b >= 0.0) {
        return Err(invalid(host, "budgets must be numbers >= 0".into()));
    }
    if !(0.0..=1.0).contains(&config.batch_discount) {
        return Err(invalid(
            host,
            "batch_discount must be within 0 and 1".into(),
        ));
    }
    if let Some(market) = &config.market {
        market
            .validate()
            .map_err(|message| invalid(host, message))?;
    }
    if config.utc_offset_minutes.abs() > 14 * 60 {
        return Err(invalid(
            host,
            "utc_offset_minutes must be within -840 and 840".into(),
        ));
    }
    Ok(config)
}

fn invalid(host: &dyn Host, message: String) -> String {
    logged(host, format!("invalid plugin config: {message}"))
}

/// Logs a configuration error, which otherwise only the gateway's retry queue would see.
fn logged(host: &dyn Host, message: String) -> String {
    host.log(LogLevel::Error, &message);
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use garage_plugin_sdk::testing::MemoryHost;

    const CONFIG: &str = r#"{
        "prices": {"big": {"prompt": 2.0, "completion": 4.0, "cached_prompt": 0.5}},
        "default_price": {"prompt": 0.5, "completion": 1.0},
        "budgets": {"key_rich": 1000.0},
        "default_budget": 10.0
    }"#;

    fn event(id: &str, key: &str, model: &str, prompt: u64, completion: u64) -> UsageEvent {
        UsageEvent {
            request_id: id.into(),
            key_id: key.into(),
            model: model.into(),
            prompt_tokens: prompt,
            completion_tokens: completion,
            ..UsageEvent::default()
        }
    }

    #[test]
    fn prices_come_from_the_model_row_or_the_default_row() {
        let host = MemoryHost::with_config(CONFIG);
        let big = PriceTable::charge(&host, &event("r1", "key_a", "big", 1_000, 500)).unwrap();
        assert_eq!(big.credits, 2.0 + 2.0);
        let small =
            PriceTable::charge(&host, &event("r2", "key_a", "small", 2_000, 1_000)).unwrap();
        assert_eq!(small.credits, 1.0 + 1.0);
        assert_eq!(host.counter("spent:key_a"), Some(6_000_000));
    }

    #[test]
    fn cached_prompt_tokens_pay_the_cached_price() {
        let host = MemoryHost::with_config(CONFIG);
        let cached = UsageEvent {
            cached_tokens: 600,
            ..event("r1", "key_a", "big", 1_000, 0)
        };
        // 400 × 2.0 + 600 × 0.5 per thousand.
        assert_eq!(PriceTable::charge(&host, &cached).unwrap().credits, 1.1);
    }

    #[test]
    fn unconfigured_the_price_is_one_credit_per_thousand_tokens_and_no_budget() {
        let host = MemoryHost::new();
        let charge = PriceTable::charge(&host, &event("r1", "key_a", "any", 1_500, 500)).unwrap();
        assert_eq!(
            charge,
            Charge {
                credits: 2.0,
                budget_exhausted: false,
                exhausted_until_ms: None,
                budgets: Vec::new(),
            }
        );
    }

    #[test]
    fn the_budget_is_exhausted_once_the_spend_reaches_it() {
        let host = MemoryHost::with_config(CONFIG);
        // Default budget 10 credits; each request costs 4.
        let charges: Vec<bool> = (0..3)
            .map(|i| {
                let e = event(&format!("r{i}"), "key_a", "big", 1_000, 500);
                PriceTable::charge(&host, &e).unwrap().budget_exhausted
            })
            .collect();
        assert_eq!(charges, vec![false, false, true]);
        // A key with its own budget is unaffected.
        let rich = PriceTable::charge(&host, &event("r9", "key_rich", "big", 1_000, 500));
        assert!(!rich.unwrap().budget_exhausted);
    }

    #[test]
    fn a_redelivered_event_is_charged_to_the_spend_once() {
        let host = MemoryHost::with_config(CONFIG);
        let e = event("r1", "key_a", "big", 1_000, 500);
        let first = PriceTable::charge(&host, &e).unwrap();
        let again = PriceTable::charge(&host, &e).unwrap();
        assert_eq!(first, again);
        assert_eq!(host.counter("spent:key_a"), Some(4_000_000));
        // The mark's name is what the gateway drops once the request is in its ledger.
        assert_eq!(host.counter("charged:r1"), Some(1));
    }

    /// A run charged in one call answers what the events charged one by one would, with one
    /// addition per spend counter instead of one per event.
    #[test]
    fn a_run_is_charged_as_its_events_one_by_one() {
        let config = r#"{"default_budget": 10.0, "period_budgets": {"day": 6.0},
                         "budgets": {"key_b": 3.0}}"#;
        // Each event costs 2 credits: 2,000 tokens at the default 1 credit per 1,000.
        let run: Vec<UsageEvent> = [
            ("r1", "key_a"),
            ("r2", "key_b"),
            ("r3", "key_a"),
            ("r1", "key_a"), // delivered twice in the run: charged once
            ("r4", "key_b"),
            ("r5", "key_a"),
            ("r6", "key_a"),
        ]
        .iter()
        .map(|(id, key)| event(id, key, "m", 1_000, 1_000))
        .collect();
        let one_by_one = MemoryHost::with_config(config);
        one_by_one.set_now_ms(MONDAY_10H);
        let expected: Vec<Result<Charge, String>> = run
            .iter()
            .map(|e| PriceTable::charge(&one_by_one, e))
            .collect();
        let together = MemoryHost::with_config(config);
        together.set_now_ms(MONDAY_10H);
        let charges = PriceTable::charge_all(&together, &run);
        assert_eq!(charges, expected);
        let exhausted: Vec<bool> = charges
            .iter()
            .map(|c| c.as_ref().unwrap().budget_exhausted)
            .collect();
        // key_a: 2, 4, 4 (again), 6 (the day's budget), 8; key_b: 2, 4 (its own budget, 3).
        assert_eq!(exhausted, [false, false, false, false, true, true, true]);
        for key in ["spent:key_a", "spent:key_b"] {
            assert_eq!(together.counter(key), one_by_one.counter(key), "{key}");
        }
        assert_eq!(together.counter("spent:key_a"), Some(8_000_000));
        // Charged again, the run adds nothing and reads the same spend.
        let again = PriceTable::charge_all(&together, &run[..1]);
        assert_eq!(again[0].as_ref().unwrap().budgets[0].spent, 8.0);
        assert_eq!(together.counter("spent:key_a"), Some(8_000_000));
    }

    /// A configuration error fails every event of the run.
    #[test]
    fn a_bad_config_fails_the_whole_run() {
        let host = MemoryHost::with_config(r#"{"default_budget": -1}"#);
        let run = [event("r1", "k", "m", 1, 1), event("r2", "k", "m", 1, 1)];
        let charges = PriceTable::charge_all(&host, &run);
        assert_eq!(charges.len(), 2);
        assert!(charges.iter().all(Result::is_err));
        assert!(host.keys().is_empty());
    }

    /// 2026-12-07 (a Monday) 10:00 UTC, in milliseconds.
    const MONDAY_10H: u64 = 1_796_637_600_000;
    const HOUR: u64 = 3_600_000;
    const DAY: u64 = 24 * HOUR;

    #[test]
    fn calendar_periods_start_at_midnight_monday_and_the_first() {
        let day = (MONDAY_10H / DAY) as i64;
        assert_eq!(civil_from_days(day), (2026, 12, 7));
        assert_eq!(Period::Day.bounds(day), (day, day + 1));
        assert_eq!(
            Period::Week.bounds(day),
            (day, day + 7),
            "2026-12-07 is a Monday"
        );
        assert_eq!(
            Period::Week.bounds(day + 6),
            (day, day + 7),
            "Sunday still that week"
        );
        let (first, next) = Period::Month.bounds(day);
        assert_eq!(civil_from_days(first), (2026, 12, 1));
        assert_eq!(civil_from_days(next), (2027, 1, 1));
        // February of a leap year.
        let feb = days_from_civil(2028, 2, 10);
        let (first, next) = Period::Month.bounds(feb);
        assert_eq!(
            (civil_from_days(first), civil_from_days(next)),
            ((2028, 2, 1), (2028, 3, 1))
        );
        for d in [-1000, 0, 19_000, 20_000, 100_000] {
            let (y, m, dd) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, dd), d);
        }
    }

    #[test]
    fn a_daily_budget_is_spent_until_local_midnight_then_resets() {
        // 1 credit a day; each request costs 0.6; the operator is at UTC+2.
        let host = MemoryHost::with_config(
            r#"{"period_budgets": {"day": 1.0}, "utc_offset_minutes": 120}"#,
        );
        host.set_now_ms(MONDAY_10H);
        let charge =
            |id: &str| PriceTable::charge(&host, &event(id, "key_a", "m", 400, 200)).unwrap();
        assert!(!charge("r1").budget_exhausted);
        let spent = charge("r2");
        assert!(spent.budget_exhausted);
        // Local midnight at UTC+2 is 22:00 UTC.
        assert_eq!(spent.exhausted_until_ms, Some(MONDAY_10H + 12 * HOUR));
        // The next local day: a new budget.
        host.set_now_ms(MONDAY_10H + 12 * HOUR + 1);
        assert!(!charge("r3").budget_exhausted);
    }

    #[test]
    fn the_longest_spent_period_holds_and_a_lifetime_budget_holds_for_good() {
        let host = MemoryHost::with_config(
            r#"{"key_period_budgets": {"key_a": {"day": 10.0, "week": 1.0}}, "budgets": {"key_b": 1.0}, "period_budgets": {"day": 0.5}}"#,
        );
        host.set_now_ms(MONDAY_10H);
        let spent = PriceTable::charge(&host, &event("r1", "key_a", "m", 1_000, 500)).unwrap();
        assert!(spent.budget_exhausted);
        // The weekly cap is spent: until next Monday, 00:00 UTC.
        assert_eq!(
            spent.exhausted_until_ms,
            Some(MONDAY_10H - 10 * HOUR + 7 * DAY)
        );
        let forever = PriceTable::charge(&host, &event("r2", "key_b", "m", 1_000, 500)).unwrap();
        assert!(forever.budget_exhausted);
        assert_eq!(forever.exhausted_until_ms, None);
    }

    #[test]
    fn a_quoted_request_is_charged_its_quote_and_batches_get_their_discount() {
        use garage_plugin_sdk::{Market, Price};
        let host = MemoryHost::with_config(
            r#"{"default_price": {"prompt": 1.0, "completion": 2.0}, "batch_discount": 0.5,
                "market": {"interval_ms": 0, "smoothing": 1.0}}"#,
        );
        // A busy market: the quote is three times the table.
        host.set_market(Market {
            model: "m".into(),
            rigs: 1,
            utilization: 1.0,
            ..Market::default()
        });
        let request = QuoteRequest {
            model: "m".into(),
            batch: false,
        };
        let quoted = PriceTable::quote(&host, &request).unwrap().unwrap();
        assert_eq!(
            quoted,
            Price {
                prompt_per_thousand: 3.0,
                completion_per_thousand: 6.0
            }
        );
        // The market calms down; the request is still charged what it was quoted.
        host.set_market(Market {
            model: "m".into(),
            rigs: 1,
            ..Market::default()
        });
        host.set_now_ms(host.now_ms() + 1);
        let calm = PriceTable::quote(&host, &request).unwrap().unwrap();
        assert_eq!(calm.prompt_per_thousand, 0.5);
        let e = UsageEvent {
            price: Some(quoted),
            ..event("r1", "key_a", "m", 1_000, 1_000)
        };
        assert_eq!(PriceTable::charge(&host, &e).unwrap().credits, 9.0);
        // A batch line: half the quote, or half the table when not quoted.
        let batch = PriceTable::quote(
            &host,
            &QuoteRequest {
                model: "m".into(),
                batch: true,
            },
        )
        .unwrap()
        .unwrap();
        assert_eq!(batch.prompt_per_thousand, 0.5, "the table's, discounted");
        let line = UsageEvent {
            batch: true,
            ..event("r2", "key_a", "m", 1_000, 1_000)
        };
        assert_eq!(PriceTable::charge(&host, &line).unwrap().credits, 1.5);
    }

    #[test]
    fn a_charge_reports_how_much_of_each_budget_is_used() {
        let host = MemoryHost::with_config(
            r#"{"default_budget": 10.0, "period_budgets": {"day": 4.0, "month": 8.0}}"#,
        );
        host.set_now_ms(MONDAY_10H);
        let charge = PriceTable::charge(&host, &event("r1", "key_a", "m", 1_000, 1_000)).unwrap();
        type Used = (BudgetPeriod, f64, f64, Option<u64>, Option<u64>);
        let used: Vec<Used> = charge
            .budgets
            .iter()
            .map(|b| (b.period, b.spent, b.limit, b.starts_at_ms, b.resets_at_ms))
            .collect();
        assert_eq!(
            used,
            vec![
                (BudgetPeriod::Lifetime, 2.0, 10.0, None, None),
                (
                    BudgetPeriod::Day,
                    2.0,
                    4.0,
                    Some(MONDAY_10H - 10 * HOUR),
                    Some(MONDAY_10H + 14 * HOUR)
                ),
                // 2026-12-01 and 2027-01-01, 00:00 UTC.
                (
                    BudgetPeriod::Month,
                    2.0,
                    8.0,
                    Some(1_796_083_200_000),
                    Some(1_798_761_600_000)
                ),
            ]
        );
    }

    #[test]
    fn bad_config_is_an_error_and_charges_nothing() {
        for bad in [
            r#"{"prices": {"m": {"prompt": -1, "completion": 1}}}"#,
            r#"{"default_budget": -5}"#,
            r#"{"pricez": {}}"#,
            r#"{"prices": {"m": {"prompt": 1}}}"#,
            r#"{"period_budgets": {"day": -1}}"#,
            r#"{"period_budgets": {"year": 1}}"#,
            r#"{"utc_offset_minutes": 2000}"#,
            r#"{"batch_discount": 1.5}"#,
            r#"{"market": {"max_multiplier": 0.5}}"#,
            r#"{"market": {"surge": 2}}"#,
        ] {
            let host = MemoryHost::with_config(bad);
            let error = PriceTable::charge(&host, &event("r1", "key_a", "m", 1, 1)).unwrap_err();
            assert!(error.starts_with("invalid plugin config"), "{bad}: {error}");
            assert!(host.keys().is_empty(), "{bad}");
            assert!(
                host.logged(LogLevel::Error, "invalid plugin config"),
                "{bad}"
            );
        }
    }
}
