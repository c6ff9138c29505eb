//! Usage events: queued durably, processed once into the ledger, readable through the API.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use crate::support::*;
use async_trait::async_trait;
use garage_gateway::ledger::{Award, LEDGER, Outcome, Usage, UsageEvent, UsageProcessor};
use garage_gateway::store::{MemoryStore, QueueItem, Store};
use serde_json::json;

fn event(id: &str, key: &str) -> UsageEvent {
    UsageEvent {
        request_id: id.into(),
        key_id: key.into(),
        model: "m".into(),
        prompt_tokens: 10,
        completion_tokens: 5,
        cached_tokens: 0,
        latency_ms: 20,
        ttft_ms: 5,
        backend: "b".into(),
        rig: "node_1".into(),
        operator: "op".into(),
        started_at_ms: 1_795_329_644_000,
        finished_at_ms: 1_795_329_644_020,
        batch: false,
        counted: Default::default(),
        trust: None,
        price: None,
    }
}

/// Charges a credit per event and a point per token, counting calls; can be made to fail.
#[derive(Default)]
struct Counting {
    calls: AtomicUsize,
    failing: AtomicBool,
}

#[async_trait]
impl UsageProcessor for Counting {
    async fn process(&self, event: &UsageEvent) -> Result<Outcome, String> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self.failing.load(Ordering::SeqCst) {
            return Err("meter plugin faulted".into());
        }
        Ok(Outcome {
            credits: 1.5,
            budget_exhausted: false,
            awards: vec![Award {
                operator: event.operator.clone(),
                points: (event.prompt_tokens + event.completion_tokens) as f64,
                reason: "tokens".into(),
            }],
        })
    }
}

async fn queue_raw(store: &Arc<dyn Store>, event: &UsageEvent) {
    let item = QueueItem {
        id: event.request_id.clone(),
        payload: serde_json::to_vec(event).unwrap(),
    };
    store.queue_push("usage_queue", &[item]).await.unwrap();
}

#[tokio::test]
async fn an_event_is_charged_once_however_often_it_is_queued() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let usage = Usage::new(store.clone());
    let processor = Counting::default();
    queue_raw(&store, &event("r1", "k1")).await;
    assert_eq!(usage.work_once(&processor).await.unwrap(), 1);
    // Delivered again (a replica crashed after processing, before dequeuing).
    queue_raw(&store, &event("r1", "k1")).await;
    usage.work_once(&processor).await.unwrap();
    assert_eq!(processor.calls.load(Ordering::SeqCst), 1, "charged twice");
    assert_eq!(usage.queued_len().await.unwrap(), 0);
    let daily = usage.daily(Some("k1")).await.unwrap();
    assert_eq!(daily.len(), 1);
    assert_eq!(
        (daily[0].requests, daily[0].prompt_tokens, daily[0].credits),
        (1, 10, 1.5)
    );
    assert_eq!(daily[0].day, "2026-11-22");
    let board = usage.leaderboard().await.unwrap();
    assert_eq!((board[0].operator.as_str(), board[0].points), ("op", 15.0));
    let entry = usage.ledger_entry("r1").await.unwrap().unwrap();
    assert_eq!(entry.outcome.credits, 1.5);
}

#[tokio::test]
async fn a_failing_processor_leaves_events_queued_until_it_recovers() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let usage = Usage::new(store.clone());
    let processor = Counting::default();
    processor.failing.store(true, Ordering::SeqCst);
    queue_raw(&store, &event("r1", "k1")).await;
    queue_raw(&store, &event("r2", "k1")).await;
    assert_eq!(usage.work_once(&processor).await.unwrap(), 0);
    assert_eq!(usage.queued_len().await.unwrap(), 2);
    processor.failing.store(false, Ordering::SeqCst);
    assert_eq!(usage.work_once(&processor).await.unwrap(), 2);
    assert_eq!(usage.daily(None).await.unwrap()[0].requests, 2);
}

/// Fails on the events it is told to, succeeds on the others.
struct FailingOn(&'static str, Counting);

#[async_trait]
impl UsageProcessor for FailingOn {
    async fn process(&self, event: &UsageEvent) -> Result<Outcome, String> {
        if event.request_id == self.0 {
            return Err("meter plugin faulted".into());
        }
        self.1.process(event).await
    }
}

#[tokio::test]
async fn one_leased_batch_mixes_replayed_new_and_failing_events() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let usage = Usage::new(store.clone());
    let processor = FailingOn("r4", Counting::default());
    queue_raw(&store, &event("r1", "k1")).await;
    assert_eq!(usage.work_once(&processor).await.unwrap(), 1);
    // One batch: r1 again (replayed), r2 and r3 new, r4 faulting, r5 after the fault. The
    // events of a batch are processed concurrently: r5 is charged and recorded like r2 and r3.
    for id in ["r1", "r2", "r3", "r4", "r5"] {
        queue_raw(&store, &event(id, "k1")).await;
    }
    assert_eq!(usage.work_once(&processor).await.unwrap(), 4);
    assert_eq!(
        processor.1.calls.load(Ordering::SeqCst),
        4,
        "r1 charged once, r2, r3 and r5 once each"
    );
    // The fault stays queued, for a later pass.
    assert_eq!(usage.queued_len().await.unwrap(), 1);
    assert!(usage.ledger_entry("r4").await.unwrap().is_none());
    assert!(usage.ledger_entry("r5").await.unwrap().is_some());
    assert_eq!(usage.daily(Some("k1")).await.unwrap()[0].requests, 4);

    let recovered = Counting::default();
    assert_eq!(usage.work_once(&recovered).await.unwrap(), 1);
    assert_eq!(recovered.calls.load(Ordering::SeqCst), 1, "only r4 again");
    assert_eq!(usage.queued_len().await.unwrap(), 0);
    let daily = usage.daily(Some("k1")).await.unwrap();
    assert_eq!((daily[0].requests, daily[0].prompt_tokens), (5, 50));
}

#[tokio::test]
async fn in_process_events_reach_the_ledger_without_the_store_queue() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let usage = Usage::in_process(store.clone());
    let processor = Counting::default();
    for id in ["r1", "r2", "r3"] {
        usage.record(event(id, "k1"));
    }
    assert_eq!(usage.queued_len().await.unwrap(), 3);
    assert_eq!(usage.work_once(&processor).await.unwrap(), 3);
    assert_eq!(usage.queued_len().await.unwrap(), 0);
    let queue = store.queue_counts("usage_queue").await.unwrap();
    assert_eq!((queue.waiting, queue.leased), (0, 0));
    assert_eq!(store.record_count(LEDGER).await.unwrap(), 3);
    let daily = usage.daily(Some("k1")).await.unwrap();
    assert_eq!((daily[0].requests, daily[0].credits), (3, 4.5));
    assert_eq!(usage.leaderboard().await.unwrap()[0].points, 45.0);
}

#[tokio::test]
async fn in_process_a_failed_event_waits_for_a_later_pass_ahead_of_newer_ones() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let usage = Usage::in_process(store.clone());
    for id in ["r1", "r2", "r3", "r4"] {
        usage.record(event(id, "k1"));
    }
    let processor = FailingOn("r2", Counting::default());
    assert_eq!(usage.work_once(&processor).await.unwrap(), 3);
    // The fault waits for a later pass, ahead of newer events.
    usage.record(event("r5", "k1"));
    assert_eq!(usage.queued_len().await.unwrap(), 2);
    assert!(usage.ledger_entry("r2").await.unwrap().is_none());

    let order = Recording::default();
    assert_eq!(usage.work_once(&order).await.unwrap(), 2);
    assert_eq!(*order.ids.lock().unwrap(), ["r2", "r5"]);
    assert_eq!(usage.daily(Some("k1")).await.unwrap()[0].requests, 5);
}

/// Succeeds on every event, noting the order it saw them in.
#[derive(Default)]
struct Recording {
    ids: std::sync::Mutex<Vec<String>>,
}

#[async_trait]
impl UsageProcessor for Recording {
    async fn process(&self, event: &UsageEvent) -> Result<Outcome, String> {
        self.ids.lock().unwrap().push(event.request_id.clone());
        Ok(Outcome::default())
    }
}

#[tokio::test]
async fn usage_of_the_last_requests_is_queued_at_shutdown() {
    let redis = RedisServer::start();
    let engine = fast_sim().await;
    let mut cfg = config(vec![upstream("a", engine.base_url())]);
    cfg.store = redis.url();
    cfg.auth.key_secret = Some("s".into());
    let gw = gateway(cfg).await;
    let (key_id, key) = create_key(&gw.url(), json!({"name": "t"})).await;
    for _ in 0..5 {
        assert_eq!(post_chat(&gw.url(), &key, &chat(false)).await.0, 200);
    }
    // Straight after the last answer: the flusher may still be gathering events.
    assert!(gw.shutdown(Duration::from_secs(5)).await);

    let store = garage_gateway::store::open(&redis.url(), &[])
        .await
        .unwrap();
    let usage = Usage::new(store);
    usage.work_once(&Counting::default()).await.unwrap();
    let daily = usage.daily(Some(&key_id)).await.unwrap();
    assert_eq!(daily.iter().map(|d| d.requests).sum::<u64>(), 5);
}

/// Sends a plain chat (with the client's own `x-request-id`, if any); returns the request id
/// the gateway answered with.
async fn chat_request_id(base: &str, key: &str, client_id: Option<&str>) -> String {
    let mut request = client()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&chat(false));
    if let Some(client_id) = client_id {
        request = request.header("x-request-id", client_id);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned()
}

async fn wait_for_ledger_entry(base: &str, id: &str) {
    wait_until(Duration::from_secs(10), "ledger entry", || async {
        admin_get(base, &format!("/admin/usage/requests/{id}")).await["event"]["request_id"] == id
    })
    .await;
}

#[tokio::test]
async fn keys_read_their_own_usage_and_admins_read_all() {
    let engine = fast_sim().await;
    let gw = gateway(config(vec![upstream("a", engine.base_url())])).await;
    let base = gw.url();
    let (alice_id, alice) = create_key(&base, json!({"name": "alice"})).await;
    let (_, bob) = create_key(&base, json!({"name": "bob"})).await;
    assert_eq!(post_chat(&base, &alice, &chat(false)).await.0, 200);
    assert_eq!(post_chat(&base, &alice, &chat(true)).await.0, 200);
    assert_eq!(post_chat(&base, &bob, &chat(false)).await.0, 200);

    let own = |key: String| {
        let base = base.clone();
        async move {
            client()
                .get(format!("{base}/v1/usage"))
                .bearer_auth(key)
                .send()
                .await
                .unwrap()
                .json::<serde_json::Value>()
                .await
                .unwrap()
        }
    };
    wait_until(Duration::from_secs(10), "usage processed", || async {
        own(alice.clone()).await["data"][0]["requests"] == 2
    })
    .await;
    let mine = own(alice.clone()).await;
    let rows = mine["data"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "alice sees only her own usage: {mine}");
    assert_eq!(rows[0]["key_id"], alice_id.as_str());
    assert_eq!(rows[0]["model"], MODEL);
    // Both requests metered, the streamed one included: 5 completion tokens each.
    assert_eq!(rows[0]["completion_tokens"], 10);

    wait_until(Duration::from_secs(10), "all usage processed", || async {
        let all = admin_get(&base, "/admin/usage").await;
        all["data"].as_array().map(Vec::len) == Some(2)
    })
    .await;
    let filtered = admin_get(&base, &format!("/admin/usage?key_id={alice_id}")).await;
    assert_eq!(filtered["data"].as_array().unwrap().len(), 1);
    let refused = client()
        .get(format!("{base}/admin/usage"))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);

    // Each request's ledger entry is there under the request id the gateway minted. A client
    // repeating its own x-request-id is charged for every request, not once.
    let mut ids = Vec::new();
    for _ in 0..2 {
        ids.push(chat_request_id(&base, &bob, Some("ledger-probe-1")).await);
    }
    assert_ne!(ids[0], ids[1]);
    for id in &ids {
        wait_for_ledger_entry(&base, id).await;
    }
    wait_until(Duration::from_secs(10), "bob charged for both", || async {
        own(bob.clone()).await["data"][0]["requests"] == 3
    })
    .await;
}

#[tokio::test]
async fn the_embedded_ledger_keeps_the_newest_entries_and_all_totals() {
    let engine = fast_sim().await;
    let mut cfg = config(vec![upstream("a", engine.base_url())]);
    cfg.usage.ledger_max_entries = 2;
    let gw = gateway(cfg).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "t"})).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let id = chat_request_id(&base, &key, None).await;
        // One at a time, so the ledger's insertion order is the requests' order.
        wait_for_ledger_entry(&base, &id).await;
        ids.push(id);
    }
    let oldest = client()
        .get(format!("{base}/admin/usage/requests/{}", ids[0]))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(oldest.status(), 404);
    for id in &ids[1..] {
        let entry = admin_get(&base, &format!("/admin/usage/requests/{id}")).await;
        assert_eq!(entry["event"]["request_id"], id.as_str());
    }
    // The totals are counters, not a view of the kept entries.
    let all = admin_get(&base, "/admin/usage").await;
    assert_eq!(all["data"][0]["requests"], 3, "{all}");
    // The usage export refers to the ledger's entries on this store: the dropped one is left
    // out, not an error, and the kept ones are whole.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let response = client()
        .get(format!(
            "{base}/admin/usage/events?from={}&to={}",
            now - 600,
            now + 1
        ))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let csv = response.text().await.unwrap();
    let mut exported: Vec<&str> = csv
        .lines()
        .skip(1)
        .map(|row| row.split(',').next().unwrap())
        .collect();
    exported.sort_unstable();
    let mut kept: Vec<&str> = ids[1..].iter().map(String::as_str).collect();
    kept.sort_unstable();
    assert_eq!(exported, kept, "{csv}");
    assert!(csv.lines().skip(1).all(|row| row.contains(MODEL)), "{csv}");
}

/// Charges like the default meter: marks the request charged (`charged:<id>` in the meter's
/// namespace) and adds to the spend only if the mark is new; then fails, once, on the events it
/// is told to, as a reward plugin that faults after the meter charged.
struct MarkingMeter {
    store: Arc<dyn Store>,
    fail_once: std::sync::Mutex<Vec<&'static str>>,
}

const MARK_PREFIX: &str = "plugin:meter:charged:";

/// A priced outcome, unless `request_id` is one of `fail_once` (taken off it): then the error
/// of a reward plugin that faults after the meter charged.
fn fail_once(
    fail_once: &std::sync::Mutex<Vec<&'static str>>,
    request_id: &str,
) -> Result<Outcome, String> {
    let mut fail_once = fail_once.lock().unwrap();
    if let Some(at) = fail_once.iter().position(|id| *id == request_id) {
        fail_once.remove(at);
        return Err("reward plugin faulted".into());
    }
    Ok(Outcome {
        credits: 1.0,
        ..Outcome::default()
    })
}

#[async_trait]
impl UsageProcessor for MarkingMeter {
    async fn process(&self, event: &UsageEvent) -> Result<Outcome, String> {
        let mark = format!("{MARK_PREFIX}{}", event.request_id);
        let first = self
            .store
            .kv_reserve(&mark, 1, 1, Some(Duration::from_secs(3600)))
            .await
            .map_err(|e| e.to_string())?
            .is_some();
        if first {
            self.store
                .kv_incr("spent", 1, None)
                .await
                .map_err(|e| e.to_string())?;
        }
        fail_once(&self.fail_once, &event.request_id)
    }
}

#[tokio::test]
async fn in_process_a_redelivered_event_is_charged_once_and_its_mark_goes_with_its_entry() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let usage = Usage::in_process(store.clone());
    let meter = MarkingMeter {
        store: store.clone(),
        fail_once: std::sync::Mutex::new(vec!["r2"]),
    };
    for id in ["r1", "r2", "r3"] {
        usage.record(event(id, "k1"));
    }
    assert_eq!(usage.work_once(&meter).await.unwrap(), 2);
    let mark = |id: &str| {
        let store = store.clone();
        let key = format!("{MARK_PREFIX}{id}");
        async move { store.kv_get(&key).await.unwrap() }
    };
    // Written: their marks dropped. r2 was charged, then failed: its mark stays while it waits,
    // however long that is, so that its redelivery is not charged again.
    assert_eq!(mark("r1").await, None);
    assert_eq!(mark("r3").await, None);
    assert!(mark("r2").await.is_some());
    assert_eq!(usage.queued_len().await.unwrap(), 1);

    assert_eq!(usage.work_once(&meter).await.unwrap(), 1);
    assert_eq!(
        garage_gateway::store::read_counter(store.as_ref(), "spent")
            .await
            .unwrap(),
        3,
        "r2 charged once over two deliveries"
    );
    assert_eq!(mark("r2").await, None);
    assert_eq!(store.record_count(LEDGER).await.unwrap(), 3);
    assert_eq!(usage.daily(Some("k1")).await.unwrap()[0].requests, 3);
}

#[tokio::test]
async fn on_a_shared_store_the_meters_marks_are_left_to_expire() {
    // Through the store's queue (as on Redis) a replica that dies leaves its events to
    // another: the marks are the meter's to keep, the ledger does not drop them.
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let usage = Usage::new(store.clone());
    let meter = MarkingMeter {
        store: store.clone(),
        fail_once: std::sync::Mutex::new(Vec::new()),
    };
    queue_raw(&store, &event("r1", "k1")).await;
    assert_eq!(usage.work_once(&meter).await.unwrap(), 1);
    assert!(
        store
            .kv_get(&format!("{MARK_PREFIX}r1"))
            .await
            .unwrap()
            .is_some()
    );
}

/// Settles each event into one account, as the gateway does once the meter priced it; then
/// fails, once, on the events it is told to (a failure after the debit: harsher than the
/// gateway, which settles last).
struct SettlingMeter {
    store: Arc<dyn Store>,
    fail_once: std::sync::Mutex<Vec<&'static str>>,
}

#[async_trait]
impl UsageProcessor for SettlingMeter {
    async fn process(&self, event: &UsageEvent) -> Result<Outcome, String> {
        settle_once(&self.store, &event.request_id)
            .await
            .map_err(|e| e.to_string())?;
        fail_once(&self.fail_once, &event.request_id)
    }
}

/// Debits one micro-credit for `request_id` from account `acct`; true when it did (false: the
/// store remembers the request as settled).
async fn settle_once(
    store: &Arc<dyn Store>,
    request_id: &str,
) -> Result<bool, garage_gateway::store::StoreError> {
    use garage_gateway::store::{SettleOutcome, SettleRequest};
    let outcome = store
        .account_settle(&SettleRequest {
            account: "acct",
            request_id,
            charge: 1,
            now_ms: 1,
            periods: &[],
            remember_until_ms: 24 * 3600 * 1000,
        })
        .await?;
    Ok(matches!(outcome, SettleOutcome::Settled { .. }))
}

#[tokio::test]
async fn in_process_a_settlement_is_remembered_until_its_entry_is_written() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let usage = Usage::in_process(store.clone());
    let meter = SettlingMeter {
        store: store.clone(),
        fail_once: std::sync::Mutex::new(vec!["r2"]),
    };
    for id in ["r1", "r2", "r3"] {
        usage.record(event(id, "k1"));
    }
    assert_eq!(usage.work_once(&meter).await.unwrap(), 2);
    // r2 was debited, then failed: remembered while it waits, so that its redelivery is not
    // debited again.
    assert!(!settle_once(&store, "r2").await.unwrap());
    assert_eq!(usage.work_once(&meter).await.unwrap(), 1);
    let money = store.account_money("acct", 1, &[]).await.unwrap();
    assert_eq!(money.spent, 3, "r2 debited once over two deliveries");
    assert_eq!(store.record_count(LEDGER).await.unwrap(), 3);
    // Written, all three are forgotten: a probe settles each anew (nothing in the gateway
    // settles a request whose entry the ledger has: the worker skips it).
    for id in ["r1", "r2", "r3"] {
        assert!(settle_once(&store, id).await.unwrap(), "{id} forgotten");
    }
}

#[tokio::test]
async fn on_a_shared_store_settlements_are_left_to_expire() {
    // As the meter's marks: through the store's queue another replica may take an event over.
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let usage = Usage::new(store.clone());
    let meter = SettlingMeter {
        store: store.clone(),
        fail_once: std::sync::Mutex::new(Vec::new()),
    };
    queue_raw(&store, &event("r1", "k1")).await;
    assert_eq!(usage.work_once(&meter).await.unwrap(), 1);
    assert!(
        !settle_once(&store, "r1").await.unwrap(),
        "still remembered"
    );
}

#[tokio::test]
async fn the_default_meters_marks_leave_the_embedded_store_with_their_requests() {
    let engine = fast_sim().await;
    let mut cfg = config(vec![upstream("a", engine.base_url())]);
    cfg.default_plugins = true;
    let gw = gateway(cfg).await;
    let base = gw.url();
    let (key_id, key) = create_key(&base, json!({"name": "t"})).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(chat_request_id(&base, &key, None).await);
    }
    for id in &ids {
        wait_for_ledger_entry(&base, id).await;
    }
    let store = gw.state().store().clone();
    for id in &ids {
        let entry = gw.state().usage().ledger_entry(id).await.unwrap().unwrap();
        assert!(entry.outcome.credits > 0.0, "charged: {entry:?}");
        assert_eq!(
            store.kv_get(&format!("{MARK_PREFIX}{id}")).await.unwrap(),
            None
        );
    }
    // The spend holds the three charges.
    let spent = garage_gateway::store::read_counter(
        store.as_ref(),
        &format!("plugin:meter:spent:{key_id}"),
    )
    .await
    .unwrap();
    assert!(spent > 0, "{spent}");
}

#[tokio::test]
async fn a_store_outage_loses_no_usage() {
    let redis = RedisServer::start();
    let port = redis.port;
    let engine = fast_sim().await;
    let mut cfg = config(vec![upstream("a", engine.base_url())]);
    cfg.store = redis.url();
    cfg.auth.key_secret = Some("s".into());
    let gw = gateway(cfg).await;
    let base = gw.url();
    let (key_id, key) = create_key(&base, json!({"name": "t"})).await;
    // Cached now: requests authenticate without the store.
    assert_eq!(post_chat(&base, &key, &chat(false)).await.0, 200);

    drop(redis);
    for _ in 0..3 {
        assert_eq!(post_chat(&base, &key, &chat(false)).await.0, 200);
    }
    let usage = gw.state().usage().clone();
    wait_until(Duration::from_secs(10), "events held in memory", || {
        let usage = usage.clone();
        async move { usage.pending_len() >= 3 }
    })
    .await;

    let _redis = RedisServer::start_on(port);
    wait_until(
        Duration::from_secs(20),
        "held events processed after the outage",
        || async {
            let all = admin_get(&base, &format!("/admin/usage?key_id={key_id}")).await;
            all["data"][0]["requests"].as_u64().unwrap_or(0) >= 3
        },
    )
    .await;
    assert_eq!(usage.pending_len(), 0);
}

/// Waits like a plugin waiting on Redis round trips, noting how many events were in its hands
/// at once.
#[derive(Default)]
struct Slow {
    now: AtomicUsize,
    most: AtomicUsize,
}

#[async_trait]
impl UsageProcessor for Slow {
    async fn process(&self, _event: &UsageEvent) -> Result<Outcome, String> {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(5)).await;
        self.now.fetch_sub(1, Ordering::SeqCst);
        Ok(Outcome::default())
    }
}

/// A meter that waits for its store is not waited for one event at a time: the events of a
/// batch are in flight together (16 at most), so the queue keeps up with the requests.
#[tokio::test]
async fn a_slow_processor_gets_the_events_of_a_batch_together() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let usage = Usage::new(store.clone());
    for i in 0..40 {
        queue_raw(&store, &event(&format!("r{i}"), "k1")).await;
    }
    let processor = Slow::default();
    let mut processed = 0;
    while processed < 40 {
        let n = usage.work_once(&processor).await.unwrap();
        assert!(n > 0, "no progress after {processed}");
        processed += n;
    }
    assert_eq!(processor.most.load(Ordering::SeqCst), 16);
    assert_eq!(usage.daily(Some("k1")).await.unwrap()[0].requests, 40);
}
