//! Default rate limiter: requests and tokens per minute, per key and per key and model.
//!
//! Limits come from the key's metadata, field by field, else from the plugin config; a limit
//! set in neither place does not apply, and a limit of 0 refuses everything:
//!
//! ```json
//! {"rpm": 60, "tpm": 10000, "models": {"llama-3.1-70b": {"rpm": 10, "tpm": 4000}}}
//! ```
//!
//! The plugin config has the same fields (the defaults for keys whose metadata sets none), plus
//! `window_ms` (default 60000: "per minute").
//!
//! Counting uses fixed windows aligned on the epoch, one counter per limit and window in the
//! gateway's key-value store: `kv.reserve` adds to a counter only while it stays within its
//! limit, so limits hold exactly across concurrent requests and replicas. Admission reserves one
//! request and the request's `reserved_tokens`; settlement gives back `reserved - used` tokens
//! (or takes the excess) if the request's window is still current. Requests are not given
//! back, even failed ones, so a client cannot hammer the gateway with requests that fail.
//!
//! A denial's `retry_after_ms` is the end of the window; the `x-ratelimit-*` headers report, for
//! requests and for tokens, the tightest limit that applies.
//!
//! State: `rpm:<key>:<window>`, `tpm:<key>:<window>`, `rpm-model:<key>:<window>:<model>`,
//! `tpm-model:<key>:<window>:<model>` (counters that expire with their window), shared by every
//! replica, and `local:held:<request id>` (which token counters a request reserved from, until
//! settled), kept in this replica's memory: the gateway settles a request on the replica and
//! the loaded version that admitted it, so the record never needs the shared store (three
//! round trips a request on Redis, when it was there). A record lost with its replica only
//! leaves the request's unspent tokens counted until the window ends: the limits stay exact.
//!
//! A key and model to which no limit applies (none in the key's metadata, none in the config)
//! are promised unlimited for a minute (`garage:policy@0.7.0`): the gateway then admits their
//! requests without calling the limiter, until the promise ends or the key's metadata or this
//! config changes.
//!
//! An invalid plugin config is logged and traps, so the gateway's fail-open or fail-closed
//! choice for a faulting limiter applies; invalid key metadata is logged and ignored.

use std::collections::BTreeMap;

use garage_plugin_sdk::limits::{FixedWindow, Window};
use garage_plugin_sdk::{
    Admission, Decision, Host, LogLevel, RateLimitHeaders, RateLimiter, Settlement, config,
};
use serde::Deserialize;

/// Fixed-window request and token limits per key and per key and model.
pub struct WindowLimiter;

/// Limits as key metadata and the plugin config spell them.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Limits {
    rpm: Option<u64>,
    tpm: Option<u64>,
    models: BTreeMap<String, ModelLimits>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ModelLimits {
    rpm: Option<u64>,
    tpm: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Config {
    window_ms: u64,
    rpm: Option<u64>,
    tpm: Option<u64>,
    models: BTreeMap<String, ModelLimits>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            window_ms: 60_000,
            rpm: None,
            tpm: None,
            models: BTreeMap::new(),
        }
    }
}

/// What a check counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    Requests,
    Tokens,
}

/// One limit that applies to a request.
struct Check {
    unit: Unit,
    /// `None` for the key's own limit, the model for the key-and-model one.
    model: Option<String>,
    counter: String,
    amount: i64,
    limit: u64,
}

impl RateLimiter for WindowLimiter {
    fn admit(host: &dyn Host, request: &Admission) -> Decision {
        let config = load_config(host);
        let window = FixedWindow::new(config.window_ms).at(host.now_ms());
        let metadata = key_limits(host, request);
        let checks = checks(&config, &metadata, request, &window);
        if checks.is_empty() {
            // No limit for this key and model, in its metadata or the config: none will apply
            // until either changes, and the gateway forgets the promise when they do.
            return Decision::allow(RateLimitHeaders::default()).unlimited_for(UNLIMITED_MS);
        }

        let mut headers = Headers::default();
        let mut taken: Vec<&Check> = Vec::new();
        for check in &checks {
            let reserved = host.kv_reserve(
                &check.counter,
                check.amount,
                clamp(check.limit),
                Some(window.reset_ms),
            );
            match reserved {
                Some(used) => {
                    headers.record(check, used);
                    taken.push(check);
                }
                None => {
                    // Report the counters as the refusal leaves them.
                    let mut headers = Headers::default();
                    for done in &taken {
                        let used = host.kv_incr(&done.counter, -done.amount, Some(window.reset_ms));
                        headers.record(done, used);
                    }
                    let used = host.kv_incr(&check.counter, 0, Some(window.reset_ms));
                    headers.record(check, used);
                    return Decision::deny(
                        window.reset_ms,
                        refusal(check, &request.model, window.reset_ms),
                        headers.finish(&window),
                    );
                }
            }
        }

        let token_counters: String = taken
            .iter()
            .filter(|c| c.unit == Unit::Tokens)
            .map(|c| if c.model.is_some() { 'm' } else { 'k' })
            .collect();
        if token_counters.is_empty() {
            // No token counter reserved for: nothing to give back, no settle to call.
            return Decision::allow(headers.finish(&window)).without_settle();
        }
        let held = format!("{} {token_counters}", window.index);
        host.kv_set(
            &held_key(&request.request_id),
            held.as_bytes(),
            Some(window.reset_ms),
        );
        Decision::allow(headers.finish(&window))
    }

    fn settle(host: &dyn Host, settlement: &Settlement) {
        let held_key = held_key(&settlement.request_id);
        let Some(held) = host.kv_get(&held_key) else {
            return; // No token limit applied, or its window is over: nothing to give back.
        };
        host.kv_delete(&held_key);
        let config = load_config(host);
        let window = FixedWindow::new(config.window_ms).at(host.now_ms());
        let Some((index, counters)) = std::str::from_utf8(&held)
            .ok()
            .and_then(|held| held.split_once(' '))
        else {
            host.log(LogLevel::Warn, &format!("ignoring malformed {held_key}"));
            return;
        };
        if index.parse() != Ok(window.index) {
            return; // The window the tokens came from has ended; its counter is gone.
        }
        let delta = i64::from(settlement.used_tokens) - i64::from(settlement.reserved_tokens);
        if delta == 0 {
            return;
        }
        for counter in counters.chars() {
            let name = match counter {
                'k' => format!("tpm:{}:{}", settlement.key_id, window.index),
                _ => format!(
                    "tpm-model:{}:{}:{}",
                    settlement.key_id, window.index, settlement.model
                ),
            };
            host.kv_incr(&name, delta, Some(window.reset_ms));
        }
    }
}

garage_plugin_sdk::export_rate_limiter!(WindowLimiter);

fn load_config(host: &dyn Host) -> std::sync::Arc<Config> {
    match config::cached::<Config>(host) {
        Ok(config) => config,
        Err(error) => {
            // No error channel in this world: a trap hands the decision to the gateway's
            // fail-open / fail-closed setting for this slot, and counts as a fault.
            host.log(LogLevel::Error, &error.to_string());
            panic!("{error}");
        }
    }
}

fn key_limits(host: &dyn Host, request: &Admission) -> Limits {
    config::from_json("key metadata", &request.key_metadata).unwrap_or_else(|error| {
        host.log(
            LogLevel::Warn,
            &format!("key {}: {error}; using the default limits", request.key_id),
        );
        Limits::default()
    })
}

/// The limits that apply to `request`, requests before tokens, key before model.
fn checks(config: &Config, key: &Limits, request: &Admission, window: &Window) -> Vec<Check> {
    let model_key = key.models.get(&request.model);
    let model_config = config.models.get(&request.model);
    let key_rpm = key.rpm.or(config.rpm);
    let key_tpm = key.tpm.or(config.tpm);
    let model_rpm = model_key
        .and_then(|m| m.rpm)
        .or(model_config.and_then(|m| m.rpm));
    let model_tpm = model_key
        .and_then(|m| m.tpm)
        .or(model_config.and_then(|m| m.tpm));

    let (id, w, model) = (&request.key_id, window.index, &request.model);
    let tokens = i64::from(request.reserved_tokens);
    let candidates = [
        (Unit::Requests, None, format!("rpm:{id}:{w}"), 1, key_rpm),
        (
            Unit::Requests,
            Some(model),
            format!("rpm-model:{id}:{w}:{model}"),
            1,
            model_rpm,
        ),
        (Unit::Tokens, None, format!("tpm:{id}:{w}"), tokens, key_tpm),
        (
            Unit::Tokens,
            Some(model),
            format!("tpm-model:{id}:{w}:{model}"),
            tokens,
            model_tpm,
        ),
    ];
    candidates
        .into_iter()
        .filter_map(|(unit, model, counter, amount, limit)| {
            Some(Check {
                unit,
                model: model.cloned(),
                counter,
                amount,
                limit: limit?,
            })
        })
        .collect()
}

/// How long a key and model without limits are promised to stay so (the gateway keeps a
/// promise at most a minute, and forgets it when the key's metadata or this config changes).
const UNLIMITED_MS: u32 = 60_000;

/// Limits beyond `i64::MAX` are as good as none; `kv.reserve` counts in `s64`.
fn clamp(limit: u64) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// A `local:` key: replica-local state (see the module's comment).
fn held_key(request_id: &str) -> String {
    format!("local:held:{request_id}")
}

/// The client-facing reason, worded like OpenAI's.
fn refusal(check: &Check, model: &str, reset_ms: u64) -> String {
    let what = match check.unit {
        Unit::Requests => "requests per min (RPM)",
        Unit::Tokens => "tokens per min (TPM)",
    };
    let scope = match &check.model {
        Some(_) => format!(" on model {model}"),
        None => String::new(),
    };
    let limit = check.limit;
    if check.unit == Unit::Tokens && check.amount > clamp(check.limit) {
        return format!(
            "Request too large for {what}{scope}: limit {limit}, requested {}. \
             Lower max_tokens or shorten the prompt.",
            check.amount
        );
    }
    let seconds = reset_ms.div_ceil(1_000);
    format!("Rate limit reached for {what}{scope}: limit {limit}. Please try again in {seconds}s.")
}

/// The tightest request and token limits seen, for the `x-ratelimit-*` headers.
#[derive(Default)]
struct Headers {
    requests: Option<(u64, u64)>,
    tokens: Option<(u64, u64)>,
}

impl Headers {
    /// Notes that `check`'s counter stands at `used`.
    fn record(&mut self, check: &Check, used: i64) {
        let remaining = check.limit.saturating_sub(u64::try_from(used).unwrap_or(0));
        let slot = match check.unit {
            Unit::Requests => &mut self.requests,
            Unit::Tokens => &mut self.tokens,
        };
        if slot.is_none_or(|(_, tightest)| remaining < tightest) {
            *slot = Some((check.limit, remaining));
        }
    }

    fn finish(self, window: &Window) -> RateLimitHeaders {
        RateLimitHeaders {
            limit_requests: self.requests.map(|(limit, _)| limit),
            remaining_requests: self.requests.map(|(_, remaining)| remaining),
            reset_requests_ms: self.requests.map(|_| window.reset_ms),
            limit_tokens: self.tokens.map(|(limit, _)| limit),
            remaining_tokens: self.tokens.map(|(_, remaining)| remaining),
            reset_tokens_ms: self.tokens.map(|_| window.reset_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use garage_plugin_sdk::testing::MemoryHost;

    fn admission(id: &str, tokens: u32, metadata: &str) -> Admission {
        Admission {
            request_id: id.into(),
            key_id: "key_a".into(),
            model: "m".into(),
            reserved_tokens: tokens,
            key_metadata: metadata.into(),
        }
    }

    fn settlement(id: &str, reserved: u32, used: u32) -> Settlement {
        Settlement {
            request_id: id.into(),
            key_id: "key_a".into(),
            model: "m".into(),
            reserved_tokens: reserved,
            used_tokens: used,
        }
    }

    /// A host whose clock sits 10 s into a minute.
    fn host(config: &str) -> MemoryHost {
        let host = MemoryHost::with_config(config);
        host.set_now_ms(1_700_000_050_000);
        host
    }

    #[test]
    fn without_limits_everything_passes_and_nothing_is_stored() {
        let host = host("{}");
        let decision = WindowLimiter::admit(&host, &admission("r1", 100, "{}"));
        assert_eq!(
            decision,
            Decision::allow(RateLimitHeaders::default()).unlimited_for(60_000),
            "nothing reserved, nothing to settle, and none of this key's requests need ask"
        );
        assert!(!decision.settle);
        WindowLimiter::settle(&host, &settlement("r1", 100, 10));
        assert!(host.keys().is_empty());
    }

    /// A promise is made only where no limit applies: for a key limited on one model, its
    /// requests for another model are promised, its requests for that model never are.
    #[test]
    fn only_a_key_and_model_without_any_limit_are_promised_unlimited() {
        let host = host("{}");
        let meta = r#"{"models": {"m": {"rpm": 100}}}"#;
        let limited = WindowLimiter::admit(&host, &admission("r1", 10, meta));
        assert!(limited.allow);
        assert_eq!(limited.unlimited_ms, 0, "the key is limited on m");
        let other = Admission {
            model: "other".into(),
            ..admission("r2", 10, meta)
        };
        assert_eq!(WindowLimiter::admit(&host, &other).unlimited_ms, 60_000);
        for (config, meta) in [
            (r#"{"tpm": 1000}"#, "{}"),
            ("{}", r#"{"rpm": 5}"#),
            (r#"{"models": {"m": {"tpm": 9}}}"#, "{}"),
        ] {
            let decision = WindowLimiter::admit(&self::host(config), &admission("r3", 1, meta));
            assert_eq!(decision.unlimited_ms, 0, "{config} {meta}");
        }
    }

    #[test]
    fn requests_per_minute_from_metadata_with_headers_and_retry_after() {
        let host = host("{}");
        let meta = r#"{"rpm": 2}"#;
        let first = WindowLimiter::admit(&host, &admission("r1", 0, meta));
        assert!(first.allow);
        assert_eq!(first.headers.limit_requests, Some(2));
        assert_eq!(first.headers.remaining_requests, Some(1));
        assert_eq!(first.headers.reset_requests_ms, Some(50_000));
        assert_eq!(first.headers.limit_tokens, None);
        assert!(WindowLimiter::admit(&host, &admission("r2", 0, meta)).allow);

        let third = WindowLimiter::admit(&host, &admission("r3", 0, meta));
        assert!(!third.allow);
        assert_eq!(third.retry_after_ms, 50_000);
        assert_eq!(third.headers.remaining_requests, Some(0));
        assert_eq!(
            third.reason,
            "Rate limit reached for requests per min (RPM): limit 2. Please try again in 50s."
        );

        host.advance_ms(50_000);
        assert!(WindowLimiter::admit(&host, &admission("r4", 0, meta)).allow);
    }

    #[test]
    fn config_limits_apply_when_metadata_sets_none_and_metadata_wins_field_by_field() {
        let host = host(r#"{"rpm": 1, "tpm": 1000}"#);
        let meta = r#"{"rpm": 5, "team": "free-form fields are fine"}"#;
        let decision = WindowLimiter::admit(&host, &admission("r1", 600, meta));
        assert_eq!(decision.headers.limit_requests, Some(5));
        assert_eq!(decision.headers.limit_tokens, Some(1000));
        assert_eq!(decision.headers.remaining_tokens, Some(400));
        let over = WindowLimiter::admit(&host, &admission("r2", 600, meta));
        assert!(!over.allow);
        assert!(
            over.reason.contains("tokens per min (TPM)"),
            "{}",
            over.reason
        );
        assert_eq!(over.headers.remaining_tokens, Some(400));
        // The refused request's request count was rolled back.
        assert_eq!(over.headers.remaining_requests, Some(4));
    }

    #[test]
    fn per_model_limits_are_separate_and_the_tightest_is_reported() {
        let host = host(r#"{"models": {"m": {"rpm": 3}}}"#);
        let meta = r#"{"rpm": 10, "models": {"m": {"tpm": 500}}}"#;
        let decision = WindowLimiter::admit(&host, &admission("r1", 200, meta));
        assert!(decision.allow);
        assert_eq!(
            decision.headers.limit_requests,
            Some(3),
            "model rpm from config"
        );
        assert_eq!(decision.headers.remaining_requests, Some(2));
        assert_eq!(
            decision.headers.limit_tokens,
            Some(500),
            "model tpm from metadata"
        );

        let other_model = Admission {
            model: "other".into(),
            ..admission("r2", 200, meta)
        };
        let decision = WindowLimiter::admit(&host, &other_model);
        assert_eq!(decision.headers.limit_requests, Some(10));
        assert_eq!(decision.headers.remaining_requests, Some(8));
        assert_eq!(decision.headers.limit_tokens, None);

        assert!(WindowLimiter::admit(&host, &admission("r3", 200, meta)).allow);
        let denied = WindowLimiter::admit(&host, &admission("r4", 200, meta));
        assert!(!denied.allow);
        assert!(denied.reason.contains("on model m"), "{}", denied.reason);
    }

    #[test]
    fn settling_gives_back_unused_tokens_in_the_same_window() {
        let host = host(r#"{"tpm": 1000}"#);
        assert!(WindowLimiter::admit(&host, &admission("r1", 800, "{}")).allow);
        assert!(!WindowLimiter::admit(&host, &admission("r2", 800, "{}")).allow);
        // The record of what r1 reserved is replica-local state; the counters are shared.
        assert!(host.kv_get("local:held:r1").is_some());
        assert!(
            host.keys()
                .iter()
                .all(|k| k == "local:held:r1" || !k.contains("held"))
        );

        WindowLimiter::settle(&host, &settlement("r1", 800, 150));
        let again = WindowLimiter::admit(&host, &admission("r2", 800, "{}"));
        assert!(again.allow);
        assert_eq!(again.headers.remaining_tokens, Some(50));
        assert_eq!(host.kv_get("local:held:r1"), None, "settled once");
    }

    #[test]
    fn settling_takes_the_excess_when_a_request_used_more_than_it_reserved() {
        let host = host(r#"{"tpm": 1000, "models": {"m": {"tpm": 1000}}}"#);
        assert!(WindowLimiter::admit(&host, &admission("r1", 100, "{}")).allow);
        WindowLimiter::settle(&host, &settlement("r1", 100, 900));
        let window = FixedWindow::new(60_000).at(host.now_ms()).index;
        assert_eq!(host.counter(&format!("tpm:key_a:{window}")), Some(900));
        assert_eq!(
            host.counter(&format!("tpm-model:key_a:{window}:m")),
            Some(900)
        );
    }

    #[test]
    fn settling_after_the_window_ended_touches_nothing() {
        let host = host(r#"{"tpm": 1000}"#);
        assert!(WindowLimiter::admit(&host, &admission("r1", 800, "{}")).allow);
        host.advance_ms(50_000);
        WindowLimiter::settle(&host, &settlement("r1", 800, 0));
        assert!(host.keys().is_empty(), "{:?}", host.keys());
    }

    #[test]
    fn a_request_larger_than_the_limit_is_told_so() {
        let host = host(r#"{"tpm": 1000}"#);
        let decision = WindowLimiter::admit(&host, &admission("r1", 4096, "{}"));
        assert!(!decision.allow);
        assert!(
            decision.reason.starts_with("Request too large"),
            "{}",
            decision.reason
        );
        assert_eq!(decision.headers.remaining_tokens, Some(1000));
    }

    #[test]
    fn zero_refuses_everything() {
        let host = host("{}");
        assert!(!WindowLimiter::admit(&host, &admission("r1", 0, r#"{"rpm": 0}"#)).allow);
    }

    #[test]
    fn bad_metadata_is_logged_and_the_defaults_apply() {
        let host = host(r#"{"rpm": 1}"#);
        let decision = WindowLimiter::admit(&host, &admission("r1", 0, r#"{"rpm": "sixty"}"#));
        assert_eq!(decision.headers.limit_requests, Some(1));
        assert!(host.logged(LogLevel::Warn, "key key_a: invalid key metadata"));
    }

    #[test]
    #[should_panic(expected = "unknown field `rmp`")]
    fn bad_config_traps() {
        let host = host(r#"{"rmp": 1}"#);
        WindowLimiter::admit(&host, &admission("r1", 0, "{}"));
    }
}
