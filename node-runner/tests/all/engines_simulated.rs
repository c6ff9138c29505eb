//! The `simulated` driver: engines in-process on ports they pick, routed by model and load.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use garage_node_protocol::EngineState;
use garage_node_runner::config::{Driver, EngineConfig, SimulatedDriver};
use garage_node_runner::engines::EngineSet;

const BOUND: Duration = Duration::from_secs(10);

fn simulated(name: &str, models: &[&str], driver: SimulatedDriver) -> EngineConfig {
    EngineConfig {
        name: name.into(),
        models: models.iter().map(|m| m.to_string()).collect(),
        gpus: vec![],
        port: 0,
        driver: Driver::Simulated(driver),
        health_timeout_secs: 10,
    }
}

fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

async fn eventually(bound: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + bound;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    condition()
}

#[tokio::test]
async fn routes_by_model_to_healthy_engines_on_the_ports_they_picked() -> anyhow::Result<()> {
    let engines = EngineSet::start(vec![
        simulated("a", &["model-a"], SimulatedDriver::default()),
        simulated("b", &["model-b", "shared"], SimulatedDriver::default()),
        simulated("c", &["shared"], SimulatedDriver::default()),
    ])
    .await;
    assert!(engines.wait_healthy(BOUND).await, "{engines:?}");
    let port = |name| engines.port(name).filter(|p| *p != 0).context("no port");
    let (a, b, c) = (port("a")?, port("b")?, port("c")?);
    assert_eq!(HashSet::from([a, b, c]).len(), 3);

    assert_eq!(
        engines.base_url_for("model-a"),
        Some(format!("http://127.0.0.1:{a}"))
    );
    assert_eq!(
        engines.base_url_for("model-b"),
        Some(format!("http://127.0.0.1:{b}"))
    );
    assert_eq!(engines.base_url_for("nobody-serves-this"), None);
    // Equal load: the engines serving a model take turns.
    let picks: HashSet<_> = (0..4)
        .filter_map(|_| engines.base_url_for("shared"))
        .collect();
    assert_eq!(
        picks,
        HashSet::from([
            format!("http://127.0.0.1:{b}"),
            format!("http://127.0.0.1:{c}")
        ])
    );

    let client = http_client();
    let models: serde_json::Value = client
        .get(format!("http://127.0.0.1:{a}/v1/models"))
        .send()
        .await?
        .json()
        .await?;
    assert_eq!(models["data"][0]["id"], "model-a");

    let statuses = engines.statuses();
    assert_eq!(
        statuses.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["a", "b", "c"]
    );
    assert!(
        statuses
            .iter()
            .all(|s| s.state == EngineState::Healthy && s.restarts == 0)
    );
    assert_eq!(statuses[1].models, ["model-b", "shared"]);

    engines.shutdown(Duration::from_secs(1)).await;
    assert!(
        engines
            .statuses()
            .iter()
            .all(|s| s.state == EngineState::Stopped)
    );
    assert_eq!(engines.base_url_for("model-a"), None);
    assert!(!engines.serves_any());
    assert!(
        client
            .get(format!("http://127.0.0.1:{a}/health"))
            .send()
            .await
            .is_err()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_least_loaded_engine_gets_the_model() -> anyhow::Result<()> {
    let slow = SimulatedDriver {
        tokens_per_sec: 20.0,
        ..SimulatedDriver::default()
    };
    let engines = EngineSet::start(vec![
        simulated("busy", &["shared"], slow.clone()),
        simulated("idle", &["shared"], slow),
    ])
    .await;
    assert!(engines.wait_healthy(BOUND).await, "{engines:?}");
    let busy = format!("http://127.0.0.1:{}", engines.port("busy").context("port")?);
    let idle = format!("http://127.0.0.1:{}", engines.port("idle").context("port")?);

    // Two requests of ten seconds each on `busy`, cut short by the stop below.
    let client = http_client();
    let mut requests = Vec::new();
    for _ in 0..2 {
        let client = client.clone();
        let busy = busy.clone();
        requests.push(tokio::spawn(async move {
            client
                .post(format!("{busy}/v1/completions"))
                .json(&serde_json::json!({"model": "shared", "prompt": "x", "max_tokens": 200}))
                .send()
                .await
        }));
    }
    assert!(
        eventually(BOUND, || {
            engines.statuses()[0]
                .stats
                .is_some_and(|s| s.requests_running >= 2.0)
        })
        .await,
        "{engines:?}"
    );
    for _ in 0..4 {
        assert_eq!(engines.base_url_for("shared"), Some(idle.clone()));
    }
    engines.stop(Duration::from_secs(1)).await;
    for request in requests {
        let _ = tokio::time::timeout(BOUND, request).await?;
    }
    Ok(())
}

/// The driver's dishonest settings reach the engine: `impersonate` answers as the copied model
/// does, `usage_inflation` multiplies the usage; by default an engine is honest.
#[tokio::test]
async fn a_dishonest_simulated_engine_copies_a_model_and_inflates_usage() -> anyhow::Result<()> {
    let cheat = SimulatedDriver {
        impersonate: Some("small-model".into()),
        usage_inflation: Some(3.0),
        ..SimulatedDriver::default()
    };
    let engines = EngineSet::start(vec![
        simulated("cheat", &["big-model"], cheat),
        simulated("small", &["small-model"], SimulatedDriver::default()),
        simulated("big", &["big-model"], SimulatedDriver::default()),
    ])
    .await;
    assert!(engines.wait_healthy(BOUND).await, "{engines:?}");
    let client = http_client();
    let ask = |engine: &str, model: &str| {
        let url = format!(
            "http://127.0.0.1:{}/v1/chat/completions",
            engines.port(engine).unwrap_or_default()
        );
        let request = client.post(url).json(&serde_json::json!({
            "model": model, "messages": [{"role": "user", "content": "hello there"}],
            "temperature": 0, "seed": 1, "logprobs": true, "top_logprobs": 2, "max_tokens": 8,
        }));
        async move {
            let body: serde_json::Value = request.send().await?.error_for_status()?.json().await?;
            anyhow::Ok(body)
        }
    };
    let cheated = ask("cheat", "big-model").await?;
    let copied = ask("small", "small-model").await?;
    let honest = ask("big", "big-model").await?;
    assert_eq!(cheated["model"], "big-model");
    assert_eq!(cheated["choices"], copied["choices"]);
    assert_ne!(cheated["choices"], honest["choices"]);
    assert_eq!(honest["usage"]["completion_tokens"], 8);
    assert_eq!(copied["usage"]["completion_tokens"], 8);
    assert_eq!(cheated["usage"]["completion_tokens"], 24);
    assert_eq!(
        cheated["usage"]["prompt_tokens"],
        honest["usage"]["prompt_tokens"]
            .as_u64()
            .unwrap_or_default()
            * 3
    );
    engines.shutdown(Duration::from_secs(1)).await;
    Ok(())
}
