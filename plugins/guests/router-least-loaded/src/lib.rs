//! Default router: least loaded first, where load is measured in seconds of work rather than in
//! requests, because the rigs of a community network are consumer GPUs of very different speeds.
//!
//! Score of a candidate, lowest first:
//! `(in_flight + engine_waiting + engine_running + 1) / speed`, where `speed` is the measured
//! `tokens_per_second`, or for a rig not measured yet the median of the measured speeds (1.0
//! when none is measured). The `+ 1` counts the request being placed: among idle rigs the
//! fastest wins instead of a tie. Ties go to the emptier KV cache, then to the lower index.
//!
//! It answers the best `top` candidates only (8 unless configured), best first: the gateway
//! tries those and no others, and tries at most `dispatch.max_attempts` (3 by default) anyway.
//! Picking them takes one pass over the candidates (each compared with the worst of the best
//! so far), not a sort of all of them, so a call costs about the same over 100 candidates as
//! over 1,000.
//!
//! Config (every field optional):
//!
//! - `{"prefer": {"region": "eu"}}`: candidates whose labels match every pair come first, each
//!   group ordered by score; the others stay as fallbacks. Only then does the router ask the
//!   gateway who the candidates are.
//! - `{"prefer_trusted": true}`: within those groups, verified rigs and the operator's own
//!   upstreams first, then rigs not verified yet, suspect rigs last (the gateway's checks, as
//!   `candidate.trust` carries them); each still a fallback for the one before.
//! - `{"top": 8}`: how many candidates to answer, 1 or more; keep it at least the gateway's
//!   `dispatch.max_attempts`.
//!
//! State: none.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use garage_plugin_sdk::{Candidates, Host, RouteRequest, Router, Trust, config};
use serde::Deserialize;

/// Orders the candidates by expected queueing time, shortest first, and answers the best few.
pub struct LeastLoaded;

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Config {
    /// Labels a candidate must all have to be preferred.
    prefer: BTreeMap<String, String>,
    /// Verified rigs before unverified ones, suspect ones last.
    prefer_trusted: bool,
    /// Candidates answered, best first.
    top: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            prefer: BTreeMap::new(),
            prefer_trusted: false,
            top: 8,
        }
    }
}

/// The rank of a candidate's trust, lowest first, with `prefer_trusted`.
fn trust_rank(trust: Trust) -> u8 {
    match trust {
        Trust::Verified | Trust::Configured => 0,
        Trust::Unverified => 1,
        Trust::Suspect | Trust::Quarantined => 2,
    }
}

/// What a candidate is ranked by, lowest first: not preferred, trust rank, score (seconds of
/// work), KV-cache use, index.
#[derive(Clone, Copy)]
struct Rank {
    not_preferred: bool,
    trust: u8,
    score: f64,
    kv_cache_usage: f32,
    index: u32,
}

impl Rank {
    fn cmp(&self, other: &Rank) -> Ordering {
        self.not_preferred
            .cmp(&other.not_preferred)
            .then(self.trust.cmp(&other.trust))
            .then(self.score.total_cmp(&other.score))
            .then(self.kv_cache_usage.total_cmp(&other.kv_cache_usage))
            .then(self.index.cmp(&other.index))
    }
}

impl Router for LeastLoaded {
    fn route(
        host: &dyn Host,
        _request: &RouteRequest,
        candidates: &Candidates,
    ) -> Result<Vec<u32>, String> {
        let config = config::cached::<Config>(host)?;
        if config.top == 0 {
            return Err("invalid plugin config: top must be 1 or more".into());
        }
        let prefer = &config.prefer;
        let preferred = |index: u32| {
            prefer.is_empty()
                || host.candidate(index).is_some_and(|info| {
                    prefer
                        .iter()
                        .all(|(key, value)| info.label(key) == Some(value.as_str()))
                })
        };
        let speeds = candidates.tokens_per_second();
        // The median only matters when some rig is unmeasured: most calls skip it.
        let unknown_speed = if speeds.iter().all(|&s| is_known(s)) {
            1.0
        } else {
            median_known_speed(speeds).unwrap_or(1.0)
        };
        let top = config.top.min(candidates.len());
        let mut best = Best::new(top);
        // One pass over the columns side by side (no index checked against five lengths per
        // candidate). A candidate is first compared with the worst of the best so far on its
        // group (preference and trust, 0 unless configured) and score alone: most are
        // strictly worse and cost one comparison; ties and better ones go through `Rank::cmp`.
        let columns = candidates
            .in_flight()
            .iter()
            .zip(candidates.engine_running())
            .zip(candidates.engine_waiting())
            .zip(speeds)
            .zip(candidates.kv_cache_usage());
        let grouped = !prefer.is_empty() || config.prefer_trusted;
        for (i, ((((&in_flight, &running), &waiting), &speed), &kv)) in columns.enumerate() {
            let speed = if is_known(speed) {
                f64::from(speed)
            } else {
                unknown_speed
            };
            let load = u64::from(in_flight) + u64::from(running) + u64::from(waiting);
            let score = (load + 1) as f64 / speed;
            let index = i as u32;
            let (not_preferred, trust) = if grouped {
                (
                    !preferred(index),
                    if config.prefer_trusted {
                        trust_rank(candidates.trust(i))
                    } else {
                        0
                    },
                )
            } else {
                (false, 0)
            };
            if best.beats_none(not_preferred, trust, score) {
                continue;
            }
            best.offer(Rank {
                not_preferred,
                trust,
                score,
                kv_cache_usage: kv,
                index,
            });
        }
        Ok(best.kept.into_iter().map(|rank| rank.index).collect())
    }
}

/// The best `top` candidates so far, best first.
struct Best {
    kept: Vec<Rank>,
    top: usize,
}

impl Best {
    fn new(top: usize) -> Best {
        Best {
            kept: Vec::with_capacity(top + 1),
            top,
        }
    }

    /// Whether a candidate of this group and score is strictly worse than the worst kept
    /// while they are `top` already, so that it cannot be kept whatever its KV cache and
    /// index (a NaN score is never strictly worse here: `offer` orders it as `total_cmp`
    /// does).
    fn beats_none(&self, not_preferred: bool, trust: u8, score: f64) -> bool {
        if self.kept.len() < self.top {
            return false;
        }
        let Some(worst) = self.kept.last() else {
            return true;
        };
        match (not_preferred, trust).cmp(&(worst.not_preferred, worst.trust)) {
            Ordering::Greater => true,
            Ordering::Less => false,
            Ordering::Equal => score > worst.score,
        }
    }

    /// Keeps `candidate` in its place if it beats the worst kept (or fewer than `top` are).
    fn offer(&mut self, candidate: Rank) {
        if self.kept.len() == self.top
            && self
                .kept
                .last()
                .is_none_or(|worst| candidate.cmp(worst) != Ordering::Less)
        {
            return;
        }
        let at = self
            .kept
            .partition_point(|kept| kept.cmp(&candidate) == Ordering::Less);
        self.kept.insert(at, candidate);
        self.kept.truncate(self.top);
    }
}

garage_plugin_sdk::export_router!(LeastLoaded);

/// A measured speed: positive and finite (0.0 means not measured; NaN never counts).
fn is_known(tokens_per_second: f32) -> bool {
    tokens_per_second.is_finite() && tokens_per_second > 0.0
}

/// Median of the measured speeds, `None` when no candidate is measured. A selection, not a
/// sort: linear in the candidates.
fn median_known_speed(speeds: &[f32]) -> Option<f64> {
    let mut known: Vec<f32> = speeds.iter().copied().filter(|&s| is_known(s)).collect();
    if known.is_empty() {
        return None;
    }
    let (count, mid) = (known.len(), known.len() / 2);
    let (below, &mut middle, _) = known.select_nth_unstable_by(mid, f32::total_cmp);
    let middle = f64::from(middle);
    Some(if count.is_multiple_of(2) {
        // The other middle one is the largest of those below.
        let lower = below.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        (f64::from(lower) + middle) / 2.0
    } else {
        middle
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use garage_plugin_sdk::Candidate;
    use garage_plugin_sdk::testing::MemoryHost;

    fn rig(id: &str, load: u32, tokens_per_second: f32) -> Candidate {
        Candidate {
            in_flight: load,
            tokens_per_second,
            ..Candidate::new(id)
        }
    }

    fn route(candidates: &[Candidate]) -> Vec<u32> {
        LeastLoaded::route(
            &MemoryHost::new(),
            &RouteRequest::default(),
            &Candidates::from(candidates),
        )
        .unwrap()
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
        let candidates = Candidates::from(candidates);
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
        let candidates = Candidates::from(candidates);
        let order = LeastLoaded::route(&host, &RouteRequest::default(), &candidates).unwrap();
        assert_eq!(order, vec![2, 3, 1, 0]);
    }

    #[test]
    fn a_bad_config_is_an_error() {
        let host = MemoryHost::with_config(r#"{"prefer": "eu"}"#);
        let one = Candidates::from([rig("a", 0, 1.0)]);
        let error = LeastLoaded::route(&host, &RouteRequest::default(), &one);
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
        let speeds = Candidates::from(candidates);
        assert_eq!(median_known_speed(speeds.tokens_per_second()), Some(30.0));
        assert_eq!(median_known_speed(&[20.0, 0.0, 10.0]), Some(15.0));
        assert_eq!(median_known_speed(&[5.0, 10.0, 1.0]), Some(5.0));
        assert_eq!(median_known_speed(&[]), None);
    }

    /// The answer over many candidates is the first `top` of a full sort, as the router
    /// answered before it stopped sorting.
    #[test]
    fn the_top_few_are_the_head_of_a_full_sort() {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        for (count, top) in [(1000, 8), (100, 3), (5, 8), (64, 1)] {
            let candidates: Vec<Candidate> = (0..count)
                .map(|i| Candidate {
                    in_flight: next(6) as u32,
                    engine_waiting: next(3) as u32,
                    kv_cache_usage: next(4) as f32 / 4.0,
                    ..rig(
                        &format!("rig-{i}"),
                        0,
                        [0.0, 20.0, 40.0, 100.0][next(4) as usize],
                    )
                })
                .collect();
            let host = MemoryHost::with_config(format!(r#"{{"top": {top}}}"#));
            let columns = Candidates::from(&candidates[..]);
            let order = LeastLoaded::route(&host, &RouteRequest::default(), &columns).unwrap();
            let unknown = median_known_speed(columns.tokens_per_second()).unwrap_or(1.0);
            let seconds = |c: &Candidate| {
                let speed = if is_known(c.tokens_per_second) {
                    f64::from(c.tokens_per_second)
                } else {
                    unknown
                };
                (c.load() + 1) as f64 / speed
            };
            let mut sorted: Vec<u32> = (0..count as u32).collect();
            sorted.sort_by(|&a, &b| {
                let (a, b) = (&candidates[a as usize], &candidates[b as usize]);
                seconds(a)
                    .total_cmp(&seconds(b))
                    .then(a.kv_cache_usage.total_cmp(&b.kv_cache_usage))
            });
            sorted.truncate(top.min(count));
            assert_eq!(order, sorted, "{count} candidates, top {top}");
        }
    }

    /// A candidate skipped after one comparison with the worst kept is never one a full sort
    /// would keep: with trust ranks (`prefer_trusted`), scores tied by the dozen, KV caches
    /// tied or not, the answer is the head of a full sort on every key.
    #[test]
    fn the_quick_skip_keeps_what_a_full_sort_keeps() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        let trusts = [
            Trust::Configured,
            Trust::Unverified,
            Trust::Verified,
            Trust::Suspect,
            Trust::Quarantined,
        ];
        for (count, top, prefer_trusted) in [
            (1000, 8, true),
            (1000, 8, false),
            (300, 1, true),
            (50, 20, true),
            (9, 8, false),
        ] {
            let candidates: Vec<Candidate> = (0..count)
                .map(|i| Candidate {
                    in_flight: next(3) as u32,
                    kv_cache_usage: next(2) as f32 / 2.0,
                    trust: trusts[next(5) as usize],
                    ..rig(&format!("rig-{i}"), 0, [20.0, 40.0][next(2) as usize])
                })
                .collect();
            let config = format!(r#"{{"top": {top}, "prefer_trusted": {prefer_trusted}}}"#);
            let host = MemoryHost::with_config(config);
            let columns = Candidates::from(&candidates[..]);
            let order = LeastLoaded::route(&host, &RouteRequest::default(), &columns).unwrap();
            let key = |c: &Candidate| {
                let trust = if prefer_trusted {
                    trust_rank(c.trust)
                } else {
                    0
                };
                (
                    trust,
                    (c.load() + 1) as f64 / f64::from(c.tokens_per_second),
                )
            };
            let mut sorted: Vec<u32> = (0..count as u32).collect();
            sorted.sort_by(|&a, &b| {
                let (a, b) = (&candidates[a as usize], &candidates[b as usize]);
                let ((trust_a, score_a), (trust_b, score_b)) = (key(a), key(b));
                trust_a
                    .cmp(&trust_b)
                    .then(score_a.total_cmp(&score_b))
                    .then(a.kv_cache_usage.total_cmp(&b.kv_cache_usage))
            });
            sorted.truncate(top.min(count));
            assert_eq!(order, sorted, "{count} candidates, top {top}");
        }
    }

    #[test]
    fn eight_answered_unless_configured_and_top_zero_is_an_error() {
        let many: Vec<Candidate> = (0..20)
            .map(|i| rig(&format!("r{i}"), 19 - i, 10.0))
            .collect();
        let order = route(&many);
        assert_eq!(order, (12..20).rev().collect::<Vec<u32>>());
        let host = MemoryHost::with_config(r#"{"top": 0}"#);
        let error = LeastLoaded::route(&host, &RouteRequest::default(), &Candidates::from(many));
        assert!(error.unwrap_err().contains("top must be 1 or more"));
    }
}
