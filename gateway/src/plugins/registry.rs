//! The plugin registry as the store keeps it, and as the admin API shows it.
//!
//! - `plugin_component/<sha256>`: the component's bytes;
//! - `plugin_version/<slot>:<sha256>`: an uploaded version and the configuration it came with;
//! - `plugin_slot/<slot>`: the slot's active version, canary and history ([`SlotRecord`]).
//!
//! Every replica reads the same records, so a restart or a new replica runs the same versions.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{FaultKind, Slot};

/// A version of a plugin in a slot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VersionInfo {
    /// Hex sha256 of the component's bytes: the version's identity.
    pub sha256: String,
    /// Size of the component, bytes.
    pub size: u64,
    /// The plugin's configuration (what its `config.get` returns).
    #[schema(value_type = Object)]
    pub config: serde_json::Value,
    /// Unix seconds.
    pub activated_at: u64,
    /// Who activated it: an admin, `file:<path>`, or `auto-rollback`.
    pub activated_by: String,
}

/// A version that takes a share of a slot's traffic beside the active one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CanaryInfo {
    #[serde(flatten)]
    pub version: VersionInfo,
    /// Share of calls it serves, percent.
    pub percent: u8,
}

/// An uploaded version, whether or not it is active anywhere.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StoredVersion {
    pub slot: Slot,
    pub sha256: String,
    pub size: u64,
    #[schema(value_type = Object)]
    pub config: serde_json::Value,
    /// Unix seconds.
    pub uploaded_at: u64,
    pub uploaded_by: String,
}

/// A slot as the store keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct SlotRecord {
    pub slot: Slot,
    pub active: Option<VersionInfo>,
    pub canary: Option<CanaryInfo>,
    /// Previously active versions, oldest first: a rollback reactivates the last one.
    pub history: Vec<VersionInfo>,
}

impl SlotRecord {
    pub fn empty(slot: Slot) -> Self {
        SlotRecord {
            slot,
            active: None,
            canary: None,
            history: Vec::new(),
        }
    }

    /// Makes `version` active, keeping the one it replaces for rollback (at most `keep`).
    pub fn activate(&mut self, version: VersionInfo, keep: usize) {
        if let Some(previous) = self.active.replace(version) {
            self.history.push(previous);
        }
        let excess = self.history.len().saturating_sub(keep);
        self.history.drain(..excess);
    }

    /// Every version the record refers to.
    pub fn versions(&self) -> impl Iterator<Item = &VersionInfo> {
        self.active
            .iter()
            .chain(self.canary.iter().map(|c| &c.version))
            .chain(self.history.iter())
    }
}

/// Faults of a slot's plugins counted by this replica since it started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FaultCounts {
    pub trap: u64,
    pub timeout: u64,
    pub memory_cap: u64,
    pub bad_output: u64,
    pub plugin_error: u64,
    pub host: u64,
}

impl FaultCounts {
    pub(crate) fn add(&mut self, kind: FaultKind, n: u64) {
        let counter = match kind {
            FaultKind::Trap => &mut self.trap,
            FaultKind::Timeout => &mut self.timeout,
            FaultKind::MemoryCap => &mut self.memory_cap,
            FaultKind::BadOutput => &mut self.bad_output,
            FaultKind::PluginError => &mut self.plugin_error,
            FaultKind::Host => &mut self.host,
        };
        *counter += n;
    }
}

/// A slot as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SlotStatus {
    pub slot: Slot,
    /// The version serving the slot; none means the built-in fallback.
    pub active: Option<VersionInfo>,
    pub canary: Option<CanaryInfo>,
    /// Previous versions, oldest first.
    pub history: Vec<VersionInfo>,
    /// Calls made by this replica since it started.
    pub calls: u64,
    pub faults: FaultCounts,
    /// Why this replica could not load the slot's versions, if it could not.
    pub load_error: Option<String>,
}
