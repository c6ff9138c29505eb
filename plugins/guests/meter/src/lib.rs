//! Default meter: prices each request from a per-model table, keeps each key's running spend
//! and says when a key's budget is spent.
//!
//! Config (every field optional):
//!
//! ```json
//! {
//!   "prices": {"llama-3.1-70b": {"prompt": 0.9, "completion": 0.9, "cached_prompt": 0.45}},
//!   "default_price": {"prompt": 1.0, "completion": 1.0},
//!   "budgets": {"key_abc": 500.0},
//!   "default_budget": 100.0
//! }
//! ```
//!
//! Prices are credits per 1,000 tokens; `cached_prompt` prices the prompt tokens the engine
//! served from its prefix cache (default: the `prompt` price). A model missing from `prices`
//! pays `default_price`, itself 1 credit per 1,000 tokens unless configured. A key's budget is
//! `budgets[key]`, else `default_budget`, else none; the charge says `budget_exhausted` once
//! the key's spend reaches it.
//!
//! State: `spent:<key>`, the key's total spend in micro-credits (an integer, so replicas add to
//! it atomically), and `charged:<request id>` for an hour, so an event delivered twice is
//! charged to the spend once. The returned charge is the same on every delivery.

use std::collections::BTreeMap;

use garage_plugin_sdk::{Charge, Host, LogLevel, Meter, UsageEvent, config};
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

impl Meter for PriceTable {
    fn charge(host: &dyn Host, event: &UsageEvent) -> Result<Charge, String> {
        let config = load_config(host)?;
        let price = config
            .prices
            .get(&event.model)
            .unwrap_or(&config.default_price);
        let cached = event.cached_tokens.min(event.prompt_tokens);
        let credits = ((event.prompt_tokens - cached) as f64 * price.prompt
            + cached as f64 * price.cached_prompt.unwrap_or(price.prompt)
            + event.completion_tokens as f64 * price.completion)
            / 1_000.0;

        let spent_key = format!("spent:{}", event.key_id);
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
            0 // Already added to the spend: read it back unchanged.
        };
        let spent = host.kv_incr(&spent_key, micros, None) as f64 / MICROS_PER_CREDIT;

        let budget = config
            .budgets
            .get(&event.key_id)
            .copied()
            .or(config.default_budget);
        Ok(Charge {
            credits,
            budget_exhausted: budget.is_some_and(|budget| spent >= budget),
        })
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
    let budgets = config
        .budgets
        .values()
        .chain(config.default_budget.as_ref());
    if !budgets.into_iter().all(|b| b.is_finite() && *b >= 0.0) {
        return Err(invalid(host, "budgets must be numbers >= 0".into()));
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
                budget_exhausted: false
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
    }

    #[test]
    fn bad_config_is_an_error_and_charges_nothing() {
        for bad in [
            r#"{"prices": {"m": {"prompt": -1, "completion": 1}}}"#,
            r#"{"default_budget": -5}"#,
            r#"{"pricez": {}}"#,
            r#"{"prices": {"m": {"prompt": 1}}}"#,
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
