//! The plugin host against real components: the default plugins, the hostile fixtures (infinite
//! loop, memory bomb, trap, wrong world, huge output), hand-written components (forbidden
//! imports, a WASI probe), rollback and canaries, replicas following each other through the
//! store, and per-call latency (printed; run in release with `--nocapture` to read it).
//!
//! `cargo test --release -p garage-gateway --test plugin_host -- --nocapture`

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::{RedisServer, wait_until};
use garage_gateway::plugins::{
    Admission, Candidate, CandidateInfo, FaultKind, Isolation, PluginError, PluginHost,
    PluginsConfig, RigReport, RouteRequest, Settlement, Slot, SlotLimits, SlotStatus, UsageEvent,
};
use garage_gateway::store::{MemoryStore, RedisStore, Store};
use sha2::{Digest, Sha256};

/// The default plugins and the hostile fixtures, built from `plugins/guests/`.
mod components {
    pub use garage_plugins::fixtures::{
        HUGE_OUTPUT, INFINITE_LOOP, MEMORY_BOMB, METER_V0_3, METER_V0_4, PICKY_METER, TRAP,
        WRONG_WORLD,
    };
    pub use garage_plugins::{
        METER, RATE_LIMITER, REWARD, ROUTER_LEAST_LOADED, ROUTER_PREFIX_AFFINITY,
        ROUTER_ROUND_ROBIN,
    };
}

/// A config for tests: a small instance pool (many hosts live in one test process), generous
/// deadlines on the hot path (a debug build on a busy 2-core machine), no periodic resync.
fn config() -> PluginsConfig {
    let hot = SlotLimits {
        deadline_ms: Some(200),
        ..SlotLimits::default()
    };
    PluginsConfig {
        router: hot.clone(),
        rate_limiter: hot,
        max_instances: 32,
        resync_interval_secs: 0,
        // The fixtures fault on every call, and these tests are about what happens when they
        // do: the trial call at upload would refuse them (its own test is below).
        trial_at_upload: false,
        ..PluginsConfig::default()
    }
}

async fn host_with(store: Arc<dyn Store>, config: PluginsConfig) -> Arc<PluginHost> {
    let host = PluginHost::new(store, config)
        .await
        .expect("plugin host starts");
    // Dropped tasks keep running; they stop with the host.
    drop(host.spawn_background());
    host
}

async fn host() -> (Arc<PluginHost>, Arc<dyn Store>) {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    (host_with(store.clone(), config()).await, store)
}

fn sha256(wasm: &[u8]) -> String {
    hex::encode(Sha256::digest(wasm))
}

fn status(host: &PluginHost, slot: Slot) -> SlotStatus {
    host.status()
        .into_iter()
        .find(|s| s.slot == slot)
        .expect("every slot has a status")
}

fn active_sha(host: &PluginHost, slot: Slot) -> Option<String> {
    status(host, slot).active.map(|v| v.sha256)
}

fn request(model: &str) -> RouteRequest {
    RouteRequest {
        model: model.into(),
        key_id: "key-1".into(),
        prefix_hash: 0x1234_5678_9abc_def0,
        prompt_tokens: 120,
        max_tokens: 256,
        stream: true,
    }
}

/// Candidates for a `route` call: their numbers, and who they are (index for index).
#[derive(Clone)]
struct Cands {
    list: Vec<Candidate>,
    infos: Vec<Arc<CandidateInfo>>,
}

async fn route(host: &PluginHost, model: &str, cands: &Cands) -> Option<Vec<u32>> {
    host.route(crate::support::route_input(
        request(model),
        &cands.list,
        &cands.infos,
    ))
    .await
}

fn candidates(n: usize) -> Cands {
    let infos = (0..n)
        .map(|i| {
            Arc::new(CandidateInfo {
                id: format!("rig-{i}"),
                rig: format!("rig-{i}"),
                operator: format!("operator-{}", i % 7),
                labels: vec![
                    ("region".into(), if i % 2 == 0 { "eu" } else { "us" }.into()),
                    ("gpu".into(), "4090".into()),
                ],
            })
        })
        .collect();
    let list = (0..n)
        .map(|i| Candidate {
            key: garage_gateway::plugins::candidate_key(&format!("rig-{i}")),
            in_flight: (i % 5) as u32,
            engine_running: (i % 3) as u32,
            engine_waiting: (i % 4) as u32,
            kv_cache_usage: (i % 10) as f32 / 10.0,
            tokens_per_second: 40.0 + i as f32,
            latency_ms: 100.0 + (i % 13) as f32,
            gpu_utilization: 0.5,
            gpu_memory_free_bytes: 8 << 30,
            trust: garage_gateway::plugins::Trust::Verified,
        })
        .collect();
    Cands { list, infos }
}

fn admission(request_id: &str, metadata: &str) -> Admission {
    Admission {
        request_id: request_id.into(),
        key_id: "key-1".into(),
        model: "m".into(),
        reserved_tokens: 300,
        key_metadata: metadata.into(),
    }
}

fn usage(request_id: &str) -> UsageEvent {
    UsageEvent {
        request_id: request_id.into(),
        key_id: "key-1".into(),
        model: "m".into(),
        prompt_tokens: 1000,
        completion_tokens: 500,
        cached_tokens: 0,
        latency_ms: 1200,
        ttft_ms: 150,
        backend: "rig-1".into(),
        rig: "rig-1".into(),
        operator: "alice".into(),
        started_at_ms: 1_700_000_000_000,
        finished_at_ms: 1_700_000_001_200,
        batch: false,
        counted_by: garage_gateway::plugins::CountedBy::Gateway,
        reported_prompt_tokens: Some(1000),
        reported_completion_tokens: Some(500),
        trust: garage_gateway::plugins::Trust::Verified,
        price: None,
    }
}

fn report() -> RigReport {
    RigReport {
        rig: "rig-1".into(),
        operator: "alice".into(),
        period_ms: 3_600_000,
        uptime_ms: 3_600_000,
        gpu_seconds: 7200.0,
        at_ms: 1_700_000_000_000,
    }
}

/// Asserts `order` is a permutation of a prefix-free selection: in range, no repeats.
fn assert_valid_order(order: &[u32], n: usize) {
    assert!(!order.is_empty());
    let mut seen = vec![false; n];
    for &i in order {
        assert!((i as usize) < n, "index {i} out of range");
        assert!(!seen[i as usize], "index {i} repeated");
        seen[i as usize] = true;
    }
}

// ---- The default plugins --------------------------------------------------------------------

#[tokio::test]
async fn every_default_plugin_loads_and_answers() {
    let (host, _store) = host().await;
    let cands = candidates(10);

    // No plugin: every call says "fall back".
    assert_eq!(route(&host, "m", &cands).await, None);
    assert!(host.admit(&admission("r0", "{}")).await.is_none());
    assert!(host.charge(&usage("r0")).await.unwrap().is_none());
    assert!(host.reward_usage(&usage("r0")).await.unwrap().is_none());

    for router in [
        components::ROUTER_ROUND_ROBIN,
        components::ROUTER_LEAST_LOADED,
        components::ROUTER_PREFIX_AFFINITY,
    ] {
        let info = host
            .install(Slot::Router, router, "{}", "test")
            .await
            .unwrap();
        assert_eq!(info.sha256, sha256(router));
        assert_eq!(info.size, router.len() as u64);
        let order = route(&host, "m", &cands).await.expect("a router answers");
        assert_valid_order(&order, cands.list.len());
    }

    // Round robin takes turns: consecutive requests start one further along.
    host.install(Slot::Router, components::ROUTER_ROUND_ROBIN, "{}", "test")
        .await
        .unwrap();
    let first = route(&host, "rr", &cands).await.unwrap()[0];
    let second = route(&host, "rr", &cands).await.unwrap()[0];
    assert_eq!(second, (first + 1) % cands.list.len() as u32);

    // A router asks who the candidates are only when it needs to: least loaded, told to prefer
    // a region, reads every candidate's labels through `candidates.describe` and puts the even
    // (eu) indices first.
    host.install(
        Slot::Router,
        components::ROUTER_LEAST_LOADED,
        r#"{"prefer": {"region": "eu"}}"#,
        "test",
    )
    .await
    .unwrap();
    let order = route(&host, "m", &cands).await.unwrap();
    assert_valid_order(&order, cands.list.len());
    assert!(order[..5].iter().all(|i| i % 2 == 0), "{order:?}");
    assert!(order[5..].iter().all(|i| i % 2 == 1), "{order:?}");

    // Rate limiter: two requests a minute for this key, the third is refused with a retry.
    host.install(Slot::RateLimiter, components::RATE_LIMITER, "{}", "test")
        .await
        .unwrap();
    let limits = r#"{"rpm": 2}"#;
    assert!(host.admit(&admission("r1", limits)).await.unwrap().allow);
    assert!(host.admit(&admission("r2", limits)).await.unwrap().allow);
    let denied = host.admit(&admission("r3", limits)).await.unwrap();
    assert!(!denied.allow);
    assert!(denied.retry_after_ms > 0);
    host.settle(&Settlement {
        request_id: "r1".into(),
        key_id: "key-1".into(),
        model: "m".into(),
        reserved_tokens: 300,
        used_tokens: 120,
    })
    .await;

    // Meter: priced from its config (credits per 1,000 tokens).
    let meter_config = r#"{"default_price": {"prompt": 1.0, "completion": 2.0}}"#;
    host.install(Slot::Meter, components::METER, meter_config, "test")
        .await
        .unwrap();
    let charge = host
        .charge(&usage("r1"))
        .await
        .unwrap()
        .expect("a meter answers");
    assert!((charge.credits - 2.0).abs() < 1e-9, "{charge:?}");

    // Reward: points for the rig's operator, for tokens and for uptime.
    host.install(Slot::Reward, components::REWARD, "{}", "test")
        .await
        .unwrap();
    let awards = host.reward_usage(&usage("r1")).await.unwrap().unwrap();
    assert!(
        awards
            .iter()
            .any(|a| a.operator == "alice" && a.points > 0.0),
        "{awards:?}"
    );
    let awards = host.reward_report(&report()).await.unwrap().unwrap();
    assert!(
        awards
            .iter()
            .any(|a| a.operator == "alice" && a.points > 0.0),
        "{awards:?}"
    );

    let total_faults: u64 = host
        .status()
        .iter()
        .map(|s| {
            let f = &s.faults;
            f.trap + f.timeout + f.memory_cap + f.bad_output + f.plugin_error + f.host
        })
        .sum();
    assert_eq!(total_faults, 0, "{:#?}", host.status());
}

// ---- Refused at install ---------------------------------------------------------------------

/// A component that imports an interface plugins may not use.
const IMPORTS_HTTP: &str = r#"
(component
  (import "wasi:http/outgoing-handler@0.2.0" (instance
    (export "handle" (func))))
)
"#;

#[tokio::test]
async fn wrong_world_garbage_and_forbidden_imports_are_refused_with_a_clear_error() {
    let (host, store) = host().await;

    let err = host
        .install(Slot::Router, components::WRONG_WORLD, "{}", "test")
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            PluginError::WrongWorld {
                slot: Slot::Router,
                ..
            }
        ),
        "{err}"
    );
    let message = err.to_string();
    assert!(
        message.contains("`meter` world") && message.contains("route"),
        "{message}"
    );
    assert!(err.is_client_error());
    // The same component is a fine meter.
    host.install(Slot::Meter, components::WRONG_WORLD, "{}", "test")
        .await
        .unwrap();

    let err = host
        .install(Slot::Router, b"definitely not wasm", "{}", "test")
        .await
        .unwrap_err();
    assert!(matches!(err, PluginError::Invalid(_)), "{err}");
    assert!(
        err.to_string().contains("not a WebAssembly component"),
        "{err}"
    );

    let core_module = wat::parse_str("(module)").unwrap();
    let err = host
        .install(Slot::Router, &core_module, "{}", "test")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("core WebAssembly module"), "{err}");

    let truncated = &components::ROUTER_ROUND_ROBIN[..components::ROUTER_ROUND_ROBIN.len() / 2];
    let err = host
        .install(Slot::Router, truncated, "{}", "test")
        .await
        .unwrap_err();
    assert!(matches!(err, PluginError::Invalid(_)), "{err}");

    let http = wat::parse_str(IMPORTS_HTTP).unwrap();
    let err = host
        .install(Slot::Router, &http, "{}", "test")
        .await
        .unwrap_err();
    assert!(matches!(err, PluginError::ForbiddenImport { .. }), "{err}");
    assert!(
        err.to_string().contains("wasi:http/outgoing-handler@0.2.0"),
        "{err}"
    );

    let err = host
        .install(
            Slot::Router,
            components::ROUTER_ROUND_ROBIN,
            "{not json",
            "test",
        )
        .await
        .unwrap_err();
    assert!(matches!(err, PluginError::InvalidConfig(_)), "{err}");

    let small = PluginsConfig {
        max_component_bytes: 1000,
        ..config()
    };
    let small_host = PluginHost::new(Arc::new(MemoryStore::new()), small)
        .await
        .unwrap();
    let err = small_host
        .install(Slot::Router, components::ROUTER_ROUND_ROBIN, "{}", "test")
        .await
        .unwrap_err();
    assert!(matches!(err, PluginError::TooLarge { .. }), "{err}");

    // Nothing refused reached the store or the slot.
    assert_eq!(active_sha(&host, Slot::Router), None);
    assert!(
        store
            .record_get("plugin_component", &sha256(&http))
            .await
            .unwrap()
            .is_none()
    );
}

// ---- Hostile plugins ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_infinite_loop_hits_its_deadline_and_the_runtime_keeps_running() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let mut config = config();
    config.router.deadline_ms = Some(300);
    config.fault_threshold = 1000;
    let host = host_with(store, config).await;
    host.install(Slot::Router, components::INFINITE_LOOP, "{}", "test")
        .await
        .unwrap();
    let cands = candidates(3);

    // More spinning guests than async workers: the guests yield every millisecond, so a timer
    // on the same runtime still fires on time, and each call ends at its deadline.
    let started = Instant::now();
    let calls: Vec<_> = (0..6)
        .map(|_| {
            let host = host.clone();
            let cands = cands.clone();
            tokio::spawn(async move { route(&host, "m", &cands).await })
        })
        .collect();
    let timer = Instant::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let timer_late = timer.elapsed();
    for call in calls {
        assert_eq!(call.await.unwrap(), None);
    }
    let elapsed = started.elapsed();
    assert!(
        timer_late < Duration::from_millis(200),
        "a 20 ms timer took {timer_late:?} while guests spun"
    );
    assert!(elapsed >= Duration::from_millis(290), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    assert_eq!(status(&host, Slot::Router).faults.timeout, 6);

    // The host is fine: a good router answers right after.
    host.install(Slot::Router, components::ROUTER_ROUND_ROBIN, "{}", "test")
        .await
        .unwrap();
    assert!(route(&host, "m", &cands).await.is_some());
}

/// A hot-path call (a deadline short enough that it does not yield) past its deadline by the
/// wall clock is then measured by its thread's CPU time, read only from that moment: a spinning
/// guest is still stopped, as a timeout, and the host goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spinning_hot_path_guest_is_stopped_by_its_cpu_time() {
    let mut config = config();
    config.router.deadline_ms = Some(5);
    config.fault_threshold = 1000;
    let host = host_with(Arc::new(MemoryStore::new()), config).await;
    host.install(Slot::Router, components::INFINITE_LOOP, "{}", "test")
        .await
        .unwrap();
    let cands = candidates(3);
    let started = Instant::now();
    for _ in 0..3 {
        assert_eq!(route(&host, "m", &cands).await, None);
    }
    // Bounded by the wall clock's backstop (20 × 5 ms + 5 s) even on a machine with no core to
    // spare; a generous bound, not a measurement.
    assert!(
        started.elapsed() < Duration::from_secs(16),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(status(&host, Slot::Router).faults.timeout, 3);

    host.install(Slot::Router, components::ROUTER_ROUND_ROBIN, "{}", "test")
        .await
        .unwrap();
    assert!(route(&host, "m", &cands).await.is_some());
}

/// A host whose router may run long: the cap or the check must be what stops the plugin, not
/// the deadline (filling 64 MiB, or lifting 16 MiB in a debug build, takes a while).
async fn patient_host() -> Arc<PluginHost> {
    let mut config = config();
    config.router.deadline_ms = Some(20_000);
    host_with(Arc::new(MemoryStore::new()), config).await
}

#[tokio::test]
async fn a_memory_bomb_hits_the_cap() {
    let host = patient_host().await;
    host.install(Slot::Router, components::MEMORY_BOMB, "{}", "test")
        .await
        .unwrap();
    assert_eq!(route(&host, "m", &candidates(3)).await, None);
    let faults = status(&host, Slot::Router).faults;
    assert_eq!(faults.memory_cap, 1, "{faults:?}");
}

#[tokio::test]
async fn a_trap_falls_back() {
    let (host, _store) = host().await;
    host.install(Slot::Router, components::TRAP, "{}", "test")
        .await
        .unwrap();
    assert_eq!(route(&host, "m", &candidates(3)).await, None);
    assert_eq!(status(&host, Slot::Router).faults.trap, 1);
}

#[tokio::test]
async fn a_huge_answer_is_refused() {
    let host = patient_host().await;
    host.install(Slot::Router, components::HUGE_OUTPUT, "{}", "test")
        .await
        .unwrap();
    assert_eq!(route(&host, "m", &candidates(3)).await, None);
    let faults = status(&host, Slot::Router).faults;
    assert_eq!(faults.bad_output + faults.memory_cap, 1, "{faults:?}");
}

#[tokio::test]
async fn nonsensical_or_failing_answers_fall_back() {
    let (host, _store) = host().await;
    // A flood of 3 entries over 100 candidates is a valid order...
    host.install(
        Slot::Router,
        components::HUGE_OUTPUT,
        r#"{"entries": 3}"#,
        "test",
    )
    .await
    .unwrap();
    assert_eq!(
        route(&host, "m", &candidates(100)).await,
        Some(vec![0, 1, 2])
    );
    // ...over 2 candidates it repeats an index, and over none the router is not even called.
    assert_eq!(route(&host, "m", &candidates(2)).await, None);
    assert_eq!(
        host.route(crate::support::route_input(request("m"), &[], &[]))
            .await,
        None
    );
    // An invalid config makes the plugin return its own error: a fallback, not a crash.
    host.install(
        Slot::Router,
        components::HUGE_OUTPUT,
        r#"{"entries": "x"}"#,
        "test",
    )
    .await
    .unwrap();
    assert_eq!(route(&host, "m", &candidates(2)).await, None);
    let faults = status(&host, Slot::Router).faults;
    assert_eq!(
        (faults.bad_output, faults.plugin_error),
        (1, 1),
        "{faults:?}"
    );
}

#[tokio::test]
async fn a_faulting_rate_limiter_fails_open_or_closed_by_config() {
    for fail_open in [true, false] {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let host = host_with(
            store,
            PluginsConfig {
                rate_limiter_fail_open: fail_open,
                ..config()
            },
        )
        .await;
        // The limiter traps on an invalid config (its documented behaviour).
        host.install(
            Slot::RateLimiter,
            components::RATE_LIMITER,
            r#"{"rpm": "x"}"#,
            "test",
        )
        .await
        .unwrap();
        let answer = host.admit_reserving(&admission("r1", "{}")).await.unwrap();
        assert_eq!(answer.decision.allow, fail_open);
        assert!(answer.by_fallback, "the fallback decided");
        assert!(answer.reservation.is_none(), "nothing to settle");
        if !fail_open {
            assert!(answer.decision.retry_after_ms > 0);
        }
    }
}

/// With the trial at upload (the default), a plugin that cannot work with its configuration,
/// or that faults on a call at all, is refused before it is stored, with its own words; the
/// slot keeps what it had.
#[tokio::test]
async fn the_trial_call_refuses_what_would_fault() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let host = host_with(
        store,
        PluginsConfig {
            trial_at_upload: true,
            ..config()
        },
    )
    .await;
    host.install(Slot::RateLimiter, components::RATE_LIMITER, "{}", "test")
        .await
        .unwrap();
    let refused = |result: Result<_, PluginError>| match result {
        Err(PluginError::ConfigRefused(message)) => message,
        other => panic!("not refused: {other:?}"),
    };
    let message = refused(
        host.install(
            Slot::RateLimiter,
            components::RATE_LIMITER,
            r#"{"rpm": "x"}"#,
            "test",
        )
        .await,
    );
    assert!(message.contains("invalid type"), "{message}");
    let message = refused(
        host.install(Slot::Router, components::TRAP, "{}", "test")
            .await,
    );
    assert!(message.contains("fixture-trap"), "{message}");
    // The limiter's own config was left alone, and the trial touched none of its counters.
    let decision = host.admit(&admission("r1", r#"{"rpm": 1}"#)).await.unwrap();
    assert!(decision.allow);
    assert_eq!(decision.headers.remaining_requests, Some(0));
}

/// A request is settled with the limiter version that admitted it, even when another version
/// was activated in between (it used to be found again by hashing the request id, which a
/// promotion or rollback sends elsewhere).
#[tokio::test]
async fn a_settlement_goes_to_the_version_that_admitted() {
    let (host, _store) = host().await;
    host.install(
        Slot::RateLimiter,
        components::RATE_LIMITER,
        r#"{"tpm": 5000}"#,
        "test",
    )
    .await
    .unwrap();
    let garage_gateway::plugins::LimiterAnswer {
        decision,
        reservation,
        ..
    } = host
        .admit_reserving(&admission("held-1", "{}"))
        .await
        .unwrap();
    assert!(decision.allow);
    let reservation = reservation.expect("tokens reserved: the request holds a reservation");
    host.install(
        Slot::RateLimiter,
        components::RATE_LIMITER,
        r#"{"tpm": 6000}"#,
        "test",
    )
    .await
    .unwrap();
    assert_eq!(
        reservation.version().config,
        serde_json::json!({"tpm": 5000}),
        "the reservation names the version that admitted"
    );
    host.settle_with(
        &reservation,
        &Settlement {
            request_id: "held-1".into(),
            key_id: "key-1".into(),
            model: "m".into(),
            reserved_tokens: 10,
            used_tokens: 3,
        },
    )
    .await;
    let status = host.status();
    let limiter = status.iter().find(|s| s.slot == Slot::RateLimiter).unwrap();
    assert_eq!(
        limiter.active.as_ref().unwrap().config,
        serde_json::json!({"tpm": 6000})
    );
    assert_eq!(limiter.faults, Default::default(), "{limiter:?}");
}

// ---- Versions: rollback, canary, promotion --------------------------------------------------

#[tokio::test]
async fn repeated_faults_roll_the_slot_back_by_itself() {
    let (host, _store) = host().await;
    let good = host
        .install(Slot::Router, components::ROUTER_ROUND_ROBIN, "{}", "admin")
        .await
        .unwrap();
    let bad = host
        .install(Slot::Router, components::TRAP, "{}", "admin")
        .await
        .unwrap();
    assert_eq!(active_sha(&host, Slot::Router), Some(bad.sha256.clone()));

    let cands = candidates(3);
    for _ in 0..5 {
        assert_eq!(route(&host, "m", &cands).await, None);
    }
    let h = host.clone();
    let good_sha = good.sha256.clone();
    wait_until(Duration::from_secs(5), "automatic rollback", || {
        let h = h.clone();
        let good_sha = good_sha.clone();
        async move { active_sha(&h, Slot::Router) == Some(good_sha) }
    })
    .await;
    let after = status(&host, Slot::Router);
    assert_eq!(after.active.unwrap().activated_by, "auto-rollback");
    assert!(route(&host, "m", &cands).await.is_some());
    assert_eq!(
        host.metrics()
            .rollbacks
            .with_label_values(&["router"])
            .get(),
        1
    );

    // A canary that faults is withdrawn, and the active version stays.
    host.upload(Slot::Router, components::TRAP, "{}", "admin")
        .await
        .unwrap();
    host.activate(Slot::Router, &bad.sha256, Some(100), "admin")
        .await
        .unwrap();
    for _ in 0..5 {
        assert_eq!(route(&host, "m", &cands).await, None);
    }
    let h = host.clone();
    wait_until(Duration::from_secs(5), "canary withdrawn", || {
        let h = h.clone();
        async move { status(&h, Slot::Router).canary.is_none() }
    })
    .await;
    assert_eq!(active_sha(&host, Slot::Router), Some(good.sha256));
    assert!(route(&host, "m", &cands).await.is_some());
}

#[tokio::test]
async fn rollback_activate_canary_and_promote() {
    let (host, _store) = host().await;
    assert!(matches!(
        host.rollback(Slot::Router, "admin").await,
        Err(PluginError::NoPrevious(Slot::Router))
    ));
    let v1 = host
        .install(Slot::Router, components::ROUTER_ROUND_ROBIN, "{}", "alice")
        .await
        .unwrap();
    assert_eq!(v1.activated_by, "alice");
    // Installing the active version again changes nothing.
    host.install(Slot::Router, components::ROUTER_ROUND_ROBIN, "{}", "alice")
        .await
        .unwrap();
    assert!(status(&host, Slot::Router).history.is_empty());

    let v2 = host
        .upload(
            Slot::Router,
            components::ROUTER_LEAST_LOADED,
            r#"{"prefer": {"gpu": "4090"}}"#,
            "bob",
        )
        .await
        .unwrap();
    assert_eq!(active_sha(&host, Slot::Router), Some(v1.sha256.clone()));
    assert_eq!(host.versions(Slot::Router).await.unwrap().len(), 2);

    assert!(matches!(
        host.activate(Slot::Router, &v2.sha256, Some(101), "bob")
            .await,
        Err(PluginError::InvalidCanary(101))
    ));
    assert!(matches!(
        host.activate(Slot::Router, &"0".repeat(64), None, "bob")
            .await,
        Err(PluginError::UnknownVersion(_))
    ));
    assert!(matches!(
        host.promote(Slot::Router, "bob").await,
        Err(PluginError::NoCanary(Slot::Router))
    ));

    let canary = host
        .activate(Slot::Router, &v2.sha256, Some(50), "bob")
        .await
        .unwrap();
    assert_eq!(canary.sha256, v2.sha256);
    assert_eq!(
        canary.config,
        serde_json::json!({"prefer": {"gpu": "4090"}})
    );
    let s = status(&host, Slot::Router);
    assert_eq!(s.canary.as_ref().map(|c| c.percent), Some(50));
    assert_eq!(s.active.unwrap().sha256, v1.sha256);

    // About half the calls go to the canary.
    let cands = candidates(5);
    for _ in 0..200 {
        assert!(route(&host, "m", &cands).await.is_some());
    }
    let calls = |role: &str| {
        host.metrics()
            .calls
            .with_label_values(&["router", role])
            .get()
    };
    assert!(
        calls("canary") > 40 && calls("active") > 40,
        "{} / {}",
        calls("canary"),
        calls("active")
    );

    let promoted = host.promote(Slot::Router, "carol").await.unwrap();
    assert_eq!(promoted.sha256, v2.sha256);
    assert_eq!(promoted.activated_by, "carol");
    let s = status(&host, Slot::Router);
    assert!(s.canary.is_none());
    assert_eq!(
        s.history.iter().map(|v| &v.sha256).collect::<Vec<_>>(),
        [&v1.sha256]
    );

    let back = host.rollback(Slot::Router, "dave").await.unwrap();
    assert_eq!(back.sha256, v1.sha256);
    assert_eq!(active_sha(&host, Slot::Router), Some(v1.sha256.clone()));
    assert!(status(&host, Slot::Router).history.is_empty());

    // A stored version activates directly, and a canary rollback only drops the canary.
    host.activate(Slot::Router, &v2.sha256, None, "erin")
        .await
        .unwrap();
    host.activate(Slot::Router, &v1.sha256, Some(10), "erin")
        .await
        .unwrap();
    let after = host.rollback(Slot::Router, "erin").await.unwrap();
    assert_eq!(after.sha256, v2.sha256);
    assert!(status(&host, Slot::Router).canary.is_none());

    host.deactivate(Slot::Router, "erin").await.unwrap();
    assert_eq!(active_sha(&host, Slot::Router), None);
    assert_eq!(route(&host, "m", &cands).await, None);
}

// ---- Replicas -------------------------------------------------------------------------------

/// How soon a replica must follow another's change: within a second (about 0.1 s measured). A
/// debug build on a busy CI machine gets some slack: following means compiling the component.
const FOLLOW_BOUND: Duration = if cfg!(debug_assertions) {
    Duration::from_secs(3)
} else {
    Duration::from_secs(1)
};

async fn replicas_follow_each_other(store_a: Arc<dyn Store>, store_b: Arc<dyn Store>) {
    let a = host_with(store_a.clone(), config()).await;
    let b = host_with(store_b, config()).await;
    let cands = candidates(4);

    let v1 = a
        .install(Slot::Router, components::ROUTER_ROUND_ROBIN, "{}", "admin")
        .await
        .unwrap();
    let activated = Instant::now();
    wait_until(FOLLOW_BOUND, "replica b loads the router", || {
        let b = b.clone();
        let sha = v1.sha256.clone();
        async move { active_sha(&b, Slot::Router) == Some(sha) }
    })
    .await;
    println!(
        "replica followed an activation in {:?}",
        activated.elapsed()
    );
    assert!(route(&b, "m", &cands).await.is_some());

    // Both replicas share the router's state: round robin takes turns across them.
    let first = route(&a, "shared", &cands).await.unwrap()[0];
    let second = route(&b, "shared", &cands).await.unwrap()[0];
    assert_eq!(second, (first + 1) % 4);

    // A canary and a rollback made on b reach a.
    let v2 = b
        .upload(Slot::Router, components::ROUTER_LEAST_LOADED, "{}", "admin")
        .await
        .unwrap();
    b.activate(Slot::Router, &v2.sha256, Some(25), "admin")
        .await
        .unwrap();
    wait_until(FOLLOW_BOUND, "replica a sees the canary", || {
        let a = a.clone();
        async move { status(&a, Slot::Router).canary.map(|c| c.percent) == Some(25) }
    })
    .await;
    b.promote(Slot::Router, "admin").await.unwrap();
    b.rollback(Slot::Router, "admin").await.unwrap();
    wait_until(FOLLOW_BOUND, "replica a follows the rollback", || {
        let a = a.clone();
        let sha = v1.sha256.clone();
        async move {
            let s = status(&a, Slot::Router);
            s.active.map(|v| v.sha256) == Some(sha) && s.canary.is_none()
        }
    })
    .await;

    // A restarted replica loads the active versions from the store.
    drop(a);
    let restarted = PluginHost::new(store_a, config()).await.unwrap();
    assert_eq!(active_sha(&restarted, Slot::Router), Some(v1.sha256));
    assert!(route(&restarted, "m", &cands).await.is_some());
}

#[tokio::test]
async fn replicas_on_one_memory_store_follow_each_other() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    replicas_follow_each_other(store.clone(), store).await;
}

#[tokio::test]
async fn replicas_on_redis_follow_each_other_within_a_second() {
    let redis = RedisServer::start();
    let a: Arc<dyn Store> = Arc::new(RedisStore::connect(&redis.url()).await.unwrap());
    let b: Arc<dyn Store> = Arc::new(RedisStore::connect(&redis.url()).await.unwrap());
    // The event subscription starts in the background: wait until it delivers.
    wait_for_subscription(&a, &b).await;
    replicas_follow_each_other(a, b).await;
}

async fn wait_for_subscription(a: &Arc<dyn Store>, b: &Arc<dyn Store>) {
    use garage_gateway::store::StoreEvent;
    for store in [a, b] {
        let mut events = store.subscribe();
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                store.publish(&StoreEvent::Resync).await.unwrap();
                if let Ok(Ok(_)) =
                    tokio::time::timeout(Duration::from_millis(100), events.recv()).await
                {
                    return;
                }
            }
        })
        .await
        .expect("store events flow");
    }
}

#[tokio::test]
async fn a_corrupt_slot_record_does_not_stop_the_host() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    store
        .record_put("plugin_slot", "router", b"{not json")
        .await
        .unwrap();
    let host = host_with(store, config()).await;
    let router = status(&host, Slot::Router);
    assert!(router.active.is_none());
    assert!(router.load_error.is_some());
    // The slot can be fixed through the API: the record is replaced.
    host.install(Slot::Router, components::ROUTER_ROUND_ROBIN, "{}", "admin")
        .await
        .unwrap();
    assert!(route(&host, "m", &candidates(2)).await.is_some());
}

// ---- Isolation ------------------------------------------------------------------------------

#[tokio::test]
async fn plugin_state_is_namespaced_per_slot() {
    let (host, store) = host().await;
    host.install(Slot::Router, components::ROUTER_ROUND_ROBIN, "{}", "test")
        .await
        .unwrap();
    let cands = candidates(5);
    route(&host, "m", &cands).await.unwrap();
    assert_eq!(
        store.kv_get("plugin:router:rr:m").await.unwrap().as_deref(),
        Some(&b"1"[..])
    );
    assert_eq!(store.kv_get("rr:m").await.unwrap(), None);

    // The same key in another slot's namespace is another key.
    store
        .kv_set("plugin:rate-limiter:rr:m", b"40", None)
        .await
        .unwrap();
    route(&host, "m", &cands).await.unwrap();
    assert_eq!(
        store.kv_get("plugin:router:rr:m").await.unwrap().as_deref(),
        Some(&b"2"[..])
    );
    assert_eq!(
        store
            .kv_get("plugin:rate-limiter:rr:m")
            .await
            .unwrap()
            .as_deref(),
        Some(&b"40"[..])
    );
}

/// The end of a hand-written router component: the contract's `route` export (its record
/// types as `garage:policy@0.2.0` defines them), lifted from the core module's `route`,
/// `memory` and `realloc`.
const ROUTE_EXPORT: &str = r#"
  (type $route_request (record
    (field "model" string) (field "key-id" string) (field "prefix-hash" u64)
    (field "prompt-tokens" u32) (field "max-tokens" u32) (field "stream" bool)))
  (export $request "route-request" (type $route_request))
  (type $candidate (record
    (field "key" u64) (field "in-flight" u32) (field "engine-running" u32) (field "engine-waiting" u32)
    (field "kv-cache-usage" f32) (field "tokens-per-second" f32) (field "latency-ms" f32)
    (field "gpu-utilization" f32) (field "gpu-memory-free-bytes" u64)))
  (export $cand "candidate" (type $candidate))
  (type $candidates (list $cand))
  (type $order (list u32))
  (type $routed (result $order (error string)))
  (func $route (param "request" $request) (param "candidates" $candidates) (result $routed)
    (canon lift (core func $main "route") (memory $mem) (realloc $realloc)))
  (export "route" (func $route))
)
"#;

/// A router that counts what WASI gives it: environment variables, arguments, preopened
/// directories, and whether it may create a TCP socket. It answers `[0, 1, ..., n]` where `n` is
/// that count, so `[0]` means "nothing". Completed by [`ROUTE_EXPORT`].
const WASI_PROBE_CORE: &str = r#"
(component $C
  (import "wasi:cli/environment@0.2.0" (instance $env
    (type $pair (tuple string string))
    (type $pairs (list $pair))
    (export "get-environment" (func (result $pairs)))
    (type $strings (list string))
    (export "get-arguments" (func (result $strings)))))

  (import "wasi:filesystem/types@0.2.0" (instance $fs_types
    (export "descriptor" (type (sub resource)))))
  (alias export $fs_types "descriptor" (type $descriptor))
  (type $preopens_t (instance
    (alias outer $C $descriptor (type $d0))
    (export "descriptor" (type $d (eq $d0)))
    (type $own (own $d))
    (type $entry (tuple $own string))
    (type $entries (list $entry))
    (export "get-directories" (func (result $entries)))))
  (import "wasi:filesystem/preopens@0.2.0" (instance $preopens (type $preopens_t)))

  (import "wasi:sockets/network@0.2.0" (instance $network
    (export "network" (type (sub resource)))
    (type $ec (enum "unknown" "access-denied" "not-supported" "invalid-argument"
      "out-of-memory" "timeout" "concurrency-conflict" "not-in-progress" "would-block"
      "invalid-state" "new-socket-limit" "address-not-bindable" "address-in-use"
      "remote-unreachable" "connection-refused" "connection-reset" "connection-aborted"
      "datagram-too-large" "name-unresolvable" "temporary-resolver-failure"
      "permanent-resolver-failure"))
    (export "error-code" (type (eq $ec)))
    (type $family (enum "ipv4" "ipv6"))
    (export "ip-address-family" (type (eq $family)))))
  (alias export $network "error-code" (type $error_code))
  (alias export $network "ip-address-family" (type $address_family))
  (import "wasi:sockets/tcp@0.2.0" (instance $tcp
    (export "tcp-socket" (type (sub resource)))))
  (alias export $tcp "tcp-socket" (type $tcp_socket))
  (type $tcp_create_t (instance
    (alias outer $C $error_code (type $ec0))
    (export "error-code" (type $ec (eq $ec0)))
    (alias outer $C $address_family (type $family0))
    (export "ip-address-family" (type $family (eq $family0)))
    (alias outer $C $tcp_socket (type $socket0))
    (export "tcp-socket" (type $socket (eq $socket0)))
    (type $own (own $socket))
    (type $created (result $own (error $ec)))
    (export "create-tcp-socket" (func (param "address-family" $family) (result $created)))))
  (import "wasi:sockets/tcp-create-socket@0.2.0" (instance $tcp_create (type $tcp_create_t)))

  (core module $Libc
    (memory (export "memory") 1)
    (global $heap (mut i32) (i32.const 8192))
    (func (export "realloc") (param i32 i32 i32 i32) (result i32)
      (local $p i32)
      (local.set $p (i32.and
        (i32.add (global.get $heap) (i32.sub (local.get 2) (i32.const 1)))
        (i32.sub (i32.const 0) (local.get 2))))
      (global.set $heap (i32.add (local.get $p) (local.get 3)))
      (block $done
        (loop $grow
          (br_if $done (i32.le_u (global.get $heap) (i32.mul (memory.size) (i32.const 65536))))
          (if (i32.eq (memory.grow (i32.const 1)) (i32.const -1)) (then unreachable))
          (br $grow)))
      (local.get $p)))
  (core instance $libc (instantiate $Libc))
  (alias core export $libc "memory" (core memory $mem))
  (alias core export $libc "realloc" (core func $realloc))

  (core func $get_environment
    (canon lower (func $env "get-environment") (memory $mem) (realloc $realloc)))
  (core func $get_arguments
    (canon lower (func $env "get-arguments") (memory $mem) (realloc $realloc)))
  (core func $get_directories
    (canon lower (func $preopens "get-directories") (memory $mem) (realloc $realloc)))
  (core func $create_tcp_socket
    (canon lower (func $tcp_create "create-tcp-socket") (memory $mem)))

  (core module $Main
    (import "libc" "memory" (memory 1))
    (import "wasi" "get-environment" (func $get_environment (param i32)))
    (import "wasi" "get-arguments" (func $get_arguments (param i32)))
    (import "wasi" "get-directories" (func $get_directories (param i32)))
    (import "wasi" "create-tcp-socket" (func $create_tcp_socket (param i32 i32)))
    (func (export "route") (param i32 i32 i32 i32 i64 i32 i32 i32 i32 i32) (result i32)
      (local $n i32) (local $i i32)
      (call $get_environment (i32.const 16))
      (call $get_arguments (i32.const 24))
      (call $get_directories (i32.const 32))
      (call $create_tcp_socket (i32.const 0) (i32.const 40))
      (local.set $n (i32.add
        (i32.add (i32.load (i32.const 20)) (i32.load (i32.const 28)))
        (i32.add (i32.load (i32.const 36)) (i32.eqz (i32.load8_u (i32.const 40))))))
      (block $done
        (loop $fill
          (i32.store (i32.add (i32.const 4096) (i32.shl (local.get $i) (i32.const 2)))
            (local.get $i))
          (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br $fill)))
      (i32.store8 (i32.const 48) (i32.const 0))
      (i32.store (i32.const 52) (i32.const 4096))
      (i32.store (i32.const 56) (i32.add (local.get $n) (i32.const 1)))
      (i32.const 48)))
  (core instance $main (instantiate $Main
    (with "libc" (instance $libc))
    (with "wasi" (instance
      (export "get-environment" (func $get_environment))
      (export "get-arguments" (func $get_arguments))
      (export "get-directories" (func $get_directories))
      (export "create-tcp-socket" (func $create_tcp_socket))))))

"#;

#[tokio::test]
async fn a_guest_gets_no_environment_arguments_files_or_network() {
    let (host, _store) = host().await;
    let probe =
        wat::parse_str([WASI_PROBE_CORE, ROUTE_EXPORT].concat()).expect("the probe is valid WAT");
    host.install(Slot::Router, &probe, "{}", "test")
        .await
        .unwrap();
    // The test process has environment variables and arguments; the guest sees none of them,
    // no preopened directory, and may not create a socket.
    assert!(std::env::vars().next().is_some());
    assert_eq!(route(&host, "m", &candidates(100)).await, Some(vec![0]));
}

// ---- Files ----------------------------------------------------------------------------------

#[tokio::test]
async fn a_slot_follows_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("router.wasm");
    std::fs::write(&path, components::ROUTER_ROUND_ROBIN).unwrap();
    let mut config = config();
    config.files.insert(
        Slot::Router,
        garage_gateway::plugins::PluginFile {
            path: path.clone(),
            config: serde_json::json!({}),
        },
    );
    let host = host_with(Arc::new(MemoryStore::new()), config).await;
    let h = host.clone();
    wait_until(Duration::from_secs(5), "the file's router is active", || {
        let h = h.clone();
        async move { active_sha(&h, Slot::Router) == Some(sha256(components::ROUTER_ROUND_ROBIN)) }
    })
    .await;
    let by = status(&host, Slot::Router).active.unwrap().activated_by;
    assert!(by.starts_with("file:"), "{by}");

    // Replace the file (a rename, as deploy tools do): the new version takes over.
    let staged = dir.path().join("router.wasm.new");
    std::fs::write(&staged, components::ROUTER_LEAST_LOADED).unwrap();
    std::fs::rename(&staged, &path).unwrap();
    let h = host.clone();
    wait_until(Duration::from_secs(5), "the new file's router is active", || {
        let h = h.clone();
        async move { active_sha(&h, Slot::Router) == Some(sha256(components::ROUTER_LEAST_LOADED)) }
    })
    .await;
}

// ---- Config ---------------------------------------------------------------------------------

#[test]
fn plugins_config_is_strict_and_has_per_slot_defaults() {
    let config: PluginsConfig = toml::from_str(
        r#"
        fault_threshold = 3
        [rate-limiter]
        memory_mib = 32
        [meter]
        isolation = "per-call"
        [files.router]
        path = "/etc/garage/router.wasm"
        config = { sticky = true }
        "#,
    )
    .unwrap();
    assert_eq!(config.deadline(Slot::Router), Duration::from_millis(5));
    assert_eq!(config.deadline(Slot::RateLimiter), Duration::from_millis(5));
    assert_eq!(config.deadline(Slot::Meter), Duration::from_secs(1));
    assert_eq!(config.rate_limiter.memory_mib, 32);
    assert_eq!(config.meter.isolation, Isolation::PerCall);
    assert_eq!(config.router.isolation, Isolation::Warm, "warm by default");
    assert_eq!(
        config.files[&Slot::Router].config,
        serde_json::json!({"sticky": true})
    );
    assert!(config.validate().is_ok());

    let err = toml::from_str::<PluginsConfig>("fault_treshold = 3").unwrap_err();
    assert!(err.to_string().contains("fault_treshold"), "{err}");
    let err = toml::from_str::<PluginsConfig>("[router]\ndeadline = 3").unwrap_err();
    assert!(err.to_string().contains("deadline"), "{err}");
    let zero: PluginsConfig = toml::from_str("[router]\ndeadline_ms = 0").unwrap();
    assert!(
        zero.validate()
            .unwrap_err()
            .contains("plugins.router.deadline_ms")
    );
    assert_eq!("rate-limiter".parse::<Slot>().unwrap(), Slot::RateLimiter);
    assert!("limiter".parse::<Slot>().is_err());
}

// ---- Warm reuse and latency -----------------------------------------------------------------

#[tokio::test]
async fn warm_instances_are_reused_and_retired_after_a_trap() {
    let mut config = config();
    config.router.isolation = Isolation::Warm;
    config.router.warm_instances = 2;
    config.router.warm_max_uses = 3;
    let host = host_with(Arc::new(MemoryStore::new()), config).await;
    host.install(Slot::Router, components::ROUTER_ROUND_ROBIN, "{}", "test")
        .await
        .unwrap();
    let cands = candidates(4);
    let mut firsts = Vec::new();
    for _ in 0..8 {
        firsts.push(route(&host, "m", &cands).await.unwrap()[0]);
    }
    // State lives in the store, so reuse does not change the answers.
    assert_eq!(firsts, [0, 1, 2, 3, 0, 1, 2, 3]);
    host.install(Slot::Router, components::TRAP, "{}", "test")
        .await
        .unwrap();
    assert_eq!(route(&host, "m", &cands).await, None);
    assert_eq!(route(&host, "m", &cands).await, None);
    assert_eq!(status(&host, Slot::Router).faults.trap, 2);
}

/// A router that counts its calls in a global of its instance and answers `[calls so far]`: a
/// fresh instance always answers `[0]`, a reused one `[1]`, `[2]`... Completed by
/// [`ROUTE_EXPORT`].
const CALL_COUNTER_CORE: &str = r#"
(component
  (core module $Main
    (memory (export "memory") 1)
    (global $heap (mut i32) (i32.const 8192))
    (global $calls (mut i32) (i32.const 0))
    (func (export "realloc") (param i32 i32 i32 i32) (result i32)
      (local $p i32)
      (local.set $p (i32.and
        (i32.add (global.get $heap) (i32.sub (local.get 2) (i32.const 1)))
        (i32.sub (i32.const 0) (local.get 2))))
      (global.set $heap (i32.add (local.get $p) (local.get 3)))
      (local.get $p))
    (func (export "route")
      (param i32 i32 i32 i32 i64 i32 i32 i32 i32 i32) (result i32)
      (i32.store (i32.const 4096) (global.get $calls))
      (global.set $calls (i32.add (global.get $calls) (i32.const 1)))
      (i32.store8 (i32.const 48) (i32.const 0))
      (i32.store (i32.const 52) (i32.const 4096))
      (i32.store (i32.const 56) (i32.const 1))
      (i32.const 48)))
  (core instance $main (instantiate $Main))
  (alias core export $main "memory" (core memory $mem))
  (alias core export $main "realloc" (core func $realloc))
"#;

#[tokio::test]
async fn instances_made_ahead_are_fresh_and_warm_ones_are_not() {
    let counter = wat::parse_str([CALL_COUNTER_CORE, ROUTE_EXPORT].concat())
        .expect("the counter is valid WAT");
    let cands = candidates(8);
    for (ready, warm) in [(0, false), (2, false), (4, true)] {
        let mut config = config();
        config.router.ready_instances = ready;
        config.router.isolation = if warm {
            Isolation::Warm
        } else {
            Isolation::PerCall
        };
        let host = host_with(Arc::new(MemoryStore::new()), config).await;
        host.install(Slot::Router, &counter, "{}", "test")
            .await
            .unwrap();
        let mut answers = Vec::new();
        for _ in 0..6 {
            answers.push(route(&host, "m", &cands).await.unwrap()[0]);
            // Time for the host to make the next instances ahead.
            for _ in 0..8 {
                tokio::task::yield_now().await;
            }
        }
        if warm {
            assert_eq!(
                answers,
                [0, 1, 2, 3, 4, 5],
                "one warm instance serves them all"
            );
        } else {
            assert_eq!(
                answers, [0; 6],
                "ready_instances = {ready}: every call is fresh"
            );
        }
    }
}

/// A warm instance that faults is discarded with whatever its globals held: the counter
/// router, made to trap on its third call, answers from a fresh instance after it.
#[tokio::test]
async fn a_warm_instance_that_traps_is_never_reused() {
    let trapping = CALL_COUNTER_CORE.replace(
        "(i32.store (i32.const 4096) (global.get $calls))",
        "(if (i32.eq (global.get $calls) (i32.const 2)) (then unreachable))
      (i32.store (i32.const 4096) (global.get $calls))",
    );
    assert_ne!(trapping, CALL_COUNTER_CORE);
    let counter = wat::parse_str([trapping.as_str(), ROUTE_EXPORT].concat())
        .expect("the trapping counter is valid WAT");
    let cands = candidates(8);
    let host = host_with(Arc::new(MemoryStore::new()), config()).await;
    host.install(Slot::Router, &counter, "{}", "test")
        .await
        .unwrap();
    let mut answers = Vec::new();
    for _ in 0..5 {
        answers.push(route(&host, "m", &cands).await.map(|order| order[0]));
    }
    assert_eq!(answers, [Some(0), Some(1), None, Some(0), Some(1)]);
    assert_eq!(status(&host, Slot::Router).faults.trap, 1);
}

#[tokio::test]
async fn warm_instances_retire_with_age() {
    let counter = wat::parse_str([CALL_COUNTER_CORE, ROUTE_EXPORT].concat())
        .expect("the counter is valid WAT");
    let cands = candidates(8);
    let mut config = config();
    config.router.warm_max_age_secs = 1;
    let host = host_with(Arc::new(MemoryStore::new()), config).await;
    host.install(Slot::Router, &counter, "{}", "test")
        .await
        .unwrap();
    let mut answers = Vec::new();
    for _ in 0..3 {
        answers.push(route(&host, "m", &cands).await.unwrap()[0]);
    }
    assert_eq!(answers, [0, 1, 2], "one warm instance, reused");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        route(&host, "m", &cands).await.unwrap()[0],
        0,
        "past warm_max_age_secs the instance is retired: the next call gets a fresh one"
    );
}

/// Each slot keeps idle warm instances, and they hold slots of the instance pool: a pool
/// smaller than all of them together must not make calls fail. A call that finds the pool full
/// tears the idle instances of every slot down and tries again.
#[tokio::test]
async fn idle_warm_instances_give_way_to_calls_of_other_slots() {
    let mut config = config();
    config.max_instances = 2;
    let host = host_with(Arc::new(MemoryStore::new()), config).await;
    host.install(Slot::Router, components::ROUTER_ROUND_ROBIN, "{}", "test")
        .await
        .unwrap();
    host.install(Slot::RateLimiter, components::RATE_LIMITER, "{}", "test")
        .await
        .unwrap();
    host.install(Slot::Meter, components::METER, "{}", "test")
        .await
        .unwrap();
    host.install(Slot::Reward, components::REWARD, "{}", "test")
        .await
        .unwrap();
    let cands = candidates(4);
    for round in 0..5 {
        let id = format!("r{round}");
        assert!(route(&host, "m", &cands).await.is_some(), "route {round}");
        assert!(
            host.admit(&admission(&id, "{}")).await.unwrap().allow,
            "admit {round}"
        );
        host.charge(&usage(&id)).await.expect("charge").unwrap();
        host.reward_usage(&usage(&id))
            .await
            .expect("on-usage")
            .unwrap();
    }
    for slot in Slot::ALL {
        assert_eq!(status(&host, slot).faults.host, 0, "{slot}");
    }
}

/// A warm instance parses its configuration once (the SDK's `config::cached`); a new
/// configuration is a new version, whose calls never reach the old version's instances.
#[tokio::test]
async fn a_new_configuration_reaches_warm_plugins() {
    let host = host_with(Arc::new(MemoryStore::new()), config()).await;
    let mut credits = Vec::new();
    for (price, id) in [(1.0, "a"), (1.0, "b"), (3.0, "c"), (3.0, "d")] {
        let config =
            format!(r#"{{"default_price": {{"prompt": {price}, "completion": {price}}}}}"#);
        host.install(Slot::Meter, components::METER, &config, "test")
            .await
            .unwrap();
        credits.push(host.charge(&usage(id)).await.unwrap().unwrap().credits);
    }
    assert!(credits[0] > 0.0);
    assert_eq!(credits[0], credits[1]);
    assert_eq!(credits[2], credits[0] * 3.0, "{credits:?}");
    assert_eq!(credits[3], credits[2]);
}

/// Calls that never yield starve the task that tears used instances down; those instances
/// still hold pool slots. A small pool must not run dry of them: each version keeps only a
/// share of the pool waiting, and a call that finds the pool full tears its version's down.
#[tokio::test]
async fn a_starved_refill_cannot_run_the_instance_pool_dry() {
    let cands = candidates(8);
    for max_instances in [4, 8, 32] {
        let mut config = config();
        config.max_instances = max_instances;
        let host = host_with(Arc::new(MemoryStore::new()), config).await;
        host.install(Slot::Router, components::ROUTER_ROUND_ROBIN, "{}", "test")
            .await
            .unwrap();
        // No yield between calls: the refill tasks they spawn do not run until the end.
        for call in 0..200 {
            assert!(
                route(&host, "m", &cands).await.is_some(),
                "call {call} with a pool of {max_instances} fell back"
            );
        }
    }
}

/// Prints the cost of a fresh instance plus a call (and of a warm instance) for each default
/// plugin, with 100 candidates for routers. Run in release to read real numbers.
#[tokio::test]
async fn latency_of_each_default_plugin() {
    let iterations = if cfg!(debug_assertions) { 30 } else { 2000 };
    let cands = candidates(100);
    let thousand = candidates(1000);
    let limits = r#"{"rpm": 1000000000, "tpm": 1000000000000}"#;
    for warm in [false, true] {
        let mut config = config();
        for limits in [
            &mut config.router,
            &mut config.rate_limiter,
            &mut config.meter,
            &mut config.reward,
        ] {
            limits.isolation = if warm {
                Isolation::Warm
            } else {
                Isolation::PerCall
            };
            // A measurement, not a test of deadlines: a fresh instance routing 1,000 candidates
            // in a debug build on a loaded machine may take longer than the hot path's 200 ms.
            limits.deadline_ms = Some(20_000);
        }
        let host = host_with(Arc::new(MemoryStore::new()), config).await;
        let mode = if warm {
            "warm instance"
        } else {
            "fresh instance"
        };
        for (name, router) in [
            ("router-round-robin", components::ROUTER_ROUND_ROBIN),
            ("router-least-loaded", components::ROUTER_LEAST_LOADED),
            ("router-prefix-affinity", components::ROUTER_PREFIX_AFFINITY),
        ] {
            host.install(Slot::Router, router, "{}", "bench")
                .await
                .unwrap();
            let stats = measure(iterations, || async {
                assert!(route(&host, "m", &cands).await.is_some());
            })
            .await;
            println!("{name:<24} {mode:<15} 100 candidates  {stats}");
            let stats = measure(iterations / 4, || async {
                assert!(route(&host, "m", &thousand).await.is_some());
            })
            .await;
            println!("{name:<24} {mode:<15} 1000 candidates {stats}");
        }
        // The same router asking who every candidate is (`candidates.describe`), as it does
        // when configured to prefer some labels: the cost of the strings a router reads.
        host.install(
            Slot::Router,
            components::ROUTER_LEAST_LOADED,
            r#"{"prefer": {"region": "eu"}}"#,
            "bench",
        )
        .await
        .unwrap();
        let stats = measure(iterations, || async {
            assert!(route(&host, "m", &cands).await.is_some());
        })
        .await;
        println!(
            "{:<24} {mode:<15} 100, describes  {stats}",
            "router-least-loaded"
        );
        host.install(Slot::RateLimiter, components::RATE_LIMITER, "{}", "bench")
            .await
            .unwrap();
        let mut n = 0u64;
        let stats = measure(iterations, || {
            n += 1;
            let id = format!("req-{n}");
            let host = &host;
            async move {
                assert!(host.admit(&admission(&id, limits)).await.unwrap().allow);
            }
        })
        .await;
        println!("{:<24} {mode:<15} admit           {stats}", "rate-limiter");
        host.install(Slot::Meter, components::METER, "{}", "bench")
            .await
            .unwrap();
        let stats = measure(iterations, || async {
            host.charge(&usage("r")).await.unwrap().unwrap();
        })
        .await;
        println!("{:<24} {mode:<15} charge          {stats}", "meter");
        host.install(Slot::Reward, components::REWARD, "{}", "bench")
            .await
            .unwrap();
        let stats = measure(iterations, || async {
            host.reward_usage(&usage("r")).await.unwrap().unwrap();
        })
        .await;
        println!("{:<24} {mode:<15} on-usage        {stats}", "reward");
    }
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
        // Between requests the host makes the next fresh instances (`ready_instances`), off
        // the timed path, as it does between a gateway's requests.
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
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

// ---- garage:policy@0.3.0: lists of events, settles only when needed ------------------------

/// Usage events, their request ids `prefix0`, `prefix1`... and their models as given.
fn events(prefix: &str, models: &[&str]) -> Vec<UsageEvent> {
    models
        .iter()
        .enumerate()
        .map(|(i, model)| UsageEvent {
            model: (*model).to_owned(),
            ..usage(&format!("{prefix}{i}"))
        })
        .collect()
}

/// The default meter and reward (0.4.0; lists since 0.3.0) take the events of a batch in one call each, in calls
/// of at most 64 events, and answer each event as they would alone.
#[tokio::test]
async fn a_batch_of_events_is_one_call_of_the_meter_and_of_the_reward() {
    let host = host_with(Arc::new(MemoryStore::new()), config()).await;
    let prices = r#"{"default_price": {"prompt": 1.0, "completion": 1.0}}"#;
    host.install(Slot::Meter, components::METER, prices, "test")
        .await
        .unwrap();
    host.install(Slot::Reward, components::REWARD, "{}", "test")
        .await
        .unwrap();
    let alone = host.charge(&usage("alone")).await.unwrap().unwrap();
    let awarded = host.reward_usage(&usage("alone")).await.unwrap().unwrap();
    let (meter_calls, reward_calls) = (
        status(&host, Slot::Meter).calls,
        status(&host, Slot::Reward).calls,
    );

    let batch = events("b", &["m"; 10]);
    let charges = host.charge_many(&batch).await.unwrap();
    let awards = host.reward_usage_many(&batch).await.unwrap();
    assert_eq!(charges.len(), 10);
    assert_eq!(awards.len(), 10);
    for (charge, award) in charges.iter().zip(&awards) {
        assert_eq!(charge.as_ref().unwrap().credits, alone.credits);
        assert_eq!(award.as_ref().unwrap(), &awarded);
    }
    assert_eq!(status(&host, Slot::Meter).calls, meter_calls + 1);
    assert_eq!(status(&host, Slot::Reward).calls, reward_calls + 1);

    let hundred = events("c", &["m"; 100]);
    let charges = host.charge_many(&hundred).await.unwrap();
    assert!(charges.iter().all(Result::is_ok));
    assert_eq!(
        status(&host, Slot::Meter).calls,
        meter_calls + 8,
        "100 events: six calls of 16 and one of 4"
    );
}

/// A hostile meter in a batch: the events it refuses fail alone; a trap fails every event of
/// its call (and counts once towards a rollback), which the usage worker then retries.
#[tokio::test]
async fn a_batch_fails_only_where_the_meter_failed() {
    let host = host_with(Arc::new(MemoryStore::new()), config()).await;
    host.install(Slot::Meter, components::PICKY_METER, "{}", "test")
        .await
        .unwrap();
    let charges = host
        .charge_many(&events("p", &["m", "refused", "m", "refused", "m"]))
        .await
        .unwrap();
    let ok: Vec<bool> = charges.iter().map(Result::is_ok).collect();
    assert_eq!(ok, [true, false, true, false, true]);
    let refused = charges[1].as_ref().unwrap_err();
    assert_eq!(refused.kind, FaultKind::PluginError);
    assert!(refused.message.contains("refused"), "{refused}");

    let charges = host
        .charge_many(&events("t", &["m", "trap", "m"]))
        .await
        .unwrap();
    assert!(
        charges
            .iter()
            .all(|c| c.as_ref().is_err_and(|f| f.kind == FaultKind::Trap)),
        "{charges:?}"
    );
    let faults = status(&host, Slot::Meter).faults;
    assert_eq!((faults.trap, faults.plugin_error), (1, 2));
}

/// A meter built against 0.3.0 (before trust reached the plugins) still loads, and gets the
/// gateway's events converted down field for field, in lists.
#[tokio::test]
async fn a_meter_of_an_older_contract_gets_the_events_converted_down() {
    let host = host_with(Arc::new(MemoryStore::new()), config()).await;
    host.install(Slot::Meter, components::METER_V0_3, "{}", "test")
        .await
        .unwrap();
    let mut batch = events("old", &["m", "m", "m"]);
    for (i, event) in batch.iter_mut().enumerate() {
        event.prompt_tokens = 1000 * (i as u64 + 1);
        event.completion_tokens = 500;
        event.trust = garage_gateway::plugins::Trust::Suspect;
    }
    let charges = host.charge_many(&batch).await.unwrap();
    let credits: Vec<f64> = charges
        .iter()
        .map(|c| c.as_ref().unwrap().credits)
        .collect();
    assert_eq!(credits, [1.5, 2.5, 3.5]);
    assert_eq!(status(&host, Slot::Meter).calls, 1, "one call for the list");
}

// ---- garage:policy@0.5.0: quotes, the market, budgets in the charge ------------------------

fn market(model: &str, in_flight: u32) -> garage_gateway::plugins::Market {
    garage_gateway::plugins::Market {
        model: model.into(),
        rigs: 1,
        capacity_tokens_per_second: 50.0,
        utilization: 0.0,
        queue_depth: 0,
        in_flight,
        demand_requests_per_minute: 0.0,
    }
}

/// The default meter quotes its table's price, moved by the market the host hands it; the
/// host keeps a version's quote for a model about a second (one call for many requests), and
/// a new version quotes afresh.
#[tokio::test]
async fn the_meter_quotes_by_the_market_and_a_quote_is_kept_for_a_second() {
    let host = host_with(Arc::new(MemoryStore::new()), config()).await;
    let meter = r#"{"default_price": {"prompt": 1.0, "completion": 2.0}, "batch_discount": 0.5,
        "market": {"interval_ms": 0, "smoothing": 1.0, "slots_per_rig": 4}}"#;
    host.install(Slot::Meter, components::METER, meter, "test")
        .await
        .unwrap();
    let calls = status(&host, Slot::Meter).calls;
    // Four requests in flight on four slots: as busy as can be, three times the table.
    let busy = host
        .quote("r1", "m", false, || market("m", 4))
        .await
        .unwrap();
    assert_eq!((busy.prompt_per_1k, busy.completion_per_1k), (3.0, 6.0));
    // Kept: the market is not even asked.
    let kept = host
        .quote("r2", "m", false, || {
            unreachable!("a kept quote asks no market")
        })
        .await;
    assert_eq!(kept, Some(busy));
    assert_eq!(status(&host, Slot::Meter).calls, calls + 1);
    // A batch line's quote is its own: the table's with the discount, whatever the market.
    let batch = host
        .quote("r3", "m", true, || market("m", 4))
        .await
        .unwrap();
    assert_eq!(batch.prompt_per_1k, 0.5);
    // Another model is another quote: idle, half the table.
    let idle = host
        .quote("r4", "other", false, || market("other", 0))
        .await
        .unwrap();
    assert_eq!(idle.prompt_per_1k, 0.5);
    // A new version (another configuration) quotes afresh.
    host.install(
        Slot::Meter,
        components::METER,
        r#"{"default_price": {"prompt": 7.0, "completion": 7.0}}"#,
        "test",
    )
    .await
    .unwrap();
    let fresh = host
        .quote("r5", "m", false, || market("m", 4))
        .await
        .unwrap();
    assert_eq!(fresh.prompt_per_1k, 7.0);
}

/// A quote that makes no sense (an error, a trap, NaN, a negative price) or none at all: the
/// request is quoted nothing (its charge decides), each fault is counted like any other, and
/// what was not quoted is not kept as if it were a price.
#[tokio::test]
async fn a_hostile_quote_quotes_nothing_and_counts_as_a_fault() {
    let host = host_with(Arc::new(MemoryStore::new()), config()).await;
    host.install(Slot::Meter, components::PICKY_METER, "{}", "test")
        .await
        .unwrap();
    for model in ["refused", "trap", "nan", "negative", "none"] {
        let quote = host.quote(model, model, false, || market(model, 0)).await;
        assert_eq!(quote, None, "{model}");
    }
    let faults = status(&host, Slot::Meter).faults;
    assert_eq!(
        (faults.plugin_error, faults.trap, faults.bad_output),
        (1, 1, 2),
        "{faults:?}"
    );
    // A fine quote from the same meter, and the charge at it.
    let price = host
        .quote("ok", "m", false, || market("m", 0))
        .await
        .unwrap();
    assert_eq!((price.prompt_per_1k, price.completion_per_1k), (2.0, 4.0));
    let event = UsageEvent {
        prompt_tokens: 1000,
        completion_tokens: 500,
        price: Some(garage_gateway::plugins::QuotedPrice {
            prompt_per_thousand: price.prompt_per_1k,
            completion_per_thousand: price.completion_per_1k,
        }),
        ..usage("quoted")
    };
    assert_eq!(host.charge(&event).await.unwrap().unwrap().credits, 4.0);
}

/// A meter built against 0.4.0 (before quotes) still loads: it quotes nothing, without a
/// fault, and its charges come up with their reset time and no budgets.
#[tokio::test]
async fn a_meter_of_0_4_quotes_nothing_and_its_charges_convert_up() {
    let host = host_with(Arc::new(MemoryStore::new()), config()).await;
    host.install(Slot::Meter, components::METER_V0_4, "{}", "test")
        .await
        .unwrap();
    assert_eq!(host.quote("q", "m", false, || market("m", 0)).await, None);
    let mut batch = events("old4", &["m", "m"]);
    batch[0].request_id = "spent@1800000000000".into();
    batch[0].trust = garage_gateway::plugins::Trust::Verified;
    batch[1].trust = garage_gateway::plugins::Trust::Suspect;
    let charges: Vec<_> = host
        .charge_many(&batch)
        .await
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(charges[0].credits, 1.5);
    assert!(charges[0].budget_exhausted);
    assert_eq!(charges[0].exhausted_until_ms, Some(1_800_000_000_000));
    assert!(
        !charges[1].budget_exhausted,
        "the trust reached it: {charges:?}"
    );
    assert!(charges.iter().all(|c| c.budgets.is_empty()));
    let faults = status(&host, Slot::Meter).faults;
    assert_eq!(faults.plugin_error + faults.trap + faults.bad_output, 0);
}

/// The default meter's charge reports the key's budgets and how much of each is used.
#[tokio::test]
async fn the_charge_reports_the_keys_budgets() {
    let host = host_with(Arc::new(MemoryStore::new()), config()).await;
    host.install(
        Slot::Meter,
        components::METER,
        r#"{"default_budget": 10.0, "period_budgets": {"day": 4.0}}"#,
        "test",
    )
    .await
    .unwrap();
    let charge = host.charge(&usage("budgets")).await.unwrap().unwrap();
    let used: Vec<_> = charge
        .budgets
        .iter()
        .map(|b| (b.period, b.spent, b.limit, b.starts_at_ms.is_some()))
        .collect();
    use garage_gateway::plugins::BudgetPeriod;
    assert_eq!(
        used,
        [
            (BudgetPeriod::Lifetime, charge.credits, 10.0, false),
            (BudgetPeriod::Day, charge.credits, 4.0, true),
        ]
    );
}

/// A limiter of 0.3.0 that reserved no tokens says so, and the gateway makes no settle call
/// for the request; one that reserved tokens gets its settle.
#[tokio::test]
async fn a_request_without_a_token_reservation_needs_no_settle() {
    let host = host_with(Arc::new(MemoryStore::new()), config()).await;
    host.install(
        Slot::RateLimiter,
        components::RATE_LIMITER,
        r#"{"rpm": 100}"#,
        "test",
    )
    .await
    .unwrap();
    let garage_gateway::plugins::LimiterAnswer {
        decision,
        reservation,
        ..
    } = host.admit_reserving(&admission("n1", "{}")).await.unwrap();
    assert!(decision.allow);
    assert!(reservation.is_none(), "requests only: nothing to settle");

    host.install(
        Slot::RateLimiter,
        components::RATE_LIMITER,
        r#"{"tpm": 100000}"#,
        "test",
    )
    .await
    .unwrap();
    let garage_gateway::plugins::LimiterAnswer {
        decision,
        reservation,
        ..
    } = host.admit_reserving(&admission("n2", "{}")).await.unwrap();
    assert!(decision.allow);
    assert!(reservation.is_some(), "tokens reserved: settle them");
}
