//! Native tests (`cargo test`): the policy against the SDK's in-memory host, no WebAssembly.
use garage_plugin_sdk::testing::MemoryHost;
use garage_plugin_sdk::{Award, CountedBy, Reward, RigReport, Trust, UsageEvent};

use super::Policy;

const CONFIG: &str = r#"{"points_per_1k_tokens": 2, "model_weights": {"llama-3.1-70b": 8}, "points_per_uptime_hour": 10}"#;

fn verified(model: &str, tokens: u64) -> UsageEvent {
    UsageEvent {
        operator: "alice".into(),
        model: model.into(),
        prompt_tokens: tokens / 2,
        completion_tokens: tokens - tokens / 2,
        counted_by: CountedBy::Gateway,
        trust: Trust::Verified,
        ..UsageEvent::default()
    }
}

#[test]
fn verified_tokens_pay_by_model_weight() {
    let host = MemoryHost::with_config(CONFIG);
    let big = Policy::on_usage(&host, &verified("llama-3.1-70b", 500));
    assert_eq!(big, Ok(vec![Award::new("alice", 8.0, "tokens")]));
    let small = Policy::on_usage(&host, &verified("qwen-7b", 500));
    assert_eq!(small, Ok(vec![Award::new("alice", 1.0, "tokens")]));
}

#[test]
fn unverified_work_and_static_upstreams_earn_nothing() {
    let host = MemoryHost::with_config(CONFIG);
    let unverified = UsageEvent {
        trust: Trust::Unverified,
        ..verified("qwen-7b", 5000)
    };
    assert_eq!(Policy::on_usage(&host, &unverified), Ok(vec![]));
    let rig_counted = UsageEvent {
        counted_by: CountedBy::Backend,
        ..verified("qwen-7b", 5000)
    };
    assert_eq!(Policy::on_usage(&host, &rig_counted), Ok(vec![]));
    let no_operator = UsageEvent {
        operator: String::new(),
        ..verified("qwen-7b", 5000)
    };
    assert_eq!(Policy::on_usage(&host, &no_operator), Ok(vec![]));
}

#[test]
fn uptime_pays_per_hour_capped_at_the_period() {
    let host = MemoryHost::with_config(CONFIG);
    let report = RigReport {
        operator: "alice".into(),
        period_ms: 3_600_000,
        uptime_ms: 1_800_000,
        ..RigReport::default()
    };
    assert_eq!(
        Policy::on_report(&host, &report),
        Ok(vec![Award::new("alice", 5.0, "uptime")])
    );
    let over = RigReport {
        uptime_ms: 7_200_000,
        ..report
    };
    assert_eq!(
        Policy::on_report(&host, &over),
        Ok(vec![Award::new("alice", 10.0, "uptime")])
    );
}

#[test]
fn a_misspelled_setting_is_an_error_that_names_it() {
    let host = MemoryHost::with_config(r#"{"points_per_1k_token": 2}"#);
    let err = Policy::on_usage(&host, &verified("qwen-7b", 500)).expect_err("refused");
    assert!(err.contains("points_per_1k_token"), "{err}");
}
