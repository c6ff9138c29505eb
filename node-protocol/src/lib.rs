//! The node protocol: what a rig's `node-runner` and the gateway say to each other.
//!
//! 1. **Enroll** (once): `POST /node/v1/enroll` with an enrollment token from the admin API; the
//!    gateway answers with the rig's node id and its node credential, which the rig keeps.
//! 2. **Connect** (always on): `GET /node/v1/connect` with the credential and
//!    `Upgrade: garage-tunnel/1`. After `101 Switching Protocols` the connection carries HTTP/2
//!    with the roles reversed: the gateway is the client and sends OpenAI requests, the rig is
//!    the server and answers them from its engines. The rig dialled out, so no port is forwarded.
//! 3. **Heartbeat** (every few seconds): `POST /node/v1/heartbeat` with GPU and engine stats.
//! 4. **Deregister** (on shutdown): `POST /node/v1/deregister`: take no more requests.
//! 5. **Batch work** (pulled, while the rig has spare capacity): `POST /node/v1/batch/lease`
//!    long-polls for lines of Batch API jobs; the rig runs them on its engines and sends what
//!    they answered to `POST /node/v1/batch/results`. A line whose lease runs out before its
//!    result arrives goes back to the queue for another rig.
//! 6. **Receipts** (with every answer): the rig signs what it served in an HTTP/2 trailer, and
//!    each batch line's result in [`BatchLineResult::receipt`] ([`receipt`]);
//!    `GET /node/v1/statement` gives the rig's owner the gateway's ledger of its requests with
//!    those receipts.
#![deny(missing_docs)]

pub mod receipt;

pub use receipt::{
    RECEIPT_KEY_PATH, RECEIPT_TRAILER, ReceiptCheck, ReceiptKey, STATEMENT_PATH, Statement,
    StatementEntry,
};
use serde::{Deserialize, Serialize};

/// Enrollment endpoint on the gateway.
pub const ENROLL_PATH: &str = "/node/v1/enroll";
/// Tunnel endpoint on the gateway.
pub const CONNECT_PATH: &str = "/node/v1/connect";
/// Heartbeat endpoint on the gateway.
pub const HEARTBEAT_PATH: &str = "/node/v1/heartbeat";
/// Deregistration endpoint on the gateway.
pub const DEREGISTER_PATH: &str = "/node/v1/deregister";
/// Batch work lease endpoint on the gateway.
pub const BATCH_LEASE_PATH: &str = "/node/v1/batch/lease";
/// Batch results endpoint on the gateway.
pub const BATCH_RESULTS_PATH: &str = "/node/v1/batch/results";
/// The `Upgrade` protocol token of the tunnel.
pub const TUNNEL_PROTOCOL: &str = "garage-tunnel/1";
/// Authority the gateway puts in requests sent through a tunnel (HTTP/2 needs one; the rig
/// ignores it).
pub const TUNNEL_AUTHORITY: &str = "rig.garage";

/// OpenAI's error envelope, `{"error": {"message", "type", "param", "code"}}`: how every part
/// of the project answers a failure — the gateway (its responses and the error event that ends
/// a stream that broke off), and node-runner (to the gateway, over a rig's tunnel). The openai
/// SDKs read it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The inside of [`ErrorBody`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorDetail {
    /// Human-readable explanation.
    pub message: String,
    /// Error class: `invalid_request_error`, `permission_error`, `rate_limit_error`,
    /// `insufficient_quota`, `server_error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request parameter at fault, if any.
    pub param: Option<String>,
    /// Machine-readable code, such as `invalid_api_key`, `model_not_found`, `upstream_error`.
    pub code: Option<String>,
}

impl ErrorBody {
    /// An error of class `kind` with `code`, about no parameter in particular.
    pub fn new(message: impl Into<String>, kind: &str, code: Option<&str>) -> Self {
        ErrorBody {
            error: ErrorDetail {
                message: message.into(),
                kind: kind.to_owned(),
                param: None,
                code: code.map(str::to_owned),
            },
        }
    }

    /// The JSON text of it.
    pub fn to_json(&self) -> String {
        // A struct of strings always serializes.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// `POST /node/v1/enroll` body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The enrollment token an admin issued.
    pub token: String,
    /// A name for the rig (shown to admins).
    pub name: String,
    /// node-runner's version.
    #[serde(default)]
    pub version: String,
    /// The Ed25519 public key (32 bytes, base64) the rig signs its receipts with. A rig without
    /// one (enrolled by an older node-runner) serves as before; its answers carry no receipts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_key: Option<String>,
}

/// `POST /node/v1/enroll` answer: the rig's identity. The credential is shown once.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EnrollResponse {
    /// The rig's node id.
    pub node_id: String,
    /// The rig's secret credential (a bearer token for the node endpoints).
    pub credential: String,
    /// The operator the rig belongs to (the rewards go there).
    pub operator: String,
    /// How often the gateway expects a heartbeat, in seconds.
    pub heartbeat_interval_secs: u64,
}

/// One GPU, as NVML reports it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GpuStats {
    /// Index on the rig (what `CUDA_VISIBLE_DEVICES` names).
    pub index: u32,
    /// Product name, e.g. `NVIDIA GeForce RTX 4090`.
    pub name: String,
    /// Stable GPU UUID.
    pub uuid: String,
    /// Total memory, bytes.
    pub memory_total_bytes: u64,
    /// Used memory, bytes.
    pub memory_used_bytes: u64,
    /// GPU utilisation over the last sample period, percent (0–100).
    pub utilization_percent: u32,
    /// Core temperature, degrees Celsius.
    pub temperature_celsius: u32,
    /// Power draw, watts.
    pub power_watts: f64,
}

/// Life cycle of an engine on a rig.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum EngineState {
    /// Started, waiting for `/health`.
    Starting,
    /// Answering `/health`: it takes requests.
    Healthy,
    /// Died or stopped answering; a restart is scheduled.
    Restarting,
    /// Stopped for good (shutdown).
    Stopped,
}

/// Live load of an engine, from its Prometheus `/metrics` (vLLM's names).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EngineStats {
    /// `vllm:num_requests_running`.
    pub requests_running: f64,
    /// `vllm:num_requests_waiting`.
    pub requests_waiting: f64,
    /// `vllm:kv_cache_usage_perc`, 0–1.
    pub kv_cache_usage: f64,
}

/// One engine on a rig.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EngineStatus {
    /// The engine's name in the rig's config.
    pub name: String,
    /// Models it serves.
    pub models: Vec<String>,
    /// Where it is in its life cycle.
    pub state: EngineState,
    /// How many times it was restarted.
    pub restarts: u32,
    /// Its load, when it could be scraped.
    pub stats: Option<EngineStats>,
    /// For the head of an engine group (one model across rigs on a LAN, this rig serving it):
    /// the member rigs and whether each is up. Empty for an engine on this rig alone, and
    /// absent from older rigs' heartbeats.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<GroupMember>,
}

/// A member rig of an engine group, as its head last saw it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GroupMember {
    /// The member's address on the LAN (its channel, `host:port`).
    pub address: String,
    /// Its Ray worker runs.
    pub up: bool,
    /// How often the group restarted its worker.
    pub generation: u64,
}

/// `POST /node/v1/heartbeat` body.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Heartbeat {
    /// GPUs (empty where NVML is missing).
    pub gpus: Vec<GpuStats>,
    /// Engines and their state.
    pub engines: Vec<EngineStatus>,
    /// The rig is shutting down and takes no new requests.
    #[serde(default)]
    pub draining: bool,
    /// node-runner's version.
    #[serde(default)]
    pub version: String,
    /// Seconds since node-runner started.
    #[serde(default)]
    pub uptime_secs: u64,
    /// Labels the operator gave the rig (`region = "eu"`, a GPU class...): routers read them.
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// The rig signs its Batch API answers (a node-runner with batch receipts and a registered
    /// key): the gateway then counts a batch line without a receipt as a failed check. A rig
    /// from before batch receipts leaves it false, and its lines go unchecked instead of
    /// quarantining it during an upgrade.
    #[serde(default)]
    pub signs_batch_lines: bool,
}

impl Heartbeat {
    /// Models served by healthy engines: what the rig can take requests for.
    pub fn serving_models(&self) -> Vec<String> {
        let mut models: Vec<String> = self
            .engines
            .iter()
            .filter(|e| e.state == EngineState::Healthy)
            .flat_map(|e| e.models.iter().cloned())
            .collect();
        models.sort();
        models.dedup();
        models
    }
}

/// Answer to a heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HeartbeatAck {
    /// An admin asked this rig to drain: finish what it has, take nothing new.
    pub drain: bool,
    /// Whether the gateway holds this rig's tunnel (when false, the rig should reconnect).
    pub tunnel_connected: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serving_models_are_those_of_healthy_engines() {
        let engine = |name: &str, models: &[&str], state| EngineStatus {
            name: name.into(),
            models: models.iter().map(|m| m.to_string()).collect(),
            state,
            restarts: 0,
            stats: None,
            members: Vec::new(),
        };
        let heartbeat = Heartbeat {
            engines: vec![
                engine("a", &["m2", "m1"], EngineState::Healthy),
                engine("b", &["m3"], EngineState::Restarting),
                engine("c", &["m1"], EngineState::Healthy),
            ],
            ..Heartbeat::default()
        };
        assert_eq!(heartbeat.serving_models(), ["m1", "m2"]);
        let json = serde_json::to_string(&heartbeat).unwrap();
        assert_eq!(serde_json::from_str::<Heartbeat>(&json).unwrap(), heartbeat);
        // An engine alone says nothing of members: older gateways read it as before.
        assert!(!json.contains("members"), "{json}");
    }
}

/// `POST /node/v1/batch/lease` body: the rig asks for batch lines it can run now.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct BatchLeaseRequest {
    /// Models the rig's healthy engines serve.
    pub models: Vec<String>,
    /// Most lines wanted (the rig's free batch slots).
    pub max: u32,
    /// How long the gateway may hold the request open waiting for work, in milliseconds (a
    /// long poll); 0 answers at once.
    #[serde(default)]
    pub wait_ms: u64,
}

/// One batch line to run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BatchWorkItem {
    /// The batch it belongs to.
    pub batch_id: String,
    /// The model of the line (its queue).
    pub model: String,
    /// The line's number in the batch's input file (1-based).
    pub line: u64,
    /// The OpenAI endpoint to call on the engine, e.g. `/v1/chat/completions`.
    pub url: String,
    /// The request body, as the input file gave it.
    pub body: serde_json::Value,
}

/// `POST /node/v1/batch/lease` answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BatchLease {
    /// Lines leased to this rig, possibly none (the wait ran out).
    pub items: Vec<BatchWorkItem>,
    /// How long the rig has to send each line's result, in seconds, before the line goes to
    /// another rig.
    pub lease_secs: u64,
}

/// What the engine answered to one batch line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BatchLineResult {
    /// The batch it belongs to.
    pub batch_id: String,
    /// The model of the line (its queue).
    pub model: String,
    /// The line's number in the input file.
    pub line: u64,
    /// The engine's HTTP status.
    pub status_code: u16,
    /// The engine's response body (an OpenAI error object for a failure).
    pub body: serde_json::Value,
    /// How long the engine took, in milliseconds.
    #[serde(default)]
    pub latency_ms: u64,
    /// The rig's signed receipt of this answer, as a tunnel answer's `garage-receipt` trailer
    /// carries it: for request id `{batch_id}:{line}`, over [`receipt::canonical_json`] of
    /// `body`. Absent from a rig that signs nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipt: Option<String>,
}

/// `POST /node/v1/batch/results` body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct BatchResults {
    /// Results, in any order.
    pub results: Vec<BatchLineResult>,
}

/// `POST /node/v1/batch/results` answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BatchResultsAck {
    /// Results recorded now.
    pub accepted: u32,
    /// Results for lines that already had one (another rig answered first, or the batch
    /// ended): dropped.
    pub ignored: u32,
}
