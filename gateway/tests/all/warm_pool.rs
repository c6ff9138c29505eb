//! The elastic warm pool (`warm_instances`, `warm_max_instances`, `warm_idle_secs`): its
//! configuration, and bursts of calls in flight at once on a real Redis, where a rate
//! limiter's calls wait on the store. The pool's counts themselves are checked on real
//! instances in `plugins::loaded`'s unit tests.

use std::sync::Arc;

use crate::support::RedisServer;
use garage_gateway::config::Config;
use garage_gateway::plugins::{Admission, PluginHost, PluginsConfig, Slot, SlotLimits, SlotStatus};
use garage_gateway::store::{RedisStore, Store};

fn status(host: &PluginHost, slot: Slot) -> SlotStatus {
    host.status()
        .into_iter()
        .find(|s| s.slot == slot)
        .expect("every slot has a status")
}

fn admission(request_id: String, key_id: &str, metadata: &str) -> Admission {
    Admission {
        request_id,
        key_id: key_id.into(),
        model: "m".into(),
        reserved_tokens: 300,
        key_metadata: metadata.into(),
    }
}

#[test]
fn the_pool_fields_parse_validate_and_have_env_names() {
    let config: PluginsConfig = toml::from_str(
        "[rate-limiter]\nwarm_instances = 2\nwarm_max_instances = 32\nwarm_idle_secs = 5",
    )
    .unwrap();
    assert_eq!(config.rate_limiter.warm_max_instances, 32);
    assert_eq!(config.rate_limiter.warm_idle_secs, 5);
    config.validate().unwrap();
    let defaults = SlotLimits::default();
    assert!(defaults.warm_max_instances > defaults.warm_instances);

    // Hostile: a cap below the floor, or trimming at once.
    let below: PluginsConfig =
        toml::from_str("[router]\nwarm_instances = 8\nwarm_max_instances = 2").unwrap();
    let message = below.validate().unwrap_err();
    assert!(
        message.contains("plugins.router.warm_max_instances"),
        "{message}"
    );
    let at_once: PluginsConfig = toml::from_str("[meter]\nwarm_idle_secs = 0").unwrap();
    let message = at_once.validate().unwrap_err();
    assert!(
        message.contains("plugins.meter.warm_idle_secs"),
        "{message}"
    );
    assert!(toml::from_str::<PluginsConfig>("[router]\nwarm_max_instances = -1").is_err());

    let env = [
        ("GARAGE_PLUGINS_RATE_LIMITER_WARM_MAX_INSTANCES", "48"),
        ("GARAGE_PLUGINS_RATE_LIMITER_WARM_IDLE_SECS", "3"),
    ];
    let (config, _) = Config::load(
        None,
        env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
    )
    .expect("the environment sets the pool");
    assert_eq!(config.plugins.rate_limiter.warm_max_instances, 48);
    assert_eq!(config.plugins.rate_limiter.warm_idle_secs, 3);
}

/// Bursts of admissions in flight at once, each waiting on Redis round trips, several times
/// the pool's cap: every one is answered by the limiter (no host fault, no fallback), burst
/// after burst, and the limiter stays exact (a key with a limit of 40 a minute gets 40 of 64).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bursts_beyond_the_cap_are_served_on_redis_and_stay_exact() {
    let redis = RedisServer::start();
    let store: Arc<dyn Store> = Arc::new(RedisStore::connect(&redis.url()).await.unwrap());
    let config = PluginsConfig {
        rate_limiter: SlotLimits {
            deadline_ms: Some(1000),
            warm_instances: 1,
            warm_max_instances: 4,
            warm_idle_secs: 1,
            ..SlotLimits::default()
        },
        ..PluginsConfig::default()
    };
    let host = PluginHost::new(store, config)
        .await
        .expect("plugin host starts");
    drop(host.spawn_background());
    host.install(
        Slot::RateLimiter,
        garage_plugins::RATE_LIMITER,
        "{}",
        "test",
    )
    .await
    .unwrap();
    let unlimited = r#"{"rpm": 1000000000, "tpm": 1000000000000}"#;
    for burst in 0..3 {
        let calls = (0..32).map(|i| {
            let host = host.clone();
            tokio::spawn(async move {
                host.admit(&admission(format!("b{burst}-{i}"), "key-1", unlimited))
                    .await
            })
        });
        for answer in futures::future::join_all(calls).await {
            let decision = answer.expect("the task").expect("the limiter answers");
            assert!(decision.allow);
        }
    }
    let limited = r#"{"rpm": 40}"#;
    let calls = (0..64).map(|i| {
        let host = host.clone();
        tokio::spawn(async move {
            host.admit(&admission(format!("l{i}"), "key-2", limited))
                .await
        })
    });
    let mut allowed = 0;
    for answer in futures::future::join_all(calls).await {
        if answer
            .expect("the task")
            .expect("the limiter answers")
            .allow
        {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 40, "exact under a burst on an elastic pool");
    let faults = status(&host, Slot::RateLimiter).faults;
    assert_eq!(faults.host, 0, "{faults:?}");
    assert_eq!(faults.trap + faults.timeout, 0, "{faults:?}");
}
