//! The gateway counts tokens itself: with a model's tokenizer (here the simulated models', one
//! token per word: `sim-engine/tokenizer.json`), a request is billed the gateway's count of its
//! prompt and of the text it forwarded, streamed or not, cut short or not; a backend's report
//! is checked against the count, and one beyond the tolerance is disputed.

use std::time::Duration;

use crate::support::*;
use serde_json::{Value, json};

fn counting_config(upstream_url: String) -> garage_gateway::Config {
    let mut cfg = config(vec![upstream("sim", upstream_url)]);
    cfg.tokenizers.insert(MODEL.into(), sim_tokenizer());
    cfg
}

async fn post_for_id(base: &str, key: &str, path: &str, body: &Value) -> (String, String) {
    let response = client()
        .post(format!("{base}/v1/{path}"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    (id, response.text().await.unwrap())
}

#[tokio::test]
async fn honest_reports_agree_with_the_count_on_every_endpoint() {
    let engine = fast_sim().await;
    let gw = gateway(counting_config(engine.base_url())).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "count"})).await;
    let prompt = "one two three four five";
    let requests = [
        (
            "chat/completions",
            json!({"model": MODEL, "max_tokens": 12, "stream": false,
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": prompt}]}),
        ),
        (
            "chat/completions",
            json!({"model": MODEL, "max_tokens": 12, "stream": true,
            "messages": [{"role": "user", "content": [{"type": "text", "text": prompt}]}]}),
        ),
        (
            "completions",
            json!({"model": MODEL, "max_tokens": 7, "prompt": prompt}),
        ),
        (
            "completions",
            json!({"model": MODEL, "max_tokens": 7, "prompt": prompt, "stream": true}),
        ),
        (
            "responses",
            json!({"model": MODEL, "max_output_tokens": 9, "input": prompt, "stream": true}),
        ),
    ];
    for (path, body) in requests {
        let (id, _) = post_for_id(&base, &key, path, &body).await;
        let entry = ledger_entry(&base, &id).await;
        let event = &entry["event"];
        assert_eq!(event["counted"]["by"], "gateway", "{path}: {entry}");
        assert_eq!(event["counted"]["agreed"], true, "{path}: {entry}");
        assert_eq!(
            event["prompt_tokens"], event["counted"]["reported_prompt_tokens"],
            "{path}: {entry}"
        );
        assert_eq!(
            event["completion_tokens"], event["counted"]["reported_completion_tokens"],
            "{path}: {entry}"
        );
        assert!(event["completion_tokens"].as_u64().unwrap() > 0, "{entry}");
    }
    assert_metrics_include(
        &base,
        &["garage_usage_checks_total{outcome=\"agreed\"} 5".into()],
    )
    .await;
}

#[tokio::test]
async fn a_stream_cut_short_is_billed_the_words_it_delivered() {
    let engine = paced_sim(50.0).await;
    let gw = gateway(counting_config(engine.base_url())).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "count"})).await;
    let mut response = client()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&json!({"model": MODEL, "max_tokens": 500, "stream": true,
            "messages": [{"role": "user", "content": "tell me everything"}]}))
        .send()
        .await
        .unwrap();
    let id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let mut text = String::new();
    while text.matches("\"content\":\"").count() < 6 {
        text.push_str(&String::from_utf8_lossy(
            &response.chunk().await.unwrap().unwrap(),
        ));
    }
    drop(response);
    let entry = ledger_entry(&base, &id).await;
    let event = &entry["event"];
    assert_eq!(event["counted"]["by"], "gateway", "{entry}");
    assert!(
        event["counted"]["reported_completion_tokens"].is_null(),
        "{entry}"
    );
    // The prompt's three words and the template's four; the words forwarded (at least those
    // the client read, and far fewer than the 500 asked for).
    assert_eq!(event["prompt_tokens"], 7, "{entry}");
    let completion = event["completion_tokens"].as_u64().unwrap();
    assert!((5..60).contains(&completion), "{entry}");
}

#[tokio::test]
async fn a_tokenizer_that_cannot_be_read_stops_the_start() {
    let mut cfg = counting_config("http://127.0.0.1:9/v1".into());
    cfg.tokenizers.get_mut(MODEL).unwrap().file = "/nonexistent/tokenizer.json".into();
    let err = garage_gateway::Gateway::start(cfg)
        .await
        .err()
        .expect("refused");
    let message = err.to_string();
    assert!(
        message
            .contains("cannot load the tokenizer of `sim-model` from /nonexistent/tokenizer.json"),
        "{message}"
    );
}

#[tokio::test]
async fn an_inflating_rig_is_billed_the_count_and_its_report_disputed() {
    let engine = sim(garage_sim_engine::SimConfig {
        models: vec![MODEL.into()],
        ttft: Duration::ZERO,
        faults: garage_sim_engine::Faults {
            usage_inflation: Some(3.0),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let gw = gateway(counting_config(engine.base_url())).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "count"})).await;
    for stream in [false, true] {
        let body = json!({"model": MODEL, "max_tokens": 20, "stream": stream,
            "messages": [{"role": "user", "content": "one two three four five"}]});
        let (id, _) = post_for_id(&base, &key, "chat/completions", &body).await;
        let entry = ledger_entry(&base, &id).await;
        let event = &entry["event"];
        assert_eq!(event["counted"]["agreed"], false, "{entry}");
        // Five words and the template's four; what was forwarded. Not the rig's word for it.
        assert_eq!(event["prompt_tokens"], 9, "{entry}");
        assert_eq!(event["counted"]["reported_prompt_tokens"], 27, "{entry}");
        let billed = event["completion_tokens"].as_u64().unwrap();
        let reported = event["counted"]["reported_completion_tokens"]
            .as_u64()
            .unwrap();
        assert_eq!(reported, billed * 3, "{entry}");
    }
    assert_metrics_include(
        &base,
        &[
            "garage_usage_checks_total{outcome=\"disputed\"} 2".into(),
            "garage_usage_corrections_total{kind=\"disputed\"} 2".into(),
        ],
    )
    .await;
}
