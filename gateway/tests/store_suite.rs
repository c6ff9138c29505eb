//! One suite, run against every store implementation.

mod support;

use std::sync::Arc;
use std::time::Duration;

use garage_gateway::store::{ApiKeyRecord, MemoryStore, RedisStore, Store, StoreEvent};
use support::{RedisServer, wait_until};

fn record(id: &str, hash: &str, created_at: u64) -> ApiKeyRecord {
    ApiKeyRecord {
        id: id.into(),
        name: format!("name of {id}"),
        hash: hash.into(),
        prefix: "sk-garage-ab".into(),
        allowed_models: Some(vec!["m".into()]),
        metadata: serde_json::json!({"team": "a"})
            .as_object()
            .cloned()
            .unwrap_or_default(),
        created_at,
        revoked_at: None,
    }
}

async fn suite(store: Arc<dyn Store>) {
    store.ping().await.unwrap();

    // Keys: by id, by hash, listed oldest first, replaced in place.
    assert_eq!(store.key_by_hash("h1").await.unwrap(), None);
    store.put_key(&record("k2", "h2", 20)).await.unwrap();
    store.put_key(&record("k1", "h1", 10)).await.unwrap();
    assert_eq!(store.key_by_hash("h1").await.unwrap().unwrap().id, "k1");
    assert_eq!(store.key_by_id("k2").await.unwrap().unwrap().hash, "h2");
    let ids: Vec<String> = store
        .list_keys()
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.id)
        .collect();
    assert_eq!(ids, ["k1", "k2"]);
    let mut revoked = record("k1", "h1", 10);
    revoked.revoked_at = Some(99);
    store.put_key(&revoked).await.unwrap();
    assert_eq!(
        store.key_by_hash("h1").await.unwrap().unwrap().revoked_at,
        Some(99)
    );
    assert_eq!(store.list_keys().await.unwrap().len(), 2);

    // Key-value state.
    assert_eq!(store.kv_get("a").await.unwrap(), None);
    store.kv_set("a", b"1", None).await.unwrap();
    assert_eq!(store.kv_get("a").await.unwrap().as_deref(), Some(&b"1"[..]));
    store.kv_delete("a").await.unwrap();
    assert_eq!(store.kv_get("a").await.unwrap(), None);

    // Counters: atomic under concurrency, missing counts as zero.
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store.kv_incr("counter", 2, None).await
        }));
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    assert_eq!(store.kv_incr("counter", -1, None).await.unwrap(), 99);

    // Expiry: a TTL'd value disappears; a counter's TTL is set at creation, not per hit.
    store
        .kv_set("short", b"x", Some(Duration::from_millis(50)))
        .await
        .unwrap();
    assert_eq!(
        store
            .kv_incr("window", 1, Some(Duration::from_millis(300)))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store
            .kv_incr("window", 1, Some(Duration::from_secs(3600)))
            .await
            .unwrap(),
        2
    );
    let s = store.clone();
    wait_until(Duration::from_secs(5), "short value expiry", || {
        let s = s.clone();
        async move { s.kv_get("short").await.unwrap().is_none() }
    })
    .await;
    let s = store.clone();
    wait_until(Duration::from_secs(5), "counter window expiry", || {
        let s = s.clone();
        async move { s.kv_get("window").await.unwrap().is_none() }
    })
    .await;
    assert_eq!(store.kv_incr("window", 1, None).await.unwrap(), 1);

    // A value that is not a counter is an error, not a panic.
    store.kv_set("text", b"abc", None).await.unwrap();
    assert!(store.kv_incr("text", 1, None).await.is_err());
    assert!(store.kv_reserve("text", 1, 10, None).await.is_err());

    // Reservations stay within the limit, even when concurrent; a refused one changes nothing.
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store.kv_reserve("quota", 3, 30, None).await
        }));
    }
    let mut granted = 0;
    for task in tasks {
        if task.await.unwrap().unwrap().is_some() {
            granted += 1;
        }
    }
    assert_eq!(granted, 10);
    assert_eq!(store.kv_reserve("quota", 1, 30, None).await.unwrap(), None);
    assert_eq!(
        store.kv_reserve("quota", -5, 30, None).await.unwrap(),
        Some(25)
    );
    assert_eq!(
        store
            .kv_reserve("quota-window", 2, 5, Some(Duration::from_millis(200)))
            .await
            .unwrap(),
        Some(2)
    );
    let s = store.clone();
    wait_until(Duration::from_secs(5), "reservation window expiry", || {
        let s = s.clone();
        async move { s.kv_get("quota-window").await.unwrap().is_none() }
    })
    .await;

    // Records by kind.
    assert_eq!(store.record_get("node", "n1").await.unwrap(), None);
    store.record_put("node", "n1", b"{\"a\":1}").await.unwrap();
    store.record_put("node", "n2", b"{\"a\":2}").await.unwrap();
    store
        .record_put("token", "n1", b"other kind")
        .await
        .unwrap();
    assert_eq!(
        store.record_get("node", "n1").await.unwrap().as_deref(),
        Some(&b"{\"a\":1}"[..])
    );
    let mut listed = store.record_list("node").await.unwrap();
    listed.sort();
    assert_eq!(listed, [b"{\"a\":1}".to_vec(), b"{\"a\":2}".to_vec()]);
    store.record_delete("node", "n1").await.unwrap();
    assert_eq!(store.record_list("node").await.unwrap().len(), 1);
    assert_eq!(store.record_list("nothing").await.unwrap().len(), 0);

    // Events reach subscribers.
    let mut events = store.subscribe();
    let event = StoreEvent::KeyChanged {
        id: "k1".into(),
        hash: "h1".into(),
    };
    // Redis subscribes in the background; publish until the subscription is live.
    let received = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            store.publish(&event).await.unwrap();
            if let Ok(Ok(got)) =
                tokio::time::timeout(Duration::from_millis(100), events.recv()).await
            {
                return got;
            }
        }
    })
    .await
    .expect("event delivered");
    assert_eq!(received, event);
}

#[tokio::test]
async fn memory_store() {
    suite(Arc::new(MemoryStore::new())).await;
}

#[tokio::test]
async fn redis_store() {
    let redis = RedisServer::start();
    suite(Arc::new(RedisStore::connect(&redis.url()).await.unwrap())).await;
}

#[tokio::test]
async fn redis_store_reports_outage_as_error() {
    let redis = RedisServer::start();
    let store = RedisStore::connect(&redis.url()).await.unwrap();
    drop(redis);
    let result = tokio::time::timeout(Duration::from_secs(10), store.key_by_hash("x")).await;
    assert!(
        matches!(result, Ok(Err(_))),
        "a dead Redis is an error, not a hang or a panic"
    );
}
