//! `garage:policy@0.2.0`: bindings for the four worlds and the glue from its imports to
//! [`HostState`].
//!
//! The router world generates the shared interfaces (`types`, `kv`, `clock`, `log`, `config`,
//! and its own `candidates`);
//! the other worlds reuse them through `with`, so a record such as `usage-event` is one Rust type
//! whichever world uses it, and each import is implemented once.

use wasmtime::Store;
use wasmtime::component::{HasSelf, InstancePre, Linker};

use super::{Answer, Call};
use crate::plugins::Slot;
use crate::plugins::state::{HostState, LogLevel};

mod router_world {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "router",
        // The key-value store is async (Redis) and can fail: a failure traps the guest, which
        // the host reports as a host fault rather than the plugin's.
        imports: { "garage:policy/kv": async | trappable },
        exports: { default: async },
        // Usage events travel through the store's durable queue; the admin API shows records.
        additional_derives: [serde::Serialize, serde::Deserialize, PartialEq],
    });
}

mod rate_limiter_world {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "rate-limiter",
        exports: { default: async },
        with: {
            "garage:policy/types": super::router_world::garage::policy::types,
            "garage:policy/kv": super::router_world::garage::policy::kv,
            "garage:policy/clock": super::router_world::garage::policy::clock,
            "garage:policy/log": super::router_world::garage::policy::log,
            "garage:policy/config": super::router_world::garage::policy::config,
        },
    });
}

mod meter_world {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "meter",
        exports: { default: async },
        with: {
            "garage:policy/types": super::router_world::garage::policy::types,
            "garage:policy/kv": super::router_world::garage::policy::kv,
            "garage:policy/clock": super::router_world::garage::policy::clock,
            "garage:policy/log": super::router_world::garage::policy::log,
            "garage:policy/config": super::router_world::garage::policy::config,
        },
    });
}

mod reward_world {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "reward",
        exports: { default: async },
        with: {
            "garage:policy/types": super::router_world::garage::policy::types,
            "garage:policy/kv": super::router_world::garage::policy::kv,
            "garage:policy/clock": super::router_world::garage::policy::clock,
            "garage:policy/log": super::router_world::garage::policy::log,
            "garage:policy/config": super::router_world::garage::policy::config,
        },
    });
}

use router_world::garage::policy::{candidates, clock, config, kv, log};

/// The interfaces of 0.2.0 as generated here, for the worlds of later versions, which import
/// them unchanged.
pub(crate) mod interfaces {
    pub use super::router_world::garage::policy::*;
}

/// The records of `garage:policy/types@0.2.0`.
pub mod types {
    pub use super::router_world::garage::policy::types::*;
}

pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    types::add_to_linker::<HostState, HasSelf<HostState>>(linker, |state| state)?;
    candidates::add_to_linker::<HostState, HasSelf<HostState>>(linker, |state| state)?;
    kv::add_to_linker::<HostState, HasSelf<HostState>>(linker, |state| state)?;
    clock::add_to_linker::<HostState, HasSelf<HostState>>(linker, |state| state)?;
    log::add_to_linker::<HostState, HasSelf<HostState>>(linker, |state| state)?;
    config::add_to_linker::<HostState, HasSelf<HostState>>(linker, |state| state)?;
    Ok(())
}

impl types::Host for HostState {}

impl kv::Host for HostState {
    async fn get(&mut self, key: String) -> wasmtime::Result<Option<Vec<u8>>> {
        self.kv_get(&key).await
    }

    async fn set(
        &mut self,
        key: String,
        value: Vec<u8>,
        ttl_ms: Option<u64>,
    ) -> wasmtime::Result<()> {
        self.kv_set(&key, &value, ttl_ms).await
    }

    async fn delete(&mut self, key: String) -> wasmtime::Result<()> {
        self.kv_delete(&key).await
    }

    async fn incr(
        &mut self,
        key: String,
        delta: i64,
        ttl_ms: Option<u64>,
    ) -> wasmtime::Result<i64> {
        self.kv_incr(&key, delta, ttl_ms).await
    }

    async fn reserve(
        &mut self,
        key: String,
        amount: i64,
        limit: i64,
        ttl_ms: Option<u64>,
    ) -> wasmtime::Result<Option<i64>> {
        self.kv_reserve(&key, amount, limit, ttl_ms).await
    }
}

impl candidates::Host for HostState {
    fn describe(&mut self, index: u32) -> Option<types::CandidateInfo> {
        self.candidate(index).cloned()
    }
}

impl clock::Host for HostState {
    fn now_ms(&mut self) -> u64 {
        self.clock_now_ms()
    }
}

impl log::Host for HostState {
    fn log(&mut self, level: log::Level, message: String) {
        let level = match level {
            log::Level::Debug => LogLevel::Debug,
            log::Level::Info => LogLevel::Info,
            log::Level::Warn => LogLevel::Warn,
            log::Level::Error => LogLevel::Error,
        };
        self.log_line(level, &message);
    }
}

impl config::Host for HostState {
    fn get(&mut self) -> String {
        self.config_json().to_owned()
    }
}

/// A component of this version, checked against its slot's world.
pub(crate) enum Prepared {
    Router(router_world::RouterPre<HostState>),
    RateLimiter(rate_limiter_world::RateLimiterPre<HostState>),
    Meter(meter_world::MeterPre<HostState>),
    Reward(reward_world::RewardPre<HostState>),
}

impl Prepared {
    pub(crate) fn new(slot: Slot, pre: InstancePre<HostState>) -> wasmtime::Result<Prepared> {
        Ok(match slot {
            Slot::Router => Prepared::Router(router_world::RouterPre::new(pre)?),
            Slot::RateLimiter => {
                Prepared::RateLimiter(rate_limiter_world::RateLimiterPre::new(pre)?)
            }
            Slot::Meter => Prepared::Meter(meter_world::MeterPre::new(pre)?),
            Slot::Reward => Prepared::Reward(reward_world::RewardPre::new(pre)?),
        })
    }

    pub(crate) async fn instantiate(&self, store: &mut Store<HostState>) -> wasmtime::Result<Live> {
        Ok(match self {
            Prepared::Router(pre) => Live::Router(pre.instantiate_async(store).await?),
            Prepared::RateLimiter(pre) => Live::RateLimiter(pre.instantiate_async(store).await?),
            Prepared::Meter(pre) => Live::Meter(pre.instantiate_async(store).await?),
            Prepared::Reward(pre) => Live::Reward(pre.instantiate_async(store).await?),
        })
    }
}

/// The exports of one instance of this version.
pub(crate) enum Live {
    Router(router_world::Router),
    RateLimiter(rate_limiter_world::RateLimiter),
    Meter(meter_world::Meter),
    Reward(reward_world::Reward),
}

impl Live {
    pub(crate) async fn call(
        &self,
        store: &mut Store<HostState>,
        call: Call<'_>,
    ) -> wasmtime::Result<Answer> {
        Ok(match (self, call) {
            (Live::Router(router), Call::Route(input)) => {
                store.data_mut().set_candidates(Some(&input.infos));
                let candidates: Vec<types::Candidate> =
                    input.candidates.iter().map(older_candidate).collect();
                let answer = router
                    .call_route(&mut *store, &input.request, &candidates)
                    .await;
                store.data_mut().set_candidates(None);
                Answer::Route(answer?)
            }
            (Live::RateLimiter(limiter), Call::Admit(admission)) => Answer::Admit {
                decision: limiter.call_admit(store, admission).await?,
                settle: true,
                unlimited_ms: 0,
            },
            (Live::RateLimiter(limiter), Call::Settle(settlement)) => {
                limiter.call_settle(store, settlement).await?;
                Answer::Settle
            }
            // One event per call in this version (the host sends one at a time; more are
            // called in turn).
            (Live::Meter(meter), Call::Charge(events)) => {
                let mut answers = Vec::with_capacity(events.len());
                for event in events {
                    let event = older_event(event);
                    let answer = meter.call_charge(&mut *store, &event).await?;
                    answers.push(answer.map(newer_charge));
                }
                Answer::Charge(answers)
            }
            (Live::Reward(reward), Call::OnUsage(events)) => {
                let mut answers = Vec::with_capacity(events.len());
                for event in events {
                    let event = older_event(event);
                    answers.push(reward.call_on_usage(&mut *store, &event).await?);
                }
                Answer::OnUsage(answers)
            }
            (Live::Reward(reward), Call::OnReport(report)) => {
                Answer::Awards(reward.call_on_report(store, report).await?)
            }
            // Meters before 0.5.0 quote no prices.
            (Live::Meter(_), Call::Quote(..)) => Answer::Quote(None),
            (_, call) => wasmtime::bail!(
                "internal: `{}` called on a plugin of another slot",
                call.export_name()
            ),
        })
    }
}

/// A candidate as components before 0.4.0 take it: without its trust.
fn older_candidate(c: &crate::plugins::Candidate) -> types::Candidate {
    types::Candidate {
        key: c.key,
        in_flight: c.in_flight,
        engine_running: c.engine_running,
        engine_waiting: c.engine_waiting,
        kv_cache_usage: c.kv_cache_usage,
        tokens_per_second: c.tokens_per_second,
        latency_ms: c.latency_ms,
        gpu_utilization: c.gpu_utilization,
        gpu_memory_free_bytes: c.gpu_memory_free_bytes,
    }
}

/// A usage event as components before 0.4.0 take it: without who counted it and the rig's
/// trust.
pub(super) fn older_event(e: &crate::plugins::UsageEvent) -> types::UsageEvent {
    types::UsageEvent {
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
    }
}

/// A charge of a component before 0.4.0, as the gateway keeps it: a spent budget holds until
/// further notice.
pub(super) fn newer_charge(c: types::Charge) -> crate::plugins::Charge {
    crate::plugins::Charge {
        credits: c.credits,
        budget_exhausted: c.budget_exhausted,
        exhausted_until_ms: None,
        budgets: Vec::new(),
    }
}
