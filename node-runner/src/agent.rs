//! The rig agent: enroll once, then keep a tunnel open to the gateway, answer the requests it
//! sends from the local engines, and report heartbeats; drain on shutdown.
//!
//! A gateway may be several replicas ([`Gateways`]): the tunnel is on one of them at a time, and
//! when it breaks the agent goes to the next replica in its order at once.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::TryStreamExt;
use garage_node_protocol::receipt::SigningKey;
use garage_node_protocol::{
    CONNECT_PATH, DEREGISTER_PATH, ENROLL_PATH, EnrollRequest, EnrollResponse, HEARTBEAT_PATH,
    Heartbeat, HeartbeatAck, RECEIPT_KEY_PATH, ReceiptKey, TUNNEL_PROTOCOL,
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
use crate::gateways::{Gateways, GatewaysError, normalize, split_list};
use crate::gpu::Gpus;
use crate::receipts::{Receipts, SignedBody, Signer, StatementError, StatementReport};

/// The rig's identity, as kept in its state file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeIdentity {
    /// The gateway replica the rig enrolled at (the gateway, when there is one URL).
    pub gateway_url: String,
    /// The replicas the rig was configured with, sorted; the identity is good at any of them,
    /// so a list in another order, or sharing a replica with this one, keeps it. Empty in state
    /// files written before lists existed.
    #[serde(default)]
    pub gateway_urls: Vec<String>,
    pub node_id: String,
    pub credential: String,
    pub operator: String,
    pub heartbeat_interval_secs: u64,
    /// The seed of the rig's Ed25519 receipt key, base64 (see [`crate::receipts`]); absent in
    /// state files written before receipts, and then made and registered at the next start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipt_key: Option<String>,
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
    #[error("bad gateway URL list: {0}")]
    Gateways(#[from] GatewaysError),
    #[error("cannot make or read the rig's receipt key: {0}")]
    ReceiptKey(#[from] garage_node_protocol::receipt::ReceiptError),
}

impl NodeIdentity {
    /// Whether the gateway `configured` names made this identity: one of its URLs is one the
    /// identity was enrolled with.
    fn belongs_to(&self, configured: &[String]) -> bool {
        std::iter::once(&self.gateway_url)
            .chain(&self.gateway_urls)
            .any(|url| configured.contains(&normalize(url)))
    }
}

/// `urls`, sorted: how the state file records the set.
fn sorted(urls: &[String]) -> Vec<String> {
    let mut urls = urls.to_vec();
    urls.sort();
    urls
}

/// How to start an agent.
pub struct AgentOptions {
    /// The gateway's base URL; for several replicas of one gateway, their URLs separated by
    /// commas (`https://a.example,https://b.example`), as in `NODE_RUNNER_GATEWAY_URL`.
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
    /// The gateway's replicas, in this rig's order, and which one holds the tunnel.
    gateways: Arc<Gateways>,
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
    /// Signs every answer's receipt (`None`: the rig signs nothing).
    signer: Option<Arc<Signer>>,
    /// Says so in its heartbeats (a dishonest test rig that withholds receipts says so too).
    signs_batch_lines: bool,
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

/// The identity in a state file, if there is one.
pub(crate) fn read_identity(path: &Path) -> Result<Option<NodeIdentity>, AgentError> {
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

/// The rig's identity: from its state file, or by enrolling with the token at one of the
/// `gateways` (tried in turn, so a replica that is down does not stop a first start).
async fn identity(
    options: &AgentOptions,
    gateways: &Gateways,
    http: &reqwest::Client,
    receipts: Receipts,
) -> Result<NodeIdentity, AgentError> {
    let configured = sorted(gateways.urls());
    if let Some(path) = &options.state_file
        && let Some(mut identity) = read_identity(path)?
    {
        if identity.belongs_to(&configured) {
            let mut changed = false;
            if identity.gateway_urls != configured {
                // Replicas came or went: record the set as it is now, so that the identity
                // still matches once the replicas it was enrolled with are all gone.
                identity.gateway_urls = configured;
                changed = true;
            }
            if receipts.registers_a_key() && identity.receipt_key.is_none() {
                // Enrolled before receipts: a key now, kept before the gateway hears of it.
                identity.receipt_key = Some(SigningKey::generate()?.1);
                changed = true;
            }
            if changed {
                write_identity(path, &identity)?;
            }
            if receipts.registers_a_key() {
                register_receipt_key(&identity, gateways, http).await?;
            }
            return Ok(identity);
        }
        tracing::warn!(state_file = %path.display(), "state file belongs to another gateway; enrolling anew");
    }
    let token = options
        .enrollment_token
        .clone()
        .ok_or(AgentError::NoToken)?;
    let (receipt_key, public_key) = if receipts.registers_a_key() {
        let (key, seed) = SigningKey::generate()?;
        (Some(seed), Some(key.public_key().to_base64()))
    } else {
        (None, None)
    };
    let request = EnrollRequest {
        token,
        name: options.name.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        public_key,
    };
    let unreachable = |source| AgentError::Unreachable {
        url: gateways.urls().join(", "),
        source,
    };
    let (answered, response) = gateways
        .send(|base| {
            http.post(format!("{base}{ENROLL_PATH}"))
                .timeout(ENROLL_TIMEOUT)
                .json(&request)
        })
        .await
        .map_err(unreachable)?;
    let status = response.status();
    let gateway_url = answered.to_owned();
    if !status.is_success() {
        let message = response.text().await.unwrap_or_default();
        return Err(AgentError::EnrollRefused {
            status: status.as_u16(),
            message,
        });
    }
    let enrolled: EnrollResponse = response.json().await.map_err(unreachable)?;
    let identity = NodeIdentity {
        gateway_url,
        gateway_urls: configured,
        node_id: enrolled.node_id,
        credential: enrolled.credential,
        operator: enrolled.operator,
        heartbeat_interval_secs: enrolled.heartbeat_interval_secs,
        receipt_key,
    };
    if let Some(path) = &options.state_file {
        write_identity(path, &identity)?;
    }
    tracing::info!(node = %identity.node_id, operator = %identity.operator, gateway = %identity.gateway_url, "enrolled with the gateway");
    Ok(identity)
}

/// How long one replica may take to answer an enrollment before the next is tried.
const ENROLL_TIMEOUT: Duration = Duration::from_secs(30);

/// Registers the receipt key of a rig that has a credential already (it enrolled before
/// receipts, or its last registration did not get through). The gateway takes a rig's first key
/// and only that one, so asking again with the same key is harmless. Not fatal: a gateway that
/// does not know the key sees answers it cannot check.
async fn register_receipt_key(
    identity: &NodeIdentity,
    gateways: &Gateways,
    http: &reqwest::Client,
) -> Result<(), AgentError> {
    let Some(seed) = &identity.receipt_key else {
        return Ok(());
    };
    let body = ReceiptKey {
        public_key: SigningKey::from_seed(seed)?.public_key().to_base64(),
    };
    let sent = gateways
        .send(|base| {
            http.post(format!("{base}{RECEIPT_KEY_PATH}"))
                .bearer_auth(&identity.credential)
                .timeout(ENROLL_TIMEOUT)
                .json(&body)
        })
        .await;
    match sent {
        Ok((_, response)) if response.status().is_success() => {}
        Ok((_, response)) if response.status() == http::StatusCode::CONFLICT => {
            tracing::error!(
                "the gateway holds another receipt key for this rig: its receipts will be refused \
                 (was the state file replaced?)"
            );
        }
        Ok((_, response)) if matches!(response.status().as_u16(), 401 | 403) => {
            return Err(AgentError::Revoked);
        }
        Ok((_, response)) => tracing::warn!(
            status = response.status().as_u16(),
            "the gateway did not take this rig's receipt key (an older gateway?); answers go unsigned for it"
        ),
        Err(err) => {
            tracing::warn!(error = %err, "cannot register this rig's receipt key; trying again at the next start")
        }
    }
    Ok(())
}

impl Agent {
    /// Enrolls if needed, then starts the tunnel and the heartbeats; every answer is signed.
    pub async fn start(options: AgentOptions, engines: EngineSet) -> Result<Agent, AgentError> {
        Self::start_with(options, engines, Receipts::Signed).await
    }

    /// [`Agent::start`], signing receipts as `receipts` says: a rig from before receipts, or a
    /// dishonest one, for tests of the gateway's checks.
    pub async fn start_with(
        options: AgentOptions,
        engines: EngineSet,
        receipts: Receipts,
    ) -> Result<Agent, AgentError> {
        let http = options.http.clone().unwrap_or_else(http_client);
        let urls = split_list(&options.gateway_url);
        // Before it has an id, the rig's name orders the replicas it tries to enroll at.
        let identity = identity(
            &options,
            &Gateways::new(&urls, &options.name)?,
            &http,
            receipts,
        )
        .await?;
        let signs_batch_lines = identity.receipt_key.is_some() && receipts.claims_batch_receipts();
        let signer = match &identity.receipt_key {
            Some(seed) => Signer::new(&identity.node_id, SigningKey::from_seed(seed)?, receipts),
            None => None,
        };
        let gateways = Arc::new(Gateways::new(&urls, &identity.node_id)?);
        let interval = options
            .heartbeat_interval
            .unwrap_or(Duration::from_secs(identity.heartbeat_interval_secs.max(1)));
        let shared = Arc::new(Shared {
            identity,
            gateways,
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
            signs_batch_lines,
            signer,
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
                gateways: Arc::clone(&shared.gateways),
                credential: shared.identity.credential.clone(),
                http: shared.http.clone(),
                local: shared.local.clone(),
                engines: Arc::clone(&shared.engines),
                revoked: shared.revoked.clone(),
                signer: shared.signer.clone(),
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

    /// The gateway's replicas in this rig's order, and which one holds the tunnel.
    pub fn gateways(&self) -> &Gateways {
        &self.shared.gateways
    }

    /// Fetches the gateway's statement of this rig's requests and checks every receipt in it
    /// against the rig's own key.
    pub async fn check_statement(&self) -> Result<StatementReport, StatementError> {
        check_statement_of(
            &self.shared.identity,
            &self.shared.gateways,
            &self.shared.http,
        )
        .await
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
        let deregistered = shared
            .gateways
            .send(|base| {
                shared
                    .http
                    .post(format!("{base}{DEREGISTER_PATH}"))
                    .bearer_auth(&shared.identity.credential)
                    .timeout(Duration::from_secs(5))
            })
            .await;
        match deregistered {
            Ok((_, r)) if r.status().is_success() => tracing::info!("deregistered; draining"),
            Ok((_, r)) => tracing::warn!(status = r.status().as_u16(), "deregistration refused"),
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

/// [`Agent::check_statement`] for `identity`.
pub(crate) async fn check_statement_of(
    identity: &NodeIdentity,
    gateways: &Gateways,
    http: &reqwest::Client,
) -> Result<StatementReport, StatementError> {
    let seed = identity.receipt_key.as_ref().ok_or(StatementError::NoKey)?;
    let key = SigningKey::from_seed(seed)?.public_key();
    let entries = crate::receipts::fetch_statement(http, gateways, &identity.credential).await?;
    Ok(crate::receipts::check_statement(
        &identity.node_id,
        &key,
        &entries,
    ))
}

fn heartbeat(shared: &Shared) -> Heartbeat {
    let mut gpus = shared.gpus.read();
    if gpus.is_empty() {
        gpus = shared.engines.simulated_gpus();
    }
    Heartbeat {
        gpus,
        engines: shared.engines.statuses(),
        draining: shared.draining.load(Ordering::Relaxed),
        version: env!("CARGO_PKG_VERSION").into(),
        uptime_secs: shared.started.elapsed().as_secs(),
        labels: shared.labels.clone(),
        signs_batch_lines: shared.signs_batch_lines,
    }
}

/// Heartbeats go to the tunnel's replica (the gateway relays one taken elsewhere, but the
/// tunnel's replica routes on it at once), and to the next ones while it cannot be reached.
async fn heartbeat_loop(shared: Arc<Shared>, interval: Duration, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut drain_logged = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
            _ = shared.tunnel_opened.notified() => {}
        }
        let beat = heartbeat(&shared);
        let sent = shared.gateways.send(|base| {
            shared
                .http
                .post(format!("{base}{HEARTBEAT_PATH}"))
                .bearer_auth(&shared.identity.credential)
                // A replica that died with its host never answers: the next one is tried.
                .timeout(interval.max(Duration::from_secs(2)))
                .json(&beat)
        });
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            result = sent => result.map(|(_, response)| response),
        };
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

/// After a tunnel that was up ends, the first reconnect goes out within this (uniformly
/// jittered): its replica most likely died or restarted, and the rig should be serving through
/// another within a second, without every rig of that replica arriving in the same millisecond.
const RECONNECT_AFTER_LOSS: Duration = Duration::from_millis(200);
/// Once every replica failed in a row, the wait before the next round: quick at first (a
/// gateway restart), doubled each round, capped so a long outage costs little.
const RECONNECT_MIN: Duration = Duration::from_millis(250);
const RECONNECT_MAX: Duration = Duration::from_secs(30);
/// A tunnel that stayed up this long resets the backoff. Also at most one quick reconnect per
/// this long: a replica that accepts tunnels and drops them at once meets the backoff, not a
/// tight loop.
const STABLE_TUNNEL: Duration = Duration::from_secs(10);
/// How long a replica may take to take the tunnel (TCP, TLS, the upgrade's answer) before the
/// next one is tried: room for a lost SYN or two and a slow link, and no longer, since a replica
/// that died with its host answers nothing at all.
const TUNNEL_OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 pings from the rig's side of the tunnel. A replica that dies with its host (power,
/// network) sends no FIN or RST: without pings the rig would sit on a dead tunnel until TCP gave
/// up, many minutes later. A ping goes out after `TUNNEL_PING_INTERVAL` without a frame from the
/// gateway, and the tunnel is dropped when its answer takes longer than `TUNNEL_PING_TIMEOUT`:
/// a silent replica is left at most the two together after it last spoke, then the next one is
/// tried. Not shorter: a ping waits behind the answers queued on a rig's slow home uplink, and a
/// tunnel dropped by mistake breaks every stream on it.
const TUNNEL_PING_INTERVAL: Duration = Duration::from_secs(5);
const TUNNEL_PING_TIMEOUT: Duration = Duration::from_secs(5);

/// How one tunnel ended.
enum TunnelEnd {
    /// Drained on `stop`.
    Stopped,
    /// It was open for `up_for`; then the gateway closed it, or the connection broke.
    Lost { up_for: Duration, reason: String },
    /// It did not open: the replica is unreachable, too slow, or did not take the upgrade.
    Failed(String),
    /// The gateway refused the credential.
    Refused,
}

/// When to try the next replica, after a tunnel ended.
struct Reconnect {
    replicas: usize,
    backoff: Duration,
    /// Tunnels that did not open (or did not last) since the last quick reconnect.
    failures: usize,
    last_quick: Option<Instant>,
}

impl Reconnect {
    fn new(replicas: usize) -> Reconnect {
        Reconnect {
            replicas: replicas.max(1),
            backoff: RECONNECT_MIN,
            failures: 0,
            last_quick: None,
        }
    }

    /// The wait before the next attempt, after a tunnel ended at `now`; `up_for` is how long it
    /// had been open, `None` when it did not open.
    fn wait(&mut self, up_for: Option<Duration>, now: Instant) -> Duration {
        if let Some(up_for) = up_for {
            if up_for >= STABLE_TUNNEL {
                self.backoff = RECONNECT_MIN;
            }
            if self
                .last_quick
                .is_none_or(|at| now.duration_since(at) >= STABLE_TUNNEL)
            {
                self.failures = 0;
                self.last_quick = Some(now);
                return RECONNECT_AFTER_LOSS.mul_f64(rand::rng().random_range(0.0..=1.0));
            }
        }
        // The next replica at once, until all of them failed in a row; then a round's backoff,
        // with full jitter, so a gateway restart is not met by every rig at the same instant.
        self.failures += 1;
        if !self.failures.is_multiple_of(self.replicas) {
            return Duration::ZERO;
        }
        let wait = self.backoff.mul_f64(rand::rng().random_range(0.5..=1.0));
        self.backoff = (self.backoff * 2).min(RECONNECT_MAX);
        wait
    }
}

/// Keeps a tunnel open to one replica at a time, going through them in the rig's order.
async fn tunnel_loop(shared: Arc<Shared>, stop: CancellationToken, drain_timeout: Duration) {
    let gateways = Arc::clone(&shared.gateways);
    let mut reconnect = Reconnect::new(gateways.len());
    let mut next = gateways.tunnel_index();
    loop {
        if stop.is_cancelled() || shared.revoked.is_cancelled() {
            return;
        }
        let index = next;
        next = (index + 1) % gateways.len();
        let gateway = gateways.url(index);
        let up_for = match run_tunnel(&shared, index, &stop, drain_timeout).await {
            TunnelEnd::Stopped => return,
            TunnelEnd::Refused => {
                tracing::error!("the gateway refused this rig's credential: it was removed");
                shared.revoked.cancel();
                return;
            }
            TunnelEnd::Lost { up_for, reason } => {
                tracing::warn!(gateway, error = %reason, ?up_for, "tunnel lost; reconnecting");
                Some(up_for)
            }
            TunnelEnd::Failed(reason) => {
                tracing::warn!(gateway, error = %reason, "cannot open a tunnel; reconnecting");
                None
            }
        };
        let wait = reconnect.wait(up_for, Instant::now());
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// One tunnel to the replica at `index`: upgrade, then serve HTTP/2 on it until it closes or we
/// drain.
async fn run_tunnel(
    shared: &Arc<Shared>,
    index: usize,
    stop: &CancellationToken,
    drain_timeout: Duration,
) -> TunnelEnd {
    let gateway = shared.gateways.url(index);
    let open = async {
        let response = shared
            .http
            .get(format!("{gateway}{CONNECT_PATH}"))
            .bearer_auth(&shared.identity.credential)
            .header(http::header::CONNECTION, "upgrade")
            .header(http::header::UPGRADE, TUNNEL_PROTOCOL)
            .send()
            .await
            .map_err(|e| TunnelEnd::Failed(e.to_string()))?;
        match response.status().as_u16() {
            101 => {}
            401 | 403 => return Err(TunnelEnd::Refused),
            status => return Err(TunnelEnd::Failed(format!("gateway answered {status}"))),
        }
        response
            .upgrade()
            .await
            .map_err(|e| TunnelEnd::Failed(e.to_string()))
    };
    let upgraded = tokio::select! {
        _ = stop.cancelled() => return TunnelEnd::Stopped,
        opened = tokio::time::timeout(TUNNEL_OPEN_TIMEOUT, open) => match opened {
            Ok(Ok(upgraded)) => upgraded,
            Ok(Err(end)) => return end,
            Err(_) => {
                return TunnelEnd::Failed(format!(
                    "no tunnel within {}s",
                    TUNNEL_OPEN_TIMEOUT.as_secs()
                ));
            }
        },
    };
    let opened = Instant::now();
    shared.gateways.set_tunnel(index);
    tracing::info!(node = %shared.identity.node_id, gateway, "tunnel open");
    shared.tunnel_opened.notify_one();
    let service_state = Arc::clone(shared);
    let service = hyper::service::service_fn(move |request| {
        let shared = Arc::clone(&service_state);
        async move { Ok::<_, Infallible>(serve(&shared, request).await) }
    });
    let connection = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(TUNNEL_PING_INTERVAL)
        .keep_alive_timeout(TUNNEL_PING_TIMEOUT)
        .serve_connection(TokioIo::new(upgraded), service);
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => TunnelEnd::Lost {
            up_for: opened.elapsed(),
            reason: match result {
                Ok(()) => "closed by the gateway".to_owned(),
                Err(err) => err.to_string(),
            },
        },
        _ = stop.cancelled() => {
            // GOAWAY: the gateway sends nothing new; streams under way run to their end.
            connection.as_mut().graceful_shutdown();
            match tokio::time::timeout(drain_timeout, connection).await {
                Ok(_) => tracing::info!("tunnel drained"),
                Err(_) => tracing::warn!("drain timeout: closing the tunnel with requests in flight"),
            }
            TunnelEnd::Stopped
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
    let request_id = parts
        .headers
        .get("x-request-id")
        .and_then(|id| id.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut forward = shared
        .local
        .request(parts.method, format!("{base}{path}"))
        .body(body);
    // W3C Trace Context passes to the engine as it came: the gateway's dispatch span is the
    // parent of the engine's own (vLLM's --otlp-traces-endpoint).
    for name in [
        http::header::CONTENT_TYPE,
        http::HeaderName::from_static("x-request-id"),
        http::HeaderName::from_static("traceparent"),
        http::HeaderName::from_static("tracestate"),
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
    let stream = StreamBody::new(
        response
            .bytes_stream()
            .map_ok(Frame::data)
            .map_err(std::io::Error::other),
    );
    let body = match &shared.signer {
        Some(signer) => {
            let event_stream = content_type
                .as_ref()
                .is_some_and(|ct| ct.as_bytes().starts_with(b"text/event-stream"));
            BodyExt::boxed(SignedBody::new(
                stream,
                Arc::clone(signer),
                request_id,
                model,
                status.as_u16(),
                event_stream,
            ))
        }
        None => BodyExt::boxed(stream),
    };
    let mut answer = http::Response::new(body);
    *answer.status_mut() = status;
    if let Some(ct) = content_type {
        answer.headers_mut().insert(http::header::CONTENT_TYPE, ct);
    }
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOT_UP: Option<Duration> = None;

    #[test]
    fn a_lost_tunnel_is_reopened_at_once_on_the_next_replica() {
        let now = Instant::now();
        let mut reconnect = Reconnect::new(2);
        // Up for a moment only: still the quick reconnect, the first time.
        let wait = reconnect.wait(Some(Duration::from_millis(30)), now);
        assert!(wait <= RECONNECT_AFTER_LOSS, "{wait:?}");
        // That replica is down too: the next one at once, then a round's backoff.
        assert_eq!(reconnect.wait(NOT_UP, now), Duration::ZERO);
        let wait = reconnect.wait(NOT_UP, now);
        assert!(
            (RECONNECT_MIN / 2..=RECONNECT_MIN).contains(&wait),
            "{wait:?}"
        );
        assert_eq!(reconnect.wait(NOT_UP, now), Duration::ZERO);
        let wait = reconnect.wait(NOT_UP, now);
        assert!(
            (RECONNECT_MIN..=RECONNECT_MIN * 2).contains(&wait),
            "doubled: {wait:?}"
        );
    }

    #[test]
    fn a_replica_that_drops_every_tunnel_meets_the_backoff() {
        let now = Instant::now();
        let mut reconnect = Reconnect::new(1);
        let brief = Some(Duration::from_millis(5));
        assert!(reconnect.wait(brief, now) <= RECONNECT_AFTER_LOSS);
        // Dropped again within STABLE_TUNNEL: no second quick reconnect, but doubling waits.
        let mut longest = Duration::ZERO;
        for round in 0..8 {
            let wait = reconnect.wait(brief, now + Duration::from_secs(1));
            let floor = (RECONNECT_MIN * 2u32.pow(round)).min(RECONNECT_MAX) / 2;
            assert!(wait >= floor, "round {round}: {wait:?}");
            assert!(wait <= RECONNECT_MAX);
            longest = longest.max(wait);
        }
        assert!(longest >= RECONNECT_MAX / 2, "capped at {longest:?}");
        // A tunnel that lasted resets the backoff, and the next loss is quick again.
        let wait = reconnect.wait(Some(STABLE_TUNNEL), now + STABLE_TUNNEL * 2);
        assert!(wait <= RECONNECT_AFTER_LOSS, "{wait:?}");
        let wait = reconnect.wait(NOT_UP, now + STABLE_TUNNEL * 2);
        assert!(wait <= RECONNECT_MIN, "reset: {wait:?}");
    }
}
