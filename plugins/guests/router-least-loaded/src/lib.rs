//! Default router: least loaded first, where load is measured in seconds of work rather than in
//! requests, because the rigs of a community network are consumer GPUs of very different speeds.
//!
//! Score of a candidate, lowest first:
//! `(in_flight + engine_waiting + engine_running + 1) / speed`, where `speed` is the measured
//! `tokens_per_second`, or for a rig not measured yet the median of the measured speeds (1.0
//! when none is measured). The `+ 1` counts the request being placed: among idle rigs the
//! fastest wins instead of a tie. Ties go to the emptier KV cache, then to the lower index.
//!
//! Config: none. State: none.

use garage_plugin_sdk::{Candidate, Host, RouteRequest, Router};

/// Orders every candidate by expected queueing time, shortest first.
pub struct LeastLoaded;

impl Router for LeastLoaded {
    fn route(
        _host: &dyn Host,
        _request: &RouteRequest,
        candidates: &[Candidate],
    ) -> Result<Vec<u32>, String> {
        let unknown_speed = median_known_speed(candidates).unwrap_or(1.0);
        let score = |c: &Candidate| {
            let speed = if is_known(c.tokens_per_second) {
                f64::from(c.tokens_per_second)
            } else {
                unknown_speed
            };
            (c.load() + 1) as f64 / speed
        };
        let mut ranked: Vec<(f64, f32, u32)> = candidates
            .iter()
            .zip(0u32..)
            .map(|(c, index)| (score(c), c.kv_cache_usage, index))
            .collect();
        ranked.sort_by(|a, b| {
            a.0.total_cmp(&b.0)
                .then(a.1.total_cmp(&b.1))
                .then(a.2.cmp(&b.2))
        });
        Ok(ranked.into_iter().map(|(_, _, index)| index).collect())
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
