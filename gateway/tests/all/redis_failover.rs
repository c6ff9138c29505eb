//! A primary watched by Redis Sentinel dies and its replica is promoted
//! (`redis+sentinel://`): the store follows the promotion, keeps what was replicated, takes
//! new writes, and its events flow again after a `Resync`. The first test also measures what
//! the failover costs (docs/operations.md quotes it; run it with `--no-capture` to see).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use crate::redis_replicas::store_config;
use crate::support::*;
use garage_gateway::store::{ApiKeyRecord, QueueItem, RedisStore, Store, StoreEvent, read_counter};
use serde_json::json;

/// The longest a failover may take here before the test fails: the sentinels' timeouts
/// (support::DOWN_AFTER_MS, support::FAILOVER_TIMEOUT_MS, twice if an election is retried)
/// with room for a loaded machine.
const FAILOVER_BOUND: Duration = Duration::from_secs(60);

/// Writers at once while the primary dies.
const WRITERS: usize = 16;

fn key_record() -> ApiKeyRecord {
    ApiKeyRecord {
        id: "k-before".into(),
        name: "made before the failover".into(),
        hash: "h-before".into(),
        prefix: "sk-garage-ab".into(),
        allowed_models: None,
        metadata: Default::default(),
        created_at: 1,
        revoked_at: None,
        account: None,
    }
}

/// Publishes `event` until `events` hears it.
async fn publish_until_heard(
    store: &dyn Store,
    events: &mut tokio::sync::broadcast::Receiver<StoreEvent>,
    event: &StoreEvent,
) {
    tokio::time::timeout(FAILOVER_BOUND, async {
        loop {
            // A publish may fail while a connection is being replaced: try again.
            let _ = store.publish(event).await;
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

/// How the primary goes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Failure {
    /// Killed (SIGKILL): the sentinels find it silent and promote its replica.
    Crash,
    /// Alive, but the sentinels are told to promote its replica (`SENTINEL FAILOVER`, as for
    /// maintenance); the old primary then becomes a replica of the new one.
    Switchover,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_follows_a_crash_failover_and_measures_its_cost() {
    follow_a_failover(Failure::Crash).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_follows_a_switchover_and_measures_its_cost() {
    follow_a_failover(Failure::Switchover).await;
}

/// What the writers saw.
#[derive(Default)]
struct Tally {
    acked: i64,
    errors: i64,
    first_error: Option<Instant>,
    last_error: Option<Instant>,
}

async fn follow_a_failover(failure: Failure) {
    let mut redis = RedisFailover::start();
    let url = redis.url();
    let store = Arc::new(RedisStore::connect(&url).await.unwrap());
    let listener = RedisStore::connect(&url).await.unwrap();
    let mut events = listener.subscribe();
    publish_until_heard(
        store.as_ref(),
        &mut events,
        &StoreEvent::NodeChanged { id: "n0".into() },
    )
    .await;

    // State written, and replicated, before the failover.
    store.put_key(&key_record()).await.unwrap();
    store.kv_set("before", b"kept", None).await.unwrap();
    store
        .queue_push(
            "work",
            &[QueueItem {
                id: "job-1".into(),
                payload: b"payload".to_vec(),
            }],
        )
        .await
        .unwrap();
    store.record_put("node", "n1", b"{}").await.unwrap();
    redis.wait_replicated();

    // Writers increment one counter through the failover, several at once as a gateway's
    // requests would, each counting the increments acknowledged to it and the errors.
    let stop = Arc::new(AtomicBool::new(false));
    let acked_so_far = Arc::new(AtomicI64::new(0));
    let writers: Vec<_> = (0..WRITERS)
        .map(|_| {
            let (store, stop, acked_so_far) = (store.clone(), stop.clone(), acked_so_far.clone());
            tokio::spawn(async move {
                let mut tally = Tally::default();
                while !stop.load(Ordering::Relaxed) {
                    match store.kv_incr("acked", 1, None).await {
                        Ok(_) => {
                            tally.acked += 1;
                            acked_so_far.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            let now = Instant::now();
                            tally.errors += 1;
                            tally.first_error.get_or_insert(now);
                            tally.last_error = Some(now);
                            // A failing store answers at once: do not spin on it.
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
                tally
            })
        })
        .collect();
    let writes_started = Instant::now();
    let acked = || acked_so_far.load(Ordering::Relaxed);
    wait_until(Duration::from_secs(30), "writes flowing", || async {
        acked() >= 500
    })
    .await;

    // When the other store says its events had a gap (it subscribes again after the
    // failover).
    let resynced = tokio::spawn(async move {
        while events.recv().await.ok()? != StoreEvent::Resync {}
        Some((Instant::now(), events))
    });

    let failed_at = Instant::now();
    match failure {
        Failure::Crash => redis.kill_primary(),
        Failure::Switchover => {
            let _: String = query(
                redis.sentinels[0].port,
                &["SENTINEL", "FAILOVER", SENTINEL_MASTER],
            )
            .expect("the sentinel starts a failover");
        }
    }

    // Wait until the replica is primary and the old primary is gone or its replica, so that
    // nothing more can be written there; then until writes have gone on for a while.
    let replica = redis.replica.port;
    let old = redis.primary.as_ref().map(|p| p.port);
    wait_until(FAILOVER_BOUND, "the replica promoted", || async {
        let promoted = query::<redis::Value>(replica, &["ROLE"])
            .is_ok_and(|role| format!("{role:?}").contains("master"));
        let old_demoted = old.is_none_or(|old| {
            query::<redis::Value>(old, &["ROLE"])
                .is_ok_and(|role| format!("{role:?}").contains("slave"))
        });
        promoted && old_demoted
    })
    .await;
    let acked_at_promotion = acked();
    wait_until(FAILOVER_BOUND, "writes on the promoted replica", || async {
        acked() >= acked_at_promotion + 200
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let written_for = writes_started.elapsed();
    let mut tally = Tally::default();
    for writer in writers {
        let one = writer.await.unwrap();
        tally.acked += one.acked;
        tally.errors += one.errors;
        tally.first_error = tally.first_error.into_iter().chain(one.first_error).min();
        tally.last_error = tally.last_error.into_iter().chain(one.last_error).max();
    }

    // Every acknowledged increment should be in the counter; those that are not were lost. A
    // write can also be applied with its answer lost (an error): at most one per error.
    let kept = read_counter(store.as_ref(), "acked").await.unwrap();
    assert_eq!(redis.primary_port_by_sentinels(), Some(replica));
    assert!(
        kept <= tally.acked + tally.errors,
        "kept {kept}, acked {}, errors {}",
        tally.acked,
        tally.errors
    );
    let lost = (tally.acked - kept).max(0);

    // What was replicated before the failover is all there.
    assert_eq!(
        store.key_by_hash("h-before").await.unwrap().unwrap().id,
        "k-before"
    );
    assert_eq!(
        store.kv_get("before").await.unwrap().as_deref(),
        Some(&b"kept"[..])
    );
    let leased = store
        .queue_lease("work", 5, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(leased.len(), 1);
    assert_eq!(leased[0].id, "job-1");
    assert!(store.record_get("node", "n1").await.unwrap().is_some());

    // The other store's subscription was on the old primary: it subscribed again and said
    // so, and hears events again.
    let (resynced_at, mut events) = tokio::time::timeout(FAILOVER_BOUND, resynced)
        .await
        .expect("a Resync after the failover")
        .unwrap()
        .expect("events until the Resync");
    let error_window = match (tally.first_error, tally.last_error) {
        (Some(first), Some(last)) => format!(
            "errors from {} ms to {} ms after it",
            (first - failed_at).as_millis(),
            (last - failed_at).as_millis()
        ),
        _ => "no errors".to_owned(),
    };
    let rate = tally.acked as f64 / written_for.as_secs_f64();
    println!(
        "{failure:?}: {lost} of {} acknowledged writes lost ({WRITERS} writers, {rate:.0} writes/s: \
         {:.0} ms of writes); {} failed writes, {error_window}; events resubscribed after {} ms \
         (down-after {DOWN_AFTER_MS} ms, failover-timeout {FAILOVER_TIMEOUT_MS} ms)",
        tally.acked,
        lost as f64 / rate * 1000.0,
        tally.errors,
        (resynced_at - failed_at).as_millis(),
    );
    publish_until_heard(
        store.as_ref(),
        &mut events,
        &StoreEvent::NodeChanged { id: "n2".into() },
    )
    .await;
}

#[tokio::test]
async fn gateways_follow_a_failover() {
    let mut redis = RedisFailover::start();
    let url = redis.url();
    let engine = fast_sim().await;
    let one = gateway(store_config(&url, engine.base_url())).await;
    let two = gateway(store_config(&url, engine.base_url())).await;

    let (id, key) = create_key(&one.url(), json!({"name": "before"})).await;
    assert_eq!(post_chat(&two.url(), &key, &chat(false)).await.0, 200);
    redis.wait_replicated();
    redis.kill_primary();

    // Once the replica is promoted, keys can be made again, and the other replica reads them.
    let deadline = Instant::now() + FAILOVER_BOUND;
    let after = loop {
        let (status, body) = admin_post(&one.url(), "/admin/keys", json!({"name": "after"})).await;
        if status == 201 {
            break body["key"]
                .as_str()
                .expect("the new key's secret")
                .to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no key could be made after the failover\n{}",
            redis.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    wait_until(
        FAILOVER_BOUND,
        "the other replica takes the new key",
        || async { post_chat(&two.url(), &after, &chat(false)).await.0 == 200 },
    )
    .await;

    // A revocation made after the failover reaches the replica that cached the key before it.
    wait_until(FAILOVER_BOUND, "the revocation is stored", || async {
        client()
            .delete(format!("{}/admin/keys/{id}", one.url()))
            .bearer_auth(ADMIN)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    wait_until(
        FAILOVER_BOUND,
        "the revocation reaches the other replica",
        || async { post_chat(&two.url(), &key, &chat(false)).await.0 == 403 },
    )
    .await;
}
