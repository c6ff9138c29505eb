//! `[plugins]` in the gateway's configuration.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Slot;

/// How the plugin host runs policies.
///
/// ```toml
/// [plugins]
/// fault_threshold = 5
/// fault_window_secs = 60
/// rate_limiter_fail_open = false
///
/// [plugins.router]
/// deadline_ms = 5
///
/// [plugins.meter]
/// deadline_ms = 1000
/// memory_mib = 256
/// isolation = "per-call"
///
/// [plugins.files.router]
/// path = "/etc/garage/router.wasm"
/// config = { sticky = true }
/// ```
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PluginsConfig {
    pub router: SlotLimits,
    #[serde(rename = "rate-limiter", alias = "rate_limiter")]
    pub rate_limiter: SlotLimits,
    pub meter: SlotLimits,
    pub reward: SlotLimits,
    /// Faults (traps, blown deadlines, memory cap, nonsensical answers) of one version within
    /// `fault_window_secs` that roll its slot back to the previous version by itself.
    pub fault_threshold: u32,
    pub fault_window_secs: u64,
    /// When the rate limiter faults: `false` (the default) refuses the request (429, retry in a
    /// second), so a broken or overloaded limiter never admits more than the limits allow;
    /// `true` lets it through, for operators who prefer serving to limiting when the limiter is
    /// down and know what that lets in.
    pub rate_limiter_fail_open: bool,
    /// Component instances that may exist at once, over all slots (the pooling allocator's
    /// capacity): every call in flight holds one, and so does every warm instance. A call that
    /// finds the pool full falls back as a host fault (not the plugin's).
    pub max_instances: u32,
    /// Largest component accepted, in bytes. Python and JavaScript runtimes make components of
    /// 10 to 20 MB.
    pub max_component_bytes: usize,
    /// Previous versions kept per slot for rollback.
    pub history: usize,
    /// How often every slot is re-read from the store even without an event, in case one was
    /// lost; 0 disables it.
    pub resync_interval_secs: u64,
    /// Slots loaded from files and reinstalled when a file changes (checked every second).
    pub files: BTreeMap<Slot, PluginFile>,
    /// Call a plugin once with its configuration, on a scratch key-value store, before storing
    /// it: a trap, a blown deadline or memory cap, or a line logged at error level refuses the
    /// upload (the default plugins log their configuration errors, then trap). Off, such a
    /// plugin is accepted and its faults are left to the slot's fallback and rollback.
    pub trial_at_upload: bool,
    /// Recent calls each slot keeps in this replica's memory for replay (`POST
    /// /admin/plugins/{slot}/replay`): their WIT inputs and decisions, no prompt text. At most
    /// 10 000; 0 records nothing.
    pub record_calls: usize,
    /// Record one call in this many (1: every call). Whatever this says, a call that finds the
    /// ring busy (another call recording) is not recorded rather than waiting.
    pub record_every: u32,
}

impl Default for PluginsConfig {
    fn default() -> Self {
        PluginsConfig {
            router: SlotLimits::default(),
            rate_limiter: SlotLimits::default(),
            meter: SlotLimits::default(),
            reward: SlotLimits::default(),
            fault_threshold: 5,
            fault_window_secs: 60,
            rate_limiter_fail_open: false,
            max_instances: 1000,
            max_component_bytes: 64 << 20,
            history: 10,
            resync_interval_secs: 30,
            files: BTreeMap::new(),
            trial_at_upload: true,
            record_calls: 2000,
            record_every: 1,
        }
    }
}

impl PluginsConfig {
    pub fn limits(&self, slot: Slot) -> &SlotLimits {
        match slot {
            Slot::Router => &self.router,
            Slot::RateLimiter => &self.rate_limiter,
            Slot::Meter => &self.meter,
            Slot::Reward => &self.reward,
        }
    }

    /// Checks values that parse but make no sense; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        for slot in Slot::ALL {
            let limits = self.limits(slot);
            if limits.deadline_ms == Some(0) {
                return Err(format!("plugins.{slot}.deadline_ms must be at least 1"));
            }
            if limits.memory_mib == 0 || limits.memory_mib > 4096 {
                return Err(format!("plugins.{slot}.memory_mib must be within 1..=4096"));
            }
            if limits.isolation == Isolation::Warm
                && (limits.warm_instances == 0
                    || limits.warm_max_uses == 0
                    || limits.warm_max_age_secs == 0)
            {
                return Err(format!(
                    "plugins.{slot}: isolation = \"warm\" needs warm_instances, warm_max_uses \
                     and warm_max_age_secs above 0"
                ));
            }
            if limits.warm_max_instances < limits.warm_instances {
                return Err(format!(
                    "plugins.{slot}.warm_max_instances ({}) must be at least warm_instances ({})",
                    limits.warm_max_instances, limits.warm_instances
                ));
            }
            if limits.warm_idle_secs == 0 {
                return Err(format!("plugins.{slot}.warm_idle_secs must be at least 1"));
            }
        }
        if self.fault_threshold == 0 {
            return Err("plugins.fault_threshold must be at least 1".into());
        }
        if self.record_calls > super::replay::MAX_RECORDED {
            return Err(format!(
                "plugins.record_calls must be at most {}",
                super::replay::MAX_RECORDED
            ));
        }
        if self.record_every == 0 {
            return Err("plugins.record_every must be at least 1".into());
        }
        if self.max_instances == 0 {
            return Err("plugins.max_instances must be at least 1".into());
        }
        Ok(())
    }

    /// The deadline of a call into `slot`'s plugin.
    pub fn deadline(&self, slot: Slot) -> Duration {
        let default_ms = match slot {
            // On every request: a policy there must answer in microseconds.
            Slot::Router | Slot::RateLimiter => 5,
            // Off the request path, from a queue: any language is fine.
            Slot::Meter | Slot::Reward => 1000,
        };
        Duration::from_millis(self.limits(slot).deadline_ms.unwrap_or(default_ms))
    }

    pub(crate) fn fault_window(&self) -> Duration {
        Duration::from_secs(self.fault_window_secs)
    }

    /// The largest memory cap of any slot: the pooling allocator's per-memory size.
    pub(crate) fn max_memory_bytes(&self) -> usize {
        Slot::ALL
            .iter()
            .map(|slot| self.limits(*slot).memory_bytes())
            .max()
            .unwrap_or(64 << 20)
    }
}

/// Limits of the plugin in one slot.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SlotLimits {
    /// Guest time a call may take (host waits excluded), milliseconds; past it the call traps
    /// and the slot falls back. Checked every millisecond. Default: 5 for the router and the
    /// rate limiter (every request waits on them), 1000 for the meter and reward.
    pub deadline_ms: Option<u64>,
    /// Linear memory an instance may grow to, MiB.
    pub memory_mib: usize,
    /// How calls get their instance: `warm` (the default) reuses a small pool of instances
    /// across calls; `per-call` gives every call a fresh one. See [`Isolation`].
    pub isolation: Isolation,
    /// Idle warm instances a version keeps however quiet it is: the floor of its pool. The pool
    /// grows past it to as many instances as calls were in flight at once (a call that finds
    /// no idle instance makes one and puts it back after), up to `warm_max_instances`, and
    /// shrinks back to it once instances sat unused for `warm_idle_secs`.
    pub warm_instances: usize,
    /// Idle warm instances a version keeps at most, after a burst of calls in flight at once
    /// (calls waiting on a Redis store, a burst of requests); calls beyond them still run, on
    /// instances made for them and torn down after. Every instance holds a slot of
    /// `plugins.max_instances` and its linear memory (kilobytes for a compiled plugin,
    /// megabytes for Python or JavaScript) while it waits.
    pub warm_max_instances: usize,
    /// Seconds an idle instance above the floor stays unused before it is torn down.
    pub warm_idle_secs: u64,
    /// Calls a warm instance serves before it is retired (bounds leaks inside the guest).
    pub warm_max_uses: u32,
    /// Seconds a warm instance lives before it is retired, however few calls it served.
    pub warm_max_age_secs: u64,
    /// Fresh instances made ahead of the calls that will use them, off the request's path
    /// (`isolation = "per-call"` only): a call takes one that no call has touched, and the one
    /// it used is torn down after the answer, also off the path. 0 instantiates on the call
    /// itself.
    pub ready_instances: usize,
}

/// How a slot's calls get an instance of its plugin.
///
/// With `warm`, an instance serves many calls, one at a time: a plugin's globals (a parsed
/// configuration, a cache) live from one call to the next, while durable and shared state
/// belongs in `kv`. An instance that traps, runs past its deadline or hits its memory cap is
/// discarded, never reused; the others are retired after `warm_max_uses` calls or
/// `warm_max_age_secs`. A new version's calls never reach an old version's instances. With
/// `per-call`, every call starts from the component's initial state, at the price of an
/// instantiation (and a teardown) per call: tens of microseconds for a Rust plugin,
/// milliseconds for Python or JavaScript.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Isolation {
    #[default]
    Warm,
    PerCall,
}

impl SlotLimits {
    pub(crate) fn memory_bytes(&self) -> usize {
        self.memory_mib << 20
    }
}

impl Default for SlotLimits {
    fn default() -> Self {
        SlotLimits {
            deadline_ms: None,
            memory_mib: 64,
            isolation: Isolation::Warm,
            warm_instances: 4,
            warm_max_instances: 64,
            warm_idle_secs: 10,
            warm_max_uses: 10_000,
            warm_max_age_secs: 60,
            ready_instances: 2,
        }
    }
}

/// A slot fed from a file.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PluginFile {
    /// The component (`.wasm`).
    pub path: PathBuf,
    /// The plugin's configuration (any TOML table, handed to the plugin as JSON).
    #[serde(default = "empty_object")]
    pub config: serde_json::Value,
}

fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(serde_json::Map::new())
}
