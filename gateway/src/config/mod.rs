//! Gateway configuration: strict TOML, validated once, overridable from the environment.
//!
//! Parsing takes its sources as arguments (the TOML text and an iterator of environment pairs) so
//! tests never touch the process environment.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub mod telemetry;

/// Prefix of every environment variable that overrides a config field.
pub const ENV_PREFIX: &str = "GARAGE_";

/// Config fields that an environment variable may override, as dotted paths. A field `a.b` is set
/// by `GARAGE_A_B` (a `-` in a name is also `_`: `GARAGE_PLUGINS_RATE_LIMITER_MEMORY_MIB`). Kept as a table (not derived) so a renamed field breaks a test, not an
/// operator's deployment silently; `every_field_has_an_env_name` checks it against the schema.
pub const ENV_FIELDS: &[&str] = &[
    "listen",
    "tls_cert_file",
    "tls_key_file",
    "store",
    "log_format",
    "max_body_bytes",
    "shutdown_grace_secs",
    "worker_threads",
    "default_plugins",
    "cors.allowed_origins",
    "cors.max_age_secs",
    "connections.max",
    "connections.max_per_ip",
    "connections.header_read_timeout_secs",
    "connections.body_read_timeout_secs",
    "connections.tls_handshake_timeout_secs",
    "auth.admin_token",
    "auth.admin_token_file",
    "auth.key_secret",
    "auth.key_cache_secs",
    "dispatch.connect_timeout_ms",
    "dispatch.first_byte_timeout_secs",
    "dispatch.request_timeout_secs",
    "dispatch.max_response_bytes",
    "dispatch.max_attempts",
    "dispatch.cooldown_secs",
    "dispatch.health_interval_secs",
    "dispatch.tls_ca_file",
    "nodes.heartbeat_interval_secs",
    "nodes.missed_heartbeats",
    "nodes.enrollment_token_ttl_secs",
    "nodes.report_interval_secs",
    "cluster.advertise_url",
    "cluster.secret",
    "tokenizers",
    "trust.spot_check_interval_secs",
    "trust.spot_check_tokens",
    "trust.spot_check_timeout_secs",
    "trust.logprob_tolerance",
    "trust.replay_share",
    "usage.ledger_max_entries",
    "usage.budget_alert_thresholds",
    "accounts.utc_offset_minutes",
    "accounts.default_completion_tokens",
    "accounts.hold_secs",
    "webhooks.max_attempts",
    "webhooks.backoff_base_ms",
    "webhooks.backoff_max_ms",
    "webhooks.timeout_ms",
    "webhooks.poll_interval_ms",
    "webhooks.export_retention_days",
    "telemetry.otlp_endpoint",
    "telemetry.service_name",
    "telemetry.sampling_ratio",
    "telemetry.max_queued_spans",
    "telemetry.export_delay_ms",
    "telemetry.export_timeout_ms",
    "batch.max_file_bytes",
    "batch.max_files_per_key",
    "batch.max_file_bytes_per_key",
    "batch.max_errors",
    "batch.max_requests",
    "batch.lease_secs",
    "batch.max_lease",
    "batch.max_wait_ms",
    "batch.sweep_interval_ms",
    "plugins.fault_threshold",
    "plugins.fault_window_secs",
    "plugins.rate_limiter_fail_open",
    "plugins.max_instances",
    "plugins.max_component_bytes",
    "plugins.history",
    "plugins.resync_interval_secs",
    "plugins.files",
    "plugins.trial_at_upload",
    "plugins.record_calls",
    "plugins.record_every",
    "plugins.router.deadline_ms",
    "plugins.router.memory_mib",
    "plugins.router.isolation",
    "plugins.router.warm_instances",
    "plugins.router.warm_max_instances",
    "plugins.router.warm_idle_secs",
    "plugins.router.warm_max_uses",
    "plugins.router.warm_max_age_secs",
    "plugins.router.ready_instances",
    "plugins.rate-limiter.deadline_ms",
    "plugins.rate-limiter.memory_mib",
    "plugins.rate-limiter.isolation",
    "plugins.rate-limiter.warm_instances",
    "plugins.rate-limiter.warm_max_instances",
    "plugins.rate-limiter.warm_idle_secs",
    "plugins.rate-limiter.warm_max_uses",
    "plugins.rate-limiter.warm_max_age_secs",
    "plugins.rate-limiter.ready_instances",
    "plugins.meter.deadline_ms",
    "plugins.meter.memory_mib",
    "plugins.meter.isolation",
    "plugins.meter.warm_instances",
    "plugins.meter.warm_max_instances",
    "plugins.meter.warm_idle_secs",
    "plugins.meter.warm_max_uses",
    "plugins.meter.warm_max_age_secs",
    "plugins.meter.ready_instances",
    "plugins.reward.deadline_ms",
    "plugins.reward.memory_mib",
    "plugins.reward.isolation",
    "plugins.reward.warm_instances",
    "plugins.reward.warm_max_instances",
    "plugins.reward.warm_idle_secs",
    "plugins.reward.warm_max_uses",
    "plugins.reward.warm_max_age_secs",
    "plugins.reward.ready_instances",
    "upstreams",
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Parse(String),
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// The most `worker_threads` a config may ask for: far more than any machine has cores, and few
/// enough that a typo is refused rather than tried as thousands of threads.
pub const MAX_WORKER_THREADS: usize = 1024;

/// The whole gateway configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address the HTTP server listens on.
    pub listen: SocketAddr,
    /// Serve HTTPS with this PEM certificate chain (and `tls_key_file`); plain HTTP when unset,
    /// as behind a TLS-terminating load balancer. Read at start.
    pub tls_cert_file: Option<std::path::PathBuf>,
    /// The PEM private key of `tls_cert_file`.
    pub tls_key_file: Option<std::path::PathBuf>,
    /// `memory` (embedded, the default) or a `redis://` / `rediss://` URL.
    pub store: String,
    /// `text` (readable) or `json`.
    pub log_format: LogFormat,
    /// Largest request body accepted, in bytes; larger gets 413.
    pub max_body_bytes: usize,
    /// On SIGTERM/SIGINT, how long in-flight requests and streams may take to finish.
    pub shutdown_grace_secs: u64,
    /// Threads that serve requests; 0 (the default) for one per CPU core. On a machine shared
    /// with engines, fewer leave them the cores; 1 runs everything on one thread with tokio's
    /// single-threaded scheduler (no work stealing, no wake-ups across threads), the cheapest
    /// per request. Read at start.
    pub worker_threads: usize,
    /// Cross-origin requests from web pages (CORS): off unless origins are listed.
    pub cors: CorsConfig,
    /// Client connections: caps and deadlines that keep one client from starving the others.
    pub connections: ConnectionsConfig,
    pub auth: AuthConfig,
    pub dispatch: DispatchConfig,
    pub nodes: NodesConfig,
    /// Several replicas acting as one gateway: how the others reach this one.
    pub cluster: ClusterConfig,
    /// Checks of what rigs serve (docs/trust.md).
    pub trust: TrustConfig,
    /// Usage metering: the ledger's retention on the embedded store.
    pub usage: UsageConfig,
    /// Accounts and prepaid credits: the zone of their budget periods, how long a hold lasts.
    pub accounts: crate::accounts::config::AccountsConfig,
    /// Webhook deliveries (attempts, backoff, timeout) and the usage export's retention.
    pub webhooks: crate::webhooks::config::WebhooksConfig,
    /// OpenTelemetry traces of the request path, exported with OTLP/HTTP; off unless a
    /// collector is named (docs/tracing.md).
    pub telemetry: telemetry::TelemetryConfig,
    /// The Batch API: files, queues and leases.
    pub batch: BatchConfig,
    /// Install the default policy plugins into slots that were never configured (least-loaded
    /// router, token-bucket rate limiter, price-table meter, points reward).
    pub default_plugins: bool,
    /// Policy plugins: limits, fault handling, component files.
    pub plugins: crate::plugins::config::PluginsConfig,
    /// Static OpenAI-compatible upstreams (an existing vLLM server, another gateway...).
    pub upstreams: Vec<UpstreamConfig>,
    /// Models whose tokens the gateway counts itself, by model name: what a request is billed
    /// and a rig rewarded for is the gateway's count, and a rig's report that disagrees is a
    /// failed check (docs/trust.md).
    pub tokenizers: std::collections::BTreeMap<String, TokenizerConfig>,
}

/// A model's tokenizer.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TokenizerConfig {
    /// The model's `tokenizer.json`, as published with its weights (read at start).
    pub file: std::path::PathBuf,
    /// Tokens the model's chat template adds around each message (role headers, separators):
    /// about 4 for Llama 3, 5 for Qwen 2.5 (`<|im_start|>`, role, newline, `<|im_end|>`,
    /// newline). The template's preamble and the assistant's header are within the tolerance.
    #[serde(default)]
    pub chat_template_tokens: u32,
}

/// Which web pages may call the gateway from a browser. The API authenticates with bearer tokens,
/// which a browser never attaches on its own, so allowing an origin lets that page's scripts
/// use a key they were given, and nothing more (no cookies: credentials are never allowed).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorsConfig {
    /// Origins allowed, such as `"https://app.example.com"`, or `["*"]` for any (as vLLM's
    /// `--allowed-origins` defaults to). Empty, the default: no CORS headers, so browsers
    /// refuse cross-origin calls and preflight `OPTIONS` requests get 405.
    pub allowed_origins: Vec<String>,
    /// How long a browser may cache a preflight answer.
    pub max_age_secs: u64,
}

impl Default for CorsConfig {
    fn default() -> Self {
        CorsConfig {
            allowed_origins: Vec::new(),
            max_age_secs: 3600,
        }
    }
}

/// Client connections. The defaults are for a gateway on the internet; see
/// `docs/security.md`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectionsConfig {
    /// Connections open at once, from every client together; past it, new ones wait in the
    /// kernel's backlog. 0 (the default): what the process's file descriptors allow (its soft
    /// limit is raised to the hard one at start), halved for the backends' side.
    pub max: usize,
    /// Connections open at once from one client address; past it, a new one is closed at once.
    /// Behind a load balancer or proxy every client has its address: set 0 (no cap) there and
    /// cap per client at the proxy.
    pub max_per_ip: usize,
    /// How long a client may take to send a request head, and how long a kept-alive connection
    /// may sit idle waiting for the next one.
    pub header_read_timeout_secs: u64,
    /// How long a request body may go without sending anything (a slow upload keeps going as
    /// long as it moves).
    pub body_read_timeout_secs: u64,
    /// How long a TLS handshake may take.
    pub tls_handshake_timeout_secs: u64,
}

impl Default for ConnectionsConfig {
    fn default() -> Self {
        ConnectionsConfig {
            max: 0,
            // Far more than a browser (6) or an SDK's pool (tens) opens; far fewer than it takes
            // to run a gateway out of descriptors.
            max_per_ip: 512,
            // nginx waits 60 s for a head and 75 s on an idle connection; clients keep idle
            // connections 5 s (httpx) or less, and a head takes milliseconds.
            header_read_timeout_secs: 15,
            body_read_timeout_secs: 30,
            tls_handshake_timeout_secs: 10,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Bearer token of the admin API; best given through `GARAGE_AUTH_ADMIN_TOKEN` or
    /// `admin_token_file`, so that it shows in no config listing or process arguments.
    pub admin_token: Option<String>,
    /// A file holding the admin token (trimmed). If it does not exist, a random token is
    /// generated and written there (mode 0600). With neither this nor `admin_token`, a random
    /// token is written to a new file in the temporary directory; the log says which, never the
    /// token itself.
    pub admin_token_file: Option<std::path::PathBuf>,
    /// Server secret keying the HMAC under which API keys are stored. Required with Redis (every
    /// replica must hash alike and keys must survive a restart); random per process otherwise.
    pub key_secret: Option<String>,
    /// How long an authenticated key stays in the in-process cache. Revocations invalidate it at
    /// once through the store's events; this bound only matters if an event is lost.
    pub key_cache_secs: u64,
}

/// Written out, not derived: a table's missing fields take these values, and a derived default
/// made `key_cache_secs` 0 in any config with an `[auth]` table (no key cache at all: a store
/// lookup per request).
impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            admin_token: None,
            admin_token_file: None,
            key_secret: None,
            key_cache_secs: 60,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DispatchConfig {
    /// TCP connect timeout to a backend. Loopback and LAN rigs connect in well under this.
    pub connect_timeout_ms: u64,
    /// How long to wait for a backend's response headers. A cold engine can take long to
    /// prefill a big prompt, so this is generous; past it the client gets 504.
    pub first_byte_timeout_secs: u64,
    /// Bound on reading a whole non-streamed response body.
    pub request_timeout_secs: u64,
    /// Largest non-streamed answer passed on, in bytes: the gateway holds a whole answer to
    /// meter it, and a rig is a stranger that could send gigabytes. Past it the client gets
    /// 502. Streams are passed on as they come and are not bounded by this.
    pub max_response_bytes: usize,
    /// Backends tried per request (the first choice plus retries on connect failure or 5xx).
    pub max_attempts: usize,
    /// How long a backend that failed stays out of rotation.
    pub cooldown_secs: u64,
    /// Period of active health checks for upstreams that set `health_path`.
    pub health_interval_secs: u64,
    /// A PEM file of certificate authorities trusted for `https` upstreams besides the public
    /// web roots, such as the private CA of a vLLM server started with `--ssl-certfile`. Read
    /// at start; a file that cannot be read or holds no certificate stops the start.
    pub tls_ca_file: Option<std::path::PathBuf>,
}

/// Rigs that connect through `node-runner`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodesConfig {
    /// How often rigs send heartbeats (told to each rig when it enrolls).
    pub heartbeat_interval_secs: u64,
    /// Heartbeats a rig may miss before it leaves routing; it comes back with the next one.
    pub missed_heartbeats: u32,
    /// Default lifetime of an enrollment token.
    pub enrollment_token_ttl_secs: u64,
    /// How often each rig's availability is reported to the reward plugin (uptime rewards).
    pub report_interval_secs: u64,
}

impl Default for NodesConfig {
    fn default() -> Self {
        NodesConfig {
            // A few seconds: stats fresh enough for routing, a trickle of traffic per rig.
            heartbeat_interval_secs: 5,
            missed_heartbeats: 3,
            enrollment_token_ttl_secs: 24 * 3600,
            report_interval_secs: 60,
        }
    }
}

impl NodesConfig {
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_secs(self.heartbeat_interval_secs.max(1))
    }
    pub fn report_interval(&self) -> Duration {
        Duration::from_secs(self.report_interval_secs.max(1))
    }
    /// Silence longer than this takes a rig out of routing.
    pub fn heartbeat_deadline(&self) -> Duration {
        self.heartbeat_interval() * self.missed_heartbeats.max(1)
    }
}

/// Replicas on one Redis reach each other's rigs: a replica that routes a request to a rig
/// tunnelled to another replica forwards it there over HTTP/2, authenticated with `secret`.
/// Off (each replica routes only to its own rigs) unless both fields are set.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Where the other replicas reach this one, e.g. `http://10.0.0.5:8080`: this replica's
    /// own listener, on an address of the private network between replicas. Plain HTTP/2
    /// (h2c): the channel carries prompts, so keep it off the internet.
    pub advertise_url: Option<String>,
    /// Shared by every replica, at least 32 characters; a forwarded request carries it. Best
    /// given through `GARAGE_CLUSTER_SECRET`.
    pub secret: Option<String>,
}

/// Spot checks: challenge requests that show whether a rig serves the model it claims.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrustConfig {
    /// How often each rig is spot-checked, on average (0: never). Each check costs the rig and
    /// up to three others one short request.
    pub spot_check_interval_secs: u64,
    /// Tokens a challenge asks for.
    pub spot_check_tokens: u32,
    /// How long a challenge's answer may take.
    pub spot_check_timeout_secs: u64,
    /// How far apart (mean absolute difference) two rigs' log-probabilities of the same tokens
    /// may be and still come from the same model.
    pub logprob_tolerance: f64,
    /// Share of real temperature-0 chat requests replayed, as a spot check, on the rig that
    /// served them and on others serving the model (0: never). The prompt then reaches other
    /// strangers' rigs: a key with `"replay": false` in its metadata is never replayed.
    pub replay_share: f64,
}

impl Default for TrustConfig {
    fn default() -> Self {
        TrustConfig {
            // Ten minutes: a new rig is checked within its first ten, and checks cost a rig
            // well under a thousandth of its capacity (docs/trust.md).
            spot_check_interval_secs: 600,
            spot_check_tokens: 16,
            spot_check_timeout_secs: 60,
            logprob_tolerance: 0.1,
            replay_share: 0.01,
        }
    }
}

/// The shortest cluster secret accepted: guessing it must be out of reach.
pub const MIN_CLUSTER_SECRET: usize = 32;

/// Usage metering.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UsageConfig {
    /// On the embedded store, how many requests' ledger entries are kept (about 0.35 KB each);
    /// past this the oldest go. Totals (per key and day, per operator) are counters and keep
    /// counting; only `GET /admin/usage/requests/{id}` of an older request answers 404. The
    /// embedded store loses everything at a restart anyway; on Redis every entry is kept.
    pub ledger_max_entries: usize,
    /// Shares of a key's budgets, in percent (1 to 100), whose crossing sends a
    /// `budget.threshold` webhook (the meter reports the budgets; see `docs/money.md`).
    pub budget_alert_thresholds: Vec<u32>,
}

impl Default for UsageConfig {
    fn default() -> Self {
        UsageConfig {
            ledger_max_entries: 100_000,
            budget_alert_thresholds: vec![50, 80, 100],
        }
    }
}

/// The Batch API.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Largest file `POST /v1/files` accepts, in bytes.
    pub max_file_bytes: usize,
    /// Files one API key may have uploaded at once (deleting one makes room).
    pub max_files_per_key: u64,
    /// Bytes of uploaded files one API key may have at once. On the embedded store files live
    /// in the gateway's memory: this bounds what one key can make it hold.
    pub max_file_bytes_per_key: u64,
    /// Problems of an input file a failed batch lists line by line; past this, one entry says
    /// how many more there were.
    pub max_errors: usize,
    /// Most requests in one batch.
    pub max_requests: usize,
    /// How long a rig has to answer a line it leased before the line goes to another rig.
    pub lease_secs: u64,
    /// Most lines one rig may lease at once.
    pub max_lease: u32,
    /// Longest a rig's request for work is held open waiting for some (a long poll).
    pub max_wait_ms: u64,
    /// How often each replica looks for batches to finish (cancelled, expired, or whose last
    /// answer arrived while a replica crashed).
    pub sweep_interval_ms: u64,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            // OpenAI's limits: 200 MB and 50,000 requests per batch.
            max_file_bytes: 200 * 1024 * 1024,
            // Room for a busy client's files, not for one client to fill the store.
            max_files_per_key: 500,
            max_file_bytes_per_key: 1024 * 1024 * 1024,
            max_errors: 1_000,
            max_requests: 50_000,
            // Long enough for a long generation on a slow rig; a dead rig's lines wait this long.
            lease_secs: 600,
            max_lease: 64,
            max_wait_ms: 20_000,
            sweep_interval_ms: 2_000,
        }
    }
}

/// A static OpenAI-compatible backend.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Unique name, used in logs and metrics.
    pub name: String,
    /// Base URL including the API version, e.g. `http://10.0.0.5:8000/v1`.
    pub base_url: String,
    /// Model names this upstream serves.
    pub models: Vec<String>,
    /// Bearer token sent to the upstream, if it wants one.
    #[serde(default)]
    pub api_key: Option<String>,
    /// Path of a health endpoint on the upstream's origin (vLLM: `/health`). When set, the
    /// upstream is probed periodically; when unset, only failed requests take it out of rotation.
    #[serde(default)]
    pub health_path: Option<String>,
    /// Labels a router may read (`candidates.describe`), such as `{ region = "eu" }`.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// A PEM file of certificate authorities this `https` upstream is verified against, with
    /// the public web roots, instead of `dispatch.tls_ca_file`: a private CA trusted for this
    /// upstream and no other. Read at start; a file that cannot be read or holds no
    /// certificate stops the start.
    #[serde(default)]
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// Reach this upstream over a Unix domain socket (vLLM's `--uds`) instead of TCP: for an
    /// engine on the gateway's own machine, where a local socket costs the kernel less than
    /// loopback TCP. `base_url` still gives the path and the `Host` header, and must be
    /// `http://` (e.g. `http://localhost/v1`).
    #[serde(default)]
    pub unix_socket: Option<std::path::PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            tls_cert_file: None,
            tls_key_file: None,
            store: "memory".into(),
            log_format: LogFormat::Text,
            // Chat requests with long contexts and base64 images run to a few MB; 16 MiB leaves
            // room while still bounding what one request can make us buffer.
            max_body_bytes: 16 * 1024 * 1024,
            shutdown_grace_secs: 30,
            worker_threads: 0,
            cors: CorsConfig::default(),
            connections: ConnectionsConfig::default(),
            auth: AuthConfig::default(),
            dispatch: DispatchConfig::default(),
            nodes: NodesConfig::default(),
            cluster: ClusterConfig::default(),
            trust: TrustConfig::default(),
            usage: UsageConfig::default(),
            accounts: Default::default(),
            webhooks: Default::default(),
            telemetry: Default::default(),
            batch: BatchConfig::default(),
            default_plugins: true,
            plugins: crate::plugins::config::PluginsConfig::default(),
            upstreams: Vec::new(),
            tokenizers: Default::default(),
        }
    }
}

impl Default for DispatchConfig {
    fn default() -> Self {
        DispatchConfig {
            connect_timeout_ms: 2_000,
            first_byte_timeout_secs: 120,
            request_timeout_secs: 600,
            // An embeddings answer for 2,048 inputs of 1,024 dimensions in JSON is ~20 MB;
            // chat answers are kilobytes.
            max_response_bytes: 64 * 1024 * 1024,
            max_attempts: 3,
            cooldown_secs: 10,
            health_interval_secs: 5,
            tls_ca_file: None,
        }
    }
}

impl DispatchConfig {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    pub fn first_byte_timeout(&self) -> Duration {
        Duration::from_secs(self.first_byte_timeout_secs)
    }
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }
    pub fn cooldown(&self) -> Duration {
        Duration::from_secs(self.cooldown_secs)
    }
}

/// `Authorization: Bearer <key>` for an upstream's API key, marked sensitive (kept out of
/// logs); an error for a key that cannot be a header value (refused when the config loads).
pub fn bearer_authorization(
    key: &str,
) -> Result<http::HeaderValue, http::header::InvalidHeaderValue> {
    let mut value = http::HeaderValue::try_from(format!("Bearer {key}"))?;
    value.set_sensitive(true);
    Ok(value)
}

/// How a Redis `store` URL may start: one server (plain or TLS), a Redis Cluster, or a
/// primary found through Sentinel.
pub const REDIS_SCHEMES: [&str; 6] = [
    "redis://",
    "rediss://",
    "redis+cluster://",
    "rediss+cluster://",
    "redis+sentinel://",
    "rediss+sentinel://",
];

/// Whether a `store` URL names the embedded store (`memory`), which lives and dies with the
/// process.
pub fn is_embedded(store: &str) -> bool {
    store == "memory"
}

/// What the config loader saw that an operator should know about but is not an error.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// `GARAGE_*` variables that name no config field (client tools use some, e.g.
    /// `GARAGE_API_KEY`), so they are ignored rather than refused.
    pub ignored_env: Vec<String>,
}

impl Config {
    /// Parses `toml_text` (or the defaults when `None`), then applies `GARAGE_*` overrides from
    /// `env`, then validates.
    pub fn load(
        toml_text: Option<&str>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(Config, LoadReport), ConfigError> {
        let mut table: toml::Table = match toml_text {
            Some(text) => toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?,
            None => toml::Table::new(),
        };
        let mut report = LoadReport::default();
        let mut otel_endpoint = None;
        for (name, raw) in env {
            if name == telemetry::OTEL_EXPORTER_OTLP_ENDPOINT {
                otel_endpoint = Some(raw);
                continue;
            }
            let Some(suffix) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let Some(path) = ENV_FIELDS
                .iter()
                .find(|field| field.replace(['.', '-'], "_").eq_ignore_ascii_case(suffix))
            else {
                report.ignored_env.push(name);
                continue;
            };
            set_path(&mut table, path, parse_env_value(&raw));
        }
        let mut config: Config = Config::deserialize(toml::Value::Table(table))
            .map_err(|e| ConfigError::Parse(e.to_string()))?;
        config.telemetry.adopt_standard_endpoint(otel_endpoint);
        config.validate()?;
        Ok((config, report))
    }

    /// Reads and parses a config file.
    pub fn load_file(
        path: &std::path::Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(Config, LoadReport), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::load(Some(&text), env)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |msg: String| Err(ConfigError::Invalid(msg));
        if !is_embedded(&self.store)
            && !REDIS_SCHEMES
                .iter()
                .any(|scheme| self.store.starts_with(scheme))
        {
            return invalid(format!(
                "store = {:?}: expected \"memory\" or a redis:// URL (rediss://, \
                 redis+cluster://, redis+sentinel:// too)",
                self.store
            ));
        }
        match (&self.cluster.advertise_url, &self.cluster.secret) {
            (None, None) => {}
            (Some(_), None) | (None, Some(_)) => {
                return invalid(
                    "cluster.advertise_url and cluster.secret go together: set both for \
                     replicas to forward requests to each other's rigs, or neither"
                        .into(),
                );
            }
            (Some(url), Some(secret)) => {
                if is_embedded(&self.store) {
                    return invalid(
                        "cluster needs a Redis store: replicas find each other's rigs there".into(),
                    );
                }
                let authority = url
                    .strip_prefix("http://")
                    .map(|rest| rest.trim_end_matches('/'));
                if authority.is_none_or(|a| {
                    a.is_empty() || a.contains('/') || http::uri::Authority::try_from(a).is_err()
                }) {
                    return invalid(format!(
                        "cluster.advertise_url = {url:?}: expected http://host:port, this \
                         replica's listener as the other replicas reach it (HTTP/2 without \
                         TLS, on the private network between replicas)"
                    ));
                }
                if secret.chars().count() < MIN_CLUSTER_SECRET {
                    return invalid(format!(
                        "cluster.secret is too short: at least {MIN_CLUSTER_SECRET} characters"
                    ));
                }
            }
        }
        if !is_embedded(&self.store) && self.auth.key_secret.is_none() {
            return invalid(
                "auth.key_secret is required with a Redis store: every replica must hash API keys \
                 alike, and keys must survive a restart"
                    .into(),
            );
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return invalid(
                "tls_cert_file and tls_key_file go together: set both to serve HTTPS, or neither"
                    .into(),
            );
        }
        for origin in &self.cors.allowed_origins {
            if origin == "*" {
                if self.cors.allowed_origins.len() > 1 {
                    return invalid(
                        "cors.allowed_origins: \"*\" allows every origin; list it alone".into(),
                    );
                }
                continue;
            }
            let scheme_host = origin
                .strip_prefix("https://")
                .or_else(|| origin.strip_prefix("http://"));
            let well_formed = scheme_host.is_some_and(|rest| {
                !rest.is_empty()
                    && !rest.contains('/')
                    && http::HeaderValue::from_str(origin).is_ok()
            });
            if !well_formed {
                return invalid(format!(
                    "cors.allowed_origins: {origin:?} is not an origin (scheme://host[:port], \
                     no path, such as \"https://app.example.com\"), nor \"*\""
                ));
            }
        }
        if !(0.0..=1.0).contains(&self.trust.replay_share) {
            return invalid(format!(
                "trust.replay_share = {}: a share of requests, from 0 (never) to 1 (every one)",
                self.trust.replay_share
            ));
        }
        if !(self.trust.logprob_tolerance.is_finite() && self.trust.logprob_tolerance >= 0.0) {
            return invalid(format!(
                "trust.logprob_tolerance = {}: a mean difference of log-probabilities, 0 or more",
                self.trust.logprob_tolerance
            ));
        }
        if self.dispatch.max_attempts == 0 {
            return invalid("dispatch.max_attempts must be at least 1".into());
        }
        if self.worker_threads > MAX_WORKER_THREADS {
            return invalid(format!(
                "worker_threads = {}: at most {MAX_WORKER_THREADS} (0 is one per CPU core)",
                self.worker_threads
            ));
        }
        if self.usage.ledger_max_entries == 0 {
            return invalid("usage.ledger_max_entries must be at least 1".into());
        }
        let thresholds = &self.usage.budget_alert_thresholds;
        if thresholds.len() > 10 || thresholds.iter().any(|t| !(1..=100).contains(t)) {
            return invalid(format!(
                "usage.budget_alert_thresholds = {thresholds:?}: at most 10 percentages, each \
                 from 1 to 100"
            ));
        }
        if let Some(problem) = self.accounts.problem() {
            return invalid(problem);
        }
        if let Err(problem) = self.telemetry.validate() {
            return invalid(problem);
        }
        if let Some(problem) = self.webhooks.problem() {
            return invalid(problem);
        }
        let mut names = std::collections::HashSet::new();
        for upstream in &self.upstreams {
            if !names.insert(upstream.name.as_str()) {
                return invalid(format!("upstream name {:?} is used twice", upstream.name));
            }
            if !upstream.base_url.starts_with("http://")
                && !upstream.base_url.starts_with("https://")
            {
                return invalid(format!(
                    "upstream {:?}: base_url {:?} must start with http:// or https://",
                    upstream.name, upstream.base_url
                ));
            }
            if upstream.unix_socket.is_some() && !upstream.base_url.starts_with("http://") {
                return invalid(format!(
                    "upstream {:?}: with unix_socket, base_url {:?} must start with http:// \
                     (no TLS on a local socket)",
                    upstream.name, upstream.base_url
                ));
            }
            if upstream
                .api_key
                .as_ref()
                .is_some_and(|key| bearer_authorization(key).is_err())
            {
                return invalid(format!(
                    "upstream {:?}: api_key must be printable ASCII (it is sent as a header)",
                    upstream.name
                ));
            }
            if upstream.models.is_empty() {
                return invalid(format!("upstream {:?} serves no models", upstream.name));
            }
        }
        Ok(())
    }
}

/// An environment value is read as a TOML value when it parses as one (numbers, booleans,
/// arrays, inline tables), and as a plain string otherwise, so `GARAGE_LISTEN=0.0.0.0:80` needs
/// no quoting.
fn parse_env_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

fn set_path(table: &mut toml::Table, path: &str, value: toml::Value) {
    let mut parts = path.split('.').peekable();
    let mut current = table;
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            current.insert(part.to_owned(), value);
            return;
        }
        let entry = current
            .entry(part.to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        let toml::Value::Table(next) = entry else {
            return;
        };
        current = next;
    }
}

#[cfg(test)]
mod tests {

    /// The example in the docs is complete and valid: it loads, and it names every field the
    /// config has (a new field without an example line fails here).
    #[test]
    fn the_documented_example_loads_and_is_complete() {
        let example = include_str!("../../../docs/gateway.toml");
        let (config, _) = Config::load(Some(example), std::iter::empty())
            .unwrap_or_else(|e| panic!("docs/gateway.toml: {e}"));
        assert_eq!(config.upstreams.len(), 2);
        let documented: toml::Table = toml::from_str(example).unwrap();
        let defaults = toml::Table::try_from(Config::default()).unwrap();
        fn missing(prefix: &str, want: &toml::Table, have: &toml::Table, out: &mut Vec<String>) {
            for (name, value) in want {
                let path = format!("{prefix}{name}");
                match (value, have.get(name)) {
                    (_, None) => out.push(path),
                    (toml::Value::Table(want), Some(toml::Value::Table(have))) => {
                        missing(&format!("{path}."), want, have, out)
                    }
                    _ => {}
                }
            }
        }
        let mut undocumented = Vec::new();
        missing("", &defaults, &documented, &mut undocumented);
        // Every slot has the router's fields: documented once, under [plugins.router].
        undocumented.retain(|path| {
            !["plugins.rate-limiter.", "plugins.meter.", "plugins.reward."]
                .iter()
                .any(|slot| path.starts_with(slot))
        });
        // Fields that are unset by default (no value to serialize) are documented by hand.
        assert!(
            undocumented.is_empty(),
            "docs/gateway.toml lacks: {undocumented:?}"
        );
    }
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_section_given_in_part_keeps_the_defaults_of_the_rest() {
        // A section present in the file is built from its own `Default`: that must agree with
        // the defaults a config without the section gets.
        let text = "[auth]\n[dispatch]\n[nodes]\n[usage]\n[batch]\n[plugins]\n\
                    [plugins.router]\n[plugins.rate-limiter]\n[plugins.meter]\n[plugins.reward]\n";
        let (given, _) = Config::load(Some(text), env(&[])).unwrap();
        let (absent, _) = Config::load(None, env(&[])).unwrap();
        let json = |config: &Config| serde_json::to_value(config).unwrap();
        assert_eq!(json(&given), json(&absent));
        assert_eq!(given.auth.key_cache_secs, 60);
    }

    #[test]
    fn defaults_without_a_file() {
        let (config, _) = Config::load(None, env(&[])).unwrap();
        assert_eq!(config.store, "memory");
        assert!(config.upstreams.is_empty());
    }

    #[test]
    fn env_overrides_file() {
        let text = "listen = \"127.0.0.1:9000\"\n[dispatch]\nmax_attempts = 2\n";
        let (config, report) = Config::load(
            Some(text),
            env(&[
                ("GARAGE_LISTEN", "0.0.0.0:7000"),
                ("GARAGE_DISPATCH_MAX_ATTEMPTS", "5"),
                ("GARAGE_AUTH_ADMIN_TOKEN", "s3cret"),
                ("GARAGE_API_KEY", "client-side"),
                ("PATH", "/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(config.listen.to_string(), "0.0.0.0:7000");
        assert_eq!(config.dispatch.max_attempts, 5);
        assert_eq!(config.auth.admin_token.as_deref(), Some("s3cret"));
        assert_eq!(report.ignored_env, vec!["GARAGE_API_KEY".to_string()]);
    }

    #[test]
    fn cors_origins_are_origins_or_a_lone_star() {
        let load = |origins: &str| {
            Config::load(
                Some(&format!("[cors]\nallowed_origins = {origins}\n")),
                std::iter::empty(),
            )
            .map(|(config, _)| config.cors.allowed_origins)
        };
        assert_eq!(
            load(r#"["https://app.example.com", "http://localhost:3000"]"#).unwrap(),
            ["https://app.example.com", "http://localhost:3000"]
        );
        assert_eq!(load(r#"["*"]"#).unwrap(), ["*"]);
        for bad in [
            r#"["*", "https://app.example.com"]"#,
            r#"["app.example.com"]"#,
            r#"["https://app.example.com/"]"#,
            r#"["https://app.example.com/chat"]"#,
            r#"["https://"]"#,
            r#"["ftp://app.example.com"]"#,
        ] {
            let error = load(bad).unwrap_err().to_string();
            assert!(error.contains("cors.allowed_origins"), "{bad}: {error}");
        }
        // And from the environment, as an inline array.
        let (config, _) = Config::load(
            None,
            [(
                "GARAGE_CORS_ALLOWED_ORIGINS".to_owned(),
                r#"["https://app.example.com"]"#.to_owned(),
            )],
        )
        .unwrap();
        assert_eq!(config.cors.allowed_origins, ["https://app.example.com"]);
    }

    #[test]
    fn upstreams_from_env_as_inline_toml() {
        let (config, _) = Config::load(
            None,
            env(&[(
                "GARAGE_UPSTREAMS",
                r#"[{name = "a", base_url = "http://127.0.0.1:8000/v1", models = ["m"]}]"#,
            )]),
        )
        .unwrap();
        assert_eq!(config.upstreams[0].models, vec!["m".to_string()]);
    }

    #[test]
    fn an_upstream_on_a_unix_socket_speaks_plain_http() {
        let upstream = |base_url: &str| {
            let toml = format!(
                "[[upstreams]]\nname = \"local\"\nbase_url = \"{base_url}\"\n\
                 models = [\"m\"]\nunix_socket = \"/run/vllm.sock\"\n"
            );
            Config::load(Some(&toml), env(&[])).map(|(config, _)| config)
        };
        let config = upstream("http://localhost/v1").unwrap();
        assert_eq!(
            config.upstreams[0].unix_socket.as_deref(),
            Some(std::path::Path::new("/run/vllm.sock"))
        );
        let error = upstream("https://localhost/v1").unwrap_err().to_string();
        assert!(
            error.contains("unix_socket") && error.contains("http://"),
            "{error}"
        );
    }

    #[test]
    fn every_field_has_an_env_name() {
        // Every leaf of the serialized defaults (plus the optional fields, which serialize to
        // nothing) must be reachable from the environment.
        let mut config = Config::default();
        config.auth.admin_token = Some("x".into());
        config.auth.key_secret = Some("x".into());
        config.cluster.advertise_url = Some("x".into());
        config.cluster.secret = Some("x".into());
        for limits in [
            &mut config.plugins.router,
            &mut config.plugins.rate_limiter,
            &mut config.plugins.meter,
            &mut config.plugins.reward,
        ] {
            limits.deadline_ms = Some(1);
        }
        let value = toml::Value::try_from(&config).unwrap();
        let mut leaves = Vec::new();
        fn walk(prefix: &str, value: &toml::Value, out: &mut Vec<String>) {
            match value {
                toml::Value::Table(t) => {
                    for (k, v) in t {
                        let path = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        walk(&path, v, out);
                    }
                }
                _ => out.push(prefix.to_owned()),
            }
        }
        walk("", &value, &mut leaves);
        for leaf in leaves {
            assert!(
                ENV_FIELDS.contains(&leaf.as_str()),
                "{leaf} has no env name"
            );
        }
    }
}
