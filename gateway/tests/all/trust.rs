//! Rigs are strangers: spot checks compare a rig's answers with other rigs' by
//! log-probabilities (honest rigs, each with its own hardware noise, become verified and stay
//! so; an impersonator is quarantined), usage checks catch a rig that inflates its reports,
//! quarantine takes a rig out of routing without failed requests, and an admin reinstates it.
//! On both stores.

use std::time::Duration;

use crate::support::*;
use garage_node_runner::agent::Agent;
use garage_node_runner::config::{Driver, EngineConfig, SimulatedDriver};
use serde_json::{Value, json};

/// A rig serving [`MODEL`], honest or not.
async fn rig(base: &str, name: &str, token: &str, driver: SimulatedDriver) -> Agent {
    let engines = garage_node_runner::engines::EngineSet::start(vec![EngineConfig {
        name: "sim".into(),
        models: vec![MODEL.into()],
        gpus: Vec::new(),
        port: 0,
        driver: Driver::Simulated(driver),
        health_timeout_secs: 30,
    }])
    .await;
    Agent::start(rig_options(base, name, token), engines)
        .await
        .expect("rig joins")
}

/// An honest engine: its own small log-probability noise, as a GPU of its own has.
fn honest() -> SimulatedDriver {
    SimulatedDriver {
        logprob_noise: 0.01,
        ..SimulatedDriver::default()
    }
}

/// A cheat: it answers under the model's name but generates as a smaller model, with its own
/// log-probability noise as an honest engine has.
fn impersonator() -> SimulatedDriver {
    SimulatedDriver {
        impersonate: Some("a-smaller-model".into()),
        ..honest()
    }
}

fn trust_config(store: Option<&RedisServer>) -> garage_gateway::Config {
    let mut cfg = config(vec![]);
    if let Some(redis) = store {
        cfg.store = redis.url();
        cfg.auth.key_secret = Some("trust-secret".into());
    }
    cfg.nodes.heartbeat_interval_secs = 1;
    cfg.nodes.missed_heartbeats = 2;
    cfg.trust.spot_check_interval_secs = 1;
    cfg.trust.spot_check_timeout_secs = 10;
    cfg
}

/// The gateway counts [`MODEL`]'s tokens itself, with the simulated engine's tokenizer.
fn with_tokenizer(cfg: &mut garage_gateway::Config) {
    cfg.tokenizers.insert(
        MODEL.into(),
        garage_gateway::config::TokenizerConfig {
            file: std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../sim-engine/tokenizer.json"),
            chat_template_tokens: 4,
        },
    );
}

/// An enrollment token for `operator`'s rigs.
async fn operator_token(base: &str, operator: &str, uses: u32) -> String {
    let (status, body) = admin_post(
        base,
        "/admin/enrollment-tokens",
        json!({"operator": operator, "max_uses": uses}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    body["token"].as_str().unwrap().to_owned()
}

/// Sends a chat request with `key` and answers its request id.
async fn served(base: &str, key: &str, stream: bool) -> String {
    let response = client()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&chat(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned()
}

async fn node(base: &str, id: &str) -> Value {
    admin_get(base, &format!("/admin/nodes/{id}")).await
}

async fn status(base: &str, id: &str) -> String {
    node(base, id).await["trust"]["status"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

async fn honest_rigs_are_verified_and_an_impersonator_quarantined(store: Option<&RedisServer>) {
    let gw = gateway(trust_config(store)).await;
    let base = gw.url();
    let token = enrollment_token(&base, 4).await;
    let mut honest_rigs = Vec::new();
    for i in 0..3 {
        honest_rigs.push(rig(&base, &format!("honest-{i}"), &token, honest()).await);
    }
    let cheat = rig(&base, "cheat", &token, impersonator()).await;
    let (_, key) = create_key(&base, json!({"name": "app"})).await;

    // Checked about once a second each: the honest rigs earn `verified`, the impersonator
    // fails against them and is quarantined (three failures in a row).
    wait_until(Duration::from_secs(30), "verdicts on every rig", || async {
        let mut done = status(&base, cheat.node_id()).await == "quarantined";
        for rig in &honest_rigs {
            done &= status(&base, rig.node_id()).await == "verified";
        }
        done
    })
    .await;
    let cheat_node = node(&base, cheat.node_id()).await;
    assert_eq!(cheat_node["routable"], false, "{cheat_node}");
    assert!(
        cheat_node["trust"]["last_discrepancy"]
            .as_str()
            .unwrap()
            .contains("unlike the model it claims"),
        "{cheat_node}"
    );
    assert_eq!(cheat_node["trust"]["checks_passed"], 0, "{cheat_node}");

    // Traffic goes to the honest rigs, and none of it fails.
    for i in 0..30 {
        let (status, body) = post_chat(&base, &key, &chat(i % 2 == 0)).await;
        assert_eq!(status, 200, "{body}");
    }
    let rigs_served = admin_get(&base, "/admin/usage").await;
    assert!(rigs_served["data"].is_array());

    // Honest rigs stay verified over many checks: the false-positive rate.
    let mut checks = 0;
    let mut failed = 0;
    for _ in 0..10 {
        for rig in &honest_rigs {
            let result = admin_post(
                &base,
                &format!("/admin/nodes/{}/verify", rig.node_id()),
                json!({}),
            )
            .await;
            assert_eq!(result.0, 200, "{}", result.1);
            checks += 1;
            if result.1["verdict"] == "failed" {
                failed += 1;
            }
        }
    }
    eprintln!("honest rigs: {failed} of {checks} spot checks failed");
    assert_eq!(
        failed, 0,
        "honest rigs failed {failed} of {checks} spot checks"
    );
    for rig in &honest_rigs {
        assert_eq!(status(&base, rig.node_id()).await, "verified");
    }

    // An admin reinstates the impersonator: unverified, back in routing.
    let (code, reinstated) = admin_post(
        &base,
        &format!("/admin/nodes/{}/reinstate", cheat.node_id()),
        json!({}),
    )
    .await;
    assert_eq!(code, 200, "{reinstated}");
    assert_eq!(reinstated["trust"]["status"], "unverified", "{reinstated}");
    assert_metrics_include(
        &base,
        &["garage_rig_checks_total{kind=\"spot_check\",outcome=\"failed\"}".into()],
    )
    .await;
}

#[tokio::test]
async fn honest_rigs_are_verified_and_an_impersonator_quarantined_on_the_embedded_store() {
    honest_rigs_are_verified_and_an_impersonator_quarantined(None).await;
}

#[tokio::test]
async fn honest_rigs_are_verified_and_an_impersonator_quarantined_on_redis() {
    let redis = RedisServer::start();
    honest_rigs_are_verified_and_an_impersonator_quarantined(Some(&redis)).await;
}

#[tokio::test]
async fn a_rig_that_inflates_its_usage_is_quarantined_and_traffic_moves() {
    let mut cfg = trust_config(None);
    cfg.trust.spot_check_interval_secs = 0;
    with_tokenizer(&mut cfg);
    let gw = gateway(cfg).await;
    let base = gw.url();
    let token = enrollment_token(&base, 2).await;
    let _honest = rig(&base, "honest", &token, honest()).await;
    let inflator = rig(
        &base,
        "inflator",
        &token,
        SimulatedDriver {
            usage_inflation: Some(3.0),
            ..SimulatedDriver::default()
        },
    )
    .await;
    let (_, key) = create_key(&base, json!({"name": "app"})).await;
    wait_until(Duration::from_secs(10), "both rigs routable", || async {
        routable_rigs(&base).await == 2
    })
    .await;
    // Every request succeeds; each one the inflator serves is a failed usage check, and the
    // third puts it in quarantine.
    for i in 0..40 {
        let (status, body) = post_chat(&base, &key, &chat(i % 2 == 0)).await;
        assert_eq!(status, 200, "{body}");
    }
    wait_until(
        Duration::from_secs(5),
        "the inflator quarantined",
        || async { status(&base, inflator.node_id()).await == "quarantined" },
    )
    .await;
    let found = node(&base, inflator.node_id()).await;
    assert_eq!(found["trust"]["last_check"], "usage", "{found}");
    assert!(
        found["trust"]["last_discrepancy"]
            .as_str()
            .unwrap()
            .contains("the gateway counted"),
        "{found}"
    );
    assert_eq!(routable_rigs(&base).await, 1);
    for i in 0..10 {
        let (status, body) = post_chat(&base, &key, &chat(i % 2 == 0)).await;
        assert_eq!(status, 200, "{body}");
    }
}

#[tokio::test]
async fn a_key_that_wants_verified_rigs_gets_only_them() {
    let gw = gateway(trust_config(None)).await;
    let base = gw.url();
    let (code, body) = admin_post(
        &base,
        "/admin/keys",
        json!({"name": "picky", "metadata": {"min_trust": "trusted-enough"}}),
    )
    .await;
    assert_eq!(code, 400, "{body}");
    assert_eq!(body["error"]["param"], "metadata", "{body}");
    let (_, picky) = create_key(
        &base,
        json!({"name": "picky", "metadata": {"min_trust": "verified"}}),
    )
    .await;
    let (_, anyone) = create_key(&base, json!({"name": "anyone"})).await;
    let token = enrollment_token(&base, 3).await;
    let mut rigs = Vec::new();
    for i in 0..3 {
        rigs.push(rig(&base, &format!("honest-{i}"), &token, honest()).await);
    }
    wait_until(Duration::from_secs(10), "three rigs routable", || async {
        routable_rigs(&base).await == 3
    })
    .await;
    // Nobody is verified yet: the picky key waits (503, retry), the other is served.
    let (code, body) = post_chat(&base, &picky, &chat(false)).await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(error_of(&body)["code"], "no_backend_available", "{body}");
    assert_eq!(post_chat(&base, &anyone, &chat(false)).await.0, 200);
    // One rig gets verified (three passed spot checks): the picky key goes to it alone.
    let verified = rigs[0].node_id().to_owned();
    for _ in 0..3 {
        let (code, result) =
            admin_post(&base, &format!("/admin/nodes/{verified}/verify"), json!({})).await;
        assert_eq!(code, 200, "{result}");
        assert_eq!(result["verdict"], "passed", "{result}");
    }
    assert_eq!(status(&base, &verified).await, "verified");
    for _ in 0..10 {
        let response = client()
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(&picky)
            .json(&chat(false))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let id = response.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(ledger_entry(&base, &id).await["event"]["rig"], verified);
    }
}

/// The points `operator` has on the leaderboard, and those withheld from it.
async fn points(base: &str, operator: &str) -> (f64, f64) {
    let board = admin_get(base, "/admin/rewards").await;
    board["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|row| row["operator"] == operator)
        .map_or((0.0, 0.0), |row| {
            (
                row["points"].as_f64().unwrap(),
                row["withheld_points"].as_f64().unwrap(),
            )
        })
}

#[tokio::test]
async fn a_quarantined_rigs_unconfirmed_rewards_are_withheld() {
    let mut cfg = trust_config(None);
    cfg.default_plugins = true;
    with_tokenizer(&mut cfg);
    // Checks only when the test asks for them.
    cfg.trust.spot_check_interval_secs = 0;
    let gw = gateway(cfg).await;
    let base = gw.url();
    // An operator who pays unverified work too: what it earns before its checks is held.
    let pays_everyone = config_query(json!({"verified_only": false}));
    let (code, body) = upload_plugin(&base, "reward", garage_plugins::REWARD, &pays_everyone).await;
    assert_eq!(code, 200, "{body}");
    let honest_token = operator_token(&base, "honest-op", 3).await;
    let mut honest_rigs = Vec::new();
    for i in 0..3 {
        honest_rigs.push(rig(&base, &format!("honest-{i}"), &honest_token, honest()).await);
    }
    let cheat_token = operator_token(&base, "cheat-op", 1).await;
    let cheat = rig(&base, "cheat", &cheat_token, impersonator()).await;
    let (_, key) = create_key(&base, json!({"name": "app"})).await;
    wait_until(Duration::from_secs(10), "four rigs routable", || async {
        routable_rigs(&base).await == 4
    })
    .await;
    // Everyone serves (and earns) for a while, checked by nobody.
    let mut ids = Vec::new();
    for i in 0..40 {
        let response = client()
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&chat(i % 2 == 0))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        ids.push(
            response.headers()["x-request-id"]
                .to_str()
                .unwrap()
                .to_owned(),
        );
    }
    // Every request metered and rewarded before the earnings are read: each in the ledger,
    // and the points still for half a second.
    for id in &ids {
        ledger_entry(&base, id).await;
    }
    wait_until(Duration::from_secs(10), "the points to settle", || async {
        let before = (
            points(&base, "cheat-op").await,
            points(&base, "honest-op").await,
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        before
            == (
                points(&base, "cheat-op").await,
                points(&base, "honest-op").await,
            )
            && before.0.0 > 0.0
            && before.1.0 > 0.0
    })
    .await;
    let (cheat_earned, _) = points(&base, "cheat-op").await;
    let (honest_earned, _) = points(&base, "honest-op").await;
    // The honest rigs pass their checks: what they earned stands.
    for rig in &honest_rigs {
        for _ in 0..3 {
            let path = format!("/admin/nodes/{}/verify", rig.node_id());
            assert_eq!(
                admin_post(&base, &path, json!({})).await.1["verdict"],
                "passed"
            );
        }
    }
    // The impersonator fails three: quarantined, and what it earned withheld, not paid.
    for _ in 0..3 {
        let path = format!("/admin/nodes/{}/verify", cheat.node_id());
        assert_eq!(
            admin_post(&base, &path, json!({})).await.1["verdict"],
            "failed"
        );
    }
    assert_eq!(status(&base, cheat.node_id()).await, "quarantined");
    let (cheat_points, cheat_withheld) = points(&base, "cheat-op").await;
    assert!(cheat_points.abs() < 1e-9, "still paid: {cheat_points}");
    assert!(
        (cheat_withheld - cheat_earned).abs() < 1e-9,
        "{cheat_withheld} of {cheat_earned}"
    );
    let found = node(&base, cheat.node_id()).await;
    assert!(
        (found["trust"]["withheld_points"].as_f64().unwrap() - cheat_earned).abs() < 1e-9,
        "{found}"
    );
    assert_eq!(points(&base, "honest-op").await, (honest_earned, 0.0));
}

#[tokio::test]
async fn real_temperature_zero_requests_replayed_catch_an_impersonator_unless_the_key_says_no() {
    let mut cfg = trust_config(None);
    cfg.trust.spot_check_interval_secs = 0;
    cfg.trust.replay_share = 1.0;
    let gw = gateway(cfg).await;
    let base = gw.url();
    let token = enrollment_token(&base, 4).await;
    let mut honest_rigs = Vec::new();
    for i in 0..3 {
        honest_rigs.push(rig(&base, &format!("honest-{i}"), &token, honest()).await);
    }
    let cheat = rig(&base, "cheat", &token, impersonator()).await;
    wait_until(Duration::from_secs(10), "four rigs routable", || async {
        routable_rigs(&base).await == 4
    })
    .await;
    let temperature_zero = json!({"model": MODEL, "temperature": 0, "max_tokens": 12,
        "messages": [{"role": "user", "content": "what is the capital of France"}]});
    // A key that said no: its requests are never replayed, so nobody is checked.
    let (_, private) = create_key(
        &base,
        json!({"name": "private", "metadata": {"replay": false}}),
    )
    .await;
    for _ in 0..12 {
        assert_eq!(post_chat(&base, &private, &temperature_zero).await.0, 200);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for rig in honest_rigs.iter().chain([&cheat]) {
        assert_eq!(
            node(&base, rig.node_id()).await["trust"]["checks_passed"],
            0,
            "a private key's request was replayed"
        );
    }
    // Another key's real requests are replayed on the other rigs: the impersonator is caught.
    let (_, app) = create_key(&base, json!({"name": "app"})).await;
    for _ in 0..20 {
        assert_eq!(post_chat(&base, &app, &temperature_zero).await.0, 200);
    }
    wait_until(
        Duration::from_secs(10),
        "the impersonator quarantined",
        || async { status(&base, cheat.node_id()).await == "quarantined" },
    )
    .await;
    for rig in &honest_rigs {
        assert_ne!(status(&base, rig.node_id()).await, "quarantined");
    }
}

#[tokio::test]
async fn a_rig_the_operator_vouches_for_settles_what_two_rigs_cannot() {
    let gw = gateway(trust_config(None)).await;
    let base = gw.url();
    let token = enrollment_token(&base, 2).await;
    let own = rig(&base, "operators-own", &token, honest()).await;
    let cheat = rig(&base, "cheat", &token, impersonator()).await;
    wait_until(Duration::from_secs(10), "both rigs routable", || async {
        routable_rigs(&base).await == 2
    })
    .await;
    let verify = |id: String| {
        let base = base.clone();
        async move {
            let (code, result) =
                admin_post(&base, &format!("/admin/nodes/{id}/verify"), json!({})).await;
            assert_eq!(code, 200, "{result}");
            result["verdict"].as_str().unwrap().to_owned()
        }
    };
    // Two strangers who disagree: neither word counts more.
    assert_eq!(verify(cheat.node_id().to_owned()).await, "inconclusive");
    // The operator vouches for its own rig: now the other is judged against it.
    let path = format!("/admin/nodes/{}/reference", own.node_id());
    let (code, body) = admin_post(&base, &path, json!({"reference": "yes"})).await;
    assert_eq!(code, 400, "{body}");
    let (code, body) = admin_post(&base, &path, json!({"reference": true})).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["reference"], true, "{body}");
    for _ in 0..3 {
        assert_eq!(verify(cheat.node_id().to_owned()).await, "failed");
    }
    assert_eq!(status(&base, cheat.node_id()).await, "quarantined");
}

/// The default reward plugin pays only verified, gateway-counted work: requests a rig served
/// before it was verified earn nothing, those after do; and the ledger records, per request,
/// the rig's trust when it served and who counted the tokens.
#[tokio::test]
async fn the_default_reward_pays_only_verified_gateway_counted_work() {
    let mut cfg = trust_config(None);
    cfg.default_plugins = true;
    cfg.trust.spot_check_interval_secs = 0;
    with_tokenizer(&mut cfg);
    let gw = gateway(cfg).await;
    let base = gw.url();
    let first = rig(
        &base,
        "first",
        &operator_token(&base, "first-op", 1).await,
        honest(),
    )
    .await;
    let others_token = operator_token(&base, "other-op", 2).await;
    let mut others = Vec::new();
    for i in 0..2 {
        others.push(rig(&base, &format!("other-{i}"), &others_token, honest()).await);
    }
    let (_, anyone) = create_key(&base, json!({"name": "anyone"})).await;
    let (_, picky) = create_key(
        &base,
        json!({"name": "picky", "metadata": {"min_trust": "verified"}}),
    )
    .await;
    wait_until(Duration::from_secs(10), "three rigs routable", || async {
        routable_rigs(&base).await == 3
    })
    .await;

    // Nobody is verified: every request is metered, none earns a point.
    for i in 0..6 {
        let id = served(&base, &anyone, i % 2 == 0).await;
        let entry = ledger_entry(&base, &id).await;
        assert_eq!(entry["event"]["trust"], "unverified", "{entry}");
        assert_eq!(entry["event"]["counted"]["by"], "gateway", "{entry}");
        assert!(
            entry["outcome"]["credits"].as_f64().unwrap() > 0.0,
            "{entry}"
        );
        assert_eq!(entry["outcome"]["awards"], json!([]), "{entry}");
    }

    // The first rig passes its checks (against the others): its work pays from then on.
    for _ in 0..3 {
        let path = format!("/admin/nodes/{}/verify", first.node_id());
        let (code, result) = admin_post(&base, &path, json!({})).await;
        assert_eq!(
            (code, &result["verdict"]),
            (200, &json!("passed")),
            "{result}"
        );
    }
    assert_eq!(status(&base, first.node_id()).await, "verified");
    for i in 0..4 {
        let id = served(&base, &picky, i % 2 == 0).await;
        let entry = ledger_entry(&base, &id).await;
        assert_eq!(entry["event"]["rig"], first.node_id(), "{entry}");
        assert_eq!(entry["event"]["trust"], "verified", "{entry}");
        let awards = entry["outcome"]["awards"].as_array().unwrap();
        assert_eq!(awards.len(), 1, "{entry}");
        assert_eq!(awards[0]["operator"], "first-op", "{entry}");
        assert_eq!(awards[0]["reason"], "tokens", "{entry}");
        let tokens = entry["event"]["prompt_tokens"].as_f64().unwrap()
            + entry["event"]["completion_tokens"].as_f64().unwrap();
        let points = awards[0]["points"].as_f64().unwrap();
        assert!((points - tokens / 1000.0).abs() < 1e-9, "{entry}");
    }
    assert!(points(&base, "first-op").await.0 > 0.0);
    assert_eq!(points(&base, "other-op").await, (0.0, 0.0));
    // The rig's owner sees the same points, today's in their earnings per day.
    let (status, created) =
        admin_post(&base, "/admin/operators", json!({"name": "first-op"})).await;
    assert_eq!(status, 201, "{created}");
    let earnings: Value = client()
        .get(format!("{base}/operator/v1/earnings?days=2"))
        .bearer_auth(created["token"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let total = points(&base, "first-op").await.0;
    assert!(
        (earnings["points"].as_f64().unwrap() - total).abs() < 1e-9,
        "{earnings}"
    );
    // Yesterday and today: every point is in one of them (a test can straddle midnight).
    let by_day: f64 = earnings["days"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["points"].as_f64().unwrap())
        .sum();
    assert!((by_day - total).abs() < 1e-9, "{earnings}");
}

/// Routing measures rigs instead of believing them; a rig whose reported GPU does not fit the
/// speed measured on it is flagged in its node info, its honest peers are not.
#[tokio::test]
async fn a_rig_slower_than_the_gpu_it_reports_is_flagged() {
    let gw = gateway(trust_config(None)).await;
    let base = gw.url();
    let token = enrollment_token(&base, 3).await;
    let with = |gpu: &str, tokens_per_sec: f64| SimulatedDriver {
        tokens_per_sec,
        reported_gpus: vec![gpu.to_owned()],
        ..honest()
    };
    let rigs = [
        rig(
            &base,
            "a-4090",
            &token,
            with("NVIDIA GeForce RTX 4090", 600.0),
        )
        .await,
        rig(
            &base,
            "a-3090",
            &token,
            with("NVIDIA GeForce RTX 3090", 550.0),
        )
        .await,
        // Reports a 4090 and decodes twenty times slower than its peers: far more than a
        // 3060 reported as a 4090 would (360 against 1008 GB/s), so that a busy test machine
        // slowing the fast rigs' measurements cannot hide it.
        rig(
            &base,
            "a-claim",
            &token,
            with("NVIDIA GeForce RTX 4090", 30.0),
        )
        .await,
    ];
    let (_, key) = create_key(&base, json!({"name": "app"})).await;
    wait_until(Duration::from_secs(10), "three rigs routable", || async {
        routable_rigs(&base).await == 3
    })
    .await;
    let request = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "the quick brown fox"}],
        "max_tokens": 16,
        // Streamed: the gateway tells the first token from the rest, and measures decoding.
        "stream": true,
    });
    wait_until(Duration::from_secs(30), "every rig measured", || async {
        let (code, body) = post_chat(&base, &key, &request).await;
        assert_eq!(code, 200, "{body}");
        let mut measured = true;
        for rig in &rigs {
            let found = node(&base, rig.node_id()).await;
            measured &= !found["hardware"]["measured_tokens_per_second"].is_null();
        }
        measured
    })
    .await;
    for (rig, verdict) in rigs.iter().zip(["plausible", "plausible", "implausible"]) {
        let found = node(&base, rig.node_id()).await;
        let hardware = &found["hardware"];
        assert_eq!(hardware["verdict"], verdict, "{found}");
        assert!(
            hardware["reported_bandwidth_gbps"].as_f64().unwrap() > 900.0,
            "{found}"
        );
    }
    let claim = node(&base, rigs[2].node_id()).await;
    assert!(
        claim["hardware"]["detail"]
            .as_str()
            .unwrap()
            .contains("not what it reports"),
        "{claim}"
    );
    let listed = admin_get(&base, "/admin/nodes").await;
    let flagged: Vec<&Value> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["hardware"]["verdict"] == "implausible")
        .collect();
    assert_eq!(flagged.len(), 1, "{listed}");
    assert_eq!(flagged[0]["id"], rigs[2].node_id());
}
