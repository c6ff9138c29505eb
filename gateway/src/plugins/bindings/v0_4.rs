//! `garage:policy@0.4.0`: the router, meter and reward worlds whose records carry what the
//! gateway's checks found (a candidate's trust; who counted a usage event's tokens, what the
//! backend reported, and the rig's trust when it served).
//!
//! Its imports and the records it does not redefine are 0.2.0's (`wit/v0.4/policy.wit`),
//! mapped onto the types [`v0_2`](super::v0_2) generates. Its `candidate` and `usage-event` are
//! the gateway's own (`plugins::types`): older versions get them converted down. The rate
//! limiter world of 0.4.0 is 0.3.0's, so a limiter of 0.4.0 loads through
//! [`v0_3`](super::v0_3).

use wasmtime::Store;
use wasmtime::component::InstancePre;

use super::{Answer, Call};
use crate::plugins::Slot;
use crate::plugins::state::HostState;

mod router_world {
    wasmtime::component::bindgen!({
        path: "../wit/v0.4",
        world: "garage:policy/router@0.4.0",
        exports: { default: async },
        with: {
            "garage:policy/types@0.2.0": crate::plugins::bindings::v0_2::interfaces::types,
            "garage:policy/candidates@0.2.0": crate::plugins::bindings::v0_2::interfaces::candidates,
            "garage:policy/kv@0.2.0": crate::plugins::bindings::v0_2::interfaces::kv,
            "garage:policy/clock@0.2.0": crate::plugins::bindings::v0_2::interfaces::clock,
            "garage:policy/log@0.2.0": crate::plugins::bindings::v0_2::interfaces::log,
            "garage:policy/config@0.2.0": crate::plugins::bindings::v0_2::interfaces::config,
        },
        additional_derives: [serde::Serialize, serde::Deserialize, PartialEq],
    });
}

mod meter_world {
    wasmtime::component::bindgen!({
        path: "../wit/v0.4",
        world: "garage:policy/meter@0.4.0",
        exports: { default: async },
        with: {
            "garage:policy/types@0.4.0": super::router_world::garage::policy0_4_0::types,
            "garage:policy/kv@0.2.0": crate::plugins::bindings::v0_2::interfaces::kv,
            "garage:policy/clock@0.2.0": crate::plugins::bindings::v0_2::interfaces::clock,
            "garage:policy/log@0.2.0": crate::plugins::bindings::v0_2::interfaces::log,
            "garage:policy/config@0.2.0": crate::plugins::bindings::v0_2::interfaces::config,
        },
    });
}

mod reward_world {
    wasmtime::component::bindgen!({
        path: "../wit/v0.4",
        world: "garage:policy/reward@0.4.0",
        exports: { default: async },
        with: {
            "garage:policy/types@0.4.0": super::router_world::garage::policy0_4_0::types,
            "garage:policy/types@0.2.0": crate::plugins::bindings::v0_2::interfaces::types,
            "garage:policy/kv@0.2.0": crate::plugins::bindings::v0_2::interfaces::kv,
            "garage:policy/clock@0.2.0": crate::plugins::bindings::v0_2::interfaces::clock,
            "garage:policy/log@0.2.0": crate::plugins::bindings::v0_2::interfaces::log,
            "garage:policy/config@0.2.0": crate::plugins::bindings::v0_2::interfaces::config,
        },
    });
}

/// The records new in `garage:policy@0.4.0`.
pub mod types {
    pub use super::router_world::garage::policy0_4_0::types::*;
}

/// A component of this version, checked against its slot's world. `None` for the rate
/// limiter, whose world is 0.3.0's.
pub(crate) enum Prepared {
    Router(router_world::RouterPre<HostState>),
    Meter(meter_world::MeterPre<HostState>),
    Reward(reward_world::RewardPre<HostState>),
}

impl Prepared {
    pub(crate) fn new(
        slot: Slot,
        pre: InstancePre<HostState>,
    ) -> Option<wasmtime::Result<Prepared>> {
        Some(match slot {
            Slot::RateLimiter => return None,
            Slot::Router => router_world::RouterPre::new(pre).map(Prepared::Router),
            Slot::Meter => meter_world::MeterPre::new(pre).map(Prepared::Meter),
            Slot::Reward => reward_world::RewardPre::new(pre).map(Prepared::Reward),
        })
    }

    pub(crate) async fn instantiate(&self, store: &mut Store<HostState>) -> wasmtime::Result<Live> {
        Ok(match self {
            Prepared::Router(pre) => Live::Router(pre.instantiate_async(store).await?),
            Prepared::Meter(pre) => Live::Meter(pre.instantiate_async(store).await?),
            Prepared::Reward(pre) => Live::Reward(pre.instantiate_async(store).await?),
        })
    }
}

/// The exports of one instance of this version.
pub(crate) enum Live {
    Router(router_world::Router),
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
                let answer = router
                    .call_route(&mut *store, &input.request, &input.candidates)
                    .await;
                store.data_mut().set_candidates(None);
                Answer::Route(answer?)
            }
            (Live::Meter(meter), Call::Charge(events)) => {
                let events: Vec<_> = events.iter().map(super::v0_5::older_event).collect();
                let answers = meter.call_charge(store, &events).await?;
                Answer::Charge(
                    answers
                        .into_iter()
                        .map(|answer| answer.map(super::v0_5::newer_charge))
                        .collect(),
                )
            }
            (Live::Reward(reward), Call::OnUsage(events)) => {
                let events: Vec<_> = events.iter().map(super::v0_5::older_event).collect();
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
    router_world::garage::policy0_4_0::types::add_to_linker::<HostState, HasSelf<HostState>>(
        linker,
        |state| state,
    )
}

impl router_world::garage::policy0_4_0::types::Host for HostState {}
