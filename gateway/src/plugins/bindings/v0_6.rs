//! `garage:policy@0.6.0`: the router world whose candidates come as columns (a list per field,
//! `candidate-columns`), which wasmtime copies into the guest as one block per list, where
//! 0.4.0's `list<candidate>` is lowered record by record, field by field.
//!
//! Only the router world is new (`wit/v0.6/policy.wit`); its imports and `route-request` are
//! 0.2.0's, mapped onto the types [`v0_2`](super::v0_2) generates. The host keeps candidates
//! as rows (0.4.0's `candidate`, what older routers, replays and shadows take); a call into a
//! router of this version turns them into columns once, into buffers each thread reuses.

use std::cell::RefCell;

use wasmtime::Store;
use wasmtime::component::InstancePre;

use super::{Answer, Call};
use crate::plugins::Slot;
use crate::plugins::state::HostState;
use crate::plugins::types::{Candidate, Trust};

mod router_world {
    wasmtime::component::bindgen!({
        path: "../wit/v0.6",
        world: "garage:policy/router@0.6.0",
        exports: { default: async },
        with: {
            "garage:policy/types@0.2.0": crate::plugins::bindings::v0_2::interfaces::types,
            "garage:policy/candidates@0.2.0": crate::plugins::bindings::v0_2::interfaces::candidates,
            "garage:policy/kv@0.2.0": crate::plugins::bindings::v0_2::interfaces::kv,
            "garage:policy/clock@0.2.0": crate::plugins::bindings::v0_2::interfaces::clock,
            "garage:policy/log@0.2.0": crate::plugins::bindings::v0_2::interfaces::log,
            "garage:policy/config@0.2.0": crate::plugins::bindings::v0_2::interfaces::config,
        },
    });
}

/// The records new in `garage:policy@0.6.0`.
pub mod types {
    pub use super::router_world::garage::policy0_6_0::types::*;
}

use types::CandidateColumns;

/// A component of this version, checked against its slot's world. `None` for every slot but
/// the router, whose world alone is new.
pub(crate) enum Prepared {
    Router(router_world::RouterPre<HostState>),
}

impl Prepared {
    pub(crate) fn new(
        slot: Slot,
        pre: InstancePre<HostState>,
    ) -> Option<wasmtime::Result<Prepared>> {
        match slot {
            Slot::Router => Some(router_world::RouterPre::new(pre).map(Prepared::Router)),
            Slot::RateLimiter | Slot::Meter | Slot::Reward => None,
        }
    }

    pub(crate) async fn instantiate(&self, store: &mut Store<HostState>) -> wasmtime::Result<Live> {
        Ok(match self {
            Prepared::Router(pre) => Live::Router(pre.instantiate_async(store).await?),
        })
    }
}

/// The exports of one instance of this version.
pub(crate) enum Live {
    Router(router_world::Router),
}

impl Live {
    pub(crate) async fn call(
        &self,
        store: &mut Store<HostState>,
        call: Call<'_>,
    ) -> wasmtime::Result<Answer> {
        match (self, call) {
            (Live::Router(router), Call::Route(input)) => {
                let columns = Columns::of(&input.candidates);
                store.data_mut().set_candidates(Some(&input.infos));
                let answer = router
                    .call_route(&mut *store, &input.request, &columns.0)
                    .await;
                store.data_mut().set_candidates(None);
                Ok(Answer::Route(answer?))
            }
            (_, call) => wasmtime::bail!(
                "internal: `{}` called on a plugin of another slot",
                call.export_name()
            ),
        }
    }
}

thread_local! {
    /// Column buffers kept between calls, so a call allocates nothing once its thread has
    /// routed as many candidates before.
    static SPARE: RefCell<Option<CandidateColumns>> = const { RefCell::new(None) };
}

/// One call's columns, given back to the thread's spare when the call is over (which may be
/// another thread than the one that took it: a spare is a spare).
struct Columns(CandidateColumns);

impl Columns {
    fn of(candidates: &[Candidate]) -> Columns {
        let mut c = SPARE
            .with(|spare| spare.borrow_mut().take())
            .unwrap_or_else(empty);
        let n = candidates.len();
        // Each column sized once, then one pass over the rows writes every column: a row is
        // read once, not once per column.
        c.key.resize(n, 0);
        c.in_flight.resize(n, 0);
        c.engine_running.resize(n, 0);
        c.engine_waiting.resize(n, 0);
        c.kv_cache_usage.resize(n, 0.0);
        c.tokens_per_second.resize(n, 0.0);
        c.latency_ms.resize(n, 0.0);
        c.gpu_utilization.resize(n, 0.0);
        c.gpu_memory_free_bytes.resize(n, 0);
        c.trust.resize(n, 0);
        let columns = c
            .key
            .iter_mut()
            .zip(&mut c.in_flight)
            .zip(&mut c.engine_running)
            .zip(&mut c.engine_waiting)
            .zip(&mut c.kv_cache_usage)
            .zip(&mut c.tokens_per_second)
            .zip(&mut c.latency_ms)
            .zip(&mut c.gpu_utilization)
            .zip(&mut c.gpu_memory_free_bytes)
            .zip(&mut c.trust);
        for (
            x,
            (
                ((((((((key, in_flight), running), waiting), kv), speed), latency), gpu), free),
                trust,
            ),
        ) in candidates.iter().zip(columns)
        {
            *key = x.key;
            *in_flight = x.in_flight;
            *running = x.engine_running;
            *waiting = x.engine_waiting;
            *kv = x.kv_cache_usage;
            *speed = x.tokens_per_second;
            *latency = x.latency_ms;
            *gpu = x.gpu_utilization;
            *free = x.gpu_memory_free_bytes;
            *trust = trust_code(x.trust);
        }
        Columns(c)
    }
}

impl Drop for Columns {
    fn drop(&mut self) {
        // Buffers grown by a call over many candidates are not kept: a spare holds at most a
        // few kilobytes.
        if self.0.key.capacity() <= MAX_SPARE {
            let columns = std::mem::replace(&mut self.0, empty());
            SPARE.with(|spare| *spare.borrow_mut() = Some(columns));
        }
    }
}

/// Candidates whose column buffers a thread keeps between calls (about 45 bytes each).
const MAX_SPARE: usize = 4096;

fn empty() -> CandidateColumns {
    CandidateColumns {
        key: Vec::new(),
        in_flight: Vec::new(),
        engine_running: Vec::new(),
        engine_waiting: Vec::new(),
        kv_cache_usage: Vec::new(),
        tokens_per_second: Vec::new(),
        latency_ms: Vec::new(),
        gpu_utilization: Vec::new(),
        gpu_memory_free_bytes: Vec::new(),
        trust: Vec::new(),
    }
}

/// A trust's number in `candidate-columns.trust`: its position in 0.4.0's `trust` enum.
pub(crate) fn trust_code(trust: Trust) -> u8 {
    match trust {
        Trust::Configured => 0,
        Trust::Unverified => 1,
        Trust::Verified => 2,
        Trust::Suspect => 3,
        Trust::Quarantined => 4,
    }
}

/// Adds the interfaces new in this version to `linker`: none the guest imports (its `types`
/// holds records only, and the router's imports are 0.2.0's, linked by
/// [`v0_2`](super::v0_2)).
pub(crate) fn add_to_linker(
    linker: &mut wasmtime::component::Linker<HostState>,
) -> wasmtime::Result<()> {
    use wasmtime::component::HasSelf;
    router_world::garage::policy0_6_0::types::add_to_linker::<HostState, HasSelf<HostState>>(
        linker,
        |state| state,
    )
}

impl router_world::garage::policy0_6_0::types::Host for HostState {}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(key: u64, trust: Trust) -> Candidate {
        Candidate {
            key,
            in_flight: key as u32,
            engine_running: 1,
            engine_waiting: 2,
            kv_cache_usage: 0.5,
            tokens_per_second: 40.0,
            latency_ms: 12.0,
            gpu_utilization: 0.25,
            gpu_memory_free_bytes: 1 << 33,
            trust,
        }
    }

    #[test]
    fn rows_become_columns_and_the_buffers_are_reused() {
        let rows = [
            candidate(7, Trust::Verified),
            candidate(9, Trust::Quarantined),
        ];
        let first = Columns::of(&rows);
        assert_eq!(first.0.key, [7, 9]);
        assert_eq!(first.0.in_flight, [7, 9]);
        assert_eq!(first.0.trust, [2, 4]);
        assert_eq!(first.0.gpu_memory_free_bytes, [1 << 33, 1 << 33]);
        let buffer = first.0.key.as_ptr();
        drop(first);
        let second = Columns::of(&rows[..1]);
        assert_eq!(second.0.key, [7]);
        assert_eq!(second.0.trust, [2]);
        assert_eq!(second.0.key.as_ptr(), buffer, "the spare buffer is reused");
    }

    /// The spare buffers of a bigger call never leak into a smaller one's columns, nor a
    /// smaller one's into the next bigger one: every column is exactly this call's rows.
    #[test]
    fn columns_are_this_calls_rows_whatever_the_spare_held() {
        let rows = |n: u64, trust: Trust| -> Vec<Candidate> {
            (0..n)
                .map(|i| Candidate {
                    in_flight: (n + i) as u32,
                    engine_running: i as u32 * 3,
                    kv_cache_usage: i as f32 / 100.0,
                    gpu_memory_free_bytes: n << 20 | i,
                    ..candidate(n * 1000 + i, trust)
                })
                .collect()
        };
        for (n, trust) in [
            (1000, Trust::Suspect),
            (3, Trust::Verified),
            (0, Trust::Configured),
            (40, Trust::Quarantined),
            (7, Trust::Unverified),
        ] {
            let rows = rows(n, trust);
            let columns = Columns::of(&rows);
            let c = &columns.0;
            assert_eq!(c.key, rows.iter().map(|r| r.key).collect::<Vec<_>>());
            assert_eq!(
                c.in_flight,
                rows.iter().map(|r| r.in_flight).collect::<Vec<_>>()
            );
            assert_eq!(
                c.engine_running,
                rows.iter().map(|r| r.engine_running).collect::<Vec<_>>()
            );
            assert_eq!(c.engine_waiting, vec![2; rows.len()]);
            assert_eq!(
                c.kv_cache_usage,
                rows.iter().map(|r| r.kv_cache_usage).collect::<Vec<_>>()
            );
            assert_eq!(c.tokens_per_second, vec![40.0; rows.len()]);
            assert_eq!(c.latency_ms, vec![12.0; rows.len()]);
            assert_eq!(c.gpu_utilization, vec![0.25; rows.len()]);
            assert_eq!(
                c.gpu_memory_free_bytes,
                rows.iter()
                    .map(|r| r.gpu_memory_free_bytes)
                    .collect::<Vec<_>>()
            );
            assert_eq!(c.trust, vec![trust_code(trust); rows.len()], "{n} rows");
        }
    }

    #[test]
    fn trust_codes_are_the_enum_positions_the_wit_documents() {
        let all = [
            Trust::Configured,
            Trust::Unverified,
            Trust::Verified,
            Trust::Suspect,
            Trust::Quarantined,
        ];
        let codes: Vec<u8> = all.into_iter().map(trust_code).collect();
        assert_eq!(codes, [0, 1, 2, 3, 4]);
    }
}
