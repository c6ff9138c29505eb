//! Rigs: enrollment, node credentials, the tunnels they open to us, their heartbeats, and the
//! backends they become.
//!
//! A rig's tunnel lives on the replica it connected to; only that replica routes to it. Every
//! replica can enroll rigs, take their heartbeats (relayed through the store's events to the
//! tunnel's replica) and list them.

pub mod api;

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
    /// The rig holds a tunnel to this gateway replica.
    pub connected: bool,
    /// In routing on this replica right now (connected, heartbeating, serving models).
    pub routable: bool,
    /// Models its healthy engines serve.
    pub models: Vec<String>,
    /// Unix seconds of the last heartbeat any replica received.
    pub last_heartbeat_at: Option<u64>,
    /// The last heartbeat: GPUs and engines with their stats.
    pub heartbeat: Option<Heartbeat>,
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
    ) -> Arc<Self> {
        Arc::new(Nodes {
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

    // ---- enrollment ---------------------------------------------------------------------

    pub async fn create_enrollment_token(
        &self,
        request: CreateEnrollmentToken,
    ) -> Result<CreatedEnrollmentToken, ApiError> {
        if request.operator.trim().is_empty() {
            return Err(ApiError::bad_request(
                "operator must not be empty",
                Some("operator"),
            ));
        }
        let id = format!("enr_{}", random_token(16));
        let secret = random_token(40);
        let now = unix_now();
        let record = TokenRecord {
            id: id.clone(),
            hash: self.hasher.hash(&secret),
            operator: request.operator,
            created_at: now,
            expires_at: now
                + request
                    .expires_in_secs
                    .unwrap_or(self.config.enrollment_token_ttl_secs),
            max_uses: request.max_uses.unwrap_or(1).max(1),
        };
        self.put(TOKEN_KIND, &id, &record).await?;
        Ok(CreatedEnrollmentToken {
            token: format!("{id}.{secret}"),
            id,
            operator: record.operator,
            expires_at: record.expires_at,
            max_uses: record.max_uses,
        })
    }

    /// Trades an enrollment token for a node identity.
    pub async fn enroll(&self, request: EnrollRequest) -> Result<EnrollResponse, ApiError> {
        let refused = || ApiError::Unauthorized("Invalid or expired enrollment token.".into());
        let (token_id, secret) = split_credential(&request.token).ok_or_else(refused)?;
        let token: TokenRecord = self.get(TOKEN_KIND, token_id).await?.ok_or_else(refused)?;
        if !hashes_match(&token.hash, &self.hasher.hash(secret)) || token.expires_at <= unix_now() {
            return Err(refused());
        }
        // Counted in the store so that uses add up across replicas.
        let ttl = Duration::from_secs(token.expires_at.saturating_sub(unix_now()).max(1));
        let uses = self
            .store
            .kv_incr(&enrollment_uses(token_id), 1, Some(ttl))
            .await?;
        if uses > i64::from(token.max_uses) {
            return Err(ApiError::Unauthorized(
                "This enrollment token has been used up.".into(),
            ));
        }
        let id = format!("node_{}", random_token(16));
        let secret = random_token(40);
        let name = if request.name.trim().is_empty() {
            id.clone()
        } else {
            request.name
        };
        let record = NodeRecord {
            id: id.clone(),
            name,
            operator: token.operator.clone(),
            credential_hash: self.hasher.hash(&secret),
            enrolled_at: unix_now(),
            revoked_at: None,
            drained: false,
            version: request.version,
        };
        self.put(NODE_KIND, &id, &record).await?;
        tracing::info!(node = %id, name = %record.name, operator = %record.operator, "rig enrolled");
        Ok(EnrollResponse {
            node_id: id.clone(),
            credential: format!("{id}.{secret}"),
            operator: token.operator,
            heartbeat_interval_secs: self.config.heartbeat_interval().as_secs(),
        })
    }

    /// The rig behind a request's node credential: 401 when unknown, 403 when revoked.
    pub async fn authenticate(&self, headers: &http::HeaderMap) -> Result<NodeRecord, ApiError> {
        let refused = || ApiError::Unauthorized("Invalid node credential.".into());
        let credential = bearer(headers).ok_or_else(refused)?;
        let (id, secret) = split_credential(credential).ok_or_else(refused)?;
        let record: NodeRecord = self.get(NODE_KIND, id).await?.ok_or_else(refused)?;
        if !hashes_match(&record.credential_hash, &self.hasher.hash(secret)) {
            return Err(refused());
        }
        if record.revoked_at.is_some() {
            return Err(ApiError::Forbidden {
                message: "This rig has been removed by the gateway's admin.".into(),
                code: "node_revoked",
            });
        }
        Ok(record)
    }

    // ---- tunnels ------------------------------------------------------------------------

    /// Takes over an upgraded connection as the rig's tunnel: HTTP/2 with us as the client.
    pub fn spawn_tunnel(self: &Arc<Self>, record: NodeRecord, on_upgrade: OnUpgrade) {
        let nodes = Arc::clone(self);
        let close = self.shutdown.child_token();
        let generation = self
            .generations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Owned through `close`, a child of the registry's shutdown token.
        tokio::spawn({
            let close = close.clone();
            async move {
                let upgraded = match on_upgrade.await {
                    Ok(upgraded) => upgraded,
                    Err(err) => {
                        tracing::warn!(node = %record.id, error = %err, "tunnel upgrade failed");
                        return;
                    }
                };
                let handshake = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .keep_alive_interval(TUNNEL_PING_INTERVAL)
                    .keep_alive_timeout(TUNNEL_PING_TIMEOUT)
                    .keep_alive_while_idle(true)
                    .handshake(upgraded)
                    .await;
                let (sender, connection) = match handshake {
                    Ok(pair) => pair,
                    Err(err) => {
                        tracing::warn!(node = %record.id, error = %err, "tunnel handshake failed");
                        return;
                    }
                };
                let id = record.id.clone();
                nodes.attach(record, sender, generation, close.clone());
                tokio::select! {
                    result = connection => {
                        if let Err(err) = result {
                            tracing::info!(node = %id, error = %err, "tunnel closed");
                        } else {
                            tracing::info!(node = %id, "tunnel closed");
                        }
                    }
                    _ = close.cancelled() => tracing::info!(node = %id, "tunnel closed by the gateway"),
                }
                nodes.detach(&id, generation);
            }
        });
    }

    fn attach(
        &self,
        record: NodeRecord,
        sender: hyper::client::conn::http2::SendRequest<RequestBody>,
        generation: u64,
        close: CancellationToken,
    ) {
        let id = record.id.clone();
        let drained = record.drained;
        let mut tunnels = self.tunnels();
        let previous = tunnels.insert(
            id.clone(),
            Tunnel {
                generation,
                record,
                sender,
                close,
                last_heartbeat: None,
                routed_models: Vec::new(),
                labels: Vec::new(),
                draining: drained,
                backend: None,
                silent_logged: false,
                routable_ms: 0,
                gpus: 0,
            },
        );
        // Taken under the tunnels' lock, as heartbeats are stashed: none falls in between.
        let early = self
            .early_heartbeats()
            .remove(&id)
            .filter(|(at, _)| at.elapsed() < EARLY_HEARTBEAT_TTL);
        drop(tunnels);
        if let Some(previous) = previous {
            // The rig reconnected before we noticed its old connection die.
            previous.close.cancel();
            self.backends.remove(&id);
        }
        tracing::info!(node = %id, "rig connected");
        if let Some((_, heartbeat)) = early {
            self.apply_heartbeat(&id, heartbeat);
        }
    }

    fn detach(&self, id: &str, generation: u64) {
        let mut tunnels = self.tunnels();
        if tunnels.get(id).is_some_and(|t| t.generation == generation) {
            tunnels.remove(id);
            drop(tunnels);
            self.backends.remove(id);
            tracing::info!(node = %id, "rig disconnected; out of routing");
        }
    }

    /// Closes every tunnel (gateway shutdown, after in-flight requests finished).
    pub fn close_all(&self) {
        self.shutdown.cancel();
    }

    // ---- heartbeats ---------------------------------------------------------------------

    pub async fn heartbeat(
        &self,
        record: &NodeRecord,
        heartbeat: Heartbeat,
    ) -> Result<HeartbeatAck, ApiError> {
        let live = LiveRecord {
            received_at: unix_now(),
            heartbeat: heartbeat.clone(),
        };
        let json = serde_json::to_vec(&live).map_err(|e| ApiError::Internal(e.to_string()))?;
        self.store
            .kv_set(&node_live(&record.id), &json, Some(LIVE_RECORD_TTL))
            .await?;
        let here = self.apply_heartbeat(&record.id, heartbeat.clone());
        if !here {
            // The tunnel may be on another replica: relay it there.
            self.store
                .publish(&StoreEvent::NodeHeartbeat {
                    id: record.id.clone(),
                    heartbeat,
                })
                .await?;
        }
        Ok(HeartbeatAck {
            drain: record.drained,
            tunnel_connected: here,
        })
    }

    /// Applies a heartbeat to the rig's tunnel if it is on this replica; false if it is not.
    fn apply_heartbeat(&self, id: &str, heartbeat: Heartbeat) -> bool {
        let mut tunnels = self.tunnels();
        let Some(tunnel) = tunnels.get_mut(id) else {
            self.early_heartbeats()
                .insert(id.to_owned(), (Instant::now(), heartbeat));
            return false;
        };
        tunnel.last_heartbeat = Some(Instant::now());
        tunnel.gpus = heartbeat.gpus.len() as u32;
        if tunnel.silent_logged {
            tracing::info!(node = %id, "rig heartbeats resumed; back in routing");
            tunnel.silent_logged = false;
        }
        tunnel.draining = heartbeat.draining || tunnel.record.drained;
        let models = if tunnel.draining {
            Vec::new()
        } else {
            heartbeat.serving_models()
        };
        let labels: Vec<(String, String)> = heartbeat.labels.clone().into_iter().collect();
        if models != tunnel.routed_models || labels != tunnel.labels || tunnel.backend.is_none() {
            tunnel.labels = labels;
            self.route(tunnel, models);
        } else if let Some(backend) = &tunnel.backend {
            backend.set_probe(true);
        }
        if let Some(backend) = &tunnel.backend {
            backend
                .load
                .store(Arc::new(RigLoad::from_heartbeat(&heartbeat)));
        }
        true
    }

    /// Puts the rig's backend in routing with `models`, or takes it out when there are none.
    fn route(&self, tunnel: &mut Tunnel, models: Vec<String>) {
        let id = tunnel.record.id.clone();
        if models.is_empty() {
            if tunnel.backend.take().is_some() {
                self.backends.remove(&id);
                tracing::info!(node = %id, "rig out of routing");
            }
        } else {
            let backend = Arc::new(Backend::new(
                id.clone(),
                models.clone(),
                Transport::Tunnel(tunnel.sender.clone()),
                Some(RigInfo {
                    node_id: id.clone(),
                    operator: tunnel.record.operator.clone(),
                    labels: tunnel.labels.clone(),
                }),
                self.backends.origin(),
            ));
            self.backends.upsert(Arc::clone(&backend));
            tunnel.backend = Some(backend);
            tracing::info!(node = %id, models = ?models, "rig in routing");
        }
        tunnel.routed_models = models;
    }

    /// The rig is shutting down: no new requests; in-flight ones finish over the tunnel.
    pub fn deregister(&self, id: &str) {
        if let Some(tunnel) = self.tunnels().get_mut(id) {
            tunnel.draining = true;
            self.route(tunnel, Vec::new());
        }
    }

    /// Takes silent rigs out of routing and puts them back when they speak again, forever.
    pub async fn watch_heartbeats(self: Arc<Self>) {
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        let deadline = self.config.heartbeat_deadline();
        loop {
            ticker.tick().await;
            let mut tunnels = self.tunnels();
            self.early_heartbeats()
                .retain(|_, (at, _)| at.elapsed() < EARLY_HEARTBEAT_TTL);
            for (id, tunnel) in tunnels.iter_mut() {
                let silent = tunnel
                    .last_heartbeat
                    .is_none_or(|at| at.elapsed() > deadline);
                if let Some(backend) = &tunnel.backend
                    && silent
                    && backend.is_healthy()
                {
                    backend.set_probe(false);
                }
                if tunnel.backend.as_ref().is_some_and(|b| b.is_healthy()) {
                    tunnel.routable_ms += 1000;
                }
                if silent && tunnel.last_heartbeat.is_some() && !tunnel.silent_logged {
                    tunnel.silent_logged = true;
                    tracing::warn!(node = %id, "rig missed its heartbeats; out of routing");
                }
            }
        }
    }

    /// Each connected rig's routable time since the last call, which starts a new period.
    pub fn take_availability(&self) -> Vec<Availability> {
        self.tunnels()
            .values_mut()
            .map(|tunnel| Availability {
                node_id: tunnel.record.id.clone(),
                operator: tunnel.record.operator.clone(),
                uptime_ms: std::mem::take(&mut tunnel.routable_ms),
                gpus: tunnel.gpus,
            })
            .collect()
    }

    /// Follows other replicas' changes: relayed heartbeats, drains and removals.
    pub async fn follow_events(self: Arc<Self>) {
        let mut events = self.store.subscribe();
        loop {
            match events.recv().await {
                Ok(StoreEvent::NodeHeartbeat { id, heartbeat }) => {
                    self.apply_heartbeat(&id, heartbeat);
                }
                Ok(StoreEvent::NodeChanged { id }) => {
                    if let Ok(Some(record)) = self.get::<NodeRecord>(NODE_KIND, &id).await {
                        self.apply_record(record);
                    }
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    fn apply_record(&self, record: NodeRecord) {
        let mut tunnels = self.tunnels();
        let Some(tunnel) = tunnels.get_mut(&record.id) else {
            return;
        };
        if record.revoked_at.is_some() {
            tunnel.close.cancel();
            self.route(tunnel, Vec::new());
            return;
        }
        if record.drained && !tunnel.draining {
            tunnel.draining = true;
            self.route(tunnel, Vec::new());
        }
        tunnel.record = record;
    }

    // ---- admin --------------------------------------------------------------------------

    pub async fn list(&self) -> Result<Vec<NodeInfo>, ApiError> {
        let mut records: Vec<NodeRecord> = self
            .store
            .record_list(NODE_KIND)
            .await?
            .iter()
            .map(|bytes| serde_json::from_slice(bytes).map_err(corrupt))
            .collect::<Result<_, _>>()?;
        records.sort_by(|a, b| (a.enrolled_at, &a.id).cmp(&(b.enrolled_at, &b.id)));
        let mut infos = Vec::with_capacity(records.len());
        for record in records {
            infos.push(self.info(record).await?);
        }
        Ok(infos)
    }

    pub async fn get_info(&self, id: &str) -> Result<NodeInfo, ApiError> {
        let record = self.require(id).await?;
        self.info(record).await
    }

    async fn info(&self, record: NodeRecord) -> Result<NodeInfo, ApiError> {
        let live: Option<LiveRecord> = match self.store.kv_get(&node_live(&record.id)).await? {
            Some(bytes) => serde_json::from_slice(&bytes).ok(),
            None => None,
        };
        let (connected, routable) = match self.tunnels().get(&record.id) {
            Some(tunnel) => (
                true,
                tunnel.backend.as_ref().is_some_and(|b| b.is_healthy()),
            ),
            None => (false, false),
        };
        Ok(NodeInfo {
            models: live
                .as_ref()
                .map(|l| l.heartbeat.serving_models())
                .unwrap_or_default(),
            last_heartbeat_at: live.as_ref().map(|l| l.received_at),
            heartbeat: live.map(|l| l.heartbeat),
            id: record.id,
            name: record.name,
            operator: record.operator,
            enrolled_at: record.enrolled_at,
            revoked: record.revoked_at.is_some(),
            drained: record.drained,
            connected,
            routable,
            version: record.version,
        })
    }

    /// Models the rig serves right now by its own last heartbeat, if that came within the
    /// heartbeat deadline (on any replica: the live record is in the store) and the rig is not
    /// draining. Empty for a rig that never heartbeated, went silent or is draining.
    pub async fn serving_now(&self, id: &str) -> Result<Vec<String>, ApiError> {
        let Some(bytes) = self.store.kv_get(&node_live(id)).await? else {
            return Ok(Vec::new());
        };
        let Ok(live) = serde_json::from_slice::<LiveRecord>(&bytes) else {
            return Ok(Vec::new());
        };
        let fresh = live.received_at + self.config.heartbeat_deadline().as_secs() >= unix_now();
        if !fresh || live.heartbeat.draining {
            return Ok(Vec::new());
        }
        Ok(live.heartbeat.serving_models())
    }

    async fn require(&self, id: &str) -> Result<NodeRecord, ApiError> {
        self.get(NODE_KIND, id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("No rig with id `{id}`.")))
    }

    /// Drains (or resumes) a rig: out of routing until resumed; the rig is told to drain.
    pub async fn set_drained(&self, id: &str, drained: bool) -> Result<NodeInfo, ApiError> {
        let mut record = self.require(id).await?;
        record.drained = drained;
        self.put(NODE_KIND, id, &record).await?;
        self.store
            .publish(&StoreEvent::NodeChanged { id: id.to_owned() })
            .await?;
        if let Some(tunnel) = self.tunnels().get_mut(id) {
            tunnel.record.drained = drained;
            tunnel.draining = drained;
            if drained {
                self.route(tunnel, Vec::new());
            }
            // Resuming puts it back in routing with its next heartbeat.
        }
        tracing::info!(node = %id, drained, "rig drain changed by admin");
        self.get_info(id).await
    }

    /// Removes a rig: its credential is refused from now on and its tunnel closed.
    pub async fn revoke(&self, id: &str) -> Result<NodeInfo, ApiError> {
        let mut record = self.require(id).await?;
        if record.revoked_at.is_none() {
            record.revoked_at = Some(unix_now());
            self.put(NODE_KIND, id, &record).await?;
        }
        self.store
            .publish(&StoreEvent::NodeChanged { id: id.to_owned() })
            .await?;
        self.apply_record(record);
        tracing::info!(node = %id, "rig removed by admin");
        self.get_info(id).await
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
