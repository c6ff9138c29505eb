//! Several replicas on one Redis acting as one gateway: any replica reaches any rig (forwarded
//! over HTTP/2 to the replica holding its tunnel, streamed, billed as a local rig), the internal
//! channel admits only the cluster secret, a client that hangs up stops the rig on another
//! replica, a model whose last rig left gets 503, and limits hold across replicas.

use std::net::SocketAddr;
use std::time::Duration;

use crate::support::*;
use garage_node_runner::agent::Agent;
use serde_json::{Value, json};

const SECRET: &str = "a-cluster-secret-for-the-tests-0123456789";

/// A replica on `redis`, on a port of its own that it advertises to the others.
fn replica_config(redis: &RedisServer) -> garage_gateway::Config {
    let port = free_port();
    let mut cfg = config(vec![]);
    cfg.listen = SocketAddr::from(([127, 0, 0, 1], port));
    cfg.store = redis.url();
    cfg.auth.key_secret = Some("shared-replica-secret".into());
    cfg.nodes.heartbeat_interval_secs = 1;
    cfg.nodes.missed_heartbeats = 2;
    cfg.cluster.advertise_url = Some(format!("http://127.0.0.1:{port}"));
    cfg.cluster.secret = Some(SECRET.into());
    cfg
}

async fn replicas(redis: &RedisServer, n: usize, defaults: bool) -> Vec<garage_gateway::Gateway> {
    let mut out = Vec::new();
    for _ in 0..n {
        let mut cfg = replica_config(redis);
        cfg.default_plugins = defaults;
        out.push(gateway(cfg).await);
    }
    out
}

/// A rig (a real node-runner agent, simulated engine) serving `model`, tunnelled to `base`.
async fn model_rig(base: &str, model: &str, tokens_per_sec: f64) -> Agent {
    let token = enrollment_token(base, 1).await;
    let engines = garage_node_runner::engines::EngineSet::start(vec![
        garage_node_runner::cli::simulated_engine("sim", &[model.to_owned()], 0, tokens_per_sec),
    ])
    .await;
    Agent::start(rig_options(base, model, &token), engines)
        .await
        .expect("rig joins")
}

fn ask(model: &str, stream: bool) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 8,
        "stream": stream,
    })
}

/// Posts a chat request; returns status, request id and body text.
pub(crate) async fn post(base: &str, key: &str, body: &Value) -> (u16, String, String) {
    let response = client()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .expect("gateway answers");
    let status = response.status().as_u16();
    let id = response
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (status, id, response.text().await.unwrap_or_default())
}

/// Waits until every replica lists every model.
async fn wait_for_models(bases: &[String], key: &str, models: &[&str]) {
    for base in bases {
        wait_until(
            Duration::from_secs(10),
            "every model on every replica",
            || async {
                let listed = model_ids(base, key).await;
                models.iter().all(|m| listed.iter().any(|l| l == m))
            },
        )
        .await;
    }
}

#[tokio::test]
async fn every_replica_reaches_every_rig_and_bills_it_as_its_own() {
    let redis = RedisServer::start();
    let gateways = replicas(&redis, 3, false).await;
    let bases: Vec<String> = gateways.iter().map(|g| g.url()).collect();
    let models = ["model-one", "model-two", "model-three"];
    let mut rigs = Vec::new();
    for (base, model) in bases.iter().zip(models) {
        rigs.push(model_rig(base, model, 2000.0).await);
    }
    let (_, key) = create_key(&bases[0], json!({"name": "cluster"})).await;
    wait_for_models(&bases, &key, &models).await;

    for base in &bases {
        for (model, rig) in models.iter().zip(&rigs) {
            for stream in [false, true] {
                let (status, id, body) = post(base, &key, &ask(model, stream)).await;
                assert_eq!(status, 200, "{model} through {base}: {body}");
                if stream {
                    assert!(body.contains("data: [DONE]"), "{body}");
                    assert!(!body.contains("\"error\""), "{body}");
                } else {
                    let answer: Value = serde_json::from_str(&body).expect("JSON");
                    assert_eq!(answer["model"], *model);
                }
                // Billed where it was asked, to the rig that served it, whichever replica
                // holds its tunnel.
                let entry = ledger_entry(base, &id).await;
                assert_eq!(entry["event"]["rig"], rig.node_id(), "{entry}");
                assert!(
                    entry["event"]["completion_tokens"].as_u64().unwrap() > 0,
                    "{entry}"
                );
            }
        }
    }
    // The first replica knows where the other rigs are, and routes to them.
    let nodes = admin_get(&bases[0], "/admin/nodes").await;
    for node in nodes["data"].as_array().unwrap() {
        assert_eq!(node["routable"], true, "{node}");
        assert!(node["replica"].is_string(), "{node}");
    }
    let connected = nodes["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["connected"] == true)
        .count();
    assert_eq!(
        connected, 1,
        "one rig is tunnelled to the first replica: {nodes}"
    );
}

#[tokio::test]
async fn the_internal_channel_takes_the_cluster_secret_and_nothing_else() {
    let redis = RedisServer::start();
    let gateways = replicas(&redis, 2, false).await;
    let (one, two) = (gateways[0].url(), gateways[1].url());
    let rig = model_rig(&two, "model-two", 2000.0).await;
    let (_, key) = create_key(&one, json!({"name": "app"})).await;
    wait_for_models(std::slice::from_ref(&one), &key, &["model-two"]).await;

    let internal = |path: &str| format!("{two}/internal/rigs/{}/v1/{path}", rig.node_id());
    let send = |url: String, header: Option<(&'static str, String)>| async move {
        let mut request = client().post(url).json(&ask("model-two", false));
        if let Some((name, value)) = header {
            request = request.header(name, value);
        }
        let response = request.send().await.expect("gateway answers");
        let status = response.status().as_u16();
        (status, response.text().await.unwrap_or_default())
    };
    let refused = [
        None,
        Some(("authorization", format!("Bearer {key}"))),
        Some(("authorization", format!("Bearer {ADMIN}"))),
        Some(("garage-cluster-secret", key.clone())),
        Some(("garage-cluster-secret", SECRET.replace('a', "b"))),
        Some(("garage-cluster-secret", format!("{SECRET}x"))),
    ];
    for header in refused {
        let (status, body) = send(internal("chat/completions"), header.clone()).await;
        assert_eq!(status, 401, "{header:?}: {body}");
        assert_eq!(error_of(&body)["type"], "invalid_request_error", "{body}");
    }
    let secret = || Some(("garage-cluster-secret", SECRET.to_owned()));
    // Only the inference paths, only rigs tunnelled here.
    for path in ["models", "chat/completions/../../admin/keys", "batches"] {
        let (status, body) = send(internal(path), secret()).await;
        assert_eq!(status, 404, "{path}: {body}");
        error_of(&body);
    }
    let (status, body) = send(
        format!("{two}/internal/rigs/no-such-rig/v1/chat/completions"),
        secret(),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    error_of(&body);
    // With the secret, the rig answers (so the refusals above were the secret's doing).
    let (status, body) = send(internal("chat/completions"), secret()).await;
    assert_eq!(status, 200, "{body}");
    // A replica with no cluster configured has no internal channel at all.
    let alone = gateway(config(vec![])).await;
    let (status, body) = send(
        format!("{}/internal/rigs/x/v1/chat/completions", alone.url()),
        secret(),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    error_of(&body);
}

/// The engine's running requests, as its rig's last heartbeat says.
async fn engine_running(base: &str, node: &str) -> f64 {
    admin_get(base, &format!("/admin/nodes/{node}")).await["heartbeat"]["engines"][0]["stats"]
        ["requests_running"]
        .as_f64()
        .unwrap_or(-1.0)
}

#[tokio::test]
async fn a_client_hanging_up_stops_the_rig_on_another_replica_and_pays_what_it_got() {
    let redis = RedisServer::start();
    let gateways = replicas(&redis, 2, false).await;
    let (one, two) = (gateways[0].url(), gateways[1].url());
    // 20 tokens a second: a 2,000-token answer would take well over a minute.
    let rig = model_rig(&two, "slow-model", 20.0).await;
    let (_, key) = create_key(&one, json!({"name": "app"})).await;
    wait_for_models(std::slice::from_ref(&one), &key, &["slow-model"]).await;

    let mut body = ask("slow-model", true);
    body["max_tokens"] = json!(2000);
    let mut response = client()
        .post(format!("{one}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let mut received = 0;
    while received < 5 {
        let chunk = response.chunk().await.unwrap().expect("a chunk");
        received += String::from_utf8_lossy(&chunk)
            .matches("\"content\":\"")
            .count();
    }
    wait_until(
        Duration::from_secs(5),
        "the engine working on it",
        || async { engine_running(&two, rig.node_id()).await == 1.0 },
    )
    .await;
    drop(response);
    wait_until(
        Duration::from_secs(5),
        "the engine to stop once the client hung up",
        || async { engine_running(&two, rig.node_id()).await == 0.0 },
    )
    .await;
    // What was delivered is billed where it was asked.
    let entry = ledger_entry(&one, &id).await;
    let completion = entry["event"]["completion_tokens"].as_u64().unwrap();
    assert!(
        (5..2000).contains(&completion),
        "billed {completion} tokens for a stream cut after 5: {entry}"
    );
}

#[tokio::test]
async fn a_model_whose_last_rig_left_is_unavailable_not_unknown() {
    let redis = RedisServer::start();
    let gateways = replicas(&redis, 2, false).await;
    let (one, two) = (gateways[0].url(), gateways[1].url());
    let rig = model_rig(&two, "model-solo", 2000.0).await;
    let (_, key) = create_key(&one, json!({"name": "app"})).await;
    wait_for_models(std::slice::from_ref(&one), &key, &["model-solo"]).await;
    assert_eq!(post(&one, &key, &ask("model-solo", false)).await.0, 200);

    rig.shutdown().await;
    for base in [&one, &two] {
        wait_until(Duration::from_secs(5), "the rig out of routing", || async {
            post(base, &key, &ask("model-solo", false)).await.0 == 503
        })
        .await;
        let (_, _, body) = post(base, &key, &ask("model-solo", false)).await;
        assert_eq!(error_of(&body)["code"], "no_backend_available", "{body}");
        let (status, _, body) = post(base, &key, &ask("never-served", false)).await;
        assert_eq!(status, 404, "{body}");
        assert_eq!(error_of(&body)["code"], "model_not_found", "{body}");
    }
}

/// Starts well inside a minute: the default limiter counts in fixed windows of a minute, and a
/// test that reads its counters must not see one end.
pub(crate) async fn inside_a_minute() {
    let into_minute = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        % 60_000;
    if into_minute > 35_000 {
        tokio::time::sleep(Duration::from_millis(61_000 - into_minute as u64)).await;
    }
}

#[tokio::test]
async fn limits_hold_across_replicas() {
    let redis = RedisServer::start();
    let gateways = replicas(&redis, 3, true).await;
    let bases: Vec<String> = gateways.iter().map(|g| g.url()).collect();
    let models = ["model-one", "model-two", "model-three"];
    let mut rigs = Vec::new();
    for (base, model) in bases.iter().zip(models) {
        rigs.push(model_rig(base, model, 5000.0).await);
    }
    let (_, rpm_key) = create_key(&bases[0], json!({"name": "rpm", "metadata": {"rpm": 60}})).await;
    let (_, tpm_key) =
        create_key(&bases[0], json!({"name": "tpm", "metadata": {"tpm": 3000}})).await;
    wait_for_models(&bases, &rpm_key, &models).await;
    inside_a_minute().await;

    // 180 requests at once, through every replica, to rigs on every replica, half streamed.
    let burst = |key: String| {
        let bases = bases.clone();
        futures::future::join_all((0..180).map(move |i| {
            let base = bases[i % 3].clone();
            let body = ask(models[(i / 3) % 3], i % 2 == 0);
            let key = key.clone();
            async move { post(&base, &key, &body).await }
        }))
    };
    let answers = burst(rpm_key).await;
    let admitted = answers.iter().filter(|(s, ..)| *s == 200).count();
    let limited = answers.iter().filter(|(s, ..)| *s == 429).count();
    assert_eq!(
        (admitted, limited),
        (60, 120),
        "{:?}",
        answers.iter().map(|a| a.0).collect::<Vec<_>>()
    );

    let answers = burst(tpm_key).await;
    let admitted: Vec<&(u16, String, String)> =
        answers.iter().filter(|(s, ..)| *s == 200).collect();
    assert!(
        answers.iter().any(|(s, ..)| *s == 429),
        "the token limit never bound"
    );
    let mut tokens = 0;
    for (_, id, _) in &admitted {
        let entry = ledger_entry(&bases[0], id).await;
        tokens += entry["event"]["prompt_tokens"].as_u64().unwrap()
            + entry["event"]["completion_tokens"].as_u64().unwrap();
    }
    assert!(
        !admitted.is_empty() && tokens <= 3030,
        "{} requests admitted used {tokens} tokens of a 3,000-token minute",
        admitted.len()
    );
}

#[tokio::test]
async fn a_budget_stops_a_key_on_every_replica() {
    let redis = RedisServer::start();
    let gateways = replicas(&redis, 3, true).await;
    let bases: Vec<String> = gateways.iter().map(|g| g.url()).collect();
    let _rig = model_rig(&bases[1], "model-two", 5000.0).await;
    // One credit per 1,000 tokens; a budget of 0.1 credit is a handful of requests.
    let (status, body) = upload_plugin(
        &bases[0],
        "meter",
        garage_plugins::METER,
        &config_query(json!({"default_budget": 0.1})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (key_id, key) = create_key(&bases[0], json!({"name": "budget"})).await;
    wait_for_models(&bases, &key, &["model-two"]).await;
    // Spend it, a request at a time, through each replica in turn.
    let mut admitted = 0;
    for i in 0.. {
        let (status, _, body) = post(&bases[i % 3], &key, &ask("model-two", i % 2 == 0)).await;
        if status == 429 {
            assert_eq!(error_of(&body)["code"], "insufficient_quota", "{body}");
            break;
        }
        assert_eq!(status, 200, "{body}");
        admitted += 1;
        assert!(admitted < 200, "the budget never stopped the key");
        // The meter runs after the answer, off the request path.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Then every replica refuses it (each trusts a verdict for a second)...
    for base in &bases {
        wait_until(
            Duration::from_secs(3),
            "the verdict on every replica",
            || async { post(base, &key, &ask("model-two", false)).await.0 == 429 },
        )
        .await;
    }
    // ...and, once the last events are metered, all agree on what it spent: one total,
    // whichever replica served a request and whichever metered it.
    let spent_on = |base: String, key_id: String| async move {
        let usage = admin_get(&base, &format!("/admin/usage?key_id={key_id}")).await;
        usage["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|row| row["key_id"] == key_id)
            .map(|row| row["credits"].as_f64().unwrap())
            .sum::<f64>()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let spent = loop {
        let mut spent = Vec::new();
        for base in &bases {
            spent.push(spent_on(base.clone(), key_id.clone()).await);
        }
        if spent.iter().all(|s| (s - spent[0]).abs() < 1e-9) {
            break spent;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "totals differ: {spent:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        spent[0] >= 0.1,
        "stopped before the budget was spent: {spent:?}"
    );
}

#[tokio::test]
async fn a_replica_that_starts_learns_the_others_rigs_at_once() {
    let redis = RedisServer::start();
    // Heartbeats every 30 s: only asking the others can explain a rig routed within seconds.
    let slow = |redis: &RedisServer| {
        let mut cfg = replica_config(redis);
        cfg.nodes.heartbeat_interval_secs = 30;
        cfg
    };
    let first = gateway(slow(&redis)).await;
    let _rig = model_rig(&first.url(), "model-one", 2000.0).await;
    let (_, key) = create_key(&first.url(), json!({"name": "app"})).await;
    wait_for_models(&[first.url()], &key, &["model-one"]).await;

    let second = gateway(slow(&redis)).await;
    wait_until(
        Duration::from_secs(3),
        "the new replica to route the rig",
        || async { model_ids(&second.url(), &key).await == ["model-one"] },
    )
    .await;
    assert_eq!(
        post(&second.url(), &key, &ask("model-one", false)).await.0,
        200
    );
}
