//! node-runner configuration: strict TOML, validated once, with a few environment overrides.
//!
//! Loading takes its sources as arguments (the TOML text and an iterator of environment pairs) so
//! tests never touch the process environment.
//!
//! ```toml
//! gateway_url = "https://gateway.example.com"
//! # or, for several replicas of one gateway sharing one store (the rig moves between them):
//! # gateway_urls = ["https://gw-a.example.com", "https://gw-b.example.com"]
//! gateway_ca_file = "/etc/garage/ca.pem" # optional: a private CA the gateway's certificate is from
//! enrollment_token = "et_..."          # first start only
//!
//! [[engines]]
//! name = "llama"
//! driver = "docker"
//! models = ["meta-llama/Llama-3.1-8B-Instruct"]
//! gpus = [0]
//! port = 8001
//! model_cache = "/srv/hf-cache"
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};

/// Environment variables that override a top-level string field, and the field each sets.
/// `NODE_RUNNER_GATEWAY_URL` takes a comma-separated list too: with several URLs it sets
/// `gateway_urls` instead. Either way it replaces both fields of the file.
pub const ENV_OVERRIDES: &[(&str, &str)] = &[
    (GATEWAY_URL_ENV, "gateway_url"),
    ("NODE_RUNNER_ENROLLMENT_TOKEN", "enrollment_token"),
    ("NODE_RUNNER_NAME", "name"),
    ("NODE_RUNNER_STATE_FILE", "state_file"),
    ("NODE_RUNNER_GATEWAY_CA_FILE", "gateway_ca_file"),
];

const GATEWAY_URL_ENV: &str = "NODE_RUNNER_GATEWAY_URL";

/// The official vLLM OpenAI-compatible server image.
pub const DEFAULT_DOCKER_IMAGE: &str = "vllm/vllm-openai:latest";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Parse(String),
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// The whole node-runner configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// The gateway, e.g. `https://gateway.example.com` (plain `http://` for local trials): one
    /// gateway, or its replicas behind one load balancer. See [`NodeConfig::gateways`].
    #[serde(default)]
    pub gateway_url: Option<String>,
    /// Instead of `gateway_url`: the URLs of several replicas of one gateway (sharing one
    /// store, so the rig's credential is good at each). The rig keeps its tunnel on one and
    /// moves to the next when that one goes away.
    #[serde(default)]
    pub gateway_urls: Option<Vec<String>>,
    /// A PEM file of certificate authorities trusted for the gateway besides the public web
    /// roots: for a gateway whose certificate comes from a private CA.
    #[serde(default)]
    pub gateway_ca_file: Option<PathBuf>,
    /// Allow a plain `http://` gateway URL to a host other than this machine. Off: the rig's
    /// credential and every prompt it serves would cross the network in clear, readable and
    /// changeable by anyone on the way.
    #[serde(default)]
    pub allow_insecure_http: bool,
    /// Enrollment token from the admin API; needed only until the state file holds an identity.
    #[serde(default)]
    pub enrollment_token: Option<String>,
    /// Name shown to admins; the hostname when unset (see [`NodeConfig::node_name`]).
    #[serde(default)]
    pub name: Option<String>,
    /// Where the node identity is kept between starts.
    #[serde(default = "default_state_file")]
    pub state_file: PathBuf,
    /// Heartbeat period; by default what the gateway asks for at enrollment.
    #[serde(default)]
    pub heartbeat_interval_secs: Option<u64>,
    /// On SIGTERM, how long in-flight requests may take to finish before the engines stop.
    #[serde(default = "default_drain_timeout_secs")]
    pub drain_timeout_secs: u64,
    /// The engines this rig runs (`[[engines]]` tables).
    #[serde(default)]
    pub engines: Vec<EngineConfig>,
    /// Batch API work (`[batch]`).
    #[serde(default)]
    pub batch: BatchConfig,
    /// Labels routers may read (`[labels]`, e.g. `region = "eu"`), sent with every heartbeat.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// This rig's GPUs serve another rig's engine group (`[group_member]`).
    #[serde(default)]
    pub group_member: Option<GroupMemberConfig>,
}

/// How the rig takes Batch API work: only while its engines have room, so interactive requests
/// come first.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// Pull batch work at all.
    pub enabled: bool,
    /// Most batch lines running at once on this rig. Keep it well under the engines'
    /// `max_num_seqs` so that interactive requests always find a free sequence.
    pub max_concurrency: usize,
    /// Take batch work only while no engine has more requests than this waiting.
    pub max_waiting: u32,
    /// How long one request for work may wait at the gateway, in seconds (a long poll).
    pub poll_wait_secs: u64,
}

impl Default for BatchConfig {
    fn default() -> Self {
        let options = crate::batch::BatchOptions::default();
        BatchConfig {
            enabled: options.enabled,
            max_concurrency: options.max_concurrency,
            max_waiting: options.max_waiting,
            poll_wait_secs: options.poll_wait.as_secs(),
        }
    }
}

impl BatchConfig {
    pub fn options(&self) -> crate::batch::BatchOptions {
        crate::batch::BatchOptions {
            enabled: self.enabled,
            max_concurrency: self.max_concurrency.max(1),
            max_waiting: self.max_waiting,
            poll_wait: Duration::from_secs(self.poll_wait_secs.max(1)),
        }
    }
}

/// One engine: a server speaking vLLM's OpenAI API on `127.0.0.1:port`.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Unique on the rig; also names the container (`garage-<name>`), so `[A-Za-z0-9_.-]` only.
    pub name: String,
    /// Served model names; requests naming one of them are routed here.
    pub models: Vec<String>,
    /// GPU indexes (as NVML and `nvidia-smi` number them) reserved for this engine.
    pub gpus: Vec<u32>,
    /// Where the engine listens on 127.0.0.1; 0 (simulated engines only) picks a free port.
    pub port: u16,
    /// How it runs. In TOML, `driver = "docker" | "process" | "simulated"` beside the driver's
    /// own fields in the same table.
    pub driver: Driver,
    /// How long the engine may take to answer `/health` after a start.
    pub health_timeout_secs: u64,
}

/// How an engine runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Driver {
    Docker(DockerDriver),
    Process(ProcessDriver),
    Simulated(SimulatedDriver),
}

impl Driver {
    /// The `driver = "..."` tag.
    pub fn kind(&self) -> &'static str {
        match self {
            Driver::Docker(_) => "docker",
            Driver::Process(_) => "process",
            Driver::Simulated(_) => "simulated",
        }
    }
}

/// vLLM in a container, through the Docker Engine API (Podman's compatible socket works too).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DockerDriver {
    #[serde(default = "default_docker_image")]
    pub image: String,
    /// Host directory mounted at `/root/.cache/huggingface`, so weights survive restarts.
    #[serde(default)]
    pub model_cache: Option<String>,
    /// Container environment (e.g. `HF_TOKEN`).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Extra `vllm serve` arguments, e.g. `["--max-model-len", "8192"]`.
    #[serde(default)]
    pub args: Vec<String>,
    /// `unix:///run/podman/podman.sock`, `tcp://host:2375`...; by default `DOCKER_HOST` or the
    /// local socket.
    #[serde(default)]
    pub docker_host: Option<String>,
    /// Size of the container's `/dev/shm`; see `engines::docker::DEFAULT_SHM_SIZE_BYTES`.
    #[serde(default)]
    pub shm_size_bytes: Option<i64>,
}

/// A plain process, e.g. `vllm serve` from a virtualenv or the `sim-engine` binary.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessDriver {
    /// Program and arguments; `{port}` in an argument or an env value becomes the engine's port.
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub workdir: Option<PathBuf>,
    /// This engine is the head of an engine group (`[engines.group]`): one model across this
    /// rig and member rigs on the same LAN, over Ray.
    #[serde(default)]
    pub group: Option<EngineGroup>,
}

/// Ray's port on a group's head unless configured (Ray's own default).
pub const DEFAULT_RAY_PORT: u16 = 6379;

fn default_ray_port() -> u16 {
    DEFAULT_RAY_PORT
}

fn default_ray_command() -> Vec<String> {
    vec!["ray".to_owned()]
}

/// The head's side of an engine group: this rig runs Ray's head and vLLM, pipeline parallel
/// across itself and its members (tensor parallel across each rig's GPUs). Ray and vLLM's
/// traffic between rigs is unauthenticated and heavy: a LAN, never the internet.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EngineGroup {
    /// This rig's address on the LAN: the members' Ray workers connect to it.
    pub address: String,
    /// Ray's port on this rig.
    #[serde(default = "default_ray_port")]
    pub ray_port: u16,
    /// Each member's channel, `host:port` (its `[group_member] listen`).
    pub members: Vec<String>,
    /// Shared with the members: the head's requests to them carry it.
    pub secret: String,
    /// The `ray` program (and arguments before `start`), e.g. from vLLM's virtualenv.
    #[serde(default = "default_ray_command")]
    pub ray_command: Vec<String>,
}

/// This rig lends its GPUs to an engine group whose head is another rig (`[group_member]`):
/// it runs a Ray worker that joins the head's Ray, and answers the head on `listen`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GroupMemberConfig {
    /// The group's engine name on the head (for logs and the member's answers).
    pub group: String,
    /// The head's Ray, `host:port`.
    pub head: String,
    /// Where the head asks this rig how its worker is and tells it to restart (on the LAN).
    pub listen: std::net::SocketAddr,
    /// The head's `secret`.
    pub secret: String,
    /// GPUs given to the group.
    #[serde(default)]
    pub gpus: Vec<u32>,
    #[serde(default = "default_ray_command")]
    pub ray_command: Vec<String>,
}

/// The simulated vLLM engine, run inside node-runner (no GPU needed).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SimulatedDriver {
    /// Time to first token.
    #[serde(default)]
    pub ttft_ms: u64,
    /// Decode speed; 0 means unlimited.
    #[serde(default)]
    pub tokens_per_sec: f64,
    /// Share of requests answered 500.
    #[serde(default)]
    pub error_rate: f64,
    /// Share of requests never answered.
    #[serde(default)]
    pub hang_rate: f64,
    /// Share of streams dropped midway.
    #[serde(default)]
    pub drop_rate: f64,
    /// Requests running at once; the rest queue.
    #[serde(default = "default_max_num_seqs")]
    pub max_num_seqs: usize,
    /// Tokens generated when a request sets no `max_tokens`.
    #[serde(default = "default_max_tokens")]
    pub default_max_tokens: u32,
    /// A dishonest engine: report this many prompt and completion tokens in every answer,
    /// whatever was generated. For testing what a gateway believes of a rig.
    #[serde(default)]
    pub claim_tokens: Option<u64>,
    /// A dishonest engine: answer under `models` but generate (tokens and log-probabilities)
    /// as this model would, e.g. a small model under a big one's name. For testing a gateway's
    /// spot checks.
    #[serde(default)]
    pub impersonate: Option<String>,
    /// A dishonest engine: multiply every token count it reports (prompt and completion, in
    /// every answer's usage) by this, e.g. `3.0`. The text is unchanged.
    #[serde(default)]
    pub usage_inflation: Option<f64>,
    /// Legitimate hardware noise: the standard deviation, in nats, of a small deviation each
    /// engine adds to the log-probabilities it reports (its own, drawn at each start), never
    /// changing a token. 0 reports the model's exact values.
    #[serde(default)]
    pub logprob_noise: f64,
    /// GPUs the rig reports for this engine where NVML finds none (product names, such as
    /// `NVIDIA GeForce RTX 4090`), their utilisation and memory following the engine's load:
    /// for demos, and for testing what a gateway makes of reported hardware.
    #[serde(default)]
    pub reported_gpus: Vec<String>,
}

impl Default for SimulatedDriver {
    fn default() -> Self {
        Self {
            ttft_ms: 0,
            tokens_per_sec: 0.0,
            error_rate: 0.0,
            hang_rate: 0.0,
            drop_rate: 0.0,
            max_num_seqs: default_max_num_seqs(),
            default_max_tokens: default_max_tokens(),
            claim_tokens: None,
            impersonate: None,
            usage_inflation: None,
            logprob_noise: 0.0,
            reported_gpus: Vec::new(),
        }
    }
}

fn default_state_file() -> PathBuf {
    PathBuf::from("node-runner-state.json")
}

/// Long enough for a chat answer to finish streaming, short enough for a service manager's stop
/// timeout (systemd's default is 90 s).
fn default_drain_timeout_secs() -> u64 {
    30
}

/// vLLM downloads and loads weights before `/health` answers: minutes for a large model.
pub const DEFAULT_HEALTH_TIMEOUT_SECS: u64 = 600;

fn default_health_timeout_secs() -> u64 {
    DEFAULT_HEALTH_TIMEOUT_SECS
}

fn default_docker_image() -> String {
    DEFAULT_DOCKER_IMAGE.to_owned()
}

/// Same defaults as `sim-engine`'s command line.
fn default_max_num_seqs() -> usize {
    64
}

fn default_max_tokens() -> u32 {
    16
}

/// The fields every engine takes, whatever its driver.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EngineCommon {
    name: String,
    models: Vec<String>,
    #[serde(default)]
    gpus: Vec<u32>,
    #[serde(default)]
    port: u16,
    #[serde(default = "default_health_timeout_secs")]
    health_timeout_secs: u64,
}

const ENGINE_COMMON_FIELDS: &[&str] = &["name", "models", "gpus", "port", "health_timeout_secs"];
const DRIVERS: &[&str] = &["docker", "process", "simulated"];

/// An engine table holds the common fields, `driver`, and that driver's fields side by side.
/// serde's `flatten` would read that shape but silently disables `deny_unknown_fields`, so the
/// table is split by hand: common fields first, then the rest must be the driver's.
impl<'de> Deserialize<'de> for EngineConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut table = toml::Table::deserialize(deserializer)?;
        let name = table
            .get("name")
            .and_then(toml::Value::as_str)
            .map(str::to_owned);
        let fail = |message: String| -> D::Error {
            match &name {
                Some(name) => de::Error::custom(format!("engine {name:?}: {message}")),
                None => de::Error::custom(message),
            }
        };
        let driver = match table.remove("driver") {
            Some(toml::Value::String(driver)) => driver,
            Some(other) => {
                return Err(fail(format!(
                    "driver = {other} is not one of {}",
                    DRIVERS.join(", ")
                )));
            }
            None => {
                return Err(fail(format!(
                    "driver is missing (one of {})",
                    DRIVERS.join(", ")
                )));
            }
        };
        let mut common = toml::Table::new();
        for field in ENGINE_COMMON_FIELDS {
            if let Some(value) = table.remove(*field) {
                common.insert((*field).to_owned(), value);
            }
        }
        let common = EngineCommon::deserialize(toml::Value::Table(common))
            .map_err(|e| fail(one_line(&e)))?;
        let rest = toml::Value::Table(table);
        let in_driver = |e: toml::de::Error| fail(format!("{} ({driver} driver)", one_line(&e)));
        let driver = match driver.as_str() {
            "docker" => Driver::Docker(DockerDriver::deserialize(rest).map_err(in_driver)?),
            "process" => Driver::Process(ProcessDriver::deserialize(rest).map_err(in_driver)?),
            "simulated" => {
                Driver::Simulated(SimulatedDriver::deserialize(rest).map_err(in_driver)?)
            }
            other => {
                return Err(fail(format!(
                    "driver {other:?} is not one of {}",
                    DRIVERS.join(", ")
                )));
            }
        };
        Ok(EngineConfig {
            name: common.name,
            models: common.models,
            gpus: common.gpus,
            port: common.port,
            driver,
            health_timeout_secs: common.health_timeout_secs,
        })
    }
}

/// A nested error on one line: its `in `field`` suffix joins the message.
fn one_line(error: &toml::de::Error) -> String {
    error.to_string().trim_end().replace("\nin ", " in ")
}

impl NodeConfig {
    /// Parses `toml_text`, applies the `NODE_RUNNER_*` overrides found in `env` (other variables
    /// are ignored), then validates.
    pub fn load(
        toml_text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<NodeConfig, ConfigError> {
        let mut table: toml::Table =
            toml::from_str(toml_text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        for (name, value) in env {
            if name == GATEWAY_URL_ENV {
                table.remove("gateway_url");
                table.remove("gateway_urls");
                let urls: Vec<&str> = value.split(',').collect();
                if let [_] = urls[..] {
                    table.insert("gateway_url".to_owned(), toml::Value::String(value));
                } else {
                    let urls = urls
                        .into_iter()
                        .map(|url| toml::Value::String(url.trim().to_owned()))
                        .collect();
                    table.insert("gateway_urls".to_owned(), toml::Value::Array(urls));
                }
            } else if let Some((_, field)) = ENV_OVERRIDES.iter().find(|(var, _)| *var == name) {
                table.insert((*field).to_owned(), toml::Value::String(value));
            }
        }
        let mut config = NodeConfig::deserialize(toml::Value::Table(table))
            .map_err(|e| ConfigError::Parse(e.to_string()))?;
        // An empty override (`NODE_RUNNER_ENROLLMENT_TOKEN=`) means "none", not "empty".
        for field in [&mut config.enrollment_token, &mut config.name] {
            if field.as_deref().is_some_and(|v| v.trim().is_empty()) {
                *field = None;
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// Reads and loads a config file.
    pub fn load_file(
        path: impl AsRef<Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<NodeConfig, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::load(&text, env)
    }

    /// The gateway's URLs, without trailing slashes: `gateway_url` alone, or `gateway_urls`.
    /// Never empty once loaded.
    pub fn gateways(&self) -> Vec<String> {
        self.gateway_url
            .iter()
            .chain(self.gateway_urls.iter().flatten())
            .map(|url| crate::gateways::normalize(url))
            .collect()
    }

    /// How `run` starts the agent for this config (`setup` and `doctor` start it the same way).
    pub fn agent_options(&self) -> Result<crate::agent::AgentOptions, crate::agent::CaFileError> {
        let http = self
            .gateway_ca_file
            .as_deref()
            .map(crate::agent::http_client_trusting)
            .transpose()?;
        Ok(crate::agent::AgentOptions {
            gateway_url: self.gateways().join(","),
            name: self.node_name(),
            enrollment_token: self.enrollment_token.clone(),
            state_file: Some(self.state_file.clone()),
            heartbeat_interval: self.heartbeat_interval_secs.map(Duration::from_secs),
            drain_timeout: Duration::from_secs(self.drain_timeout_secs),
            http,
            probe_gpus: true,
            batch: self.batch.options(),
            labels: self.labels.clone(),
        })
    }

    /// The rig's name: the configured one, else the hostname.
    pub fn node_name(&self) -> String {
        self.name.clone().unwrap_or_else(hostname)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |message: String| Err(ConfigError::Invalid(message));
        self.validate_gateways()?;
        if self.heartbeat_interval_secs == Some(0) {
            return invalid("heartbeat_interval_secs must be at least 1".into());
        }
        if self.engines.is_empty() && self.group_member.is_none() {
            return invalid(
                "no engines: a rig needs at least one [[engines]] table (or a [group_member] \
                 table, lending its GPUs to another rig's engine group)"
                    .into(),
            );
        }
        if let Some(member) = &self.group_member {
            let secret_and_ray = validate_group_parts(&member.secret, &member.ray_command);
            if let Err(message) = secret_and_ray {
                return invalid(format!("group_member: {message}"));
            }
            if !member.head.contains(':') {
                return invalid(format!(
                    "group_member: head {:?} must be the head's Ray address, host:port",
                    member.head
                ));
            }
        }
        let mut names = HashSet::new();
        let mut ports = HashMap::new();
        let mut gpus = HashMap::new();
        for engine in &self.engines {
            engine.validate()?;
            if !names.insert(engine.name.as_str()) {
                return invalid(format!("engine name {:?} is used twice", engine.name));
            }
            if engine.port != 0
                && let Some(other) = ports.insert(engine.port, engine.name.as_str())
            {
                return invalid(format!(
                    "engines {other:?} and {:?} both listen on port {}",
                    engine.name, engine.port
                ));
            }
            let member_gpus = self.group_member.iter().flat_map(|m| &m.gpus);
            if let Some(gpu) = member_gpus.clone().find(|gpu| engine.gpus.contains(gpu)) {
                return invalid(format!(
                    "GPU {gpu} is pinned to engine {:?} and lent to group_member",
                    engine.name
                ));
            }
            for gpu in &engine.gpus {
                match gpus.insert(*gpu, engine.name.as_str()) {
                    None => {}
                    Some(other) if other == engine.name => {
                        return invalid(format!("engine {other:?} lists GPU {gpu} twice"));
                    }
                    Some(other) => {
                        return invalid(format!(
                            "GPU {gpu} is pinned to two engines, {other:?} and {:?}",
                            engine.name
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// One gateway URL or a list of them, each `http(s)://`, plain http only to this machine
    /// unless allowed, none twice.
    fn validate_gateways(&self) -> Result<(), ConfigError> {
        let invalid = |message: String| Err(ConfigError::Invalid(message));
        let urls: Vec<(String, &str)> = match (&self.gateway_url, &self.gateway_urls) {
            (Some(_), Some(_)) => {
                return invalid(
                    "gateway_url and gateway_urls are both set: give one URL, or the list of \
                     the gateway's replicas"
                        .into(),
                );
            }
            (None, None) => {
                return invalid(
                    "no gateway: set gateway_url (or gateway_urls, for several replicas of one \
                     gateway)"
                        .into(),
                );
            }
            (None, Some(list)) if list.is_empty() => {
                return invalid("gateway_urls is empty: list the gateway's replicas".into());
            }
            (Some(url), None) => vec![("gateway_url".to_owned(), url.as_str())],
            (None, Some(list)) => list
                .iter()
                .enumerate()
                .map(|(i, url)| (format!("gateway_urls[{i}]"), url.as_str()))
                .collect(),
        };
        let mut seen = HashSet::new();
        for (field, url) in urls {
            if !url.starts_with("http://") && !url.starts_with("https://") {
                return invalid(format!(
                    "{field} {url:?} must start with http:// or https://"
                ));
            }
            if url.starts_with("http://") && !self.allow_insecure_http && !is_loopback_url(url) {
                return invalid(format!(
                    "{field} {url:?} is plain http to another machine: the rig's credential and \
                     every prompt would cross the network in clear. Use https:// (the gateway \
                     serves TLS with tls_cert_file, or sits behind a TLS proxy), or set \
                     allow_insecure_http = true for a network you trust"
                ));
            }
            if !seen.insert(crate::gateways::normalize(url)) {
                return invalid(format!("{field} {url:?} is in gateway_urls twice"));
            }
        }
        Ok(())
    }
}

impl EngineConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let name = &self.name;
        let invalid = |message: String| Err(ConfigError::Invalid(message));
        let container_safe = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if name.is_empty() || !name.chars().all(container_safe) {
            return invalid(format!(
                "engine name {name:?} may use only letters, digits, '-', '_' and '.' \
                 (it names the engine's container)"
            ));
        }
        if self.models.is_empty() {
            return invalid(format!("engine {name:?} serves no models"));
        }
        if self.models.iter().any(|m| m.trim().is_empty()) {
            return invalid(format!("engine {name:?}: a model name is empty"));
        }
        if self.health_timeout_secs == 0 {
            return invalid(format!(
                "engine {name:?}: health_timeout_secs must be at least 1"
            ));
        }
        let env = match &self.driver {
            Driver::Docker(docker) => Some(&docker.env),
            Driver::Process(process) => Some(&process.env),
            Driver::Simulated(_) => None,
        };
        if let Some(key) = env
            .into_iter()
            .flat_map(|env| env.keys())
            .find(|k| k.is_empty() || k.contains('='))
        {
            return invalid(format!(
                "engine {name:?}: {key:?} is not a valid environment variable name"
            ));
        }
        if self.port == 0 && !matches!(self.driver, Driver::Simulated(_)) {
            return invalid(format!(
                "engine {name:?}: port is required ({} engines do not pick their own; only \
                 simulated ones take port 0)",
                self.driver.kind()
            ));
        }
        match &self.driver {
            Driver::Docker(docker) => {
                if docker.image.trim().is_empty() {
                    return invalid(format!("engine {name:?}: image is empty"));
                }
                if docker.shm_size_bytes.is_some_and(|size| size <= 0) {
                    return invalid(format!("engine {name:?}: shm_size_bytes must be positive"));
                }
            }
            Driver::Process(process) => {
                if process.command.first().is_none_or(|p| p.trim().is_empty()) {
                    return invalid(format!(
                        "engine {name:?}: command is empty (give the program and its arguments)"
                    ));
                }
                if let Some(group) = &process.group {
                    if let Err(message) = validate_group_parts(&group.secret, &group.ray_command) {
                        return invalid(format!("engine {name:?}: group: {message}"));
                    }
                    if group.members.is_empty() {
                        return invalid(format!(
                            "engine {name:?}: group has no members (list each member rig's \
                             listen address, host:port)"
                        ));
                    }
                    if let Some(bad) = group.members.iter().find(|m| !m.contains(':')) {
                        return invalid(format!(
                            "engine {name:?}: group member {bad:?} must be host:port"
                        ));
                    }
                    if group.address.trim().is_empty() || group.ray_port == 0 {
                        return invalid(format!(
                            "engine {name:?}: group needs this rig's LAN address and a Ray port"
                        ));
                    }
                }
            }
            Driver::Simulated(sim) => {
                for (field, rate) in [
                    ("error_rate", sim.error_rate),
                    ("hang_rate", sim.hang_rate),
                    ("drop_rate", sim.drop_rate),
                ] {
                    if !(0.0..=1.0).contains(&rate) {
                        return invalid(format!(
                            "engine {name:?}: {field} = {rate} must be between 0 and 1"
                        ));
                    }
                }
                if !sim.tokens_per_sec.is_finite() || sim.tokens_per_sec < 0.0 {
                    return invalid(format!(
                        "engine {name:?}: tokens_per_sec must be 0 (unlimited) or positive"
                    ));
                }
                if sim.max_num_seqs == 0 {
                    return invalid(format!("engine {name:?}: max_num_seqs must be at least 1"));
                }
                if sim
                    .impersonate
                    .as_deref()
                    .is_some_and(|model| model.trim().is_empty())
                {
                    return invalid(format!(
                        "engine {name:?}: impersonate is empty (name the model to generate as)"
                    ));
                }
                if let Some(factor) = sim.usage_inflation
                    && (!factor.is_finite() || factor < 0.0)
                {
                    return invalid(format!(
                        "engine {name:?}: usage_inflation = {factor} must be a number of 0 or \
                         more (1 reports honestly)"
                    ));
                }
                if !sim.logprob_noise.is_finite() || sim.logprob_noise < 0.0 {
                    return invalid(format!(
                        "engine {name:?}: logprob_noise = {} must be 0 (none) or positive",
                        sim.logprob_noise
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A group's shared secret (long enough not to be guessed on a LAN) and its `ray` program.
fn validate_group_parts(secret: &str, ray_command: &[String]) -> Result<(), String> {
    // 16 characters: `openssl rand -hex 16` gives 32.
    if secret.trim().chars().count() < 16 {
        return Err("secret must be at least 16 characters (openssl rand -hex 16)".into());
    }
    if ray_command.first().is_none_or(|p| p.trim().is_empty()) {
        return Err("ray_command is empty".into());
    }
    Ok(())
}

/// The machine's hostname, or `"rig"` where it cannot be read.
fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|name| name.into_string().ok())
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "rig".to_owned())
}

/// Whether `url`'s host is this machine: `localhost`, or a loopback address (127.0.0.0/8, ::1).
fn is_loopback_url(url: &str) -> bool {
    let Ok(uri) = url.parse::<http::Uri>() else {
        return false;
    };
    let Some(host) = uri.host() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const FULL: &str = r#"
        gateway_url = "https://gateway.example.com"
        enrollment_token = "et_123"
        name = "garage-1"
        state_file = "/var/lib/node-runner/state.json"
        heartbeat_interval_secs = 5
        drain_timeout_secs = 10

        [[engines]]
        name = "llama"
        driver = "docker"
        models = ["meta-llama/Llama-3.1-8B-Instruct", "llama"]
        gpus = [0, 1]
        port = 8001
        health_timeout_secs = 900
        image = "vllm/vllm-openai:v0.11.0"
        model_cache = "/srv/hf"
        env = { HF_TOKEN = "hf_x" }
        args = ["--tensor-parallel-size", "2"]
        docker_host = "unix:///run/podman/podman.sock"
        shm_size_bytes = 17179869184

        [[engines]]
        name = "local"
        driver = "process"
        models = ["qwen"]
        gpus = [2]
        port = 8002
        command = ["vllm", "serve", "Qwen/Qwen3-8B", "--port", "{port}"]
        env = { VLLM_LOGGING_LEVEL = "DEBUG" }
        workdir = "/opt/vllm"

        [[engines]]
        name = "sim"
        driver = "simulated"
        models = ["sim-a"]
        ttft_ms = 20
        tokens_per_sec = 50
        error_rate = 0.1
        hang_rate = 0.01
        drop_rate = 0.02
        max_num_seqs = 8
        default_max_tokens = 32
        impersonate = "sim-small"
        usage_inflation = 3.0
        logprob_noise = 0.01
    "#;

    #[test]
    fn every_field_parses() {
        let config = NodeConfig::load(FULL, env(&[])).unwrap();
        assert_eq!(config.node_name(), "garage-1");
        assert_eq!(config.heartbeat_interval_secs, Some(5));
        let [docker, process, sim] = &config.engines[..] else {
            panic!("three engines expected");
        };
        assert_eq!(docker.gpus, [0, 1]);
        assert_eq!(docker.health_timeout_secs, 900);
        let Driver::Docker(d) = &docker.driver else {
            panic!("docker expected")
        };
        assert_eq!(d.shm_size_bytes, Some(16 << 30));
        assert_eq!(d.env["HF_TOKEN"], "hf_x");
        let Driver::Process(p) = &process.driver else {
            panic!("process expected")
        };
        assert_eq!(p.command[4], "{port}");
        assert_eq!(process.health_timeout_secs, DEFAULT_HEALTH_TIMEOUT_SECS);
        let Driver::Simulated(s) = &sim.driver else {
            panic!("simulated expected")
        };
        assert_eq!(s.tokens_per_sec, 50.0);
        assert_eq!(s.max_num_seqs, 8);
        assert_eq!(s.impersonate.as_deref(), Some("sim-small"));
        assert_eq!(s.usage_inflation, Some(3.0));
        assert_eq!(s.logprob_noise, 0.01);
        assert_eq!(sim.port, 0);
    }

    #[test]
    fn defaults_and_env_overrides() {
        let text = r#"
            gateway_url = "http://localhost:8080"
            [[engines]]
            name = "sim"
            driver = "simulated"
            models = ["m"]
        "#;
        let config = NodeConfig::load(text, env(&[])).unwrap();
        assert_eq!(config.state_file, PathBuf::from("node-runner-state.json"));
        assert_eq!(config.drain_timeout_secs, 30);
        assert_eq!(config.enrollment_token, None);
        assert_eq!(config.gateway_ca_file, None);
        assert!(!config.node_name().is_empty());
        let Driver::Simulated(sim) = &config.engines[0].driver else {
            panic!("simulated expected")
        };
        assert_eq!(*sim, SimulatedDriver::default());

        let config = NodeConfig::load(
            text,
            env(&[
                ("NODE_RUNNER_GATEWAY_URL", "https://gw.example"),
                ("NODE_RUNNER_ENROLLMENT_TOKEN", "et_env"),
                ("NODE_RUNNER_NAME", ""),
                ("NODE_RUNNER_STATE_FILE", "/tmp/s.json"),
                ("NODE_RUNNER_GATEWAY_CA_FILE", "/etc/garage/ca.pem"),
                ("NODE_RUNNER_UNRELATED", "x"),
                ("PATH", "/bin"),
            ]),
        )
        .unwrap();
        assert_eq!(config.gateways(), ["https://gw.example"]);
        assert_eq!(config.enrollment_token.as_deref(), Some("et_env"));
        assert_eq!(config.name, None);
        assert_eq!(config.state_file, PathBuf::from("/tmp/s.json"));
        assert_eq!(
            config.gateway_ca_file,
            Some(PathBuf::from("/etc/garage/ca.pem"))
        );
    }

    /// Plain http is for this machine, or for a network the operator says they trust.
    #[test]
    fn plain_http_only_to_loopback_unless_allowed() {
        let text = |url: &str, allow: bool| {
            format!(
                "gateway_url = \"{url}\"\nallow_insecure_http = {allow}\n\
                 [[engines]]\nname = \"sim\"\ndriver = \"simulated\"\nmodels = [\"m\"]\n"
            )
        };
        for url in [
            "http://localhost:8080",
            "http://127.0.0.1:8080",
            "http://127.9.9.9",
            "http://[::1]:8080",
            "https://gw.example",
        ] {
            assert!(
                NodeConfig::load(&text(url, false), env(&[])).is_ok(),
                "{url}"
            );
        }
        for url in [
            "http://gw.example",
            "http://10.0.0.5:8080",
            "http://localhost.evil.example",
            "http://[::2]",
        ] {
            let error = NodeConfig::load(&text(url, false), env(&[]))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(error.contains("allow_insecure_http"), "{url}: {error}");
            assert!(
                NodeConfig::load(&text(url, true), env(&[])).is_ok(),
                "{url}"
            );
        }
    }

    #[test]
    fn gateway_url_may_come_from_env_alone() {
        let text = r#"
            [[engines]]
            name = "sim"
            driver = "simulated"
            models = ["m"]
        "#;
        assert!(NodeConfig::load(text, env(&[])).is_err());
        let config =
            NodeConfig::load(text, env(&[("NODE_RUNNER_GATEWAY_URL", "https://gw")])).unwrap();
        assert_eq!(config.gateways(), ["https://gw"]);
    }

    const SIM_ENGINE: &str =
        "[[engines]]\nname = \"sim\"\ndriver = \"simulated\"\nmodels = [\"m\"]\n";

    #[test]
    fn several_replicas_in_a_list() {
        let text = format!(
            "gateway_urls = [\"https://a.example/\", \"https://b.example\", \
             \"http://127.0.0.1:8080\"]\n{SIM_ENGINE}"
        );
        let config = NodeConfig::load(&text, env(&[])).unwrap();
        assert_eq!(
            config.gateways(),
            [
                "https://a.example",
                "https://b.example",
                "http://127.0.0.1:8080"
            ]
        );
        // Plain http is refused for each URL of the list, as for one URL.
        let text =
            format!("gateway_urls = [\"https://a.example\", \"http://b.example\"]\n{SIM_ENGINE}");
        let error = NodeConfig::load(&text, env(&[])).unwrap_err().to_string();
        assert!(
            error.starts_with("invalid config: gateway_urls[1] \"http://b.example\" is plain http"),
            "{error}"
        );
        let allowed = format!("allow_insecure_http = true\n{text}");
        assert!(NodeConfig::load(&allowed, env(&[])).is_ok());
    }

    /// `NODE_RUNNER_GATEWAY_URL` replaces whatever the file said: one URL, or a list.
    #[test]
    fn the_gateway_env_takes_a_comma_separated_list() {
        let one = format!("gateway_url = \"https://file.example\"\n{SIM_ENGINE}");
        let list =
            format!("gateway_urls = [\"https://a.example\", \"https://b.example\"]\n{SIM_ENGINE}");
        for text in [&one, &list] {
            let config = NodeConfig::load(
                text,
                env(&[(
                    "NODE_RUNNER_GATEWAY_URL",
                    "https://x.example, https://y.example",
                )]),
            )
            .unwrap();
            assert_eq!(config.gateway_url, None);
            assert_eq!(
                config.gateways(),
                ["https://x.example", "https://y.example"]
            );
            let config = NodeConfig::load(
                text,
                env(&[("NODE_RUNNER_GATEWAY_URL", "https://z.example")]),
            )
            .unwrap();
            assert_eq!(config.gateway_urls, None);
            assert_eq!(config.gateways(), ["https://z.example"]);
        }
        let error = |value: &str| {
            NodeConfig::load(&one, env(&[("NODE_RUNNER_GATEWAY_URL", value)]))
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            error("https://x.example,"),
            "invalid config: gateway_urls[1] \"\" must start with http:// or https://"
        );
        assert_eq!(
            error("https://x.example,https://x.example/"),
            "invalid config: gateway_urls[1] \"https://x.example/\" is in gateway_urls twice"
        );
        assert!(error("https://x.example,http://10.0.0.1").contains("allow_insecure_http"));
    }

    #[test]
    fn an_engine_table_parses_alone() {
        let engine: EngineConfig = toml::from_str(
            r#"
                name = "e"
                driver = "process"
                models = ["m"]
                port = 9000
                command = ["sim-engine"]
            "#,
        )
        .unwrap();
        assert_eq!(engine.driver.kind(), "process");
        assert_eq!(engine.port, 9000);
    }
}
