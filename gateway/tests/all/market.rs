//! Prices that follow supply and demand: the meter quotes a model's price at admission (and
//! for `GET /v1/models`), moved with the market the gateway describes to it, and each request
//! is charged the price it was quoted, whatever the market did while it ran.

use std::time::Duration;

use crate::support::*;
use serde_json::json;

/// A gateway with the default plugins and a meter that prices by the market, undamped (the
/// damping is the meter's unit test), one rig taken to have two request slots.
async fn market_gateway(
    engine: &garage_sim_engine::SimEngine,
) -> (garage_gateway::Gateway, String) {
    let mut cfg = config(vec![upstream("a", engine.base_url())]);
    cfg.default_plugins = true;
    for slot in [&mut cfg.plugins.router, &mut cfg.plugins.rate_limiter] {
        slot.deadline_ms = Some(200);
    }
    let gw = gateway(cfg).await;
    let base = gw.url();
    let meter = config_query(json!({
        "default_price": {"prompt": 1.0, "completion": 2.0},
        "batch_discount": 0.5,
        "market": {"interval_ms": 0, "smoothing": 1.0, "slots_per_rig": 2, "target_utilization": 0.5},
    }));
    let (status, body) = upload_plugin(&base, "meter", garage_plugins::METER, &meter).await;
    assert_eq!(status, 200, "{body}");
    let (_, key) = create_key(&base, json!({"name": "market"})).await;
    (gw, key)
}

/// The model's `pricing` in `GET /v1/models`.
async fn pricing(base: &str, key: &str) -> serde_json::Value {
    let list: serde_json::Value = client()
        .get(format!("{base}/v1/models"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    list["data"][0]["pricing"].clone()
}

#[tokio::test]
async fn market_prices_move_with_load_and_a_request_pays_its_quoted_price() {
    // Ten tokens a second: a stream of 100 tokens keeps a slot busy for ten seconds.
    let engine = paced_sim(10.0).await;
    let (gw, key) = market_gateway(&engine).await;
    let base = gw.url();

    // Idle: half the table, as OpenRouter writes prices (credits per token), and the batch
    // price with its discount.
    let idle = pricing(&base, &key).await;
    assert_eq!(idle["prompt"], "0.0005", "{idle}");
    assert_eq!(idle["completion"], "0.001", "{idle}");
    assert_eq!(idle["per_thousand"]["prompt_per_1k"], 0.5, "{idle}");
    assert_eq!(idle["batch"]["prompt_per_1k"], 0.5, "{idle}");

    // Two long streams fill the rig's two slots: the price rises to three times the table.
    let mut streams = Vec::new();
    for _ in 0..2 {
        let response = client()
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&json!({
                "model": MODEL,
                "messages": [{"role": "user", "content": "a long story"}],
                "max_tokens": 100,
                "stream": true,
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        streams.push(response);
    }
    wait_until(Duration::from_secs(8), "the busy price", || async {
        pricing(&base, &key).await["per_thousand"]["prompt_per_1k"] == 3.0
    })
    .await;
    // Batch lines run when capacity is free: their price does not follow the market.
    assert_eq!(pricing(&base, &key).await["batch"]["prompt_per_1k"], 0.5);

    // A request admitted now is quoted the busy price, and says so before its body.
    let response = client()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&chat(false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        response.headers()["x-garage-price"],
        "prompt=3, completion=6"
    );
    let cost_header: f64 = response.headers()["x-garage-cost"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(
        body["usage"]["completion_tokens"].as_u64().unwrap() > 0,
        "{body}"
    );
    let shown = body["usage"]["cost"].as_f64().unwrap();
    assert_eq!(shown, cost_header);

    // The streams end (their clients go away); the price falls back.
    drop(streams);
    wait_until(Duration::from_secs(8), "the idle price again", || async {
        pricing(&base, &key).await["per_thousand"]["prompt_per_1k"] == 0.5
    })
    .await;

    // Charged at the quote it was admitted with, not at today's price.
    let path = format!("/admin/usage/requests/{request_id}");
    wait_until(
        Duration::from_secs(10),
        "the request's ledger entry",
        || async { admin_get(&base, &path).await["outcome"]["credits"].is_number() },
    )
    .await;
    let entry = admin_get(&base, &path).await;
    let event = &entry["event"];
    assert_eq!(
        event["price"],
        json!({"prompt_per_1k": 3.0, "completion_per_1k": 6.0}),
        "{entry}"
    );
    let (prompt, completion) = (
        event["prompt_tokens"].as_f64().unwrap(),
        event["completion_tokens"].as_f64().unwrap(),
    );
    let credits = entry["outcome"]["credits"].as_f64().unwrap();
    assert!(
        (credits - (prompt * 3.0 + completion * 6.0) / 1000.0).abs() < 1e-9,
        "{entry}"
    );
    // What the answer said it cost is what was charged.
    assert!(
        (shown - credits).abs() < 1e-9,
        "shown {shown}, charged {credits}"
    );
}

/// A meter that quotes nothing (or nonsense) leaves requests unquoted and charged by its
/// `charge` alone, and `GET /v1/models` shows no price rather than a wrong one.
#[tokio::test]
async fn a_meter_that_quotes_nonsense_shows_no_price_and_still_charges() {
    let engine = sim(garage_sim_engine::SimConfig {
        models: vec!["nan".into()],
        ttft: Duration::ZERO,
        ..garage_sim_engine::SimConfig::default()
    })
    .await;
    let mut cfg = config(vec![garage_gateway::config::UpstreamConfig {
        models: vec!["nan".into()],
        ..upstream("a", engine.base_url())
    }]);
    cfg.default_plugins = true;
    let gw = gateway(cfg).await;
    let base = gw.url();
    let (status, body) =
        upload_plugin(&base, "meter", garage_plugins::fixtures::PICKY_METER, "").await;
    assert_eq!(status, 200, "{body}");
    let (_, key) = create_key(&base, json!({"name": "nonsense"})).await;
    let listed = pricing(&base, &key).await;
    assert!(listed.is_null(), "{listed}");
    let response = client()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&json!({"model": "nan", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let path = format!("/admin/usage/requests/{request_id}");
    wait_until(Duration::from_secs(10), "the unquoted charge", || async {
        let entry = admin_get(&base, &path).await;
        entry["outcome"]["credits"] == 1.0 && entry["event"]["price"].is_null()
    })
    .await;
}

/// The cost is in the usage of every answer: a whole one (and its header), a stream's last
/// chunk (when the client asked for usage), an embedding; each what the ledger charged.
#[tokio::test]
async fn every_answer_carries_the_cost_it_is_charged() {
    let engine = paced_sim(0.0).await;
    let (gw, key) = market_gateway(&engine).await;
    let base = gw.url();
    let charged = |request_id: String| {
        let base = base.clone();
        async move {
            let path = format!("/admin/usage/requests/{request_id}");
            wait_until(Duration::from_secs(10), "the ledger entry", || async {
                admin_get(&base, &path).await["outcome"]["credits"].is_number()
            })
            .await;
            admin_get(&base, &path).await["outcome"]["credits"]
                .as_f64()
                .unwrap()
        }
    };

    // A stream whose client asked for usage: the last chunk's usage has the cost.
    let response = client()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": "count to five"}],
            "max_tokens": 12,
            "stream": true,
            "stream_options": {"include_usage": true},
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["x-garage-price"],
        "prompt=0.5, completion=1"
    );
    assert!(
        response.headers().get("x-garage-cost").is_none(),
        "not known before a stream"
    );
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let text = response.text().await.unwrap();
    let chunks: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter(|data| *data != "[DONE]")
        .map(|data| serde_json::from_str(data).unwrap())
        .collect();
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]), "{text}");
    let usage = &last["usage"];
    let cost = usage["cost"].as_f64().expect("the cost in the usage chunk");
    let expected = (usage["prompt_tokens"].as_f64().unwrap() * 0.5
        + usage["completion_tokens"].as_f64().unwrap() * 1.0)
        / 1000.0;
    assert!((cost - expected).abs() < 1e-9, "{usage}");
    assert!((charged(request_id).await - cost).abs() < 1e-9);

    // A stream whose client did not ask for usage gets no usage chunk, cost or not.
    let text = client()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&chat(true))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!text.contains("\"cost\""), "{text}");

    // An embedding: prompt tokens only.
    let response = client()
        .post(format!("{base}/v1/embeddings"))
        .bearer_auth(&key)
        .json(&json!({"model": MODEL, "input": "embed me"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let header: f64 = response.headers()["x-garage-cost"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let body: serde_json::Value = response.json().await.unwrap();
    let cost = body["usage"]["cost"].as_f64().unwrap();
    assert_eq!(cost, header);
    assert_eq!(
        cost,
        body["usage"]["prompt_tokens"].as_f64().unwrap() * 0.5 / 1000.0
    );
    assert!((charged(request_id).await - cost).abs() < 1e-9);
}
