//! Local quota leases on the Redis store (`store/redis/leases.rs`): replicas reserve a windowed
//! counter with a large limit from slices they take from Redis. Two store clients on one real
//! `redis-server` play two gateway replicas. What must hold: the units reserved across replicas
//! never pass the limit; a slice a replica stops drawing from comes back to the others; an
//! outage or a window's end never lets a slice be spent twice.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use crate::support::{RedisServer, free_port};
use garage_gateway::store::{RedisStore, Store};

/// A limit large enough to be leased (`MIN_LIMIT_PER_AMOUNT` amounts of 1).
const LIMIT: i64 = 4_096;
const WINDOW: Option<Duration> = Some(Duration::from_secs(600));

async fn replica(url: &str) -> Arc<RedisStore> {
    Arc::new(RedisStore::connect(url).await.expect("connect to redis"))
}

/// The counter as Redis holds it: the units reserved plus the slices replicas hold unspent.
async fn counter(url: &str, name: &str) -> i64 {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let value: Option<i64> = redis::cmd("GET")
        .arg(format!("garage:kv:{name}"))
        .query_async(&mut conn)
        .await
        .unwrap();
    value.unwrap_or(0)
}

/// Reserves one unit at a time until the first refusal; returns the units it got.
async fn drain(store: &RedisStore, name: &str) -> i64 {
    let mut got = 0;
    while store
        .kv_reserve(name, 1, LIMIT, WINDOW)
        .await
        .unwrap()
        .is_some()
    {
        got += 1;
    }
    got
}

/// Reserves from `store` until `LIMIT` units in all were admitted, taking what comes back as it
/// comes; fails after `bound`.
async fn reserve_until(store: &RedisStore, name: &str, admitted: &mut i64, bound: Duration) {
    let deadline = Instant::now() + bound;
    while *admitted < LIMIT {
        match store.kv_reserve(name, 1, LIMIT, WINDOW).await.unwrap() {
            Some(_) => *admitted += 1,
            None => {
                assert!(
                    Instant::now() < deadline,
                    "only {admitted} of {LIMIT} units admitted: a slice never came back"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[tokio::test]
async fn concurrent_bursts_on_two_replicas_never_pass_the_limit_and_slices_come_back() {
    let redis = RedisServer::start();
    let url = redis.url();
    let replicas = [replica(&url).await, replica(&url).await];
    let admitted = Arc::new(AtomicI64::new(0));
    // 16 tasks on each replica, amounts of 1 to 3 units, each until refused three times; one
    // reservation in four is given back (`kv_incr` below zero), as a settlement does.
    let mut tasks = Vec::new();
    for (r, store) in replicas.iter().enumerate() {
        for t in 0..16 {
            let store = store.clone();
            let admitted = admitted.clone();
            tasks.push(tokio::spawn(async move {
                let mut refusals = 0;
                let mut i = 0;
                while refusals < 3 {
                    let amount = 1 + (r + t + i) as i64 % 3;
                    i += 1;
                    match store.kv_reserve("burst", amount, LIMIT, WINDOW).await {
                        Ok(Some(_)) if i % 4 == 0 => {
                            // Settled unused, as a request that used no tokens: given back.
                            store.kv_incr("burst", -amount, WINDOW).await.unwrap();
                        }
                        Ok(Some(_)) => {
                            admitted.fetch_add(amount, Ordering::Relaxed);
                        }
                        Ok(None) => refusals += 1,
                        Err(err) => panic!("{err}"),
                    }
                }
            }));
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    let admitted = admitted.load(Ordering::Relaxed);
    let counted = counter(&url, "burst").await;
    assert!(
        admitted <= LIMIT,
        "{admitted} units admitted past a limit of {LIMIT}"
    );
    assert!(
        admitted <= counted && counted <= LIMIT,
        "Redis counts {counted}, {admitted} admitted"
    );
    // Both replicas went quiet: their unspent slices go back, and the counter says exactly what
    // was admitted.
    crate::support::wait_until(Duration::from_secs(10), "slices given back", || {
        let url = url.clone();
        async move { counter(&url, "burst").await == admitted }
    })
    .await;
}

#[tokio::test]
async fn a_replica_that_stops_asking_leaves_its_slice_to_the_other() {
    let redis = RedisServer::start();
    let url = redis.url();
    let (a, b) = (replica(&url).await, replica(&url).await);
    // A reserves briskly until it holds a slice it has not spent.
    let mut admitted = 0;
    for _ in 0..LIMIT / 2 {
        a.kv_reserve("shared", 1, LIMIT, WINDOW)
            .await
            .unwrap()
            .expect("within the limit");
        admitted += 1;
        if counter(&url, "shared").await > admitted {
            break;
        }
    }
    let held = counter(&url, "shared").await - admitted;
    assert!(held > 0, "A took no slice in {admitted} reservations");
    assert!(
        held <= (LIMIT - admitted) / 16 + 1,
        "a slice of {held} units is more than a 16th of what was left"
    );

    // B takes everything else; it may be refused while A holds its slice, then A's slice comes
    // back and B gets it, to the last unit.
    admitted += drain(&b, "shared").await;
    assert!(admitted <= LIMIT);
    reserve_until(&b, "shared", &mut admitted, Duration::from_secs(10)).await;
    assert_eq!(admitted, LIMIT);
    assert_eq!(
        a.kv_reserve("shared", 1, LIMIT, WINDOW).await.unwrap(),
        None
    );
    assert_eq!(
        b.kv_reserve("shared", 1, LIMIT, WINDOW).await.unwrap(),
        None
    );
    assert_eq!(counter(&url, "shared").await, LIMIT);
}

#[tokio::test]
async fn small_limits_and_counters_without_a_window_stay_exact_per_call() {
    let redis = RedisServer::start();
    let url = redis.url();
    let (a, b) = (replica(&url).await, replica(&url).await);
    // 60 a minute: below the leasing threshold, so no replica ever holds a unit unspent.
    for i in 1..=30 {
        assert_eq!(a.kv_reserve("rpm", 1, 60, WINDOW).await.unwrap(), Some(i));
        assert_eq!(counter(&url, "rpm").await, i);
    }
    assert_eq!(drain_small(&b, "rpm", 60).await, 30);
    // A large limit with no TTL (a lifetime quota, which a plugin may reset): exact too.
    for i in 1..=100 {
        assert_eq!(a.kv_reserve("life", 1, LIMIT, None).await.unwrap(), Some(i));
    }
    assert_eq!(counter(&url, "life").await, 100);
}

async fn drain_small(store: &RedisStore, name: &str, limit: i64) -> i64 {
    let mut got = 0;
    while store
        .kv_reserve(name, 1, limit, WINDOW)
        .await
        .unwrap()
        .is_some()
    {
        got += 1;
    }
    got
}

#[tokio::test]
async fn a_slice_held_at_a_windows_end_is_not_spent_in_the_next() {
    let redis = RedisServer::start();
    let url = redis.url();
    let a = replica(&url).await;
    let window = Some(Duration::from_millis(600));
    // A takes a slice in the first window.
    let mut last = 0;
    while counter(&url, "win").await <= last {
        assert!(last < LIMIT / 2, "A took no slice");
        last = a
            .kv_reserve("win", 1, LIMIT, window)
            .await
            .unwrap()
            .unwrap();
    }
    // A keeps drawing from it, a unit every 30 ms (so it is never idle, never given back), until
    // the counter expires in Redis with its window.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(Instant::now() < deadline, "the window never ended");
        tokio::time::sleep(Duration::from_millis(30)).await;
        let value = a
            .kv_reserve("win", 1, LIMIT, window)
            .await
            .unwrap()
            .unwrap();
        if value < last {
            // The first reservation of the new window counts from zero: the old slice is void,
            // not spent here, and not given back into the new counter.
            assert_eq!(value, 1);
            assert_eq!(counter(&url, "win").await, 1);
            break;
        }
        assert_eq!(value, last + 1, "a unit drawn from the slice counts one");
        last = value;
    }
}

#[tokio::test]
async fn redis_going_away_mid_lease_fails_the_reservation_and_admits_nothing_extra_after() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut redis = RedisServer::start_durable(dir.path(), port);
    let url = redis.url();
    let (a, b) = (replica(&url).await, replica(&url).await);
    let mut admitted = 0;
    while counter(&url, "outage").await <= admitted {
        assert!(admitted < LIMIT / 2, "A took no slice");
        a.kv_reserve("outage", 1, LIMIT, WINDOW)
            .await
            .unwrap()
            .unwrap();
        admitted += 1;
    }
    let counted_before = counter(&url, "outage").await;

    redis.kill();
    // While Redis is gone A spends what its slice holds (those units were counted), then the
    // store fails: the rate limiter's fail-open or fail-closed choice decides from there.
    let mut spent_during = 0;
    let error = loop {
        match a.kv_reserve("outage", 1, LIMIT, WINDOW).await {
            Ok(Some(_)) => spent_during += 1,
            Ok(None) => panic!("refused rather than failed while Redis is down"),
            Err(err) => break err,
        }
        assert!(
            spent_during <= LIMIT,
            "reservations never failed with Redis down"
        );
    };
    assert!(
        admitted + spent_during <= counted_before,
        "{spent_during} units spent during the outage, beyond the slice"
    );
    admitted += spent_during;
    assert!(error.to_string().contains("store backend error"), "{error}");
    assert!(b.kv_reserve("outage", 1, LIMIT, WINDOW).await.is_err());

    // Redis comes back with its counter: both replicas take the rest, never more than the
    // limit; what A held when the error came is not spent again.
    let _redis = RedisServer::start_durable(dir.path(), port);
    let mut back = false;
    for _ in 0..500 {
        if a.kv_reserve("outage", 1, LIMIT, WINDOW)
            .await
            .is_ok_and(|r| r.is_some())
        {
            admitted += 1;
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(back, "the store did not reconnect");
    admitted += drain(&a, "outage").await + drain(&b, "outage").await;
    assert!(
        admitted <= LIMIT,
        "{admitted} units admitted past a limit of {LIMIT} across an outage"
    );
    assert!(counter(&url, "outage").await <= LIMIT);
}
