//! `garage:policy@0.6.0`'s router: candidates as columns, an answer of the best few. Routers of
//! 0.6.0 (the defaults, a fixture that answers what it is told) beside one of 0.4.0 built
//! without the SDK (candidate records), through the real plugin host; and the cost of a route
//! call over 100 and 1,000 candidates for both contracts, in one run (printed, not asserted:
//! `cargo test --release -p garage-gateway --test all router_columns -- --nocapture`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use garage_gateway::inference::policy;
use garage_gateway::plugins::{
    Candidate, CandidateInfo, Isolation, PluginHost, PluginsConfig, RouteRequest, Slot, SlotLimits,
    SlotStatus, Trust, candidate_key,
};
use garage_gateway::store::MemoryStore;
use garage_plugins::fixtures::{ROUTER_SAYS, ROUTER_V0_4};
use garage_plugins::{ROUTER_LEAST_LOADED, ROUTER_ROUND_ROBIN};

/// Warm instances (the default), generous deadlines for a debug build on a busy machine, no
/// trial call at upload (the hostile answers would be refused there), no resync.
async fn host() -> Arc<PluginHost> {
    host_recording(PluginsConfig::default().record_calls).await
}

/// [`host`], keeping the last `record_calls` calls for replay (0: none).
async fn host_recording(record_calls: usize) -> Arc<PluginHost> {
    let hot = SlotLimits {
        deadline_ms: Some(500),
        isolation: Isolation::Warm,
        ..SlotLimits::default()
    };
    let config = PluginsConfig {
        router: hot,
        max_instances: 16,
        resync_interval_secs: 0,
        trial_at_upload: false,
        record_calls,
        ..PluginsConfig::default()
    };
    let host = PluginHost::new(Arc::new(MemoryStore::new()), config)
        .await
        .expect("plugin host starts");
    drop(host.spawn_background());
    host
}

fn status(host: &PluginHost) -> SlotStatus {
    host.status()
        .into_iter()
        .find(|s| s.slot == Slot::Router)
        .expect("the router slot has a status")
}

fn request() -> RouteRequest {
    RouteRequest {
        model: "m".into(),
        key_id: "key-1".into(),
        prefix_hash: 7,
        prompt_tokens: 100,
        max_tokens: 64,
        stream: false,
    }
}

/// `n` candidates, every field distinct per candidate, the even ones labelled `region: eu`.
fn candidates(n: usize) -> (Vec<Candidate>, Vec<Arc<CandidateInfo>>) {
    let list = (0..n)
        .map(|i| Candidate {
            key: candidate_key(&format!("rig-{i}")),
            in_flight: (i % 5) as u32,
            engine_running: (i % 3) as u32,
            engine_waiting: (i % 4) as u32,
            kv_cache_usage: (i % 10) as f32 / 10.0,
            tokens_per_second: 40.0 + (i % 17) as f32,
            latency_ms: 100.0 + (i % 13) as f32,
            gpu_utilization: 0.5,
            gpu_memory_free_bytes: ((i * 7919) % 1000) as u64 * (1 << 30),
            trust: [Trust::Verified, Trust::Unverified, Trust::Suspect][i % 3],
        })
        .collect();
    let infos = (0..n)
        .map(|i| {
            Arc::new(CandidateInfo {
                id: format!("rig-{i}"),
                rig: format!("rig-{i}"),
                operator: format!("operator-{}", i % 7),
                labels: vec![("region".into(), if i % 2 == 0 { "eu" } else { "us" }.into())],
            })
        })
        .collect();
    (list, infos)
}

/// A candidate's score under the default least-loaded router: seconds of work queued.
fn seconds_of_work(c: &Candidate, unknown_speed: f64) -> f64 {
    let speed = if c.tokens_per_second > 0.0 {
        f64::from(c.tokens_per_second)
    } else {
        unknown_speed
    };
    let load = u64::from(c.in_flight) + u64::from(c.engine_running) + u64::from(c.engine_waiting);
    (load + 1) as f64 / speed
}

#[tokio::test]
async fn every_column_reaches_a_0_6_router_value_for_value() {
    let host = host().await;
    host.install(Slot::Router, ROUTER_SAYS, "{}", "test")
        .await
        .unwrap();
    for n in [2, 100, 1000] {
        let (list, infos) = candidates(n);
        let order = host
            .route(crate::support::route_input(request(), &list, &infos))
            .await
            .unwrap();
        // The fixture answers the most free GPU memory (a u64 column), then the verified
        // candidate (the u8 trust column) with the largest key (the u64 key column).
        let most_memory = (0..n)
            .max_by_key(|&i| list[i].gpu_memory_free_bytes)
            .unwrap();
        let verified = (0..n)
            .filter(|&i| list[i].trust == Trust::Verified && i != most_memory)
            .max_by_key(|&i| list[i].key)
            .unwrap();
        assert_eq!(
            order,
            [most_memory as u32, verified as u32],
            "{n} candidates"
        );
    }
    assert_eq!(status(&host).faults.bad_output, 0);
}

#[tokio::test]
async fn the_least_loaded_router_of_0_6_answers_the_best_eight_in_order() {
    let host = host().await;
    host.install(Slot::Router, ROUTER_LEAST_LOADED, "{}", "test")
        .await
        .unwrap();
    for n in [3, 100, 1000] {
        let (list, infos) = candidates(n);
        let order = host
            .route(crate::support::route_input(request(), &list, &infos))
            .await
            .unwrap();
        // Every speed is measured here, so no median is involved.
        let mut expected: Vec<u32> = (0..n as u32).collect();
        expected.sort_by(|&a, &b| {
            let (a, b) = (&list[a as usize], &list[b as usize]);
            seconds_of_work(a, 1.0)
                .total_cmp(&seconds_of_work(b, 1.0))
                .then(a.kv_cache_usage.total_cmp(&b.kv_cache_usage))
        });
        expected.truncate(8);
        assert_eq!(order, expected, "{n} candidates");
    }
    // With `prefer_trusted` the trust column counts: the first are verified (every third).
    host.install(
        Slot::Router,
        ROUTER_LEAST_LOADED,
        r#"{"prefer_trusted": true, "top": 3}"#,
        "test",
    )
    .await
    .unwrap();
    let (list, infos) = candidates(100);
    let order = host
        .route(crate::support::route_input(request(), &list, &infos))
        .await
        .unwrap();
    assert_eq!(order.len(), 3);
    assert!(order.iter().all(|&i| i % 3 == 0), "{order:?}");
}

/// A router of 0.6.0 that asks who the candidates are (`candidates.describe`) still can.
#[tokio::test]
async fn a_0_6_router_reads_candidates_describe() {
    let host = host().await;
    host.install(
        Slot::Router,
        ROUTER_LEAST_LOADED,
        r#"{"prefer": {"region": "eu"}, "top": 60}"#,
        "test",
    )
    .await
    .unwrap();
    let (list, infos) = candidates(100);
    let order = host
        .route(crate::support::route_input(request(), &list, &infos))
        .await
        .unwrap();
    assert_eq!(order.len(), 60);
    // The 50 eu (even) candidates first, then the best 10 of the others as fallbacks.
    assert!(order[..50].iter().all(|i| i % 2 == 0), "{order:?}");
    assert!(order[50..].iter().all(|i| i % 2 == 1), "{order:?}");
    assert_eq!(status(&host).faults.plugin_error, 0);
}

/// A router of 0.4.0, built before columns, loads and routes on candidate records converted
/// from the host's, trust included.
#[tokio::test]
async fn a_router_of_0_4_still_routes_on_records() {
    let host = host().await;
    host.install(Slot::Router, ROUTER_V0_4, "{}", "test")
        .await
        .unwrap();
    let (mut list, infos) = candidates(4);
    for c in &mut list {
        (c.in_flight, c.engine_running, c.engine_waiting) = (0, 0, 0);
        c.tokens_per_second = 10.0;
        c.trust = Trust::Unverified;
    }
    list[0].in_flight = 3; // 4 / 10
    list[1].in_flight = 1; // 2 / 10
    list[2].in_flight = 2; // 3 / 10, halved when verified: 1.5 / 10
    list[3].in_flight = 5; // 6 / 10
    assert_eq!(
        host.route(crate::support::route_input(request(), &list, &infos))
            .await,
        Some(vec![1, 2, 0, 3])
    );
    list[2].trust = Trust::Verified;
    assert_eq!(
        host.route(crate::support::route_input(request(), &list, &infos))
            .await,
        Some(vec![2, 1, 0, 3])
    );
    assert_eq!(status(&host).faults, Default::default());
}

/// An answer out of range, with an index repeated, or empty is a fault; the host falls back
/// to the built-in round robin (`None`) for that request.
#[tokio::test]
async fn a_0_6_router_answering_nonsense_falls_back_and_is_counted() {
    let host = host().await;
    let (list, infos) = candidates(3);
    for (answer, kind) in [
        ("[3]", "out of range"),
        ("[1, 1]", "repeated"),
        ("[]", "empty"),
    ] {
        let config = format!(r#"{{"answer": {answer}}}"#);
        host.install(Slot::Router, ROUTER_SAYS, &config, "test")
            .await
            .unwrap();
        assert_eq!(
            host.route(crate::support::route_input(request(), &list, &infos))
                .await,
            None,
            "{kind}"
        );
    }
    // Leaving candidates out is not: the host tries the ones named, in that order.
    host.install(Slot::Router, ROUTER_SAYS, r#"{"answer": [2]}"#, "test")
        .await
        .unwrap();
    assert_eq!(
        host.route(crate::support::route_input(request(), &list, &infos))
            .await,
        Some(vec![2])
    );
    let faults = status(&host).faults;
    assert_eq!(faults.bad_output, 3, "{faults:?}");
}

/// Recorded route calls (rows) replay through routers of either contract: a 0.6.0 candidate
/// (columns) against a 0.4.0 active version (records), and the other way round.
#[tokio::test]
async fn recorded_routes_replay_through_both_contracts() {
    let host = host().await;
    host.install(Slot::Router, ROUTER_V0_4, "{}", "test")
        .await
        .unwrap();
    let (list, infos) = candidates(50);
    for _ in 0..5 {
        let live = host
            .route(crate::support::route_input(request(), &list, &infos))
            .await
            .unwrap();
        assert_ne!(
            live[0], 1,
            "the fixture's first choice is not the one `answer` names"
        );
    }
    let answer_one = r#"{"answer": [1]}"#;
    let report = host
        .replay(Slot::Router, ROUTER_SAYS, answer_one, 100)
        .await
        .unwrap();
    let diff = report.diff.router.expect("a router diff");
    assert_eq!((report.replayed, diff.decisions, diff.changed), (5, 5, 5));
    assert_eq!(
        (report.diff.faults.active, report.diff.faults.candidate),
        (0, 0)
    );

    host.install(Slot::Router, ROUTER_SAYS, answer_one, "test")
        .await
        .unwrap();
    let report = host
        .replay(Slot::Router, ROUTER_V0_4, "{}", 100)
        .await
        .unwrap();
    let diff = report.diff.router.expect("a router diff");
    assert!(report.replayed >= 5, "{} replayed", report.replayed);
    assert_eq!(diff.changed, diff.decisions);
    assert_eq!(
        (report.diff.faults.active, report.diff.faults.candidate),
        (0, 0)
    );
}

/// The gateway's input to a router is read from the backends at each request, index for index
/// with the window it was handed: a backend's numbers changed between two requests reach the
/// router at the second, one cooled down leaves the window, and who a candidate is
/// (`candidates.describe`) is always the candidate at that index, however the window rotates.
#[tokio::test]
async fn the_routers_input_is_the_windows_backends_as_they_are_now() {
    let backends = fleet(5);
    let set = backends.snapshot();
    let model = crate::support::MODEL;
    let facts = policy::RequestFacts {
        prefix_hash: 7,
        prompt_tokens: 100,
        max_tokens: 64,
    };
    let aligned = |candidates: &[Arc<garage_gateway::backends::Backend>]| {
        let input = policy::route_input("key-1", model, true, &facts, candidates);
        assert_eq!(input.candidates.len(), candidates.len());
        assert_eq!(input.infos.len(), candidates.len());
        for ((backend, row), info) in candidates.iter().zip(&input.candidates).zip(&*input.infos) {
            assert_eq!(row.key, backend.key);
            assert_eq!(row.key, candidate_key(&backend.id));
            assert_eq!(info.id, backend.id);
        }
        assert_eq!(input.request.model, model);
        assert!(input.request.stream);
        input
    };
    // Every rotation of the window stays aligned.
    let mut firsts = Vec::new();
    for _ in 0..5 {
        let window = set.candidates(model).unwrap();
        aligned(&window);
        firsts.push(window[0].id.clone());
    }
    firsts.sort();
    firsts.dedup();
    assert_eq!(firsts.len(), 5, "the window rotates: {firsts:?}");

    // Numbers that change between two requests are the second request's.
    let window = set.candidates(model).unwrap();
    let busy = window[2].track();
    let also = window[2].track();
    window[3].observe(Duration::from_millis(40), Duration::from_secs(1), 50);
    let input = aligned(&window);
    assert_eq!(input.candidates[2].in_flight, 2);
    assert_eq!(input.candidates[3].latency_ms, 40.0);
    assert_eq!(input.candidates[3].tokens_per_second, 50.0);
    assert!(
        input
            .candidates
            .iter()
            .enumerate()
            .all(|(i, c)| i == 2 || c.in_flight == 0)
    );
    drop((busy, also));
    let input = aligned(&window);
    assert_eq!(
        input.candidates[2].in_flight, 0,
        "requests that ended are not counted"
    );

    // A backend cooled down is not in the next window, and no row or info stands for it.
    let gone = window[1].clone();
    gone.cool_down(Duration::from_secs(60));
    for _ in 0..5 {
        let window = set.candidates(model).unwrap();
        assert_eq!(window.len(), 4);
        let input = aligned(&window);
        assert!(input.candidates.iter().all(|c| c.key != gone.key));
        assert!(input.infos.iter().all(|info| info.id != gone.id));
    }
}

/// The cost of a warm route call over 100 and 1,000 candidates: records (0.4.0, every index
/// answered after a sort) beside columns (0.6.0's least-loaded, the best 8 in one pass, and
/// round robin, every index), with every call recorded for replay (the default) and without.
/// Printed; run in release to read real numbers.
#[tokio::test]
async fn route_cost_records_against_columns() {
    let iterations = if cfg!(debug_assertions) { 20 } else { 2000 };
    let recording = host().await;
    let not_recording = host_recording(0).await;
    let hundred = candidates(100);
    let thousand = candidates(1000);
    for (name, router, host) in [
        ("0.4.0 records, sorts all", ROUTER_V0_4, &recording),
        ("0.6.0 least-loaded", ROUTER_LEAST_LOADED, &recording),
        ("0.6.0 round-robin", ROUTER_ROUND_ROBIN, &recording),
        ("0.4.0, not recording", ROUTER_V0_4, &not_recording),
        (
            "0.6.0 l-l, not recording",
            ROUTER_LEAST_LOADED,
            &not_recording,
        ),
    ] {
        host.install(Slot::Router, router, "{}", "bench")
            .await
            .unwrap();
        for (n, (list, infos), iterations) in [
            (100, &hundred, iterations),
            (1000, &thousand, iterations / 4),
        ] {
            // Built once, as the gateway builds it once per request: what is measured is the call.
            let input = crate::support::route_input(request(), list, infos);
            let stats = measure(iterations, || async {
                assert!(host.route(input.clone()).await.is_some());
            })
            .await;
            println!("{name:<26} {n:>4} candidates  {stats}");
        }
    }
    for host in [&recording, &not_recording] {
        assert_eq!(status(host).faults, Default::default());
    }
}

/// Where a route call's time goes, at 4, 100 and 1,000 candidates, warm, recording every call
/// (the default): a router that reads nothing and answers one index (the host's columns,
/// their copy into the guest, the call and its answer), the default least-loaded router (that
/// and its scan of every candidate), round robin (that and an answer of every index); then
/// the gateway's whole route step over a fleet of that many upstreams serving one model (the
/// healthy window of candidates, the rows the router is handed, the call, the answer mapped
/// back to backends). Printed, not asserted: `cargo test --release -p garage-gateway --test
/// all router_columns::route_cost_by_step -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "a measurement: run in release with --ignored --nocapture"]
async fn route_cost_by_step() {
    let iterations = if cfg!(debug_assertions) { 20 } else { 4000 };
    let host = host().await;
    let fleets = [4, 100, 1000].map(|n| (n, candidates(n)));
    for (name, router, config) in [
        (
            "answers [0], reads nothing",
            ROUTER_SAYS,
            r#"{"answer": [0]}"#,
        ),
        ("least-loaded", ROUTER_LEAST_LOADED, "{}"),
        ("round-robin", ROUTER_ROUND_ROBIN, "{}"),
    ] {
        host.install(Slot::Router, router, config, "bench")
            .await
            .unwrap();
        for (n, (list, infos)) in &fleets {
            let input = crate::support::route_input(request(), list, infos);
            let stats = measure(iterations, || async {
                assert!(host.route(input.clone()).await.is_some());
            })
            .await;
            println!("call, {name:<26} {n:>4} candidates  {stats}");
        }
    }
    host.install(Slot::Router, ROUTER_LEAST_LOADED, "{}", "bench")
        .await
        .unwrap();
    let facts = policy::RequestFacts {
        prefix_hash: 7,
        prompt_tokens: 100,
        max_tokens: 64,
    };
    for n in [4, 100, 1000] {
        let backends = fleet(n);
        let set = backends.snapshot();
        let model = crate::support::MODEL;
        let offered = set.candidates(model).unwrap().len();
        let window = measure(iterations, || async {
            assert!(set.candidates(model).unwrap().len() >= 4.min(n));
        })
        .await;
        println!("gateway's window alone,  {n:>4} upstreams ({offered:>3} offered)  {window}");
        let input = measure(iterations, || async {
            let candidates = set.candidates(model).unwrap();
            let input = policy::route_input("key-1", model, false, &facts, &candidates);
            assert_eq!(input.infos.len(), candidates.len());
        })
        .await;
        println!("... and the router's input, {n:>4} upstreams ({offered:>3} offered)  {input}");
        let stats = measure(iterations, || async {
            let candidates = set.candidates(model).unwrap();
            let order = policy::order(&host, "key-1", model, false, &facts, candidates).await;
            assert_eq!(order.len(), 8.min(n));
        })
        .await;
        println!("gateway's route step, {n:>4} upstreams ({offered:>3} offered)  {stats}");
    }
    assert_eq!(status(&host).faults, Default::default());
}

async fn measure<F, Fut>(iterations: usize, mut call: F) -> String
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for _ in 0..iterations / 10 + 1 {
        call().await;
    }
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        tokio::task::yield_now().await;
        let started = Instant::now();
        call().await;
        samples.push(started.elapsed());
    }
    samples.sort();
    let mean = samples.iter().sum::<Duration>() / iterations as u32;
    let p50 = samples[iterations / 2];
    let p99 = samples[iterations * 99 / 100];
    format!("mean {mean:>9.1?}  p50 {p50:>9.1?}  p99 {p99:>9.1?}")
}

/// `n` upstreams serving the test model, named `rig-<i>`, never dialled.
fn fleet(n: usize) -> garage_gateway::backends::Backends {
    let dispatch = garage_gateway::config::DispatchConfig::default();
    let client = Arc::new(garage_gateway::upstream::http_client(&dispatch, None).unwrap());
    let upstreams: Vec<_> = (0..n)
        .map(|i| {
            crate::support::upstream(&format!("rig-{i}"), format!("http://rig-{i}.invalid/v1"))
        })
        .collect();
    garage_gateway::backends::Backends::from_upstreams(&upstreams, |_| {
        Ok::<_, ()>(Arc::clone(&client))
    })
    .unwrap()
}
