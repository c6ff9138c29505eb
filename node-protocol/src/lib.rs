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
#![deny(missing_docs)]

use serde::{Deserialize, Serialize};

/// Enrollment endpoint on the gateway.
pub const ENROLL_PATH: &str = "/node/v1/enroll";
/// Tunnel endpoint on the gateway.
pub const CONNECT_PATH: &str = "/node/v1/connect";
/// Heartbeat endpoint on the gateway.
pub const HEARTBEAT_PATH: &str = "/node/v1/heartbeat";
/// Deregistration endpoint on the gateway.
pub const DEREGISTER_PATH: &str = "/node/v1/deregister";
/// The `Upgrade` protocol token of the tunnel.
pub const TUNNEL_PROTOCOL: &str = "garage-tunnel/1";
/// Authority the gateway puts in requests sent through a tunnel (HTTP/2 needs one; the rig
/// ignores it).
pub const TUNNEL_AUTHORITY: &str = "rig.garage";

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
    }
}
