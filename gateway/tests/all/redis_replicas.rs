//! Several gateway replicas on one Redis server: shared keys, revocation everywhere within a
//! second, keys that survive a restart. `redis_cluster` and `redis_failover` run the first on
//! the other deployments.

use std::time::{Duration, Instant};

use crate::support::*;
use serde_json::json;

/// A gateway's config on the Redis store at `store_url` (any deployment), with the secret
/// every replica shares.
pub fn store_config(store_url: &str, upstream_url: String) -> garage_gateway::Config {
    let mut cfg = config(vec![upstream("a", upstream_url)]);
    cfg.store = store_url.to_owned();
    cfg.auth.key_secret = Some("shared-replica-secret".into());
    cfg
}

fn redis_config(redis: &RedisServer, upstream_url: String) -> garage_gateway::Config {
    store_config(&redis.url(), upstream_url)
}

#[tokio::test]
async fn replicas_share_keys_and_revocations() {
    let redis = RedisServer::start();
    replicas_on_store_share_keys_and_revocations(&redis.url()).await;
}

/// Two gateways on the store at `store_url`: a key made on one works on the other, and its
/// revocation reaches the other within a second.
pub async fn replicas_on_store_share_keys_and_revocations(store_url: &str) {
    let engine = fast_sim().await;
    let one = gateway(store_config(store_url, engine.base_url())).await;
    let two = gateway(store_config(store_url, engine.base_url())).await;

    let (id, key) = create_key(&one.url(), json!({"name": "shared"})).await;
    // Made on one replica, accepted by the other (and now cached there).
    assert_eq!(post_chat(&two.url(), &key, &chat(false)).await.0, 200);
    assert_eq!(post_chat(&one.url(), &key, &chat(false)).await.0, 200);

    let revoked = client()
        .delete(format!("{}/admin/keys/{id}", one.url()))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 200);
    let started = Instant::now();
    wait_until(
        Duration::from_secs(1),
        "revocation reaches the other replica",
        || async { post_chat(&two.url(), &key, &chat(false)).await.0 == 403 },
    )
    .await;
    tracing::info!(elapsed = ?started.elapsed(), "revocation propagated");
}

#[tokio::test]
async fn keys_survive_a_restart() {
    let redis = RedisServer::start();
    let engine = fast_sim().await;
    let first = gateway(redis_config(&redis, engine.base_url())).await;
    let (id, key) = create_key(&first.url(), json!({"name": "durable"})).await;
    assert!(first.shutdown(Duration::from_secs(5)).await);

    let second = gateway(redis_config(&redis, engine.base_url())).await;
    assert_eq!(post_chat(&second.url(), &key, &chat(false)).await.0, 200);
    let listed = client()
        .get(format!("{}/admin/keys", second.url()))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(listed.contains(&id));
}

#[tokio::test]
async fn store_outage_is_a_503_not_a_hang() {
    let redis = RedisServer::start();
    let engine = fast_sim().await;
    let gw = gateway(redis_config(&redis, engine.base_url())).await;
    drop(redis);
    // An unknown key needs the store; with the store gone that is a quick 503.
    let (status, body) = post_chat(&gw.url(), "sk-garage-not-cached", &chat(false)).await;
    assert_eq!(status, 503, "{body}");
    error_of(&body);
    let ready = client()
        .get(format!("{}/ready", gw.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
}
