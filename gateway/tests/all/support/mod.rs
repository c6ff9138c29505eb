//! Shared test support: a real `redis-server` on a free port, simulated engines, gateways on
//! port 0 — all stopped on drop.

#![allow(
    dead_code,
    reason = "each test binary uses a different part of this module"
)]

mod redis_deployments;

pub use redis_deployments::*;

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use garage_gateway::Gateway;
use garage_gateway::config::{Config, UpstreamConfig};
use garage_sim_engine::{SimConfig, SimEngine};

pub const ADMIN: &str = "admin-test-token";
pub const MODEL: &str = "sim-model";

/// Waits for `condition` to hold, polling, for at most `bound`.
pub async fn wait_until<F, Fut>(bound: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + bound;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A throwaway `redis-server`, killed on drop.
pub struct RedisServer {
    child: Child,
    pub port: u16,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_on(free_port())
    }

    /// A server on a given port (to restart one where clients expect it).
    pub fn start_on(port: u16) -> RedisServer {
        Self::spawn(port, &["--appendonly", "no"])
    }

    /// A server that writes every command to its append-only file in `dir` before answering,
    /// so a restart on the same `dir` and `port` (even after SIGKILL) keeps every key.
    pub fn start_durable(dir: &std::path::Path, port: u16) -> RedisServer {
        let dir = dir.to_str().expect("a UTF-8 temporary directory");
        Self::spawn(
            port,
            &[
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                dir,
            ],
        )
    }

    fn spawn(port: u16, persistence: &[&str]) -> RedisServer {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(persistence)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (scripts/test.sh installs it)");
        let server = RedisServer { child, port };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl RedisServer {
    /// Stops the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

pub async fn sim(config: SimConfig) -> SimEngine {
    SimEngine::start(SocketAddr::from(([127, 0, 0, 1], 0)), config)
        .await
        .expect("simulated engine starts")
}

/// A simulated engine serving [`MODEL`] at once, with `faults` injected.
pub async fn faulty_sim(faults: garage_sim_engine::Faults) -> SimEngine {
    sim(SimConfig {
        models: vec![MODEL.into()],
        faults,
        ..SimConfig::default()
    })
    .await
}

/// A fast simulated engine serving [`MODEL`].
pub async fn fast_sim() -> SimEngine {
    paced_sim(0.0).await
}

/// An engine serving `MODEL` at once (no time to first token), then `tokens_per_sec` (0: as
/// fast as it can).
pub async fn paced_sim(tokens_per_sec: f64) -> SimEngine {
    sim(SimConfig {
        models: vec![MODEL.into()],
        ttft: Duration::ZERO,
        tokens_per_sec,
        ..SimConfig::default()
    })
    .await
}

/// The simulated models' tokenizer (one token per word, `sim-engine/tokenizer.json`) with their
/// chat template's tokens per message: a gateway configured with it counts as the simulated
/// engines do.
pub fn sim_tokenizer() -> garage_gateway::config::TokenizerConfig {
    garage_gateway::config::TokenizerConfig {
        file: std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../sim-engine/tokenizer.json"),
        chat_template_tokens: garage_sim_engine::CHAT_TEMPLATE_TOKENS,
    }
}

pub fn upstream(name: &str, base_url: String) -> UpstreamConfig {
    UpstreamConfig {
        name: name.into(),
        base_url,
        models: vec![MODEL.into()],
        api_key: None,
        health_path: None,
        labels: Default::default(),
        tls_ca_file: None,
        unix_socket: None,
    }
}

/// A test config: port 0, a known admin token, quick cooldowns, and no default plugins (the
/// built-in fallbacks), so tests of other things do not compile components; plugin tests turn
/// them on.
pub fn config(upstreams: Vec<UpstreamConfig>) -> Config {
    let mut config = Config {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        upstreams,
        default_plugins: false,
        ..Config::default()
    };
    config.auth.admin_token = Some(ADMIN.into());
    // No spot checks unless a test is about them: a challenge is a request to a rig that a
    // test counting its rigs' requests would not expect.
    config.trust.spot_check_interval_secs = 0;
    config.trust.replay_share = 0.0;
    config
}

pub async fn gateway(config: Config) -> Gateway {
    Gateway::start(config).await.expect("gateway starts")
}

/// An HTTP client for tests (ring as the TLS provider, as the gateway uses).
pub fn client() -> reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT
        .get_or_init(|| {
            let _ = rustls::crypto::ring::default_provider().install_default();
            reqwest::Client::new()
        })
        .clone()
}

/// The Prometheus text a server at `base` (a gateway or an engine) exposes on `/metrics`.
pub async fn metrics_text(base: &str) -> String {
    client()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics answer")
        .text()
        .await
        .expect("metrics text")
}

/// Creates an API key through the admin API; returns (id, secret).
pub async fn create_key(base: &str, body: serde_json::Value) -> (String, String) {
    create_key_with(&client(), base, body).await
}

/// [`create_key`] through `client` (one that trusts a test CA, say).
pub async fn create_key_with(
    client: &reqwest::Client,
    base: &str,
    body: serde_json::Value,
) -> (String, String) {
    let response = client
        .post(format!("{base}/admin/keys"))
        .bearer_auth(ADMIN)
        .json(&body)
        .send()
        .await
        .expect("admin API answers");
    assert_eq!(response.status(), 201);
    let created: serde_json::Value = response.json().await.expect("json");
    (
        created["id"].as_str().expect("id").to_owned(),
        created["key"].as_str().expect("key").to_owned(),
    )
}

pub fn chat(stream: bool) -> serde_json::Value {
    serde_json::json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 5,
        "stream": stream,
    })
}

/// Posts a chat request with `key`; returns status and body text.
pub async fn post_chat(base: &str, key: &str, body: &serde_json::Value) -> (u16, String) {
    post_chat_with(&client(), base, key, body).await
}

/// [`post_chat`] through `client`.
pub async fn post_chat_with(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    body: &serde_json::Value,
) -> (u16, String) {
    post_json_with(client, base, key, "chat/completions", body).await
}

/// Posts `body` to `/v1/{path}` with `key`; returns status and body text.
pub async fn post_json(
    base: &str,
    key: &str,
    path: &str,
    body: &serde_json::Value,
) -> (u16, String) {
    post_json_with(&client(), base, key, path, body).await
}

/// [`post_json`] through `client`.
pub async fn post_json_with(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    path: &str,
    body: &serde_json::Value,
) -> (u16, String) {
    let response = client
        .post(format!("{base}/v1/{path}"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .expect("gateway answers");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

/// The model ids `GET /v1/models` lists for `key`, sorted.
pub async fn model_ids(base: &str, key: &str) -> Vec<String> {
    let list: serde_json::Value = client()
        .get(format!("{base}/v1/models"))
        .bearer_auth(key)
        .send()
        .await
        .expect("gateway answers")
        .json()
        .await
        .expect("a model list");
    let mut ids: Vec<String> = list["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|m| m["id"].as_str().expect("id").to_owned())
        .collect();
    ids.sort();
    ids
}

/// Asserts that the gateway's `/metrics` has each of `lines`.
pub async fn assert_metrics_include(base: &str, lines: &[String]) {
    let metrics = metrics_text(base).await;
    for line in lines {
        assert!(metrics.contains(line.as_str()), "no `{line}` in {metrics}");
    }
}

/// The OpenAI error envelope of a body, asserting its shape.
pub fn error_of(body: &str) -> serde_json::Value {
    let value: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
    let error = value["error"].clone();
    assert!(error["message"].is_string(), "no error.message in {body}");
    assert!(error["type"].is_string(), "no error.type in {body}");
    assert!(error.get("param").is_some(), "no error.param in {body}");
    assert!(error.get("code").is_some(), "no error.code in {body}");
    error
}

/// A binary of this workspace, built beside the test executable (`scripts/test.sh` builds
/// them all first with `cargo build --workspace --bins`).
pub fn workspace_binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// GET an admin endpoint as JSON.
pub async fn admin_get(base: &str, path: &str) -> serde_json::Value {
    admin_get_with(&client(), base, path).await
}

/// [`admin_get`] through `client`.
pub async fn admin_get_with(client: &reqwest::Client, base: &str, path: &str) -> serde_json::Value {
    client
        .get(format!("{base}{path}"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("admin API answers")
        .json()
        .await
        .expect("json")
}

/// POST to an admin endpoint; returns status and JSON.
pub async fn admin_post(
    base: &str,
    path: &str,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    admin_post_with(&client(), base, path, body).await
}

/// [`admin_post`] through `client`.
pub async fn admin_post_with(
    client: &reqwest::Client,
    base: &str,
    path: &str,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    let response = client
        .post(format!("{base}{path}"))
        .bearer_auth(ADMIN)
        .json(&body)
        .send()
        .await
        .expect("admin API answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

/// An enrollment token for `uses` rigs.
pub async fn enrollment_token(base: &str, uses: u32) -> String {
    enrollment_token_with(&client(), base, uses).await
}

/// [`enrollment_token`] through `client`.
pub async fn enrollment_token_with(client: &reqwest::Client, base: &str, uses: u32) -> String {
    let (status, body) = admin_post_with(
        client,
        base,
        "/admin/enrollment-tokens",
        serde_json::json!({"operator": "op-test", "max_uses": uses}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    body["token"].as_str().expect("token").to_owned()
}

/// Rigs the gateway routes to right now.
pub async fn routable_rigs(base: &str) -> usize {
    routable_rigs_with(&client(), base).await
}

/// [`routable_rigs`] through `client`.
pub async fn routable_rigs_with(client: &reqwest::Client, base: &str) -> usize {
    admin_get_with(client, base, "/admin/nodes").await["data"]
        .as_array()
        .map_or(0, |nodes| {
            nodes.iter().filter(|n| n["routable"] == true).count()
        })
}

/// Options of an in-process rig (a real node-runner agent) joining the gateway at `base`.
pub fn rig_options(base: &str, name: &str, token: &str) -> garage_node_runner::agent::AgentOptions {
    garage_node_runner::agent::AgentOptions {
        gateway_url: base.to_owned(),
        name: name.to_owned(),
        enrollment_token: Some(token.to_owned()),
        state_file: None,
        heartbeat_interval: None,
        drain_timeout: Duration::from_secs(10),
        http: None,
        probe_gpus: false,
        batch: garage_node_runner::batch::BatchOptions::default(),
        labels: Default::default(),
    }
}

/// An in-process rig with a simulated engine serving [`MODEL`].
pub async fn sim_rig(
    options: garage_node_runner::agent::AgentOptions,
    tokens_per_sec: f64,
) -> garage_node_runner::agent::Agent {
    let engines = garage_node_runner::engines::EngineSet::start(vec![
        garage_node_runner::cli::simulated_engine("sim", &[MODEL.to_owned()], 0, tokens_per_sec),
    ])
    .await;
    garage_node_runner::agent::Agent::start(options, engines)
        .await
        .expect("rig joins")
}

/// `node-runner run` as a real process with the given config, killed on drop.
pub struct NodeRunner {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl NodeRunner {
    /// Writes `config` to `dir/node-runner.toml` and starts the binary on it; its log goes to
    /// `dir/node-runner.log`.
    pub fn start(dir: &std::path::Path, config: &str) -> Self {
        let config_path = dir.join("node-runner.toml");
        std::fs::write(&config_path, config).expect("config written");
        let log = dir.join("node-runner.log");
        let log_file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(workspace_binary("node-runner"))
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("node-runner starts");
        NodeRunner { child, log }
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to exit; its exit code.
    pub async fn wait_exit(&mut self, bound: Duration) -> Option<i32> {
        let deadline = Instant::now() + bound;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "node-runner did not exit:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for NodeRunner {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Uploads a component to a plugin slot (`PUT /admin/plugins/{slot}{query}`); status and body.
pub async fn upload_plugin(
    base: &str,
    slot: &str,
    wasm: &[u8],
    query: &str,
) -> (u16, serde_json::Value) {
    let response = client()
        .put(format!("{base}/admin/plugins/{slot}{query}"))
        .bearer_auth(ADMIN)
        .header("content-type", "application/wasm")
        .body(wasm.to_vec())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

/// `?config=...`: a plugin configuration as the upload's query string.
pub fn config_query(config: serde_json::Value) -> String {
    let text = config.to_string();
    let encoded: String = text
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    format!("?config={encoded}")
}

/// A request's ledger entry (`GET /admin/usage/requests/{id}`), once the usage worker has
/// written it, waiting at most `bound`.
pub async fn ledger_entry_within(base: &str, id: &str, bound: Duration) -> serde_json::Value {
    let path = format!("/admin/usage/requests/{id}");
    wait_until(bound, "the ledger entry", || async {
        admin_get(base, &path).await["event"]["request_id"] == id
    })
    .await;
    admin_get(base, &path).await
}

/// [`ledger_entry_within`] ten seconds.
pub async fn ledger_entry(base: &str, id: &str) -> serde_json::Value {
    ledger_entry_within(base, id, Duration::from_secs(10)).await
}

/// A router's input from its parts, as the gateway builds one per request.
pub fn route_input(
    request: garage_gateway::plugins::RouteRequest,
    candidates: &[garage_gateway::plugins::Candidate],
    infos: &[std::sync::Arc<garage_gateway::plugins::CandidateInfo>],
) -> std::sync::Arc<garage_gateway::plugins::RouteInput> {
    std::sync::Arc::new(garage_gateway::plugins::RouteInput {
        request,
        candidates: candidates.to_vec(),
        infos: infos.iter().cloned().collect(),
    })
}
