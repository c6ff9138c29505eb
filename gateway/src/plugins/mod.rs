//! The plugin host: every policy decision of the gateway — which backend serves a request,
//! whether a key may send it, what it costs, what the rig's owner earns — is a WebAssembly
//! component implementing one world of the WIT contract in `wit/`.
//!
//! - [`bindings`] owns the WIT bindings (one module per contract version);
//! - the engine (`engine`) holds wasmtime's configuration, the linker and the compile cache, and
//!   refuses a component that does not implement its slot's world;
//! - [`PluginHost`] keeps each slot's active version, canary and history in the store, follows
//!   other replicas' changes, and makes calls: on a few warm instances per version (or a fresh one per
//!   call, `isolation = "per-call"`) with a deadline and a memory cap, falling back when a plugin faults and rolling a slot back
//!   by itself when it faults repeatedly.

pub mod api;
pub mod bindings;
pub mod config;
mod engine;
mod host;
mod loaded;
mod metrics;
mod registry;
pub mod replay;
mod state;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use bindings::RouteInput;
pub use config::{Isolation, PluginFile, PluginsConfig, SlotLimits};
pub use host::{LimiterAnswer, PluginHost, Reservation};
pub use metrics::PluginMetrics;
pub use registry::{CanaryInfo, FaultCounts, SlotStatus, StoredVersion, VersionInfo};
pub use state::kv_namespace;

use crate::store::StoreError;

/// The records plugins and the gateway exchange (`garage:policy/types`), as generated from the
/// contract's newest version that defines each.
pub mod types {
    pub use super::bindings::v0_2::types::{
        Admission, Award, CandidateInfo, Decision, RateLimitHeaders, RigReport, RouteRequest,
        Settlement,
    };
    pub use super::bindings::v0_4::types::{Candidate, CountedBy, Trust};
    pub use super::bindings::v0_5::types::{
        BudgetPeriod, BudgetUse, Charge, Market, Price as QuotedPrice, QuoteRequest, UsageEvent,
    };
}

pub use types::*;

/// A price the meter quotes for a model at admission, in credits per 1,000 tokens: what the
/// request is charged (its reservation is held at it), whatever the market does meanwhile.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Price {
    /// Credits per 1,000 prompt tokens.
    pub prompt_per_1k: f64,
    /// Credits per 1,000 completion tokens.
    pub completion_per_1k: f64,
}

impl Price {
    /// The credits `prompt` and `completion` tokens cost at this price.
    pub fn cost(&self, prompt: u64, completion: u64) -> f64 {
        (prompt as f64 * self.prompt_per_1k + completion as f64 * self.completion_per_1k) / 1000.0
    }
}

/// A backend's `candidate.key`: FNV-1a (64-bit) of its id's UTF-8 bytes, as the contract
/// defines it (`garage_plugin_sdk::candidate_key` computes the same).
pub fn candidate_key(id: &str) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    id.bytes().fold(FNV_OFFSET, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME)
    })
}

/// Store record kinds of the plugin registry.
pub use crate::store::keyspace::{
    PLUGIN_COMPONENTS as COMPONENT_KIND, PLUGIN_SLOTS as SLOT_KIND, PLUGIN_VERSIONS as VERSION_KIND,
};

/// A policy slot: one world of the contract.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum Slot {
    Router,
    RateLimiter,
    Meter,
    Reward,
}

impl Slot {
    pub const ALL: [Slot; 4] = [Slot::Router, Slot::RateLimiter, Slot::Meter, Slot::Reward];

    pub fn as_str(self) -> &'static str {
        match self {
            Slot::Router => "router",
            Slot::RateLimiter => "rate-limiter",
            Slot::Meter => "meter",
            Slot::Reward => "reward",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Slot {
    type Err = PluginError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Slot::ALL
            .into_iter()
            .find(|slot| slot.as_str() == s)
            .ok_or_else(|| PluginError::UnknownSlot(s.to_owned()))
    }
}

/// Why an operation on the plugin registry failed (installing, activating, rolling back...).
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("unknown plugin slot `{0}` (expected router, rate-limiter, meter or reward)")]
    UnknownSlot(String),
    #[error("invalid plugin: {0}")]
    Invalid(String),
    #[error("the component does not implement the `{slot}` world: {reason}")]
    WrongWorld { slot: Slot, reason: String },
    #[error(
        "the component imports {}, which a `{slot}` plugin may not use (allowed: \
         garage:policy interfaces and WASI 0.2, with no filesystem, network or environment)",
        imports.join(", ")
    )]
    ForbiddenImport { slot: Slot, imports: Vec<String> },
    #[error("component of {size} bytes is larger than the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("plugin configuration is not valid JSON: {0}")]
    InvalidConfig(String),
    #[error(
        "the plugin refused its configuration (a trial call with it failed, before anything was \
         stored): {0}"
    )]
    ConfigRefused(String),
    #[error("no stored component with sha256 {0}")]
    UnknownVersion(String),
    #[error("slot `{0}` has no canary")]
    NoCanary(Slot),
    #[error("slot `{0}` has no previous version to roll back to")]
    NoPrevious(Slot),
    #[error("canary share must be within 0..=100 percent, got {0}")]
    InvalidCanary(u8),
    #[error("slot `{0}` has no active version to compare a candidate with")]
    NoActive(Slot),
    #[error("slot `{0}` has no shadow running")]
    NoShadow(Slot),
    #[error("another replay is running; retry when it is done")]
    ReplayBusy,
    #[error("plugin store: {0}")]
    Store(#[from] StoreError),
    #[error("plugin engine: {0}")]
    Engine(String),
}

impl PluginError {
    /// Whether the caller sent something wrong (400/404), as opposed to the gateway failing.
    pub fn is_client_error(&self) -> bool {
        !matches!(self, PluginError::Store(_) | PluginError::Engine(_))
    }
}

/// A call into a plugin that produced no usable answer. The caller falls back (round robin,
/// fail-open/closed, or leaving a usage event queued for a retry).
#[derive(Debug, Clone, thiserror::Error)]
#[error("plugin {slot} ({version}): {kind}: {message}")]
pub struct PluginFault {
    pub slot: Slot,
    /// The sha256 of the version that faulted.
    pub version: String,
    pub kind: FaultKind,
    pub message: String,
}

/// What went wrong in a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// The guest trapped (a panic, `unreachable`, a bad memory access...).
    Trap,
    /// The call ran past its deadline.
    Timeout,
    /// The instance tried to grow its memory past the cap.
    MemoryCap,
    /// The answer made no sense (a router's empty list, an index out of range, a duplicate; a
    /// charge that is not a finite non-negative number...).
    BadOutput,
    /// The plugin returned its own error result: a decision, not a crash.
    PluginError,
    /// The host failed (the store is unreachable, the instance pool is full): not the plugin's
    /// doing, and not counted towards a rollback.
    Host,
}

impl FaultKind {
    pub const ALL: [FaultKind; 6] = [
        FaultKind::Trap,
        FaultKind::Timeout,
        FaultKind::MemoryCap,
        FaultKind::BadOutput,
        FaultKind::PluginError,
        FaultKind::Host,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::Trap => "trap",
            FaultKind::Timeout => "timeout",
            FaultKind::MemoryCap => "memory_cap",
            FaultKind::BadOutput => "bad_output",
            FaultKind::PluginError => "plugin_error",
            FaultKind::Host => "host",
        }
    }

    /// Faults that show the plugin is broken, and roll its slot back when repeated.
    pub fn counts_towards_rollback(self) -> bool {
        !matches!(self, FaultKind::PluginError | FaultKind::Host)
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
