//! The Batch API end to end: files, batches, rigs pulling lines through the real node-runner
//! agent, cancellation, a rig killed mid-batch, Redis replicas sharing one queue, and chat never
//! queueing on the rigs' engines while a 10,000-line batch runs.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::support::*;
use garage_node_runner::agent::Agent;
use garage_node_runner::batch::BatchOptions;
use garage_node_runner::config::Driver;
use serde_json::{Value, json};

fn chat_line(id: &str, max_tokens: u32) -> String {
    json!({
        "custom_id": id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": MODEL,
            "messages": [{"role": "user", "content": format!("say something about {id}")}],
            "max_tokens": max_tokens,
        },
    })
    .to_string()
}

pub(crate) fn lines(n: usize, max_tokens: u32) -> String {
    (0..n)
        .map(|i| chat_line(&format!("req-{i}"), max_tokens) + "\n")
        .collect()
}

async fn upload(base: &str, key: &str, purpose: &str, content: String) -> (u16, Value) {
    let form = reqwest::multipart::Form::new()
        .text("purpose", purpose.to_owned())
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
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

pub(crate) async fn upload_ok(base: &str, key: &str, content: String) -> String {
    let (status, file) = upload(base, key, "batch", content).await;
    assert_eq!(status, 200, "{file}");
    file["id"].as_str().expect("file id").to_owned()
}

async fn call(
    method: reqwest::Method,
    base: &str,
    key: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = client()
        .request(method, format!("{base}{path}"))
        .bearer_auth(key);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("gateway answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

pub(crate) async fn create_batch(base: &str, key: &str, file_id: &str) -> (u16, Value) {
    let body = json!({
        "input_file_id": file_id,
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
        "metadata": {"job": "test"},
    });
    call(reqwest::Method::POST, base, key, "/v1/batches", Some(body)).await
}

async fn batch(base: &str, key: &str, id: &str) -> Value {
    let (status, batch) = call(
        reqwest::Method::GET,
        base,
        key,
        &format!("/v1/batches/{id}"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{batch}");
    batch
}

fn done(batch: &Value) -> u64 {
    batch["request_counts"]["completed"].as_u64().unwrap_or(0)
        + batch["request_counts"]["failed"].as_u64().unwrap_or(0)
}

fn terminal(batch: &Value) -> bool {
    ["completed", "failed", "expired", "cancelled"]
        .contains(&batch["status"].as_str().unwrap_or(""))
}

/// Waits for the batch to reach a terminal status; returns it.
pub(crate) async fn wait_batch(base: &str, key: &str, id: &str, bound: Duration) -> Value {
    wait_until(bound, &format!("batch {id} to finish"), || async {
        terminal(&batch(base, key, id).await)
    })
    .await;
    batch(base, key, id).await
}

async fn file_lines(base: &str, key: &str, id: &str) -> Vec<Value> {
    let response = client()
        .get(format!("{base}/v1/files/{id}/content"))
        .bearer_auth(key)
        .send()
        .await
        .expect("gateway answers");
    assert_eq!(response.status(), 200);
    response
        .text()
        .await
        .expect("content")
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect()
}

/// `custom_id` → how many times it appears in the lines.
fn custom_id_counts(lines: &[Value]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for line in lines {
        *counts
            .entry(line["custom_id"].as_str().expect("custom_id").to_owned())
            .or_default() += 1;
    }
    counts
}

/// In-process rigs (real node-runner agents) with simulated engines.
async fn rigs(
    base: &str,
    n: usize,
    ttft_ms: u64,
    tokens_per_sec: f64,
    max_num_seqs: usize,
    batch: BatchOptions,
) -> Vec<Agent> {
    let token = enrollment_token(base, n as u32).await;
    let mut agents = Vec::new();
    for i in 0..n {
        let mut engine = garage_node_runner::cli::simulated_engine(
            "sim",
            &[MODEL.to_owned()],
            ttft_ms,
            tokens_per_sec,
        );
        if let Driver::Simulated(sim) = &mut engine.driver {
            sim.max_num_seqs = max_num_seqs;
        }
        let engines = garage_node_runner::engines::EngineSet::start(vec![engine]).await;
        let mut options = rig_options(base, &format!("batch-rig-{i}"), &token);
        options.batch = batch.clone();
        agents.push(Agent::start(options, engines).await.expect("rig joins"));
    }
    wait_until(Duration::from_secs(20), "rigs routable", || async {
        routable_rigs(base).await == n
    })
    .await;
    agents
}

fn quick_batch() -> BatchOptions {
    BatchOptions {
        poll_wait: Duration::from_secs(2),
        ..BatchOptions::default()
    }
}

#[tokio::test]
async fn a_batch_runs_end_to_end_and_belongs_to_its_key() {
    let gw = gateway(config(vec![])).await;
    let base = gw.url();
    let _rigs = rigs(&base, 2, 0, 0.0, 64, quick_batch()).await;
    let (owner_id, owner) = create_key(&base, json!({"name": "owner"})).await;
    let (_, other) = create_key(&base, json!({"name": "other"})).await;

    // 40 good lines and one the engine refuses (no messages): 41 requests.
    let mut content = lines(40, 4);
    content.push_str(&json!({"custom_id": "no-messages", "body": {"model": MODEL}}).to_string());
    content.push('\n');
    let (status, file) = upload(&base, &owner, "batch", content.clone()).await;
    assert_eq!(status, 200, "{file}");
    assert_eq!(file["object"], "file");
    assert_eq!(file["purpose"], "batch");
    assert_eq!(file["bytes"], content.len());
    let file_id = file["id"].as_str().unwrap().to_owned();

    // Someone else's file does not exist for another key.
    let (status, error) = call(
        reqwest::Method::GET,
        &base,
        &other,
        &format!("/v1/files/{file_id}"),
        None,
    )
    .await;
    assert_eq!(status, 404, "{error}");
    assert_eq!(create_batch(&base, &other, &file_id).await.0, 404);

    let (status, created) = create_batch(&base, &owner, &file_id).await;
    assert_eq!(status, 200, "{created}");
    assert_eq!(created["object"], "batch");
    assert_eq!(created["status"], "in_progress");
    assert_eq!(created["request_counts"]["total"], 41);
    assert_eq!(created["metadata"]["job"], "test");
    let id = created["id"].as_str().unwrap().to_owned();

    let finished = wait_batch(&base, &owner, &id, Duration::from_secs(60)).await;
    assert_eq!(finished["status"], "completed", "{finished}");
    assert_eq!(
        finished["request_counts"],
        json!({"total": 41, "completed": 40, "failed": 1})
    );
    assert!(finished["completed_at"].is_u64() && finished["finalizing_at"].is_u64());
    assert!(finished["usage"]["output_tokens"].as_u64().unwrap() >= 40);

    let metrics = metrics_text(&base).await;
    for line in [
        "garage_batch_answers_total{outcome=\"completed\"} 40",
        "garage_batch_answers_total{outcome=\"failed\"} 1",
        "garage_batches_finished_total{status=\"completed\"} 1",
    ] {
        assert!(
            metrics.contains(line),
            "{line} missing from /metrics:\n{metrics}"
        );
    }

    // Answers in input order, each under its custom_id, with the engine's body.
    let output = file_lines(&base, &owner, finished["output_file_id"].as_str().unwrap()).await;
    let ids: Vec<&str> = output
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    let expected: Vec<String> = (0..40).map(|i| format!("req-{i}")).collect();
    assert_eq!(ids, expected);
    for line in &output {
        assert_eq!(line["response"]["status_code"], 200);
        assert_eq!(line["response"]["body"]["object"], "chat.completion");
        assert!(line["error"].is_null());
        assert!(line["id"].as_str().unwrap().starts_with("batch_req_"));
    }
    let errors = file_lines(&base, &owner, finished["error_file_id"].as_str().unwrap()).await;
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0]["custom_id"], "no-messages");
    assert_eq!(errors[0]["response"]["status_code"], 400);
    assert!(errors[0]["response"]["body"]["error"]["message"].is_string());

    // Output files belong to the batch's key too.
    let output_id = finished["output_file_id"].as_str().unwrap();
    assert_eq!(
        call(
            reqwest::Method::GET,
            &base,
            &other,
            &format!("/v1/files/{output_id}/content"),
            None
        )
        .await
        .0,
        404
    );
    let (_, output_file) = call(
        reqwest::Method::GET,
        &base,
        &owner,
        &format!("/v1/files/{output_id}"),
        None,
    )
    .await;
    assert_eq!(output_file["purpose"], "batch_output");

    // Batch lines are metered as batch usage.
    wait_until(
        Duration::from_secs(10),
        "batch usage in the ledger",
        || async {
            let entry = admin_get(&base, &format!("/admin/usage/requests/{id}:1")).await;
            entry["event"]["batch"] == true
        },
    )
    .await;
    let entry = admin_get(&base, &format!("/admin/usage/requests/{id}:1")).await;
    assert_eq!(entry["event"]["key_id"], owner_id.as_str());
    assert!(
        entry["event"]["rig"].as_str().unwrap().starts_with("node_"),
        "{entry}"
    );

    // Batches belong to their key; listing pages newest first.
    assert_eq!(
        call(
            reqwest::Method::GET,
            &base,
            &other,
            &format!("/v1/batches/{id}"),
            None
        )
        .await
        .0,
        404
    );
    assert_eq!(
        call(
            reqwest::Method::POST,
            &base,
            &other,
            &format!("/v1/batches/{id}/cancel"),
            None
        )
        .await
        .0,
        404
    );
    let (_, listed) = call(reqwest::Method::GET, &base, &other, "/v1/batches", None).await;
    assert_eq!(listed["data"], json!([]));
    let second = create_batch(&base, &owner, &file_id).await.1["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_, page) = call(
        reqwest::Method::GET,
        &base,
        &owner,
        "/v1/batches?limit=1",
        None,
    )
    .await;
    assert_eq!(page["data"][0]["id"], second.as_str());
    assert_eq!(page["has_more"], true);
    let (_, page) = call(
        reqwest::Method::GET,
        &base,
        &owner,
        &format!("/v1/batches?limit=1&after={second}"),
        None,
    )
    .await;
    assert_eq!(page["data"][0]["id"], id.as_str());
    assert_eq!(page["has_more"], false);
    wait_batch(&base, &owner, &second, Duration::from_secs(60)).await;

    // A finished batch cannot be cancelled; files can be deleted.
    let (status, error) = call(
        reqwest::Method::POST,
        &base,
        &owner,
        &format!("/v1/batches/{id}/cancel"),
        None,
    )
    .await;
    assert_eq!(status, 400);
    error_of(&error.to_string());
    let (status, deleted) = call(
        reqwest::Method::DELETE,
        &base,
        &owner,
        &format!("/v1/files/{file_id}"),
        None,
    )
    .await;
    assert_eq!((status, deleted["deleted"].clone()), (200, json!(true)));
    assert_eq!(
        call(
            reqwest::Method::GET,
            &base,
            &owner,
            &format!("/v1/files/{file_id}"),
            None
        )
        .await
        .0,
        404
    );
    // The admin sees every key's batches, with their owners.
    let all = admin_get(&base, "/admin/batches").await;
    let batches = all["data"].as_array().unwrap();
    assert!(
        batches
            .iter()
            .any(|b| b["owner"] == owner_id.as_str() && b["request_counts"]["total"] == 41),
        "{all}"
    );
}

#[tokio::test]
async fn bad_input_is_refused_clearly_and_bad_lines_are_reported_per_line() {
    let mut cfg = config(vec![]);
    cfg.batch.max_file_bytes = 64 * 1024;
    let gw = gateway(cfg).await;
    let base = gw.url();
    let _rigs = rigs(&base, 1, 0, 0.0, 64, quick_batch()).await;
    let (_, key) = create_key(&base, json!({"name": "k"})).await;

    // Uploads: purpose, size, shape.
    let (status, error) = upload(&base, &key, "fine-tune", lines(1, 1)).await;
    assert_eq!(status, 400);
    assert_eq!(error["error"]["param"], "purpose");
    let (status, error) = upload(&base, &key, "batch", lines(1000, 1)).await;
    assert_eq!(status, 413, "{error}");
    error_of(&error.to_string());
    let (status, error) = call(
        reqwest::Method::POST,
        &base,
        &key,
        "/v1/files",
        Some(json!({"purpose": "batch"})),
    )
    .await;
    assert_eq!(status, 400);
    error_of(&error.to_string());
    let (status, _) = upload(&base, "sk-wrong", "batch", lines(1, 1)).await;
    assert_eq!(status, 401);

    // Batch parameters.
    let file_id = upload_ok(&base, &key, lines(2, 1)).await;
    for (body, param) in [
        (
            json!({"input_file_id": file_id, "endpoint": "/v1/images", "completion_window": "24h"}),
            "endpoint",
        ),
        (
            json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "1h"}),
            "completion_window",
        ),
    ] {
        let (status, error) = call(
            reqwest::Method::POST,
            &base,
            &key,
            "/v1/batches",
            Some(body),
        )
        .await;
        assert_eq!(status, 400, "{error}");
        assert_eq!(error["error"]["param"], param);
    }
    let (status, _) = call(
        reqwest::Method::POST,
        &base,
        &key,
        "/v1/batches",
        Some(json!({"endpoint": "/v1/chat/completions"})),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(create_batch(&base, &key, "file-nope").await.0, 404);

    // Every bad line is named, and the batch fails as a whole (as OpenAI's does).
    let content = [
        chat_line("a", 1),
        "{not json".into(),
        json!({"method": "POST", "url": "/v1/chat/completions", "body": {"model": MODEL}})
            .to_string(),
        chat_line("a", 1),
        json!({"custom_id": "b", "url": "/v1/embeddings", "body": {"model": MODEL}}).to_string(),
        json!({"custom_id": "c", "body": {"model": "no-such-model", "messages": []}}).to_string(),
    ]
    .join("\n");
    let file_id = upload_ok(&base, &key, content).await;
    let (status, failed) = create_batch(&base, &key, &file_id).await;
    assert_eq!(status, 200);
    assert_eq!(failed["status"], "failed");
    assert!(failed["failed_at"].is_u64());
    let errors: Vec<(u64, &str)> = failed["errors"]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["line"].as_u64().unwrap(), e["code"].as_str().unwrap()))
        .collect();
    assert_eq!(
        errors,
        [
            (2, "invalid_json_line"),
            (3, "missing_required_parameter"),
            (4, "duplicate_custom_id"),
            (5, "url_mismatch"),
            (6, "model_not_found"),
        ]
    );
    let id = failed["id"].as_str().unwrap();
    assert_eq!(batch(&base, &key, id).await["status"], "failed");

    // A key limited to other models cannot batch this one.
    let (_, limited) = create_key(
        &base,
        json!({"name": "limited", "allowed_models": ["other"]}),
    )
    .await;
    let file_id = upload_ok(&base, &limited, lines(1, 1)).await;
    let (_, refused) = create_batch(&base, &limited, &file_id).await;
    assert_eq!(refused["status"], "failed");
    assert_eq!(refused["errors"]["data"][0]["code"], "model_not_found");
}

#[tokio::test]
async fn cancelling_keeps_the_answers_and_drops_the_rest() {
    let gw = gateway(config(vec![])).await;
    let base = gw.url();
    // One slow rig, two lines at a time: each line takes about half a second.
    let options = BatchOptions {
        max_concurrency: 2,
        ..quick_batch()
    };
    let _rigs = rigs(&base, 1, 0, 20.0, 64, options).await;
    let (_, key) = create_key(&base, json!({"name": "k"})).await;
    let file_id = upload_ok(&base, &key, lines(30, 10)).await;
    let id = create_batch(&base, &key, &file_id).await.1["id"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_until(Duration::from_secs(30), "a few lines answered", || async {
        done(&batch(&base, &key, &id).await) >= 2
    })
    .await;

    let (status, cancelling) = call(
        reqwest::Method::POST,
        &base,
        &key,
        &format!("/v1/batches/{id}/cancel"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{cancelling}");
    assert!(["cancelling", "cancelled"].contains(&cancelling["status"].as_str().unwrap()));
    let cancelled = wait_batch(&base, &key, &id, Duration::from_secs(30)).await;
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    assert!(cancelled["cancelled_at"].is_u64() && cancelled["cancelling_at"].is_u64());
    let counts = &cancelled["request_counts"];
    let completed = counts["completed"].as_u64().unwrap();
    assert!((2..30).contains(&completed), "{cancelled}");
    assert_eq!(counts["failed"].as_u64().unwrap(), 30 - completed);

    // Every line is accounted for once: answered, or cancelled before it ran.
    let output = file_lines(&base, &key, cancelled["output_file_id"].as_str().unwrap()).await;
    let errors = file_lines(&base, &key, cancelled["error_file_id"].as_str().unwrap()).await;
    assert_eq!(output.len() as u64, completed);
    assert!(
        errors
            .iter()
            .all(|e| e["error"]["code"] == "batch_cancelled")
    );
    let mut all = output.clone();
    all.extend(errors);
    let counts = custom_id_counts(&all);
    assert_eq!(counts.len(), 30);
    assert!(counts.values().all(|n| *n == 1));
}

#[tokio::test]
async fn a_rig_killed_mid_batch_loses_no_line_and_answers_none_twice() {
    let mut cfg = config(vec![]);
    cfg.nodes.heartbeat_interval_secs = 1;
    // A dead rig's lines come back quickly.
    cfg.batch.lease_secs = 2;
    let gw = gateway(cfg).await;
    let base = gw.url();
    let token = enrollment_token(&base, 3).await;
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut processes: Vec<NodeRunner> = dirs
        .iter()
        .enumerate()
        .map(|(i, dir)| {
            let config = format!(
                r#"gateway_url = "{base}"
enrollment_token = "{token}"
name = "batch-pc-{i}"
state_file = "{state}"

[batch]
max_concurrency = 4
poll_wait_secs = 2

[[engines]]
name = "sim"
models = ["{MODEL}"]
port = 0
driver = "simulated"
tokens_per_sec = 200
"#,
                state = dir.path().join("state.json").display(),
            );
            NodeRunner::start(dir.path(), &config)
        })
        .collect();
    wait_until(Duration::from_secs(30), "three rigs routable", || async {
        routable_rigs(&base).await == 3
    })
    .await;

    let (_, key) = create_key(&base, json!({"name": "k"})).await;
    // 300 lines of 20 tokens: about 0.1 s each, 12 at a time.
    let file_id = upload_ok(&base, &key, lines(300, 20)).await;
    let id = create_batch(&base, &key, &file_id).await.1["id"]
        .as_str()
        .unwrap()
        .to_owned();
    wait_until(
        Duration::from_secs(60),
        "a fifth of the batch answered",
        || async { done(&batch(&base, &key, &id).await) >= 60 },
    )
    .await;
    // SIGKILL: no drain, no goodbye; its leased lines are simply never answered.
    let victim = processes.remove(0);
    victim.signal("KILL");
    let at_kill = done(&batch(&base, &key, &id).await);
    assert!(
        at_kill < 300,
        "the batch finished before the kill; make it longer"
    );

    let finished = wait_batch(&base, &key, &id, Duration::from_secs(120)).await;
    assert_eq!(finished["status"], "completed", "{finished}");
    assert_eq!(
        finished["request_counts"],
        json!({"total": 300, "completed": 300, "failed": 0})
    );
    let output = file_lines(&base, &key, finished["output_file_id"].as_str().unwrap()).await;
    assert_eq!(output.len(), 300);
    let counts = custom_id_counts(&output);
    assert_eq!(counts.len(), 300, "every line answered");
    assert!(counts.values().all(|n| *n == 1), "no line answered twice");
    assert!(finished["error_file_id"].is_null());
    drop(victim);
}

#[tokio::test]
async fn redis_replicas_share_one_queue() {
    let redis = RedisServer::start();
    let replica = || {
        let mut cfg = config(vec![]);
        cfg.store = redis.url();
        cfg.auth.key_secret = Some("shared-replica-secret".into());
        cfg
    };
    let front = gateway(replica()).await;
    let back = gateway(replica()).await;
    // The rigs hold their tunnels to `back`; the batch is made through `front`.
    let _rigs = rigs(&back.url(), 2, 0, 0.0, 64, quick_batch()).await;
    let (_, key) = create_key(&front.url(), json!({"name": "k"})).await;
    let file_id = upload_ok(&front.url(), &key, lines(50, 3)).await;
    let (status, created) = create_batch(&front.url(), &key, &file_id).await;
    assert_eq!(created["status"], "in_progress", "{status} {created}");
    let id = created["id"].as_str().unwrap().to_owned();
    let finished = wait_batch(&front.url(), &key, &id, Duration::from_secs(60)).await;
    assert_eq!(
        finished["request_counts"],
        json!({"total": 50, "completed": 50, "failed": 0})
    );
    // Either replica serves the same batch and files.
    let other_view = batch(&back.url(), &key, &id).await;
    assert_eq!(other_view["output_file_id"], finished["output_file_id"]);
    let output = file_lines(
        &back.url(),
        &key,
        finished["output_file_id"].as_str().unwrap(),
    )
    .await;
    assert_eq!(output.len(), 50);
}

async fn chat_latency(base: &str, key: &str) -> Duration {
    let body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "a quick question"}],
        "max_tokens": 10,
    });
    let started = Instant::now();
    let (status, text) = post_chat(base, key, &body).await;
    assert_eq!(status, 200, "{text}");
    started.elapsed()
}

fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort();
    samples[((samples.len() - 1) as f64 * p).round() as usize]
}

/// The most requests one engine held at once in any sample of its `/metrics`.
#[derive(Debug, Default, Clone, Copy)]
struct EnginePeaks {
    /// Requests queued for a sequence (`vllm:num_requests_waiting`).
    waiting: f64,
    /// Requests holding a sequence (`vllm:num_requests_running`).
    running: f64,
    samples: u32,
}

/// A gauge in a Prometheus page, summed over its label sets; `None` when the page lacks it.
fn gauge(metrics: &str, name: &str) -> Option<f64> {
    let values: Vec<f64> = metrics
        .lines()
        .filter_map(|line| line.strip_prefix(name)?.strip_prefix('{'))
        .filter_map(|rest| rest.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// Between two rounds of looks at the engines: short, so the watch reads each engine hundreds of
/// times over the batch; a rig that overfills its engine keeps a queue there for as long as it has
/// lines, and any look sees it. The gap leaves the machine's cores to the batch between rounds.
const ENGINE_SAMPLE_GAP: Duration = Duration::from_millis(20);

/// Reads every engine's queue and running requests until dropped, raising `peaks` (one per
/// engine, in the order of `engines`) as it goes.
async fn watch_engines(engines: &[String], peaks: &mut [EnginePeaks]) -> std::convert::Infallible {
    loop {
        for (engine, peak) in engines.iter().zip(peaks.iter_mut()) {
            let metrics = metrics_text(engine).await;
            let read = |name| {
                gauge(&metrics, name).unwrap_or_else(|| panic!("{engine} exports no {name}"))
            };
            peak.waiting = peak.waiting.max(read("vllm:num_requests_waiting"));
            peak.running = peak.running.max(read("vllm:num_requests_running"));
            peak.samples += 1;
        }
        tokio::time::sleep(ENGINE_SAMPLE_GAP).await;
    }
}

/// 10,000 lines through four rigs while chat keeps going through the same rigs. The rigs take
/// batch work only while their engines have room (4 batch lines at most on engines with 8
/// sequences), so chat requests never queue behind batch lines. Counted, not timed: each
/// engine's own gauges, read all through the batch, never show a request waiting for a
/// sequence, nor more running than the rig's batch lines and the one chat request in flight.
/// Chat latency idle and during the batch is printed, for information only.
#[tokio::test]
async fn ten_thousand_lines_complete_while_chat_never_queues_behind_them() {
    let gw = gateway(config(vec![])).await;
    let base = gw.url();
    let options = BatchOptions {
        max_concurrency: 4,
        ..quick_batch()
    };
    let rigs = rigs(&base, 4, 20, 500.0, 8, options.clone()).await;
    let engines: Vec<String> = rigs
        .iter()
        .map(|rig| {
            let port = rig.engines().port("sim").expect("engine port");
            format!("http://127.0.0.1:{port}")
        })
        .collect();
    let (_, key) = create_key(&base, json!({"name": "k"})).await;

    let mut idle = Vec::new();
    for _ in 0..40 {
        idle.push(chat_latency(&base, &key).await);
    }
    let file_id = upload_ok(&base, &key, lines(10_000, 5)).await;
    let mut peaks = vec![EnginePeaks::default(); engines.len()];
    let started = Instant::now();
    let (mut busy, progress_after_chat, finished) = tokio::select! {
        outcome = async {
            let id = create_batch(&base, &key, &file_id).await.1["id"]
                .as_str()
                .unwrap()
                .to_owned();
            wait_until(Duration::from_secs(30), "batch lines running", || async {
                done(&batch(&base, &key, &id).await) >= 200
            })
            .await;
            let mut busy = Vec::new();
            while busy.len() < 40 {
                busy.push(chat_latency(&base, &key).await);
            }
            let progress_after_chat = done(&batch(&base, &key, &id).await);
            let finished = wait_batch(&base, &key, &id, Duration::from_secs(600)).await;
            (busy, progress_after_chat, finished)
        } => outcome,
        never = watch_engines(&engines, &mut peaks) => match never {},
    };
    let elapsed = started.elapsed();
    assert_eq!(
        finished["request_counts"],
        json!({"total": 10000, "completed": 10000, "failed": 0})
    );

    let (idle_p50, idle_p95) = (percentile(&mut idle, 0.5), percentile(&mut idle, 0.95));
    let (busy_p50, busy_p95) = (percentile(&mut busy, 0.5), percentile(&mut busy, 0.95));
    eprintln!(
        "10,000-line batch in {elapsed:?} ({:.0} lines/s); chat p50/p95 idle {idle_p50:?}/{idle_p95:?}, during the batch {busy_p50:?}/{busy_p95:?} (batch at {progress_after_chat} lines when the chat probe ended); engine peaks {peaks:?}",
        10_000.0 / elapsed.as_secs_f64()
    );
    // The chat probes ran while the batch did (not after it).
    assert!(
        progress_after_chat < 10_000,
        "the batch ended before the chat probe did"
    );
    // The watch saw the batch at work on every engine: its zeros below are not those of an
    // engine nothing was sent to.
    assert!(
        peaks.iter().all(|peak| peak.running >= 1.0),
        "an engine was never seen running a request: {peaks:?}"
    );
    // The property: no request ever waited for a sequence, so no chat request queued behind
    // batch lines. Rigs that take batch work regardless of their engines' room (16 lines on
    // 8-sequence engines) keep half of them waiting.
    assert!(
        peaks.iter().all(|peak| peak.waiting == 0.0),
        "requests waited for a sequence during the batch (peaks per engine: {peaks:?}): the rigs \
         took more batch lines than their engines had room for"
    );
    // And why: each engine ran at most its rig's batch lines plus the chat request (the probe
    // sends one at a time).
    let most = (options.max_concurrency + 1) as f64;
    assert!(
        peaks.iter().all(|peak| peak.running <= most),
        "an engine ran more than {most} requests at once (peaks per engine: {peaks:?}): more \
         than {} batch lines per rig",
        options.max_concurrency
    );
}

/// Batch lines go through the same meter and reward plugins as chat, marked as batch: the
/// default reward plugin pays them as `batch-tokens` (when told to pay work it cannot verify:
/// the rig is new and the lines counted by it).
#[tokio::test]
async fn batch_tokens_are_metered_and_rewarded_by_the_plugins() {
    let mut cfg = config(vec![]);
    cfg.default_plugins = true;
    let gw = gateway(cfg).await;
    let base = gw.url();
    let pays_everyone =
        config_query(json!({"verified_only": false, "gateway_counted_only": false}));
    let (code, body) = upload_plugin(&base, "reward", garage_plugins::REWARD, &pays_everyone).await;
    assert_eq!(code, 200, "{body}");
    let _rigs = rigs(&base, 1, 0, 0.0, 64, quick_batch()).await;
    let (_, key) = create_key(&base, json!({"name": "metered"})).await;
    let file_id = upload_ok(&base, &key, lines(3, 8)).await;
    let id = create_batch(&base, &key, &file_id).await.1["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        wait_batch(&base, &key, &id, Duration::from_secs(60)).await["status"],
        "completed"
    );

    let request = format!("/admin/usage/requests/{id}:2");
    wait_until(
        Duration::from_secs(20),
        "the line's ledger entry",
        || async { admin_get(&base, &request).await["outcome"].is_object() },
    )
    .await;
    let entry = admin_get(&base, &request).await;
    assert_eq!(entry["event"]["batch"], true, "{entry}");
    assert_eq!(entry["event"]["trust"], "unverified", "{entry}");
    assert_eq!(entry["event"]["completion_tokens"], 8, "{entry}");
    assert!(
        entry["outcome"]["credits"].as_f64().unwrap() > 0.0,
        "{entry}"
    );
    let award = &entry["outcome"]["awards"][0];
    assert_eq!(award["operator"], "op-test", "{entry}");
    assert_eq!(award["reason"], "batch-tokens", "{entry}");
}

/// A rig can answer only the lines it holds a lease on: answers for lines it was never given
/// are ignored, and the batch ends with the real rig's answers.
#[tokio::test]
async fn a_rig_cannot_answer_lines_it_did_not_lease() {
    let gw = gateway(config(vec![])).await;
    let base = gw.url();
    // One real rig, slow enough that the lines are still pending when the rogue answers.
    let options = BatchOptions {
        max_concurrency: 1,
        ..quick_batch()
    };
    let _rigs = rigs(&base, 1, 0, 20.0, 64, options).await;
    // The rogue is an enrolled rig too: a valid node credential, no leases.
    let token = enrollment_token(&base, 1).await;
    let enrolled: Value = client()
        .post(format!("{base}/node/v1/enroll"))
        .json(&json!({"token": token, "name": "rogue"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rogue = enrolled["credential"]
        .as_str()
        .expect("credential")
        .to_owned();

    let (_, key) = create_key(&base, json!({"name": "k"})).await;
    let file_id = upload_ok(&base, &key, lines(5, 4)).await;
    let id = create_batch(&base, &key, &file_id).await.1["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let fake: Vec<Value> = (1..=5)
        .map(|line| {
            json!({
                "batch_id": id, "model": MODEL, "line": line, "status_code": 200,
                "body": {"forged": true}, "latency_ms": 1,
            })
        })
        .collect();
    let response = client()
        .post(format!("{base}/node/v1/batch/results"))
        .bearer_auth(&rogue)
        .json(&json!({"results": fake}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let ack: Value = response.json().await.unwrap();
    assert_eq!(ack, json!({"accepted": 0, "ignored": 5}));

    let finished = wait_batch(&base, &key, &id, Duration::from_secs(60)).await;
    assert_eq!(
        finished["request_counts"],
        json!({"total": 5, "completed": 5, "failed": 0})
    );
    let output = file_lines(&base, &key, finished["output_file_id"].as_str().unwrap()).await;
    assert!(
        output
            .iter()
            .all(|l| l["response"]["body"]["object"] == "chat.completion"),
        "a forged answer got in: {output:?}"
    );
}

/// Enrolls a rig by hand (no node-runner): its node credential.
pub(crate) async fn enroll_by_hand(base: &str, name: &str) -> String {
    let token = enrollment_token(base, 1).await;
    let enrolled: Value = client()
        .post(format!("{base}/node/v1/enroll"))
        .json(&json!({"token": token, "name": name}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    enrolled["credential"]
        .as_str()
        .expect("credential")
        .to_owned()
}

pub(crate) async fn node_post(base: &str, credential: &str, path: &str, body: Value) -> Value {
    let response = client()
        .post(format!("{base}{path}"))
        .bearer_auth(credential)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{path}");
    response.json().await.unwrap()
}

/// A heartbeat advertising one healthy engine serving `model`.
pub(crate) fn heartbeat(model: &str) -> Value {
    json!({"gpus": [], "engines": [{"name": "e", "models": [model], "state": "healthy",
        "restarts": 0, "stats": null}]})
}

/// A valid node credential is not enough to read a tenant's prompts: a rig gets lines only for
/// models its own recent heartbeat says it serves. Then what it claims a line used is bounded
/// by the line's request and the answer it sent.
#[tokio::test]
async fn leases_go_only_to_rigs_serving_the_model_and_their_usage_is_bounded() {
    // The static upstream makes the model known to the batch API; it never runs batch lines.
    let engine = fast_sim().await;
    let mut cfg = config(vec![upstream("static", engine.base_url())]);
    cfg.batch.max_wait_ms = 0;
    let gw = gateway(cfg).await;
    let base = gw.url();
    let rogue = enroll_by_hand(&base, "rogue").await;
    let (key_id, key) = create_key(&base, json!({"name": "victim"})).await;
    let file_id = upload_ok(&base, &key, lines(3, 8)).await;
    let id = create_batch(&base, &key, &file_id).await.1["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let lease = |models: Value| {
        let (base, rogue) = (base.clone(), rogue.clone());
        async move {
            node_post(
                &base,
                &rogue,
                "/node/v1/batch/lease",
                json!({"models": models, "max": 10, "wait_ms": 0}),
            )
            .await["items"]
                .as_array()
                .map_or(0, Vec::len)
        }
    };
    // Never heartbeated: nothing, whatever it asks for.
    assert_eq!(lease(json!([MODEL])).await, 0);
    // Heartbeats serving another model: still nothing for this one.
    node_post(&base, &rogue, "/node/v1/heartbeat", heartbeat("other")).await;
    assert_eq!(lease(json!([MODEL])).await, 0);
    // Serving it: the lines.
    node_post(&base, &rogue, "/node/v1/heartbeat", heartbeat(MODEL)).await;
    let leased = node_post(
        &base,
        &rogue,
        "/node/v1/batch/lease",
        json!({"models": [MODEL], "max": 10, "wait_ms": 0}),
    )
    .await;
    let items = leased["items"].as_array().expect("items");
    assert_eq!(items.len(), 3);
    // It answers each with half a billion tokens of a few words.
    let results: Vec<Value> = items
        .iter()
        .map(|item| {
            json!({
                "batch_id": id, "model": MODEL, "line": item["line"], "status_code": 200,
                "latency_ms": 5,
                "body": {"object": "chat.completion", "choices": [{"index": 0,
                    "message": {"role": "assistant", "content": "four words of text"},
                    "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 500_000_000u64, "completion_tokens": 500_000_000u64,
                        "total_tokens": 1_000_000_000u64}},
            })
        })
        .collect();
    let ack = node_post(
        &base,
        &rogue,
        "/node/v1/batch/results",
        json!({"results": results}),
    )
    .await;
    assert_eq!(ack["accepted"], 3);
    let finished = wait_batch(&base, &key, &id, Duration::from_secs(30)).await;
    // max_tokens is 8: no line is billed more completion tokens than that, and the prompt no
    // more than the request could hold.
    let usage = &finished["usage"];
    assert!(usage["output_tokens"].as_u64().unwrap() <= 3 * 8, "{usage}");
    assert!(
        usage["input_tokens"].as_u64().unwrap() < 3 * 5_000,
        "{usage}"
    );
    let output = file_lines(&base, &key, finished["output_file_id"].as_str().unwrap()).await;
    for line in &output {
        let counts = &line["response"]["body"]["usage"];
        assert!(
            counts["completion_tokens"].as_u64().unwrap() <= 8,
            "{counts}"
        );
    }
    wait_until(Duration::from_secs(10), "the lines metered", || async {
        let usage = admin_get(&base, &format!("/admin/usage?key_id={key_id}")).await;
        usage["data"][0]["requests"] == 3
    })
    .await;
    let usage = admin_get(&base, &format!("/admin/usage?key_id={key_id}")).await;
    assert!(
        usage["data"][0]["completion_tokens"].as_u64().unwrap() <= 24,
        "{usage}"
    );
    assert_metrics_include(
        &base,
        &["garage_usage_corrections_total{kind=\"completion_over_max_tokens\"} 3".to_owned()],
    )
    .await;
}

/// A file of 5,000 bad lines fails its batch with the first errors and a count of the rest,
/// not 5,000 stored errors.
#[tokio::test]
async fn a_flood_of_bad_lines_is_reported_within_bounds() {
    let engine = fast_sim().await;
    let mut cfg = config(vec![upstream("a", engine.base_url())]);
    cfg.batch.max_errors = 100;
    let gw = gateway(cfg).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "k"})).await;
    let file_id = upload_ok(&base, &key, "{not json\n".repeat(5_000)).await;
    let (status, created) = create_batch(&base, &key, &file_id).await;
    assert_eq!(status, 200, "{created}");
    assert_eq!(created["status"], "failed");
    let errors = created["errors"]["data"].as_array().expect("errors");
    assert_eq!(errors.len(), 101);
    assert_eq!(errors[99]["line"], 100);
    assert_eq!(errors[100]["code"], "too_many_errors");
    assert!(
        errors[100]["message"]
            .as_str()
            .unwrap()
            .starts_with("4900 more lines"),
        "{}",
        errors[100]
    );
    let listed = call(reqwest::Method::GET, &base, &key, "/v1/batches", None).await;
    assert!(listed.1.to_string().len() < 64 * 1024);
}

async fn upload_named(base: &str, key: &str, bytes: usize) -> (u16, Value) {
    let line = chat_line("q", 4);
    let content = format!(
        "{line}\n{}",
        " ".repeat(bytes.saturating_sub(line.len() + 1))
    );
    upload(base, key, "batch", content).await
}

/// A key keeps at most `max_files_per_key` files and `max_file_bytes_per_key` bytes of them,
/// concurrent uploads included; deleting makes room; other keys are not affected.
#[tokio::test]
async fn file_quotas_hold_per_key() {
    let mut cfg = config(vec![]);
    cfg.batch.max_files_per_key = 3;
    cfg.batch.max_file_bytes_per_key = 4_000;
    let gw = gateway(cfg).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "uploader"})).await;
    let (_, other) = create_key(&base, json!({"name": "other"})).await;
    // Eight at once: three fit.
    let uploads = (0..8).map(|_| upload_named(&base, &key, 500));
    let results = futures::future::join_all(uploads).await;
    let ok: Vec<&Value> = results
        .iter()
        .filter(|(status, _)| *status == 200)
        .map(|(_, file)| file)
        .collect();
    assert_eq!(ok.len(), 3, "{results:?}");
    for (status, body) in results.iter().filter(|(status, _)| *status != 200) {
        assert_eq!(*status, 400);
        assert_eq!(error_of(&body.to_string())["code"], "file_quota_exceeded");
    }
    // Another key has its own room.
    assert_eq!(upload_named(&base, &other, 500).await.0, 200);
    // Deleting one makes room for one.
    let id = ok[0]["id"].as_str().unwrap();
    let (status, _) = call(
        reqwest::Method::DELETE,
        &base,
        &key,
        &format!("/v1/files/{id}"),
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(upload_named(&base, &key, 500).await.0, 200);
    assert_eq!(upload_named(&base, &key, 500).await.0, 400);
    // Bytes: a key with room for files but not for their size.
    let (_, big) = create_key(&base, json!({"name": "big"})).await;
    assert_eq!(upload_named(&base, &big, 3_000).await.0, 200);
    let (status, body) = upload_named(&base, &big, 3_000).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(error_of(&body.to_string())["code"], "file_quota_exceeded");
    // Listing is per key: each sees its own.
    let (_, listed) = call(reqwest::Method::GET, &base, &other, "/v1/files", None).await;
    assert_eq!(listed["data"].as_array().map(Vec::len), Some(1), "{listed}");
}

/// A key that takes verified rigs only (`"min_trust": "verified"`) has its batch lines leased
/// to verified rigs only: an unverified rig never reads its prompts.
#[tokio::test]
async fn a_key_that_wants_verified_rigs_has_its_lines_served_by_them_only() {
    let gw = gateway(config(vec![])).await;
    let base = gw.url();
    let rigs = rigs(&base, 3, 0, 0.0, 64, quick_batch()).await;
    // One rig passes three spot checks (against the other two): verified.
    let verified = rigs[0].node_id().to_owned();
    for _ in 0..3 {
        let path = format!("/admin/nodes/{verified}/verify");
        let (code, result) = admin_post(&base, &path, json!({})).await;
        assert_eq!(
            (code, &result["verdict"]),
            (200, &json!("passed")),
            "{result}"
        );
    }
    let (_, picky) = create_key(
        &base,
        json!({"name": "picky", "metadata": {"min_trust": "verified"}}),
    )
    .await;
    let file_id = upload_ok(&base, &picky, lines(12, 4)).await;
    let id = create_batch(&base, &picky, &file_id).await.1["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let done = wait_batch(&base, &picky, &id, Duration::from_secs(60)).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["request_counts"]["completed"], 12, "{done}");
    for line in 1..=12 {
        let entry = ledger_entry(&base, &format!("{id}:{line}")).await;
        assert_eq!(entry["event"]["rig"], verified, "line {line}: {entry}");
        assert_eq!(entry["event"]["trust"], "verified", "line {line}: {entry}");
    }
}

/// `Idempotency-Key` on uploads and batch creation: a retry gets the first answer (marked
/// replayed) and nothing is created twice, even when the retries race; the same key with
/// another request is refused; keys are per API key; a failure is not kept.
#[tokio::test]
async fn an_idempotency_key_creates_one_file_and_one_batch() {
    idempotency_keys(None).await;
}

#[tokio::test]
async fn an_idempotency_key_creates_one_file_and_one_batch_on_redis() {
    let redis = RedisServer::start();
    idempotency_keys(Some(&redis)).await;
}

async fn idempotency_keys(redis: Option<&RedisServer>) {
    let mut cfg = config(vec![]);
    if let Some(redis) = redis {
        cfg.store = redis.url();
        cfg.auth.key_secret = Some("idempotency-secret".into());
    }
    let gw = gateway(cfg).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "retrying"})).await;
    let upload_with = |idempotency: &'static str, content: String, key: String| {
        let base = base.clone();
        async move {
            let form = reqwest::multipart::Form::new()
                .text("purpose", "batch")
                .part(
                    "file",
                    reqwest::multipart::Part::text(content).file_name("in.jsonl"),
                );
            let response = client()
                .post(format!("{base}/v1/files"))
                .bearer_auth(key)
                .header("idempotency-key", idempotency)
                .multipart(form)
                .send()
                .await
                .unwrap();
            let replayed = response.headers().get("idempotent-replayed").is_some();
            let status = response.status().as_u16();
            (status, replayed, response.json::<Value>().await.unwrap())
        }
    };
    let (status, replayed, first) = upload_with("upload-1", lines(2, 4), key.clone()).await;
    assert_eq!((status, replayed), (200, false), "{first}");
    let (status, replayed, again) = upload_with("upload-1", lines(2, 4), key.clone()).await;
    assert_eq!((status, replayed), (200, true), "{again}");
    assert_eq!(again["id"], first["id"]);
    let (status, _, reused) = upload_with("upload-1", lines(3, 4), key.clone()).await;
    assert_eq!(status, 400, "{reused}");
    assert_eq!(reused["error"]["code"], "idempotency_key_reused");
    let files = call(reqwest::Method::GET, &base, &key, "/v1/files", None)
        .await
        .1;
    assert_eq!(files["data"].as_array().unwrap().len(), 1, "{files}");

    // Eight creations racing with one key: one batch.
    let file_id = first["id"].as_str().unwrap().to_owned();
    let create = |idempotency: &'static str, key: String, file_id: String| {
        let base = base.clone();
        async move {
            let response = client()
                .post(format!("{base}/v1/batches"))
                .bearer_auth(key)
                .header("idempotency-key", idempotency)
                .json(&json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}))
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }
    };
    let answers =
        futures::future::join_all((0..8).map(|_| create("batch-1", key.clone(), file_id.clone())))
            .await;
    let ids: std::collections::BTreeSet<String> = answers
        .iter()
        .filter(|(status, _)| *status == 200)
        .map(|(_, body)| body["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 1, "{answers:?}");
    assert!(
        answers
            .iter()
            .all(|(status, _)| *status == 200 || *status == 409),
        "{answers:?}"
    );
    let (status, again) = create("batch-1", key.clone(), file_id.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(again["id"].as_str().unwrap(), ids.first().unwrap());
    let batches = call(reqwest::Method::GET, &base, &key, "/v1/batches", None)
        .await
        .1;
    assert_eq!(batches["data"].as_array().unwrap().len(), 1, "{batches}");

    // Another key's same Idempotency-Key is its own.
    let (_, other) = create_key(&base, json!({"name": "other"})).await;
    let (status, _, theirs) = upload_with("upload-1", lines(2, 4), other.clone()).await;
    assert_eq!(status, 200, "{theirs}");
    assert_ne!(theirs["id"], first["id"]);
    // A failure is not kept: the retry runs again (and fails again), never 409.
    for _ in 0..2 {
        let (status, body) = create("batch-nope", other.clone(), "file-nope".into()).await;
        assert_eq!(status, 404, "{body}");
    }
    // A key that is not a key.
    let response = client()
        .post(format!("{base}/v1/batches"))
        .bearer_auth(&key)
        .header("idempotency-key", "x".repeat(300))
        .json(&json!({"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
}
