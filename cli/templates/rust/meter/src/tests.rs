//! Native tests (`cargo test`): the policy against the SDK's in-memory host, no WebAssembly.
use garage_plugin_sdk::testing::MemoryHost;
use garage_plugin_sdk::{Meter, Price, QuoteRequest, UsageEvent};

use super::Policy;

const CONFIG: &str = r#"{"prompt_per_1k": 0.5, "completion_per_1k": 1.5, "model_multipliers": {"llama-3.1-70b": 4}}"#;

fn used(model: &str, prompt_tokens: u64, completion_tokens: u64) -> UsageEvent {
    UsageEvent {
        model: model.into(),
        prompt_tokens,
        completion_tokens,
        ..UsageEvent::default()
    }
}

#[test]
fn the_quote_is_the_price_times_the_model_multiplier() {
    let host = MemoryHost::with_config(CONFIG);
    let big = QuoteRequest {
        model: "llama-3.1-70b".into(),
        batch: false,
    };
    let quoted = Policy::quote(&host, &big)
        .expect("quoted")
        .expect("a price");
    assert_eq!(
        (quoted.prompt_per_thousand, quoted.completion_per_thousand),
        (2.0, 6.0)
    );
}

#[test]
fn a_request_is_charged_its_tokens_at_the_price() {
    let host = MemoryHost::with_config(CONFIG);
    let charge = Policy::charge(&host, &used("qwen-7b", 2000, 1000)).expect("charged");
    assert_eq!(charge.credits, 2.5);
    assert!(!charge.budget_exhausted);
}

#[test]
fn a_quoted_request_pays_the_quote_whatever_the_config_says_now() {
    let host = MemoryHost::with_config(CONFIG);
    let quote = Price {
        prompt_per_thousand: 1.0,
        completion_per_thousand: 1.0,
    };
    let event = UsageEvent {
        price: Some(quote),
        ..used("qwen-7b", 1000, 1000)
    };
    assert_eq!(Policy::charge(&host, &event).expect("charged").credits, 2.0);
}

#[test]
fn a_misspelled_setting_is_an_error_that_names_it() {
    let host = MemoryHost::with_config(r#"{"prompt_per_1000": 2}"#);
    let err = Policy::charge(&host, &used("qwen-7b", 1, 1)).expect_err("refused");
    assert!(err.contains("prompt_per_1000"), "{err}");
}
