//! Test support for rigs against real gateways: a throwaway `redis-server`, gateway replicas
//! that can be killed, an in-process rig with a simulated engine, and the admin API calls the
//! tests read the replicas with. Everything stops on drop.

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use garage_gateway::Gateway;
use garage_gateway::config::Config;
use garage_node_runner::agent::{Agent, AgentOptions};
use garage_node_runner::engines::EngineSet;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

pub const ADMIN: &str = "admin-test-token";
pub const MODEL: &str = "sim-model";

/// The agent's and the gateway's logs, shown for a failing test.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "garage_node_runner=debug,garage_gateway=info".into()),
        )
        .try_init();
}

/// Waits for `condition` to hold, polling every 20 ms, for at most `bound`.
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

/// A throwaway `redis-server` on a free port, killed on drop.
pub struct RedisServer {
    child: Child,
    pub port: u16,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let port = free_port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
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

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A gateway config for rigs: port 0, a known admin token, no plugins, heartbeats every second
/// and out of routing after two missed.
pub fn gateway_config(store: &str) -> Config {
    let mut config = Config {
        listen: ([127, 0, 0, 1], 0).into(),
        store: store.to_owned(),
        default_plugins: false,
        ..Config::default()
    };
    config.auth.admin_token = Some(ADMIN.into());
    // Replicas on one store must hash API keys alike.
    config.auth.key_secret = Some("shared-replica-secret".into());
    config.nodes.heartbeat_interval_secs = 1;
    config.nodes.missed_heartbeats = 2;
    config
}

/// A gateway replica on a runtime of its own, so that it can die the way a killed process
/// does: [`Replica::kill`] drops every task and socket of it at once, and nothing is said to
/// the rigs (no GOAWAY, no tunnel closed in order); the kernel closes its connections as it
/// would for a process killed with SIGKILL.
pub struct Replica {
    runtime: Option<tokio::runtime::Runtime>,
    gateway: Option<Gateway>,
    pub url: String,
    pub addr: SocketAddr,
}

impl Replica {
    pub async fn start(config: Config) -> Replica {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("replica")
            .enable_all()
            .build()
            .expect("a runtime for the replica");
        let gateway = runtime
            .spawn(Gateway::start(config))
            .await
            .expect("the gateway's start did not panic")
            .expect("the gateway starts");
        Replica {
            url: gateway.url(),
            addr: gateway.addr(),
            runtime: Some(runtime),
            gateway: Some(gateway),
        }
    }

    /// Dies at once, as with SIGKILL.
    pub fn kill(&mut self) {
        let gateway = self.gateway.take();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
        drop(gateway);
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP forwarder to a gateway that can go silent, as a replica whose host lost power does:
/// after [`SilentProxy::silence`] nothing passes in either direction, no connection is closed,
/// and new ones are never answered.
pub struct SilentProxy {
    pub url: String,
    silence: CancellationToken,
    stop: CancellationToken,
}

impl SilentProxy {
    pub async fn start(upstream: SocketAddr) -> SilentProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let url = format!("http://{}", listener.local_addr().expect("an address"));
        let (silence, stop) = (CancellationToken::new(), CancellationToken::new());
        // Owned through `stop`, cancelled on drop.
        tokio::spawn({
            let (silence, stop) = (silence.clone(), stop.clone());
            async move {
                loop {
                    let (client, _) = tokio::select! {
                        _ = silence.cancelled() => break,
                        accepted = listener.accept() => match accepted {
                            Ok(accepted) => accepted,
                            Err(_) => continue,
                        },
                    };
                    tokio::spawn(pipe(client, upstream, silence.clone(), stop.clone()));
                }
                // Keeps the listener: connections reach the backlog and wait there forever.
                stop.cancelled().await;
            }
        });
        SilentProxy { url, silence, stop }
    }

    pub fn silence(&self) {
        self.silence.cancel();
    }
}

async fn pipe(
    mut client: tokio::net::TcpStream,
    upstream: SocketAddr,
    silence: CancellationToken,
    stop: CancellationToken,
) {
    let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = silence.cancelled() => stop.cancelled().await,
        _ = stop.cancelled() => {}
    }
}

impl Drop for SilentProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The HTTP client of the tests (node-runner's, with ring as the TLS provider).
pub fn client() -> reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT
        .get_or_init(garage_node_runner::agent::http_client)
        .clone()
}

async fn admin_post(base: &str, path: &str, body: Value) -> Value {
    let response = client()
        .post(format!("{base}{path}"))
        .bearer_auth(ADMIN)
        .json(&body)
        .send()
        .await
        .expect("admin API answers");
    assert_eq!(response.status(), 201, "POST {path}");
    response.json().await.expect("json")
}

/// An enrollment token for `uses` rigs.
pub async fn enrollment_token(base: &str, uses: u32) -> String {
    let created = admin_post(
        base,
        "/admin/enrollment-tokens",
        json!({"operator": "op-test", "max_uses": uses}),
    )
    .await;
    created["token"].as_str().expect("token").to_owned()
}

/// A new API key's secret.
pub async fn api_key(base: &str) -> String {
    let created = admin_post(base, "/admin/keys", json!({"name": "t"})).await;
    created["key"].as_str().expect("key").to_owned()
}

/// How a replica sees a rig: (connected, routable); `None` when the replica cannot be asked.
pub async fn rig_state(base: &str, node_id: &str) -> Option<(bool, bool)> {
    let nodes: Value = client()
        .get(format!("{base}/admin/nodes"))
        .bearer_auth(ADMIN)
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    let node = nodes["data"]
        .as_array()?
        .iter()
        .find(|node| node["id"] == node_id)?;
    Some((node["connected"] == true, node["routable"] == true))
}

/// A non-streamed chat through the gateway at `base`: its status and body; status 0 when no
/// answer came within 5 s.
pub async fn chat(base: &str, key: &str) -> (u16, String) {
    let response = client()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": "hello there"}],
            "max_tokens": 5,
        }))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    let response = match response {
        Ok(response) => response,
        Err(err) => return (0, err.to_string()),
    };
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

/// Options of an in-process rig (the real agent) joining `gateway_url`: one URL, or several
/// separated by commas.
pub fn rig_options(gateway_url: &str, token: &str) -> AgentOptions {
    AgentOptions {
        gateway_url: gateway_url.to_owned(),
        name: "failover-rig".into(),
        enrollment_token: Some(token.to_owned()),
        state_file: None,
        heartbeat_interval: None,
        drain_timeout: Duration::from_secs(5),
        http: Some(client()),
        probe_gpus: false,
        batch: garage_node_runner::batch::BatchOptions::default(),
        labels: Default::default(),
    }
}

/// An in-process rig with a simulated engine serving [`MODEL`].
pub async fn sim_rig(options: AgentOptions) -> Agent {
    let engines = EngineSet::start(vec![garage_node_runner::cli::simulated_engine(
        "sim",
        &[MODEL.to_owned()],
        0,
        0.0,
    )])
    .await;
    Agent::start(options, engines).await.expect("rig joins")
}
