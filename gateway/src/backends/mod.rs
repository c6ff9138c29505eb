//! Backends: where requests go. Static upstreams from the config today, registered rigs later,
//! all behind one type. The set is an immutable snapshot behind an `ArcSwap`, with a candidate
//! list per model built once, so picking a backend never scans the registry.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use bytes::Bytes;
use http::header;

use crate::config::UpstreamConfig;
use crate::error::ApiError;
use crate::upstream::{
    ConnPool, HttpClient, RequestBody, SendError, UpstreamResponse, send_http, send_tunnel,
};

/// How requests reach a backend.
pub enum Transport {
    /// An OpenAI-compatible base URL, through the pooled HTTP client.
    Url {
        /// The base URL and its inference endpoints.
        endpoints: Box<Endpoints>,
        /// What connects to it (TLS trusting the upstream's CAs) and probes its health; shared
        /// by the upstreams that trust the same CAs.
        client: Arc<HttpClient>,
        /// Idle connections to it.
        pool: Arc<ConnPool>,
        /// `Bearer <api key>`, when the backend wants one.
        authorization: Option<http::HeaderValue>,
        /// Full URL of the health endpoint, when the backend has one.
        health_url: Option<String>,
    },
    /// A rig's tunnel: an HTTP/2 connection the rig opened to this gateway.
    Tunnel(hyper::client::conn::http2::SendRequest<RequestBody>),
    /// A rig tunnelled to another replica, reached through it.
    Peer {
        peer: Arc<crate::cluster::Peer>,
        node: String,
    },
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Transport::Url { endpoints, .. } => write!(f, "Url({})", endpoints.base_url),
            Transport::Tunnel(_) => write!(f, "Tunnel"),
            Transport::Peer { peer, node } => write!(f, "Peer({node} via {})", peer.url()),
        }
    }
}

/// Paths of the inference endpoints under a backend's base URL.
pub const INFERENCE_PATHS: [&str; 8] = [
    "/chat/completions",
    "/completions",
    "/embeddings",
    "/responses",
    "/rerank",
    "/score",
    "/messages",
    "/messages/count_tokens",
];

/// A base URL and the URIs of [`INFERENCE_PATHS`] under it, parsed once instead of formatted and
/// parsed for every request.
pub struct Endpoints {
    /// Including the API version, without a trailing slash.
    base_url: String,
    /// `scheme://authority`, what connections are opened to.
    origin: http::Uri,
    /// The `Host` header of requests sent on our own connections.
    host: Option<http::HeaderValue>,
    /// Each path with its absolute URI (for HTTP/2 tunnels, and probes) and its origin-form
    /// URI (`/v1/chat/completions`, for HTTP/1 connections).
    parsed: Vec<(&'static str, http::Uri, http::Uri)>,
}

impl Endpoints {
    pub fn new(base_url: String) -> Self {
        let parsed = INFERENCE_PATHS
            .iter()
            .filter_map(|path| {
                let absolute = http::Uri::try_from(format!("{base_url}{path}")).ok()?;
                let origin_form = origin_form(&absolute)?;
                Some((*path, absolute, origin_form))
            })
            .collect();
        let base = http::Uri::try_from(base_url.as_str()).ok();
        let authority = base.as_ref().and_then(|uri| uri.authority());
        let origin = base
            .as_ref()
            .and_then(|uri| {
                http::Uri::builder()
                    .scheme(uri.scheme()?.clone())
                    .authority(uri.authority()?.clone())
                    .path_and_query("/")
                    .build()
                    .ok()
            })
            .unwrap_or_default();
        let host = authority.and_then(|a| http::HeaderValue::from_str(a.as_str()).ok());
        Endpoints {
            base_url,
            origin,
            host,
            parsed,
        }
    }

    /// `{base_url}{path}`, absolute: parsed already for an inference path, parsed now for
    /// another.
    fn uri(&self, path: &str) -> Result<http::Uri, http::uri::InvalidUri> {
        match self.parsed.iter().find(|(known, ..)| *known == path) {
            Some((_, uri, _)) => Ok(uri.clone()),
            None => http::Uri::try_from(format!("{}{path}", self.base_url)),
        }
    }

    /// `{base_url}{path}` in origin form (path and query only), as HTTP/1 sends it.
    fn origin_form(&self, path: &str) -> Result<http::Uri, http::uri::InvalidUri> {
        match self.parsed.iter().find(|(known, ..)| *known == path) {
            Some((.., uri)) => Ok(uri.clone()),
            None => {
                let absolute = self.uri(path)?;
                Ok(origin_form(&absolute).unwrap_or(absolute))
            }
        }
    }
}

/// The path and query of an absolute URI, as a URI of its own.
fn origin_form(absolute: &http::Uri) -> Option<http::Uri> {
    let path = absolute.path_and_query()?.clone();
    http::Uri::from_parts({
        let mut parts = http::uri::Parts::default();
        parts.path_and_query = Some(path);
        parts
    })
    .ok()
}

/// Where every rig's tunnel takes requests: the same URIs for all of them.
static TUNNEL_ENDPOINTS: std::sync::LazyLock<Endpoints> = std::sync::LazyLock::new(|| {
    Endpoints::new(format!(
        "http://{}/v1",
        garage_node_protocol::TUNNEL_AUTHORITY
    ))
});

/// A backend that is a rig: who it is, for the admin API and (later) the router.
#[derive(Debug, Clone)]
pub struct RigInfo {
    pub node_id: String,
    pub operator: String,
    /// What the rig's heartbeats say of it (region...), for routers.
    pub labels: Vec<(String, String)>,
}

/// What a rig last reported about its load (zero for static upstreams).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RigLoad {
    pub engine_running: u32,
    pub engine_waiting: u32,
    /// 0.0–1.0.
    pub kv_cache_usage: f32,
    /// Mean over the rig's GPUs, 0.0–1.0.
    pub gpu_utilization: f32,
    pub gpu_memory_free_bytes: u64,
}

impl RigLoad {
    pub fn from_heartbeat(heartbeat: &garage_node_protocol::Heartbeat) -> Self {
        let stats = heartbeat.engines.iter().filter_map(|e| e.stats);
        let (mut running, mut waiting, mut kv, mut engines) = (0.0, 0.0, 0.0f64, 0u32);
        for s in stats {
            running += s.requests_running;
            waiting += s.requests_waiting;
            kv = kv.max(s.kv_cache_usage);
            engines += 1;
        }
        let gpus = heartbeat.gpus.len().max(1) as f32;
        RigLoad {
            engine_running: running as u32,
            engine_waiting: waiting as u32,
            kv_cache_usage: if engines > 0 { kv as f32 } else { 0.0 },
            gpu_utilization: heartbeat
                .gpus
                .iter()
                .map(|g| g.utilization_percent as f32 / 100.0)
                .sum::<f32>()
                / gpus,
            gpu_memory_free_bytes: heartbeat
                .gpus
                .iter()
                .map(|g| g.memory_total_bytes.saturating_sub(g.memory_used_bytes))
                .sum(),
        }
    }
}

/// What the gateway's checks found about a rig (docs/trust.md).
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum TrustStatus {
    #[default]
    Unverified,
    Verified,
    Suspect,
    Quarantined,
}

impl TrustStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TrustStatus::Unverified => "unverified",
            TrustStatus::Verified => "verified",
            TrustStatus::Suspect => "suspect",
            TrustStatus::Quarantined => "quarantined",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [
            TrustStatus::Unverified,
            TrustStatus::Verified,
            TrustStatus::Suspect,
            TrustStatus::Quarantined,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }

    fn from_u8(n: u8) -> Self {
        match n {
            1 => TrustStatus::Verified,
            2 => TrustStatus::Suspect,
            3 => TrustStatus::Quarantined,
            _ => TrustStatus::Unverified,
        }
    }
}

/// The candidate label a router reads a rig's trust from (`verified`...). Labels under
/// `garage.` are the gateway's: a rig's own labels with that prefix are dropped, so a rig
/// cannot vouch for itself.
pub const TRUST_LABEL: &str = "garage.trust";

/// Whether a label is one a rig may set.
pub fn is_rig_label(name: &str) -> bool {
    !name.starts_with("garage.")
}

/// Smoothing of measured latency and speed: each request moves the average a fifth of the way,
/// so one slow outlier does not swing routing but a real slowdown shows within a few requests.
const EWMA_WEIGHT: f32 = 0.2;

/// One OpenAI-compatible backend and its live health.
#[derive(Debug)]
pub struct Backend {
    pub id: String,
    /// The id's stable 64-bit key, as routers see it (`candidate.key`).
    pub key: u64,
    /// Who the backend is, as a router asks (`candidates.describe`): built once (again when
    /// the rig's trust changes), shared by every request.
    pub info: arc_swap::ArcSwap<crate::plugins::CandidateInfo>,
    /// A rig's trust ([`TrustStatus`] as a number); unused for static upstreams.
    trust: std::sync::atomic::AtomicU8,
    pub models: Vec<String>,
    pub transport: Transport,
    pub rig: Option<RigInfo>,
    /// The rig's last reported load.
    pub load: arc_swap::ArcSwap<RigLoad>,
    /// EWMA of time to first token, milliseconds, as f32 bits (0: not measured).
    latency_ms: AtomicU32,
    /// EWMA of decode speed, tokens per second, as f32 bits (0: not measured).
    tokens_per_sec: AtomicU32,
    /// Milliseconds since `origin` until which the backend is cooling down after a failure.
    cooldown_until_ms: AtomicU64,
    /// Result of the last active health check or heartbeat (true when never checked).
    probe_ok: AtomicBool,
    in_flight: AtomicU32,
    /// For a rig on another replica: the requests in flight there, as it last advertised
    /// (approximate: they may include some of ours, and are up to a heartbeat old).
    elsewhere_in_flight: AtomicU32,
    origin: Instant,
}

impl Backend {
    /// A static upstream from the config, reached with `client`.
    pub fn from_upstream(
        config: &UpstreamConfig,
        client: Arc<HttpClient>,
        origin: Instant,
    ) -> Self {
        let base_url = config.base_url.trim_end_matches('/').to_owned();
        let health_url = config.health_path.as_ref().map(|path| {
            let origin_url = url_origin(&base_url);
            format!("{origin_url}/{}", path.trim_start_matches('/'))
        });
        // A key that cannot be a header value is refused when the config is loaded.
        let authorization = config
            .api_key
            .as_deref()
            .and_then(|key| crate::config::bearer_authorization(key).ok());
        let mut backend = Self::new(
            config.name.clone(),
            config.models.clone(),
            Transport::Url {
                endpoints: Box::new(Endpoints::new(base_url)),
                client,
                pool: Arc::default(),
                authorization,
                health_url,
            },
            None,
            origin,
        );
        backend.info = arc_swap::ArcSwap::from_pointee(crate::plugins::CandidateInfo {
            labels: config.labels.clone().into_iter().collect(),
            ..(**backend.info.load()).clone()
        });
        backend
    }

    pub fn new(
        id: String,
        models: Vec<String>,
        transport: Transport,
        rig: Option<RigInfo>,
        origin: Instant,
    ) -> Self {
        let mut labels: Vec<(String, String)> =
            rig.as_ref().map(|r| r.labels.clone()).unwrap_or_default();
        labels.retain(|(name, _)| is_rig_label(name));
        if rig.is_some() {
            labels.push((TRUST_LABEL.into(), TrustStatus::Unverified.as_str().into()));
        }
        let info = arc_swap::ArcSwap::from_pointee(crate::plugins::CandidateInfo {
            id: id.clone(),
            rig: rig.as_ref().map(|r| r.node_id.clone()).unwrap_or_default(),
            operator: rig.as_ref().map(|r| r.operator.clone()).unwrap_or_default(),
            labels,
        });
        Backend {
            key: crate::plugins::candidate_key(&id),
            info,
            trust: std::sync::atomic::AtomicU8::new(0),
            id,
            models,
            transport,
            rig,
            load: arc_swap::ArcSwap::from_pointee(RigLoad::default()),
            latency_ms: AtomicU32::new(0),
            tokens_per_sec: AtomicU32::new(0),
            cooldown_until_ms: AtomicU64::new(0),
            probe_ok: AtomicBool::new(true),
            in_flight: AtomicU32::new(0),
            elsewhere_in_flight: AtomicU32::new(0),
            origin,
        }
    }

    /// The health endpoint and the client to probe it with, when the backend has one.
    fn health_probe(&self) -> Option<(&str, &Arc<HttpClient>)> {
        match &self.transport {
            Transport::Url {
                health_url, client, ..
            } => Some((health_url.as_deref()?, client)),
            Transport::Tunnel(_) | Transport::Peer { .. } => None,
        }
    }

    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    pub fn is_healthy(&self) -> bool {
        // Nearly always never cooled down (0): no clock read on every request's path then.
        let until = self.cooldown_until_ms.load(Ordering::Relaxed);
        self.probe_ok.load(Ordering::Relaxed) && (until == 0 || until <= self.now_ms())
    }

    /// Takes the backend out of rotation for `period` after a failure.
    pub fn cool_down(&self, period: Duration) {
        let until = self.now_ms() + period.as_millis() as u64;
        self.cooldown_until_ms.fetch_max(until, Ordering::Relaxed);
    }

    pub fn set_probe(&self, ok: bool) {
        let was = self.probe_ok.swap(ok, Ordering::Relaxed);
        if was != ok {
            tracing::info!(backend = %self.id, healthy = ok, "backend health changed");
        }
        if ok {
            // A passing health check ends an earlier cooldown: the backend is back.
            self.cooldown_until_ms.store(0, Ordering::Relaxed);
        }
    }

    /// Folds one finished request into the measured latency and speed.
    pub fn observe(&self, ttft: Duration, decode: Duration, completion_tokens: u64) {
        fn fold(cell: &AtomicU32, sample: f32) {
            let old = f32::from_bits(cell.load(Ordering::Relaxed));
            let new = if old == 0.0 {
                sample
            } else {
                old + EWMA_WEIGHT * (sample - old)
            };
            cell.store(new.to_bits(), Ordering::Relaxed);
        }
        fold(&self.latency_ms, ttft.as_secs_f32() * 1000.0);
        // Only answers long enough to measure: a handful of tokens in a millisecond says
        // nothing about a GPU's decode speed.
        if completion_tokens >= 8 && decode > Duration::from_millis(1) {
            fold(
                &self.tokens_per_sec,
                completion_tokens as f32 / decode.as_secs_f32(),
            );
        }
    }

    /// (EWMA time to first token in ms, EWMA tokens per second); zeros when not measured.
    pub fn measured(&self) -> (f32, f32) {
        (
            f32::from_bits(self.latency_ms.load(Ordering::Relaxed)),
            f32::from_bits(self.tokens_per_sec.load(Ordering::Relaxed)),
        )
    }

    /// A rig's trust; `None` for a static upstream (the operator's own).
    pub fn trust(&self) -> Option<TrustStatus> {
        self.rig
            .as_ref()
            .map(|_| TrustStatus::from_u8(self.trust.load(Ordering::Relaxed)))
    }

    /// Sets a rig's trust, and the label routers read it from.
    pub fn set_trust(&self, status: TrustStatus) {
        if self.rig.is_none() {
            return;
        }
        let was = self.trust.swap(status as u8, Ordering::Relaxed);
        if was == status as u8 && was != 0 {
            return;
        }
        let mut info = (**self.info.load()).clone();
        info.labels.retain(|(name, _)| name != TRUST_LABEL);
        info.labels
            .push((TRUST_LABEL.into(), status.as_str().into()));
        self.info.store(Arc::new(info));
    }

    /// Requests in flight to the backend: ours, plus (for a rig on another replica) those
    /// that replica last advertised.
    pub fn in_flight(&self) -> u32 {
        self.in_flight
            .load(Ordering::Relaxed)
            .saturating_add(self.elsewhere_in_flight.load(Ordering::Relaxed))
    }

    /// Requests in flight through this replica only.
    pub fn local_in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// What the replica holding this rig's tunnel last advertised of its in-flight requests.
    pub fn set_elsewhere_in_flight(&self, n: u32) {
        self.elsewhere_in_flight.store(n, Ordering::Relaxed);
    }

    /// The replica this rig is reached through, when it is tunnelled to another one.
    pub fn peer(&self) -> Option<&crate::cluster::Peer> {
        match &self.transport {
            Transport::Peer { peer, .. } => Some(peer),
            _ => None,
        }
    }

    /// Sends `POST {base}{path}` with a JSON body, over whichever transport the backend has.
    pub async fn post(
        &self,
        path: &str,
        body: Bytes,
        request_id: Option<&http::HeaderValue>,
        trace: Option<&crate::telemetry::TraceHeaders>,
    ) -> Result<UpstreamResponse, SendError> {
        let request = |body: Bytes,
                       uri: Result<http::Uri, http::uri::InvalidUri>,
                       host: Option<&http::HeaderValue>,
                       authorization: Option<&http::HeaderValue>| {
            let uri =
                uri.map_err(|e| SendError::nothing_sent(format!("invalid backend URL: {e}")))?;
            // Built in place: `http::request::Builder` moves the whole request through each
            // `.header()` call.
            let mut request = http::Request::new(RequestBody::new(body));
            *request.method_mut() = http::Method::POST;
            *request.uri_mut() = uri;
            let headers = request.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            for (name, value) in [
                (crate::request_id::X_REQUEST_ID, request_id),
                (header::HOST, host),
                (header::AUTHORIZATION, authorization),
            ] {
                if let Some(value) = value {
                    headers.insert(name, value.clone());
                }
            }
            if let Some(trace) = trace {
                trace.apply(headers);
            }
            Ok(request)
        };
        match &self.transport {
            Transport::Url {
                endpoints,
                client,
                pool,
                authorization,
                ..
            } => {
                // Our own HTTP/1 connections: origin-form URI and a `Host` header.
                let request = request(
                    body,
                    endpoints.origin_form(path),
                    endpoints.host.as_ref(),
                    authorization.as_ref(),
                )?;
                pool.send(client.connector(), &endpoints.origin, request)
                    .await
            }
            Transport::Tunnel(sender) => {
                let request = request(body, TUNNEL_ENDPOINTS.uri(path), None, None)?;
                send_tunnel(sender.clone(), request).await
            }
            Transport::Peer { peer, node } => {
                peer.forward(node, path, body, request_id, trace).await
            }
        }
    }

    /// Closes this backend's idle connections that expired or that it closed.
    fn prune_idle_connections(&self) {
        if let Transport::Url { pool, .. } = &self.transport {
            pool.prune();
        }
    }

    /// Idle pooled connections to this backend (none for a rig).
    pub fn idle_connections(&self) -> usize {
        match &self.transport {
            Transport::Url { pool, .. } => pool.idle_len(),
            Transport::Tunnel(_) | Transport::Peer { .. } => 0,
        }
    }

    /// Counts a request as in flight until the guard drops.
    pub fn track(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(self))
    }
}

/// `scheme://host:port` of a URL.
fn url_origin(url: &str) -> &str {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    match url[after_scheme..].find('/') {
        Some(i) => &url[..after_scheme + i],
        None => url,
    }
}

pub struct InFlight(Arc<Backend>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

struct ModelCandidates {
    backends: Vec<Arc<Backend>>,
    /// Round-robin cursor.
    next: AtomicUsize,
}

/// Most candidates one request considers (and the router plugin sees). The window starts at the
/// next backend in round-robin turn, so over successive requests every backend is offered; with
/// thousands of rigs serving one model a request still costs the same. 128 covers the "router
/// over 100 candidate rigs" case in full.
pub const MAX_CANDIDATES: usize = 128;

/// How long a model whose last backend left is answered with 503 (`no_backend_available`, try
/// again) rather than 404 (`model_not_found`, a mistake): a rig restarting its engine, or
/// reconnecting to another replica, is back within this.
pub const GONE_MODEL_GRACE: Duration = Duration::from_secs(600);

/// An immutable snapshot of every backend.
#[derive(Default)]
pub struct BackendSet {
    all: Vec<Arc<Backend>>,
    /// Models no backend serves any more, since when.
    gone: HashMap<String, Instant>,
    /// Looked up on every request: foldhash, seeded per process (rigs name models too), instead
    /// of std's SipHash.
    by_model: HashMap<String, ModelCandidates, foldhash::quality::RandomState>,
}

impl BackendSet {
    pub fn new(backends: Vec<Arc<Backend>>) -> Self {
        let mut by_model: HashMap<String, ModelCandidates, foldhash::quality::RandomState> =
            HashMap::default();
        for backend in &backends {
            for model in &backend.models {
                by_model
                    .entry(model.clone())
                    .or_insert_with(|| ModelCandidates {
                        backends: Vec::new(),
                        next: AtomicUsize::new(0),
                    })
                    .backends
                    .push(Arc::clone(backend));
            }
        }
        BackendSet {
            all: backends,
            by_model,
            gone: HashMap::new(),
        }
    }

    /// The set with `backends` instead, remembering the models that left (for
    /// [`GONE_MODEL_GRACE`]).
    fn succeeded_by(&self, backends: Vec<Arc<Backend>>) -> Self {
        let mut next = BackendSet::new(backends);
        let now = Instant::now();
        next.gone = self
            .gone
            .iter()
            .filter(|(model, at)| {
                now.duration_since(**at) < GONE_MODEL_GRACE && !next.by_model.contains_key(*model)
            })
            .map(|(model, at)| (model.clone(), *at))
            .collect();
        for model in self.by_model.keys() {
            if !next.by_model.contains_key(model) {
                next.gone.insert(model.clone(), now);
            }
        }
        next
    }

    pub fn all(&self) -> &[Arc<Backend>] {
        &self.all
    }

    /// Healthy backends of `model`, in round-robin order starting at the next one in turn, at
    /// most [`MAX_CANDIDATES`] of them. 404 when nothing serves the model, 503 when nothing
    /// healthy does.
    pub fn candidates(&self, model: &str) -> Result<Vec<Arc<Backend>>, ApiError> {
        let Some(entry) = self.by_model.get(model) else {
            if self
                .gone
                .get(model)
                .is_some_and(|at| at.elapsed() < GONE_MODEL_GRACE)
            {
                return Err(ApiError::Unavailable(format!(
                    "No backend serves `{model}` right now (its last one left); retry shortly."
                )));
            }
            return Err(ApiError::ModelNotFound(model.to_owned()));
        };
        let n = entry.backends.len();
        let start = entry.next.fetch_add(1, Ordering::Relaxed);
        let ordered: Vec<_> = (0..n)
            .map(|i| &entry.backends[(start + i) % n])
            .filter(|b| b.is_healthy())
            .take(MAX_CANDIDATES)
            .cloned()
            .collect();
        if ordered.is_empty() {
            return Err(ApiError::Unavailable(format!(
                "No healthy backend serves `{model}` right now; retry shortly."
            )));
        }
        Ok(ordered)
    }

    /// Models that at least one healthy backend serves, sorted.
    pub fn healthy_models(&self) -> BTreeSet<&str> {
        self.by_model
            .iter()
            .filter(|(_, c)| c.backends.iter().any(|b| b.is_healthy()))
            .map(|(m, _)| m.as_str())
            .collect()
    }

    pub fn healthy_count(&self) -> usize {
        self.all.iter().filter(|b| b.is_healthy()).count()
    }
}

/// The live backend registry.
pub struct Backends {
    current: ArcSwap<BackendSet>,
    origin: Instant,
}

impl Backends {
    /// The static upstreams of the config, each reached with the client `client_for` gives it;
    /// rigs join later.
    pub fn from_upstreams<E>(
        upstreams: &[UpstreamConfig],
        mut client_for: impl FnMut(&UpstreamConfig) -> Result<Arc<HttpClient>, E>,
    ) -> Result<Self, E> {
        let origin = Instant::now();
        let backends = upstreams
            .iter()
            .map(|u| Ok(Arc::new(Backend::from_upstream(u, client_for(u)?, origin))))
            .collect::<Result<_, E>>()?;
        Ok(Backends {
            current: ArcSwap::from_pointee(BackendSet::new(backends)),
            origin,
        })
    }

    /// No backends until rigs join.
    pub fn empty() -> Self {
        Backends {
            current: ArcSwap::from_pointee(BackendSet::new(Vec::new())),
            origin: Instant::now(),
        }
    }

    /// The current snapshot; a request keeps the one it started with.
    pub fn snapshot(&self) -> Arc<BackendSet> {
        self.current.load_full()
    }

    /// Adds or replaces (by id) a backend: a rig that connected or changed its models.
    pub fn upsert(&self, backend: Arc<Backend>) {
        self.current.rcu(|set| {
            let mut all = set.all.clone();
            all.retain(|b| b.id != backend.id);
            all.push(Arc::clone(&backend));
            set.succeeded_by(all)
        });
    }

    /// Takes a backend out (a rig that left). In-flight requests keep their snapshot.
    pub fn remove(&self, id: &str) {
        self.current.rcu(|set| {
            let mut all = set.all.clone();
            all.retain(|b| b.id != id);
            set.succeeded_by(all)
        });
    }

    /// The process-wide origin of backend clocks (cooldowns).
    pub fn origin(&self) -> Instant {
        self.origin
    }

    /// Probes every backend that has a health endpoint, forever, one round per `interval`;
    /// closes idle connections backends closed on their side.
    pub async fn run_health_checks(self: Arc<Self>, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let set = self.snapshot();
            for backend in set.all() {
                backend.prune_idle_connections();
            }
            let probes = set.all().iter().filter_map(|backend| {
                let (url, client) = backend.health_probe()?;
                let request = http::Request::get(url).body(RequestBody::default());
                let client = Arc::clone(client);
                let backend = Arc::clone(backend);
                Some(async move {
                    let ok = match request {
                        Ok(request) => matches!(
                            tokio::time::timeout(interval, send_http(&client, request)).await,
                            Ok(Ok(resp)) if resp.status().is_success()
                        ),
                        Err(_) => false,
                    };
                    backend.set_probe(ok);
                })
            });
            futures::future::join_all(probes).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(name: &str, models: &[&str]) -> UpstreamConfig {
        UpstreamConfig {
            name: name.into(),
            base_url: format!("http://{name}.invalid:8000/v1/"),
            models: models.iter().map(|m| m.to_string()).collect(),
            api_key: None,
            health_path: Some("/health".into()),
            labels: Default::default(),
            tls_ca_file: None,
            unix_socket: None,
        }
    }

    fn backends(upstreams: &[UpstreamConfig]) -> Backends {
        let dispatch = crate::config::DispatchConfig::default();
        let client = Arc::new(crate::upstream::http_client(&dispatch, None).unwrap());
        Backends::from_upstreams(upstreams, |_| Ok::<_, ()>(Arc::clone(&client))).unwrap()
    }

    #[test]
    fn round_robin_skips_cooling_backends() {
        let backends = backends(&[
            upstream("a", &["m"]),
            upstream("b", &["m"]),
            upstream("c", &["m", "other"]),
        ]);
        let set = backends.snapshot();
        let firsts: Vec<String> = (0..3)
            .map(|_| set.candidates("m").unwrap()[0].id.clone())
            .collect();
        assert_eq!(firsts, ["a", "b", "c"]);
        set.all()[1].cool_down(Duration::from_secs(60));
        let ids: Vec<String> = set
            .candidates("m")
            .unwrap()
            .iter()
            .map(|b| b.id.clone())
            .collect();
        assert_eq!(ids, ["a", "c"]);
        assert!(matches!(
            set.candidates("nope"),
            Err(ApiError::ModelNotFound(_))
        ));
        set.all()[2].set_probe(false);
        assert!(matches!(
            set.candidates("other"),
            Err(ApiError::Unavailable(_))
        ));
        assert_eq!(set.healthy_models().into_iter().collect::<Vec<_>>(), ["m"]);
    }

    #[test]
    fn a_request_considers_a_bounded_rotating_window() {
        let names: Vec<String> = (0..300).map(|i| format!("b{i}")).collect();
        let upstreams: Vec<_> = names.iter().map(|n| upstream(n, &["m"])).collect();
        let set = backends(&upstreams).snapshot();
        let first = set.candidates("m").unwrap();
        let second = set.candidates("m").unwrap();
        assert_eq!(first.len(), MAX_CANDIDATES);
        assert_eq!(first[0].id, "b0");
        assert_eq!(second[0].id, "b1");
        // Over enough requests every backend is offered first.
        let firsts: std::collections::HashSet<String> = (0..300)
            .map(|_| set.candidates("m").unwrap()[0].id.clone())
            .collect();
        assert_eq!(firsts.len(), 300);
    }

    #[test]
    fn a_rig_cannot_vouch_for_itself() {
        let rig = Backend::new(
            "rig-1".into(),
            vec!["m".into()],
            Transport::Url {
                endpoints: Box::new(Endpoints::new("http://rig.invalid/v1".into())),
                client: Arc::new(
                    crate::upstream::http_client(&crate::config::DispatchConfig::default(), None)
                        .unwrap(),
                ),
                pool: Arc::default(),
                authorization: None,
                health_url: None,
            },
            Some(RigInfo {
                node_id: "rig-1".into(),
                operator: "op".into(),
                labels: vec![
                    ("region".into(), "eu".into()),
                    (TRUST_LABEL.into(), "verified".into()),
                    ("garage.anything".into(), "x".into()),
                ],
            }),
            Instant::now(),
        );
        let labels = |b: &Backend| b.info.load().labels.clone();
        assert_eq!(
            labels(&rig),
            [
                ("region".to_owned(), "eu".to_owned()),
                (TRUST_LABEL.to_owned(), "unverified".to_owned())
            ]
        );
        assert_eq!(rig.trust(), Some(TrustStatus::Unverified));
        rig.set_trust(TrustStatus::Verified);
        assert_eq!(rig.trust(), Some(TrustStatus::Verified));
        assert_eq!(labels(&rig)[1].1, "verified");
        // The operator's own upstreams are not rigs: no trust to speak of.
        let upstream = backends(&[upstream("a", &["m"])]).snapshot().all()[0].clone();
        assert_eq!(upstream.trust(), None);
    }

    #[test]
    fn health_url_from_origin() {
        let b = backends(&[upstream("a", &["m"])]).snapshot().all()[0].clone();
        assert!(
            matches!(&b.transport, Transport::Url { endpoints, .. } if endpoints.base_url == "http://a.invalid:8000/v1")
        );
        assert_eq!(
            b.health_probe().map(|(url, _)| url),
            Some("http://a.invalid:8000/health")
        );
    }
}
