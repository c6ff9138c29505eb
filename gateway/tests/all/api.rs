//! The gateway over real sockets: a gateway on port 0, simulated engines in front of it, the
//! embedded store.

use std::net::SocketAddr;
use std::time::Duration;

use crate::support::*;
use axum::routing::post;
use futures::StreamExt;
use garage_gateway::config::UpstreamConfig;
use garage_sim_engine::{Faults, SimConfig, SimEngine};
use serde_json::json;

/// A backend that answers with what it received, so tests can see exactly what the gateway sent.
async fn echo_upstream() -> (String, tokio::task::JoinHandle<()>) {
    async fn echo(
        headers: axum::http::HeaderMap,
        body: bytes::Bytes,
    ) -> axum::Json<serde_json::Value> {
        let received: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
        axum::Json(json!({
            "id": "echo-1",
            "object": "chat.completion",
            "received": received,
            "received_raw": String::from_utf8_lossy(&body),
            "received_auth": headers.get("authorization").and_then(|v| v.to_str().ok()),
            "received_request_id": headers.get("x-request-id").and_then(|v| v.to_str().ok()),
            "backend_extension": {"kv_cache_hit": true},
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "echo"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 1, "total_tokens": 12}
        }))
    }
    let app = axum::Router::new().route("/v1/chat/completions", post(echo));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}/v1"), task)
}

#[tokio::test]
async fn chat_plain_and_streamed_with_usage_hidden_unless_asked() {
    let engine = fast_sim().await;
    let gw = gateway(config(vec![upstream("a", engine.base_url())])).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "t"})).await;

    let (status, body) = post_chat(&base, &key, &chat(false)).await;
    assert_eq!(status, 200, "{body}");
    let value: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(value["object"], "chat.completion");
    assert_eq!(value["usage"]["completion_tokens"], 5);

    // Streamed, client did not ask for usage: the gateway asked, read it, and hid the chunk.
    let (status, body) = post_chat(&base, &key, &chat(true)).await;
    assert_eq!(status, 200);
    let events: Vec<&str> = body.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert!(events.len() >= 3, "{body}");
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    assert!(!body.contains("\"usage\""), "usage chunk leaked: {body}");

    // Streamed, client asked: it gets the usage chunk.
    let mut asked = chat(true);
    asked["stream_options"] = json!({"include_usage": true});
    let (_, body) = post_chat(&base, &key, &asked).await;
    let usage_event = body
        .split("\n\n")
        .find(|e| e.contains("\"usage\""))
        .expect("usage chunk");
    let usage: serde_json::Value =
        serde_json::from_str(usage_event.trim_start_matches("data: ")).unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 5);

    // The gateway metered all three requests, streamed or not.
    let metrics = metrics_text(&base).await;
    assert!(
        metrics.contains(&format!(
            "garage_tokens_total{{direction=\"completion\",model=\"{MODEL}\"}} 15"
        )),
        "{metrics}"
    );
    assert!(metrics.contains(
        "garage_requests_total{model=\"sim-model\",route=\"chat_completions\",status=\"200\"} 3"
    ));
    assert!(metrics.contains("garage_time_to_first_token_seconds_count{model=\"sim-model\"} 2"));
}

/// The value of a metric line without labels, such as `garage_requests_in_flight`.
fn metric_value(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn metrics_count_each_status_and_the_requests_in_flight() {
    // Five tokens at 10 per second: a stream that lasts about half a second.
    let engine = paced_sim(10.0).await;
    let gw = gateway(config(vec![upstream("a", engine.base_url())])).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "t"})).await;
    assert_eq!(
        metric_value(&metrics_text(&base).await, "garage_requests_in_flight"),
        Some(0.0)
    );

    let mut stream = client()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&chat(true))
        .send()
        .await
        .unwrap()
        .bytes_stream();
    let first = stream.next().await.expect("a first chunk").unwrap();
    assert!(!first.is_empty());
    // The stream is under way: its request is in flight until the backend's stream ends.
    assert_eq!(
        metric_value(&metrics_text(&base).await, "garage_requests_in_flight"),
        Some(1.0)
    );
    while let Some(chunk) = stream.next().await {
        chunk.unwrap();
    }
    wait_until(Duration::from_secs(5), "no request in flight", || async {
        metric_value(&metrics_text(&base).await, "garage_requests_in_flight") == Some(0.0)
    })
    .await;

    // The backend refuses a message that is not an object: its 400 passes through and is
    // counted under its own status, beside the 200s.
    let mut bad = chat(false);
    bad["messages"] = json!([5]);
    let (status, body) = post_chat(&base, &key, &bad).await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = post_chat(&base, &key, &chat(false)).await;
    assert_eq!(status, 200);
    // The stream and one plain request were answered 200; all three were timed.
    let metrics = metrics_text(&base).await;
    for (status, count) in [("200", 2), ("400", 1)] {
        let line = format!(
            "garage_requests_total{{model=\"{MODEL}\",route=\"chat_completions\",status=\"{status}\"}} {count}"
        );
        assert!(metrics.contains(&line), "no `{line}` in {metrics}");
    }
    assert!(
        metrics.contains(&format!(
            "garage_request_duration_seconds_count{{model=\"{MODEL}\",route=\"chat_completions\"}} 3"
        )),
        "{metrics}"
    );
}

#[tokio::test]
async fn completions_and_embeddings_pass_through() {
    let engine = fast_sim().await;
    let gw = gateway(config(vec![upstream("a", engine.base_url())])).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "t"})).await;
    let completion: serde_json::Value = client()
        .post(format!("{base}/v1/completions"))
        .bearer_auth(&key)
        .json(&json!({"model": MODEL, "prompt": "once upon", "max_tokens": 3}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(completion["object"], "text_completion");
    assert_eq!(completion["usage"]["completion_tokens"], 3);
    let embedding = client()
        .post(format!("{base}/v1/embeddings"))
        .bearer_auth(&key)
        .json(&json!({"model": MODEL, "input": ["a", "b"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(embedding.status(), 200);
    let embedding: serde_json::Value = embedding.json().await.unwrap();
    assert_eq!(embedding["data"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn responses_pass_through_plain_and_streamed_and_are_metered() {
    let engine = fast_sim().await;
    let gw = gateway(config(vec![upstream("a", engine.base_url())])).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "t"})).await;
    let post = |body: serde_json::Value| {
        let (base, key) = (base.clone(), key.clone());
        async move { post_json(&base, &key, "responses", &body).await }
    };

    let (status, body) = post(json!({
        "model": MODEL, "input": [{"role": "user", "content": "hello there"}],
        "max_output_tokens": 4, "text": {"format": {"type": "text"}},
    }))
    .await;
    assert_eq!(status, 200, "{body}");
    let value: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(value["object"], "response");
    assert_eq!(
        value["output"][0]["content"][0]["text"],
        "the quick brown fox "
    );
    assert_eq!(value["usage"]["output_tokens"], 4);

    // Streamed: the typed events pass as the backend wrote them, `event:` lines and all, and
    // the usage stays in the last one (the client did not ask for it: a Responses stream
    // always reports it, so there is nothing to hide).
    let (status, body) =
        post(json!({"model": MODEL, "input": "hi", "max_output_tokens": 3, "stream": true})).await;
    assert_eq!(status, 200, "{body}");
    let events: Vec<&str> = body.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert!(
        events[0].starts_with("event: response.created\ndata: {"),
        "{body}"
    );
    let last = events.last().unwrap();
    let data = last
        .strip_prefix("event: response.completed\ndata: ")
        .unwrap_or_else(|| panic!("last event: {last}"));
    let completed: serde_json::Value = serde_json::from_str(data).unwrap();
    assert_eq!(completed["response"]["usage"]["output_tokens"], 3);
    assert!(!body.contains("[DONE]"), "{body}");
    let deltas = events
        .iter()
        .filter(|e| e.starts_with("event: response.output_text.delta\n"))
        .count();
    assert_eq!(deltas, 3);

    // Both were metered, under their own route.
    assert_metrics_include(
        &base,
        &[
            format!("garage_tokens_total{{direction=\"completion\",model=\"{MODEL}\"}} 7"),
            format!(
                "garage_requests_total{{model=\"{MODEL}\",route=\"responses\",status=\"200\"}} 2"
            ),
            format!("garage_time_to_first_token_seconds_count{{model=\"{MODEL}\"}} 1"),
        ],
    )
    .await;

    for (bad, status, param) in [
        (json!({"model": MODEL}), 400, json!("input")),
        (json!({"model": MODEL, "input": 5}), 400, json!("input")),
        (json!({"input": "hi"}), 400, json!("model")),
        (json!({"model": "nope", "input": "hi"}), 404, json!("model")),
    ] {
        let (got, body) = post(bad.clone()).await;
        assert_eq!(got, status, "{bad}: {body}");
        assert_eq!(error_of(&body)["param"], param, "{bad}: {body}");
    }
}

/// A backend that opens a Responses stream at once, as OpenAI does, and sends its first output
/// only `delay` later.
async fn early_created_upstream(delay: Duration) -> (String, tokio::task::JoinHandle<()>) {
    let app = axum::Router::new().route(
        "/v1/responses",
        post(move || async move {
            let event = |kind: &str, data: serde_json::Value| {
                let mut data = data;
                data["type"] = json!(kind);
                Ok::<_, std::io::Error>(bytes::Bytes::from(format!(
                    "event: {kind}\ndata: {data}\n\n"
                )))
            };
            let created = event("response.created", json!({"response": {"usage": null}}));
            let later = async move {
                tokio::time::sleep(delay).await;
                futures::stream::iter([
                    event("response.output_text.delta", json!({"delta": "hi"})),
                    event(
                        "response.completed",
                        json!({"response": {"usage": {"input_tokens": 2, "output_tokens": 1}}}),
                    ),
                ])
            };
            let body = futures::stream::once(async { created })
                .chain(futures::stream::once(later).flatten());
            (
                [("content-type", "text/event-stream")],
                axum::body::Body::from_stream(body),
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}/v1"), task)
}

#[tokio::test]
async fn a_responses_stream_times_its_first_token_at_its_first_output_not_its_opening() {
    let delay = Duration::from_millis(300);
    let (url, _backend) = early_created_upstream(delay).await;
    let gw = gateway(config(vec![upstream("early", url)])).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "t"})).await;
    let response = client()
        .post(format!("{base}/v1/responses"))
        .bearer_auth(&key)
        .json(&json!({"model": MODEL, "input": "hi", "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.text().await.unwrap();
    assert!(
        body.ends_with("\n\n") && body.contains("response.completed"),
        "{body}"
    );
    let metrics = metrics_text(&base).await;
    let sum = metric_value(
        &metrics,
        &format!("garage_time_to_first_token_seconds_sum{{model=\"{MODEL}\"}}"),
    )
    .unwrap_or_else(|| panic!("no time to first token in {metrics}"));
    // The backend answered its first bytes at once; its first token came `delay` later.
    assert!(sum >= delay.as_secs_f64(), "{sum} s: {metrics}");
    assert!(metrics.contains(&format!(
        "garage_tokens_total{{direction=\"completion\",model=\"{MODEL}\"}} 1"
    )));
}

#[tokio::test]
async fn rerank_and_score_pass_through_and_are_metered() {
    let engine = fast_sim().await;
    let gw = gateway(config(vec![upstream("a", engine.base_url())])).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "t"})).await;
    let post = |path: &'static str, body: serde_json::Value| {
        let (base, key) = (base.clone(), key.clone());
        async move {
            let (status, text) = post_json(&base, &key, path, &body).await;
            let body: serde_json::Value = serde_json::from_str(&text).expect("JSON");
            (status, body)
        }
    };
    let (status, ranked) = post(
        "rerank",
        json!({"model": MODEL, "query": "red apple", "documents": ["a pear", "red apple pie"],
               "return_documents": true}),
    )
    .await;
    assert_eq!(status, 200, "{ranked}");
    assert_eq!(ranked["results"][0]["index"], 1);
    assert_eq!(ranked["usage"]["prompt_tokens"], 7 + 8);
    let (status, scored) = post(
        "score",
        json!({"model": MODEL, "text_1": "red apple", "text_2": "red apple"}),
    )
    .await;
    assert_eq!(status, 200, "{scored}");
    assert_eq!(scored["data"][0]["score"], 1.0);

    assert_metrics_include(
        &base,
        &[
            format!("garage_tokens_total{{direction=\"prompt\",model=\"{MODEL}\"}} 22"),
            format!("garage_requests_total{{model=\"{MODEL}\",route=\"rerank\",status=\"200\"}} 1"),
            format!("garage_requests_total{{model=\"{MODEL}\",route=\"score\",status=\"200\"}} 1"),
        ],
    )
    .await;

    for (path, bad, param) in [
        ("rerank", json!({"model": MODEL, "query": "q"}), "documents"),
        (
            "rerank",
            json!({"model": MODEL, "documents": ["d"]}),
            "query",
        ),
        ("score", json!({"model": MODEL, "text_1": "a"}), "text_2"),
    ] {
        let (status, body) = post(path, bad.clone()).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(error_of(&body.to_string())["param"], param, "{bad}: {body}");
    }
    // The backend's own 400 (text_1 longer than text_2) passes through.
    let (status, body) = post(
        "score",
        json!({"model": MODEL, "text_1": ["a", "b"], "text_2": ["a"]}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test]
async fn streams_are_not_buffered() {
    // Two tokens a second: the whole answer takes seconds, the first chunk must not wait for it.
    let engine = paced_sim(2.0).await;
    let gw = gateway(config(vec![upstream("a", engine.base_url())])).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "t"})).await;
    let response = client()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&chat(true))
        .send()
        .await
        .unwrap();
    let mut body = response.bytes_stream();
    let mut seen = String::new();
    // The first chunk only announces the role; wait for the first generated token.
    while !seen.contains("\"delta\":{\"content\":\"") {
        let chunk = body.next().await.expect("a chunk").unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    // A content token reached us while the engine was still generating the rest.
    assert_eq!(
        engine.requests_served(),
        0,
        "the gateway waited for the whole answer"
    );
    assert!(!seen.contains("[DONE]"));
    while let Some(chunk) = body.next().await {
        seen.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    assert!(seen.ends_with("data: [DONE]\n\n"));
}

#[tokio::test]
async fn bodies_pass_through_untouched() {
    let (url, _echo) = echo_upstream().await;
    let mut up = upstream("echo", url);
    up.api_key = Some("upstream-secret".into());
    let gw = gateway(config(vec![up])).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "t"})).await;
    let raw = format!(
        r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"hi"}}],"tools":[{{"type":"function","function":{{"name":"f","parameters":{{}}}}}}],"response_format":{{"type":"json_object"}},"logprobs":true,"vendor_ext":{{"x":1}}}}"#
    );
    let response = client()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .header("x-request-id", "req-from-client")
        .header("x-client-request-id", "mine-1")
        .body(raw.clone())
        .send()
        .await
        .unwrap();
    // The gateway's own request id, not the client's, goes to the backend and comes back; the
    // client's correlation id is echoed.
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_ne!(request_id, "req-from-client");
    assert_eq!(
        uuid::Uuid::parse_str(&request_id)
            .unwrap()
            .get_version_num(),
        7
    );
    assert_eq!(response.headers()["x-client-request-id"], "mine-1");
    let value: serde_json::Value = response.json().await.unwrap();
    // Byte for byte what the client sent; the client's key replaced by the upstream's.
    assert_eq!(value["received_raw"], raw);
    assert_eq!(value["received_auth"], "Bearer upstream-secret");
    assert_eq!(value["received_request_id"], request_id.as_str());
    // The backend's own fields reach the client.
    assert_eq!(value["backend_extension"]["kv_cache_hit"], true);
}

/// A body sent in pieces (chunked transfer encoding, one frame per piece) reaches the backend
/// whole; pieces that add up to more than `max_body_bytes` get a 413, with no length declared
/// up front to refuse it by.
#[tokio::test]
async fn chunked_bodies_are_read_whole_and_limited() {
    let (url, _echo) = echo_upstream().await;
    let mut cfg = config(vec![upstream("echo", url)]);
    cfg.max_body_bytes = 4096;
    let gw = gateway(cfg).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "t"})).await;
    let send = |pieces: Vec<String>| {
        let stream = futures::stream::iter(
            pieces
                .into_iter()
                .map(|piece| Ok::<_, std::io::Error>(bytes::Bytes::from(piece))),
        );
        client()
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(reqwest::Body::wrap_stream(stream))
            .send()
    };
    let pieces = vec![
        format!(r#"{{"model":"{MODEL}","#),
        r#""messages":[{"role":"user","content":"in pieces"}]"#.to_owned(),
        "}".to_owned(),
    ];
    let whole = pieces.concat();
    let response = send(pieces).await.unwrap();
    assert_eq!(response.status(), 200);
    let value: serde_json::Value = response.json().await.unwrap();
    assert_eq!(value["received_raw"], whole);

    let filler = "x".repeat(1500);
    let pieces = vec![
        format!(r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":""#),
        filler.clone(),
        filler.clone(),
        filler,
        r#""}]}"#.to_owned(),
    ];
    let response = send(pieces).await.unwrap();
    assert_eq!(response.status(), 413);
    let error = error_of(&response.text().await.unwrap());
    assert_eq!(error["code"], "request_too_large");
    // The refusal broke nothing: the next request is served.
    assert_eq!(post_chat(&base, &key, &chat(false)).await.0, 200);
}

#[tokio::test]
async fn client_errors_in_openai_shape() {
    let engine = fast_sim().await;
    let gw = gateway(config(vec![upstream("a", engine.base_url())])).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "t"})).await;
    let (_, limited) = create_key(&base, json!({"name": "l", "allowed_models": ["other"]})).await;
    let send = |path: &str, key: Option<&str>, body: String| {
        let mut request = client()
            .post(format!("{base}{path}"))
            .header("content-type", "application/json")
            .body(body);
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            assert!(response.headers().contains_key("x-request-id"));
            (status, error_of(&response.text().await.unwrap()))
        }
    };
    let good = chat(false).to_string();

    let (status, error) = send("/v1/chat/completions", None, good.clone()).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (401, Some("invalid_api_key"))
    );
    let (status, _) = send("/v1/chat/completions", Some("sk-garage-nope"), good.clone()).await;
    assert_eq!(status, 401);
    let (status, _) = send("/v1/chat/completions", Some(&key), "{not json".into()).await;
    assert_eq!(status, 400);
    let (status, error) = send(
        "/v1/chat/completions",
        Some(&key),
        json!({"messages": []}).to_string(),
    )
    .await;
    assert_eq!((status, error["param"].as_str()), (400, Some("model")));
    let (status, error) = send(
        "/v1/chat/completions",
        Some(&key),
        json!({"model": MODEL}).to_string(),
    )
    .await;
    assert_eq!((status, error["param"].as_str()), (400, Some("messages")));
    let (status, error) = send(
        "/v1/embeddings",
        Some(&key),
        json!({"model": MODEL}).to_string(),
    )
    .await;
    assert_eq!((status, error["param"].as_str()), (400, Some("input")));
    let unknown = json!({"model": "no-such-model", "messages": []}).to_string();
    let (status, error) = send("/v1/chat/completions", Some(&key), unknown).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (404, Some("model_not_found"))
    );
    let (status, error) = send("/v1/chat/completions", Some(&limited), good.clone()).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (403, Some("model_not_allowed"))
    );
    let huge = format!(
        r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(17 * 1024 * 1024)
    );
    let (status, error) = send("/v1/chat/completions", Some(&key), huge).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (413, Some("request_too_large"))
    );
    let (status, _) = send("/v1/nothing-here", Some(&key), good.clone()).await;
    assert_eq!(status, 404);
    let response = client()
        .get(format!("{base}/v1/chat/completions"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 405);
    error_of(&response.text().await.unwrap());
    // Nothing reached the engine but nothing was lost either: the good request still works.
    assert_eq!(post_chat(&base, &key, &chat(false)).await.0, 200);
}

#[tokio::test]
async fn failing_backend_is_retried_and_cooled_down() {
    let broken = sim(SimConfig {
        models: vec![MODEL.into()],
        ttft: Duration::ZERO,
        tokens_per_sec: 0.0,
        faults: Faults {
            error_rate: 1.0,
            ..Faults::default()
        },
        ..SimConfig::default()
    })
    .await;
    let healthy = fast_sim().await;
    // A port nobody listens on: connection refused.
    let refused = format!("http://127.0.0.1:{}/v1", free_port());
    let gw = gateway(config(vec![
        upstream("broken", broken.base_url()),
        upstream("refused", refused),
        upstream("healthy", healthy.base_url()),
    ]))
    .await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "t"})).await;
    for _ in 0..6 {
        let (status, body) = post_chat(&base, &key, &chat(false)).await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(healthy.requests_served(), 6);
    let metrics = metrics_text(&base).await;
    // Each bad backend failed once, then sat out its cooldown instead of failing again.
    assert!(
        metrics.contains("garage_backend_errors_total{backend=\"broken\",kind=\"status_5xx\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("garage_backend_errors_total{backend=\"refused\",kind=\"connect\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn backend_failures_map_to_502_503_504() {
    let broken = sim(SimConfig {
        models: vec![MODEL.into()],
        faults: Faults {
            error_rate: 1.0,
            ..Faults::default()
        },
        ..SimConfig::default()
    })
    .await;
    let gw = gateway(config(vec![upstream("broken", broken.base_url())])).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "t"})).await;
    let (status, body) = post_chat(&base, &key, &chat(false)).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(error_of(&body)["code"], "upstream_error");
    // One backend's 5xx may be the request's doing: it stays in rotation.
    let (status, body) = post_chat(&base, &key, &chat(false)).await;
    assert_eq!(status, 502, "{body}");

    // A backend that refuses connections is cooled down: then nothing healthy serves the model.
    let gone = format!("http://127.0.0.1:{}/v1", free_port());
    let gw = gateway(config(vec![upstream("gone", gone)])).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "t"})).await;
    let (status, body) = post_chat(&base, &key, &chat(false)).await;
    assert_eq!(status, 502, "{body}");
    let (status, body) = post_chat(&base, &key, &chat(false)).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(error_of(&body)["code"], "no_backend_available");
    // Counted too, though it ended before a backend was chosen (it used not to be).
    assert_metrics_include(
        &base,
        &[
            format!("garage_requests_total{{model=\"{MODEL}\",route=\"chat_completions\",status=\"502\"}} 1"),
            "garage_requests_total{model=\"\",route=\"chat_completions\",status=\"503\"} 1".to_owned(),
        ],
    )
    .await;

    let hanging = sim(SimConfig {
        models: vec![MODEL.into()],
        faults: Faults {
            hang_rate: 1.0,
            ..Faults::default()
        },
        ..SimConfig::default()
    })
    .await;
    let mut cfg = config(vec![upstream("hanging", hanging.base_url())]);
    cfg.dispatch.first_byte_timeout_secs = 1;
    let gw = gateway(cfg).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "t"})).await;
    let (status, body) = post_chat(&base, &key, &chat(false)).await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(error_of(&body)["code"], "upstream_timeout");
}

#[tokio::test]
async fn stream_broken_mid_way_ends_with_an_error_event() {
    let engine = sim(SimConfig {
        models: vec![MODEL.into()],
        faults: Faults {
            drop_rate: 1.0,
            ..Faults::default()
        },
        ..SimConfig::default()
    })
    .await;
    let gw = gateway(config(vec![upstream("a", engine.base_url())])).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "t"})).await;
    let (status, body) = post_chat(&base, &key, &chat(true)).await;
    assert_eq!(status, 200);
    assert!(!body.contains("[DONE]"), "{body}");
    let last = body.trim_end().rsplit("\n\n").next().unwrap();
    error_of(last.trim_start_matches("data: "));

    // A Responses stream too: the SDKs raise an event with an `error` member, whatever its type.
    let response = client()
        .post(format!("{base}/v1/responses"))
        .bearer_auth(&key)
        .json(&json!({"model": MODEL, "input": "hi", "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.text().await.unwrap();
    assert!(body.starts_with("event: response.created\n"), "{body}");
    assert!(!body.contains("response.completed"), "{body}");
    let last = body.trim_end().rsplit("\n\n").next().unwrap();
    error_of(last.trim_start_matches("data: "));
}

#[tokio::test]
async fn health_checks_take_dead_backends_out_of_models_and_readiness() {
    let engine = fast_sim().await;
    let mut up = upstream("a", engine.base_url());
    up.health_path = Some("/health".into());
    let mut cfg = config(vec![up]);
    cfg.dispatch.health_interval_secs = 1;
    let gw = gateway(cfg).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "t"})).await;
    let models = || model_ids(&base, &key);
    assert_eq!(models().await, [MODEL]);
    let ready = client().get(format!("{base}/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let model = client()
        .get(format!("{base}/v1/models/{MODEL}"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(model.status(), 200);

    engine.shutdown().await;
    wait_until(
        Duration::from_secs(10),
        "dead backend leaves the model list",
        || async { models().await.is_empty() },
    )
    .await;
    let ready = client().get(format!("{base}/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let model = client()
        .get(format!("{base}/v1/models/{MODEL}"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(model.status(), 404);
}

#[tokio::test]
async fn admin_api_manages_keys() {
    let engine = fast_sim().await;
    let gw = gateway(config(vec![upstream("a", engine.base_url())])).await;
    let base = gw.url();

    // No token, a wrong token, an API key: all refused.
    let refused = client()
        .get(format!("{base}/admin/keys"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    error_of(&refused.text().await.unwrap());
    let (id, key) = create_key(&base, json!({"name": "app", "metadata": {"team": "x"}})).await;
    assert!(key.starts_with("sk-garage-"));
    for token in ["wrong", key.as_str()] {
        let refused = client()
            .get(format!("{base}/admin/keys"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 401);
    }

    let listed = client()
        .get(format!("{base}/admin/keys"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(listed.contains(&id));
    assert!(!listed.contains(&key), "the secret is shown once only");
    assert!(!listed.contains("hash"), "hashes stay inside");
    let one: serde_json::Value = client()
        .get(format!("{base}/admin/keys/{id}"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(one["metadata"]["team"], "x");
    assert_eq!(one["revoked_at"], serde_json::Value::Null);
    let missing = client()
        .get(format!("{base}/admin/keys/key_nope"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let bad = client()
        .post(format!("{base}/admin/keys"))
        .bearer_auth(ADMIN)
        .json(&json!({"nam": "typo"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    error_of(&bad.text().await.unwrap());

    assert_eq!(post_chat(&base, &key, &chat(false)).await.0, 200);
    let revoked = client()
        .delete(format!("{base}/admin/keys/{id}"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 200);
    let (status, body) = post_chat(&base, &key, &chat(false)).await;
    assert_eq!(status, 403);
    assert_eq!(error_of(&body)["code"], "api_key_revoked");
}

#[tokio::test]
async fn graceful_shutdown_lets_streams_finish() {
    let engine = sim(SimConfig {
        models: vec![MODEL.into()],
        tokens_per_sec: 10.0,
        ..SimConfig::default()
    })
    .await;
    let gw = gateway(config(vec![upstream("a", engine.base_url())])).await;
    let base = gw.url();
    let addr: SocketAddr = gw.addr();
    let (_, key) = create_key(&base, json!({"name": "t"})).await;
    let response = client()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&chat(true))
        .send()
        .await
        .unwrap();
    let stream = tokio::spawn(async move { response.text().await.unwrap() });
    let shutdown = tokio::spawn(gw.shutdown(Duration::from_secs(30)));
    // New connections are refused once shutdown begins...
    wait_until(Duration::from_secs(5), "listener closed", || async {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;
    // ...while the stream already under way runs to its end.
    let body = stream.await.unwrap();
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    assert!(
        shutdown.await.unwrap(),
        "shutdown finished within its grace period"
    );
}

/// A simulated engine that wants `engine-secret`, as vLLM started with `--api-key` does.
async fn guarded_engine() -> SimEngine {
    sim(SimConfig {
        models: vec![MODEL.into()],
        api_key: Some("engine-secret".into()),
        ..SimConfig::default()
    })
    .await
}

/// An upstream entry for `base_url` that sends `api_key`.
fn upstream_with_key(name: &str, base_url: String, api_key: &str) -> UpstreamConfig {
    UpstreamConfig {
        api_key: Some(api_key.into()),
        ..upstream(name, base_url)
    }
}

#[tokio::test]
async fn an_upstream_api_key_reaches_the_backend_and_never_the_client() {
    let engine = guarded_engine().await;
    let guarded = upstream_with_key("a", engine.base_url(), "engine-secret");
    let gw = gateway(config(vec![guarded])).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "t"})).await;
    for stream in [false, true] {
        let (status, body) = post_chat(&base, &key, &chat(stream)).await;
        assert_eq!(status, 200, "stream {stream}: {body}");
        assert!(!body.contains("engine-secret"), "{body}");
    }
}

#[tokio::test]
async fn a_backend_refusing_the_upstream_key_is_a_bad_gateway_not_the_clients_401() {
    let engine = guarded_engine().await;
    let wrong = || upstream_with_key("wrong", engine.base_url(), "stale-secret");
    let gw = gateway(config(vec![wrong()])).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "t"})).await;
    // The refusal cools the backend down like a 5xx: the next request finds none to try.
    for (stream, expected, code) in [
        (false, 502, "upstream_error"),
        (true, 503, "no_backend_available"),
    ] {
        let (status, body) = post_chat(&base, &key, &chat(stream)).await;
        assert_eq!(status, expected, "stream {stream}: {body}");
        assert_eq!(error_of(&body)["code"], code, "{body}");
        assert!(!body.contains("stale-secret"), "{body}");
    }
    let metrics = metrics_text(&base).await;
    assert!(
        metrics.contains("garage_backend_errors_total{backend=\"wrong\",kind=\"unauthorized\"}"),
        "{metrics}"
    );

    // With a second backend that holds the right key, the request goes there instead.
    let right = upstream_with_key("right", engine.base_url(), "engine-secret");
    let gw = gateway(config(vec![wrong(), right])).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "t"})).await;
    for _ in 0..4 {
        let (status, body) = post_chat(&base, &key, &chat(false)).await;
        assert_eq!(status, 200, "{body}");
    }
}

/// Model names with a slash, as vLLM serves Hugging Face ids (`--model org/name`): the OpenAI
/// SDKs send `GET /v1/models/{model}` with the slash encoded (`%2F`), curl users type it as is.
#[tokio::test]
async fn a_model_name_with_a_slash_is_found_encoded_or_not() {
    const HF_MODEL: &str = "meta-llama/Llama-3.1-8B-Instruct";
    let engine = sim(SimConfig {
        models: vec![HF_MODEL.into()],
        ttft: Duration::ZERO,
        ..SimConfig::default()
    })
    .await;
    let mut up = upstream("a", engine.base_url());
    up.models = vec![HF_MODEL.into()];
    let gw = gateway(config(vec![up])).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "t"})).await;
    let get = |path: String| {
        let key = key.clone();
        async move {
            let response = client().get(path).bearer_auth(key).send().await.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    for path in [
        "meta-llama%2FLlama-3.1-8B-Instruct",
        "meta-llama%2fLlama-3.1-8B-Instruct",
        "meta-llama/Llama-3.1-8B-Instruct",
    ] {
        let (status, body) = get(format!("{base}/v1/models/{path}")).await;
        assert_eq!(status, 200, "{path}: {body}");
        let model: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(model["id"], HF_MODEL, "{path}");
        assert_eq!(model["object"], "model");
    }
    // A name that is not served, with or without a slash: OpenAI's 404, naming it.
    for path in [
        "meta-llama/Nope",
        "meta-llama%2FNope",
        "nope",
        "meta-llama/Llama-3.1-8B-Instruct/x",
    ] {
        let (status, body) = get(format!("{base}/v1/models/{path}")).await;
        assert_eq!(status, 404, "{path}: {body}");
        let error = error_of(&body);
        assert_eq!(error["code"], "model_not_found", "{path}: {body}");
    }
    // Chat names it in the body, slash and all.
    let request = json!({"model": HF_MODEL, "messages": [{"role": "user", "content": "hi"}]});
    let (status, body) = post_chat(&base, &key, &request).await;
    assert_eq!(status, 200, "{body}");
    gw.shutdown(Duration::from_secs(5)).await;
}

/// CORS, for web pages that call the gateway with a key: off by default (a preflight gets 405);
/// the origins listed in `cors.allowed_origins` get answers browsers accept, others do not.
#[tokio::test]
async fn cors_answers_the_listed_origins_only_and_is_off_by_default() {
    const PAGE: &str = "https://app.example.com";
    let engine = fast_sim().await;
    let preflight = |base: String, origin: &'static str| async move {
        client()
            .request(
                reqwest::Method::OPTIONS,
                format!("{base}/v1/chat/completions"),
            )
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            // What the OpenAI JavaScript SDK sends, besides the key and the body's type.
            .header(
                "access-control-request-headers",
                "authorization,content-type,x-stainless-os,x-stainless-retry-count",
            )
            .send()
            .await
            .unwrap()
    };
    let chat_from = |base: String, key: String, origin: &'static str, stream: bool| async move {
        client()
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(key)
            .header("origin", origin)
            .json(&chat(stream))
            .send()
            .await
            .unwrap()
    };
    let header = |response: &reqwest::Response, name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };

    // Off: no CORS headers on answers, and a preflight is an unknown method for the route.
    let gw = gateway(config(vec![upstream("a", engine.base_url())])).await;
    let (_, key) = create_key(&gw.url(), json!({"name": "t"})).await;
    let answer = preflight(gw.url(), PAGE).await;
    assert_eq!(answer.status(), 405);
    error_of(&answer.text().await.unwrap());
    let answer = chat_from(gw.url(), key.clone(), PAGE, false).await;
    assert_eq!(answer.status(), 200);
    assert_eq!(header(&answer, "access-control-allow-origin"), None);
    gw.shutdown(Duration::from_secs(5)).await;

    // One origin listed.
    let mut cfg = config(vec![upstream("a", engine.base_url())]);
    cfg.cors.allowed_origins = vec![PAGE.into()];
    let gw = gateway(cfg).await;
    let (_, key) = create_key(&gw.url(), json!({"name": "t"})).await;
    let answer = preflight(gw.url(), PAGE).await;
    assert!(answer.status().is_success(), "{}", answer.status());
    assert_eq!(
        header(&answer, "access-control-allow-origin").as_deref(),
        Some(PAGE)
    );
    let methods = header(&answer, "access-control-allow-methods").unwrap();
    assert!(methods.contains("POST"), "{methods}");
    let headers = header(&answer, "access-control-allow-headers").unwrap();
    for asked in ["authorization", "content-type", "x-stainless-os"] {
        assert!(headers.contains(asked), "{asked} not in {headers}");
    }
    assert_eq!(
        header(&answer, "access-control-max-age").as_deref(),
        Some("3600")
    );
    assert_eq!(header(&answer, "access-control-allow-credentials"), None);
    // Preflights go through the same outer layer as everything: they carry a request id.
    assert!(header(&answer, "x-request-id").is_some());
    for stream in [false, true] {
        let answer = chat_from(gw.url(), key.clone(), PAGE, stream).await;
        assert_eq!(answer.status(), 200);
        assert_eq!(
            header(&answer, "access-control-allow-origin").as_deref(),
            Some(PAGE)
        );
        // The page's script may read the request id (and every other header).
        assert_eq!(
            header(&answer, "access-control-expose-headers").as_deref(),
            Some("*")
        );
        let body = answer.text().await.unwrap();
        assert!(body.contains("chat.completion"), "{body}");
    }
    // Errors too: a page must be able to read why it was refused.
    let refused = chat_from(gw.url(), "sk-wrong".into(), PAGE, false).await;
    assert_eq!(refused.status(), 401);
    assert_eq!(
        header(&refused, "access-control-allow-origin").as_deref(),
        Some(PAGE)
    );
    // Another origin: no allowance, so its browser refuses the answer.
    let answer = preflight(gw.url(), "https://evil.example").await;
    assert_eq!(header(&answer, "access-control-allow-origin"), None);
    let answer = chat_from(gw.url(), key.clone(), "https://evil.example", false).await;
    assert_eq!(header(&answer, "access-control-allow-origin"), None);
    gw.shutdown(Duration::from_secs(5)).await;

    // Any origin.
    let mut cfg = config(vec![upstream("a", engine.base_url())]);
    cfg.cors.allowed_origins = vec!["*".into()];
    let gw = gateway(cfg).await;
    let answer = preflight(gw.url(), "https://anywhere.example").await;
    assert!(answer.status().is_success(), "{}", answer.status());
    assert_eq!(
        header(&answer, "access-control-allow-origin").as_deref(),
        Some("*")
    );
    gw.shutdown(Duration::from_secs(5)).await;
}

/// Handlers answer without a socket: the assembled state and `http::app`, driven by
/// `tower::ServiceExt::oneshot` (axum's way of testing), for the checks that need no engine.
#[tokio::test]
async fn handlers_answer_without_a_socket() {
    use tower::ServiceExt;
    let assembled = garage_gateway::server::assemble(config(vec![]))
        .await
        .expect("the parts assemble");
    let app = garage_gateway::http::app(assembled.state);
    let call = |method: &str, path: &str, token: Option<&str>| {
        let mut request = axum::extract::Request::builder().method(method).uri(path);
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let request = request.body(axum::body::Body::empty()).unwrap();
        let app = app.clone();
        async move {
            let response = app.oneshot(request).await.unwrap();
            let status = response.status().as_u16();
            let body = axum::body::to_bytes(response.into_body(), 1 << 20)
                .await
                .unwrap();
            (status, String::from_utf8_lossy(&body).into_owned())
        }
    };
    for (method, path, token, status) in [
        ("GET", "/v1/models", None, 401),
        ("GET", "/v1/models", Some("sk-not-a-key"), 401),
        ("GET", "/admin/keys", Some("sk-not-the-admin-token"), 401),
        ("GET", "/admin/keys/%FF", Some(ADMIN), 400),
        ("GET", "/no/such/route", None, 404),
        ("DELETE", "/v1/chat/completions", None, 405),
    ] {
        let (got, body) = call(method, path, token).await;
        assert_eq!(got, status, "{method} {path}: {body}");
        error_of(&body);
    }
    let (status, body) = call("GET", "/admin/keys", Some(ADMIN)).await;
    assert_eq!(status, 200, "{body}");
}
