//! Replay and shadow: a candidate policy run over recorded calls (diffs checked against
//! hand-computed expectations), hostile candidates that must not hurt serving, the admin
//! routes' contract, and shadows under concurrent load that change nothing.

use std::sync::Arc;
use std::time::Duration;

use garage_gateway::plugins::replay::ReplayReport;
use garage_gateway::plugins::{
    Admission, Candidate, CandidateInfo, FaultCounts, PluginHost, PluginsConfig, QuotedPrice,
    RouteRequest, Slot, SlotLimits, Trust, UsageEvent,
};
use garage_gateway::store::{MemoryStore, Store};
use serde_json::json;

use crate::support::*;

fn host_config() -> PluginsConfig {
    // Generous deadlines: two cores shared by several test processes; deadlines have their own
    // tests (a looping candidate spends its deadline on each of the calls it faults on before
    // its replay stops). No trial call, so hostile fixtures reach the replay.
    let hot = SlotLimits {
        deadline_ms: Some(50),
        ..SlotLimits::default()
    };
    PluginsConfig {
        router: hot.clone(),
        rate_limiter: hot,
        max_instances: 64,
        resync_interval_secs: 0,
        trial_at_upload: false,
        ..PluginsConfig::default()
    }
}

async fn host() -> Arc<PluginHost> {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let host = PluginHost::new(store, host_config())
        .await
        .expect("plugin host starts");
    drop(host.spawn_background());
    host
}

async fn install(host: &PluginHost, slot: Slot, wasm: &[u8], config: serde_json::Value) {
    host.install(slot, wasm, &config.to_string(), "test")
        .await
        .expect("installs");
}

/// Three backends `a`, `b`, `c` of equal speed with `in_flight` requests each.
fn three(in_flight: [u32; 3]) -> (Vec<Candidate>, Vec<Arc<CandidateInfo>>) {
    let ids = ["a", "b", "c"];
    let list = ids
        .iter()
        .zip(in_flight)
        .map(|(id, in_flight)| Candidate {
            key: garage_gateway::plugins::candidate_key(id),
            in_flight,
            engine_running: 0,
            engine_waiting: 0,
            kv_cache_usage: 0.0,
            tokens_per_second: 10.0,
            latency_ms: 100.0,
            gpu_utilization: 0.5,
            gpu_memory_free_bytes: 8 << 30,
            trust: Trust::Verified,
        })
        .collect();
    let infos = ids
        .iter()
        .map(|id| {
            Arc::new(CandidateInfo {
                id: (*id).into(),
                rig: format!("rig-{id}"),
                operator: "op".into(),
                labels: vec![],
            })
        })
        .collect();
    (list, infos)
}

fn route_request() -> RouteRequest {
    RouteRequest {
        model: "m".into(),
        key_id: "key-1".into(),
        prefix_hash: 7,
        prompt_tokens: 10,
        max_tokens: 10,
        stream: false,
    }
}

/// Loads of the six recorded routing calls, and the backend least-loaded picks for each.
const LOADS: [([u32; 3], &str); 6] = [
    ([0, 1, 2], "a"),
    ([0, 1, 2], "a"),
    ([2, 0, 1], "b"),
    ([1, 2, 0], "c"),
    ([0, 1, 2], "a"),
    ([2, 0, 1], "b"),
];

async fn record_routes(host: &PluginHost) {
    for (loads, expected) in LOADS {
        let (list, infos) = three(loads);
        let order = host
            .route(crate::support::route_input(route_request(), &list, &infos))
            .await
            .expect("the router answers");
        assert_eq!(infos[order[0] as usize].id, expected, "least loaded first");
    }
}

fn moves(report: &ReplayReport) -> Vec<(String, String, u64)> {
    let mut moves: Vec<_> = report
        .diff
        .router
        .as_ref()
        .expect("a router diff")
        .moves
        .iter()
        .map(|m| (m.from.clone(), m.to.clone(), m.count))
        .collect();
    moves.sort();
    moves
}

#[tokio::test]
async fn round_robin_replayed_over_least_loaded_routes_moves_as_computed_by_hand() {
    let host = host().await;
    install(
        &host,
        Slot::Router,
        garage_plugins::ROUTER_LEAST_LOADED,
        json!({}),
    )
    .await;
    record_routes(&host).await;

    let report = host
        .replay(Slot::Router, garage_plugins::ROUTER_ROUND_ROBIN, "{}", 1000)
        .await
        .expect("replays");
    // Round robin from an empty scratch store starts at `a` and moves one further per call:
    // a b c a b c, against least-loaded's a a b c a b.
    assert_eq!(report.replayed, 6);
    let router = report.diff.router.as_ref().unwrap();
    assert_eq!((router.decisions, router.changed), (6, 5));
    assert_eq!(
        moves(&report),
        vec![
            ("a".into(), "b".into(), 2),
            ("b".into(), "c".into(), 2),
            ("c".into(), "a".into(), 1),
        ]
    );
    assert_eq!(router.examples.len(), 5);
    assert_eq!(
        (
            router.examples[0].from.as_str(),
            router.examples[0].to.as_str()
        ),
        ("a", "b")
    );
    assert_eq!(
        (report.diff.faults.active, report.diff.faults.candidate),
        (0, 0)
    );
    assert!(report.window.from_ms > 0 && report.window.from_ms <= report.window.to_ms);
    assert!(
        report.summary[0].starts_with("5 of 6 routing decisions"),
        "{:?}",
        report.summary
    );

    // `limit` takes the most recent calls: the last two are a→b and b→c.
    let last_two = host
        .replay(Slot::Router, garage_plugins::ROUTER_ROUND_ROBIN, "{}", 2)
        .await
        .unwrap();
    assert_eq!(last_two.replayed, 2);
    // Round robin starts over at `a` in its scratch store: a, b against a, b.
    assert_eq!(last_two.diff.router.unwrap().changed, 0);

    // The active version replayed against itself changes nothing.
    let same = host
        .replay(
            Slot::Router,
            garage_plugins::ROUTER_LEAST_LOADED,
            "{}",
            1000,
        )
        .await
        .unwrap();
    assert_eq!(same.diff.router.unwrap().changed, 0);
}

fn usage(id: &str, key: &str, prompt: u64, completion: u64) -> UsageEvent {
    UsageEvent {
        request_id: id.into(),
        key_id: key.into(),
        model: "m".into(),
        prompt_tokens: prompt,
        completion_tokens: completion,
        cached_tokens: 0,
        latency_ms: 10,
        ttft_ms: 5,
        backend: "a".into(),
        rig: "rig-a".into(),
        operator: "op".into(),
        started_at_ms: 1_795_329_644_000,
        finished_at_ms: 1_795_329_644_010,
        batch: false,
        counted_by: garage_gateway::plugins::CountedBy::Gateway,
        reported_prompt_tokens: Some(prompt),
        reported_completion_tokens: Some(completion),
        trust: Trust::Verified,
        // What the active meter quoted at admission: a replay charges each version by its
        // own table instead.
        price: Some(QuotedPrice {
            prompt_per_thousand: 1.0,
            completion_per_thousand: 2.0,
        }),
    }
}

#[tokio::test]
async fn a_meter_with_another_price_table_differs_per_key_as_computed_by_hand() {
    let host = host().await;
    let table = |prompt: f64| json!({"prices": {"m": {"prompt": prompt, "completion": 2.0}}});
    install(&host, Slot::Meter, garage_plugins::METER, table(1.0)).await;
    let events = [
        usage("r1", "key-a", 1000, 500),
        usage("r2", "key-a", 2000, 0),
        usage("r3", "key-b", 500, 1000),
    ];
    let charges = host.charge_many(&events).await.expect("a meter");
    assert!(charges.iter().all(Result::is_ok), "{charges:?}");

    let report = host
        .replay(
            Slot::Meter,
            garage_plugins::METER,
            &table(3.0).to_string(),
            1000,
        )
        .await
        .expect("replays");
    // Active (1 per 1k prompt, 2 per 1k completion): key-a 1+1 + 2 = 4, key-b 0.5+2 = 2.5.
    // Candidate (3 per 1k prompt): key-a 3+1 + 6 = 10, key-b 1.5+2 = 3.5.
    let meter = report.diff.meter.as_ref().expect("a meter diff");
    assert_eq!(meter.events, 3);
    let near = |a: f64, b: f64| (a - b).abs() < 1e-9;
    assert!(near(meter.active_total, 6.5), "{meter:?}");
    assert!(near(meter.candidate_total, 13.5), "{meter:?}");
    assert!(near(meter.delta, 7.0), "{meter:?}");
    let by: Vec<(&str, f64, f64, f64)> = meter
        .by
        .iter()
        .map(|b| (b.id.as_str(), b.active, b.candidate, b.delta))
        .collect();
    assert_eq!(by.len(), 2);
    assert_eq!(by[0].0, "key-a");
    assert!(
        near(by[0].1, 4.0) && near(by[0].2, 10.0) && near(by[0].3, 6.0),
        "{by:?}"
    );
    assert_eq!(by[1].0, "key-b");
    assert!(
        near(by[1].1, 2.5) && near(by[1].2, 3.5) && near(by[1].3, 1.0),
        "{by:?}"
    );
    assert!(
        report
            .summary
            .iter()
            .any(|line| line.contains("key key-a: 4.000000 → 10.000000 (+6.000000)")),
        "{:?}",
        report.summary
    );
}

fn admission(id: &str, key: &str) -> Admission {
    Admission {
        request_id: id.into(),
        key_id: key.into(),
        model: "m".into(),
        reserved_tokens: 20,
        key_metadata: "{}".into(),
    }
}

#[tokio::test]
async fn a_limiter_with_a_lower_rpm_newly_refuses_what_it_would_have_refused() {
    let host = host().await;
    // One window for the whole test, wherever the minute turns.
    let limits = |rpm: u32| json!({"rpm": rpm, "window_ms": 1_000_000_000_000u64}).to_string();
    host.install(
        Slot::RateLimiter,
        garage_plugins::RATE_LIMITER,
        &limits(10),
        "test",
    )
    .await
    .unwrap();
    for (i, key) in [
        "key-a", "key-a", "key-b", "key-a", "key-b", "key-a", "key-b", "key-a",
    ]
    .iter()
    .enumerate()
    {
        let decision = host
            .admit(&admission(&format!("r{i}"), key))
            .await
            .expect("a limiter");
        assert!(decision.allow, "under 10 rpm every request goes");
    }

    let report = host
        .replay(
            Slot::RateLimiter,
            garage_plugins::RATE_LIMITER,
            &limits(2),
            1000,
        )
        .await
        .expect("replays");
    // At 2 rpm: key-a's 5 requests keep 2 and lose 3, key-b's 3 keep 2 and lose 1.
    let limiter = report.diff.rate_limiter.as_ref().expect("a limiter diff");
    assert_eq!(
        (
            limiter.admissions,
            limiter.newly_refused,
            limiter.newly_allowed
        ),
        (8, 4, 0)
    );
    let keys: Vec<(&str, u64, u64)> = limiter
        .keys
        .iter()
        .map(|k| (k.key_id.as_str(), k.admissions, k.newly_refused))
        .collect();
    assert_eq!(keys, vec![("key-a", 5, 3), ("key-b", 3, 1)]);

    // The live limiter's counters were not touched by the replay: the next request still goes.
    assert!(host.admit(&admission("r9", "key-a")).await.unwrap().allow);
}

#[tokio::test]
async fn hostile_candidates_stop_their_replay_and_serving_goes_on() {
    let host = host().await;
    install(
        &host,
        Slot::Router,
        garage_plugins::ROUTER_LEAST_LOADED,
        json!({}),
    )
    .await;
    for _ in 0..5 {
        record_routes(&host).await;
    }
    for (name, wasm) in [
        ("loop", garage_plugins::fixtures::INFINITE_LOOP),
        ("memory bomb", garage_plugins::fixtures::MEMORY_BOMB),
        ("trap", garage_plugins::fixtures::TRAP),
    ] {
        let replaying = host.replay(Slot::Router, wasm, "{}", 1000);
        // Requests are routed by the active version while the candidate misbehaves.
        let serving = async {
            for _ in 0..20 {
                let (list, infos) = three([0, 1, 2]);
                let order = host
                    .route(crate::support::route_input(route_request(), &list, &infos))
                    .await;
                assert_eq!(
                    order.map(|o| o[0]),
                    Some(0),
                    "{name}: the active router decides"
                );
            }
        };
        let (report, ()) = tokio::join!(replaying, serving);
        let report = report.expect("a hostile candidate is a report, not an error");
        assert_eq!(report.diff.faults.active, 0, "{name}");
        assert_eq!(
            report.diff.faults.candidate, 16,
            "{name}: stops after 16 faults"
        );
        assert_eq!(report.replayed, 16, "{name}");
        assert!(
            report
                .summary
                .last()
                .unwrap()
                .contains("the replay stopped after 16 of"),
            "{name}: {:?}",
            report.summary
        );
    }
    // None of it counted against the active version.
    let router = host
        .status()
        .into_iter()
        .find(|s| s.slot == Slot::Router)
        .unwrap();
    assert_eq!(router.faults, FaultCounts::default());
}

#[tokio::test]
async fn replay_route_contract() {
    let engine = fast_sim().await;
    // Two backends: with one there is nothing to route.
    let mut cfg = config(vec![
        upstream("a", engine.base_url()),
        upstream("b", engine.base_url()),
    ]);
    cfg.plugins.trial_at_upload = true;
    let gw = gateway(cfg).await;
    let base = gw.url();
    let post = |path: String, wasm: &'static [u8]| {
        client()
            .post(format!("{base}{path}"))
            .bearer_auth(ADMIN)
            .header("content-type", "application/wasm")
            .body(wasm.to_vec())
            .send()
    };
    let rr = garage_plugins::ROUTER_ROUND_ROBIN;

    // No active router: nothing to compare with.
    let response = post("/admin/plugins/router/replay".into(), rr)
        .await
        .unwrap();
    assert_eq!(response.status(), 409);
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no active version"),
        "{body}"
    );

    let (status, _) = upload_plugin(&base, "router", garage_plugins::ROUTER_LEAST_LOADED, "").await;
    assert_eq!(status, 200);

    // Nothing recorded yet: a report of zero.
    let response = post("/admin/plugins/router/replay".into(), rr)
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let empty: ReplayReport = response.json().await.unwrap();
    assert_eq!(empty.replayed, 0);
    assert!(
        empty.summary[0].contains("nothing recorded"),
        "{:?}",
        empty.summary
    );

    let (_, key) = create_key(&base, json!({"name": "k"})).await;
    for _ in 0..3 {
        let (status, body) = post_chat(&base, &key, &chat(false)).await;
        assert_eq!(status, 200, "{body}");
    }
    let response = post("/admin/plugins/router/replay?limit=2".into(), rr)
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let report: serde_json::Value = response.json().await.unwrap();
    assert_eq!(report["slot"], "router");
    assert_eq!(report["replayed"], 2);
    assert_eq!(report["diff"]["router"]["decisions"], 2, "{report}");
    assert!(report["window"]["from_ms"].as_u64().unwrap() > 0);

    // Hostile input, each a clear OpenAI-shaped error.
    for (path, wasm, status, says) in [
        (
            "/admin/plugins/router/replay",
            garage_plugins::fixtures::WRONG_WORLD,
            400,
            "world",
        ),
        (
            "/admin/plugins/router/replay",
            b"not wasm at all".as_slice(),
            400,
            "invalid plugin",
        ),
        ("/admin/plugins/router/replay?limit=0", rr, 400, "limit"),
        ("/admin/plugins/router/replay?limit=10001", rr, 400, "limit"),
        ("/admin/plugins/router/replay?limit=lots", rr, 400, "limit"),
        (
            "/admin/plugins/router/replay?config=%7Bnope",
            rr,
            400,
            "JSON",
        ),
        (
            "/admin/plugins/nonsense/replay",
            rr,
            404,
            "unknown plugin slot",
        ),
        // The trial call with its configuration refuses a looping candidate before any replay.
        (
            "/admin/plugins/router/replay",
            garage_plugins::fixtures::INFINITE_LOOP,
            400,
            "refused",
        ),
    ] {
        let response = post(path.into(), wasm).await.unwrap();
        assert_eq!(response.status(), status, "{path}");
        let body: serde_json::Value = response.json().await.unwrap();
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{path}: {body}");
    }
    let response = client()
        .post(format!("{base}/admin/plugins/router/replay"))
        .body(rr.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);

    // A shadow's share is a percentage of live calls, 1 to 100.
    for share in ["0", "101", "300", "half"] {
        let response = client()
            .put(format!("{base}/admin/plugins/router/shadow?share={share}"))
            .bearer_auth(ADMIN)
            .header("content-type", "application/wasm")
            .body(rr.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "share={share}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert!(
            body["error"]["message"].as_str().unwrap().contains("share"),
            "{body}"
        );
    }

    // No shadow: GET and DELETE say so.
    for method in [reqwest::Method::GET, reqwest::Method::DELETE] {
        let response = client()
            .request(method.clone(), format!("{base}/admin/plugins/meter/shadow"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404, "{method}");
    }
}

async fn shadow_report(base: &str, slot: &str) -> serde_json::Value {
    admin_get(base, &format!("/admin/plugins/{slot}/shadow")).await
}

async fn put_shadow(base: &str, slot: &str, wasm: &[u8], config: serde_json::Value, share: u8) {
    let response = client()
        .put(format!(
            "{base}/admin/plugins/{slot}/shadow{}&share={share}",
            config_query(config)
        ))
        .bearer_auth(ADMIN)
        .header("content-type", "application/wasm")
        .body(wasm.to_vec())
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body = response.text().await.unwrap();
    assert_eq!(status, 200, "{slot}: {body}");
}

#[tokio::test]
async fn shadows_under_load_change_no_decision_and_fail_no_request() {
    let engine = fast_sim().await;
    // Two backends: with one there is nothing to route.
    let mut cfg = config(vec![
        upstream("a", engine.base_url()),
        upstream("b", engine.base_url()),
    ]);
    cfg.default_plugins = true;
    for slot in [&mut cfg.plugins.router, &mut cfg.plugins.rate_limiter] {
        slot.deadline_ms = Some(200);
    }
    // The looping router is the point of one shadow: no trial call to refuse it.
    cfg.plugins.trial_at_upload = false;
    let gw = gateway(cfg).await;
    let base = gw.url();

    // A meter charging 100 times the price, a limiter refusing everything, a router that loops.
    put_shadow(
        &base,
        "meter",
        garage_plugins::METER,
        json!({"default_price": {"prompt": 100.0, "completion": 100.0}}),
        100,
    )
    .await;
    put_shadow(
        &base,
        "rate-limiter",
        garage_plugins::RATE_LIMITER,
        json!({"rpm": 0}),
        100,
    )
    .await;
    put_shadow(
        &base,
        "router",
        garage_plugins::fixtures::INFINITE_LOOP,
        json!({}),
        100,
    )
    .await;

    let (key_id, key) = create_key(&base, json!({"name": "load"})).await;
    const REQUESTS: usize = 48;
    const AT_ONCE: usize = 8;
    let mut statuses = Vec::new();
    for _ in 0..REQUESTS / AT_ONCE {
        let wave: Vec<_> = (0..AT_ONCE)
            .map(|i| {
                let (base, key) = (base.clone(), key.clone());
                tokio::spawn(async move { post_chat(&base, &key, &chat(i % 2 == 0)).await })
            })
            .collect();
        for request in wave {
            statuses.push(request.await.unwrap().0);
        }
    }
    assert_eq!(statuses, vec![200; REQUESTS], "no request fails");

    // The shadow limiter saw every admission and would have refused each one.
    wait_until(
        Duration::from_secs(30),
        "the shadow limiter's admissions",
        || async {
            shadow_report(&base, "rate-limiter").await["diff"]["rate_limiter"]["admissions"]
                == REQUESTS
        },
    )
    .await;
    let limiter = shadow_report(&base, "rate-limiter").await;
    assert_eq!(
        limiter["diff"]["rate_limiter"]["newly_refused"], REQUESTS,
        "{limiter}"
    );
    assert_eq!(limiter["shadow"]["dropped"], 0);
    assert_eq!(limiter["shadow"]["share"], 100);

    // The ledger charged the active price; the shadow's hundredfold stayed in its diff.
    wait_until(
        Duration::from_secs(30),
        "every request charged and shadowed",
        || async {
            let usage = admin_get(&base, &format!("/admin/usage?key_id={key_id}")).await;
            let charged: u64 = usage["data"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|day| day["requests"].as_u64().unwrap_or(0))
                .sum();
            charged == REQUESTS as u64
                && shadow_report(&base, "meter").await["diff"]["meter"]["events"] == REQUESTS
        },
    )
    .await;
    let usage = admin_get(&base, &format!("/admin/usage?key_id={key_id}")).await;
    let ledger: f64 = usage["data"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|day| day["credits"].as_f64().unwrap())
        .sum();
    let meter = shadow_report(&base, "meter").await;
    let (live, shadow) = (
        meter["diff"]["meter"]["active_total"].as_f64().unwrap(),
        meter["diff"]["meter"]["candidate_total"].as_f64().unwrap(),
    );
    assert!(ledger > 0.0);
    assert!(
        (ledger - live).abs() < 1e-6 * ledger.max(1.0),
        "ledger {ledger}, live {live}"
    );
    assert!((shadow - 100.0 * live).abs() < 1e-6 * shadow, "{meter}");

    // The looping router stopped itself; routing went on with the active version.
    wait_until(
        Duration::from_secs(30),
        "the looping shadow to stop",
        || async { shadow_report(&base, "router").await["shadow"]["stopped"].is_string() },
    )
    .await;
    let router = shadow_report(&base, "router").await;
    assert_eq!(router["diff"]["faults"]["active"], 0, "{router}");

    // DELETE answers the final diff; then there is none.
    let response = client()
        .delete(format!("{base}/admin/plugins/meter/shadow"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let last: serde_json::Value = response.json().await.unwrap();
    assert_eq!(last["diff"]["meter"]["events"], REQUESTS);
    let response = client()
        .get(format!("{base}/admin/plugins/meter/shadow"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
}

/// Mean and p99 of `iterations` calls, after a tenth as many to warm up.
async fn timed<F, Fut>(iterations: usize, mut call: F) -> (Duration, Duration)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for _ in 0..iterations / 10 + 1 {
        call().await;
    }
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let started = std::time::Instant::now();
        call().await;
        samples.push(started.elapsed());
    }
    samples.sort();
    let mean = samples.iter().sum::<Duration>() / iterations as u32;
    (mean, samples[iterations * 99 / 100])
}

/// What recording and a shadow cost a routing call (100 candidates, least loaded), and a
/// request through the gateway under concurrent load with and without three shadows. Prints
/// figures (`docs/performance.md`); asserts only that every request succeeds:
/// `cargo test --release -p garage-gateway --test all cost_of_recording_and_shadows -- --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cost_of_recording_and_shadows() {
    let iterations = if cfg!(debug_assertions) { 50 } else { 20_000 };
    let infos: Vec<Arc<CandidateInfo>> = (0..100)
        .map(|i| {
            Arc::new(CandidateInfo {
                id: format!("rig-{i}"),
                rig: format!("rig-{i}"),
                operator: "op".into(),
                labels: vec![],
            })
        })
        .collect();
    let list: Vec<Candidate> = (0..100u32)
        .map(|i| Candidate {
            in_flight: i % 5,
            tokens_per_second: 40.0 + i as f32,
            ..three([0, 0, 0]).0[0]
        })
        .collect();
    for (what, record_calls, shadow) in [
        ("no recording", 0, false),
        ("recording every call", 2000, false),
        ("recording + shadow", 2000, true),
        ("no recording (again)", 0, false),
    ] {
        let config = PluginsConfig {
            record_calls,
            ..host_config()
        };
        let host = PluginHost::new(Arc::new(MemoryStore::new()), config)
            .await
            .unwrap();
        install(
            &host,
            Slot::Router,
            garage_plugins::ROUTER_LEAST_LOADED,
            json!({}),
        )
        .await;
        if shadow {
            host.start_shadow(Slot::Router, garage_plugins::ROUTER_ROUND_ROBIN, "{}", 100)
                .await
                .unwrap();
        }
        let (mean, p99) = timed(iterations, || async {
            assert!(
                host.route(crate::support::route_input(route_request(), &list, &infos))
                    .await
                    .is_some()
            );
        })
        .await;
        println!("route, 100 candidates, {what:<22} mean {mean:>9.1?}  p99 {p99:>9.1?}");
    }

    let engine = fast_sim().await;
    let requests = if cfg!(debug_assertions) { 40 } else { 2000 };
    // Shadows on three slots taking every live call, or one in ten (`?share=10`).
    for share in [0, 100, 10, 0, 100, 10] {
        let shadows = share > 0;
        let mut cfg = config(vec![
            upstream("a", engine.base_url()),
            upstream("b", engine.base_url()),
        ]);
        cfg.default_plugins = true;
        let gw = gateway(cfg).await;
        let base = gw.url();
        if shadows {
            put_shadow(
                &base,
                "meter",
                garage_plugins::METER,
                json!({"default_price": {"prompt": 100.0, "completion": 100.0}}),
                share,
            )
            .await;
            put_shadow(
                &base,
                "rate-limiter",
                garage_plugins::RATE_LIMITER,
                json!({"rpm": 0}),
                share,
            )
            .await;
            put_shadow(
                &base,
                "router",
                garage_plugins::ROUTER_ROUND_ROBIN,
                json!({}),
                share,
            )
            .await;
        }
        let (_, key) = create_key(&base, json!({"name": "bench"})).await;
        let started = std::time::Instant::now();
        let workers: Vec<_> = (0..8)
            .map(|_| {
                let (base, key) = (base.clone(), key.clone());
                tokio::spawn(async move {
                    let mut samples = Vec::new();
                    for _ in 0..requests / 8 {
                        let t = std::time::Instant::now();
                        let (status, body) = post_chat(&base, &key, &chat(false)).await;
                        assert_eq!(status, 200, "{body}");
                        samples.push(t.elapsed());
                    }
                    samples
                })
            })
            .collect();
        let mut samples = Vec::new();
        for worker in workers {
            samples.extend(worker.await.unwrap());
        }
        let elapsed = started.elapsed();
        samples.sort();
        let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
        let p99 = samples[samples.len() * 99 / 100];
        let dropped = if shadows {
            let router = shadow_report(&base, "router").await;
            format!(
                "router shadow dropped {} of {}",
                router["shadow"]["dropped"],
                samples.len()
            )
        } else {
            String::new()
        };
        println!(
            "{} requests, 8 at once, shadow share {share:>3} % {:>7.0} req/s  mean {mean:>9.1?}  p99 {p99:>9.1?}  {dropped}",
            samples.len(),
            samples.len() as f64 / elapsed.as_secs_f64(),
        );
    }
}

#[tokio::test]
async fn recording_settings_out_of_bounds_are_refused_by_name() {
    for (config, says) in [
        (
            PluginsConfig {
                record_calls: 10_001,
                ..host_config()
            },
            "plugins.record_calls must be at most 10000",
        ),
        (
            PluginsConfig {
                record_every: 0,
                ..host_config()
            },
            "plugins.record_every must be at least 1",
        ),
    ] {
        let err = PluginHost::new(Arc::new(MemoryStore::new()), config)
            .await
            .err()
            .expect("refused");
        assert!(err.to_string().contains(says), "{err}");
    }
    // Zero records nothing: a replay then has nothing to compare.
    let host = PluginHost::new(
        Arc::new(MemoryStore::new()),
        PluginsConfig {
            record_calls: 0,
            ..host_config()
        },
    )
    .await
    .unwrap();
    install(
        &host,
        Slot::Router,
        garage_plugins::ROUTER_LEAST_LOADED,
        json!({}),
    )
    .await;
    record_routes(&host).await;
    let report = host
        .replay(Slot::Router, garage_plugins::ROUTER_ROUND_ROBIN, "{}", 1000)
        .await
        .unwrap();
    assert_eq!(report.replayed, 0);
}
