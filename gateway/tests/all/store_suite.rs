//! One suite, run against every store implementation: memory, one Redis server, a Redis Cluster
//! and a Sentinel-watched primary.

use std::sync::Arc;
use std::time::Duration;

use crate::support::{RedisCluster, RedisFailover, RedisServer, query, wait_until};
use garage_gateway::store::{
    ApiKeyRecord, MemoryStore, QueueCounts, QueueItem, RedisStore, Store, StoreEvent,
};

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
        account: None,
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

    // First writer wins; counts; a whole kind goes at once.
    assert!(store.record_put_new("res", "1", b"first").await.unwrap());
    assert!(!store.record_put_new("res", "1", b"second").await.unwrap());
    assert!(store.record_put_new("res", "2", b"other").await.unwrap());
    assert_eq!(
        store.record_get("res", "1").await.unwrap().as_deref(),
        Some(&b"first"[..])
    );
    assert_eq!(store.record_count("res").await.unwrap(), 2);
    // The same, many at once: each answer is for its own record, a repeat within the call
    // included.
    assert_eq!(
        store
            .record_put_new_many(
                "res",
                &[
                    ("1", b"third"),
                    ("3", b"new"),
                    ("3", b"again"),
                    ("4", b"four")
                ]
            )
            .await
            .unwrap(),
        [false, true, false, true]
    );
    assert_eq!(
        store.record_get("res", "3").await.unwrap().as_deref(),
        Some(&b"new"[..])
    );
    assert_eq!(
        store.record_get("res", "1").await.unwrap().as_deref(),
        Some(&b"first"[..])
    );
    assert_eq!(
        store.records_exist("res", &["4", "5", "1"]).await.unwrap(),
        [true, false, true]
    );
    assert_eq!(
        store.records_exist("nothing", &["1"]).await.unwrap(),
        [false]
    );
    assert!(store.records_exist("res", &[]).await.unwrap().is_empty());
    assert!(
        store
            .record_put_new_many("res", &[])
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.record_count("res").await.unwrap(), 4);
    store.record_delete_kind("res").await.unwrap();
    assert_eq!(store.record_count("res").await.unwrap(), 0);

    queues(store.as_ref()).await;

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

fn item(id: &str) -> QueueItem {
    QueueItem {
        id: id.into(),
        payload: format!("payload of {id}").into_bytes(),
    }
}

fn ids(items: &[QueueItem]) -> Vec<&str> {
    items.iter().map(|i| i.id.as_str()).collect()
}

async fn queues(store: &dyn Store) {
    let q = "work";
    assert!(
        store
            .queue_lease(q, 5, Duration::from_secs(60))
            .await
            .unwrap()
            .is_empty()
    );
    let items: Vec<QueueItem> = ["a", "b", "c", "d", "e"].map(item).into();
    store.queue_push(q, &items).await.unwrap();
    // Pushing again changes nothing but the payloads.
    store.queue_push(q, &items[..2]).await.unwrap();
    let counts = |waiting, leased| QueueCounts { waiting, leased };
    assert_eq!(store.queue_counts(q).await.unwrap(), counts(5, 0));

    // FIFO leases, with their payloads; leased items are hidden from the next lease.
    let first = store
        .queue_lease(q, 2, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(ids(&first), ["a", "b"]);
    assert_eq!(first[0].payload, b"payload of a");
    // A leased item pushed again stays leased (no duplicate).
    store.queue_push(q, &items[..1]).await.unwrap();
    assert_eq!(store.queue_counts(q).await.unwrap(), counts(3, 2));

    // A short lease runs out: its item goes back to the head of the queue.
    let short = store
        .queue_lease(q, 1, Duration::from_millis(200))
        .await
        .unwrap();
    assert_eq!(ids(&short), ["c"]);
    wait_until(
        Duration::from_secs(5),
        "the short lease runs out",
        || async { store.queue_counts(q).await.unwrap() == counts(3, 2) },
    )
    .await;
    let again = store
        .queue_lease(q, 2, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(ids(&again), ["c", "d"]);

    // A released item goes back to the head of the queue at once; only leased items release.
    assert!(store.queue_release(q, "d").await.unwrap());
    assert!(!store.queue_release(q, "d").await.unwrap());
    assert!(!store.queue_release(q, "e").await.unwrap());
    let back = store
        .queue_lease(q, 1, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(ids(&back), ["d"]);

    // Acks remove leased or waiting items, once.
    assert!(store.queue_ack(q, "a").await.unwrap());
    assert!(!store.queue_ack(q, "a").await.unwrap());
    assert!(store.queue_ack(q, "e").await.unwrap());
    assert!(!store.queue_ack("no-such-queue", "a").await.unwrap());
    // Many at once: only those there count.
    store.queue_push(q, &[item("x"), item("y")]).await.unwrap();
    assert_eq!(
        store
            .queue_ack_many(q, &["x", "a", "y", "y"])
            .await
            .unwrap(),
        2
    );
    assert_eq!(store.queue_ack_many(q, &[]).await.unwrap(), 0);
    assert_eq!(
        store.queue_ack_many("no-such-queue", &["x"]).await.unwrap(),
        0
    );
    assert_eq!(store.queue_counts(q).await.unwrap(), counts(0, 3));

    // Dropping the waiting items keeps leased ones (and takes back expired leases first).
    store.queue_push(q, &[item("f"), item("g")]).await.unwrap();
    let brief = store
        .queue_lease(q, 1, Duration::from_millis(100))
        .await
        .unwrap();
    assert_eq!(ids(&brief), ["f"]);
    wait_until(
        Duration::from_secs(5),
        "the brief lease runs out",
        || async { store.queue_counts(q).await.unwrap() == counts(2, 3) },
    )
    .await;
    assert_eq!(store.queue_drop_waiting(q).await.unwrap(), 2);
    assert_eq!(store.queue_counts(q).await.unwrap(), counts(0, 3));
    for id in ["b", "c", "d"] {
        assert!(store.queue_ack(q, id).await.unwrap());
    }
    assert_eq!(store.queue_counts(q).await.unwrap(), counts(0, 0));
    assert!(
        store
            .queue_lease(q, 5, Duration::from_secs(60))
            .await
            .unwrap()
            .is_empty()
    );

    // A leased item's lease is set again from now: shortened, it comes back sooner; only a
    // leased item's lease moves.
    store.queue_push(q, &[item("h")]).await.unwrap();
    let held = store
        .queue_lease(q, 1, Duration::from_secs(600))
        .await
        .unwrap();
    assert_eq!(ids(&held), ["h"]);
    assert!(
        store
            .queue_extend(q, "h", Duration::from_millis(100))
            .await
            .unwrap()
    );
    wait_until(
        Duration::from_secs(5),
        "the shortened lease runs out",
        || async { store.queue_counts(q).await.unwrap() == counts(1, 0) },
    )
    .await;
    // Run out: the queue's again, not extended.
    assert!(
        !store
            .queue_extend(q, "h", Duration::from_secs(600))
            .await
            .unwrap()
    );
    assert!(
        !store
            .queue_extend(q, "none", Duration::from_secs(1))
            .await
            .unwrap()
    );
    let again = store
        .queue_lease(q, 1, Duration::from_millis(100))
        .await
        .unwrap();
    assert_eq!(ids(&again), ["h"]);
    // Lengthened, it stays out of sight after its first lease would have run out.
    assert!(
        store
            .queue_extend(q, "h", Duration::from_secs(600))
            .await
            .unwrap()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(store.queue_counts(q).await.unwrap(), counts(0, 1));
    assert!(store.queue_ack(q, "h").await.unwrap());

    // A queue whose name holds braces works too (on a Redis Cluster, its keys still share a
    // slot).
    let odd = "}odd{name}";
    store.queue_push(odd, &[item("z")]).await.unwrap();
    let leased = store
        .queue_lease(odd, 5, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(ids(&leased), ["z"]);
    assert!(store.queue_ack(odd, "z").await.unwrap());
    assert_eq!(store.queue_counts(odd).await.unwrap(), counts(0, 0));

    // Concurrent workers never lease the same item twice.
    let many: Vec<QueueItem> = (0..300).map(|i| item(&format!("i{i:03}"))).collect();
    store.queue_push("many", &many).await.unwrap();
    let mut workers = Vec::new();
    for _ in 0..6 {
        workers.push(async {
            let mut got = Vec::new();
            loop {
                let leased = store
                    .queue_lease("many", 7, Duration::from_secs(60))
                    .await
                    .unwrap();
                if leased.is_empty() {
                    return got;
                }
                got.extend(leased.into_iter().map(|i| i.id));
            }
        });
    }
    let mut all: Vec<String> = futures::future::join_all(workers).await.concat();
    all.sort();
    let expected: Vec<String> = many.iter().map(|i| i.id.clone()).collect();
    assert_eq!(all, expected);
}

#[tokio::test]
async fn memory_store() {
    suite(Arc::new(MemoryStore::new())).await;
}

#[tokio::test]
async fn memory_store_caps_a_kind_dropping_the_oldest_inserted() {
    let store = MemoryStore::new();
    store.cap_records("ledger", 3);
    // Ids out of key order: eviction follows insertion, not the ids' sort order.
    for id in ["c", "a", "d"] {
        store.record_put("ledger", id, id.as_bytes()).await.unwrap();
    }
    // Replacing a record neither grows the kind nor makes the record younger.
    store.record_put("ledger", "c", b"c2").await.unwrap();
    let inserted = store
        .record_put_new_many("ledger", &[("b", b"b"), ("a", b"again"), ("e", b"e")])
        .await
        .unwrap();
    assert_eq!(inserted, vec![true, false, true]);
    assert_eq!(store.record_count("ledger").await.unwrap(), 3);
    let present = store
        .records_exist("ledger", &["c", "a", "d", "b", "e"])
        .await
        .unwrap();
    assert_eq!(present, vec![false, false, true, true, true]);
    // A record deleted by hand leaves room; its id's turn in the order is a no-op later.
    store.record_delete("ledger", "d").await.unwrap();
    store.record_put("ledger", "f", b"f").await.unwrap();
    store.record_put("ledger", "g", b"g").await.unwrap();
    let present = store
        .records_exist("ledger", &["b", "e", "f", "g"])
        .await
        .unwrap();
    assert_eq!(present, vec![false, true, true, true]);
    // Other kinds are unbounded.
    for i in 0..10 {
        store
            .record_put("other", &i.to_string(), b"x")
            .await
            .unwrap();
    }
    assert_eq!(store.record_count("other").await.unwrap(), 10);
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

#[tokio::test]
async fn redis_cluster_store() {
    let cluster = RedisCluster::start(3);
    suite(Arc::new(RedisStore::connect(&cluster.url()).await.unwrap())).await;
}

#[tokio::test]
async fn redis_sentinel_store() {
    let redis = RedisFailover::start();
    suite(Arc::new(RedisStore::connect(&redis.url()).await.unwrap())).await;
}

/// Publishes `event` until `events` hears it (a subscription starts in the background).
async fn publish_until_heard(
    store: &dyn Store,
    events: &mut tokio::sync::broadcast::Receiver<StoreEvent>,
    event: &StoreEvent,
) {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            store.publish(event).await.unwrap();
            while let Ok(Ok(got)) =
                tokio::time::timeout(Duration::from_millis(100), events.recv()).await
            {
                if &got == event {
                    return;
                }
            }
        }
    })
    .await
    .expect("event delivered");
}

#[tokio::test]
async fn redis_cluster_events_reach_subscribers_on_every_node() {
    let cluster = RedisCluster::start(3);
    let store = RedisStore::connect(&cluster.url()).await.unwrap();
    let mut listeners = Vec::new();
    for node in &cluster.nodes {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}/", node.port)).unwrap();
        let mut pubsub = client.get_async_pubsub().await.unwrap();
        pubsub.subscribe("garage:events").await.unwrap();
        listeners.push(pubsub);
    }
    let event = StoreEvent::PluginActivated {
        slot: "router".into(),
    };
    store.publish(&event).await.unwrap();
    for (node, pubsub) in cluster.nodes.iter().zip(&mut listeners) {
        let message = tokio::time::timeout(
            Duration::from_secs(5),
            futures::StreamExt::next(&mut pubsub.on_message()),
        )
        .await
        .unwrap_or_else(|_| panic!("no event on node {}", node.port))
        .expect("a message");
        let heard: StoreEvent = serde_json::from_slice(message.get_payload_bytes()).unwrap();
        assert_eq!(heard, event, "on node {}", node.port);
    }
}

#[tokio::test]
async fn redis_cluster_store_resyncs_after_losing_its_subscription() {
    let cluster = RedisCluster::start(3);
    let store = RedisStore::connect(&cluster.url()).await.unwrap();
    let mut events = store.subscribe();
    let first = StoreEvent::NodeChanged { id: "n1".into() };
    publish_until_heard(&store, &mut events, &first).await;

    // Drop every pub/sub connection on every node, the store's among them.
    for node in &cluster.nodes {
        let _: i64 = query(node.port, &["CLIENT", "KILL", "TYPE", "pubsub"]).unwrap();
    }
    let resync = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if events.recv().await.unwrap() == StoreEvent::Resync {
                return;
            }
        }
    })
    .await;
    assert!(resync.is_ok(), "no Resync after the subscription was lost");
    let after = StoreEvent::NodeChanged { id: "n2".into() };
    publish_until_heard(&store, &mut events, &after).await;
}

/// A store written by a gateway of layout 1 (names without hash tags).
fn write_untagged_layout(port: u16) {
    let old = record("k1", "h1", 10);
    let json = serde_json::to_string(&old).unwrap();
    let writes: [&[&str]; 7] = [
        &["SET", "garage:key:k1", &json],
        &["SET", "garage:keyhash:h1", "k1"],
        &["ZADD", "garage:keys", "10", "k1"],
        &["ZADD", "garage:q:batch:b1:m:waiting", "1", "line-1"],
        &[
            "HSET",
            "garage:q:batch:b1:m:items",
            "line-1",
            "payload of line-1",
        ],
        &["SET", "garage:q:batch:b1:m:seq", "1"],
        &["SET", "garage:kv:plugin:router:x", "7"],
    ];
    for args in writes {
        let _: redis::Value = query(port, args).unwrap();
    }
}

#[tokio::test]
async fn redis_store_moves_a_store_of_the_untagged_layout() {
    let redis = RedisServer::start();
    write_untagged_layout(redis.port);
    let store = RedisStore::connect(&redis.url()).await.unwrap();

    assert_eq!(store.key_by_hash("h1").await.unwrap().unwrap().id, "k1");
    let listed: Vec<String> = store
        .list_keys()
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.id)
        .collect();
    assert_eq!(listed, ["k1"]);
    let leased = store
        .queue_lease("batch:b1:m", 5, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(ids(&leased), ["line-1"]);
    assert_eq!(leased[0].payload, b"payload of line-1");
    assert_eq!(
        store.kv_get("plugin:router:x").await.unwrap().as_deref(),
        Some(&b"7"[..])
    );
    let old_left: i64 = query(
        redis.port,
        &[
            "EXISTS",
            "garage:key:k1",
            "garage:keyhash:h1",
            "garage:keys",
        ],
    )
    .unwrap();
    assert_eq!(old_left, 0);
    let layout: String = query(redis.port, &["GET", "garage:layout"]).unwrap();
    assert_eq!(layout, "2");

    // Once moved, a later start changes nothing, even where an old name reappears.
    let _: () = query(redis.port, &["SET", "garage:keyhash:h9", "k9"]).unwrap();
    drop(store);
    let again = RedisStore::connect(&redis.url()).await.unwrap();
    assert_eq!(again.key_by_hash("h1").await.unwrap().unwrap().id, "k1");
    let untouched: String = query(redis.port, &["GET", "garage:keyhash:h9"]).unwrap();
    assert_eq!(untouched, "k9");
}
