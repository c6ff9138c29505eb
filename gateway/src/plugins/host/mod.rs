//! [`PluginHost`]: the slots, their versions, and calls into them.
//!
//! By concern: the registry ([`admin`]), calls ([`calls`]), checks of the answers
//! ([`checks`]), a rate limiter's promises of keys it does not limit ([`unlimited`]) and
//! keeping current across replicas ([`sync`]).

mod admin;
mod calls;
mod checks;
mod replay;
mod sync;
mod unlimited;

pub(crate) use calls::QuoteCache;
pub use calls::{LimiterAnswer, Reservation};
use checks::*;
pub(crate) use unlimited::Unlimited;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::Price;
use super::bindings::{Answer, Call, RouteInput};
use super::config::{PluginFile, PluginsConfig};
use super::engine::PluginEngine;
use super::loaded::{self, LoadedPlugin};
use super::metrics::PluginMetrics;
use super::registry::{
    CanaryInfo, FaultCounts, SlotRecord, SlotStatus, StoredVersion, VersionInfo,
};
use super::state::PluginContext;
use super::types::{
    Admission, Award, Candidate, CandidateInfo, Charge, Decision, RateLimitHeaders,
};
use super::types::{
    Market, QuoteRequest, QuotedPrice, RigReport, RouteRequest, Settlement, UsageEvent,
};
use super::{COMPONENT_KIND, SLOT_KIND, VERSION_KIND};
use super::{FaultKind, PluginError, PluginFault, Slot};
use crate::store::{Store, StoreError, StoreEvent};

/// Longest `reason` of a rate-limit decision passed on to a client.
const MAX_REASON_CHARS: usize = 256;
/// Most awards one reward call may grant.
const MAX_AWARDS: usize = 1000;
/// Most budgets a meter may report for one charge (lifetime, day, week, month and then some).
const MAX_BUDGETS: usize = 16;
/// Longest operator id in an award.
const MAX_OPERATOR_CHARS: usize = 256;
/// Queued automatic rollbacks; more than a few at once means every slot is failing anyway.
const ROLLBACK_QUEUE: usize = 16;
/// How often the files of file-fed slots are checked.
const FILE_POLL: Duration = Duration::from_secs(1);
/// `retry-after` of a refusal when the rate limiter faults and the config fails closed.
const FAIL_CLOSED_RETRY_MS: u64 = 1000;

/// The plugin host. Shared as `Arc<PluginHost>`; see the module docs.
pub struct PluginHost {
    store: Arc<dyn Store>,
    config: PluginsConfig,
    engine: Arc<PluginEngine>,
    slots: [SlotCell; 4],
    metrics: PluginMetrics,
    rollbacks: mpsc::Sender<AutoRollback>,
    rollback_queue: Mutex<Option<mpsc::Receiver<AutoRollback>>>,
    shutdown: CancellationToken,
    /// The components this gateway installs in slots nobody configured (the defaults), to
    /// reinstall when the store loses its slots.
    defaults: Mutex<HashMap<Slot, &'static [u8]>>,
    /// Work started off a request's path (limiter settlements, instances made ahead): owned, so
    /// that a gateway shutting down waits for the settlements of its last requests.
    tasks: tokio_util::task::TaskTracker,
    /// Held while a replay runs: one at a time, each on a thread of its own.
    replaying: tokio::sync::Mutex<()>,
}

/// One slot: the bundle calls read, and what changes it.
struct SlotCell {
    /// What calls use: swapped whole, so a call finishes on the bundle it started with.
    bundle: ArcSwap<SlotBundle>,
    /// Serialises changes to the slot within this process.
    change: tokio::sync::Mutex<()>,
    calls: AtomicU64,
    faults: Mutex<FaultCounts>,
    /// Recent calls for replay, and the shadow candidate if one runs.
    observed: replay::Observed,
}

/// An immutable snapshot of a slot.
struct SlotBundle {
    record: SlotRecord,
    active: Option<Arc<LoadedPlugin>>,
    canary: Option<(Arc<LoadedPlugin>, u8)>,
    load_error: Option<String>,
}

struct AutoRollback {
    slot: Slot,
    sha256: String,
    canary: bool,
}

impl PluginHost {
    /// Starts the engine and loads every slot's active version (and canary) from the store.
    /// Call [`PluginHost::spawn_background`] next: it follows other replicas' changes and
    /// carries out automatic rollbacks.
    pub async fn new(
        store: Arc<dyn Store>,
        config: PluginsConfig,
    ) -> Result<Arc<Self>, PluginError> {
        config.validate().map_err(PluginError::Engine)?;
        let engine = Arc::new(PluginEngine::new(&config)?);
        let (rollbacks, rollback_queue) = mpsc::channel(ROLLBACK_QUEUE);
        let record = (config.record_calls, config.record_every);
        let host = Arc::new(PluginHost {
            store,
            config,
            engine,
            slots: Slot::ALL.map(|slot| SlotCell {
                bundle: ArcSwap::from_pointee(SlotBundle {
                    record: SlotRecord::empty(slot),
                    active: None,
                    canary: None,
                    load_error: None,
                }),
                change: tokio::sync::Mutex::new(()),
                calls: AtomicU64::new(0),
                faults: Mutex::new(FaultCounts::default()),
                observed: replay::Observed::new(record.0, record.1),
            }),
            metrics: PluginMetrics::new(),
            rollbacks,
            rollback_queue: Mutex::new(Some(rollback_queue)),
            shutdown: CancellationToken::new(),
            defaults: Mutex::new(HashMap::new()),
            tasks: tokio_util::task::TaskTracker::new(),
            replaying: tokio::sync::Mutex::new(()),
        });
        for slot in Slot::ALL {
            match host.reload(slot).await {
                Ok(_) => {}
                // Without its store the gateway cannot serve anyway: fail the start.
                Err(err @ PluginError::Store(StoreError::Backend(_))) => return Err(err),
                // A corrupt record must not keep the gateway from starting: the slot stays
                // empty (its fallback serves) and its status says why.
                Err(err) => {
                    tracing::error!(plugin = %slot, error = %err, "cannot load plugin slot");
                    host.cell(slot).bundle.store(Arc::new(SlotBundle {
                        record: SlotRecord::empty(slot),
                        active: None,
                        canary: None,
                        load_error: Some(err.to_string()),
                    }));
                }
            }
        }
        Ok(host)
    }

    /// The host's metrics, to register with the gateway's Prometheus registry.
    pub fn metrics(&self) -> &PluginMetrics {
        &self.metrics
    }

    pub fn config(&self) -> &PluginsConfig {
        &self.config
    }

    /// Whether a call to `slot` would reach a plugin (an active version or a canary), so the
    /// request path can skip preparing a call that would only fall back.
    pub fn is_active(&self, slot: Slot) -> bool {
        let bundle = self.cell(slot).bundle.load();
        bundle.active.is_some() || bundle.canary.is_some()
    }

    fn cell(&self, slot: Slot) -> &SlotCell {
        &self.slots[slot.index()]
    }
}
