//! Inside the component (`wasm32` only): the wit-bindgen bindings, the [`Host`] backed by the
//! WIT imports, the conversions between WIT records and the SDK's types, and the glue the
//! export macros call.
//!
//! One `generate!` describes the imports and the shared `types` interface; one per world then
//! reuses them through `with`, so every world speaks the same Rust types and one set of
//! conversions serves all. Each world's macro is `pub_export_macro`: wit-bindgen then emits a
//! world's exports into the component only where a plugin invokes its export macro, so a
//! router component does not claim to export `charge`.

use crate::{
    Admission, Award, BudgetPeriod, CandidateInfo, Candidates, Charge, CountedBy, Decision, Host,
    LogLevel, Market, Meter, Price, QuoteRequest, RateLimitHeaders, RateLimiter, Reward, RigReport,
    RouteRequest, Router, Settlement, Trust, UsageEvent,
};

/// The imports of every world, and the shared records.
mod imports {
    #![expect(missing_docs, reason = "generated from the WIT, whose docs it carries")]

    wit_bindgen::generate!({
        path: "../wit/v0.7",
        inline: r#"
            package garage:plugin-sdk;

            world imports {
                import garage:policy/types@0.2.0;
                import garage:policy/types@0.3.0;
                import garage:policy/types@0.4.0;
                import garage:policy/types@0.5.0;
                import garage:policy/types@0.6.0;
                import garage:policy/types@0.7.0;
                import garage:policy/kv@0.2.0;
                import garage:policy/clock@0.2.0;
                import garage:policy/log@0.2.0;
                import garage:policy/config@0.2.0;
            }
        "#,
        generate_all,
        generate_unused_types: true,
    });
}

/// The WIT records of `garage:policy@0.2.0` as wit-bindgen generates them.
pub use imports::garage::policy0_2_0::types as wit;
/// The records new in `garage:policy@0.3.0`.
pub use imports::garage::policy0_3_0::types as wit_v0_3;
/// The records new in `garage:policy@0.4.0`.
pub use imports::garage::policy0_4_0::types as wit_v0_4;
/// The records new in `garage:policy@0.5.0`.
pub use imports::garage::policy0_5_0::types as wit_v0_5;
/// The records new in `garage:policy@0.6.0`.
pub use imports::garage::policy0_6_0::types as wit_v0_6;
/// The records new in `garage:policy@0.7.0`.
pub use imports::garage::policy0_7_0::types as wit_v0_7;

use imports::garage::policy0_2_0::{clock, config, kv, log};

macro_rules! world {
    (
        $module:ident, $path:literal, $world:literal, $export_macro:literal, $bindings:literal,
        { $($with:tt)* }
    ) => {
        #[doc = concat!("Bindings of the `", $world, "` world.")]
        pub mod $module {
            #![expect(missing_docs, reason = "generated from the WIT, whose docs it carries")]
            // `allow`, not `expect`: whether it fires depends on the world's records.
            #![allow(
                clippy::too_many_arguments,
                reason = "the canonical ABI passes a record's fields as separate arguments"
            )]

            wit_bindgen::generate!({
                path: $path,
                world: $world,
                with: {
                    $($with)*
                    "garage:policy/kv@0.2.0": crate::guest::imports::garage::policy0_2_0::kv,
                    "garage:policy/clock@0.2.0": crate::guest::imports::garage::policy0_2_0::clock,
                    "garage:policy/log@0.2.0": crate::guest::imports::garage::policy0_2_0::log,
                    "garage:policy/config@0.2.0": crate::guest::imports::garage::policy0_2_0::config,
                },
                pub_export_macro: true,
                export_macro_name: $export_macro,
                default_bindings_module: $bindings,
            });
        }
    };
}

// The router world is `garage:policy@0.6.0`'s (`wit/v0.6`: candidates as columns, copied into
// the component a block per column), the rate limiter's 0.7.0's (`wit/v0.7`: an admit that
// says whether a settle is needed, and whether the key's requests for the model need ask), the meter and reward worlds 0.5.0's (`wit/v0.5`: usage
// events that carry their quoted price, lists of events, the meter's quote and its `market`
// import). Every other import stays 0.2.0's.
world!(
    router,
    "../wit/v0.6",
    "garage:policy/router@0.6.0",
    "export_router_world",
    "garage_plugin_sdk::__private::router",
    {
        "garage:policy/types@0.2.0": crate::guest::imports::garage::policy0_2_0::types,
        "garage:policy/types@0.6.0": crate::guest::imports::garage::policy0_6_0::types,
        "garage:policy/candidates@0.2.0": generate,
    }
);
world!(
    rate_limiter,
    "../wit/v0.7",
    "garage:policy/rate-limiter@0.7.0",
    "export_rate_limiter_world",
    "garage_plugin_sdk::__private::rate_limiter",
    {
        "garage:policy/types@0.2.0": crate::guest::imports::garage::policy0_2_0::types,
        "garage:policy/types@0.7.0": crate::guest::imports::garage::policy0_7_0::types,
    }
);
world!(
    meter,
    "../wit/v0.5",
    "garage:policy/meter@0.5.0",
    "export_meter_world",
    "garage_plugin_sdk::__private::meter",
    {
        "garage:policy/types@0.4.0": crate::guest::imports::garage::policy0_4_0::types,
        "garage:policy/types@0.5.0": crate::guest::imports::garage::policy0_5_0::types,
        "garage:policy/market@0.5.0": generate,
    }
);
world!(
    reward,
    "../wit/v0.5",
    "garage:policy/reward@0.5.0",
    "export_reward_world",
    "garage_plugin_sdk::__private::reward",
    {
        "garage:policy/types@0.2.0": crate::guest::imports::garage::policy0_2_0::types,
        "garage:policy/types@0.4.0": crate::guest::imports::garage::policy0_4_0::types,
        "garage:policy/types@0.5.0": crate::guest::imports::garage::policy0_5_0::types,
    }
);

/// The [`Host`] of a plugin running in the gateway: every call goes to a WIT import.
#[derive(Debug, Clone, Copy, Default)]
pub struct WasmHost;

impl Host for WasmHost {
    fn kv_get(&self, key: &str) -> Option<Vec<u8>> {
        kv::get(key)
    }

    fn kv_set(&self, key: &str, value: &[u8], ttl_ms: Option<u64>) {
        kv::set(key, value, ttl_ms);
    }

    fn kv_delete(&self, key: &str) {
        kv::delete(key);
    }

    fn kv_incr(&self, key: &str, delta: i64, ttl_ms: Option<u64>) -> i64 {
        kv::incr(key, delta, ttl_ms)
    }

    fn kv_reserve(&self, key: &str, amount: i64, limit: i64, ttl_ms: Option<u64>) -> Option<i64> {
        kv::reserve(key, amount, limit, ttl_ms)
    }

    fn now_ms(&self) -> u64 {
        clock::now_ms()
    }

    fn log(&self, level: LogLevel, message: &str) {
        let level = match level {
            LogLevel::Debug => log::Level::Debug,
            LogLevel::Info => log::Level::Info,
            LogLevel::Warn => log::Level::Warn,
            LogLevel::Error => log::Level::Error,
        };
        log::log(level, message);
    }

    fn config(&self) -> String {
        config::get()
    }

    fn config_is_fixed(&self) -> bool {
        true
    }
}

/// The [`Host`] of a world with an import of its own: a [`WasmHost`] that can also describe
/// the candidates (the router world imports `candidates`) or tell the market (the meter world
/// imports `market`). Only a world's glue may call its own imports.
struct WorldHost {
    describe: fn(u32) -> Option<CandidateInfo>,
    market: fn(&str) -> Option<Market>,
}

/// A router's host.
const ROUTER_HOST: WorldHost = WorldHost {
    describe: |index| {
        router::garage::policy0_2_0::candidates::describe(index).map(|info| CandidateInfo {
            id: info.id,
            rig: info.rig,
            operator: info.operator,
            labels: info.labels,
        })
    },
    market: |_| None,
};

/// A meter's host.
const METER_HOST: WorldHost = WorldHost {
    describe: |_| None,
    market: |model| meter::garage::policy0_5_0::market::get(model).map(Market::from),
};

impl Host for WorldHost {
    fn kv_get(&self, key: &str) -> Option<Vec<u8>> {
        WasmHost.kv_get(key)
    }

    fn kv_set(&self, key: &str, value: &[u8], ttl_ms: Option<u64>) {
        WasmHost.kv_set(key, value, ttl_ms);
    }

    fn kv_delete(&self, key: &str) {
        WasmHost.kv_delete(key);
    }

    fn kv_incr(&self, key: &str, delta: i64, ttl_ms: Option<u64>) -> i64 {
        WasmHost.kv_incr(key, delta, ttl_ms)
    }

    fn kv_reserve(&self, key: &str, amount: i64, limit: i64, ttl_ms: Option<u64>) -> Option<i64> {
        WasmHost.kv_reserve(key, amount, limit, ttl_ms)
    }

    fn now_ms(&self) -> u64 {
        WasmHost.now_ms()
    }

    fn log(&self, level: LogLevel, message: &str) {
        WasmHost.log(level, message);
    }

    fn config(&self) -> String {
        WasmHost.config()
    }

    fn config_is_fixed(&self) -> bool {
        WasmHost.config_is_fixed()
    }

    fn candidate(&self, index: u32) -> Option<CandidateInfo> {
        (self.describe)(index)
    }

    fn market(&self, model: &str) -> Option<Market> {
        (self.market)(model)
    }
}

/// `route` of the `router` world, for `export_router!`.
pub fn route<P: Router>(
    request: wit::RouteRequest,
    candidates: wit_v0_6::CandidateColumns,
) -> Result<Vec<u32>, String> {
    let request = RouteRequest::from(request);
    // The columns move into the SDK's type as they are: no copy, no conversion per candidate.
    let wit_v0_6::CandidateColumns {
        key,
        in_flight,
        engine_running,
        engine_waiting,
        kv_cache_usage,
        tokens_per_second,
        latency_ms,
        gpu_utilization,
        gpu_memory_free_bytes,
        trust,
    } = candidates;
    let candidates = Candidates::from_columns(
        key,
        in_flight,
        engine_running,
        engine_waiting,
        kv_cache_usage,
        tokens_per_second,
        latency_ms,
        gpu_utilization,
        gpu_memory_free_bytes,
        trust,
    )?;
    P::route(&ROUTER_HOST, &request, &candidates)
}

/// `admit` of the `rate-limiter` world, for `export_rate_limiter!`.
pub fn admit<P: RateLimiter>(request: wit::Admission) -> wit_v0_7::Admitted {
    let decision = P::admit(&WasmHost, &Admission::from(request));
    let (settle, unlimited_ms) = (decision.settle, decision.unlimited_ms);
    wit_v0_7::Admitted {
        decision: decision.into(),
        settle,
        unlimited_ms,
    }
}

/// `settle` of the `rate-limiter` world, for `export_rate_limiter!`.
pub fn settle<P: RateLimiter>(settlement: wit::Settlement) {
    P::settle(&WasmHost, &Settlement::from(settlement));
}

/// `quote` of the `meter` world, for `export_meter!`.
pub fn quote<P: Meter>(request: wit_v0_5::QuoteRequest) -> Result<Option<wit_v0_5::Price>, String> {
    let request = QuoteRequest {
        model: request.model,
        batch: request.batch,
    };
    P::quote(&METER_HOST, &request).map(|price| price.map(Into::into))
}

/// `charge` of the `meter` world, for `export_meter!`: the plugin's `charge_all` of the run
/// (by default its `charge` of each event).
pub fn charge<P: Meter>(
    events: Vec<wit_v0_5::UsageEvent>,
) -> Vec<Result<wit_v0_5::Charge, String>> {
    let events: Vec<UsageEvent> = events.into_iter().map(UsageEvent::from).collect();
    P::charge_all(&METER_HOST, &events)
        .into_iter()
        .map(|charge| charge.map(Into::into))
        .collect()
}

/// `on-usage` of the `reward` world, for `export_reward!`: the plugin's `on_usage` of each
/// event.
pub fn on_usage<P: Reward>(
    events: Vec<wit_v0_5::UsageEvent>,
) -> Vec<Result<Vec<wit::Award>, String>> {
    events
        .into_iter()
        .map(|event| P::on_usage(&WasmHost, &UsageEvent::from(event)).map(awards))
        .collect()
}

/// `on-report` of the `reward` world, for `export_reward!`.
pub fn on_report<P: Reward>(report: wit::RigReport) -> Result<Vec<wit::Award>, String> {
    P::on_report(&WasmHost, &RigReport::from(report)).map(awards)
}

fn awards(awards: Vec<Award>) -> Vec<wit::Award> {
    awards
        .into_iter()
        .map(|a| wit::Award {
            operator: a.operator,
            points: a.points,
            reason: a.reason,
        })
        .collect()
}

impl From<wit::RouteRequest> for RouteRequest {
    fn from(r: wit::RouteRequest) -> Self {
        Self {
            model: r.model,
            key_id: r.key_id,
            prefix_hash: r.prefix_hash,
            prompt_tokens: r.prompt_tokens,
            max_tokens: r.max_tokens,
            stream: r.stream,
        }
    }
}

impl From<wit_v0_4::Trust> for Trust {
    fn from(t: wit_v0_4::Trust) -> Self {
        match t {
            wit_v0_4::Trust::Configured => Trust::Configured,
            wit_v0_4::Trust::Unverified => Trust::Unverified,
            wit_v0_4::Trust::Verified => Trust::Verified,
            wit_v0_4::Trust::Suspect => Trust::Suspect,
            wit_v0_4::Trust::Quarantined => Trust::Quarantined,
        }
    }
}

impl From<wit::Admission> for Admission {
    fn from(a: wit::Admission) -> Self {
        Self {
            request_id: a.request_id,
            key_id: a.key_id,
            model: a.model,
            reserved_tokens: a.reserved_tokens,
            key_metadata: a.key_metadata,
        }
    }
}

impl From<Decision> for wit::Decision {
    fn from(d: Decision) -> Self {
        let h: RateLimitHeaders = d.headers;
        Self {
            allow: d.allow,
            retry_after_ms: d.retry_after_ms,
            reason: d.reason,
            headers: wit::RateLimitHeaders {
                limit_requests: h.limit_requests,
                remaining_requests: h.remaining_requests,
                reset_requests_ms: h.reset_requests_ms,
                limit_tokens: h.limit_tokens,
                remaining_tokens: h.remaining_tokens,
                reset_tokens_ms: h.reset_tokens_ms,
            },
        }
    }
}

impl From<wit::Settlement> for Settlement {
    fn from(s: wit::Settlement) -> Self {
        Self {
            request_id: s.request_id,
            key_id: s.key_id,
            model: s.model,
            reserved_tokens: s.reserved_tokens,
            used_tokens: s.used_tokens,
        }
    }
}

impl From<wit_v0_5::UsageEvent> for UsageEvent {
    fn from(e: wit_v0_5::UsageEvent) -> Self {
        Self {
            request_id: e.request_id,
            key_id: e.key_id,
            model: e.model,
            prompt_tokens: e.prompt_tokens,
            completion_tokens: e.completion_tokens,
            cached_tokens: e.cached_tokens,
            latency_ms: e.latency_ms,
            ttft_ms: e.ttft_ms,
            backend: e.backend,
            rig: e.rig,
            operator: e.operator,
            started_at_ms: e.started_at_ms,
            finished_at_ms: e.finished_at_ms,
            batch: e.batch,
            counted_by: match e.counted_by {
                wit_v0_4::CountedBy::Gateway => CountedBy::Gateway,
                wit_v0_4::CountedBy::Backend => CountedBy::Backend,
            },
            reported_prompt_tokens: e.reported_prompt_tokens,
            reported_completion_tokens: e.reported_completion_tokens,
            trust: e.trust.into(),
            price: e.price.map(Price::from),
        }
    }
}

impl From<wit_v0_5::Price> for Price {
    fn from(p: wit_v0_5::Price) -> Self {
        Self {
            prompt_per_thousand: p.prompt_per_thousand,
            completion_per_thousand: p.completion_per_thousand,
        }
    }
}

impl From<Price> for wit_v0_5::Price {
    fn from(p: Price) -> Self {
        Self {
            prompt_per_thousand: p.prompt_per_thousand,
            completion_per_thousand: p.completion_per_thousand,
        }
    }
}

impl From<wit_v0_5::Market> for Market {
    fn from(m: wit_v0_5::Market) -> Self {
        Self {
            model: m.model,
            rigs: m.rigs,
            capacity_tokens_per_second: m.capacity_tokens_per_second,
            utilization: m.utilization,
            queue_depth: m.queue_depth,
            in_flight: m.in_flight,
            demand_requests_per_minute: m.demand_requests_per_minute,
        }
    }
}

impl From<Charge> for wit_v0_5::Charge {
    fn from(c: Charge) -> Self {
        Self {
            credits: c.credits,
            budget_exhausted: c.budget_exhausted,
            exhausted_until_ms: c.exhausted_until_ms,
            budgets: c
                .budgets
                .into_iter()
                .map(|b| wit_v0_5::BudgetUse {
                    period: match b.period {
                        BudgetPeriod::Lifetime => wit_v0_5::BudgetPeriod::Lifetime,
                        BudgetPeriod::Day => wit_v0_5::BudgetPeriod::Day,
                        BudgetPeriod::Week => wit_v0_5::BudgetPeriod::Week,
                        BudgetPeriod::Month => wit_v0_5::BudgetPeriod::Month,
                    },
                    spent: b.spent,
                    limit: b.limit,
                    starts_at_ms: b.starts_at_ms,
                    resets_at_ms: b.resets_at_ms,
                })
                .collect(),
        }
    }
}

impl From<wit::RigReport> for RigReport {
    fn from(r: wit::RigReport) -> Self {
        Self {
            rig: r.rig,
            operator: r.operator,
            period_ms: r.period_ms,
            uptime_ms: r.uptime_ms,
            gpu_seconds: r.gpu_seconds,
            at_ms: r.at_ms,
        }
    }
}
