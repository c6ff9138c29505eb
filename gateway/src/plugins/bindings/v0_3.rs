//! `garage:policy@0.3.0`: the rate limiter, meter and reward worlds of 0.3.0, whose exports take
//! events in lists and tell the gateway when a `settle` is needed.
//!
//! Their imports and records are 0.2.0's (`wit/v0.3/policy.wit`), mapped here onto the types
//! [`v0_2`](super::v0_2) generates: one Rust type per record, one implementation per import,
//! whichever version a component speaks. The router world of 0.3.0 is 0.2.0's, so a router of
//! either version loads through `v0_2`; the rate limiter world of 0.4.0 is this one's, so a
//! limiter of either loads here. Usage events are converted down from 0.4.0's.

use wasmtime::Store;
use wasmtime::component::InstancePre;

use super::{Answer, Call};
use crate::plugins::Slot;
use crate::plugins::state::HostState;

mod rate_limiter_world {
    wasmtime::component::bindgen!({
        path: "../wit/v0.3",
        world: "garage:policy/rate-limiter@0.3.0",
        exports: { default: async },
        with: {
            "garage:policy/types@0.2.0": crate::plugins::bindings::v0_2::interfaces::types,
            "garage:policy/kv@0.2.0": crate::plugins::bindings::v0_2::interfaces::kv,
            "garage:policy/clock@0.2.0": crate::plugins::bindings::v0_2::interfaces::clock,
            "garage:policy/log@0.2.0": crate::plugins::bindings::v0_2::interfaces::log,
            "garage:policy/config@0.2.0": crate::plugins::bindings::v0_2::interfaces::config,
        },
    });
}

mod meter_world {
    wasmtime::component::bindgen!({
        path: "../wit/v0.3",
        world: "garage:policy/meter@0.3.0",
        exports: { default: async },
        with: {
            "garage:policy/types@0.2.0": crate::plugins::bindings::v0_2::interfaces::types,
            "garage:policy/kv@0.2.0": crate::plugins::bindings::v0_2::interfaces::kv,
            "garage:policy/clock@0.2.0": crate::plugins::bindings::v0_2::interfaces::clock,
            "garage:policy/log@0.2.0": crate::plugins::bindings::v0_2::interfaces::log,
            "garage:policy/config@0.2.0": crate::plugins::bindings::v0_2::interfaces::config,
        },
    });
}

mod reward_world {
    wasmtime::component::bindgen!({
        path: "../wit/v0.3",
        world: "garage:policy/reward@0.3.0",
        exports: { default: async },
        with: {
            "garage:policy/types@0.2.0": crate::plugins::bindings::v0_2::interfaces::types,
            "garage:policy/kv@0.2.0": crate::plugins::bindings::v0_2::interfaces::kv,
            "garage:policy/clock@0.2.0": crate::plugins::bindings::v0_2::interfaces::clock,
            "garage:policy/log@0.2.0": crate::plugins::bindings::v0_2::interfaces::log,
            "garage:policy/config@0.2.0": crate::plugins::bindings::v0_2::interfaces::config,
        },
    });
}

/// A component of this version, checked against its slot's world. `None` for the router,
/// whose world is 0.2.0's.
pub(crate) enum Prepared {
    RateLimiter(rate_limiter_world::RateLimiterPre<HostState>),
    Meter(meter_world::MeterPre<HostState>),
    Reward(reward_world::RewardPre<HostState>),
}

impl Prepared {
    pub(crate) fn new(
        slot: Slot,
        pre: InstancePre<HostState>,
    ) -> Option<wasmtime::Result<Prepared>> {
        Some(match slot {
            Slot::Router => return None,
            Slot::RateLimiter => {
                rate_limiter_world::RateLimiterPre::new(pre).map(Prepared::RateLimiter)
            }
            Slot::Meter => meter_world::MeterPre::new(pre).map(Prepared::Meter),
            Slot::Reward => reward_world::RewardPre::new(pre).map(Prepared::Reward),
        })
    }

    pub(crate) async fn instantiate(&self, store: &mut Store<HostState>) -> wasmtime::Result<Live> {
        Ok(match self {
            Prepared::RateLimiter(pre) => Live::RateLimiter(pre.instantiate_async(store).await?),
            Prepared::Meter(pre) => Live::Meter(pre.instantiate_async(store).await?),
            Prepared::Reward(pre) => Live::Reward(pre.instantiate_async(store).await?),
        })
    }
}

/// The exports of one instance of this version.
pub(crate) enum Live {
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
            (Live::RateLimiter(limiter), Call::Admit(admission)) => {
                let admitted = limiter.call_admit(store, admission).await?;
                Answer::Admit {
                    decision: admitted.decision,
                    settle: admitted.settle,
                    unlimited_ms: 0,
                }
            }
            (Live::RateLimiter(limiter), Call::Settle(settlement)) => {
                limiter.call_settle(store, settlement).await?;
                Answer::Settle
            }
            (Live::Meter(meter), Call::Charge(events)) => {
                let events: Vec<_> = events.iter().map(super::v0_2::older_event).collect();
                let answers = meter.call_charge(store, &events).await?;
                Answer::Charge(
                    answers
                        .into_iter()
                        .map(|answer| answer.map(super::v0_2::newer_charge))
                        .collect(),
                )
            }
            (Live::Reward(reward), Call::OnUsage(events)) => {
                let events: Vec<_> = events.iter().map(super::v0_2::older_event).collect();
                Answer::OnUsage(reward.call_on_usage(store, &events).await?)
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

/// Adds the interfaces new in this version (the records of `types`) to `linker`; the others
/// are 0.2.0's, linked by [`v0_2`](super::v0_2).
pub(crate) fn add_to_linker(
    linker: &mut wasmtime::component::Linker<HostState>,
) -> wasmtime::Result<()> {
    use wasmtime::component::HasSelf;
    rate_limiter_world::garage::policy0_3_0::types::add_to_linker::<HostState, HasSelf<HostState>>(
        linker,
        |state| state,
    )
}

impl rate_limiter_world::garage::policy0_3_0::types::Host for HostState {}
