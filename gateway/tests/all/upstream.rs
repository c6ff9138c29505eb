//! The gateway's own connections to URL backends: kept alive and reused, replaced when the
//! backend closed them while idle, and never reused after an answer was left half read.
//! The backend here is a small hyper server that counts the connections it accepts.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::support::*;
use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;

/// Connections a backend accepted, and how many are still open.
#[derive(Default)]
struct Connections {
    accepted: AtomicUsize,
    open: AtomicUsize,
}

struct Backend {
    url: String,
    connections: Arc<Connections>,
}

const COMPLETION: &str = r#"{"id":"c","object":"chat.completion","created":1,"model":"sim-model","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;

/// An OpenAI-style chat backend on HTTP/1 keep-alive. With `idle_close`, it closes a
/// connection that waits that long for its next request (as uvicorn does after 5 s). Streams
/// send `events` events `pace` apart.
async fn backend(idle_close: Option<Duration>, events: usize, pace: Duration) -> Backend {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let connections = Arc::new(Connections::default());
    let counted = Arc::clone(&connections);
    tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                return;
            };
            counted.accepted.fetch_add(1, Ordering::SeqCst);
            counted.open.fetch_add(1, Ordering::SeqCst);
            let counted = Arc::clone(&counted);
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |request| answer(request, events, pace));
                let mut http = hyper::server::conn::http1::Builder::new();
                if let Some(idle) = idle_close {
                    http.timer(TokioTimer::new()).header_read_timeout(idle);
                }
                let _ = http.serve_connection(TokioIo::new(socket), service).await;
                counted.open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    Backend { url, connections }
}

async fn answer(
    request: http::Request<hyper::body::Incoming>,
    events: usize,
    pace: Duration,
) -> Result<Response, Infallible> {
    use http_body_util::BodyExt;
    let body = request.into_body().collect().await.unwrap().to_bytes();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    if body["stream"] != true {
        return Ok(Response::builder()
            .header("content-type", "application/json")
            .body(Body::from(COMPLETION))
            .unwrap());
    }
    let stream = async_stream(events, pace);
    Ok(Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap())
}

fn async_stream(
    events: usize,
    pace: Duration,
) -> impl futures::Stream<Item = Result<Bytes, Infallible>> {
    let chunk = r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"sim-model","choices":[{"index":0,"delta":{"content":"x"},"finish_reason":null}]}"#;
    let usage = r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"sim-model","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#;
    let mut frames: Vec<String> = (0..events).map(|_| format!("data: {chunk}\n\n")).collect();
    frames.push(format!("data: {usage}\n\n"));
    frames.push("data: [DONE]\n\n".into());
    futures::stream::unfold(frames.into_iter(), move |mut frames| async move {
        let frame = frames.next()?;
        tokio::time::sleep(pace).await;
        Some((Ok(Bytes::from(frame)), frames))
    })
}

#[tokio::test]
async fn one_connection_serves_request_after_request() {
    let engine = backend(None, 3, Duration::ZERO).await;
    let gw = gateway(config(vec![upstream("a", engine.url.clone())])).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "t"})).await;
    for i in 0..20 {
        let stream = i % 2 == 1;
        let (status, body) = post_chat(&base, &key, &chat(stream)).await;
        assert_eq!(status, 200, "{body}");
        if stream {
            assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
        } else {
            assert_eq!(body, COMPLETION);
        }
    }
    assert_eq!(engine.connections.accepted.load(Ordering::SeqCst), 1);

    // Concurrent requests need connections of their own; once they are back in the pool,
    // later requests reuse them instead of opening more.
    let concurrent = (0..6).map(|i| {
        let (base, key) = (base.clone(), key.clone());
        async move { post_chat(&base, &key, &chat(i % 2 == 0)).await.0 }
    });
    for status in futures::future::join_all(concurrent).await {
        assert_eq!(status, 200);
    }
    let after_burst = engine.connections.accepted.load(Ordering::SeqCst);
    assert!((1..=6).contains(&after_burst), "{after_burst} connections");
    for _ in 0..10 {
        assert_eq!(post_chat(&base, &key, &chat(false)).await.0, 200);
    }
    assert_eq!(
        engine.connections.accepted.load(Ordering::SeqCst),
        after_burst
    );
}

#[tokio::test]
async fn a_connection_the_backend_closed_while_idle_is_replaced_without_an_error() {
    let engine = backend(Some(Duration::from_millis(100)), 3, Duration::ZERO).await;
    let gw = gateway(config(vec![upstream("a", engine.url.clone())])).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "t"})).await;
    for round in 1..=3 {
        for stream in [false, true] {
            let (status, body) = post_chat(&base, &key, &chat(stream)).await;
            assert_eq!(status, 200, "round {round}, stream {stream}: {body}");
        }
        // The backend drops the idle connection the gateway keeps in its pool.
        wait_until(
            Duration::from_secs(5),
            "the backend to close it",
            || async { engine.connections.open.load(Ordering::SeqCst) == 0 },
        )
        .await;
    }
    // Each round needed a new connection; none of the closed ones failed a request (a failure
    // would also have cooled the only backend down: 503 for the next request).
    assert_eq!(engine.connections.accepted.load(Ordering::SeqCst), 3);
    let metrics = metrics_text(&base).await;
    assert!(
        !metrics.contains("garage_backend_errors_total{"),
        "{metrics}"
    );
}

#[tokio::test]
async fn idle_connections_the_backend_closed_are_let_go_without_traffic() {
    let engine = backend(Some(Duration::from_millis(100)), 3, Duration::ZERO).await;
    let mut config = config(vec![upstream("a", engine.url.clone())]);
    config.dispatch.health_interval_secs = 1;
    let gw = gateway(config).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "t"})).await;
    assert_eq!(post_chat(&base, &key, &chat(false)).await.0, 200);
    let idle = || gw.state().backends().snapshot().all()[0].idle_connections();
    assert_eq!(idle(), 1);
    // The backend closes it; with no request to notice, the health round lets it go.
    wait_until(Duration::from_secs(10), "the pool to drop it", || async {
        idle() == 0
    })
    .await;
    assert_eq!(engine.connections.open.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_stream_the_client_left_closes_its_connection_and_the_next_request_opens_one() {
    let engine = backend(None, 50, Duration::from_millis(20)).await;
    let gw = gateway(config(vec![upstream("a", engine.url.clone())])).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "t"})).await;
    let mut response = client()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&chat(true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let first = response.chunk().await.unwrap().expect("a first event");
    assert!(first.starts_with(b"data: "), "{first:?}");
    drop(response);
    // The rest of that answer would precede the next one on the connection: it must close.
    wait_until(
        Duration::from_secs(5),
        "the connection to close",
        || async { engine.connections.open.load(Ordering::SeqCst) == 0 },
    )
    .await;
    let (status, body) = post_chat(&base, &key, &chat(false)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, COMPLETION);
    assert_eq!(engine.connections.accepted.load(Ordering::SeqCst), 2);
}

/// An engine on a Unix domain socket (vLLM's `--uds`), reached through the upstream's
/// `unix_socket`: health probes go over the socket (a probe by TCP to `localhost` would fail),
/// so the model joins once an engine serves the socket and leaves when it stops; chat, plain
/// and streamed, with its usage metered; and a request to a socket nobody serves fails over to
/// the next backend.
#[tokio::test]
async fn an_upstream_on_a_unix_socket_serves_chat_and_is_probed_over_it() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("engine.sock");
    let config_of = |models: &[&str]| garage_sim_engine::SimConfig {
        models: models.iter().map(|m| m.to_string()).collect(),
        ..Default::default()
    };
    let mut local = upstream("local", "http://localhost/v1".into());
    local.unix_socket = Some(socket.clone());
    local.health_path = Some("/health".into());
    // A second model, first on a socket nobody listens on (no probe), then on TCP.
    let tcp = sim(config_of(&["other-model"])).await;
    let mut gone = upstream("gone", "http://localhost/v1".into());
    gone.models = vec!["other-model".into()];
    gone.unix_socket = Some(dir.path().join("gone.sock"));
    let mut reachable = upstream("reachable", tcp.base_url());
    reachable.models = vec!["other-model".into()];
    let mut cfg = config(vec![local, gone, reachable]);
    cfg.dispatch.health_interval_secs = 1;
    let gw = gateway(cfg).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "t"})).await;

    // Nobody serves the socket yet: the probe fails. Once the engine does, only a probe that
    // reaches it over the socket brings the model back (no request goes to it meanwhile).
    wait_until(
        Duration::from_secs(10),
        "the probe of a socket nobody serves fails",
        || async { model_ids(&base, &key).await == ["other-model"] },
    )
    .await;
    let engine = garage_sim_engine::SimEngine::start_unix(&socket, config_of(&[MODEL]))
        .await
        .unwrap();
    assert_eq!(engine.base_url(), "http://localhost/v1");
    wait_until(
        Duration::from_secs(10),
        "the probe over the socket passes",
        || async { model_ids(&base, &key).await == ["other-model", MODEL] },
    )
    .await;

    let (status, body) = post_chat(&base, &key, &chat(false)).await;
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["usage"]["completion_tokens"], 5, "{body}");
    let (status, body) = post_chat(&base, &key, &chat(true)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    assert_eq!(engine.requests_served(), 2);
    assert_metrics_include(
        &base,
        &[format!(
            "garage_tokens_total{{direction=\"completion\",model=\"{MODEL}\"}} 10"
        )],
    )
    .await;

    // Round robin puts the dead socket first for one of two requests: both answer.
    for _ in 0..2 {
        let mut other = chat(false);
        other["model"] = json!("other-model");
        let (status, body) = post_chat(&base, &key, &other).await;
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(tcp.requests_served(), 2);

    engine.shutdown().await;
    assert!(
        !socket.exists(),
        "the engine removes its socket when it stops"
    );
    wait_until(
        Duration::from_secs(10),
        "the stopped engine fails its probe",
        || async { model_ids(&base, &key).await == ["other-model"] },
    )
    .await;
}
