//! A rate limiter's promises (`garage:policy@0.7.0`'s `admitted.unlimited-ms`): the gateway
//! admits a key's requests without calling a limiter that said it does not limit them, and
//! never on a promise it must not honour (a denial, an allow to settle or with headers), nor
//! past a new version or configuration of the limiter, nor for a limiter from before 0.7.0.

use std::time::Duration;

use crate::support::*;
use serde_json::json;

fn with_defaults(upstreams: Vec<garage_gateway::config::UpstreamConfig>) -> garage_gateway::Config {
    let mut cfg = config(upstreams);
    cfg.default_plugins = true;
    // Two cores shared by several test processes: a 5 ms guest deadline can be blown by the
    // scheduler alone, and a fail-open answer carries no headers.
    cfg.plugins.rate_limiter.deadline_ms = Some(1_000);
    cfg
}

/// The sum of a metric's series whose labels contain `labels` (`""`: every series).
fn total(metrics: &str, name: &str, labels: &str) -> u64 {
    metrics
        .lines()
        .filter(|line| line.starts_with(name) && line.contains(labels))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Calls the gateway made into the rate limiter, and requests it allowed on a promise.
async fn limiter_counts(base: &str) -> (u64, u64) {
    let metrics = metrics_text(base).await;
    (
        total(
            &metrics,
            "garage_plugin_calls_total",
            "slot=\"rate-limiter\"",
        ),
        total(&metrics, "garage_plugin_admissions_promised_total", ""),
    )
}

/// A chat request: its status and its `x-ratelimit-remaining-requests` header, if any.
async fn send(base: &str, key: &str) -> (u16, Option<String>) {
    let response = client()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&chat(false))
        .send()
        .await
        .unwrap();
    let remaining = response
        .headers()
        .get("x-ratelimit-remaining-requests")
        .map(|v| v.to_str().unwrap().to_owned());
    (response.status().as_u16(), remaining)
}

#[tokio::test]
async fn a_key_without_limits_is_admitted_on_the_default_limiters_promise() {
    let engine = fast_sim().await;
    let gw = gateway(with_defaults(vec![upstream("a", engine.base_url())])).await;
    let base = gw.url();
    let (_, free) = create_key(&base, json!({"name": "free"})).await;
    let (_, limited) = create_key(&base, json!({"name": "l", "metadata": {"rpm": 2}})).await;

    for _ in 0..5 {
        assert_eq!(send(&base, &free).await, (200, None));
    }
    assert_eq!(
        limiter_counts(&base).await,
        (1, 4),
        "one call for the free key, then its promise"
    );

    // A limited key beside it is asked about every time, and its limit holds.
    let answers = [
        send(&base, &limited).await,
        send(&base, &limited).await,
        send(&base, &limited).await,
    ];
    assert_eq!(
        answers,
        [
            (200, Some("1".to_owned())),
            (200, Some("0".to_owned())),
            (429, Some("0".to_owned()))
        ]
    );
    assert_eq!(limiter_counts(&base).await, (4, 4));
}

/// An operator who sets a limit by configuring the limiter anew gets it on the next request:
/// the new configuration is a new version, which holds none of the old one's promises.
#[tokio::test]
async fn a_new_limiter_configuration_ends_every_promise_at_once() {
    let engine = fast_sim().await;
    let gw = gateway(with_defaults(vec![upstream("a", engine.base_url())])).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "k"})).await;
    for _ in 0..3 {
        assert_eq!(send(&base, &key).await, (200, None));
    }
    assert_eq!(limiter_counts(&base).await, (1, 2));

    let (code, body) = upload_plugin(
        &base,
        "rate-limiter",
        garage_plugins::RATE_LIMITER,
        &config_query(json!({"rpm": 1})),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(send(&base, &key).await, (200, Some("0".to_owned())));
    assert_eq!(send(&base, &key).await.0, 429, "the new limit holds");
    assert_eq!(limiter_counts(&base).await, (3, 2));
}

/// A limiter that promises what the gateway must not take on trust: a denial, an allow it
/// must settle, an allow whose headers a promise would leave stale. Each of those requests is
/// asked about; only the plain allow's promise is kept (however long it says, at most a
/// minute: `host::unlimited`'s unit tests).
#[tokio::test]
async fn promises_the_gateway_must_not_honour_are_not_kept() {
    let engine = fast_sim().await;
    let mut cfg = config(vec![upstream("a", engine.base_url())]);
    cfg.plugins.rate_limiter.deadline_ms = Some(1_000);
    let gw = gateway(cfg).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "k"})).await;
    let promise = 4_294_967_295u32;
    let cases = [
        (
            json!({"allow": false, "unlimited_ms": promise}),
            (429, None),
        ),
        (
            json!({"settle": true, "unlimited_ms": promise}),
            (200, None),
        ),
        (
            json!({"remaining_requests": 3, "unlimited_ms": promise}),
            (200, Some("3".to_owned())),
        ),
    ];
    let mut calls = 0;
    for (config, answer) in cases {
        let settles = config["settle"] == true;
        let (code, body) = upload_plugin(
            &base,
            "rate-limiter",
            garage_plugins::fixtures::LIMITER_SAYS,
            &config_query(config.clone()),
        )
        .await;
        assert_eq!(code, 200, "{body}");
        for _ in 0..3 {
            assert_eq!(send(&base, &key).await, answer, "{config}");
        }
        // An allow to settle is settled too (a call after the response, off its path).
        calls += if settles { 6 } else { 3 };
        wait_until(Duration::from_secs(10), "the limiter's calls", || async {
            limiter_counts(&base).await.0 >= calls
        })
        .await;
        assert_eq!(limiter_counts(&base).await, (calls, 0), "{config}");
    }

    let (code, body) = upload_plugin(
        &base,
        "rate-limiter",
        garage_plugins::fixtures::LIMITER_SAYS,
        &config_query(json!({"unlimited_ms": promise})),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    for _ in 0..3 {
        assert_eq!(send(&base, &key).await, (200, None));
    }
    assert_eq!(limiter_counts(&base).await, (calls + 1, 2));
}

/// A limiter built before 0.7.0 promises nothing: it is called on every request, and its
/// count holds.
#[tokio::test]
async fn a_limiter_from_before_promises_is_asked_every_time() {
    let engine = fast_sim().await;
    let mut cfg = config(vec![upstream("a", engine.base_url())]);
    cfg.plugins.rate_limiter.deadline_ms = Some(1_000);
    let gw = gateway(cfg).await;
    let base = gw.url();
    let (code, body) = upload_plugin(
        &base,
        "rate-limiter",
        garage_plugins::fixtures::LIMITER_V0_4,
        &config_query(json!({"limit": 2})),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let (_, key) = create_key(&base, json!({"name": "k"})).await;
    let codes = [
        send(&base, &key).await.0,
        send(&base, &key).await.0,
        send(&base, &key).await.0,
    ];
    assert_eq!(codes, [200, 200, 429]);
    assert_eq!(limiter_counts(&base).await, (3, 0));
}
