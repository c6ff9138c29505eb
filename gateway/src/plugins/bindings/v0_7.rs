//! `garage:policy@0.7.0`: the rate limiter world whose `admit` may promise that a key's
//! requests for a model need not ask for a while (`admitted.unlimited-ms`).
//!
//! Only the rate limiter world is new (`wit/v0.7/policy.wit`); its imports and records other
//! than `admitted` are 0.2.0's, mapped onto the types [`v0_2`](super::v0_2) generates.

use wasmtime::Store;
use wasmtime::component::InstancePre;

use super::{Answer, Call};
use crate::plugins::Slot;
use crate::plugins::state::HostState;

mod rate_limiter_world {
    wasmtime::component::bindgen!({
        path: "../wit/v0.7",
        world: "garage:policy/rate-limiter@0.7.0",
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

/// A component of this version, checked against its slot's world. `None` for every slot but
/// the rate limiter, whose world alone is new.
pub(crate) enum Prepared {
    RateLimiter(rate_limiter_world::RateLimiterPre<HostState>),
}

impl Prepared {
    pub(crate) fn new(
        slot: Slot,
        pre: InstancePre<HostState>,
    ) -> Option<wasmtime::Result<Prepared>> {
        match slot {
            Slot::RateLimiter => {
                Some(rate_limiter_world::RateLimiterPre::new(pre).map(Prepared::RateLimiter))
            }
            Slot::Router | Slot::Meter | Slot::Reward => None,
        }
    }

    pub(crate) async fn instantiate(&self, store: &mut Store<HostState>) -> wasmtime::Result<Live> {
        Ok(match self {
            Prepared::RateLimiter(pre) => Live::RateLimiter(pre.instantiate_async(store).await?),
        })
    }
}

/// The exports of one instance of this version.
pub(crate) enum Live {
    RateLimiter(rate_limiter_world::RateLimiter),
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
                    unlimited_ms: admitted.unlimited_ms,
                }
            }
            (Live::RateLimiter(limiter), Call::Settle(settlement)) => {
                limiter.call_settle(store, settlement).await?;
                Answer::Settle
            }
            (_, call) => wasmtime::bail!(
                "internal: `{}` called on a plugin of another slot",
                call.export_name()
            ),
        })
    }
}

/// Adds the interfaces new in this version to `linker`: none the guest imports (its `types`
/// holds records only; the limiter's imports are 0.2.0's, linked by [`v0_2`](super::v0_2)).
pub(crate) fn add_to_linker(
    linker: &mut wasmtime::component::Linker<HostState>,
) -> wasmtime::Result<()> {
    use wasmtime::component::HasSelf;
    rate_limiter_world::garage::policy0_7_0::types::add_to_linker::<HostState, HasSelf<HostState>>(
        linker,
        |state| state,
    )
}

impl rate_limiter_world::garage::policy0_7_0::types::Host for HostState {}
