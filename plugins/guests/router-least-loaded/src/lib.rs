//! Default router: least loaded first, where load is measured in seconds of work rather than in
//! requests, because the rigs of a community network are consumer GPUs of very different speeds.
//!
//! Score of a candidate, lowest first:
//! `(in_flight + engine_waiting + engine_running + 1) / speed`, where `speed` is the measured
//! `tokens_per_second`, or for a rig not measured yet the median of the measured speeds (1.0
//! when none is measured). The `+ 1` counts the request being placed: among idle rigs the
//! fastest wins instead of a tie. Ties go to the emptier KV cache, then to the lower index.
//!
//! Config (every field optional):
//!
//! - `{"prefer": {"region": "eu"}}`: candidates whose labels match every pair come first, each
//!   group ordered by score; the others stay as fallbacks. Only then does the router ask the
//!   gateway who the candidates are.
//! - `{"prefer_trusted": true}`: within those groups, verified rigs and the operator's own
//!   upstreams first, then rigs not verified yet, suspect rigs last (the gateway's checks, as
//!   `candidate.trust` carries them); each still a fallback for the one before.
//!
//! State: none.

use std::collections::BTreeMap;

use garage_plugin_sdk::{Candidate, Host, RouteRequest, Router, Trust, config};
use serde::Deserialize;

/// Orders every candidate by expected queueing time, shortest first.
pub struct LeastLoaded;

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Config {
    /// Labels a candidate must all have to be preferred.
    prefer: BTreeMap<String, String>,
    /// Verified rigs before unverified ones, suspect ones last.
    prefer_trusted: bool,
}

/// The rank of a candidate's trust, lowest first, with `prefer_trusted`.
fn trust_rank(trust: Trust) -> u8 {
    match trust {
        Trust::Verified | Trust::Configured => 0,
        Trust::Unverified => 1,
        Trust::Suspect | Trust::Quarantined => 2,
    }
}

impl Router for LeastLoaded {
    fn route(
        host: &dyn Host,
        _request: &RouteRequest,
        candidates: &[Candidate],
    ) -> Result<Vec<u32>, String> {
        let config = config::cached::<Config>(host)?;
        let prefer = &config.prefer;
        let preferred = |index: u32| {
            prefer.is_empty()
                || host.candidate(index).is_some_and(|info| {
                    prefer
                        .iter()
                        .all(|(key, value)| info.label(key) == Some(value.as_str()))
                })
        };
        let unknown_speed = median_known_speed(candidates).unwrap_or(1.0);
        let score = |c: &Candidate| {
            let speed = if is_known(c.tokens_per_second) {
                f64::from(c.tokens_per_second)
            } else {
                unknown_speed
            };
            (c.load() + 1) as f64 / speed
        };
        let trust = |c: &Candidate| {
            if config.prefer_trusted {
                trust_rank(c.trust)
            } else {
                0
            }
        };
        let mut ranked: Vec<(bool, u8, f64, f32, u32)> = candidates
            .iter()
            .zip(0u32..)
            .map(|(c, index)| {
                (
                    !preferred(index),
                    trust(c),
                    score(c),
                    c.kv_cache_usage,
                    index,
                )
            })
            .collect();
        ranked.sort_by(|a, b| {
            a.0.cmp(&b.0)
                .then(a.1.cmp(&b.1))
                .then(a.2.total_cmp(&b.2))
                .then(a.3.total_cmp(&b.3))
                .then(a.4.cmp(&b.4))
        });
        Ok(ranked.into_iter().map(|(.., index)| index).collect())
    }
}

garage_plugin_sdk::export_router!(LeastLoaded);

/// A measured speed: positive and finite (0.0 means not measured; NaN never counts).
fn is_known(tokens_per_second: f32) -> bool {
    tokens_per_second.is_finite() && tokens_per_second > 0.0
}

/// Median of the measured speeds, `None` when no candidate is measured.
fn median_known_speed(candidates: &[Candidate]) -> Option<f64> {
    let mut speeds: Vec<f64> = candidates
        .iter()
        .map(|c| c.tokens_per_second)
        .filter(|&s| is_known(s))
        .map(f64::from)
        .collect();
    if speeds.is_empty() {
        return None;
    }
    speeds.sort_by(f64::total_cmp);
    let mid = speeds.len() / 2;
    Some(if speeds.len().is_multiple_of(2) {
        (speeds[mid - 1] + speeds[mid]) / 2.0
    } else {
        speeds[mid]
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use garage_plugin_sdk::testing::MemoryHost;

    fn rig(id: &str, load: u32, tokens_per_second: f32) -> Candidate {
        Candidate {
            in_flight: load,
            tokens_per_second,
            ..Candidate::new(id)
        }
    }

    fn route(candidates: &[Candidate]) -> Vec<u32> {
        LeastLoaded::route(&MemoryHost::new(), &RouteRequest::default(), candidates).unwrap()
    }

    #[test]
    fn a_fast_busy_rig_beats_a_slow_idle_one() {
        // 4090 at 100 tok/s with 3 requests: (3+1)/100 = 0.04; 3060 at 20 tok/s idle: 1/20 = 0.05.
        let candidates = [rig("slow", 0, 20.0), rig("fast", 3, 100.0)];
        assert_eq!(route(&candidates), vec![1, 0]);
    }

    #[test]
    fn every_kind_of_load_counts() {
        let queued = Candidate {
            engine_waiting: 2,
            ..rig("queued", 0, 50.0)
        };
        let running = Candidate {
            engine_running: 1,
            ..rig("running", 0, 50.0)
        };
        assert_eq!(
            route(&[queued, running, rig("idle", 0, 50.0)]),
            vec![2, 1, 0]
        );
    }

    #[test]
    fn unmeasured_rigs_count_at_the_median_speed() {
        // Known speeds 10, 30, 50: median 30. The new rig with 1 request scores 2/30 = 0.067,
        // behind the 50 tok/s rig with 2 (3/50 = 0.06), ahead of the 10 tok/s idle one (0.1).
        let candidates = [
            rig("slow", 0, 10.0),
            rig("new", 1, 0.0),
            rig("mid", 5, 30.0),
            rig("fast", 2, 50.0),
        ];
        assert_eq!(route(&candidates), vec![3, 1, 0, 2]);
    }

    #[test]
    fn nothing_measured_means_plain_least_requests() {
        let candidates = [rig("a", 2, 0.0), rig("b", 0, 0.0), rig("c", 1, f32::NAN)];
        assert_eq!(route(&candidates), vec![1, 2, 0]);
    }

    #[test]
    fn ties_go_to_the_emptier_kv_cache_then_the_first() {
        let full = Candidate {
            kv_cache_usage: 0.9,
            ..rig("full", 0, 40.0)
        };
        let empty = Candidate {
            kv_cache_usage: 0.1,
            ..rig("empty", 0, 40.0)
        };
        assert_eq!(
            route(&[full, empty, rig("unknown", 0, 40.0)]),
            vec![2, 1, 0]
        );
    }

    #[test]
    fn preferred_labels_come_first_and_the_rest_stay_as_fallbacks() {
        use garage_plugin_sdk::CandidateInfo;
        let host = MemoryHost::with_config(r#"{"prefer": {"region": "eu"}}"#);
        let located = |id: &str, region: &str| CandidateInfo {
            labels: vec![("region".into(), region.into())],
            ..CandidateInfo::new(id)
        };
        host.set_candidates(vec![
            located("us-idle", "us"),
            located("eu-busy", "eu"),
            CandidateInfo::new("unlabelled"),
            located("eu-idle", "eu"),
        ]);
        let candidates = [
            rig("us-idle", 0, 50.0),
            rig("eu-busy", 3, 50.0),
            rig("unlabelled", 1, 50.0),
            rig("eu-idle", 0, 50.0),
        ];
        let order = LeastLoaded::route(&host, &RouteRequest::default(), &candidates).unwrap();
        assert_eq!(order, vec![3, 1, 0, 2]);
    }

    #[test]
    fn trusted_rigs_first_when_asked_then_unverified_then_suspect() {
        let with = |trust: Trust, c: Candidate| Candidate { trust, ..c };
        let candidates = [
            with(Trust::Suspect, rig("suspect-idle", 0, 50.0)),
            with(Trust::Unverified, rig("new-idle", 0, 50.0)),
            with(Trust::Verified, rig("verified-busy", 4, 50.0)),
            with(Trust::Configured, rig("own-busier", 6, 50.0)),
        ];
        // Without the setting, trust does not matter: load alone.
        assert_eq!(route(&candidates), vec![0, 1, 2, 3]);
        let host = MemoryHost::with_config(r#"{"prefer_trusted": true}"#);
        let order = LeastLoaded::route(&host, &RouteRequest::default(), &candidates).unwrap();
        assert_eq!(order, vec![2, 3, 1, 0]);
    }

    #[test]
    fn a_bad_config_is_an_error() {
        let host = MemoryHost::with_config(r#"{"prefer": "eu"}"#);
        let error = LeastLoaded::route(&host, &RouteRequest::default(), &[rig("a", 0, 1.0)]);
        assert!(error.is_err());
    }

    #[test]
    fn median_of_an_even_count_is_the_mean_of_the_middle_two() {
        let candidates = [
            rig("a", 0, 10.0),
            rig("b", 0, 20.0),
            rig("c", 0, 40.0),
            rig("d", 0, 80.0),
        ];
        assert_eq!(median_known_speed(&candidates), Some(30.0));
        assert_eq!(median_known_speed(&[]), None);
    }
}
