//! Default router: prompt-prefix affinity. Requests whose prompts start alike go to the same rig,
//! whose engine then serves the shared prefix from its KV cache instead of recomputing it.
//!
//! Each request's `prefix_hash` ranks the candidates by rendezvous hashing over their keys
//! (stable hashes of their ids), so every replica agrees and a rig joining or leaving moves
//! only its own share of prefixes. A
//! bounded-load rule keeps one hot prefix from swamping its rig (consistent hashing with
//! bounded loads, Mirrokni et al. 2018): a candidate is overloaded when taking this request
//! would put it above `ceil((1 + epsilon) × (total load + 1) / candidates)`, load being
//! `in_flight + engine_running + engine_waiting`. Candidates that are not overloaded come first,
//! by rendezvous score; the overloaded ones follow, also by score, as fallbacks. Some candidate
//! is never overloaded (the least loaded one always fits), so the first choice is always a real
//! one.
//!
//! Config: `{"epsilon": 0.25}`: how far above the average load a rig may go before its prefixes
//! spill to their next choice; 0 spreads strictly, larger values favour the cache. State: none.

use garage_plugin_sdk::{Candidates, Host, RouteRequest, Router, config, hrw};
use serde::Deserialize;

/// Rendezvous hashing of the prompt prefix, with bounded load.
pub struct PrefixAffinity;

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Config {
    epsilon: f64,
}

impl Default for Config {
    fn default() -> Self {
        // A quarter above average: enough room for a hot prefix to keep its cache warm on one
        // rig through small bursts, small enough that no rig runs far behind the others.
        Self { epsilon: 0.25 }
    }
}

impl Router for PrefixAffinity {
    fn route(
        host: &dyn Host,
        request: &RouteRequest,
        candidates: &Candidates,
    ) -> Result<Vec<u32>, String> {
        let epsilon = config::cached::<Config>(host)?.epsilon;
        if !(epsilon.is_finite() && epsilon >= 0.0) {
            return Err(format!(
                "invalid plugin config: epsilon must be a number >= 0, not {epsilon}"
            ));
        }
        if candidates.is_empty() {
            return Ok(Vec::new());
        }

        let total: u64 = (0..candidates.len()).map(|i| candidates.load(i)).sum();
        let fair_share = (total + 1) as f64 / candidates.len() as f64;
        let bound = ((1.0 + epsilon) * fair_share).ceil();
        let overloaded = |index: usize| (candidates.load(index) + 1) as f64 > bound;

        let by_score = hrw::rank(request.prefix_hash, candidates.keys().iter().copied());
        let (fits, spills): (Vec<usize>, Vec<usize>) =
            by_score.into_iter().partition(|&index| !overloaded(index));
        Ok(fits
            .into_iter()
            .chain(spills)
            .map(|index| index as u32)
            .collect())
    }
}

garage_plugin_sdk::export_router!(PrefixAffinity);

#[cfg(test)]
mod tests {
    use super::*;
    use garage_plugin_sdk::Candidate;
    use garage_plugin_sdk::testing::MemoryHost;

    fn request(prefix_hash: u64) -> RouteRequest {
        RouteRequest {
            prefix_hash,
            ..RouteRequest::default()
        }
    }

    fn rigs(loads: &[u32]) -> Vec<Candidate> {
        loads
            .iter()
            .enumerate()
            .map(|(i, &load)| Candidate {
                in_flight: load,
                ..Candidate::new(&format!("rig-{i}"))
            })
            .collect()
    }

    fn route(host: &MemoryHost, prefix_hash: u64, candidates: &[Candidate]) -> Vec<u32> {
        PrefixAffinity::route(host, &request(prefix_hash), &Candidates::from(candidates)).unwrap()
    }

    #[test]
    fn the_same_prefix_goes_to_the_same_rig_and_prefixes_spread() {
        let host = MemoryHost::new();
        let candidates = rigs(&[0, 0, 0, 0]);
        let mut homes = [0u32; 4];
        for prefix in 0..400u64 {
            let prefix = prefix.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let first = route(&host, prefix, &candidates);
            assert_eq!(first, route(&host, prefix, &candidates));
            assert_eq!(first.len(), 4);
            homes[first[0] as usize] += 1;
        }
        assert!(homes.iter().all(|&n| (60..140).contains(&n)), "{homes:?}");
    }

    #[test]
    fn the_order_does_not_depend_on_the_candidates_order() {
        let host = MemoryHost::new();
        let forward = rigs(&[0, 0, 0]);
        let backward: Vec<Candidate> = forward.iter().rev().copied().collect();
        let ids = |c: &[Candidate], order: Vec<u32>| -> Vec<u64> {
            order.into_iter().map(|i| c[i as usize].key).collect()
        };
        assert_eq!(
            ids(&forward, route(&host, 99, &forward)),
            ids(&backward, route(&host, 99, &backward))
        );
    }

    #[test]
    fn a_hot_home_spills_to_the_next_choice_and_stays_last_resort() {
        let host = MemoryHost::new();
        let idle = rigs(&[0, 0, 0, 0]);
        let natural = route(&host, 7, &idle);
        let home = natural[0] as usize;

        // Total 6 over 4 rigs: bound = ceil(1.25 × 7 / 4) = 3; the home at 6 is far over it.
        let mut loads = [0; 4];
        loads[home] = 6;
        let hot = route(&host, 7, &rigs(&loads));
        let expected: Vec<u32> = natural[1..].iter().copied().chain([natural[0]]).collect();
        assert_eq!(hot, expected);
    }

    #[test]
    fn epsilon_sets_how_far_above_average_a_rig_may_go() {
        let idle = rigs(&[0, 0]);
        let home = route(&MemoryHost::new(), 7, &idle)[0] as usize;
        let mut loads = [0; 2];
        loads[home] = 2;
        // Total 2 over 2 rigs, fair share 1.5: with epsilon 0.25 the bound is 2 and the home
        // (2 + 1 = 3) spills; with epsilon 1 the bound is 3 and it keeps the request.
        let strict = MemoryHost::new();
        assert_ne!(route(&strict, 7, &rigs(&loads))[0] as usize, home);
        let loose = MemoryHost::with_config(r#"{"epsilon": 1.0}"#);
        assert_eq!(route(&loose, 7, &rigs(&loads))[0] as usize, home);
    }

    #[test]
    fn bad_config_is_an_error_the_gateway_falls_back_on() {
        let host = MemoryHost::with_config(r#"{"epsilon": -1}"#);
        let error =
            PrefixAffinity::route(&host, &request(1), &Candidates::from(rigs(&[0]))).unwrap_err();
        assert!(error.contains("epsilon must be a number >= 0"), "{error}");
        let host = MemoryHost::with_config(r#"{"epsilonn": 1}"#);
        let error =
            PrefixAffinity::route(&host, &request(1), &Candidates::from(rigs(&[0]))).unwrap_err();
        assert!(error.contains("unknown field `epsilonn`"), "{error}");
    }
}
