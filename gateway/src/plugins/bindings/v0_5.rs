//! `garage:policy@0.5.0`: the meter quotes prices (which may follow the market, through the
//! new `market` import) and charges each event at the price it was quoted; the reward world
//! takes the same events, price included.
//!
//! Its other imports and records are 0.2.0's and 0.4.0's (`wit/v0.5/policy.wit`), mapped onto
//! the types [`v0_2`](super::v0_2) and [`v0_4`](super::v0_4) generate. Its `usage-event` and
//! `charge` are the gateway's own (`plugins::types`): older versions get them converted down.
//! The router and rate limiter worlds of 0.5.0 are 0.4.0's and 0.3.0's.

use wasmtime::Store;
use wasmtime::component::InstancePre;

use super::{Answer, Call};
use crate::plugins::Slot;
use crate::plugins::state::HostState;

mod meter_world {
    wasmtime::component::bindgen!({
        path: "../wit/v0.5",
        world: "garage:policy/meter@0.5.0",
        exports: { default: async },
        with: {
            "garage:policy/types@0.4.0": crate::plugins::bindings::v0_4::types,
            "garage:policy/kv@0.2.0": crate::plugins::bindings::v0_2::interfaces::kv,
            "garage:policy/clock@0.2.0": crate::plugins::bindings::v0_2::interfaces::clock,
            "garage:policy/log@0.2.0": crate::plugins::bindings::v0_2::interfaces::log,
            "garage:policy/config@0.2.0": crate::plugins::bindings::v0_2::interfaces::config,
        },
        additional_derives: [serde::Serialize, serde::Deserialize, PartialEq],
    });
}

mod reward_world {
    wasmtime::component::bindgen!({
        path: "../wit/v0.5",
        world: "garage:policy/reward@0.5.0",
        exports: { default: async },
        with: {
            "garage:policy/types@0.5.0": super::meter_world::garage::policy0_5_0::types,
            "garage:policy/types@0.4.0": crate::plugins::bindings::v0_4::types,
            "garage:policy/types@0.2.0": crate::plugins::bindings::v0_2::interfaces::types,
            "garage:policy/kv@0.2.0": crate::plugins::bindings::v0_2::interfaces::kv,
            "garage:policy/clock@0.2.0": crate::plugins::bindings::v0_2::interfaces::clock,
            "garage:policy/log@0.2.0": crate::plugins::bindings::v0_2::interfaces::log,
            "garage:policy/config@0.2.0": crate::plugins::bindings::v0_2::interfaces::config,
        },
    });
}

use meter_world::garage::policy0_5_0::market;

/// The records new in `garage:policy@0.5.0`.
pub mod types {
    pub use super::meter_world::garage::policy0_5_0::types::*;
}

/// A component of this version, checked against its slot's world. `None` for the router and
/// the rate limiter, whose worlds are older versions'.
pub(crate) enum Prepared {
    Meter(meter_world::MeterPre<HostState>),
    Reward(reward_world::RewardPre<HostState>),
}

impl Prepared {
    pub(crate) fn new(
        slot: Slot,
        pre: InstancePre<HostState>,
    ) -> Option<wasmtime::Result<Prepared>> {
        Some(match slot {
            Slot::Router | Slot::RateLimiter => return None,
            Slot::Meter => meter_world::MeterPre::new(pre).map(Prepared::Meter),
            Slot::Reward => reward_world::RewardPre::new(pre).map(Prepared::Reward),
        })
    }

    pub(crate) async fn instantiate(&self, store: &mut Store<HostState>) -> wasmtime::Result<Live> {
        Ok(match self {
            Prepared::Meter(pre) => Live::Meter(pre.instantiate_async(store).await?),
            Prepared::Reward(pre) => Live::Reward(pre.instantiate_async(store).await?),
        })
    }
}

/// The exports of one instance of this version.
pub(crate) enum Live {
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
            (Live::Meter(meter), Call::Quote(request, market)) => {
                store.data_mut().set_market(Some(market.clone()));
                let answer = meter.call_quote(&mut *store, request).await;
                store.data_mut().set_market(None);
                Answer::Quote(Some(answer?))
            }
            (Live::Meter(meter), Call::Charge(events)) => {
                Answer::Charge(meter.call_charge(store, events).await?)
            }
            (Live::Reward(reward), Call::OnUsage(events)) => {
                Answer::OnUsage(reward.call_on_usage(store, events).await?)
            }
            (Live::Reward(reward), Call::OnReport(report)) => {
                Answer::Awards(reward.call_on_report(store, report).await?)
            }
            (_, call) => wasmtime::bail!(
                "internal: `{}` called on a plugin of another slot",
                call.export_name()
            ),
        })
    }
}

/// Adds the interfaces new in this version (its records, and `market`) to `linker`; the others
/// are older versions', linked by their modules.
pub(crate) fn add_to_linker(
    linker: &mut wasmtime::component::Linker<HostState>,
) -> wasmtime::Result<()> {
    use wasmtime::component::HasSelf;
    meter_world::garage::policy0_5_0::types::add_to_linker::<HostState, HasSelf<HostState>>(
        linker,
        |state| state,
    )?;
    market::add_to_linker::<HostState, HasSelf<HostState>>(linker, |state| state)
}

impl meter_world::garage::policy0_5_0::types::Host for HostState {}

impl market::Host for HostState {
    fn get(&mut self, model: String) -> Option<types::Market> {
        self.market().filter(|m| m.model == model).cloned()
    }
}

/// A usage event as components of 0.4.0 take it: without the price it was quoted.
pub(super) fn older_event(e: &crate::plugins::UsageEvent) -> super::v0_4::types::UsageEvent {
    super::v0_4::types::UsageEvent {
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
        counted_by: e.counted_by,
        reported_prompt_tokens: e.reported_prompt_tokens,
        reported_completion_tokens: e.reported_completion_tokens,
        trust: e.trust,
    }
}

/// A charge of a 0.4.0 component, as the gateway keeps it: no budgets reported.
pub(super) fn newer_charge(c: super::v0_4::types::Charge) -> crate::plugins::Charge {
    crate::plugins::Charge {
        credits: c.credits,
        budget_exhausted: c.budget_exhausted,
        exhausted_until_ms: c.exhausted_until_ms,
        budgets: Vec::new(),
    }
}
