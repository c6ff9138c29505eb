//! Receipts both sides can check: an honest rig's answers (streamed or not, through a
//! forwarding replica too) carry receipts the gateway verifies and keeps in the rig's
//! statement, which the rig checks against its own key; forged or missing receipts are refused
//! and count as failed checks; a rig without a key serves as before and can register one
//! later; the statement is the rig's own, behind its node credential.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::support::*;
use garage_node_runner::agent::{Agent, AgentOptions};
use garage_node_runner::receipts::Receipts;
use serde_json::{Value, json};

/// A rig serving `model` only, signing as `receipts` says, its identity in `state_file` when
/// given.
async fn rig(base: &str, model: &str, receipts: Receipts, state_file: Option<&Path>) -> Agent {
    let token = enrollment_token(base, 1).await;
    rig_with(
        AgentOptions {
            state_file: state_file.map(Path::to_owned),
            ..rig_options(base, model, &token)
        },
        model,
        receipts,
    )
    .await
}

async fn rig_with(options: AgentOptions, model: &str, receipts: Receipts) -> Agent {
    let engines = garage_node_runner::engines::EngineSet::start(vec![
        garage_node_runner::cli::simulated_engine("sim", &[model.to_owned()], 0, 0.0),
    ])
    .await;
    Agent::start_with(options, engines, receipts)
        .await
        .expect("rig joins")
}

fn rig_config() -> garage_gateway::Config {
    let mut cfg = config(vec![]);
    cfg.nodes.heartbeat_interval_secs = 1;
    cfg.nodes.missed_heartbeats = 2;
    cfg
}

fn ask(model: &str, stream: bool) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 6,
        "stream": stream,
    })
}

/// Posts a chat request; returns the status, the request id and the body.
async fn post(base: &str, key: &str, body: &Value) -> (u16, String, String) {
    let response = client()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .expect("gateway answers");
    let status = response.status().as_u16();
    assert!(
        !response.headers().contains_key("garage-receipt"),
        "a rig's receipt is not the client's"
    );
    let id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    (status, id, response.text().await.unwrap_or_default())
}

/// Every request shape a rig serves: whole, streamed with the usage chunk the gateway hides
/// from the client, and streamed with the usage chunk the client asked for.
fn shapes(model: &str) -> Vec<Value> {
    let mut with_usage = ask(model, true);
    with_usage["stream_options"] = json!({"include_usage": true});
    vec![ask(model, false), ask(model, true), with_usage]
}

/// A GET with `bearer`; returns the status and the JSON body.
async fn get_with(base: &str, path: &str, bearer: &str) -> (u16, Value) {
    let response = client()
        .get(format!("{base}{path}"))
        .bearer_auth(bearer)
        .send()
        .await
        .expect("gateway answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The rig's credential, from its state file.
fn credential(state_file: &Path) -> String {
    let identity: Value = serde_json::from_slice(&std::fs::read(state_file).unwrap()).unwrap();
    identity["credential"].as_str().unwrap().to_owned()
}

/// The whole statement of the rig with `credential`, page by page, once it lists `n`
/// requests.
async fn statement(base: &str, credential: &str, n: usize) -> Vec<Value> {
    let path = format!("/node/v1/statement?limit={}", n.max(1));
    wait_until(
        Duration::from_secs(10),
        &format!("{n} statement entries"),
        || async {
            get_with(base, &path, credential).await.1["data"]
                .as_array()
                .map_or(0, Vec::len)
                >= n
        },
    )
    .await;
    get_with(base, &path, credential).await.1["data"]
        .as_array()
        .unwrap()
        .clone()
}

async fn trust(base: &str, node: &str) -> Value {
    admin_get(base, &format!("/admin/nodes/{node}")).await["trust"].clone()
}

async fn honest_rigs_answers_are_verified_and_kept(store: Option<&RedisServer>) {
    let mut cfg = rig_config();
    if let Some(redis) = store {
        cfg.store = redis.url();
        cfg.auth.key_secret = Some("receipts-secret".into());
    }
    let gw = gateway(cfg).await;
    let base = gw.url();
    let dir = tempfile::tempdir().unwrap();
    let state_file = dir.path().join("state.json");
    let rig = rig(&base, MODEL, Receipts::Signed, Some(&state_file)).await;
    let identity: Value = serde_json::from_slice(&std::fs::read(&state_file).unwrap()).unwrap();
    assert!(identity["receipt_key"].is_string(), "{identity}");
    let (_, key) = create_key(&base, json!({"name": "app"})).await;
    wait_until(Duration::from_secs(20), "the rig in routing", || async {
        routable_rigs(&base).await == 1
    })
    .await;

    let mut ids = Vec::new();
    for _ in 0..2 {
        for body in shapes(MODEL) {
            let (status, id, text) = post(&base, &key, &body).await;
            assert_eq!(status, 200, "{text}");
            ids.push(id);
        }
    }
    let credential = credential(&state_file);
    let entries = statement(&base, &credential, ids.len()).await;
    let listed: Vec<&str> = entries
        .iter()
        .map(|e| e["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ids, "every request, oldest first");
    for entry in &entries {
        assert_eq!(entry["receipt_check"], "verified", "{entry}");
        assert!(entry["receipt"].is_string(), "{entry}");
        assert_eq!(entry["model"], MODEL);
        assert!(entry["completion_tokens"].as_u64().unwrap() > 0, "{entry}");
        assert_eq!(
            entry["reported_completion_tokens"], entry["completion_tokens"],
            "{entry}"
        );
    }

    // Page by page: `after` the last id of a page.
    let (status, first) = get_with(&base, "/node/v1/statement?limit=4", &credential).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["has_more"], true);
    assert_eq!(first["data"].as_array().unwrap().len(), 4);
    let after = first["next_after"].as_str().unwrap();
    assert_eq!(after, ids[3]);
    let (_, rest) = get_with(
        &base,
        &format!("/node/v1/statement?after={after}&limit=4"),
        &credential,
    )
    .await;
    assert_eq!(rest["has_more"], false, "{rest}");
    let rest: Vec<&str> = rest["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(rest, ids[4..]);

    // The rig checks the statement against its own key: nothing amiss.
    let report = rig.check_statement().await.expect("statement");
    assert_eq!(report.entries, ids.len() as u64, "{report}");
    assert_eq!(report.receipts_verified, ids.len() as u64, "{report}");
    assert!(report.mismatches.is_empty(), "{report}");
    assert_eq!(report.billed, report.signed, "{report}");

    let trust = trust(&base, rig.node_id()).await;
    assert_eq!(trust["checks_failed"], 0, "{trust}");
    assert_metrics_include(
        &base,
        &[format!(
            "garage_receipts_total{{outcome=\"verified\"}} {}",
            ids.len()
        )],
    )
    .await;
    rig.shutdown().await;
}

#[tokio::test]
async fn an_honest_rigs_answers_carry_receipts_the_gateway_verifies_and_keeps() {
    honest_rigs_answers_are_verified_and_kept(None).await;
}

#[tokio::test]
async fn an_honest_rigs_receipts_are_kept_on_redis_too() {
    let redis = RedisServer::start();
    honest_rigs_answers_are_verified_and_kept(Some(&redis)).await;
}

#[tokio::test]
async fn forged_and_missing_receipts_are_refused_and_count_against_the_rig() {
    let gw = gateway(rig_config()).await;
    let base = gw.url();
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (Receipts::WrongKey, "wrong-key", "refused", "signature"),
        (
            Receipts::WrongHash,
            "wrong-hash",
            "refused",
            "hash is of other bytes",
        ),
        (
            Receipts::WrongRequestId,
            "wrong-id",
            "refused",
            "for request",
        ),
        (
            Receipts::Withheld,
            "withheld",
            "missing",
            "without a receipt",
        ),
    ];
    let mut rigs = Vec::new();
    for (mode, model, _, _) in &cases {
        let state_file = dir.path().join(format!("{model}.json"));
        rigs.push((
            rig(&base, model, *mode, Some(&state_file)).await,
            state_file,
        ));
    }
    let (_, key) = create_key(&base, json!({"name": "app"})).await;
    wait_until(Duration::from_secs(20), "every rig in routing", || async {
        routable_rigs(&base).await == cases.len()
    })
    .await;

    for ((_, model, check, why), (rig, state_file)) in cases.iter().zip(&rigs) {
        // The client is served all the same: the receipt is checked after the answer.
        let mut ids = Vec::new();
        for stream in [false, true] {
            let (status, id, text) = post(&base, &key, &ask(model, stream)).await;
            assert_eq!(status, 200, "{model}: {text}");
            ids.push(id);
        }
        let entries = statement(&base, &credential(state_file), 2).await;
        for (entry, id) in entries.iter().zip(&ids) {
            assert_eq!(entry["request_id"], *id);
            assert_eq!(entry["receipt_check"], *check, "{model}: {entry}");
            let detail = entry["detail"].as_str().unwrap_or_default();
            assert!(detail.contains(why), "{model}: {detail}");
        }
        wait_until(Duration::from_secs(10), "the failed checks", || async {
            trust(&base, rig.node_id()).await["checks_failed"] == 2
        })
        .await;
        let trust = trust(&base, rig.node_id()).await;
        assert_eq!(trust["last_check"], "receipt", "{model}: {trust}");
        assert_eq!(trust["status"], "suspect", "{model}: {trust}");
        assert!(
            trust["last_discrepancy"].as_str().unwrap().contains(why),
            "{model}: {trust}"
        );
    }
    // The rig's own check finds the receipts it signed with another key are not its own.
    let report = rigs[0].0.check_statement().await.expect("statement");
    assert_eq!(report.mismatches.len(), 2, "{report}");

    // A third forged receipt in a row quarantines the rig: out of routing.
    let (status, _, text) = post(&base, &key, &ask("wrong-hash", false)).await;
    assert_eq!(status, 200, "{text}");
    wait_until(
        Duration::from_secs(10),
        "the forger quarantined",
        || async { trust(&base, rigs[1].0.node_id()).await["status"] == "quarantined" },
    )
    .await;
    assert_metrics_include(
        &base,
        &[
            "garage_receipts_total{outcome=\"refused\"} 7".to_owned(),
            "garage_receipts_total{outcome=\"missing\"} 2".to_owned(),
            "garage_rig_checks_total{kind=\"receipt\",outcome=\"failed\"} 9".to_owned(),
        ],
    )
    .await;
}

#[tokio::test]
async fn a_rig_without_a_key_serves_and_can_register_one_later() {
    let gw = gateway(rig_config()).await;
    let base = gw.url();
    let dir = tempfile::tempdir().unwrap();
    let state_file = dir.path().join("state.json");
    // A node-runner from before receipts: enrolled without a key.
    let old = rig(&base, MODEL, Receipts::Unsigned, Some(&state_file)).await;
    let identity: Value = serde_json::from_slice(&std::fs::read(&state_file).unwrap()).unwrap();
    assert!(identity.get("receipt_key").is_none(), "{identity}");
    let (_, key) = create_key(&base, json!({"name": "app"})).await;
    wait_until(Duration::from_secs(20), "the rig in routing", || async {
        routable_rigs(&base).await == 1
    })
    .await;
    for stream in [false, true] {
        let (status, _, text) = post(&base, &key, &ask(MODEL, stream)).await;
        assert_eq!(status, 200, "{text}");
    }
    let credential = credential(&state_file);
    for entry in statement(&base, &credential, 2).await {
        assert_eq!(entry["receipt_check"], "no_key", "{entry}");
        assert!(entry["receipt"].is_null(), "{entry}");
    }
    assert_eq!(trust(&base, old.node_id()).await["checks_failed"], 0);
    let node = old.node_id().to_owned();
    old.shutdown().await;

    // The same rig, restarted by this node-runner: it makes a key and registers it with its
    // credential; its answers carry receipts from then on.
    let options = AgentOptions {
        enrollment_token: None,
        state_file: Some(state_file.clone()),
        ..rig_options(&base, MODEL, "")
    };
    let new = rig_with(options, MODEL, Receipts::Signed).await;
    assert_eq!(new.node_id(), node, "the same identity");
    let identity: Value = serde_json::from_slice(&std::fs::read(&state_file).unwrap()).unwrap();
    let seed = identity["receipt_key"].as_str().unwrap().to_owned();
    wait_until(
        Duration::from_secs(20),
        "the rig back in routing",
        || async { routable_rigs(&base).await == 1 },
    )
    .await;
    let (status, id, text) = post(&base, &key, &ask(MODEL, true)).await;
    assert_eq!(status, 200, "{text}");
    let entries = statement(&base, &credential, 3).await;
    assert_eq!(entries[2]["request_id"], id);
    assert_eq!(entries[2]["receipt_check"], "verified", "{}", entries[2]);

    // The key cannot be swapped for another with the credential; the same key again is fine.
    let public = garage_node_protocol::receipt::SigningKey::from_seed(&seed)
        .unwrap()
        .public_key()
        .to_base64();
    let other = garage_node_protocol::receipt::SigningKey::generate()
        .unwrap()
        .0
        .public_key()
        .to_base64();
    for (body, expected) in [
        (json!({"public_key": public}), 200),
        (json!({"public_key": other}), 409),
        (json!({"public_key": "not a key"}), 400),
    ] {
        let response = client()
            .post(format!("{base}/node/v1/receipt-key"))
            .bearer_auth(&credential)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), expected, "{body}");
    }
    // Enrolling with something that is not a key is refused before the token is spent.
    let token = enrollment_token(&base, 1).await;
    let response = client()
        .post(format!("{base}/node/v1/enroll"))
        .json(&json!({"token": token, "name": "x", "public_key": "AAAA"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let error = error_of(&response.text().await.unwrap());
    assert_eq!(error["param"], "public_key", "{error}");
    new.shutdown().await;
}

#[tokio::test]
async fn the_statement_is_the_rigs_own_behind_its_node_credential() {
    let gw = gateway(rig_config()).await;
    let base = gw.url();
    let dir = tempfile::tempdir().unwrap();
    let (a_file, b_file) = (dir.path().join("a.json"), dir.path().join("b.json"));
    let a = rig(&base, "model-a", Receipts::Signed, Some(&a_file)).await;
    let _b = rig(&base, "model-b", Receipts::Signed, Some(&b_file)).await;
    let (_, key) = create_key(&base, json!({"name": "app"})).await;
    wait_until(Duration::from_secs(20), "both rigs in routing", || async {
        routable_rigs(&base).await == 2
    })
    .await;
    let (_, a_id, _) = post(&base, &key, &ask("model-a", false)).await;
    let (_, b_id, _) = post(&base, &key, &ask("model-b", false)).await;
    let a_entries = statement(&base, &credential(&a_file), 1).await;
    let b_entries = statement(&base, &credential(&b_file), 1).await;
    assert_eq!(a_entries.len(), 1);
    assert_eq!(a_entries[0]["request_id"], a_id);
    assert_eq!(b_entries.len(), 1);
    assert_eq!(b_entries[0]["request_id"], b_id);

    // Not with an API key, the admin token or nothing at all.
    for bearer in [key.as_str(), ADMIN, ""] {
        let (status, body) = get_with(&base, "/node/v1/statement", bearer).await;
        assert_eq!(status, 401, "{body}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    }
    // The admin reads any rig's, with the admin token only.
    let admin_path = format!("/admin/nodes/{}/statement", a.node_id());
    let (status, admin_view) = get_with(&base, &admin_path, ADMIN).await;
    assert_eq!(status, 200, "{admin_view}");
    assert_eq!(admin_view["data"][0]["request_id"], a_id);
    let (status, _) = get_with(&base, &admin_path, &credential(&a_file)).await;
    assert_eq!(status, 401);
    let (status, _) = get_with(&base, "/admin/nodes/node_nobody/statement", ADMIN).await;
    assert_eq!(status, 404);
    // A cursor that is no request id, a limit that is no number.
    for query in ["after=nonsense", "limit=many"] {
        let (status, body) = get_with(
            &base,
            &format!("/node/v1/statement?{query}"),
            &credential(&a_file),
        )
        .await;
        assert_eq!(status, 400, "{query}: {body}");
    }
}

/// A replica on `redis` that forwards to the others' rigs.
fn replica_config(redis: &RedisServer) -> garage_gateway::Config {
    let port = free_port();
    let mut cfg = rig_config();
    cfg.listen = SocketAddr::from(([127, 0, 0, 1], port));
    cfg.store = redis.url();
    cfg.auth.key_secret = Some("receipts-replicas".into());
    cfg.cluster.advertise_url = Some(format!("http://127.0.0.1:{port}"));
    cfg.cluster.secret = Some("a-cluster-secret-for-the-receipt-tests".into());
    cfg
}

#[tokio::test]
async fn receipts_pass_unchanged_through_a_forwarding_replica() {
    let redis = RedisServer::start();
    let holder = gateway(replica_config(&redis)).await;
    let forwarder = gateway(replica_config(&redis)).await;
    let dir = tempfile::tempdir().unwrap();
    let state_file = dir.path().join("state.json");
    let _rig = rig(&holder.url(), MODEL, Receipts::Signed, Some(&state_file)).await;
    let (_, key) = create_key(&holder.url(), json!({"name": "app"})).await;
    let base = forwarder.url();
    wait_until(
        Duration::from_secs(20),
        "the rig on the other replica",
        || async { model_ids(&base, &key).await.iter().any(|m| m == MODEL) },
    )
    .await;
    let mut ids = Vec::new();
    for body in shapes(MODEL) {
        let (status, id, text) = post(&base, &key, &body).await;
        assert_eq!(status, 200, "{text}");
        ids.push(id);
    }
    // Checked by the replica the client asked, kept where every replica reads it.
    for replica in [&base, &holder.url()] {
        let entries = statement(replica, &credential(&state_file), ids.len()).await;
        for (entry, id) in entries.iter().zip(&ids) {
            assert_eq!(entry["request_id"], *id);
            assert_eq!(entry["receipt_check"], "verified", "{entry}");
        }
    }
}

/// A batch input file: a chat line per name asking `model`, then one its engine refuses (no
/// messages).
fn batch_input(model: &str, names: &[&str]) -> String {
    let mut content = String::new();
    for name in names {
        let line = json!({
            "custom_id": name,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": model,
                "messages": [{"role": "user", "content": format!("say something about {name}")}],
                "max_tokens": 4,
            },
        });
        content.push_str(&format!("{line}\n"));
    }
    let refused = json!({"custom_id": "no-messages", "body": {"model": model}});
    content.push_str(&format!("{refused}\n"));
    content
}

/// Uploads `content` as a batch input file, runs it to its end on the rigs; returns the batch.
async fn run_batch(base: &str, key: &str, content: String) -> Value {
    let form = reqwest::multipart::Form::new()
        .text("purpose", "batch")
        .part(
            "file",
            reqwest::multipart::Part::text(content).file_name("requests.jsonl"),
        );
    let response = client()
        .post(format!("{base}/v1/files"))
        .bearer_auth(key)
        .multipart(form)
        .send()
        .await
        .expect("gateway answers");
    let file: Value = response.json().await.unwrap();
    let file_id = file["id"].as_str().expect("a file id");
    let response = client()
        .post(format!("{base}/v1/batches"))
        .bearer_auth(key)
        .json(&json!({
            "input_file_id": file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        }))
        .send()
        .await
        .expect("gateway answers");
    let created: Value = response.json().await.unwrap();
    let id = created["id"].as_str().expect("a batch id").to_owned();
    let path = format!("/v1/batches/{id}");
    wait_until(
        Duration::from_secs(60),
        &format!("batch {id} to end"),
        || async { get_with(base, &path, key).await.1["status"] == "completed" },
    )
    .await;
    get_with(base, &path, key).await.1
}

/// A rig that takes batch work without waiting long for it.
async fn batch_rig(base: &str, model: &str, receipts: Receipts, state_file: &Path) -> Agent {
    let token = enrollment_token(base, 1).await;
    let options = AgentOptions {
        state_file: Some(state_file.to_owned()),
        batch: garage_node_runner::batch::BatchOptions {
            poll_wait: Duration::from_secs(2),
            ..Default::default()
        },
        ..rig_options(base, model, &token)
    };
    rig_with(options, model, receipts).await
}

#[tokio::test]
async fn an_honest_rigs_batch_lines_carry_receipts_the_gateway_verifies() {
    let gw = gateway(rig_config()).await;
    let base = gw.url();
    let dir = tempfile::tempdir().unwrap();
    let state_file = dir.path().join("state.json");
    let rig = batch_rig(&base, MODEL, Receipts::Signed, &state_file).await;
    let (_, key) = create_key(&base, json!({"name": "app"})).await;
    wait_until(Duration::from_secs(20), "the rig in routing", || async {
        routable_rigs(&base).await == 1
    })
    .await;

    // A tunnel answer first, then a batch: three lines answered, one refused by the engine.
    let (status, tunnel_id, text) = post(&base, &key, &ask(MODEL, false)).await;
    assert_eq!(status, 200, "{text}");
    let batch = run_batch(&base, &key, batch_input(MODEL, &["a", "b", "c"])).await;
    assert_eq!(
        batch["request_counts"],
        json!({"total": 4, "completed": 3, "failed": 1}),
        "{batch}"
    );
    let batch_id = batch["id"].as_str().unwrap();

    let credential = credential(&state_file);
    let entries = statement(&base, &credential, 5).await;
    let listed: Vec<&str> = entries
        .iter()
        .map(|e| e["request_id"].as_str().unwrap())
        .collect();
    let mut expected = vec![tunnel_id.clone()];
    expected.extend((1..=4).map(|line| format!("{batch_id}:{line}")));
    assert_eq!(listed, expected, "the tunnel's request, then the lines");
    for entry in &entries {
        assert_eq!(entry["receipt_check"], "verified", "{entry}");
        assert!(entry["receipt"].is_string(), "{entry}");
        assert_eq!(entry["model"], MODEL, "{entry}");
    }
    for entry in &entries[1..4] {
        assert!(entry["completion_tokens"].as_u64().unwrap() > 0, "{entry}");
        assert_eq!(
            entry["reported_completion_tokens"], entry["completion_tokens"],
            "{entry}"
        );
    }
    // The line the engine refused: its error answer signed and verified, nothing billed.
    assert_eq!(entries[4]["completion_tokens"], 0, "{}", entries[4]);

    // Page by page, across the tunnel's id and the lines' (which are not UUIDs).
    let mut paged = Vec::new();
    let mut path = "/node/v1/statement?limit=2".to_owned();
    loop {
        let (status, page) = get_with(&base, &path, &credential).await;
        assert_eq!(status, 200, "{page}");
        for entry in page["data"].as_array().unwrap() {
            paged.push(entry["request_id"].as_str().unwrap().to_owned());
        }
        if page["has_more"] != true {
            break;
        }
        let after = page["next_after"].as_str().unwrap();
        path = format!("/node/v1/statement?limit=2&after={after}");
    }
    assert_eq!(paged, expected);

    // The admin's view of it, and the rig's own check against its key.
    let (status, admin_view) = get_with(
        &base,
        &format!("/admin/nodes/{}/statement", rig.node_id()),
        ADMIN,
    )
    .await;
    assert_eq!(status, 200, "{admin_view}");
    assert_eq!(admin_view["data"].as_array().unwrap().len(), 5);
    let report = rig.check_statement().await.expect("statement");
    assert_eq!(report.receipts_verified, 5, "{report}");
    assert!(report.mismatches.is_empty(), "{report}");
    assert_eq!(report.billed, report.signed, "{report}");
    assert_eq!(trust(&base, rig.node_id()).await["checks_failed"], 0);
    assert_metrics_include(
        &base,
        &["garage_receipts_total{outcome=\"verified\"} 5".to_owned()],
    )
    .await;
    rig.shutdown().await;
}

#[tokio::test]
async fn forged_and_missing_batch_receipts_are_refused_and_count_against_the_rig() {
    let gw = gateway(rig_config()).await;
    let base = gw.url();
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            Receipts::WrongHash,
            "wrong-hash",
            "refused",
            "hash is of other bytes",
        ),
        (
            Receipts::WrongRequestId,
            "wrong-id",
            "refused",
            "for request",
        ),
        (Receipts::WrongKey, "wrong-key", "refused", "signature"),
        (
            Receipts::Withheld,
            "withheld",
            "missing",
            "without a receipt",
        ),
        // An older node-runner, mid-upgrade: its unsigned batch lines are not held against it.
        (
            Receipts::TunnelOnly,
            "tunnel-only",
            "unchecked",
            "does not sign batch lines",
        ),
    ];
    let mut rigs = Vec::new();
    for (mode, model, _, _) in &cases {
        let state_file = dir.path().join(format!("{model}.json"));
        rigs.push((
            batch_rig(&base, model, *mode, &state_file).await,
            state_file,
        ));
    }
    let (_, key) = create_key(&base, json!({"name": "app"})).await;
    wait_until(Duration::from_secs(20), "every rig in routing", || async {
        routable_rigs(&base).await == cases.len()
    })
    .await;

    for ((_, model, check, why), (rig, state_file)) in cases.iter().zip(&rigs) {
        // The lines are answered all the same: the receipts are checked after.
        let batch = run_batch(&base, &key, batch_input(model, &["a"])).await;
        assert_eq!(
            batch["request_counts"],
            json!({"total": 2, "completed": 1, "failed": 1}),
            "{model}: {batch}"
        );
        let batch_id = batch["id"].as_str().unwrap();
        let entries = statement(&base, &credential(state_file), 2).await;
        for (line, entry) in entries.iter().enumerate() {
            assert_eq!(entry["request_id"], format!("{batch_id}:{}", line + 1));
            assert_eq!(entry["receipt_check"], *check, "{model}: {entry}");
            let detail = entry["detail"].as_str().unwrap_or_default();
            assert!(detail.contains(why), "{model}: {detail}");
        }
        if *check == "unchecked" {
            assert_eq!(
                trust(&base, rig.node_id()).await["checks_failed"],
                0,
                "{model}"
            );
            continue;
        }
        wait_until(Duration::from_secs(10), "the failed checks", || async {
            trust(&base, rig.node_id()).await["checks_failed"] == 2
        })
        .await;
        let trust = trust(&base, rig.node_id()).await;
        assert_eq!(trust["last_check"], "receipt", "{model}: {trust}");
        assert!(
            trust["last_discrepancy"].as_str().unwrap().contains(why),
            "{model}: {trust}"
        );
    }
    assert_metrics_include(
        &base,
        &[
            "garage_receipts_total{outcome=\"refused\"} 6".to_owned(),
            "garage_receipts_total{outcome=\"missing\"} 2".to_owned(),
            "garage_receipts_total{outcome=\"unchecked\"} 2".to_owned(),
            "garage_rig_checks_total{kind=\"receipt\",outcome=\"failed\"} 8".to_owned(),
        ],
    )
    .await;
}
