//! Policy plugins through the gateway: defaults on the request path, the admin API (upload,
//! rollback, canary, promotion), swaps under load, hostile components, and every replica
//! following an activation.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::support::*;
use serde_json::json;

fn with_defaults(upstreams: Vec<garage_gateway::config::UpstreamConfig>) -> garage_gateway::Config {
    let mut cfg = config(upstreams);
    cfg.default_plugins = true;
    // A CI machine runs several test processes on two cores: a 5 ms guest deadline can be
    // blown by the scheduler alone, and the limiter's fail-open answer carries no headers.
    // Deadlines have their own tests (`plugin_host`).
    for slot in [&mut cfg.plugins.router, &mut cfg.plugins.rate_limiter] {
        slot.deadline_ms = Some(200);
    }
    cfg
}

async fn slot_status(base: &str, slot: &str) -> serde_json::Value {
    let all = admin_get(base, "/admin/plugins").await;
    all["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["slot"] == slot)
        .cloned()
        .unwrap_or_default()
}

#[tokio::test]
async fn defaults_serve_and_rate_limits_hold() {
    let engine = fast_sim().await;
    let gw = gateway(with_defaults(vec![upstream("a", engine.base_url())])).await;
    let base = gw.url();
    for slot in ["router", "rate-limiter", "meter", "reward"] {
        let status = slot_status(&base, slot).await;
        assert_eq!(
            status["active"]["activated_by"], "defaults",
            "{slot}: {status}"
        );
    }

    let (_, limited) = create_key(&base, json!({"name": "l", "metadata": {"rpm": 2}})).await;
    let (_, free) = create_key(&base, json!({"name": "f"})).await;
    for remaining in ["1", "0"] {
        let response = client()
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(&limited)
            .json(&chat(false))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-ratelimit-limit-requests"], "2");
        assert_eq!(
            response.headers()["x-ratelimit-remaining-requests"],
            remaining
        );
    }
    let refused = client()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&limited)
        .json(&chat(false))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    let body = refused.text().await.unwrap();
    assert_eq!(error_of(&body)["code"], "rate_limit_exceeded");
    // Another key is not affected.
    assert_eq!(post_chat(&base, &free, &chat(false)).await.0, 200);
}

#[tokio::test]
async fn a_spent_budget_gets_insufficient_quota() {
    let engine = fast_sim().await;
    let gw = gateway(with_defaults(vec![upstream("a", engine.base_url())])).await;
    let base = gw.url();
    // One credit per 1,000 tokens and a budget a single request exceeds.
    let query = config_query(json!({"default_budget": 0.001}));
    let (status, body) = upload_plugin(&base, "meter", garage_plugins::METER, &query).await;
    assert_eq!(status, 200, "{body}");
    let (_, key) = create_key(&base, json!({"name": "t"})).await;
    assert_eq!(post_chat(&base, &key, &chat(false)).await.0, 200);
    wait_until(Duration::from_secs(10), "the budget verdict", || async {
        let (status, body) = post_chat(&base, &key, &chat(false)).await;
        status == 429 && error_of(&body)["code"] == "insufficient_quota"
    })
    .await;
    let usage = admin_get(&base, "/admin/usage").await;
    assert!(
        usage["data"][0]["credits"].as_f64().unwrap() > 0.001,
        "{usage}"
    );
}

/// A daily budget, in the operator's time zone: the key is refused until local midnight, and
/// says so (`retry-after`); another key's day is its own. (That the day resets is the meter's
/// unit test, with an injectable clock.)
#[tokio::test]
async fn a_spent_daily_budget_gets_insufficient_quota_until_local_midnight() {
    let engine = fast_sim().await;
    let gw = gateway(with_defaults(vec![upstream("a", engine.base_url())])).await;
    let base = gw.url();
    // UTC+3: local midnight is at 21:00 UTC.
    let offset_minutes: u64 = 180;
    let query = config_query(json!({
        "period_budgets": {"day": 0.001},
        "utc_offset_minutes": offset_minutes,
    }));
    let (status, body) = upload_plugin(&base, "meter", garage_plugins::METER, &query).await;
    assert_eq!(status, 200, "{body}");
    let (_, key) = create_key(&base, json!({"name": "daily"})).await;
    let (_, other) = create_key(&base, json!({"name": "other"})).await;
    assert_eq!(post_chat(&base, &key, &chat(false)).await.0, 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let refused = loop {
        let response = client()
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&chat(false))
            .send()
            .await
            .unwrap();
        if response.status() == 429 {
            let retry_after: u64 = response.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            let body = response.text().await.unwrap();
            assert_eq!(error_of(&body)["code"], "insufficient_quota", "{body}");
            break retry_after;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no budget verdict within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    const DAY_MS: u64 = 86_400_000;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let local = now + offset_minutes * 60_000;
    let to_midnight = (DAY_MS - local % DAY_MS).div_ceil(1000);
    assert!(
        refused.abs_diff(to_midnight) <= 5,
        "retry-after {refused} s, local midnight in {to_midnight} s"
    );
    assert_eq!(post_chat(&base, &other, &chat(false)).await.0, 200);
}

#[tokio::test]
async fn swapping_the_router_twenty_times_under_load_fails_nothing() {
    let a = fast_sim().await;
    let b = fast_sim().await;
    let gw = gateway(with_defaults(vec![
        upstream("a", a.base_url()),
        upstream("b", b.base_url()),
    ]))
    .await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "load"})).await;
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut load = Vec::new();
    for i in 0..4 {
        let (base, key, stop, ok, failures) = (
            base.clone(),
            key.clone(),
            stop.clone(),
            ok.clone(),
            failures.clone(),
        );
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let (status, body) = post_chat(&base, &key, &chat(i % 2 == 0)).await;
                if status == 200 {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failures.lock().unwrap().push((status, body));
                }
            }
        }));
    }
    let routers = [
        garage_plugins::ROUTER_ROUND_ROBIN,
        garage_plugins::ROUTER_PREFIX_AFFINITY,
        garage_plugins::ROUTER_LEAST_LOADED,
    ];
    let mut shas = std::collections::HashSet::new();
    for swap in 0..20 {
        let served_before = ok.load(Ordering::Relaxed);
        let (status, body) = upload_plugin(&base, "router", routers[swap % 3], "").await;
        assert_eq!(status, 200, "{body}");
        shas.insert(body["sha256"].as_str().unwrap().to_owned());
        // Traffic keeps flowing between swaps.
        wait_until(Duration::from_secs(10), "requests after a swap", || {
            let ok = ok.clone();
            async move { ok.load(Ordering::Relaxed) > served_before + 5 }
        })
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    let failures = std::mem::take(&mut *failures.lock().unwrap());
    assert!(
        failures.is_empty(),
        "{} failed requests: {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    assert_eq!(shas.len(), 3);
    assert!(ok.load(Ordering::Relaxed) > 100);
    let router = slot_status(&base, "router").await;
    assert!(router["history"].as_array().unwrap().len() >= 3, "{router}");
}

#[tokio::test]
async fn hostile_components_are_refused_at_upload() {
    let engine = fast_sim().await;
    let gw = gateway(with_defaults(vec![
        upstream("a", engine.base_url()),
        upstream("b", engine.base_url().replace("127.0.0.1", "localhost")),
    ]))
    .await;
    let base = gw.url();
    let before = slot_status(&base, "router").await["active"]["sha256"].clone();

    // Refused at upload, with a reason; nothing changes.
    let (status, body) =
        upload_plugin(&base, "router", b"\0asm garbage, not a component", "").await;
    assert_eq!(status, 400, "{body}");
    error_of(&body.to_string());
    let (status, body) =
        upload_plugin(&base, "router", garage_plugins::fixtures::WRONG_WORLD, "").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("router"), "{body}");
    let (status, _) = upload_plugin(
        &base,
        "no-such-slot",
        garage_plugins::ROUTER_ROUND_ROBIN,
        "",
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(
        slot_status(&base, "router").await["active"]["sha256"],
        before
    );

    // Faulting on any call: refused by the trial call at upload, in the plugin's words where
    // it has some.
    for fixture in [
        garage_plugins::fixtures::INFINITE_LOOP,
        garage_plugins::fixtures::MEMORY_BOMB,
        garage_plugins::fixtures::TRAP,
    ] {
        let (status, body) = upload_plugin(&base, "router", fixture, "").await;
        assert_eq!(status, 400, "{body}");
        assert!(
            error_of(&body.to_string())["message"]
                .as_str()
                .unwrap()
                .contains("refused its configuration"),
            "{body}"
        );
    }
    assert_eq!(
        slot_status(&base, "router").await["active"]["sha256"],
        before
    );
}

/// With the trial at upload off, hostile components are accepted and contained at run time:
/// requests fall back to round robin and succeed, and repeated faults roll the slot back by
/// themselves.
#[tokio::test]
async fn hostile_components_are_contained_at_run_time() {
    let engine = fast_sim().await;
    let mut cfg = with_defaults(vec![
        upstream("a", engine.base_url()),
        upstream("b", engine.base_url().replace("127.0.0.1", "localhost")),
    ]);
    cfg.plugins.trial_at_upload = false;
    let gw = gateway(cfg).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "t"})).await;
    for fixture in [
        garage_plugins::fixtures::INFINITE_LOOP,
        garage_plugins::fixtures::MEMORY_BOMB,
        garage_plugins::fixtures::TRAP,
    ] {
        let (status, body) = upload_plugin(&base, "router", fixture, "").await;
        assert_eq!(status, 200, "{body}");
        let bad = body["sha256"].clone();
        for _ in 0..8 {
            let (status, body) = post_chat(&base, &key, &chat(false)).await;
            assert_eq!(status, 200, "{body}");
        }
        wait_until(Duration::from_secs(10), "automatic rollback", || async {
            let router = slot_status(&base, "router").await;
            router["active"]["sha256"] != bad
        })
        .await;
        let router = slot_status(&base, "router").await;
        assert_eq!(
            router["active"]["activated_by"], "auto-rollback",
            "{router}"
        );
    }
    let metrics = metrics_text(&base).await;
    assert!(
        metrics.contains("garage_plugin_faults_total"),
        "fault metrics missing"
    );
}

/// A rate limiter that faults refuses requests (fails closed) with a 503 from the plugin, not
/// the key's 429: `policy_unavailable`, retried by the SDKs after `retry-after`, and logged as
/// the plugin's failure; with `rate_limiter_fail_open` they pass.
#[tokio::test]
async fn a_faulting_rate_limiter_is_a_503_from_the_plugin_not_the_keys_limit() {
    let engine = fast_sim().await;
    for fail_open in [false, true] {
        let mut cfg = with_defaults(vec![upstream("a", engine.base_url())]);
        cfg.plugins.trial_at_upload = false;
        cfg.plugins.fault_threshold = 1000;
        cfg.plugins.rate_limiter_fail_open = fail_open;
        let gw = gateway(cfg).await;
        let base = gw.url();
        let (_, key) = create_key(&base, json!({"name": "t"})).await;
        // The limiter traps on an invalid config (its documented behaviour).
        let query = config_query(json!({"rpm": "x"}));
        let (status, body) =
            upload_plugin(&base, "rate-limiter", garage_plugins::RATE_LIMITER, &query).await;
        assert_eq!(status, 200, "{body}");
        let response = client()
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&chat(false))
            .send()
            .await
            .unwrap();
        if fail_open {
            assert_eq!(response.status(), 200);
            continue;
        }
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()["retry-after"], "1");
        assert_eq!(response.headers()["x-should-retry"], "true");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["error"]["code"], "policy_unavailable", "{body}");
        assert_eq!(body["error"]["type"], "server_error", "{body}");
        assert!(
            metrics_text(&base).await.contains(&format!(
                "garage_requests_total{{model=\"{MODEL}\",route=\"chat_completions\",status=\"503\"}} 1"
            )),
            "the refusal is counted"
        );
    }
}

#[tokio::test]
async fn rollback_activation_by_hash_canary_and_promotion() {
    let engine = fast_sim().await;
    let gw = gateway(with_defaults(vec![upstream("a", engine.base_url())])).await;
    let base = gw.url();
    let default = slot_status(&base, "router").await["active"]["sha256"].clone();
    let (_, rr) = upload_plugin(&base, "router", garage_plugins::ROUTER_ROUND_ROBIN, "").await;
    let (status, back) = admin_post(&base, "/admin/plugins/router/rollback", json!({})).await;
    assert_eq!(status, 200, "{back}");
    assert_eq!(back["sha256"], default);

    let (status, canary) = admin_post(
        &base,
        "/admin/plugins/router/activate",
        json!({"sha256": rr["sha256"], "canary_percent": 50}),
    )
    .await;
    assert_eq!(status, 200, "{canary}");
    let router = slot_status(&base, "router").await;
    assert_eq!(router["canary"]["sha256"], rr["sha256"], "{router}");
    assert_eq!(router["canary"]["percent"], 50);
    assert_eq!(router["active"]["sha256"], default);
    let (status, promoted) = admin_post(&base, "/admin/plugins/router/promote", json!({})).await;
    assert_eq!(status, 200, "{promoted}");
    assert_eq!(
        slot_status(&base, "router").await["active"]["sha256"],
        rr["sha256"]
    );

    let (status, _) = admin_post(
        &base,
        "/admin/plugins/router/activate",
        json!({"sha256": "00"}),
    )
    .await;
    assert_eq!(status, 404);
    let versions = admin_get(&base, "/admin/plugins/router/versions").await;
    assert!(versions.as_array().unwrap().len() >= 2, "{versions}");
    let refused = client()
        .get(format!("{base}/admin/plugins"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
}

/// The other replica follows by the store's event, not by its periodic re-read (turned off
/// here, so nothing else could bring the version). How fast it follows is bench/cluster.sh's to
/// measure; the bound only keeps a broken follower from hanging the suite.
#[tokio::test]
async fn an_activation_reaches_every_replica_by_its_event() {
    let redis = RedisServer::start();
    let engine = fast_sim().await;
    let replica = || {
        let mut cfg = with_defaults(vec![upstream("a", engine.base_url())]);
        cfg.store = redis.url();
        cfg.auth.key_secret = Some("s".into());
        cfg.plugins.resync_interval_secs = 0;
        cfg
    };
    let one = gateway(replica()).await;
    let two = gateway(replica()).await;
    let (status, body) = upload_plugin(
        &one.url(),
        "router",
        garage_plugins::ROUTER_PREFIX_AFFINITY,
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let started = Instant::now();
    wait_until(
        Duration::from_secs(30),
        "the other replica follows",
        || async { slot_status(&two.url(), "router").await["active"]["sha256"] == body["sha256"] },
    )
    .await;
    eprintln!(
        "activation reached the other replica in {:?}",
        started.elapsed()
    );
}

/// A reward plugin written in Python or JavaScript, built by `scripts/build-plugins-polyglot.sh`.
fn polyglot(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/polyglot-plugins")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|_| {
        panic!(
            "{} is missing: run scripts/build-plugins-polyglot.sh (scripts/test.sh does)",
            path.display()
        )
    })
}

#[tokio::test]
async fn rewards_in_rust_python_and_javascript_pay_the_rig_operator() {
    let gw = gateway(with_defaults(vec![])).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "t"})).await;
    let token = enrollment_token(&base, 1).await;
    let rig = sim_rig(rig_options(&base, "rig", &token), 0.0).await;
    wait_until(Duration::from_secs(10), "the rig in routing", || async {
        routable_rigs(&base).await == 1
    })
    .await;
    let points = || async {
        admin_get(&base, "/admin/rewards").await["data"][0]["points"]
            .as_f64()
            .unwrap_or(0.0)
    };
    // All three pay only verified, gateway-counted work unless told otherwise (the Python and
    // JavaScript ones are written against 0.5.0 with plugin-sdk's libraries): the rig is new
    // and no tokenizer is configured, so with their default config a request earns nothing.
    let pays_everyone =
        config_query(json!({"verified_only": false, "gateway_counted_only": false}));
    let plugins: [(&str, Vec<u8>); 3] = [
        ("rust", garage_plugins::REWARD.to_vec()),
        ("python", polyglot("reward-python.wasm")),
        ("javascript", polyglot("reward-js.wasm")),
    ];
    for (language, wasm) in plugins {
        let (status, body) = upload_plugin(&base, "reward", &wasm, "").await;
        assert_eq!(status, 200, "{language}: {body}");
        let before = points().await;
        let response = client()
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&chat(false))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let id = response.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        // The entry is written once the meter and the reward saw the request.
        let entry = ledger_entry(&base, &id).await;
        assert_eq!(
            entry["outcome"]["awards"],
            json!([]),
            "{language}: unverified work paid: {entry}"
        );
        assert_eq!(points().await, before, "{language}");

        let (status, body) = upload_plugin(&base, "reward", &wasm, &pays_everyone).await;
        assert_eq!(status, 200, "{language}: {body}");
        assert_eq!(post_chat(&base, &key, &chat(false)).await.0, 200);
        wait_until(
            Duration::from_secs(20),
            &format!("{language} reward points"),
            || async { points().await > before },
        )
        .await;
        let board = admin_get(&base, "/admin/rewards").await;
        assert_eq!(
            board["data"][0]["operator"], "op-test",
            "{language}: {board}"
        );
    }
    rig.shutdown().await;
}

/// A reward plugin that faults on rig reports delays the uptime points; it does not lose them.
#[tokio::test]
async fn rig_reports_wait_out_a_faulting_reward_plugin() {
    let mut cfg = with_defaults(vec![]);
    cfg.nodes.report_interval_secs = 1;
    // A plugin that faults on every call: the trial at upload would refuse it.
    cfg.plugins.trial_at_upload = false;
    let gw = gateway(cfg).await;
    let base = gw.url();
    // A negative rate is refused by the plugin on every call: a fault.
    let broken = config_query(json!({"points_per_uptime_hour": -1.0}));
    let (status, body) = upload_plugin(&base, "reward", garage_plugins::REWARD, &broken).await;
    assert_eq!(status, 200, "{body}");
    let token = enrollment_token(&base, 1).await;
    let rig = sim_rig(rig_options(&base, "patient-rig", &token), 0.0).await;

    let store = gw.state().store().clone();
    wait_until(Duration::from_secs(15), "two reports kept", || async {
        store
            .queue_counts("rig_report_queue")
            .await
            .unwrap()
            .waiting
            >= 2
    })
    .await;
    let board = admin_get(&base, "/admin/rewards").await;
    assert_eq!(
        board["data"],
        json!([]),
        "nothing credited while the plugin faults"
    );

    // Fixed: every kept report is credited, at one point per second of availability.
    let fixed = config_query(json!({"points_per_uptime_hour": 3600.0}));
    let (status, body) = upload_plugin(&base, "reward", garage_plugins::REWARD, &fixed).await;
    assert_eq!(status, 200, "{body}");
    wait_until(Duration::from_secs(15), "kept reports credited", || async {
        store
            .queue_counts("rig_report_queue")
            .await
            .unwrap()
            .waiting
            == 0
            && admin_get(&base, "/admin/rewards").await["data"][0]["points"].as_f64() >= Some(1.5)
    })
    .await;
    rig.shutdown().await;
}

#[tokio::test]
async fn rigs_earn_uptime_points_from_periodic_reports() {
    let mut cfg = with_defaults(vec![]);
    cfg.nodes.report_interval_secs = 1;
    let gw = gateway(cfg).await;
    let base = gw.url();
    // One point per second of availability.
    let query = config_query(json!({"points_per_uptime_hour": 3600.0}));
    let (status, body) = upload_plugin(&base, "reward", garage_plugins::REWARD, &query).await;
    assert_eq!(status, 200, "{body}");
    let token = enrollment_token(&base, 1).await;
    let rig = sim_rig(rig_options(&base, "idle-rig", &token), 0.0).await;
    // No request at all: the points are for being there.
    wait_until(Duration::from_secs(15), "uptime points", || async {
        let board = admin_get(&base, "/admin/rewards").await;
        board["data"][0]["operator"] == "op-test"
            && board["data"][0]["points"].as_f64() >= Some(1.0)
    })
    .await;
    rig.shutdown().await;
}

#[tokio::test]
async fn a_rigs_labels_reach_the_routers_description_of_it() {
    let gw = gateway(with_defaults(vec![])).await;
    let base = gw.url();
    let token = enrollment_token(&base, 1).await;
    let mut options = rig_options(&base, "eu-rig", &token);
    options.labels = [("region".to_owned(), "eu".to_owned())].into();
    let _rig = sim_rig(options, 0.0).await;
    let backends = gw.state().backends().clone();
    wait_until(
        Duration::from_secs(10),
        "the rig in routing with its labels",
        || {
            let backends = backends.clone();
            async move {
                backends.snapshot().all().iter().any(|b| {
                    let info = b.info.load();
                    // The rig's own labels, and the gateway's word on its trust.
                    info.rig == b.id
                        && info.labels
                            == [
                                ("region".to_owned(), "eu".to_owned()),
                                ("garage.trust".to_owned(), "unverified".to_owned()),
                            ]
                })
            }
        },
    )
    .await;
}

/// A key's budget alerts: as its daily spend passes 50, 80 and 100 % of the meter's daily
/// budget, a signed `budget.threshold` webhook for each, once (however many requests come
/// after), with the period's start in its id.
#[tokio::test]
async fn a_keys_budget_crossing_its_thresholds_sends_one_signed_alert_each() {
    use garage_gateway::webhooks::signing::SigningKey;
    let received: Arc<std::sync::Mutex<Vec<(http::HeaderMap, bytes::Bytes)>>> = Arc::default();
    let log = received.clone();
    let app = axum::Router::new().route(
        "/alerts",
        axum::routing::post(move |headers: http::HeaderMap, body: bytes::Bytes| {
            let log = log.clone();
            async move {
                log.lock().unwrap().push((headers, body));
                http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let receiver = format!("http://{}/alerts", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let engine = fast_sim().await;
    let mut cfg = with_defaults(vec![upstream("a", engine.base_url())]);
    cfg.webhooks.backoff_base_ms = 50;
    let gw = gateway(cfg).await;
    let base = gw.url();
    let created: serde_json::Value = client()
        .post(format!("{base}/admin/webhooks"))
        .bearer_auth(ADMIN)
        .json(&json!({"url": receiver, "events": ["budget.threshold"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key_secret = SigningKey::parse(created["secret"].as_str().unwrap()).unwrap();
    // One credit per 1,000 tokens; a request of the test's chat costs a little over 0.01.
    let query = config_query(json!({"period_budgets": {"day": 0.05}}));
    let (status, body) = upload_plugin(&base, "meter", garage_plugins::METER, &query).await;
    assert_eq!(status, 200, "{body}");
    let (key_id, key) = create_key(&base, json!({"name": "watched"})).await;
    // Until the budget is spent (and a few more, which cross nothing new).
    let (mut spent, mut served) = (false, 0);
    for _ in 0..30 {
        let (status, _) = post_chat(&base, &key, &chat(false)).await;
        if status == 429 {
            spent = true;
            break;
        }
        served += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(spent, "the daily budget was never spent");
    // Every request charged (so every alert there will be is queued), then every queued
    // alert delivered: what the receiver has is all it gets.
    let usage = format!("/admin/usage?key_id={key_id}");
    wait_until(Duration::from_secs(10), "every request charged", || async {
        let rows = admin_get(&base, &usage).await;
        let charged: u64 = rows["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| row["requests"].as_u64().unwrap())
            .sum();
        charged == served
    })
    .await;
    let deliveries = format!(
        "/admin/webhooks/{}/deliveries",
        created["id"].as_str().unwrap()
    );
    wait_until(Duration::from_secs(10), "every alert delivered", || async {
        let listed = admin_get(&base, &deliveries).await;
        let listed = listed["data"].as_array().unwrap().clone();
        !listed.is_empty()
            && listed.iter().all(|d| d["state"] == "delivered")
            && received.lock().unwrap().len() == listed.len()
    })
    .await;
    let received = received.lock().unwrap().clone();
    let mut percents = Vec::new();
    for (headers, body) in &received {
        let header = |name: &str| headers[name].to_str().unwrap().to_owned();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        key_secret
            .verify(
                &header("webhook-id"),
                &header("webhook-timestamp"),
                &header("webhook-signature"),
                body,
                now,
            )
            .expect("signed with the endpoint's secret");
        let event: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(event["type"], "dev.garage.budget.threshold", "{event}");
        assert_eq!(event["subject"], key_id.as_str(), "{event}");
        let data = &event["data"];
        assert_eq!(
            (data["scope"].as_str(), data["period"].as_str()),
            (Some("key"), Some("day"))
        );
        assert_eq!(data["budget"], 0.05);
        let start = data["period_start_ms"].as_u64().unwrap();
        assert_eq!(start % 86_400_000, 0, "UTC midnight: {event}");
        assert_eq!(
            event["id"],
            format!(
                "budget:key:{key_id}:day:{start}:{}",
                data["threshold_percent"]
            ),
        );
        percents.push(data["threshold_percent"].as_u64().unwrap());
    }
    percents.sort();
    assert_eq!(percents, [50, 80, 100], "each threshold once");
    server.abort();
}
