//! The rig agent: enroll once, then keep a tunnel open to the gateway, answer the requests it
//! sends from the local engines, and report heartbeats; drain on shutdown.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::TryStreamExt;
use garage_node_protocol::{
    CONNECT_PATH, DEREGISTER_PATH, ENROLL_PATH, EnrollRequest, EnrollResponse, HEARTBEAT_PATH,
    Heartbeat, HeartbeatAck, TUNNEL_PROTOCOL,
};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use garage_tls::CaFileError;

use crate::batch::BatchOptions;
use crate::engines::EngineSet;
use crate::gpu::Gpus;

/// The rig's identity, as kept in its state file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeIdentity {
    pub gateway_url: String,
    pub node_id: String,
    pub credential: String,
    pub operator: String,
    pub heartbeat_interval_secs: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("no identity yet and no enrollment token: set `enrollment_token` in the config")]
    NoToken,
    #[error("enrollment refused by the gateway ({status}): {message}")]
    EnrollRefused { status: u16, message: String },
    #[error("cannot reach the gateway at {url}: {source}")]
    Unreachable { url: String, source: reqwest::Error },
    #[error("cannot read or write the state file {path}: {source}")]
    StateFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the gateway refused this rig's credential: it was removed by an admin")]
    Revoked,
}

/// How to start an agent.
pub struct AgentOptions {
    pub gateway_url: String,
    /// The rig's name, shown to admins.
    pub name: String,
    /// Used when there is no identity yet.
    pub enrollment_token: Option<String>,
    /// Where the identity is kept across restarts; `None` keeps it in memory (tests, demo).
    pub state_file: Option<PathBuf>,
    /// Overrides the gateway's heartbeat interval.
    pub heartbeat_interval: Option<Duration>,
    /// How long in-flight requests get to finish on shutdown.
    pub drain_timeout: Duration,
    /// HTTP client for the gateway (shared by many simulated rigs in one process).
    pub http: Option<reqwest::Client>,
    /// Read GPUs through NVML. Off for simulated rigs, which have none.
    pub probe_gpus: bool,
    /// Pulling Batch API work.
    pub batch: BatchOptions,
    /// Labels routers may read, sent with every heartbeat.
    pub labels: std::collections::BTreeMap<String, String>,
}

/// Things every task of the agent shares.
struct Shared {
    identity: NodeIdentity,
    engines: Arc<EngineSet>,
    gpus: Gpus,
    http: reqwest::Client,
    /// Client for the local engines.
    local: reqwest::Client,
    draining: AtomicBool,
    started: Instant,
    /// Cancelled when the gateway refuses the credential: the agent cannot go on.
    revoked: CancellationToken,
    /// Wakes the heartbeat loop when a tunnel opens: the gateway routes to a rig from its first
    /// heartbeat over a live tunnel, so waiting a whole interval would waste it.
    tunnel_opened: tokio::sync::Notify,
    labels: std::collections::BTreeMap<String, String>,
}

/// A running agent.
pub struct Agent {
    shared: Arc<Shared>,
    stop_heartbeats: CancellationToken,
    stop_tunnel: CancellationToken,
    stop_batch: CancellationToken,
    heartbeats: JoinHandle<()>,
    tunnel: JoinHandle<()>,
    batch: Option<JoinHandle<()>>,
    drain_timeout: Duration,
}

/// An HTTP client with ring as its TLS provider (the workspace builds rustls without a default
/// one) and TCP_NODELAY.
pub fn http_client() -> reqwest::Client {
    let tls = garage_tls::client_config(None)
        .unwrap_or_else(|e| unreachable!("the web roots need no file: {e}"));
    client_with(tls)
}

/// [`http_client`], trusting the CAs of a PEM file too: for a gateway whose certificate comes
/// from a private CA (`gateway_ca_file`).
pub fn http_client_trusting(ca_file: &Path) -> Result<reqwest::Client, CaFileError> {
    Ok(client_with(garage_tls::client_config(Some(ca_file))?))
}

fn client_with(tls: rustls::ClientConfig) -> reqwest::Client {
    reqwest::Client::builder()
        .tcp_nodelay(true)
        // The tunnel is an HTTP/1.1 upgrade; HTTP/2 has no upgrades.
        .http1_only()
        .connect_timeout(Duration::from_secs(10))
        .tls_backend_preconfigured(tls)
        .build()
        .unwrap_or_else(|_| reqwest::Client::new())
}

fn read_identity(path: &Path) -> Result<Option<NodeIdentity>, AgentError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(AgentError::StateFile {
            path: path.to_owned(),
            source,
        }),
    }
}

fn write_identity(path: &Path, identity: &NodeIdentity) -> Result<(), AgentError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let error = |source| AgentError::StateFile {
        path: path.to_owned(),
        source,
    };
    let json = serde_json::to_vec_pretty(identity)
        .map_err(|e| error(std::io::Error::other(e.to_string())))?;
    // The credential is a secret: readable by the rig's user only.
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(error)?;
    file.write_all(&json).map_err(error)?;
    file.sync_all().map_err(error)?;
    std::fs::rename(&tmp, path).map_err(error)
}

/// The rig's identity: from its state file, or by enrolling with the token.
async fn identity(
    options: &AgentOptions,
    http: &reqwest::Client,
) -> Result<NodeIdentity, AgentError> {
    let gateway_url = options.gateway_url.trim_end_matches('/').to_owned();
    if let Some(path) = &options.state_file
        && let Some(identity) = read_identity(path)?
    {
        if identity.gateway_url == gateway_url {
            return Ok(identity);
        }
        tracing::warn!(state_file = %path.display(), "state file belongs to another gateway; enrolling anew");
    }
    let token = options
        .enrollment_token
        .clone()
        .ok_or(AgentError::NoToken)?;
    let url = format!("{gateway_url}{ENROLL_PATH}");
    let response = http
        .post(&url)
        .json(&EnrollRequest {
            token,
            name: options.name.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
        })
        .send()
        .await
        .map_err(|source| AgentError::Unreachable {
            url: url.clone(),
            source,
        })?;
    let status = response.status();
    if !status.is_success() {
        let message = response.text().await.unwrap_or_default();
        return Err(AgentError::EnrollRefused {
            status: status.as_u16(),
            message,
        });
    }
    let enrolled: EnrollResponse = response
        .json()
        .await
        .map_err(|source| AgentError::Unreachable { url, source })?;
    let identity = NodeIdentity {
        gateway_url,
        node_id: enrolled.node_id,
        credential: enrolled.credential,
        operator: enrolled.operator,
        heartbeat_interval_secs: enrolled.heartbeat_interval_secs,
    };
    if let Some(path) = &options.state_file {
        write_identity(path, &identity)?;
    }
    tracing::info!(node = %identity.node_id, operator = %identity.operator, "enrolled with the gateway");
    Ok(identity)
}

impl Agent {
    /// Enrolls if needed, then starts the tunnel and the heartbeats.
    pub async fn start(options: AgentOptions, engines: EngineSet) -> Result<Agent, AgentError> {
        let http = options.http.clone().unwrap_or_else(http_client);
        let identity = identity(&options, &http).await?;
        let interval = options
            .heartbeat_interval
            .unwrap_or(Duration::from_secs(identity.heartbeat_interval_secs.max(1)));
        let shared = Arc::new(Shared {
            identity,
            engines: Arc::new(engines),
            gpus: if options.probe_gpus {
                Gpus::init()
            } else {
                Gpus::disabled()
            },
            local: http.clone(),
            http,
            draining: AtomicBool::new(false),
            started: Instant::now(),
            revoked: CancellationToken::new(),
            tunnel_opened: tokio::sync::Notify::new(),
            labels: options.labels.clone(),
        });
        let stop_heartbeats = CancellationToken::new();
        let stop_tunnel = CancellationToken::new();
        let heartbeats = tokio::spawn(heartbeat_loop(
            Arc::clone(&shared),
            interval,
            stop_heartbeats.clone(),
        ));
        let tunnel = tokio::spawn(tunnel_loop(
            Arc::clone(&shared),
            stop_tunnel.clone(),
            options.drain_timeout,
        ));
        let stop_batch = CancellationToken::new();
        let batch = options.batch.enabled.then(|| {
            let context = Arc::new(crate::batch::Context {
                gateway_url: shared.identity.gateway_url.clone(),
                credential: shared.identity.credential.clone(),
                http: shared.http.clone(),
                local: shared.local.clone(),
                engines: Arc::clone(&shared.engines),
                revoked: shared.revoked.clone(),
            });
            tokio::spawn(crate::batch::run(
                context,
                options.batch.clone(),
                stop_batch.clone(),
                options.drain_timeout,
            ))
        });
        Ok(Agent {
            shared,
            stop_heartbeats,
            stop_tunnel,
            stop_batch,
            heartbeats,
            tunnel,
            batch,
            drain_timeout: options.drain_timeout,
        })
    }

    pub fn node_id(&self) -> &str {
        &self.shared.identity.node_id
    }

    pub fn engines(&self) -> &EngineSet {
        &self.shared.engines
    }

    /// Resolves when the gateway refused this rig's credential (it was removed).
    pub async fn revoked(&self) {
        self.shared.revoked.cancelled().await
    }

    /// Drains: tells the gateway to send nothing new, lets in-flight requests finish (within the
    /// drain timeout), stops the heartbeats, then the engines.
    pub async fn shutdown(self) {
        let shared = self.shared;
        shared.draining.store(true, Ordering::Relaxed);
        let url = format!("{}{DEREGISTER_PATH}", shared.identity.gateway_url);
        match shared
            .http
            .post(&url)
            .bearer_auth(&shared.identity.credential)
            .timeout(Duration::from_secs(5))
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => tracing::info!("deregistered; draining"),
            Ok(r) => tracing::warn!(status = r.status().as_u16(), "deregistration refused"),
            Err(err) => tracing::warn!(error = %err, "cannot deregister; draining anyway"),
        }
        // No new batch lines; the running ones finish alongside the interactive requests.
        self.stop_batch.cancel();
        self.stop_tunnel.cancel();
        if let Some(batch) = self.batch {
            let _ = tokio::time::timeout(self.drain_timeout + Duration::from_secs(11), batch).await;
        }
        if tokio::time::timeout(self.drain_timeout + Duration::from_secs(1), self.tunnel)
            .await
            .is_err()
        {
            tracing::warn!("tunnel did not close within the drain timeout");
        }
        self.stop_heartbeats.cancel();
        let _ = self.heartbeats.await;
        shared.engines.shutdown(self.drain_timeout).await;
    }
}

fn heartbeat(shared: &Shared) -> Heartbeat {
    Heartbeat {
        gpus: shared.gpus.read(),
        engines: shared.engines.statuses(),
        draining: shared.draining.load(Ordering::Relaxed),
        version: env!("CARGO_PKG_VERSION").into(),
        uptime_secs: shared.started.elapsed().as_secs(),
        labels: shared.labels.clone(),
    }
}

async fn heartbeat_loop(shared: Arc<Shared>, interval: Duration, stop: CancellationToken) {
    let url = format!("{}{HEARTBEAT_PATH}", shared.identity.gateway_url);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut drain_logged = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
            _ = shared.tunnel_opened.notified() => {}
        }
        let result = shared
            .http
            .post(&url)
            .bearer_auth(&shared.identity.credential)
            .timeout(interval.max(Duration::from_secs(2)))
            .json(&heartbeat(&shared))
            .send()
            .await;
        match result {
            Ok(response) if response.status().is_success() => {
                if let Ok(ack) = response.json::<HeartbeatAck>().await
                    && ack.drain != drain_logged
                {
                    drain_logged = ack.drain;
                    tracing::info!(
                        drained = ack.drain,
                        "the gateway's admin changed this rig's drain"
                    );
                }
            }
            Ok(response) if matches!(response.status().as_u16(), 401 | 403) => {
                tracing::error!("the gateway refused this rig's credential: it was removed");
                shared.revoked.cancel();
                return;
            }
            Ok(response) => {
                tracing::warn!(status = response.status().as_u16(), "heartbeat refused")
            }
            Err(err) => tracing::warn!(error = %err, "heartbeat failed; retrying"),
        }
    }
}

/// Reconnect backoff: quick at first (a gateway restart), capped so a long outage costs little.
const RECONNECT_MIN: Duration = Duration::from_millis(250);
const RECONNECT_MAX: Duration = Duration::from_secs(30);
/// A tunnel that stayed up this long resets the backoff.
const STABLE_TUNNEL: Duration = Duration::from_secs(10);

async fn tunnel_loop(shared: Arc<Shared>, stop: CancellationToken, drain_timeout: Duration) {
    let mut backoff = RECONNECT_MIN;
    loop {
        if stop.is_cancelled() || shared.revoked.is_cancelled() {
            return;
        }
        let opened = Instant::now();
        match run_tunnel(&shared, &stop, drain_timeout).await {
            Ok(()) if stop.is_cancelled() => return,
            Ok(()) => tracing::warn!("tunnel closed by the gateway; reconnecting"),
            Err(TunnelError::Refused) => {
                tracing::error!("the gateway refused this rig's credential: it was removed");
                shared.revoked.cancel();
                return;
            }
            Err(TunnelError::Failed(message)) => {
                tracing::warn!(error = %message, "tunnel failed; reconnecting")
            }
        }
        if opened.elapsed() > STABLE_TUNNEL {
            backoff = RECONNECT_MIN;
        }
        // Full jitter, so a gateway restart is not met by every rig at the same instant.
        let wait = backoff.mul_f64(rand::rng().random_range(0.5..=1.0));
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        backoff = (backoff * 2).min(RECONNECT_MAX);
    }
}

enum TunnelError {
    Refused,
    Failed(String),
}

/// One tunnel connection: upgrade, then serve HTTP/2 on it until it closes or we drain.
async fn run_tunnel(
    shared: &Arc<Shared>,
    stop: &CancellationToken,
    drain_timeout: Duration,
) -> Result<(), TunnelError> {
    let url = format!("{}{CONNECT_PATH}", shared.identity.gateway_url);
    let response = shared
        .http
        .get(&url)
        .bearer_auth(&shared.identity.credential)
        .header(http::header::CONNECTION, "upgrade")
        .header(http::header::UPGRADE, TUNNEL_PROTOCOL)
        .send()
        .await
        .map_err(|e| TunnelError::Failed(e.to_string()))?;
    match response.status().as_u16() {
        101 => {}
        401 | 403 => return Err(TunnelError::Refused),
        status => return Err(TunnelError::Failed(format!("gateway answered {status}"))),
    }
    let upgraded = response
        .upgrade()
        .await
        .map_err(|e| TunnelError::Failed(e.to_string()))?;
    tracing::info!(node = %shared.identity.node_id, "tunnel open");
    shared.tunnel_opened.notify_one();
    let service_state = Arc::clone(shared);
    let service = hyper::service::service_fn(move |request| {
        let shared = Arc::clone(&service_state);
        async move { Ok::<_, Infallible>(serve(&shared, request).await) }
    });
    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(upgraded), service);
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => result.map_err(|e| TunnelError::Failed(e.to_string())),
        _ = stop.cancelled() => {
            // GOAWAY: the gateway sends nothing new; streams under way run to their end.
            connection.as_mut().graceful_shutdown();
            match tokio::time::timeout(drain_timeout, connection).await {
                Ok(_) => tracing::info!("tunnel drained"),
                Err(_) => tracing::warn!("drain timeout: closing the tunnel with requests in flight"),
            }
            Ok(())
        }
    }
}

type TunnelBody = BoxBody<Bytes, std::io::Error>;

/// An OpenAI-shaped error answer; 503 makes the gateway try another rig.
fn error_response(status: u16, message: &str) -> http::Response<TunnelBody> {
    let body =
        garage_node_protocol::ErrorBody::new(message, "server_error", Some("rig_unavailable"));
    let mut response = http::Response::new(
        Full::new(Bytes::from(body.to_json()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() =
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::SERVICE_UNAVAILABLE);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

#[derive(Deserialize)]
struct ModelOnly {
    #[serde(default)]
    model: Option<String>,
}

/// Answers one request from the gateway with the local engine that serves its model.
async fn serve(shared: &Shared, request: http::Request<Incoming>) -> http::Response<TunnelBody> {
    if shared.draining.load(Ordering::Relaxed) {
        return error_response(503, "This rig is shutting down.");
    }
    let (parts, body) = request.into_parts();
    let body = match body.collect().await {
        Ok(body) => body.to_bytes(),
        Err(err) => return error_response(400, &format!("unreadable request body: {err}")),
    };
    let model = serde_json::from_slice::<ModelOnly>(&body)
        .ok()
        .and_then(|m| m.model)
        .unwrap_or_default();
    let Some(base) = shared.engines.base_url_for(&model) else {
        return error_response(
            503,
            &format!("No healthy engine on this rig serves `{model}`."),
        );
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut forward = shared
        .local
        .request(parts.method, format!("{base}{path}"))
        .body(body);
    for name in [
        http::header::CONTENT_TYPE,
        http::HeaderName::from_static("x-request-id"),
    ] {
        if let Some(value) = parts.headers.get(&name) {
            forward = forward.header(name, value);
        }
    }
    let response = match forward.send().await {
        Ok(response) => response,
        Err(err) => return error_response(503, &format!("the local engine failed: {err}")),
    };
    let status = response.status();
    let content_type = response.headers().get(http::header::CONTENT_TYPE).cloned();
    // Frame by frame, as the engine produces them: the gateway forwards them the same way.
    let stream = response
        .bytes_stream()
        .map_ok(Frame::data)
        .map_err(std::io::Error::other);
    let mut answer = http::Response::new(BodyExt::boxed(StreamBody::new(stream)));
    *answer.status_mut() = status;
    if let Some(ct) = content_type {
        answer.headers_mut().insert(http::header::CONTENT_TYPE, ct);
    }
    answer
}
