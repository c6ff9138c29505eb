//! Rigs: enrollment, node credentials, the tunnels they open to us, their heartbeats, and the
//! backends they become.
//!
//! A rig's tunnel lives on the replica it connected to. Every replica can enroll rigs, take
//! their heartbeats (relayed through the store's events to the tunnel's replica) and list
//! them; with a cluster configured, every replica routes to every rig, through the replica
//! that holds its tunnel ([`remote`], [`crate::cluster`]).

mod admin;
pub mod api;
mod challenge;
mod enroll;
pub use challenge::Verdict;
pub mod hardware;
mod heartbeat;
pub mod operator_api;
pub mod operators;
pub mod receipts;
mod remote;
pub mod trust;
mod tunnel;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use garage_node_protocol::{EnrollRequest, EnrollResponse, Heartbeat, HeartbeatAck};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;
use utoipa::ToSchema;

use crate::backends::{Backend, Backends, RigInfo, RigLoad, Transport};
use crate::config::NodesConfig;
use crate::error::ApiError;
use crate::keys::{KeyHasher, bearer, random_token, unix_now};
use crate::store::keyspace::{
    ENROLLMENT_TOKENS as TOKEN_KIND, NODES as NODE_KIND, enrollment_uses, node_live,
};
use crate::store::{Store, StoreError, StoreEvent};
use crate::upstream::RequestBody;

/// How long the last heartbeat of a rig is kept for the admin API after it went silent.
const LIVE_RECORD_TTL: Duration = Duration::from_secs(3600);
/// HTTP/2 pings on every tunnel: home routers drop idle NAT mappings after a minute or two, and a
/// rig that lost power sends no FIN, so an unanswered ping is how we notice it went away.
const TUNNEL_PING_INTERVAL: Duration = Duration::from_secs(15);
const TUNNEL_PING_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a heartbeat that came before its rig's tunnel attached here stays usable.
const EARLY_HEARTBEAT_TTL: Duration = Duration::from_secs(10);

/// A rig as the store keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: String,
    pub name: String,
    pub operator: String,
    /// HMAC of the node credential's secret part.
    pub credential_hash: String,
    pub enrolled_at: u64,
    pub revoked_at: Option<u64>,
    /// An admin took it out of routing.
    pub drained: bool,
    pub version: String,
    /// Failed its checks (see [`trust`]): out of routing, without the rig being told, until
    /// an admin reinstates it.
    #[serde(default)]
    pub quarantined: bool,
    /// The operator vouches for this rig: spot checks of its model compare with it first
    /// (see [`challenge`]).
    #[serde(default)]
    pub reference: bool,
    /// The Ed25519 key (base64) the rig signs its receipts with (see [`receipts`]); `None` for
    /// a rig enrolled by a node-runner from before receipts, until it registers one.
    #[serde(default)]
    pub receipt_key: Option<String>,
}

/// An enrollment token as the store keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TokenRecord {
    id: String,
    hash: String,
    operator: String,
    created_at: u64,
    expires_at: u64,
    max_uses: u32,
}

/// The last heartbeat of a rig, as the store keeps it for every replica to list.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LiveRecord {
    received_at: u64,
    heartbeat: Heartbeat,
}

/// A rig as the admin API shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct NodeInfo {
    pub id: String,
    pub name: String,
    /// Who the rig's rewards go to.
    pub operator: String,
    /// Unix seconds.
    pub enrolled_at: u64,
    pub revoked: bool,
    /// An admin took the rig out of routing.
    pub drained: bool,
    /// The operator vouches for it: spot checks of its model are compared with it first.
    pub reference: bool,
    /// The rig holds a tunnel to this gateway replica.
    pub connected: bool,
    /// In routing on this replica right now (connected, heartbeating, serving models).
    pub routable: bool,
    /// Models its healthy engines serve.
    pub models: Vec<String>,
    /// The replica that holds the rig's tunnel, as this replica knows it (with a cluster).
    pub replica: Option<String>,
    /// Unix seconds of the last heartbeat any replica received.
    pub last_heartbeat_at: Option<u64>,
    /// The last heartbeat: GPUs and engines with their stats.
    pub heartbeat: Option<Heartbeat>,
    /// What the gateway's checks found (see docs/trust.md).
    pub trust: trust::Trust,
    /// The GPUs it reports against the speed measured on it: flagged `implausible` when they do
    /// not fit (see [`hardware`]).
    pub hardware: hardware::Hardware,
    pub version: String,
}

/// A new enrollment token.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateEnrollmentToken {
    /// The operator whose rigs enroll with it (their rewards go there).
    pub operator: String,
    /// Lifetime in seconds; the gateway's default when omitted.
    #[serde(default)]
    pub expires_in_secs: Option<u64>,
    /// How many rigs may enroll with it (default 1).
    #[serde(default)]
    pub max_uses: Option<u32>,
}

/// An enrollment token just created: the secret is in this response only.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
pub struct CreatedEnrollmentToken {
    /// Give this to the rig (`enrollment_token` in node-runner's config).
    pub token: String,
    pub id: String,
    pub operator: String,
    /// Unix seconds.
    pub expires_at: u64,
    pub max_uses: u32,
}

/// A rig with a tunnel to this replica.
struct Tunnel {
    /// Tells a reconnect apart from the connection it replaced.
    generation: u64,
    record: NodeRecord,
    sender: hyper::client::conn::http2::SendRequest<RequestBody>,
    close: CancellationToken,
    last_heartbeat: Option<Instant>,
    /// The last heartbeat itself: its GPUs and engines for `/metrics`, and with a cluster, to
    /// advertise the rig again to a replica that asks.
    last_report: Option<Heartbeat>,
    /// Models of the backend currently in routing (empty: not routed).
    routed_models: Vec<String>,
    /// The rig's labels, from its last heartbeat.
    labels: Vec<(String, String)>,
    /// The rig said it is shutting down, or an admin drained it.
    draining: bool,
    backend: Option<Arc<Backend>>,
    silent_logged: bool,
    /// Milliseconds the rig was routable since its last report (sampled every second).
    routable_ms: u64,
    /// GPUs in its last heartbeat.
    gpus: u32,
}

/// A rig's availability over a report period, for uptime rewards.
#[derive(Debug, Clone, PartialEq)]
pub struct Availability {
    pub node_id: String,
    pub operator: String,
    pub uptime_ms: u64,
    pub gpus: u32,
}

pub struct Nodes {
    store: Arc<dyn Store>,
    hasher: KeyHasher,
    backends: Arc<Backends>,
    config: NodesConfig,
    tunnels: Mutex<HashMap<String, Tunnel>>,
    /// Heartbeats of rigs with no tunnel attached here, by node id, when they came. A rig
    /// heartbeats as soon as its side of the tunnel is open, which can beat this side's
    /// HTTP/2 handshake: that heartbeat is applied when the tunnel attaches, instead of the
    /// rig waiting out a whole interval for its next one. (Also the heartbeats of rigs whose
    /// tunnel is on another replica; dropped once stale.) Locked only under `tunnels`.
    early_heartbeats: Mutex<HashMap<String, (Instant, Heartbeat)>>,
    generations: std::sync::atomic::AtomicU64,
    /// Closes every tunnel at shutdown.
    shutdown: CancellationToken,
    /// The other replicas, when several act as one.
    cluster: Option<Arc<crate::cluster::Cluster>>,
    /// Rigs tunnelled to other replicas, by node id. Locked only under `tunnels`.
    remote: Mutex<HashMap<String, remote::Remote>>,
    /// Events for the other replicas, published in order by [`Nodes::publish_adverts`].
    outbox: Option<tokio::sync::mpsc::UnboundedSender<StoreEvent>>,
    outbox_rx: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<StoreEvent>>>,
    /// Checks of rigs, by kind and outcome.
    checks: prometheus::IntCounterVec,
    /// Rigs' receipt keys and statements.
    receipts: receipts::ReceiptState,
    /// Every rig's trust status, as the store's events tell it (loaded at start).
    trust_cache: Mutex<HashMap<String, trust::TrustStatus>>,
    /// Held while a trust record is read, changed and written back: checks that end together
    /// on this replica (disputed requests, replays) are all counted.
    trust_update: tokio::sync::Mutex<()>,
}

fn corrupt(err: serde_json::Error) -> StoreError {
    StoreError::Corrupt(err.to_string())
}

/// Splits `{id}.{secret}`.
fn split_credential(credential: &str) -> Option<(&str, &str)> {
    credential
        .split_once('.')
        .filter(|(id, secret)| !id.is_empty() && !secret.is_empty())
}

fn hashes_match(a: &str, b: &str) -> bool {
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

impl Nodes {
    pub fn new(
        store: Arc<dyn Store>,
        hasher: KeyHasher,
        backends: Arc<Backends>,
        config: NodesConfig,
        cluster: Option<Arc<crate::cluster::Cluster>>,
    ) -> Arc<Self> {
        let (outbox, outbox_rx) = match cluster {
            Some(_) => {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                (Some(tx), Some(rx))
            }
            None => (None, None),
        };
        Arc::new(Nodes {
            cluster,
            remote: Mutex::new(HashMap::new()),
            outbox,
            outbox_rx: Mutex::new(outbox_rx),
            receipts: receipts::ReceiptState::new(),
            trust_cache: Mutex::new(HashMap::new()),
            trust_update: tokio::sync::Mutex::new(()),
            checks: prometheus::IntCounterVec::new(
                prometheus::Opts::new(
                    "garage_rig_checks_total",
                    "Checks of rigs (docs/trust.md), by kind (spot_check, usage, receipt) and \
                     outcome (passed, failed, inconclusive)",
                ),
                &["kind", "outcome"],
            )
            .unwrap_or_else(|e| unreachable!("static metric definition: {e}")),
            store,
            hasher,
            backends,
            config,
            tunnels: Mutex::new(HashMap::new()),
            early_heartbeats: Mutex::new(HashMap::new()),
            generations: std::sync::atomic::AtomicU64::new(1),
            shutdown: CancellationToken::new(),
        })
    }

    fn tunnels(&self) -> std::sync::MutexGuard<'_, HashMap<String, Tunnel>> {
        self.tunnels.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn early_heartbeats(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, Heartbeat)>> {
        self.early_heartbeats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    // ---- store helpers ------------------------------------------------------------------

    async fn put<T: Serialize>(&self, kind: &str, id: &str, value: &T) -> Result<(), StoreError> {
        let json = serde_json::to_vec(value).map_err(corrupt)?;
        self.store.record_put(kind, id, &json).await
    }

    async fn get<T: for<'de> Deserialize<'de>>(
        &self,
        kind: &str,
        id: &str,
    ) -> Result<Option<T>, StoreError> {
        match self.store.record_get(kind, id).await? {
            Some(bytes) => Ok(Some(serde_json::from_slice(&bytes).map_err(corrupt)?)),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use garage_node_protocol::{EngineState, EngineStatus};

    fn nodes() -> Arc<Nodes> {
        Nodes::new(
            Arc::new(crate::store::MemoryStore::new()),
            KeyHasher::new(b"secret"),
            Arc::new(Backends::empty()),
            NodesConfig::default(),
            None,
        )
    }

    fn record(id: &str) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            name: id.into(),
            operator: "op".into(),
            credential_hash: String::new(),
            enrolled_at: 0,
            revoked_at: None,
            drained: false,
            version: String::new(),
            quarantined: false,
            reference: false,
            receipt_key: None,
        }
    }

    fn serving(model: &str) -> Heartbeat {
        Heartbeat {
            engines: vec![EngineStatus {
                name: "e".into(),
                models: vec![model.into()],
                state: EngineState::Healthy,
                restarts: 0,
                stats: None,
                members: Vec::new(),
            }],
            ..Heartbeat::default()
        }
    }

    /// The gateway's end of a real HTTP/2 connection, to a server that answers nothing.
    async fn tunnel_sender() -> hyper::client::conn::http2::SendRequest<RequestBody> {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        tokio::spawn(
            hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(
                hyper_util::rt::TokioIo::new(theirs),
                hyper::service::service_fn(|_| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(RequestBody::default()))
                }),
            ),
        );
        let (sender, connection) = hyper::client::conn::http2::handshake(
            TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(ours),
        )
        .await
        .expect("HTTP/2 handshake");
        tokio::spawn(connection);
        sender
    }

    fn routed(nodes: &Nodes, model: &str) -> Vec<String> {
        nodes
            .backends
            .snapshot()
            .candidates(model)
            .map(|c| c.iter().map(|b| b.id.clone()).collect())
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn a_heartbeat_that_beat_the_tunnel_routes_the_rig_when_it_attaches() {
        let nodes = nodes();
        // The rig's first heartbeat arrives while this side's handshake is still going.
        assert!(!nodes.apply_heartbeat("rig-1", serving("m")));
        assert!(routed(&nodes, "m").is_empty());
        nodes.attach(
            record("rig-1"),
            tunnel_sender().await,
            1,
            CancellationToken::new(),
        );
        assert_eq!(routed(&nodes, "m"), ["rig-1"]);
        assert!(nodes.early_heartbeats().is_empty());
    }

    #[tokio::test]
    async fn a_stale_early_heartbeat_is_not_applied() {
        let nodes = nodes();
        let long_ago = Instant::now()
            .checked_sub(EARLY_HEARTBEAT_TTL + Duration::from_secs(1))
            .expect("a monotonic clock this far along");
        nodes
            .early_heartbeats()
            .insert("rig-1".into(), (long_ago, serving("m")));
        nodes.attach(
            record("rig-1"),
            tunnel_sender().await,
            1,
            CancellationToken::new(),
        );
        assert!(routed(&nodes, "m").is_empty());
        // The rig's next heartbeat routes it as usual.
        assert!(nodes.apply_heartbeat("rig-1", serving("m")));
        assert_eq!(routed(&nodes, "m"), ["rig-1"]);
    }
}
