//! Native tests (`cargo test`): the policy against the SDK's in-memory host, no WebAssembly.
use garage_plugin_sdk::testing::MemoryHost;
use garage_plugin_sdk::{Candidate, Candidates, RouteRequest, Router};

use super::Policy;

fn rig(id: &str, in_flight: u32, tokens_per_second: f32) -> Candidate {
    Candidate {
        in_flight,
        tokens_per_second,
        ..Candidate::new(id)
    }
}

fn route(config: &str, candidates: &[Candidate]) -> Result<Vec<u32>, String> {
    Policy::route(
        &MemoryHost::with_config(config),
        &RouteRequest::default(),
        &Candidates::from(candidates),
    )
}

#[test]
fn a_fast_busy_rig_beats_a_slow_idle_one() {
    // (3 + 1) / 100 = 0.04 s against (0 + 1) / 20 = 0.05 s.
    let candidates = [rig("slow", 0, 20.0), rig("fast", 3, 100.0)];
    assert_eq!(route("{}", &candidates), Ok(vec![1, 0]));
}

#[test]
fn the_engine_queue_counts_and_ties_keep_the_gateway_order() {
    let queued = Candidate {
        engine_waiting: 2,
        ..rig("queued", 0, 50.0)
    };
    let candidates = [queued, rig("a", 0, 50.0), rig("b", 0, 50.0)];
    assert_eq!(route("{}", &candidates), Ok(vec![1, 2, 0]));
}

#[test]
fn an_unmeasured_rig_counts_at_the_configured_speed() {
    let candidates = [rig("new", 0, 0.0), rig("measured", 0, 20.0)];
    assert_eq!(route("{}", &candidates), Ok(vec![1, 0]));
    assert_eq!(
        route(r#"{"unmeasured_tps": 40}"#, &candidates),
        Ok(vec![0, 1])
    );
}

#[test]
fn a_misspelled_setting_is_an_error_that_names_it() {
    let err = route(r#"{"unmeasured": 5}"#, &[rig("a", 0, 1.0)]).expect_err("refused");
    assert!(err.contains("unmeasured"), "{err}");
}
