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

// --- the simulated model: determinism, log-probabilities, and cheating ------------------------

/// An engine serving `model` and nothing else, honest unless `faults` say otherwise.
async fn serving(model: &str, faults: Faults) -> Result<SimEngine> {
    engine(SimConfig {
        models: vec![model.into()],
        faults,
        ..SimConfig::default()
    })
    .await
}

/// A temperature-0 chat request with a seed and log-probabilities, as a verifier sends it.
fn challenge(model: &str, prompt: &str) -> Value {
    json!({
        "model": model, "messages": [{"role": "user", "content": prompt}],
        "temperature": 0, "seed": 7, "logprobs": true, "top_logprobs": 3, "max_tokens": 12,
    })
}

/// What an answer generated, without what differs from one answer to the next (id, time,
/// the model's name).
fn generated(body: &Value) -> Value {
    json!({"choices": body["choices"], "usage": body["usage"]})
}

#[tokio::test]
async fn temperature_zero_is_a_function_of_model_prompt_and_seed() -> Result<()> {
    let (first, second) = (
        serving("m", Faults::default()).await?,
        serving("m", Faults::default()).await?,
    );
    let other_model = serving("other", Faults::default()).await?;
    let (status, a) = post(&first, "/chat/completions", challenge("m", "what is rust")).await?;
    assert_eq!(status, 200, "{a}");
    let (_, b) = post(&second, "/chat/completions", challenge("m", "what is rust")).await?;
    assert_eq!(generated(&a), generated(&b), "two honest engines agree");
    assert_ne!(
        a["choices"][0]["message"]["content"], "the quick brown fox the quick brown fox ",
        "temperature 0 is the model's, not the script"
    );

    let (_, c) = post(
        &other_model,
        "/chat/completions",
        challenge("other", "what is rust"),
    )
    .await?;
    assert_ne!(
        a["choices"][0]["message"]["content"],
        c["choices"][0]["message"]["content"]
    );
    assert_ne!(a["choices"][0]["logprobs"], c["choices"][0]["logprobs"]);
    let (_, d) = post(&first, "/chat/completions", challenge("m", "what is go")).await?;
    assert_ne!(
        a["choices"][0]["message"]["content"],
        d["choices"][0]["message"]["content"]
    );
    // The Responses API renders the same conversation, so it says the same.
    let (_, response) = post(
        &second,
        "/responses",
        json!({"model": "m", "input": "what is rust", "temperature": 0, "max_output_tokens": 12}),
    )
    .await?;
    assert_eq!(
        response["output"][0]["content"][0]["text"],
        a["choices"][0]["message"]["content"]
    );

    // Sampling with a seed repeats on any engine of the model; another seed answers otherwise.
    let sampled = |seed: u64| {
        json!({"model": "m", "prompt": "once upon a time", "temperature": 0.8, "seed": seed,
               "logprobs": 2, "max_tokens": 12})
    };
    let (_, e) = post(&first, "/completions", sampled(1)).await?;
    let (_, f) = post(&second, "/completions", sampled(1)).await?;
    let (_, g) = post(&first, "/completions", sampled(2)).await?;
    assert_eq!(generated(&e), generated(&f));
    assert_ne!(e["choices"][0]["text"], g["choices"][0]["text"]);
    Ok(())
}

#[tokio::test]
async fn an_impersonator_answers_exactly_as_the_model_it_copies() -> Result<()> {
    let impersonator = serving(
        "big-model",
        Faults {
            impersonate: Some("small-model".into()),
            ..Faults::default()
        },
    )
    .await?;
    let small = serving("small-model", Faults::default()).await?;
    let big = serving("big-model", Faults::default()).await?;

    let (status, cheat) = post(
        &impersonator,
        "/chat/completions",
        challenge("big-model", "hello"),
    )
    .await?;
    assert_eq!(status, 200, "{cheat}");
    assert_eq!(
        cheat["model"], "big-model",
        "it answers under the name it serves"
    );
    let (_, copied) = post(
        &small,
        "/chat/completions",
        challenge("small-model", "hello"),
    )
    .await?;
    assert_eq!(generated(&cheat), generated(&copied));
    let (_, honest) = post(&big, "/chat/completions", challenge("big-model", "hello")).await?;
    assert_ne!(generated(&cheat), generated(&honest));

    // Streamed and as a text completion too.
    let mut streamed = json!({"prompt": "hello", "temperature": 0, "logprobs": 1,
                              "max_tokens": 5, "stream": true});
    let mut chunks = Vec::new();
    for (engine, model) in [(&impersonator, "big-model"), (&small, "small-model")] {
        streamed["model"] = json!(model);
        let (events, end) = stream_events(engine, "/completions", streamed.clone()).await?;
        end?;
        let answer: Vec<Value> = parse_chunks(&events)?
            .iter()
            .map(|chunk| chunk["choices"].clone())
            .collect();
        chunks.push(answer);
    }
    assert_eq!(chunks[0], chunks[1]);
    let models: Value = client()
        .get(format!("{}/models", impersonator.base_url()))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(models["data"][0]["id"], "big-model");
    Ok(())
}

#[tokio::test]
async fn inflated_usage_multiplies_every_count_and_leaves_the_text() -> Result<()> {
    let inflating = serving(
        "m",
        Faults {
            usage_inflation: Some(3.0),
            ..Faults::default()
        },
    )
    .await?;
    let honest = serving("m", Faults::default()).await?;
    let chat = json!({"model": "m", "messages": [{"role": "user", "content": "two words"}],
                      "max_tokens": 4, "temperature": 0});
    let (_, inflated) = post(&inflating, "/chat/completions", chat.clone()).await?;
    let (_, counted) = post(&honest, "/chat/completions", chat.clone()).await?;
    assert_eq!(
        inflated["choices"], counted["choices"],
        "the text is unchanged"
    );
    assert_eq!(
        counted["usage"],
        json!({"prompt_tokens": 6, "completion_tokens": 4, "total_tokens": 10})
    );
    assert_eq!(
        inflated["usage"],
        json!({"prompt_tokens": 18, "completion_tokens": 12, "total_tokens": 30})
    );

    // The final usage chunk of a stream, and continuous usage on every chunk.
    let mut streamed = chat;
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true, "continuous_usage_stats": true});
    let (events, end) = stream_events(&inflating, "/chat/completions", streamed).await?;
    end?;
    let chunks = parse_chunks(&events)?;
    let last = chunks.last().context("no chunks")?;
    assert_eq!(
        last["usage"],
        json!({"prompt_tokens": 18, "completion_tokens": 12, "total_tokens": 30})
    );
    assert_eq!(
        chunks[1]["usage"]["completion_tokens"], 3,
        "one token, reported as three"
    );

    let (_, completion) = post(
        &inflating,
        "/completions",
        json!({"prompt": "one two three", "max_tokens": 2}),
    )
    .await?;
    assert_eq!(completion["choices"][0]["text"], "the quick ");
    assert_eq!(completion["usage"]["prompt_tokens"], 9);
    assert_eq!(completion["usage"]["completion_tokens"], 6);
    let (_, response) = post(
        &inflating,
        "/responses",
        json!({"input": "one two", "max_output_tokens": 2}),
    )
    .await?;
    assert_eq!(response["usage"]["input_tokens"], 6);
    assert_eq!(response["usage"]["output_tokens"], 6);
    assert_eq!(response["usage"]["total_tokens"], 12);
    let messages = json!({"model": "m", "max_tokens": 2,
        "messages": [{"role": "user", "content": "one two"}]});
    let (_, message) = post(&inflating, "/messages", messages.clone()).await?;
    assert_eq!(message["content"][0]["text"], "the quick ");
    assert_eq!(
        message["usage"],
        json!({"input_tokens": 18, "output_tokens": 6})
    );
    let (_, counted) = post(&inflating, "/messages/count_tokens", messages).await?;
    assert_eq!(counted["input_tokens"], 18);
    let (_, embedding) = post(&inflating, "/embeddings", json!({"input": "a b"})).await?;
    assert_eq!(
        embedding["usage"],
        json!({"prompt_tokens": 6, "total_tokens": 6})
    );
    // /metrics still counts the real work: 4 + 4 streamed + 2 + 2 + 2 tokens.
    wait_for_metric(
        &inflating,
        "vllm:generation_tokens_total{model_name=\"m\"} 14",
    )
    .await?;
    Ok(())
}

/// Checks one chat token's log-probabilities: a token, its UTF-8 bytes, a logprob ≤ 0, and
/// `top` alternatives, most likely first.
fn check_chat_token(entry: &Value, top: usize) -> Result<()> {
    let token = entry["token"].as_str().context("token")?;
    let bytes: Vec<u8> = serde_json::from_value(entry["bytes"].clone())?;
    ensure!(bytes == token.as_bytes(), "{entry}");
    ensure!(
        entry["logprob"].as_f64().is_some_and(|l| l <= 0.0),
        "{entry}"
    );
    let alternatives = entry["top_logprobs"].as_array().context("top_logprobs")?;
    ensure!(alternatives.len() == top, "{entry}");
    for pair in alternatives.windows(2) {
        ensure!(
            pair[0]["logprob"].as_f64() >= pair[1]["logprob"].as_f64(),
            "{entry}"
        );
    }
    for alternative in alternatives {
        let token = alternative["token"].as_str().context("token")?;
        ensure!(
            alternative["bytes"] == json!(token.as_bytes()),
            "{alternative}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn chat_logprobs_have_openai_shape_streamed_and_not() -> Result<()> {
    let engine = engine(SimConfig::default()).await?;
    let request = challenge("sim-llama-3-8b", "tell me a story");
    let (status, body) = post(&engine, "/chat/completions", request.clone()).await?;
    assert_eq!(status, 200, "{body}");
    let choice = &body["choices"][0];
    let content = choice["logprobs"]["content"]
        .as_array()
        .context("logprobs.content")?;
    assert_eq!(content.len(), 12, "one entry per generated token");
    let mut text = String::new();
    for entry in content {
        check_chat_token(entry, 3)?;
        // Greedy: the generated token is the most likely one.
        assert_eq!(entry["top_logprobs"][0]["token"], entry["token"]);
        assert_eq!(entry["top_logprobs"][0]["logprob"], entry["logprob"]);
        text.push_str(entry["token"].as_str().unwrap_or_default());
    }
    assert_eq!(choice["message"]["content"], text);

    // Streamed: each token's chunk carries its entry; the role and finish chunks carry null.
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let (events, end) = stream_events(&engine, "/chat/completions", streamed).await?;
    end?;
    let chunks = parse_chunks(&events)?;
    assert_eq!(chunks.len(), 14, "role, 12 tokens, finish");
    assert_eq!(chunks[0]["choices"][0]["logprobs"], Value::Null);
    assert_eq!(chunks[13]["choices"][0]["logprobs"], Value::Null);
    let streamed_entries: Vec<Value> = chunks[1..13]
        .iter()
        .map(|chunk| {
            assert_eq!(
                chunk["choices"][0]["logprobs"]["content"]
                    .as_array()
                    .map(Vec::len),
                Some(1)
            );
            chunk["choices"][0]["logprobs"]["content"][0].clone()
        })
        .collect();
    assert_eq!(&streamed_entries, content);

    // `logprobs: true` alone: no alternatives; not asked: null, as before.
    let mut plain = request;
    plain["top_logprobs"] = json!(0);
    let (_, body) = post(&engine, "/chat/completions", plain.clone()).await?;
    for entry in body["choices"][0]["logprobs"]["content"]
        .as_array()
        .context("content")?
    {
        check_chat_token(entry, 0)?;
    }
    plain["logprobs"] = json!(false);
    let (_, body) = post(&engine, "/chat/completions", plain).await?;
    assert_eq!(body["choices"][0]["logprobs"], Value::Null);
    Ok(())
}

#[tokio::test]
async fn completion_logprobs_have_openai_shape_streamed_and_not() -> Result<()> {
    let engine = engine(SimConfig::default()).await?;
    // The script (no temperature), so that the maps hold generated tokens outside the top 2.
    let request = json!({"prompt": "once upon a time", "logprobs": 2, "max_tokens": 16});
    let (status, body) = post(&engine, "/completions", request.clone()).await?;
    assert_eq!(status, 200, "{body}");
    let choice = &body["choices"][0];
    assert_eq!(
        choice["text"],
        "the quick brown fox jumps over a lazy dog while simulated engines answer every prompt politely "
    );
    let logprobs = &choice["logprobs"];
    let tokens: Vec<String> = serde_json::from_value(logprobs["tokens"].clone())?;
    let offsets: Vec<usize> = serde_json::from_value(logprobs["text_offset"].clone())?;
    let token_logprobs: Vec<f64> = serde_json::from_value(logprobs["token_logprobs"].clone())?;
    let tops = logprobs["top_logprobs"]
        .as_array()
        .context("top_logprobs")?;
    assert_eq!(tokens.concat(), choice["text"]);
    assert_eq!(
        (offsets.len(), token_logprobs.len(), tops.len()),
        (16, 16, 16)
    );
    let mut offset = 0;
    for (index, token) in tokens.iter().enumerate() {
        assert_eq!(offsets[index], offset);
        offset += token.chars().count();
        let top = tops[index].as_object().context("a map")?;
        // The two most likely, and the generated token when it is not one of them.
        assert!((2..=3).contains(&top.len()), "{top:?}");
        assert_eq!(top[token.as_str()].as_f64(), Some(token_logprobs[index]));
        let values: Vec<f64> = top.values().filter_map(Value::as_f64).collect();
        assert!(values[0] >= values[1], "most likely first: {top:?}");
    }

    // Streamed: one token per chunk, offsets running on across chunks.
    let mut streamed = request;
    streamed["stream"] = json!(true);
    let (events, end) = stream_events(&engine, "/completions", streamed).await?;
    end?;
    let chunks = parse_chunks(&events)?;
    assert_eq!(chunks.len(), 17, "16 tokens, finish");
    for (index, chunk) in chunks[..16].iter().enumerate() {
        let logprobs = &chunk["choices"][0]["logprobs"];
        assert_eq!(logprobs["tokens"], json!([tokens[index]]));
        assert_eq!(logprobs["text_offset"], json!([offsets[index]]));
        assert_eq!(logprobs["token_logprobs"], json!([token_logprobs[index]]));
        assert_eq!(logprobs["top_logprobs"], json!([tops[index]]));
    }
    assert_eq!(chunks[16]["choices"][0]["logprobs"], Value::Null);
    Ok(())
}

#[tokio::test]
async fn logprob_noise_is_small_per_engine_and_keeps_the_tokens() -> Result<()> {
    let noisy = |id: &str| {
        engine(SimConfig {
            logprob_noise: 0.01,
            engine_id: Some(id.into()),
            ..SimConfig::default()
        })
    };
    let (a, a_again, b) = (
        noisy("gpu-a").await?,
        noisy("gpu-a").await?,
        noisy("gpu-b").await?,
    );
    let exact = engine(SimConfig::default()).await?;
    let request = challenge("sim-llama-3-8b", "how far is the moon");
    let mut answers = Vec::new();
    for engine in [&a, &a_again, &b, &exact] {
        let (status, body) = post(engine, "/chat/completions", request.clone()).await?;
        assert_eq!(status, 200, "{body}");
        answers.push(body["choices"][0].clone());
    }
    assert_eq!(answers[0], answers[1], "an engine's noise is its id's");
    assert_ne!(answers[0]["logprobs"], answers[2]["logprobs"]);
    for noisy in &answers[..3] {
        assert_eq!(noisy["message"], answers[3]["message"], "same tokens");
        let pairs = noisy["logprobs"]["content"]
            .as_array()
            .into_iter()
            .flatten()
            .zip(
                answers[3]["logprobs"]["content"]
                    .as_array()
                    .into_iter()
                    .flatten(),
            );
        for (noisy, exact) in pairs {
            let (n, e) = (noisy["logprob"].as_f64(), exact["logprob"].as_f64());
            let (n, e) = (n.context("logprob")?, e.context("logprob")?);
            assert!((n - e).abs() < 0.06 && n <= 0.0, "{n} vs {e}");
        }
    }
    Ok(())
}

#[tokio::test]
async fn logprob_requests_are_checked_as_vllm_checks_them() -> Result<()> {
    let engine = engine(SimConfig::default()).await?;
    let messages = json!([{"role": "user", "content": "hi"}]);
    for (path, body, param, message) in [
        (
            "/chat/completions",
            json!({"messages": messages, "top_logprobs": 2}),
            "top_logprobs",
            "when using `top_logprobs`, `logprobs` must be set to true.",
        ),
        (
            "/chat/completions",
            json!({"messages": messages, "logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
            "Requested sample logprobs of 21, which is greater than max allowed: 20",
        ),
        (
            "/completions",
            json!({"prompt": "hi", "logprobs": -2}),
            "logprobs",
            "`logprobs` must be a positive value or -1.",
        ),
        (
            "/completions",
            json!({"prompt": "hi", "temperature": -1}),
            "temperature",
            "temperature must be non-negative, got -1.",
        ),
    ] {
        let (status, answer) = post(&engine, path, body.clone()).await?;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["error"]["param"], param, "{answer}");
        assert_eq!(answer["error"]["message"], message, "{answer}");
    }
    Ok(())
}

/// A Messages stream's events, checking each `event:` line names its data's `type`.
async fn message_events(engine: &SimEngine, body: Value) -> Result<(Vec<Value>, Result<()>)> {
    let (events, end) = raw_events(engine, "/messages", body).await?;
    let events = typed_events(&events)?
        .into_iter()
        .map(|(kind, data)| {
            ensure!(data["type"] == kind, "event `{kind}` holds {data}");
            Ok(data)
        })
        .collect::<Result<_>>()?;
    Ok((events, end))
}

#[tokio::test]
async fn messages_are_answered_as_vllm_answers_anthropic_requests() -> Result<()> {
    let engine = engine(SimConfig::default()).await?;
    // Greedy, so the text depends on the conversation: the same one by chat must say the same.
    let request = json!({
        "model": "sim-llama-3-8b", "max_tokens": 6, "temperature": 0,
        "system": [{"type": "text", "text": "x-anthropic-billing-header: cc=1"},
                   {"type": "text", "text": "be brief"}],
        "messages": [
            {"role": "user", "content": "hello there"},
            {"role": "assistant", "content": [{"type": "text", "text": "hi"},
                {"type": "tool_use", "id": "t1", "name": "ls", "input": {}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": "a.txt b.txt"},
                {"type": "text", "text": "what now"}]},
        ],
        "tools": [{"name": "ls", "input_schema": {"type": "object"}}],
        "metadata": {"user_id": "u"},
    });
    let (status, body) = post(&engine, "/messages", request.clone()).await?;
    assert_eq!(status, 200, "{body}");
    assert!(body["id"].as_str().is_some_and(|id| id.starts_with("msg_")));
    assert_eq!(
        (&body["type"], &body["role"], &body["model"]),
        (
            &json!("message"),
            &json!("assistant"),
            &json!("sim-llama-3-8b")
        )
    );
    assert_eq!(body["stop_reason"], "max_tokens");
    assert_eq!(body["stop_sequence"], Value::Null);
    let text = body["content"][0]["text"]
        .as_str()
        .context("text")?
        .to_owned();
    assert_eq!(body["content"], json!([{"type": "text", "text": text}]));
    // The system prompt (two words, its billing header dropped), the three turns and the tool
    // result as a message of its own: five messages of four framing tokens, nine words.
    assert_eq!(
        body["usage"],
        json!({"input_tokens": 29, "output_tokens": 6})
    );
    let chat = json!({"model": "sim-llama-3-8b", "max_tokens": 6, "temperature": 0,
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "hi"},
        {"role": "tool", "content": "a.txt b.txt"},
        {"role": "user", "content": "what now"},
    ]});
    let (_, chat) = post(&engine, "/chat/completions", chat).await?;
    assert_eq!(chat["choices"][0]["message"]["content"], text.as_str());
    assert_eq!(chat["usage"]["prompt_tokens"], 29);

    // count_tokens reads the same conversation.
    let mut count = request.clone();
    count
        .as_object_mut()
        .context("object")?
        .remove("max_tokens");
    let (status, counted) = post(&engine, "/messages/count_tokens", count).await?;
    assert_eq!(status, 200, "{counted}");
    assert_eq!(
        counted,
        json!({"input_tokens": 29, "context_management": {"original_input_tokens": 29}})
    );

    // Streamed: Anthropic's events in order, the text in deltas, usage at both ends.
    let mut streamed = request;
    streamed["stream"] = json!(true);
    let (events, end) = message_events(&engine, streamed).await?;
    end?;
    let kinds: Vec<&str> = events
        .iter()
        .filter_map(|event| event["type"].as_str())
        .collect();
    let mut expected = vec!["message_start", "content_block_start", "ping"];
    expected.extend(["content_block_delta"; 6]);
    expected.extend(["content_block_stop", "message_delta", "message_stop"]);
    assert_eq!(kinds, expected);
    let start = &events[0]["message"];
    assert!(
        start["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("msg_"))
    );
    assert_eq!(start["content"], json!([]));
    assert_eq!(start["stop_reason"], Value::Null);
    assert_eq!(
        start["usage"],
        json!({"input_tokens": 29, "output_tokens": 0})
    );
    assert_eq!(
        events[1],
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
    );
    let deltas: String = events
        .iter()
        .filter(|event| event["type"] == "content_block_delta")
        .map(|event| {
            assert_eq!(event["delta"]["type"], "text_delta");
            event["delta"]["text"].as_str().unwrap_or_default()
        })
        .collect();
    assert_eq!(deltas, text);
    assert_eq!(
        events[events.len() - 2],
        json!({"type": "message_delta",
               "delta": {"stop_reason": "max_tokens", "stop_sequence": null},
               "usage": {"input_tokens": 29, "output_tokens": 6}})
    );
    Ok(())
}

#[tokio::test]
async fn stop_sequences_end_messages_and_chat_before_them() -> Result<()> {
    let engine = engine(SimConfig::default()).await?;
    // The script: "the quick brown fox jumps over a lazy dog ...".
    let request = json!({"model": "sim-llama-3-8b", "max_tokens": 12,
        "messages": [{"role": "user", "content": "go"}],
        "stop_sequences": ["dog", "lazy", "unheard"]});
    let (_, body) = post(&engine, "/messages", request.clone()).await?;
    assert_eq!(
        body["content"][0]["text"],
        "the quick brown fox jumps over a "
    );
    assert_eq!(
        (&body["stop_reason"], &body["stop_sequence"]),
        (&json!("stop_sequence"), &json!("lazy"))
    );
    assert_eq!(body["usage"]["output_tokens"], 7);
    let mut streamed = request;
    streamed["stream"] = json!(true);
    let (events, end) = message_events(&engine, streamed).await?;
    end?;
    let delta = &events[events.len() - 2];
    assert_eq!(
        delta["delta"],
        json!({"stop_reason": "stop_sequence", "stop_sequence": "lazy"})
    );
    assert_eq!(delta["usage"]["output_tokens"], 7);
    // The model had its say before max_tokens: end_turn.
    let (_, body) = post(
        &engine,
        "/messages",
        json!({"model": "sim-llama-3-8b", "max_tokens": 12, "sim_tokens": 2,
               "messages": [{"role": "user", "content": "go"}]}),
    )
    .await?;
    assert_eq!(body["stop_reason"], "end_turn");
    // Chat's `stop` does the same: finish `stop`, and vLLM's `stop_reason` names it.
    let (_, chat) = post(
        &engine,
        "/chat/completions",
        json!({"max_tokens": 12, "stop": "fox", "messages": [{"role": "user", "content": "go"}]}),
    )
    .await?;
    let choice = &chat["choices"][0];
    assert_eq!(choice["message"]["content"], "the quick brown ");
    assert_eq!(
        (&choice["finish_reason"], &choice["stop_reason"]),
        (&json!("stop"), &json!("fox"))
    );
    assert_eq!(chat["usage"]["completion_tokens"], 3);
    Ok(())
}

#[tokio::test]
async fn messages_errors_are_vllm_errors_in_anthropic_shape() -> Result<()> {
    let engine = engine(SimConfig::default()).await?;
    let user = json!([{"role": "user", "content": "hi"}]);
    for (path, body, status, kind) in [
        (
            "/messages",
            json!({"model": "nope", "max_tokens": 5, "messages": user}),
            404,
            "NotFoundError",
        ),
        (
            "/messages",
            json!({"model": "sim-llama-3-8b", "messages": user}),
            400,
            "BadRequestError",
        ),
        (
            "/messages",
            json!({"model": "sim-llama-3-8b", "max_tokens": 0, "messages": user}),
            400,
            "BadRequestError",
        ),
        (
            "/messages",
            json!({"model": "sim-llama-3-8b", "max_tokens": 5}),
            400,
            "BadRequestError",
        ),
        (
            "/messages",
            json!({"max_tokens": 5, "messages": user}),
            400,
            "BadRequestError",
        ),
        (
            "/messages",
            json!({"model": "sim-llama-3-8b", "max_tokens": 5,
            "messages": [{"role": "robot", "content": "hi"}]}),
            400,
            "BadRequestError",
        ),
        (
            "/messages",
            json!({"model": "sim-llama-3-8b", "max_tokens": 5,
            "messages": [{"role": "user", "content": [{"type": "video"}]}]}),
            400,
            "BadRequestError",
        ),
        (
            "/messages/count_tokens",
            json!({"model": "nope", "messages": user}),
            404,
            "NotFoundError",
        ),
        (
            "/messages/count_tokens",
            json!({"model": "sim-llama-3-8b"}),
            400,
            "BadRequestError",
        ),
    ] {
        let (got, answer) = post(&engine, path, body.clone()).await?;
        assert_eq!(got, status, "{body}: {answer}");
        assert_eq!(answer["type"], "error", "{answer}");
        assert_eq!(answer["error"]["type"], kind, "{answer}");
        assert!(answer["error"]["message"].is_string(), "{answer}");
    }
    let response = client()
        .post(format!("{}/messages", engine.base_url()))
        .body("{nope")
        .send()
        .await?;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await?;
    assert_eq!(body["error"]["type"], "BadRequestError");
    Ok(())
}

#[tokio::test]
async fn a_dropped_messages_stream_ends_without_message_stop() -> Result<()> {
    let dropping = serving(
        "m",
        Faults {
            drop_rate: 1.0,
            ..Faults::default()
        },
    )
    .await?;
    let request = json!({"model": "m", "max_tokens": 4, "stream": true,
        "messages": [{"role": "user", "content": "two words"}]});
    let (events, end) = message_events(&dropping, request).await?;
    assert!(end.is_err(), "the stream was not cut: {events:?}");
    assert!(
        events.iter().all(|event| event["type"] != "message_stop"),
        "{events:?}"
    );
    assert!(
        events
            .iter()
            .any(|event| event["type"] == "content_block_delta")
    );
    Ok(())
}
