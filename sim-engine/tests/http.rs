//! The simulated engine over real loopback HTTP, as the gateway and benchmarks see it.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use base64::Engine as _;
use futures::StreamExt as _;
use garage_sim_engine::{Faults, SimConfig, SimEngine};
use serde_json::{Value, json};

/// Upper bound for anything the tests wait on; generous because CI machines are slow.
const PATIENCE: Duration = Duration::from_secs(10);

async fn engine(config: SimConfig) -> Result<SimEngine> {
    Ok(SimEngine::start("127.0.0.1:0".parse()?, config).await?)
}

fn client() -> reqwest::Client {
    // The workspace builds reqwest without a default TLS provider; plain HTTP still needs one set.
    // A second install fails harmlessly, so its result is ignored.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

async fn post(engine: &SimEngine, path: &str, body: Value) -> Result<(u16, Value)> {
    let response = client()
        .post(format!("{}{path}", engine.base_url()))
        .json(&body)
        .send()
        .await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await?))
}

/// Reads a streamed answer into its SSE payloads; an error mid-body ends it with `Err`.
async fn stream_events(
    engine: &SimEngine,
    path: &str,
    body: Value,
) -> Result<(Vec<String>, Result<()>)> {
    let (events, end) = raw_events(engine, path, body).await?;
    let events = events
        .iter()
        .map(|event| {
            let data = event.strip_prefix("data: ").context("event without data")?;
            Ok(data.to_owned())
        })
        .collect::<Result<_>>()?;
    Ok((events, end))
}

/// A Responses stream's events: each one's `event:` line (its type) and its data.
fn typed_events(events: &[String]) -> Result<Vec<(String, Value)>> {
    events
        .iter()
        .map(|event| {
            let (kind, data) = event
                .strip_prefix("event: ")
                .and_then(|event| event.split_once("\ndata: "))
                .with_context(|| format!("not a typed event: {event}"))?;
            Ok((kind.to_owned(), serde_json::from_str(data)?))
        })
        .collect()
}

/// Reads a streamed answer into its events, each the text before its blank line; an error
/// mid-body ends it with `Err`.
async fn raw_events(
    engine: &SimEngine,
    path: &str,
    body: Value,
) -> Result<(Vec<String>, Result<()>)> {
    let response = client()
        .post(format!("{}{path}", engine.base_url()))
        .json(&body)
        .send()
        .await?;
    ensure!(response.status() == 200, "status {}", response.status());
    let content_type = response
        .headers()
        .get("content-type")
        .context("no content type")?;
    ensure!(content_type.to_str()?.starts_with("text/event-stream"));
    let mut body = response.bytes_stream();
    let mut buffer = String::new();
    let mut events = Vec::new();
    let end = loop {
        match body.next().await {
            None => break Ok(()),
            Some(Err(error)) => break Err(error.into()),
            Some(Ok(bytes)) => buffer.push_str(std::str::from_utf8(&bytes)?),
        }
        while let Some(at) = buffer.find("\n\n") {
            events.push(buffer[..at].to_owned());
            buffer.drain(..at + 2);
        }
    };
    Ok((events, end))
}

fn parse_chunks(events: &[String]) -> Result<Vec<Value>> {
    ensure!(
        events.last().map(String::as_str) == Some("[DONE]"),
        "no trailing [DONE]"
    );
    let data = &events[..events.len() - 1];
    Ok(data
        .iter()
        .map(|e| serde_json::from_str(e))
        .collect::<Result<_, _>>()?)
}

/// Polls `/metrics` until `line` is present.
async fn wait_for_metric(engine: &SimEngine, line: &str) -> Result<String> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let text = client()
            .get(format!(
                "http://{}/metrics",
                engine.addr().expect("a TCP engine")
            ))
            .send()
            .await?
            .text()
            .await?;
        if text.lines().any(|l| l == line) {
            return Ok(text);
        }
        if Instant::now() > deadline {
            bail!("`{line}` never appeared in:\n{text}");
        }
        // A short pause between polls keeps this from hogging a small CI machine.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn chat_completion_has_openai_shape() -> Result<()> {
    let engine = engine(SimConfig::default()).await?;
    let messages = json!([{"role": "user", "content": "hello there"}]);
    let (status, body) = post(
        &engine,
        "/chat/completions",
        json!({"model": "sim-llama-3-8b", "messages": messages, "max_tokens": 3, "foo": 1}),
    )
    .await?;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("chatcmpl-"))
    );
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(
        body["choices"][0]["message"],
        json!({"role": "assistant", "content": "the quick brown "})
    );
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 6, "completion_tokens": 3, "total_tokens": 9})
    );

    let (_, body) = post(&engine, "/chat/completions", json!({"messages": messages})).await?;
    assert_eq!(
        body["usage"]["completion_tokens"], 16,
        "default_max_tokens applies"
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(engine.requests_served(), 2);
    Ok(())
}

#[tokio::test]
async fn chat_stream_emits_usage_only_when_asked() -> Result<()> {
    let engine = engine(SimConfig::default()).await?;
    let request =
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": true});
    let (events, end) = stream_events(&engine, "/chat/completions", request.clone()).await?;
    end?;
    let chunks = parse_chunks(&events)?;
    assert_eq!(chunks.len(), 6, "role, 4 tokens, finish");
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    assert_eq!(chunks[1]["choices"][0]["delta"], json!({"content": "the "}));
    assert_eq!(chunks[5]["choices"][0]["delta"], json!({}));
    assert_eq!(chunks[5]["choices"][0]["finish_reason"], "length");
    assert!(
        chunks
            .iter()
            .all(|c| c.get("usage").is_none() && c["object"] == "chat.completion.chunk")
    );
    assert!(
        chunks.iter().all(|c| c["id"] == chunks[0]["id"]),
        "one id per stream"
    );

    let mut with_usage = request;
    with_usage["stream_options"] = json!({"include_usage": true});
    let (events, end) = stream_events(&engine, "/chat/completions", with_usage).await?;
    end?;
    let chunks = parse_chunks(&events)?;
    let (usage_chunk, others) = chunks.split_last().context("empty stream")?;
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(
        usage_chunk["usage"],
        json!({"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9})
    );
    assert!(others.iter().all(|c| c.get("usage").is_none()));
    Ok(())
}

#[tokio::test]
async fn text_completions_plain_and_streamed() -> Result<()> {
    let engine = engine(SimConfig::default()).await?;
    let (status, body) = post(
        &engine,
        "/completions",
        json!({"prompt": "one two three", "max_tokens": 2}),
    )
    .await?;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("cmpl-"))
    );
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["choices"][0]["text"], "the quick ");
    assert_eq!(body["usage"]["prompt_tokens"], 3);

    let request = json!({"prompt": [1, 2], "sim_tokens": 2, "max_tokens": 5, "stream": true});
    let (events, end) = stream_events(&engine, "/completions", request).await?;
    end?;
    let chunks = parse_chunks(&events)?;
    let texts: Vec<&str> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(texts, ["the ", "quick ", ""]);
    assert_eq!(
        chunks[2]["choices"][0]["finish_reason"], "stop",
        "sim_tokens below max_tokens stops"
    );
    Ok(())
}

#[tokio::test]
async fn responses_plain_streamed_and_cut_have_openai_shape() -> Result<()> {
    let engine = engine(SimConfig::default()).await?;
    let request = json!({
        "model": "sim-llama-3-8b", "instructions": "be brief",
        "input": [{"role": "user", "content": "hello there"}],
        "sim_tokens": 3, "max_output_tokens": 10, "metadata": {"k": "v"}, "foo": 1,
    });
    let (status, body) = post(&engine, "/responses", request.clone()).await?;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("resp_"))
    );
    assert_eq!(body["object"], "response");
    assert_eq!(body["status"], "completed");
    assert_eq!(body["incomplete_details"], Value::Null);
    assert_eq!(body["instructions"], "be brief");
    assert_eq!(body["metadata"], json!({"k": "v"}));
    let message = &body["output"][0];
    assert_eq!(
        (&message["type"], &message["role"], &message["status"]),
        (&json!("message"), &json!("assistant"), &json!("completed"))
    );
    assert_eq!(
        message["content"],
        json!([{"type": "output_text", "text": "the quick brown ", "annotations": [], "logprobs": []}])
    );
    // Two words of input, four tokens of framing for the one item, two of instructions.
    assert_eq!(
        body["usage"],
        json!({"input_tokens": 8, "input_tokens_details": {"cached_tokens": 0},
               "output_tokens": 3, "output_tokens_details": {"reasoning_tokens": 0},
               "total_tokens": 11})
    );

    // Cut by max_output_tokens: incomplete, and why.
    let (_, body) = post(
        &engine,
        "/responses",
        json!({"input": "one two", "max_output_tokens": 2}),
    )
    .await?;
    assert_eq!(body["status"], "incomplete");
    assert_eq!(
        body["incomplete_details"],
        json!({"reason": "max_output_tokens"})
    );
    assert_eq!(body["output"][0]["content"][0]["text"], "the quick ");
    assert_eq!(body["usage"]["input_tokens"], 2);

    let mut streamed = request;
    streamed["stream"] = json!(true);
    let (events, end) = raw_events(&engine, "/responses", streamed).await?;
    end?;
    let events = typed_events(&events)?;
    let kinds: Vec<&str> = events.iter().map(|(kind, _)| kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ],
        "no [DONE]: a Responses stream ends with its last event"
    );
    for (number, (kind, data)) in events.iter().enumerate() {
        assert_eq!(&data["type"], kind);
        assert_eq!(data["sequence_number"], number);
    }
    let deltas: String = events
        .iter()
        .filter_map(|(_, data)| data["delta"].as_str())
        .collect();
    assert_eq!(deltas, "the quick brown ");
    assert_eq!(events[0].1["response"]["status"], "in_progress");
    assert_eq!(events[0].1["response"]["usage"], Value::Null);
    let (_, completed) = events.last().context("no events")?;
    let response = &completed["response"];
    assert_eq!(response["id"], events[0].1["response"]["id"]);
    assert_eq!(response["status"], "completed");
    assert_eq!(response["output"][0]["content"][0]["text"], deltas);
    assert_eq!(response["usage"]["input_tokens"], 8);
    assert_eq!(response["usage"]["output_tokens"], 3);
    assert_eq!(
        events[4].1["item_id"], response["output"][0]["id"],
        "deltas name their message"
    );

    for (bad, status) in [
        (json!({"model": "sim-llama-3-8b"}), 400),
        (json!({"input": 5}), 400),
        (json!({"model": "nope", "input": "hi"}), 404),
    ] {
        let (got, body) = post(&engine, "/responses", bad.clone()).await?;
        assert_eq!(got, status, "{bad}: {body}");
        assert!(body["error"]["message"].is_string(), "{body}");
    }

    // A dropped stream breaks off after the first delta, never reaching response.completed.
    engine.set_faults(Faults {
        drop_rate: 1.0,
        ..Faults::default()
    });
    let request = json!({"input": "hi", "sim_tokens": 4, "stream": true});
    let (events, end) = raw_events(&engine, "/responses", request).await?;
    assert!(end.is_err(), "the body must end in an error");
    let kinds: Vec<String> = typed_events(&events)?.into_iter().map(|(k, _)| k).collect();
    assert_eq!(
        kinds.last().map(String::as_str),
        Some("response.output_text.delta")
    );
    assert!(!kinds.iter().any(|k| k == "response.completed"));
    Ok(())
}

#[tokio::test]
async fn rerank_and_score_rank_by_shared_words() -> Result<()> {
    let engine = engine(SimConfig::default()).await?;
    let documents = json!(["a green pear", "Red apple pie", "the red car", {"text": "apple, red"}]);
    let (status, body) = post(
        &engine,
        "/rerank",
        json!({"query": "red apple", "documents": documents, "top_n": 3}),
    )
    .await?;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("rerank-"))
    );
    let order: Vec<u64> = body["results"]
        .as_array()
        .context("no results")?
        .iter()
        .filter_map(|r| r["index"].as_u64())
        .collect();
    assert_eq!(order, [3, 1, 2], "best first, top_n of them");
    assert_eq!(body["results"][0]["relevance_score"], 1.0);
    assert_eq!(
        body["results"][0]["document"],
        json!({"text": "apple, red"})
    );
    // Each pair: the query's two words, the document's, three special tokens.
    assert_eq!(
        body["usage"],
        json!({"prompt_tokens": 8 + 8 + 8 + 7, "total_tokens": 31})
    );

    let (status, body) = post(
        &engine,
        "/score",
        json!({"text_1": "red apple", "text_2": ["red apple", "blue sky"]}),
    )
    .await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "list");
    let scores: Vec<f64> = body["data"]
        .as_array()
        .context("no data")?
        .iter()
        .filter_map(|d| d["score"].as_f64())
        .collect();
    assert_eq!(scores, [1.0, 0.0]);
    assert_eq!(body["usage"]["prompt_tokens"], 7 + 7);

    for (path, bad) in [
        ("/rerank", json!({"documents": ["x"]})),
        ("/rerank", json!({"query": "x"})),
        ("/rerank", json!({"query": "x", "documents": [5]})),
        (
            "/score",
            json!({"text_1": ["a", "b"], "text_2": ["a", "b", "c"]}),
        ),
        ("/score", json!({"text_1": "a", "text_2": []})),
    ] {
        let (status, body) = post(&engine, path, bad.clone()).await?;
        assert_eq!(status, 400, "{path} {bad}: {body}");
    }
    Ok(())
}

#[tokio::test]
async fn embeddings_float_and_base64_agree() -> Result<()> {
    let engine = engine(SimConfig {
        embedding_dim: 8,
        ..SimConfig::default()
    })
    .await?;
    let (status, floats) = post(&engine, "/embeddings", json!({"input": ["a b", "c"]})).await?;
    assert_eq!(status, 200, "{floats}");
    assert_eq!(floats["object"], "list");
    assert_eq!(
        floats["usage"],
        json!({"prompt_tokens": 3, "total_tokens": 3})
    );
    let first: Vec<f32> = serde_json::from_value(floats["data"][0]["embedding"].clone())?;
    assert_eq!(first.len(), 8);
    assert!((first.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-4);

    let (_, encoded) = post(
        &engine,
        "/embeddings",
        json!({"input": "a b", "encoding_format": "base64"}),
    )
    .await?;
    let text = encoded["data"][0]["embedding"]
        .as_str()
        .context("base64 string")?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(text)?;
    let decoded: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(decoded, first);

    let (status, _) = post(&engine, "/embeddings", json!({"input": [[1, 2], [3]]})).await?;
    assert_eq!(status, 200);
    Ok(())
}

#[tokio::test]
async fn errors_use_vllm_shape() -> Result<()> {
    let engine = engine(SimConfig::default()).await?;
    let (status, body) = post(
        &engine,
        "/chat/completions",
        json!({"model": "x", "messages": []}),
    )
    .await?;
    assert_eq!(status, 404);
    assert_eq!(
        body,
        json!({"error": {"message": "The model `x` does not exist.", "type": "NotFoundError", "param": "model", "code": 404}})
    );
    let (status, body) = post(&engine, "/completions", json!({"max_tokens": 1})).await?;
    assert_eq!(
        (status, &body["error"]["type"]),
        (400, &json!("BadRequestError"))
    );
    let too_long = json!({"prompt": "x", "max_tokens": 100_000});
    assert_eq!(post(&engine, "/completions", too_long).await?.0, 400);
    let response = client()
        .post(format!("{}/chat/completions", engine.base_url()))
        .body("{nope")
        .send()
        .await?;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await?;
    assert_eq!(body["error"]["code"], 400);
    let response = client()
        .get(format!(
            "http://{}/nowhere",
            engine.addr().expect("a TCP engine")
        ))
        .send()
        .await?;
    assert_eq!(response.status(), 404);

    let response = client()
        .get(format!(
            "http://{}/health",
            engine.addr().expect("a TCP engine")
        ))
        .send()
        .await?;
    assert_eq!(
        (response.status().as_u16(), response.bytes().await?.len()),
        (200, 0)
    );
    let models: Value = client()
        .get(format!("{}/models", engine.base_url()))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(models["data"][0]["id"], "sim-llama-3-8b");
    Ok(())
}

#[tokio::test]
async fn metrics_show_running_and_waiting_requests() -> Result<()> {
    let config = SimConfig {
        ttft: Duration::from_secs(60),
        max_num_seqs: 1,
        ..SimConfig::default()
    };
    let engine = engine(config).await?;
    let base = engine.base_url();
    let slow = |base: String| async move {
        client()
            .post(format!("{base}/chat/completions"))
            .json(&json!({"messages": []}))
            .send()
            .await
    };
    let first = tokio::spawn(slow(base.clone()));
    let second = tokio::spawn(slow(base));
    let label = "{model_name=\"sim-llama-3-8b\"}";
    wait_for_metric(&engine, &format!("vllm:num_requests_running{label} 1")).await?;
    let text = wait_for_metric(&engine, &format!("vllm:num_requests_waiting{label} 1")).await?;
    assert!(
        text.contains(&format!("vllm:kv_cache_usage_perc{label} 1\n")),
        "{text}"
    );
    for name in [
        "vllm:gpu_cache_usage_perc",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "{name} missing from {text}"
        );
    }
    assert!(
        text.contains("vllm:request_success_total{finished_reason=\"stop\""),
        "{text}"
    );

    // Clients giving up must free their slots: the handler futures are dropped.
    first.abort();
    second.abort();
    wait_for_metric(&engine, &format!("vllm:num_requests_running{label} 0")).await?;
    wait_for_metric(&engine, &format!("vllm:num_requests_waiting{label} 0")).await?;
    Ok(())
}

#[tokio::test]
async fn faults_fail_drop_and_change_at_runtime() -> Result<()> {
    let faults = Faults {
        error_rate: 1.0,
        ..Faults::default()
    };
    let engine = engine(SimConfig {
        faults,
        ..SimConfig::default()
    })
    .await?;
    let request = json!({"messages": [{"role": "user", "content": "hi"}], "stream": true});
    let (status, body) = post(&engine, "/chat/completions", request.clone()).await?;
    assert_eq!(status, 500);
    assert_eq!(
        body,
        json!({"error": {"message": "simulated engine failure", "type": "InternalServerError", "param": null, "code": 500}})
    );

    engine.set_faults(Faults {
        drop_rate: 1.0,
        ..Faults::default()
    });
    let (events, end) = stream_events(&engine, "/chat/completions", request.clone()).await?;
    assert!(end.is_err(), "the body must end in an error");
    assert!(
        !events.is_empty() && !events.iter().any(|e| e == "[DONE]"),
        "{events:?}"
    );

    engine.set_faults(Faults {
        hang_rate: 1.0,
        ..Faults::default()
    });
    let hung = client()
        .post(format!("{}/completions", engine.base_url()))
        .json(&json!({"prompt": "x"}));
    assert!(
        hung.timeout(Duration::from_millis(200))
            .send()
            .await
            .is_err_and(|e| e.is_timeout())
    );

    engine.set_faults(Faults::default());
    let (events, end) = stream_events(&engine, "/chat/completions", request).await?;
    end?;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    engine.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn ttft_and_token_rate_are_respected() -> Result<()> {
    let config = SimConfig {
        ttft: Duration::from_millis(200),
        tokens_per_sec: 50.0,
        ..SimConfig::default()
    };
    let engine = engine(config).await?;
    let started = Instant::now();
    let request = json!({"prompt": "x", "max_tokens": 6, "stream": true});
    let response = client()
        .post(format!("{}/completions", engine.base_url()))
        .json(&request)
        .send()
        .await?;
    let mut body = response.bytes_stream();
    body.next().await.context("no first chunk")??;
    let first_token = started.elapsed();
    assert!(
        first_token >= Duration::from_millis(200),
        "first token after {first_token:?}"
    );
    while body.next().await.transpose()?.is_some() {}
    // 5 gaps of 20 ms after the first token.
    let total = started.elapsed();
    assert!(
        total >= Duration::from_millis(300),
        "whole stream took {total:?}"
    );
    Ok(())
}

#[tokio::test]
async fn shutdown_ends_slow_requests() -> Result<()> {
    let engine = engine(SimConfig {
        ttft: Duration::from_secs(60),
        ..SimConfig::default()
    })
    .await?;
    let url = format!("{}/chat/completions", engine.base_url());
    let slow = tokio::spawn(client().post(url).json(&json!({"messages": []})).send());
    wait_for_metric(
        &engine,
        "vllm:num_requests_running{model_name=\"sim-llama-3-8b\"} 1",
    )
    .await?;
    tokio::time::timeout(PATIENCE, engine.shutdown()).await?;
    assert_eq!(slow.await??.status(), 503);
    Ok(())
}

#[tokio::test]
async fn an_api_key_guards_the_v1_routes_as_vllm_does() -> Result<()> {
    let engine = engine(SimConfig {
        api_key: Some("engine-secret".into()),
        ..SimConfig::default()
    })
    .await?;
    let base = engine.base_url();
    let chat = json!({"messages": [{"role": "user", "content": "hi"}]});
    for token in [None, Some("wrong")] {
        let mut request = client()
            .post(format!("{base}/chat/completions"))
            .json(&chat);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await?;
        ensure!(response.status() == 401, "{token:?}: {}", response.status());
        let body: Value = response.json().await?;
        ensure!(body == json!({"error": "Unauthorized"}), "{body}");
    }
    let response = client()
        .post(format!("{base}/chat/completions"))
        .bearer_auth("engine-secret")
        .json(&chat)
        .send()
        .await?;
    ensure!(response.status() == 200, "{}", response.status());
    // Health and metrics stay open, for probes and scrapers.
    let origin = base.trim_end_matches("/v1");
    for path in ["/health", "/metrics"] {
        let status = client()
            .get(format!("{origin}{path}"))
            .send()
            .await?
            .status();
        ensure!(status == 200, "{path}: {status}");
    }
    Ok(())
}

/// One HTTP/1 exchange over the Unix socket at `path`: the whole answer, head and body.
async fn over_socket(path: &std::path::Path, request: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut socket = tokio::net::UnixStream::connect(path).await?;
    socket.write_all(request.as_bytes()).await?;
    let mut answer = String::new();
    tokio::time::timeout(PATIENCE, socket.read_to_string(&mut answer)).await??;
    Ok(answer)
}

#[tokio::test]
async fn serves_on_a_unix_socket_like_vllm_with_uds() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("vllm.sock");
    let engine = SimEngine::start_unix(&path, SimConfig::default()).await?;
    assert_eq!(engine.addr(), None);
    assert_eq!(engine.unix_socket(), Some(path.as_path()));
    assert_eq!(engine.listening_on(), format!("unix:{}", path.display()));

    let health = over_socket(
        &path,
        "GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await?;
    ensure!(health.starts_with("HTTP/1.1 200"), "{health}");
    let body =
        r#"{"model":"sim-llama-3-8b","messages":[{"role":"user","content":"hi"}],"max_tokens":3}"#;
    let chat = over_socket(
        &path,
        &format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
    .await?;
    ensure!(chat.starts_with("HTTP/1.1 200"), "{chat}");
    ensure!(chat.contains(r#""completion_tokens":3"#), "{chat}");

    // The path is taken while it serves; once it stops, the socket file is gone.
    ensure!(
        SimEngine::start_unix(&path, SimConfig::default())
            .await
            .is_err()
    );
    engine.shutdown().await;
    ensure!(!path.exists(), "the socket file outlived the engine");
    Ok(())
}
