//! The gateway stands between strangers: clients on one side, other people's rigs on the other.
//! Each test here is a way one of them tried to take money or capacity, or to break a request,
//! and what the gateway does about it (`docs/security.md` lists the defaults).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::support::*;
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use garage_sim_engine::{Faults, SimConfig};
use serde_json::{Value, json};

/// An OpenAI-ish server of our own making on loopback, answering every POST with `answer`.
async fn mock<F, R>(answer: F) -> (String, tokio::task::JoinHandle<()>)
where
    F: Fn(Bytes) -> R + Clone + Send + Sync + 'static,
    R: IntoResponse + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(move |body: Bytes| {
        let answer = answer.clone();
        async move { answer(body).into_response() }
    });
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}/v1"), task)
}

fn with_defaults(upstreams: Vec<garage_gateway::config::UpstreamConfig>) -> garage_gateway::Config {
    let mut cfg = config(upstreams);
    cfg.default_plugins = true;
    cfg
}

/// Reads a stream until `events` events carrying output have arrived, then hangs up. Returns the
/// request id the gateway gave the request.
async fn read_then_hang_up(
    base: &str,
    key: &str,
    path: &str,
    body: Value,
    events: usize,
) -> (String, usize) {
    let mut response = client()
        .post(format!("{base}/v1/{path}"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{path}");
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let mut seen = 0;
    let mut text = String::new();
    while seen < events {
        let Some(chunk) = response.chunk().await.unwrap() else {
            break;
        };
        text.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = text.find("\n\n") {
            let event: String = text.drain(..end + 2).collect();
            let carries = event.contains("\"content\":\"") && !event.contains("\"content\":\"\"")
                || event.contains("\"text\":\"") && !event.contains("\"text\":\"\"")
                || event.contains("output_text.delta");
            if carries {
                seen += 1;
            }
        }
    }
    drop(response);
    (request_id, seen)
}

async fn ledger_completion_tokens(base: &str, request_id: &str) -> u64 {
    let path = format!("/admin/usage/requests/{request_id}");
    wait_until(Duration::from_secs(10), "the ledger entry", || async {
        admin_get(base, &path).await["event"]["request_id"] == request_id
    })
    .await;
    admin_get(base, &path).await["event"]["completion_tokens"]
        .as_u64()
        .unwrap()
}

/// A client that reads 95 % of a stream and hangs up is billed what it read, on every endpoint
/// that streams (it was billed nothing: usage came only with the last chunk).
#[tokio::test]
async fn a_stream_cut_short_is_billed_what_it_delivered() {
    // 200 tokens at 100 a second: the client hangs up with most of the answer still to come.
    let engine = paced_sim(100.0).await;
    let gw = gateway(config(vec![upstream("a", engine.base_url())])).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "hangs-up"})).await;
    let prompt = json!([{"role": "user", "content": "tell me a long story"}]);
    let cases = [
        (
            "chat/completions",
            json!({"model": MODEL, "messages": prompt, "max_tokens": 200, "stream": true}),
        ),
        (
            "completions",
            json!({"model": MODEL, "prompt": "once upon a time", "max_tokens": 200, "stream": true}),
        ),
        (
            "responses",
            json!({"model": MODEL, "input": "once upon a time", "max_output_tokens": 200, "stream": true}),
        ),
    ];
    for (path, body) in cases {
        let (request_id, read) = read_then_hang_up(&base, &key, path, body, 38).await;
        assert_eq!(read, 38, "{path}");
        let billed = ledger_completion_tokens(&base, &request_id).await;
        // Never less than it read; what the gateway had forwarded but the client not yet read
        // (in the sockets' buffers) counts too.
        assert!(
            (38..120).contains(&billed),
            "{path}: 38 events read, {billed} completion tokens billed"
        );
    }
    assert_metrics_include(
        &base,
        &["garage_usage_corrections_total{kind=\"estimated\"} 3".to_owned()],
    )
    .await;
}

/// A key limited to 500 tokens a minute cannot get more by cutting its streams short: the
/// limiter settles every request at what it delivered (it gave the whole reservation back).
#[tokio::test]
async fn cutting_streams_short_does_not_beat_a_token_limit() {
    let engine = paced_sim(400.0).await;
    let gw = gateway(with_defaults(vec![upstream("a", engine.base_url())])).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "tpm", "metadata": {"tpm": 500}})).await;
    let body = json!({"model": MODEL, "max_tokens": 40, "stream": true,
        "messages": [{"role": "user", "content": "hello there"}]});
    let mut delivered = 0;
    let mut refused = false;
    for _ in 0..40 {
        let response = client()
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&body)
            .send()
            .await
            .unwrap();
        if response.status() == 429 {
            refused = true;
            break;
        }
        drop(response);
        let (_, read) = read_then_hang_up(&base, &key, "chat/completions", body.clone(), 38).await;
        delivered += read;
    }
    assert!(refused, "never limited: {delivered} tokens delivered");
    // A reservation is prompt + max_tokens (about 55): past 500, one more at most.
    assert!(delivered <= 560, "{delivered} tokens under a 500 tpm limit");
}

/// A client that gives up waiting for a whole answer is billed the prompt the rig read.
#[tokio::test]
async fn a_client_that_gives_up_on_a_whole_answer_is_billed_its_prompt() {
    let engine = paced_sim(20.0).await;
    let gw = gateway(config(vec![upstream("a", engine.base_url())])).await;
    let base = gw.url();
    let (key_id, key) = create_key(&base, json!({"name": "impatient"})).await;
    let body = json!({"model": MODEL, "max_tokens": 100,
        "messages": [{"role": "user", "content": "x".repeat(4_000)}]});
    let gave_up = client()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .timeout(Duration::from_millis(300))
        .json(&body)
        .send()
        .await;
    assert!(gave_up.is_err(), "the answer takes 5 s");
    wait_until(Duration::from_secs(10), "the prompt billed", || async {
        let usage = admin_get(&base, &format!("/admin/usage?key_id={key_id}")).await;
        usage["data"][0]["prompt_tokens"].as_u64().unwrap_or(0) >= 1_000
    })
    .await;
}

/// A real node-runner whose engine claims a billion tokens per answer, and an engine claiming
/// 2^64 - 1: each request is billed what the gateway can check, the anomalies are counted, and
/// nobody's credits or points wrap.
#[tokio::test]
async fn a_rig_claiming_absurd_usage_is_billed_what_it_served() {
    const GREEDY: &str = "claims-max";
    let greedy = sim(SimConfig {
        models: vec![GREEDY.into()],
        faults: Faults {
            claim_tokens: Some(u64::MAX),
            ..Faults::default()
        },
        ..SimConfig::default()
    })
    .await;
    let mut static_upstream = upstream("greedy", greedy.base_url());
    static_upstream.models = vec![GREEDY.into()];
    let gw = gateway(with_defaults(vec![static_upstream])).await;
    let base = gw.url();
    let dir = tempfile::tempdir().unwrap();
    let token = enrollment_token(&base, 1).await;
    let _rig = NodeRunner::start(
        dir.path(),
        &format!(
            r#"gateway_url = "{base}"
enrollment_token = "{token}"
name = "liar"
state_file = "{state}"

[[engines]]
name = "sim"
driver = "simulated"
models = ["{MODEL}"]
claim_tokens = 1000000000
"#,
            state = dir.path().join("state.json").display(),
        ),
    );
    wait_until(Duration::from_secs(30), "the rig routable", || async {
        routable_rigs(&base).await == 1
    })
    .await;
    for model in [MODEL, GREEDY] {
        let (key_id, key) = create_key(&base, json!({"name": format!("victim-{model}")})).await;
        for stream in [false, true] {
            let mut body = chat(stream);
            body["model"] = json!(model);
            let (status, text) = post_chat(&base, &key, &body).await;
            assert_eq!(status, 200, "{text}");
        }
        // Without max_tokens: bounded by the answer's own text.
        let (status, _) = post_chat(
            &base,
            &key,
            &json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
        assert_eq!(status, 200);
        wait_until(
            Duration::from_secs(10),
            "three requests metered",
            || async {
                let usage = admin_get(&base, &format!("/admin/usage?key_id={key_id}")).await;
                usage["data"][0]["requests"] == 3
            },
        )
        .await;
        let usage = admin_get(&base, &format!("/admin/usage?key_id={key_id}")).await;
        let row = &usage["data"][0];
        assert!(row["completion_tokens"].as_u64().unwrap() < 1_000, "{row}");
        assert!(row["prompt_tokens"].as_u64().unwrap() < 1_500, "{row}");
        let credits = row["credits"].as_f64().unwrap();
        assert!((0.0..5.0).contains(&credits), "{row}");
    }
    let metrics = metrics_text(&base).await;
    for kind in [
        "completion_over_max_tokens",
        "prompt_over_request",
        "completion_over_output",
    ] {
        assert!(
            metrics.contains(&format!(
                "garage_usage_corrections_total{{kind=\"{kind}\"}}"
            )),
            "{kind}: {metrics}"
        );
    }
    let leaders = admin_get(&base, "/admin/rewards").await;
    for operator in leaders["data"].as_array().unwrap() {
        assert!(operator["points"].as_f64().unwrap() < 1e6, "{leaders}");
    }
}

/// Thousands of connections that send half a request head, from one address, beside normal
/// traffic from another: the normal requests are served, the attacker holds no more than its
/// share, and shutting down does not wait on the half-sent heads.
#[tokio::test]
async fn half_open_connections_do_not_starve_other_clients() {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let engine = fast_sim().await;
    let mut cfg = config(vec![upstream("a", engine.base_url())]);
    cfg.connections.max_per_ip = 64;
    cfg.connections.header_read_timeout_secs = 2;
    let gw = gateway(cfg).await;
    let base = gw.url();
    let addr = gw.addr();
    let (_, key) = create_key(&base, json!({"name": "normal"})).await;
    // The attacker, from 127.0.0.2.
    let mut held = Vec::new();
    for _ in 0..3_000 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let Ok(mut stream) = socket.connect(addr).await else {
            continue;
        };
        use tokio::io::AsyncWriteExt;
        let _ = stream
            .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Ty")
            .await;
        held.push(stream);
    }
    assert!(
        held.len() > 2_000,
        "the attack opened {} connections",
        held.len()
    );
    // Everyone else, from 127.0.0.1, as usual.
    for _ in 0..20 {
        let (status, text) = post_chat(&base, &key, &chat(false)).await;
        assert_eq!(status, 200, "{text}");
    }
    let metrics = metrics_text(&base).await;
    let open: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("garage_connections_open "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(open <= 64.0 + 2.0, "{open} connections open");
    assert!(
        metrics.contains("garage_connections_refused_total{reason=\"per_ip\"}"),
        "{metrics}"
    );
    // Shutting down with half-sent heads open: no waiting for them.
    let started = Instant::now();
    assert!(gw.shutdown(Duration::from_secs(30)).await);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "shutdown waited {:?} on half-sent heads",
        started.elapsed()
    );
}

/// A half-sent head is dropped at the header deadline; so is a connection left idle, and a body
/// that stops half way is refused at the body deadline.
#[tokio::test]
async fn slow_heads_and_idle_connections_are_closed() {
    let engine = fast_sim().await;
    let mut cfg = config(vec![upstream("a", engine.base_url())]);
    cfg.connections.header_read_timeout_secs = 1;
    cfg.connections.body_read_timeout_secs = 1;
    let gw = gateway(cfg).await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut slow = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nHo").await.unwrap();
    let mut idle = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    // A body that stops half way: refused once it has been quiet for the body deadline.
    let (_, key) = create_key(&gw.url(), json!({"name": "trickle"})).await;
    let mut trickle = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\n\
         Content-Length: 100\r\n\r\n{{\"model\""
    );
    trickle.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), trickle.read_to_end(&mut answer))
        .await
        .expect("the gateway gives up on the body");
    assert!(read.is_ok());
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("sent nothing for"), "{answer}");
    for stream in [&mut slow, &mut idle] {
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf))
            .await
            .expect("the gateway closes the connection");
        assert!(read.is_ok() || buf.is_empty());
    }
}

/// 200 requests at once on a 10-requests-a-minute key while the machine is busy: exactly 10 get
/// through, and the limiter never missed its deadline (a missed one let an 11th and a 12th in).
/// It runs alone: "busy" is its own four spinning threads, not whatever else the test runner
/// has going.
#[tokio::test]
async fn a_burst_on_a_ten_rpm_key_admits_exactly_ten_on_a_busy_machine_alone() {
    let engine = fast_sim().await;
    let gw = gateway(with_defaults(vec![upstream("a", engine.base_url())])).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "burst", "metadata": {"rpm": 10}})).await;
    // The limiter counts in fixed windows of a minute, aligned on the clock: a burst that
    // straddles one gets 10 in each, rightly. Start well inside a window.
    let into_minute = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        % 60_000;
    if into_minute > 40_000 {
        tokio::time::sleep(Duration::from_millis(61_000 - into_minute as u64)).await;
    }
    // Keep every core busy meanwhile.
    let busy = Arc::new(AtomicBool::new(true));
    let hogs: Vec<_> = (0..4)
        .map(|_| {
            let busy = busy.clone();
            std::thread::spawn(move || {
                let mut x = 0u64;
                while busy.load(Ordering::Relaxed) {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                }
                x
            })
        })
        .collect();
    let burst = (0..200).map(|_| {
        let (base, key) = (base.clone(), key.clone());
        tokio::spawn(async move { post_chat(&base, &key, &chat(false)).await.0 })
    });
    let statuses: Vec<u16> = futures::future::join_all(burst)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    busy.store(false, Ordering::Relaxed);
    for hog in hogs {
        let _ = hog.join();
    }
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!((admitted, limited), (10, 190), "{statuses:?}");
    let metrics = metrics_text(&base).await;
    assert!(
        !metrics.contains("garage_plugin_faults_total{kind=\"timeout\",slot=\"rate-limiter\"}"),
        "the limiter missed its deadline: {metrics}"
    );
}

/// A rate limiter uploaded with a configuration it cannot read is refused at upload with the
/// plugin's own words, and the slot keeps what it had.
#[tokio::test]
async fn a_plugin_that_cannot_read_its_config_is_refused_at_upload() {
    let gw = gateway(with_defaults(vec![])).await;
    let base = gw.url();
    let before = admin_get(&base, "/admin/plugins").await;
    let response = client()
        .put(format!(
            "{base}/admin/plugins/rate-limiter?config=%7B%22rpm%22%3A%22ten%22%7D"
        ))
        .bearer_auth(ADMIN)
        .header("content-type", "application/wasm")
        .body(garage_plugins::RATE_LIMITER.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let error = error_of(&response.text().await.unwrap());
    let message = error["message"].as_str().unwrap();
    assert!(message.contains("refused its configuration"), "{message}");
    assert!(message.contains("\"ten\""), "{message}");
    assert_eq!(admin_get(&base, "/admin/plugins").await, before);
}

/// Redis restarts empty under a gateway: the policies come back by themselves, loudly, instead
/// of every slot staying empty (no limits, no metering, no rewards).
#[tokio::test]
async fn a_store_that_comes_back_empty_gets_its_policies_back() {
    let redis = RedisServer::start();
    let port = redis.port;
    let mut cfg = with_defaults(vec![]);
    cfg.store = redis.url();
    cfg.auth.key_secret = Some("secret-for-the-test".into());
    cfg.plugins.resync_interval_secs = 1;
    let gw = gateway(cfg).await;
    let base = gw.url();
    let active = |status: Value| {
        status["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|slot| !slot["active"].is_null())
            .count()
    };
    assert_eq!(active(admin_get(&base, "/admin/plugins").await), 4);
    drop(redis);
    let _redis = RedisServer::start_on(port);
    wait_until(
        Duration::from_secs(30),
        "the policies reinstalled",
        || async {
            let status = admin_get(&base, "/admin/plugins").await;
            active(status.clone()) == 4
                && status["data"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|slot| slot["active"]["activated_by"] == "restore:defaults")
        },
    )
    .await;
    let metrics = metrics_text(&base).await;
    assert!(
        metrics.contains("garage_plugin_restores_total{slot=\"rate-limiter\"} 1"),
        "{metrics}"
    );
}

/// A client that writes `stream_options` with a JSON escape gets one member, not two (the engine
/// refused the duplicate), and no usage chunk it did not ask for.
#[tokio::test]
async fn an_escaped_member_name_passes_as_sent() {
    let engine = fast_sim().await;
    let gw = gateway(config(vec![upstream("a", engine.base_url())])).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "escapes"})).await;
    let body = format!(
        r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"hi"}}],"stream":true,"max_tokens":3,"stream\u005foptions":{{"include_usage":false}}}}"#
    );
    let response = client()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(
        !text.contains("\"usage\":{"),
        "a usage chunk nobody asked for: {text}"
    );
}

/// Every answer is OpenAI JSON with the right status: the framework's rejections (a path that
/// is not UTF-8, a query that does not parse, a body over the limit) and an engine's own error
/// page alike.
#[tokio::test]
async fn every_error_is_openai_json() {
    let (text_413, _a) = mock(|_| {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            [("content-type", "text/plain")],
            "Request Entity Too Large",
        )
    })
    .await;
    let (detail_400, _b) = mock(|_| {
        (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"detail": "prompt is too long for this model"})),
        )
    })
    .await;
    let mut first = upstream("text", text_413);
    first.models = vec!["text-errors".into()];
    let mut second = upstream("detail", detail_400);
    second.models = vec!["detail-errors".into()];
    let gw = gateway(config(vec![first, second])).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "k"})).await;
    let get = |path: &str, token: &str| {
        let request = client().get(format!("{base}{path}")).bearer_auth(token);
        async move {
            let response = request.send().await.unwrap();
            (
                response.status().as_u16(),
                response.text().await.unwrap_or_default(),
            )
        }
    };
    for (path, token) in [
        ("/v1/files/%FF", key.as_str()),
        ("/v1/files?limit=abc", &key),
        ("/v1/batches?limit=-1", &key),
        ("/v1/files?limit=-1", &key),
        ("/admin/keys/%FF", ADMIN),
        ("/admin/usage/requests/%C0", ADMIN),
    ] {
        let (status, text) = get(path, token).await;
        assert_eq!(status, 400, "{path}: {text}");
        error_of(&text);
    }
    for canary in ["-1", "2147483648"] {
        let response = client()
            .put(format!("{base}/admin/plugins/router?canary={canary}"))
            .bearer_auth(ADMIN)
            .body(vec![0u8; 8])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "canary={canary}");
        error_of(&response.text().await.unwrap());
    }
    // An unknown slot is a 404 in OpenAI's shape (and in the spec: `openapi::`).
    for action in ["promote", "rollback"] {
        let response = client()
            .post(format!("{base}/admin/plugins/nope/{action}"))
            .bearer_auth(ADMIN)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404, "{action}");
        error_of(&response.text().await.unwrap());
    }
    let response = client()
        .post(format!("{base}/admin/keys"))
        .bearer_auth(ADMIN)
        .header("content-type", "application/json")
        .body(vec![b' '; 17 << 20])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    error_of(&response.text().await.unwrap());
    // The engines' own errors: status kept, wrapped in OpenAI's shape, their words inside.
    for (model, status, words) in [
        ("text-errors", 413, "Request Entity Too Large"),
        ("detail-errors", 400, "prompt is too long"),
    ] {
        let (got, text) = post_chat(
            &base,
            &key,
            &json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
        assert_eq!(got, status, "{text}");
        let error = error_of(&text);
        assert!(error["message"].as_str().unwrap().contains(words), "{text}");
    }
}

/// A body that makes the engines fail cools down no backend (it took every backend of a model
/// out of rotation for every tenant); a backend that fails on its own is still cooled.
#[tokio::test]
async fn a_request_that_breaks_the_engine_cools_no_backend() {
    let hits = [Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0))];
    let mut upstreams = Vec::new();
    let mut servers = Vec::new();
    for (i, hits) in hits.iter().enumerate() {
        let hits = hits.clone();
        let (url, server) = mock(move |body: Bytes| {
            if String::from_utf8_lossy(&body).contains("poison") {
                return (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(json!({}))).into_response();
            }
            hits.fetch_add(1, Ordering::SeqCst);
            axum::Json(json!({"object": "chat.completion", "choices": [],
                "usage": {"prompt_tokens": 1, "completion_tokens": 0}}))
            .into_response()
        })
        .await;
        upstreams.push(upstream(&format!("m{i}"), url));
        servers.push(server);
    }
    let gw = gateway(config(upstreams)).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "poisoner"})).await;
    let poison = json!({"model": MODEL, "messages": [{"role": "user", "content": "poison"}]});
    for _ in 0..5 {
        assert_eq!(post_chat(&base, &key, &poison).await.0, 502);
    }
    for _ in 0..10 {
        assert_eq!(post_chat(&base, &key, &chat(false)).await.0, 200);
    }
    assert!(
        hits.iter().all(|h| h.load(Ordering::SeqCst) >= 3),
        "a backend left rotation: {hits:?}"
    );

    // A backend that fails everything, beside a good one: cooled after its first failure.
    let broken_hits = Arc::new(AtomicUsize::new(0));
    let counted = broken_hits.clone();
    let (broken, _c) = mock(move |_| {
        counted.fetch_add(1, Ordering::SeqCst);
        (StatusCode::INTERNAL_SERVER_ERROR, "boom")
    })
    .await;
    let good = fast_sim().await;
    let gw = gateway(config(vec![
        upstream("broken", broken),
        upstream("good", good.base_url()),
    ]))
    .await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "k"})).await;
    for _ in 0..10 {
        assert_eq!(post_chat(&base, &key, &chat(false)).await.0, 200);
    }
    assert_eq!(broken_hits.load(Ordering::SeqCst), 1);
}

/// A rig cannot make the gateway hold an answer of any size: past `max_response_bytes`, 502.
#[tokio::test]
async fn an_oversized_answer_is_refused() {
    let (huge, _server) = mock(|_| {
        let filler = "x".repeat(2 << 20);
        axum::Json(
            json!({"object": "chat.completion", "choices": [{"message": {"content": filler}}]}),
        )
    })
    .await;
    let mut cfg = config(vec![upstream("huge", huge)]);
    cfg.dispatch.max_response_bytes = 1 << 20;
    let gw = gateway(cfg).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "k"})).await;
    let (status, text) = post_chat(&base, &key, &chat(false)).await;
    assert_eq!(status, 502);
    assert!(
        error_of(&text)["message"]
            .as_str()
            .unwrap()
            .contains("larger")
    );
}

/// With no admin token configured, the generated one goes to a file only its owner can read,
/// and the log says where, never what; a token is no longer a command-line argument.
#[tokio::test]
async fn no_secret_in_the_log_or_the_arguments() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let token_file = dir.path().join("admin-token");
    let log = dir.path().join("gateway.log");
    let mut child = std::process::Command::new(workspace_binary("gateway"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--admin-token-file")
        .arg(&token_file)
        .env("GARAGE_DEFAULT_PLUGINS", "false")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    wait_until(Duration::from_secs(30), "the gateway up", || async {
        client().get(format!("{base}/health")).send().await.is_ok()
    })
    .await;
    let token = std::fs::read_to_string(&token_file).unwrap();
    let token = token.trim();
    assert!(token.len() >= 32);
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let response = client()
        .get(format!("{base}/admin/keys"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let _ = child.kill();
    let _ = child.wait();
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(!logged.contains(token), "the token is in the log: {logged}");
    assert!(
        logged.contains(&token_file.display().to_string()),
        "{logged}"
    );
    // The old flag that put the token in every user's `ps` is gone.
    let refused = std::process::Command::new(workspace_binary("gateway"))
        .args(["serve", "--admin-token", "visible-to-everyone"])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
}
