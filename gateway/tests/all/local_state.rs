//! Replica-local plugin state on Redis: the default rate limiter keeps its record of a request
//! in flight (`local:held:<id>`) in the replica that admitted it, never in Redis, while its
//! counters stay in Redis. Two replicas on one real `redis-server`: token limits stay exact
//! and every give-back lands; a replica killed (SIGKILL) between admission and settlement
//! leaves its reservation counted, and the other replica admits exactly what is left.
//! (The host side, a version's or slot's local keys out of another's reach, expiry and quotas:
//! `cargo test -p garage-gateway --lib local_keys`.)

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::cluster::inside_a_minute;
use crate::support::*;
use serde_json::{Value, json};

/// A gateway with the default policies on `redis`, in front of `upstream_url`.
async fn replica(redis: &RedisServer, upstream_url: String) -> garage_gateway::Gateway {
    let mut cfg = crate::redis_replicas::store_config(&redis.url(), upstream_url);
    cfg.default_plugins = true;
    gateway(cfg).await
}

/// Posts a chat request; returns status and request id.
async fn post(base: &str, key: &str, body: &Value) -> (u16, String) {
    let (status, id, _) = crate::cluster::post(base, key, body).await;
    (status, id)
}

/// Every key in the server's database 0.
fn redis_keys(redis: &RedisServer) -> Vec<String> {
    query(redis.port, &["KEYS", "*"]).expect("KEYS")
}

/// The value of the rate limiter's token counter of `key_id` (the one of this minute's window).
fn tokens_counted(redis: &RedisServer, key_id: &str) -> Option<i64> {
    let name = redis_keys(redis)
        .into_iter()
        .find(|k| k.contains("rate-limiter") && k.contains(&format!("tpm:{key_id}:")))?;
    let value: String = query(redis.port, &["GET", &name]).ok()?;
    value.parse().ok()
}

/// Tokens a request used, from its ledger entry.
async fn tokens_used(base: &str, id: &str) -> i64 {
    let entry = ledger_entry(base, id).await;
    (entry["event"]["prompt_tokens"].as_u64().unwrap()
        + entry["event"]["completion_tokens"].as_u64().unwrap()) as i64
}

fn no_held_records_in(redis: &RedisServer) {
    let held: Vec<String> = redis_keys(redis)
        .into_iter()
        .filter(|k| k.contains("held"))
        .collect();
    assert!(held.is_empty(), "held records reached Redis: {held:?}");
}

#[tokio::test]
async fn held_records_stay_on_their_replica_and_limits_stay_exact() {
    let redis = RedisServer::start();
    let engine = fast_sim().await;
    let one = replica(&redis, engine.base_url()).await;
    let two = replica(&redis, engine.base_url()).await;
    let bases = [one.url(), two.url()];
    // Small enough that no replica leases a slice of it: Redis counts every token.
    let (key_id, key) =
        create_key(&bases[0], json!({"name": "tpm", "metadata": {"tpm": 600}})).await;
    inside_a_minute().await;

    // Through both replicas at once, until the limit binds.
    let answers = futures::future::join_all((0..60).map(|i| {
        let base = bases[i % 2].clone();
        let key = key.clone();
        async move { post(&base, &key, &chat(i % 3 == 0)).await }
    }))
    .await;
    let admitted: Vec<&(u16, String)> = answers.iter().filter(|(s, _)| *s == 200).collect();
    assert!(
        answers.iter().any(|(s, _)| *s == 429),
        "the token limit never bound: {:?}",
        answers.iter().map(|a| a.0).collect::<Vec<_>>()
    );
    assert!(!admitted.is_empty());
    let mut used = 0;
    for (_, id) in &admitted {
        used += tokens_used(&bases[0], id).await;
    }
    assert!(
        used <= 600,
        "{} requests used {used} tokens of 600",
        admitted.len()
    );
    // Each replica settled its own requests from its own records: the counter holds exactly
    // what the admitted requests used, every unused reservation given back.
    wait_until(Duration::from_secs(5), "every settlement", || async {
        tokens_counted(&redis, &key_id) == Some(used)
    })
    .await;
    no_held_records_in(&redis);
}

/// `gateway serve` as a process with the default policies, killed on drop.
struct Process {
    child: Child,
    base: String,
}

impl Process {
    fn start(redis: &RedisServer, upstream_url: &str, log: &std::path::Path) -> Process {
        let port = free_port();
        let child = Command::new(workspace_binary("gateway"))
            .arg("serve")
            .env("RUST_LOG", "info")
            .env("GARAGE_LISTEN", format!("127.0.0.1:{port}"))
            .env("GARAGE_STORE", redis.url())
            .env("GARAGE_AUTH_ADMIN_TOKEN", ADMIN)
            .env("GARAGE_AUTH_KEY_SECRET", "shared-replica-secret")
            .env("GARAGE_DEFAULT_PLUGINS", "true")
            .env(
                "GARAGE_UPSTREAMS",
                format!(r#"[{{name = "a", base_url = "{upstream_url}", models = ["{MODEL}"]}}]"#),
            )
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("log file"))
            .spawn()
            .expect("gateway starts");
        Process {
            child,
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test]
async fn a_replica_killed_between_admission_and_settlement_leaves_its_reservation_counted() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    // A slow engine for the replica that dies (its answer is still streaming when it does),
    // a fast one for the other.
    let slow = paced_sim(5.0).await;
    let fast = fast_sim().await;
    let mut doomed = Process::start(&redis, &slow.base_url(), &dir.path().join("doomed.log"));
    wait_until(Duration::from_secs(60), "the replica to answer", || async {
        (client().get(format!("{}/health", doomed.base)).send().await)
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    let survivor = replica(&redis, fast.base_url()).await;
    let limit = 600;
    let (key_id, key) = create_key(
        &survivor.url(),
        json!({"name": "tpm", "metadata": {"tpm": limit}}),
    )
    .await;
    inside_a_minute().await;

    // Admitted on the doomed replica, its tokens reserved in Redis: a long answer, streamed.
    let body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 200,
        "stream": true,
    });
    let mut stream = client()
        .post(format!("{}/v1/chat/completions", doomed.base))
        .bearer_auth(&key)
        .json(&body)
        .send()
        .await
        .expect("the doomed replica answers");
    assert_eq!(stream.status(), 200);
    assert!(stream.chunk().await.expect("a first chunk").is_some());
    let reserved = tokens_counted(&redis, &key_id).expect("the reservation is in Redis");
    assert!(reserved > 200, "reserved {reserved}");
    doomed.kill();
    drop(stream);

    // The survivor admits what is left of the limit and not a token more; nothing the dead
    // replica held is given back, nothing is taken twice.
    let mut used = 0;
    let mut refused = false;
    for _ in 0..100 {
        let (status, id) = post(&survivor.url(), &key, &chat(false)).await;
        if status == 429 {
            refused = true;
            break;
        }
        assert_eq!(status, 200);
        used += tokens_used(&survivor.url(), &id).await;
        // Settled before the next: what the next may reserve is exact.
        let expected = reserved + used;
        wait_until(Duration::from_secs(5), "the settlement", || async {
            tokens_counted(&redis, &key_id) == Some(expected)
        })
        .await;
    }
    assert!(refused, "the limit never bound");
    assert!(
        used > 0,
        "the survivor admitted nothing of the {} left",
        limit - reserved
    );
    assert!(reserved + used <= limit, "{reserved} + {used} of {limit}");
    assert_eq!(tokens_counted(&redis, &key_id), Some(reserved + used));
    no_held_records_in(&redis);
}
