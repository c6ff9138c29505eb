//! Anthropic's Messages API through the gateway (`/v1/messages`, `/v1/messages/count_tokens`):
//! the same request path as chat (keys, allowed models, limits, budgets, routing, streaming
//! event by event, usage counted by the gateway where it has the tokenizer), errors in
//! Anthropic's shape; and, for every inference route, a charge in the ledger.

use std::time::Duration;

use garage_sim_engine::Faults;
use serde_json::{Value, json};

use crate::support::*;

/// Default plugins (the meter charges), the simulated models' tokenizer (the gateway counts).
fn metered(upstreams: Vec<garage_gateway::config::UpstreamConfig>) -> garage_gateway::Config {
    let mut cfg = config(upstreams);
    cfg.default_plugins = true;
    // Two cores run many tests at once: a 5 ms guest deadline can be blown by the scheduler
    // alone (deadlines have their own tests, in `plugin_host`).
    for slot in [&mut cfg.plugins.router, &mut cfg.plugins.rate_limiter] {
        slot.deadline_ms = Some(200);
    }
    cfg.tokenizers.insert(MODEL.into(), sim_tokenizer());
    cfg
}

/// A Messages request as Anthropic's SDK sends it: `x-api-key` and `anthropic-version`.
async fn anthropic(base: &str, key: &str, path: &str, body: &Value) -> reqwest::Response {
    client()
        .post(format!("{base}/v1/{path}"))
        .header("x-api-key", key)
        .header("anthropic-version", "2023-06-01")
        .json(body)
        .send()
        .await
        .expect("gateway answers")
}

fn request_id(response: &reqwest::Response) -> String {
    response.headers()["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_owned()
}

fn message(stream: bool) -> Value {
    json!({
        "model": MODEL, "max_tokens": 6, "stream": stream,
        "system": "be brief",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hello there garage"}]}],
    })
}

/// Anthropic's error envelope of a body, asserting its shape; its `error.type`.
fn anthropic_error(body: &str) -> String {
    let value: Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    assert_eq!(value["type"], "error", "{body}");
    assert!(value["error"]["message"].is_string(), "{body}");
    assert!(
        value.get("param").is_none() && value["error"].get("code").is_none(),
        "{body}"
    );
    value["error"]["type"].as_str().expect("a type").to_owned()
}

/// A stream's events: `(event line, data)`, checking each names its data's type.
fn typed_events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter(|event| !event.trim().is_empty())
        .map(|event| {
            let (kind, data) = event
                .strip_prefix("event: ")
                .and_then(|event| event.split_once("\ndata: "))
                .unwrap_or_else(|| panic!("not a typed event: {event:?}"));
            let data: Value = serde_json::from_str(data).expect("JSON data");
            assert_eq!(data["type"], kind, "{event}");
            (kind.to_owned(), data)
        })
        .collect()
}

#[tokio::test]
async fn a_message_is_answered_counted_and_charged() {
    let engine = fast_sim().await;
    let gw = gateway(metered(vec![upstream("sim", engine.base_url())])).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "agent"})).await;
    let response = anthropic(&base, &key, "messages", &message(false)).await;
    assert_eq!(response.status(), 200);
    let id = request_id(&response);
    // Anthropic's name for it too, which its SDKs read.
    assert_eq!(response.headers()["request-id"], id.as_str());
    let body: Value = response.json().await.unwrap();
    assert!(body["id"].as_str().unwrap().starts_with("msg_"), "{body}");
    assert_eq!(
        (&body["type"], &body["role"]),
        (&json!("message"), &json!("assistant"))
    );
    assert_eq!(body["content"][0]["type"], "text");
    assert_eq!(body["stop_reason"], "max_tokens");
    // The system prompt and the message: five words, two messages of four template tokens.
    // And what it cost, at the meter's quote (a credit per 1,000 tokens).
    assert_eq!(
        body["usage"],
        json!({"input_tokens": 13, "output_tokens": 6, "cost": 0.019})
    );

    let entry = ledger_entry(&base, &id).await;
    let event = &entry["event"];
    assert_eq!(event["model"], MODEL, "{entry}");
    assert_eq!(
        (&event["prompt_tokens"], &event["completion_tokens"]),
        (&json!(13), &json!(6))
    );
    assert_eq!(event["counted"]["by"], "gateway", "{entry}");
    assert_eq!(event["counted"]["agreed"], true, "{entry}");
    // The default meter: a credit per 1,000 tokens.
    let credits = entry["outcome"]["credits"].as_f64().unwrap();
    assert!((credits - 0.019).abs() < 1e-9, "{entry}");
    assert_metrics_include(
        &base,
        &[format!(
            "garage_requests_total{{model=\"{MODEL}\",route=\"messages\",status=\"200\"}} 1"
        )],
    )
    .await;
}

/// Through a rig's tunnel, event by event: the first text arrives while the rig is still
/// generating, and the usage comes from `message_start` and `message_delta`.
#[tokio::test]
async fn a_streamed_message_from_a_rig_passes_event_by_event_and_is_charged() {
    let gw = gateway(metered(vec![])).await;
    let base = gw.url();
    let token = enrollment_token(&base, 1).await;
    // Paced, so the stream is still being generated when its first events arrive.
    let rig = sim_rig(rig_options(&base, "anthropic-rig", &token), 20.0).await;
    wait_until(Duration::from_secs(10), "the rig in routing", || async {
        routable_rigs(&base).await == 1
    })
    .await;
    let (_, key) = create_key(&base, json!({"name": "agent"})).await;
    let mut response = anthropic(&base, &key, "messages", &message(true)).await;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let id = request_id(&response);
    let mut text = String::new();
    while !text.contains("event: content_block_delta") {
        let chunk = response.chunk().await.unwrap().expect("more of the stream");
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert!(
        !text.contains("message_stop"),
        "the whole answer came at once: {text}"
    );
    while let Some(chunk) = response.chunk().await.unwrap() {
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let events = typed_events(&text);
    let kinds: Vec<&str> = events.iter().map(|(kind, _)| kind.as_str()).collect();
    let mut expected = vec!["message_start", "content_block_start", "ping"];
    expected.extend(["content_block_delta"; 6]);
    expected.extend(["content_block_stop", "message_delta", "message_stop"]);
    assert_eq!(kinds, expected);
    assert_eq!(events[0].1["message"]["usage"]["input_tokens"], 13);
    assert_eq!(events[10].1["usage"]["output_tokens"], 6);

    let entry = ledger_entry(&base, &id).await;
    let event = &entry["event"];
    assert_eq!(
        (&event["prompt_tokens"], &event["completion_tokens"]),
        (&json!(13), &json!(6))
    );
    assert_eq!(event["counted"]["agreed"], true, "{entry}");
    assert_eq!(event["rig"], rig.node_id(), "{entry}");
    assert!(
        entry["outcome"]["credits"].as_f64().unwrap() > 0.0,
        "{entry}"
    );
    rig.shutdown().await;
}

/// count_tokens: authenticated and rate-limited like the rest, recorded, not charged.
#[tokio::test]
async fn counting_tokens_is_limited_and_recorded_but_not_charged() {
    let engine = fast_sim().await;
    let gw = gateway(metered(vec![upstream("sim", engine.base_url())])).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "l", "metadata": {"rpm": 1}})).await;
    let mut count = message(false);
    count.as_object_mut().unwrap().remove("max_tokens");
    let response = anthropic(&base, &key, "messages/count_tokens", &count).await;
    assert_eq!(response.status(), 200);
    let id = request_id(&response);
    let counted: Value = response.json().await.unwrap();
    assert_eq!(counted["input_tokens"], 13, "{counted}");
    let entry = ledger_entry(&base, &id).await;
    let event = &entry["event"];
    assert_eq!(
        (&event["prompt_tokens"], &event["completion_tokens"]),
        (&json!(0), &json!(0))
    );
    assert_eq!(entry["outcome"]["credits"].as_f64(), Some(0.0), "{entry}");
    // The key's one request a minute is spent.
    let refused = anthropic(&base, &key, "messages/count_tokens", &count).await;
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    assert_eq!(refused.headers()["x-should-retry"], "true");
    assert_eq!(
        anthropic_error(&refused.text().await.unwrap()),
        "rate_limit_error"
    );
    // Without a key, 401.
    let response = client()
        .post(format!("{base}/v1/messages/count_tokens"))
        .json(&count)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(
        anthropic_error(&response.text().await.unwrap()),
        "authentication_error"
    );
}

/// Refusals before any rig, each in Anthropic's shape with the gateway's usual status; the
/// OpenAI routes keep OpenAI's.
#[tokio::test]
async fn refusals_on_the_messages_routes_are_anthropic_errors() {
    let engine = fast_sim().await;
    let gw = gateway(metered(vec![upstream("sim", engine.base_url())])).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "agent"})).await;
    let (_, other) = create_key(&base, json!({"name": "o", "allowed_models": ["other"]})).await;
    let send = |key: Option<&str>, bearer: bool, body: Value| {
        let mut request = client()
            .post(format!("{base}/v1/messages"))
            .header("anthropic-version", "2023-06-01")
            .json(&body);
        request = match (key, bearer) {
            (Some(key), true) => request.bearer_auth(key),
            (Some(key), false) => request.header("x-api-key", key),
            (None, _) => request,
        };
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.text().await.unwrap())
        }
    };
    let mut no_max_tokens = message(false);
    no_max_tokens.as_object_mut().unwrap().remove("max_tokens");
    let mut unknown_model = message(false);
    unknown_model["model"] = json!("nobody-serves-this");
    for (what, key, body, status, kind) in [
        ("no key", None, message(false), 401, "authentication_error"),
        (
            "a wrong key",
            Some("sk-garage-wrong"),
            message(false),
            401,
            "authentication_error",
        ),
        (
            "no max_tokens",
            Some(&*key),
            no_max_tokens,
            400,
            "invalid_request_error",
        ),
        (
            "max_tokens 0",
            Some(&*key),
            json!({"model": MODEL, "max_tokens": 0, "messages": []}),
            400,
            "invalid_request_error",
        ),
        (
            "no messages",
            Some(&*key),
            json!({"model": MODEL, "max_tokens": 5}),
            400,
            "invalid_request_error",
        ),
        (
            "no model",
            Some(&*key),
            json!({"max_tokens": 5, "messages": []}),
            400,
            "invalid_request_error",
        ),
        (
            "a model not allowed",
            Some(&*other),
            message(false),
            403,
            "permission_error",
        ),
        (
            "an unknown model",
            Some(&*key),
            unknown_model,
            404,
            "not_found_error",
        ),
    ] {
        let (got, body) = send(key, false, body).await;
        assert_eq!(got, status, "{what}: {body}");
        assert_eq!(anthropic_error(&body), kind, "{what}: {body}");
    }
    // A bearer token is a key here too.
    assert_eq!(send(Some(&key), true, message(false)).await.0, 200);
    // Not JSON.
    let response = client()
        .post(format!("{base}/v1/messages"))
        .header("x-api-key", &key)
        .body("{\"model\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(
        anthropic_error(&response.text().await.unwrap()),
        "invalid_request_error"
    );
    // A rig's own refusal (vLLM's type in Anthropic's envelope) gets Anthropic's type, and
    // keeps the rig's words.
    let bad_role = json!({"model": MODEL, "max_tokens": 5,
        "messages": [{"role": "robot", "content": "hi"}]});
    let (status, body) = send(Some(&key), false, bad_role).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(anthropic_error(&body), "invalid_request_error");
    assert!(body.contains("robot"), "{body}");
    // Another method, or a path under /v1/messages that is not served: Anthropic's shape too.
    let response = client()
        .get(format!("{base}/v1/messages"))
        .header("x-api-key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    assert_eq!(
        anthropic_error(&response.text().await.unwrap()),
        "invalid_request_error"
    );
    let response = client()
        .post(format!("{base}/v1/messages/batches"))
        .header("x-api-key", &key)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    assert_eq!(
        anthropic_error(&response.text().await.unwrap()),
        "not_found_error"
    );
    // x-api-key is Anthropic's: the OpenAI routes want a bearer token, and answer in OpenAI's
    // shape.
    let response = client()
        .post(format!("{base}/v1/chat/completions"))
        .header("x-api-key", &key)
        .json(&chat(false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(
        error_of(&response.text().await.unwrap())["code"],
        "invalid_api_key"
    );
}

#[tokio::test]
async fn a_spent_budget_is_a_billing_error() {
    let engine = fast_sim().await;
    let gw = gateway(metered(vec![upstream("sim", engine.base_url())])).await;
    let base = gw.url();
    let query = config_query(json!({"default_budget": 0.001}));
    let (status, body) = upload_plugin(&base, "meter", garage_plugins::METER, &query).await;
    assert_eq!(status, 200, "{body}");
    let (_, key) = create_key(&base, json!({"name": "spender"})).await;
    assert_eq!(
        anthropic(&base, &key, "messages", &message(false))
            .await
            .status(),
        200
    );
    wait_until(Duration::from_secs(10), "the budget verdict", || async {
        let response = anthropic(&base, &key, "messages", &message(false)).await;
        let status = response.status();
        let spent = response
            .headers()
            .get("x-should-retry")
            .is_some_and(|v| v == "false");
        status == 429
            && spent
            && anthropic_error(&response.text().await.unwrap()) == "billing_error"
    })
    .await;
}

/// A rig that inflates the usage it reports, streamed and not: the gateway's own count is
/// billed (as for chat), the report disputed.
#[tokio::test]
async fn a_rig_that_lies_about_its_usage_is_billed_the_gateways_count() {
    let engine = faulty_sim(Faults {
        usage_inflation: Some(3.0),
        ..Faults::default()
    })
    .await;
    let gw = gateway(metered(vec![upstream("sim", engine.base_url())])).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "agent"})).await;
    for stream in [false, true] {
        let response = anthropic(&base, &key, "messages", &message(stream)).await;
        assert_eq!(response.status(), 200);
        let id = request_id(&response);
        let text = response.text().await.unwrap();
        // What the client is shown is the rig's answer, passed as it came.
        assert!(text.contains("\"output_tokens\":18"), "{text}");
        let entry = ledger_entry(&base, &id).await;
        let event = &entry["event"];
        assert_eq!(event["counted"]["agreed"], false, "{entry}");
        assert_eq!(event["counted"]["reported_prompt_tokens"], 39, "{entry}");
        assert_eq!(
            event["counted"]["reported_completion_tokens"], 18,
            "{entry}"
        );
        assert_eq!(
            (&event["prompt_tokens"], &event["completion_tokens"]),
            (&json!(13), &json!(6))
        );
        let credits = entry["outcome"]["credits"].as_f64().unwrap();
        assert!((credits - 0.019).abs() < 1e-9, "{entry}");
    }
    assert_metrics_include(
        &base,
        &["garage_usage_checks_total{outcome=\"disputed\"} 2".into()],
    )
    .await;
}

/// A rig whose stream breaks off: the client's stream ends with Anthropic's `error` event,
/// and the request is billed what it delivered.
#[tokio::test]
async fn a_stream_cut_midway_ends_with_an_anthropic_error_event() {
    let engine = faulty_sim(Faults {
        drop_rate: 1.0,
        ..Faults::default()
    })
    .await;
    let gw = gateway(metered(vec![upstream("sim", engine.base_url())])).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "agent"})).await;
    let response = anthropic(&base, &key, "messages", &message(true)).await;
    assert_eq!(response.status(), 200);
    let id = request_id(&response);
    let events = typed_events(&response.text().await.unwrap());
    let (kind, error) = events.last().expect("events");
    assert_eq!(kind, "error", "{events:?}");
    assert_eq!(error["error"]["type"], "api_error");
    assert!(
        events.iter().any(|(kind, _)| kind == "content_block_delta"),
        "{events:?}"
    );
    assert!(
        events.iter().all(|(kind, _)| kind != "message_stop"),
        "{events:?}"
    );
    let entry = ledger_entry(&base, &id).await;
    let event = &entry["event"];
    // The prompt as counted, and the one token delivered.
    assert_eq!(
        (&event["prompt_tokens"], &event["completion_tokens"]),
        (&json!(13), &json!(1))
    );
    assert!(
        entry["outcome"]["credits"].as_f64().unwrap() > 0.0,
        "{entry}"
    );
}

/// Paths served on the inference route that are not charged, on purpose: counting tokens
/// generates nothing (docs/money.md). Anything else must be.
const NOT_CHARGED: &[&str] = &["/v1/messages/count_tokens"];

/// A request for an inference route; `None` for one this test does not know yet.
fn request_for(path: &str) -> Option<Value> {
    let prompt = "hello there garage";
    Some(match path {
        "/v1/chat/completions" => {
            json!({"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": prompt}]})
        }
        "/v1/completions" => json!({"model": MODEL, "max_tokens": 4, "prompt": prompt}),
        "/v1/embeddings" => json!({"model": MODEL, "input": prompt}),
        "/v1/responses" => json!({"model": MODEL, "max_output_tokens": 4, "input": prompt}),
        "/v1/rerank" => json!({"model": MODEL, "query": prompt, "documents": ["garage", "hello"]}),
        "/v1/score" => json!({"model": MODEL, "text_1": prompt, "text_2": ["hello there"]}),
        "/v1/messages" => message(false),
        "/v1/messages/count_tokens" => {
            json!({"model": MODEL, "messages": [{"role": "user", "content": prompt}]})
        }
        _ => return None,
    })
}

/// Every route the gateway serves inference on (a route added later included: they come from
/// the gateway's own list) leaves a charge in the ledger, by the default meter.
#[tokio::test]
async fn every_inference_route_is_charged() {
    let engine = fast_sim().await;
    let gw = gateway(metered(vec![upstream("sim", engine.base_url())])).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "everything"})).await;
    let paths: Vec<String> = garage_gateway::inference::api::inference_paths().collect();
    assert!(paths.len() >= 8, "{paths:?}");
    for path in &paths {
        let body = request_for(path).unwrap_or_else(|| {
            panic!("{path} is served, and this test sends it nothing: add a request for it")
        });
        let response = client()
            .post(format!("{base}{path}"))
            .bearer_auth(&key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "{path}");
        let id = request_id(&response);
        let answer = response.text().await.unwrap();
        let entry = ledger_entry(&base, &id).await;
        assert!(
            entry["event"]["key_id"]
                .as_str()
                .is_some_and(|id| !id.is_empty()),
            "{path}: {entry}"
        );
        let credits = entry["outcome"]["credits"]
            .as_f64()
            .unwrap_or_else(|| panic!("{path}: no charge in {entry}"));
        if NOT_CHARGED.contains(&path.as_str()) {
            assert_eq!(credits, 0.0, "{path}: {entry}");
        } else {
            assert!(
                credits > 0.0,
                "{path} spent without a charge: {entry} ({answer})"
            );
        }
    }
}

/// Both routes are in the spec with every status they answer, their errors in Anthropic's
/// shape, and the key as `x-api-key` or a bearer token.
#[tokio::test]
async fn the_spec_describes_the_messages_routes_and_their_errors() {
    let gw = gateway(config(vec![])).await;
    let spec: Value = client()
        .get(format!("{}/openapi.json", gw.url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for path in ["/v1/messages", "/v1/messages/count_tokens"] {
        let operation = &spec["paths"][path]["post"];
        let statuses: Vec<&str> = operation["responses"]
            .as_object()
            .unwrap_or_else(|| panic!("{path} is not described: {operation}"))
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            statuses,
            [
                "200", "400", "401", "403", "404", "413", "429", "500", "502", "503", "504"
            ],
            "{path}"
        );
        let error = &operation["responses"]["401"]["content"]["application/json"]["schema"];
        assert_eq!(
            error["$ref"], "#/components/schemas/AnthropicErrorBody",
            "{path}: {operation}"
        );
        assert_eq!(
            operation["security"],
            json!([{"api_key": []}, {"x_api_key": []}]),
            "{path}"
        );
    }
    assert_eq!(
        spec["components"]["securitySchemes"]["x_api_key"],
        json!({"type": "apiKey", "in": "header", "name": "x-api-key"})
    );
}
