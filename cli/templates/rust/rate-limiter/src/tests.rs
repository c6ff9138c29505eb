//! Native tests (`cargo test`): the policy against the SDK's in-memory host, no WebAssembly.
use garage_plugin_sdk::testing::MemoryHost;
use garage_plugin_sdk::{Admission, RateLimiter};

use super::Policy;

/// A host whose clock sits 10 s into a minute.
fn host(config: &str) -> MemoryHost {
    let host = MemoryHost::with_config(config);
    host.set_now_ms(1_700_000_050_000);
    host
}

fn request(key_id: &str, key_metadata: &str) -> Admission {
    Admission {
        key_id: key_id.into(),
        key_metadata: key_metadata.into(),
        ..Admission::default()
    }
}

#[test]
fn a_key_gets_its_requests_per_minute_then_a_retry_after() {
    let host = host(r#"{"rpm": 2}"#);
    let first = Policy::admit(&host, &request("key_a", "{}"));
    assert!(first.allow);
    assert_eq!(first.headers.remaining_requests, Some(1));
    assert!(Policy::admit(&host, &request("key_a", "{}")).allow);
    let third = Policy::admit(&host, &request("key_a", "{}"));
    assert!(!third.allow);
    assert_eq!(third.retry_after_ms, 50_000, "the rest of the minute");
    assert!(
        Policy::admit(&host, &request("key_b", "{}")).allow,
        "keys count apart"
    );
    host.advance_ms(50_000);
    assert!(
        Policy::admit(&host, &request("key_a", "{}")).allow,
        "a new minute"
    );
}

#[test]
fn the_key_metadata_wins_over_the_config_and_no_limit_lets_all_through() {
    let host = host(r#"{"rpm": 1}"#);
    assert!(Policy::admit(&host, &request("key_a", r#"{"rpm": 5}"#)).allow);
    assert!(Policy::admit(&host, &request("key_a", r#"{"rpm": 5}"#)).allow);
    let open = MemoryHost::new();
    for _ in 0..100 {
        assert!(Policy::admit(&open, &request("key_a", "{}")).allow);
    }
    assert!(open.keys().is_empty(), "nothing counted without a limit");
}

#[test]
fn zero_refuses_everything() {
    let host = host(r#"{"rpm": 0}"#);
    assert!(!Policy::admit(&host, &request("key_a", "{}")).allow);
}

#[test]
#[should_panic(expected = "invalid plugin config")]
fn a_bad_config_traps() {
    Policy::admit(&host(r#"{"rpm": "sixty"}"#), &request("key_a", "{}"));
}
