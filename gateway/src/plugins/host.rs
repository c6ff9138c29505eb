//! [`PluginHost`]: the slots, their versions, and calls into them.

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

use super::bindings::{Answer, Call};
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
use super::types::{RigReport, RouteRequest, Settlement, UsageEvent};
use super::{COMPONENT_KIND, SLOT_KIND, VERSION_KIND};
use super::{FaultKind, PluginError, PluginFault, Slot};
use crate::store::{Store, StoreError, StoreEvent};

/// Longest `reason` of a rate-limit decision passed on to a client.
const MAX_REASON_CHARS: usize = 256;
/// Most awards one reward call may grant.
const MAX_AWARDS: usize = 1000;
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
}

/// One slot: the bundle calls read, and what changes it.
struct SlotCell {
    /// What calls use: swapped whole, so a call finishes on the bundle it started with.
    bundle: ArcSwap<SlotBundle>,
    /// Serialises changes to the slot within this process.
    change: tokio::sync::Mutex<()>,
    calls: AtomicU64,
    faults: Mutex<FaultCounts>,
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
            }),
            metrics: PluginMetrics::new(),
            rollbacks,
            rollback_queue: Mutex::new(Some(rollback_queue)),
            shutdown: CancellationToken::new(),
            defaults: Mutex::new(HashMap::new()),
            tasks: tokio_util::task::TaskTracker::new(),
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

    // ---- Registry operations -------------------------------------------------------------

    /// Validates, compiles and stores a component with its configuration, without activating
    /// it (see [`PluginHost::activate`]).
    pub async fn upload(
        &self,
        slot: Slot,
        wasm: &[u8],
        config_json: &str,
        actor: &str,
    ) -> Result<StoredVersion, PluginError> {
        if wasm.len() > self.config.max_component_bytes {
            return Err(PluginError::TooLarge {
                size: wasm.len(),
                limit: self.config.max_component_bytes,
            });
        }
        let config: serde_json::Value = serde_json::from_str(config_json)
            .map_err(|err| PluginError::InvalidConfig(err.to_string()))?;
        let sha256 = hex::encode(Sha256::digest(wasm));
        let component = self
            .engine
            .compile(&sha256, Arc::new(wasm.to_vec()))
            .await?;
        let prepared = self.engine.prepare(slot, &component)?;
        if self.config.trial_at_upload {
            self.check_config(slot, &sha256, &prepared, config_json)
                .await?;
        }
        let version = StoredVersion {
            slot,
            sha256: sha256.clone(),
            size: wasm.len() as u64,
            config,
            uploaded_at: unix_secs(),
            uploaded_by: actor.to_owned(),
        };
        self.store.record_put(COMPONENT_KIND, &sha256, wasm).await?;
        self.store
            .record_put(
                VERSION_KIND,
                &version_id(slot, &sha256),
                &serde_json::to_vec(&version).map_err(store_json)?,
            )
            .await?;
        tracing::info!(plugin = %slot, version = short(&sha256), actor, "plugin uploaded");
        Ok(version)
    }

    /// Calls the component once with `config_json`, on a scratch key-value store: a plugin that
    /// cannot work with its configuration says so (a trap, an error-level log line) here, at
    /// upload, instead of faulting on every request once active (a rate limiter that cannot
    /// read its limits would otherwise let its slot's fallback decide until rolled back).
    async fn check_config(
        &self,
        slot: Slot,
        sha256: &str,
        prepared: &super::bindings::Prepared,
        config_json: &str,
    ) -> Result<(), PluginError> {
        let scratch = crate::store::open("memory", &[]).await?;
        let ctx = Arc::new(PluginContext::new(
            slot,
            sha256,
            config_json.to_owned(),
            scratch,
        ));
        // A heavy runtime (Python, JavaScript) takes a millisecond or more to instantiate: the
        // trial gets a second whatever the slot's deadline, and no more.
        let deadline = self.config.deadline(slot).max(CONFIG_CHECK_DEADLINE);
        let memory = self.config.limits(slot).memory_bytes();
        let request = RouteRequest {
            model: CONFIG_CHECK.into(),
            key_id: CONFIG_CHECK.into(),
            prefix_hash: 0,
            prompt_tokens: 1,
            max_tokens: 0,
            stream: false,
        };
        let candidates = [Candidate {
            key: super::candidate_key(CONFIG_CHECK),
            in_flight: 0,
            engine_running: 0,
            engine_waiting: 0,
            kv_cache_usage: 0.0,
            tokens_per_second: 0.0,
            latency_ms: 0.0,
            gpu_utilization: 0.0,
            gpu_memory_free_bytes: 0,
        }];
        let infos = [Arc::new(CandidateInfo {
            id: CONFIG_CHECK.into(),
            rig: String::new(),
            operator: String::new(),
            labels: Vec::new(),
        })];
        let admission = Admission {
            request_id: CONFIG_CHECK.into(),
            key_id: CONFIG_CHECK.into(),
            model: CONFIG_CHECK.into(),
            reserved_tokens: 1,
            key_metadata: "{}".into(),
        };
        let now_ms = unix_secs() * 1000;
        let event = UsageEvent {
            request_id: CONFIG_CHECK.into(),
            key_id: CONFIG_CHECK.into(),
            model: CONFIG_CHECK.into(),
            prompt_tokens: 1,
            completion_tokens: 1,
            cached_tokens: 0,
            latency_ms: 1,
            ttft_ms: 1,
            backend: CONFIG_CHECK.into(),
            rig: String::new(),
            operator: String::new(),
            started_at_ms: now_ms,
            finished_at_ms: now_ms,
            batch: false,
        };
        let call = match slot {
            Slot::Router => Call::Route(&request, &candidates, &infos),
            Slot::RateLimiter => Call::Admit(&admission),
            Slot::Meter => Call::Charge(&event),
            Slot::Reward => Call::OnUsage(&event),
        };
        loaded::check_config(&self.engine, prepared, ctx, deadline, memory, call)
            .await
            .map_err(|message| PluginError::ConfigRefused(cut(&message, 500)))
    }

    /// Uploads and activates a component: validated against the slot's world, compiled, stored,
    /// made active on every replica. Installing the active version again changes nothing.
    pub async fn install(
        &self,
        slot: Slot,
        wasm: &[u8],
        config_json: &str,
        actor: &str,
    ) -> Result<VersionInfo, PluginError> {
        let version = self.upload(slot, wasm, config_json, actor).await?;
        self.activate(slot, &version.sha256, None, actor).await
    }

    /// Versions uploaded for `slot`, newest first.
    pub async fn versions(&self, slot: Slot) -> Result<Vec<StoredVersion>, PluginError> {
        let mut versions: Vec<StoredVersion> = self
            .store
            .record_list(VERSION_KIND)
            .await?
            .into_iter()
            .filter_map(|bytes| serde_json::from_slice::<StoredVersion>(&bytes).ok())
            .filter(|version| version.slot == slot)
            .collect();
        versions.sort_by_key(|v| std::cmp::Reverse(v.uploaded_at));
        Ok(versions)
    }

    /// Activates a stored version: as the slot's active version, or with `canary_percent` as a
    /// canary taking that share of calls beside it.
    pub async fn activate(
        &self,
        slot: Slot,
        sha256: &str,
        canary_percent: Option<u8>,
        actor: &str,
    ) -> Result<VersionInfo, PluginError> {
        if let Some(percent) = canary_percent
            && percent > 100
        {
            return Err(PluginError::InvalidCanary(percent));
        }
        // The configuration it was uploaded with; a component uploaded for another slot only
        // has its bytes here, and runs with an empty configuration.
        let (config, size) = match self
            .store
            .record_get(VERSION_KIND, &version_id(slot, sha256))
            .await?
        {
            Some(bytes) => {
                let stored: StoredVersion = serde_json::from_slice(&bytes).map_err(store_json)?;
                (stored.config, stored.size)
            }
            None => (serde_json::Value::Object(serde_json::Map::new()), 0),
        };
        let sha256 = sha256.to_owned();
        let actor = actor.to_owned();
        self.change(slot, move |record, size_of| {
            let version = VersionInfo {
                sha256: sha256.clone(),
                size: size_of(&sha256).max(size),
                config,
                activated_at: unix_secs(),
                activated_by: actor,
            };
            match canary_percent {
                Some(percent) => {
                    record.canary = Some(CanaryInfo {
                        version: version.clone(),
                        percent,
                    });
                }
                None => {
                    let unchanged = record
                        .active
                        .as_ref()
                        .is_some_and(|a| a.sha256 == version.sha256 && a.config == version.config);
                    if unchanged && record.canary.is_none() {
                        return Ok(record.active.clone());
                    }
                    if record
                        .canary
                        .as_ref()
                        .is_some_and(|c| c.version.sha256 == version.sha256)
                    {
                        record.canary = None;
                    }
                    if !unchanged {
                        record.activate(version.clone(), usize::MAX);
                    }
                }
            }
            Ok(Some(version))
        })
        .await?
        .ok_or(PluginError::UnknownVersion(String::new()))
    }

    /// Makes the canary the active version.
    pub async fn promote(&self, slot: Slot, actor: &str) -> Result<VersionInfo, PluginError> {
        let actor = actor.to_owned();
        self.change(slot, move |record, _| {
            let canary = record.canary.take().ok_or(PluginError::NoCanary(slot))?;
            let version = VersionInfo {
                activated_at: unix_secs(),
                activated_by: actor,
                ..canary.version
            };
            record.activate(version.clone(), usize::MAX);
            Ok(Some(version))
        })
        .await?
        .ok_or(PluginError::NoCanary(slot))
    }

    /// Undoes the last change: drops the canary if there is one, else reactivates the previous
    /// version. Returns the version now active.
    pub async fn rollback(&self, slot: Slot, actor: &str) -> Result<VersionInfo, PluginError> {
        let actor = actor.to_owned();
        self.change(slot, move |record, _| {
            if record.canary.take().is_some() {
                return record
                    .active
                    .clone()
                    .ok_or(PluginError::NoPrevious(slot))
                    .map(Some);
            }
            let previous = record.history.pop().ok_or(PluginError::NoPrevious(slot))?;
            let version = VersionInfo {
                activated_at: unix_secs(),
                activated_by: actor,
                ..previous
            };
            record.active = Some(version.clone());
            Ok(Some(version))
        })
        .await?
        .ok_or(PluginError::NoPrevious(slot))
    }

    /// Empties a slot: the built-in fallback takes over. The version goes to the history.
    pub async fn deactivate(&self, slot: Slot, actor: &str) -> Result<(), PluginError> {
        tracing::info!(plugin = %slot, actor, "plugin slot emptied");
        let keep = self.config.history;
        self.change(slot, move |record, _| {
            record.canary = None;
            if let Some(active) = record.active.take() {
                record.history.push(active);
                let excess = record.history.len().saturating_sub(keep);
                record.history.drain(..excess);
            }
            Ok(None)
        })
        .await
        .map(|_| ())
    }

    /// Applies `edit` to the slot's record as the store has it, loads what the new record
    /// names (so a version that cannot load is refused before anything changes), writes it,
    /// tells the other replicas, and swaps it in.
    async fn change<F>(&self, slot: Slot, edit: F) -> Result<Option<VersionInfo>, PluginError>
    where
        F: FnOnce(
            &mut SlotRecord,
            &dyn Fn(&str) -> u64,
        ) -> Result<Option<VersionInfo>, PluginError>,
    {
        let cell = self.cell(slot);
        let _guard = cell.change.lock().await;
        let mut record = match self.read_record(slot).await {
            Ok(record) => record,
            // An unreadable record is replaced, or the slot could never be fixed.
            Err(PluginError::Store(StoreError::Corrupt(err))) => {
                tracing::warn!(plugin = %slot, error = %err, "replacing a corrupt plugin slot record");
                SlotRecord::empty(slot)
            }
            Err(err) => return Err(err),
        };
        let before = record.clone();
        let sizes: HashMap<String, u64> = record
            .versions()
            .map(|v| (v.sha256.clone(), v.size))
            .collect();
        // The size of a version not yet in the record is read from its stored bytes when it is
        // loaded below; 0 until then.
        let size_of = |sha: &str| sizes.get(sha).copied().unwrap_or(0);
        let result = edit(&mut record, &size_of)?;
        let excess = record.history.len().saturating_sub(self.config.history);
        record.history.drain(..excess);
        let bundle = self.load_bundle(slot, &record, true).await?;
        let record = bundle.record.clone();
        if record != before {
            self.write_record(&record).await?;
            self.publish(slot).await;
        }
        cell.bundle.store(Arc::new(bundle));
        self.retain_compiled();
        // The version the edit reported, as the loaded record has it (with its size).
        let reported = result.map(|version| {
            record
                .versions()
                .find(|v| v.sha256 == version.sha256 && v.activated_at == version.activated_at)
                .cloned()
                .unwrap_or(version)
        });
        tracing::info!(
            plugin = %slot,
            active = record.active.as_ref().map(|v| short(&v.sha256)),
            canary = record.canary.as_ref().map(|c| short(&c.version.sha256)),
            canary_percent = record.canary.as_ref().map(|c| c.percent),
            "plugin slot changed"
        );
        Ok(reported)
    }

    async fn read_record(&self, slot: Slot) -> Result<SlotRecord, PluginError> {
        match self.store.record_get(SLOT_KIND, slot.as_str()).await? {
            Some(bytes) => serde_json::from_slice(&bytes).map_err(store_json),
            None => Ok(SlotRecord::empty(slot)),
        }
    }

    async fn write_record(&self, record: &SlotRecord) -> Result<(), PluginError> {
        let json = serde_json::to_vec(record).map_err(store_json)?;
        self.store
            .record_put(SLOT_KIND, record.slot.as_str(), &json)
            .await?;
        Ok(())
    }

    async fn publish(&self, slot: Slot) {
        let event = StoreEvent::PluginActivated {
            slot: slot.as_str().to_owned(),
        };
        if let Err(err) = self.store.publish(&event).await {
            // The change is stored; other replicas pick it up at their next resync.
            tracing::warn!(plugin = %slot, error = %err, "cannot announce a plugin change");
        }
    }

    /// Loads what `record` names, reusing what the current bundle already has loaded. With
    /// `strict`, a version that cannot load is an error; otherwise it is left out and the
    /// bundle says why (a replica keeps serving what it can).
    async fn load_bundle(
        &self,
        slot: Slot,
        record: &SlotRecord,
        strict: bool,
    ) -> Result<SlotBundle, PluginError> {
        let current = self.cell(slot).bundle.load_full();
        let mut record = record.clone();
        let mut load_error = None;
        let mut active = None;
        if let Some(info) = record.active.as_mut() {
            match self.load_version(slot, info, &current).await {
                Ok(plugin) => active = Some(plugin),
                Err(err) if strict => return Err(err),
                Err(err) => load_error = Some(format!("active {}: {err}", short(&info.sha256))),
            }
        }
        let mut canary = None;
        if let Some(c) = record.canary.as_mut() {
            match self.load_version(slot, &mut c.version, &current).await {
                Ok(plugin) => canary = Some((plugin, c.percent)),
                Err(err) if strict => return Err(err),
                Err(err) => {
                    load_error = Some(format!("canary {}: {err}", short(&c.version.sha256)))
                }
            }
        }
        if let Some(err) = &load_error {
            tracing::error!(plugin = %slot, error = %err, "cannot load a plugin version");
        }
        Ok(SlotBundle {
            record,
            active,
            canary,
            load_error,
        })
    }

    async fn load_version(
        &self,
        slot: Slot,
        info: &mut VersionInfo,
        current: &SlotBundle,
    ) -> Result<Arc<LoadedPlugin>, PluginError> {
        let loaded = current
            .active
            .iter()
            .chain(current.canary.iter().map(|(plugin, _)| plugin))
            .find(|plugin| plugin.serves(info));
        if let Some(plugin) = loaded {
            info.size = plugin.info.size;
            return Ok(plugin.clone());
        }
        let component = match self.engine.cached(&info.sha256) {
            Some(component) => component,
            None => {
                let wasm = self
                    .store
                    .record_get(COMPONENT_KIND, &info.sha256)
                    .await?
                    .ok_or_else(|| PluginError::UnknownVersion(info.sha256.clone()))?;
                info.size = wasm.len() as u64;
                self.engine.compile(&info.sha256, Arc::new(wasm)).await?
            }
        };
        if info.size == 0 {
            info.size = self
                .store
                .record_get(COMPONENT_KIND, &info.sha256)
                .await?
                .map_or(0, |wasm| wasm.len() as u64);
        }
        let prepared = self.engine.prepare(slot, &component)?;
        let config_json = serde_json::to_string(&info.config).map_err(store_json)?;
        let ctx = Arc::new(PluginContext::new(
            slot,
            &info.sha256,
            config_json,
            self.store.clone(),
        ));
        Ok(Arc::new(LoadedPlugin::new(
            slot,
            info.clone(),
            prepared,
            ctx,
            self.config.deadline(slot),
            self.config.limits(slot),
            loaded::max_retired(self.config.max_instances),
        )))
    }

    /// Re-reads a slot from the store (another replica changed it, or a resync). True when the
    /// store lost the slot: it has no record of it at all (no version, no history) while this
    /// gateway had a version loaded, as after a Redis that came back empty.
    async fn reload(&self, slot: Slot) -> Result<bool, PluginError> {
        let cell = self.cell(slot);
        let _guard = cell.change.lock().await;
        let record = self.read_record(slot).await?;
        let current = cell.bundle.load_full();
        if current.record == record && current.load_error.is_none() {
            return Ok(false);
        }
        let lost = record.active.is_none()
            && record.canary.is_none()
            && record.history.is_empty()
            && (current.active.is_some() || !current.record.history.is_empty());
        let bundle = self.load_bundle(slot, &record, false).await?;
        cell.bundle.store(Arc::new(bundle));
        self.retain_compiled();
        tracing::info!(
            plugin = %slot,
            active = record.active.as_ref().map(|v| short(&v.sha256)),
            canary = record.canary.as_ref().map(|c| short(&c.version.sha256)),
            "plugin slot loaded"
        );
        Ok(lost)
    }

    /// Remembers the components to install in slots nobody configured, and to reinstall if the
    /// store loses them.
    pub fn set_defaults(&self, defaults: &[(Slot, &'static [u8])]) {
        let mut map = self.defaults.lock().unwrap_or_else(|p| p.into_inner());
        map.extend(defaults.iter().copied());
    }

    /// Reinstalls a slot the store lost: from its file when the config feeds it from one,
    /// else the default component. Loudly: a store that forgot its policies serves without
    /// limits, metering or rewards until this runs.
    async fn restore(&self, slot: Slot) {
        let from_file = self.config.files.get(&slot);
        let default = self
            .defaults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&slot)
            .copied();
        let result = match (from_file, default) {
            (Some(file), _) => match tokio::fs::read(&file.path).await {
                Ok(wasm) => {
                    let actor = format!("restore:file:{}", file.path.display());
                    self.install(slot, &wasm, &file.config.to_string(), &actor)
                        .await
                }
                Err(err) => Err(PluginError::Invalid(format!(
                    "cannot read {}: {err}",
                    file.path.display()
                ))),
            },
            (None, Some(wasm)) => self.install(slot, wasm, "{}", "restore:defaults").await,
            (None, None) => {
                tracing::error!(plugin = %slot, "the store lost this plugin slot, and it has no default or file to reinstall: it stays empty (its fallback serves) until an operator installs one");
                return;
            }
        };
        match result {
            Ok(info) => {
                self.metrics
                    .restores
                    .with_label_values(&[slot.as_str()])
                    .inc();
                tracing::error!(plugin = %slot, sha256 = %short(&info.sha256), "the store lost this plugin slot (did it restart empty?); reinstalled its configured plugin");
            }
            Err(err) => {
                tracing::error!(plugin = %slot, error = %err, "the store lost this plugin slot, and reinstalling it failed");
            }
        }
    }

    fn retain_compiled(&self) {
        let bundles: Vec<_> = self
            .slots
            .iter()
            .map(|cell| cell.bundle.load_full())
            .collect();
        let referenced: Vec<&str> = bundles
            .iter()
            .flat_map(|bundle| bundle.record.versions())
            .map(|v| v.sha256.as_str())
            .collect();
        self.engine.retain_compiled(&referenced);
    }

    /// Every slot: versions, canary, history, and this replica's call and fault counts.
    pub fn status(&self) -> Vec<SlotStatus> {
        Slot::ALL
            .into_iter()
            .map(|slot| {
                let cell = self.cell(slot);
                let bundle = cell.bundle.load();
                SlotStatus {
                    slot,
                    active: bundle.record.active.clone(),
                    canary: bundle.record.canary.clone(),
                    history: bundle.record.history.clone(),
                    calls: cell.calls.load(Ordering::Relaxed),
                    faults: cell
                        .faults
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone(),
                    load_error: bundle.load_error.clone(),
                }
            })
            .collect()
    }

    // ---- Calls ---------------------------------------------------------------------------

    /// Orders `candidates` by preference: indices, best first. `None` means use the built-in
    /// round robin: no router installed, no candidates, or the router faulted (a trap, its
    /// deadline, an error, an empty list, an index out of range or repeated). `infos` says who
    /// the candidates are, index for index, for a router that asks (`candidates.describe`).
    pub async fn route(
        &self,
        request: &RouteRequest,
        candidates: &[Candidate],
        infos: &[Arc<CandidateInfo>],
    ) -> Option<Vec<u32>> {
        debug_assert_eq!(candidates.len(), infos.len());
        if candidates.is_empty() {
            return None;
        }
        let pick = Pick::Random;
        let (plugin, answer) = self
            .call(Slot::Router, pick, Call::Route(request, candidates, infos))
            .await?;
        let checked = match answer {
            Ok(Answer::Route(Ok(order))) => check_route(order, candidates.len()),
            Ok(Answer::Route(Err(message))) => Err((FaultKind::PluginError, message)),
            Ok(other) => Err(unexpected(&other)),
            Err(fault) => Err(fault),
        };
        self.settle_answer(&plugin, checked).ok()
    }

    /// Asks the rate limiter whether a request may go now. `None` only when no limiter is
    /// installed. When the limiter faults, the answer is the configured fallback
    /// (`rate_limiter_fail_open`): an allow, or a refusal with a one-second retry.
    pub async fn admit(&self, admission: &Admission) -> Option<Decision> {
        self.admit_reserving(admission)
            .await
            .map(|(decision, _)| decision)
    }

    /// [`admit`](Self::admit), with the version of the limiter that allowed the request: its
    /// settlement goes to that version ([`settle_with`](Self::settle_with)), whatever was
    /// promoted or rolled back meanwhile. No reservation when the fallback decided.
    pub async fn admit_reserving(
        &self,
        admission: &Admission,
    ) -> Option<(Decision, Option<Reservation>)> {
        let pick = Pick::Hash(&admission.request_id);
        let (plugin, answer) = self
            .call(Slot::RateLimiter, pick, Call::Admit(admission))
            .await?;
        let checked = match answer {
            Ok(Answer::Admit(decision)) => Ok(check_decision(decision)),
            Ok(other) => Err(unexpected(&other)),
            Err(fault) => Err(fault),
        };
        Some(match self.settle_answer(&plugin, checked) {
            Ok(decision) => {
                let reservation = decision.allow.then(|| Reservation(plugin));
                (decision, reservation)
            }
            Err(_) => (self.fallback_decision(), None),
        })
    }

    /// Tells the limiter version that admitted a request what the request really used.
    pub async fn settle_with(&self, reservation: &Reservation, settlement: &Settlement) {
        let answer = self
            .call_on(&reservation.0, "active", Call::Settle(settlement))
            .await;
        let checked = match answer {
            Ok(Answer::Settle) => Ok(()),
            Ok(other) => Err(unexpected(&other)),
            Err(fault) => Err(fault),
        };
        let _ = self.settle_answer(&reservation.0, checked);
    }

    fn fallback_decision(&self) -> Decision {
        let allow = self.config.rate_limiter_fail_open;
        Decision {
            allow,
            retry_after_ms: if allow { 0 } else { FAIL_CLOSED_RETRY_MS },
            reason: if allow {
                String::new()
            } else {
                "The rate limiter is unavailable; retry shortly.".to_owned()
            },
            headers: RateLimitHeaders {
                limit_requests: None,
                remaining_requests: None,
                reset_requests_ms: None,
                limit_tokens: None,
                remaining_tokens: None,
                reset_tokens_ms: None,
            },
        }
    }

    /// Tells the rate limiter what a request really used. Goes to the same version `admit`
    /// picked for the same request id (while the canary share is unchanged).
    pub async fn settle(&self, settlement: &Settlement) {
        let pick = Pick::Hash(&settlement.request_id);
        if let Some((plugin, answer)) = self
            .call(Slot::RateLimiter, pick, Call::Settle(settlement))
            .await
        {
            let checked = match answer {
                Ok(Answer::Settle) => Ok(()),
                Ok(other) => Err(unexpected(&other)),
                Err(fault) => Err(fault),
            };
            let _ = self.settle_answer(&plugin, checked);
        }
    }

    /// Prices a completed request. `Ok(None)`: no meter installed. An error (a fault, or the
    /// meter's own error) means the event stays queued and is retried.
    pub async fn charge(&self, event: &UsageEvent) -> Result<Option<Charge>, PluginFault> {
        let pick = Pick::Hash(&event.request_id);
        let Some((plugin, answer)) = self.call(Slot::Meter, pick, Call::Charge(event)).await else {
            return Ok(None);
        };
        let checked = match answer {
            Ok(Answer::Charge(Ok(charge))) => check_charge(charge),
            Ok(Answer::Charge(Err(message))) => Err((FaultKind::PluginError, message)),
            Ok(other) => Err(unexpected(&other)),
            Err(fault) => Err(fault),
        };
        self.settle_answer(&plugin, checked).map(Some)
    }

    /// Points for the operator of the rig that served a request. `Ok(None)`: no reward plugin.
    pub async fn reward_usage(
        &self,
        event: &UsageEvent,
    ) -> Result<Option<Vec<Award>>, PluginFault> {
        let pick = Pick::Hash(&event.request_id);
        self.awards(pick, Call::OnUsage(event)).await
    }

    /// Points for a rig's periodic report. `Ok(None)`: no reward plugin.
    pub async fn reward_report(
        &self,
        report: &RigReport,
    ) -> Result<Option<Vec<Award>>, PluginFault> {
        let pick = Pick::Hash(&report.rig);
        self.awards(pick, Call::OnReport(report)).await
    }

    async fn awards(
        &self,
        pick: Pick<'_>,
        call: Call<'_>,
    ) -> Result<Option<Vec<Award>>, PluginFault> {
        let Some((plugin, answer)) = self.call(Slot::Reward, pick, call).await else {
            return Ok(None);
        };
        let checked = match answer {
            Ok(Answer::Awards(Ok(awards))) => check_awards(awards),
            Ok(Answer::Awards(Err(message))) => Err((FaultKind::PluginError, message)),
            Ok(other) => Err(unexpected(&other)),
            Err(fault) => Err(fault),
        };
        self.settle_answer(&plugin, checked).map(Some)
    }

    /// Picks the version for this call (canary or active) and calls it. `None`: the slot is
    /// empty for this call.
    async fn call(
        &self,
        slot: Slot,
        pick: Pick<'_>,
        call: Call<'_>,
    ) -> Option<(Arc<LoadedPlugin>, Result<Answer, (FaultKind, String)>)> {
        let cell = self.cell(slot);
        let bundle = cell.bundle.load_full();
        let (plugin, role) = match &bundle.canary {
            Some((canary, percent)) if pick.draw() < *percent => (canary.clone(), "canary"),
            _ => (bundle.active.clone()?, "active"),
        };
        drop(bundle);
        let answer = self.call_on(&plugin, role, call).await;
        Some((plugin, answer))
    }

    /// Calls `plugin`, a version of its slot, as `role` (`active` or `canary`, for metrics).
    async fn call_on(
        &self,
        plugin: &Arc<LoadedPlugin>,
        role: &'static str,
        call: Call<'_>,
    ) -> Result<Answer, (FaultKind, String)> {
        let slot = plugin.slot;
        self.cell(slot).calls.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .calls
            .with_label_values(&[slot.as_str(), role])
            .inc();
        let started = Instant::now();
        let answer = plugin.invoke(&self.engine, call).await;
        self.metrics
            .call_duration
            .with_label_values(&[slot.as_str()])
            .observe(started.elapsed().as_secs_f64());
        if plugin.wants_refill() {
            // The next calls' instances are made off this request's path.
            let (next, engine) = (Arc::clone(plugin), Arc::clone(&self.engine));
            self.tasks.spawn(async move { next.refill(&engine).await });
        }
        answer
    }

    /// Turns a checked answer into the caller's result, counting and logging a fault and asking
    /// for a rollback when the version faults too often.
    fn settle_answer<T>(
        &self,
        plugin: &Arc<LoadedPlugin>,
        checked: Result<T, (FaultKind, String)>,
    ) -> Result<T, PluginFault> {
        let (kind, message) = match checked {
            Ok(value) => return Ok(value),
            Err(fault) => fault,
        };
        let slot = plugin.slot;
        self.metrics
            .faults
            .with_label_values(&[slot.as_str(), kind.as_str()])
            .inc();
        self.cell(slot)
            .faults
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add(kind, 1);
        if plugin.should_log_fault() {
            tracing::warn!(
                plugin = %slot,
                version = short(&plugin.info.sha256),
                kind = kind.as_str(),
                "plugin call fell back: {}",
                cut(&message, 500)
            );
        }
        if kind.counts_towards_rollback()
            && plugin.note_fault(self.config.fault_window(), self.config.fault_threshold)
        {
            let is_canary = self
                .cell(slot)
                .bundle
                .load()
                .canary
                .as_ref()
                .is_some_and(|(canary, _)| Arc::ptr_eq(canary, plugin));
            let request = AutoRollback {
                slot,
                sha256: plugin.info.sha256.clone(),
                canary: is_canary,
            };
            if self.rollbacks.try_send(request).is_err() {
                plugin.clear_rollback_request();
            }
        }
        Err(PluginFault {
            slot,
            version: plugin.info.sha256.clone(),
            kind,
            message,
        })
    }

    /// Rolls a slot back after repeated faults of `request.sha256`, if it is still the version
    /// in place (another replica may have rolled it back already).
    async fn auto_rollback(&self, request: AutoRollback) {
        let AutoRollback {
            slot,
            sha256,
            canary,
        } = request;
        let threshold = self.config.fault_threshold;
        let window = self.config.fault_window_secs;
        let sha = sha256.clone();
        let result = self
            .change(slot, move |record, _| {
                if canary {
                    if record
                        .canary
                        .as_ref()
                        .is_some_and(|c| c.version.sha256 == sha)
                    {
                        record.canary = None;
                    }
                } else if record.active.as_ref().is_some_and(|a| a.sha256 == sha) {
                    let previous = record.history.pop().ok_or(PluginError::NoPrevious(slot))?;
                    record.active = Some(VersionInfo {
                        activated_at: unix_secs(),
                        activated_by: "auto-rollback".to_owned(),
                        ..previous
                    });
                }
                Ok(record.active.clone())
            })
            .await;
        match result {
            Ok(now_active) => {
                self.metrics
                    .rollbacks
                    .with_label_values(&[slot.as_str()])
                    .inc();
                tracing::error!(
                    plugin = %slot,
                    faulty = short(&sha256),
                    canary,
                    active = now_active.as_ref().map(|v| short(&v.sha256)),
                    "plugin rolled back: {threshold} faults within {window} s"
                );
            }
            Err(PluginError::NoPrevious(_)) => tracing::error!(
                plugin = %slot,
                faulty = short(&sha256),
                "plugin keeps faulting ({threshold} faults within {window} s) and there is no \
                 previous version to roll back to; calls keep falling back"
            ),
            Err(err) => {
                tracing::error!(plugin = %slot, error = %err, "automatic rollback failed");
                // Let the next burst of faults ask again.
                let bundle = self.cell(slot).bundle.load();
                for plugin in bundle
                    .active
                    .iter()
                    .chain(bundle.canary.iter().map(|(p, _)| p))
                {
                    if plugin.info.sha256 == sha256 {
                        plugin.clear_rollback_request();
                    }
                }
            }
        }
    }

    // ---- Background ----------------------------------------------------------------------

    /// Starts the tasks that keep the host current: one follows store events (other replicas'
    /// changes, within a second), carries out automatic rollbacks and resyncs periodically;
    /// one more watches the files of file-fed slots. They stop on [`PluginHost::shutdown`] or
    /// when the host is dropped. Call once.
    pub fn spawn_background(self: &Arc<Self>) -> Vec<JoinHandle<()>> {
        let mut tasks = Vec::new();
        let events = self.store.subscribe();
        let rollbacks = self
            .rollback_queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        tasks.push(tokio::spawn(follow(
            Arc::downgrade(self),
            events,
            rollbacks,
            self.shutdown.clone(),
        )));
        if !self.config.files.is_empty() {
            tasks.push(tokio::spawn(watch_files(
                Arc::downgrade(self),
                self.config.files.clone(),
                self.shutdown.clone(),
            )));
        }
        tasks
    }

    /// Stops the background tasks.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Runs `work` off the request's path, owned by the host: [`finish_tasks`](Self::finish_tasks)
    /// waits for it.
    pub fn spawn<F>(&self, work: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(work);
    }

    /// Waits, at most `bound`, for the work started with [`spawn`](Self::spawn) (limiter
    /// settlements of the last requests, instances made ahead); false if some was still
    /// running.
    pub async fn finish_tasks(&self, bound: Duration) -> bool {
        self.tasks.close();
        let done = tokio::time::timeout(bound, self.tasks.wait()).await.is_ok();
        self.tasks.reopen();
        done
    }
}

impl Drop for PluginHost {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Follows store events, automatic rollback requests and the periodic resync.
async fn follow(
    host: Weak<PluginHost>,
    mut events: broadcast::Receiver<StoreEvent>,
    mut rollbacks: Option<mpsc::Receiver<AutoRollback>>,
    shutdown: CancellationToken,
) {
    let resync = host
        .upgrade()
        .map_or(0, |host| host.config.resync_interval_secs);
    let mut resync = (resync > 0).then(|| {
        let period = Duration::from_secs(resync);
        tokio::time::interval_at(tokio::time::Instant::now() + period, period)
    });
    loop {
        enum Work {
            Reload(Vec<Slot>),
            Rollback(AutoRollback),
        }
        let work = tokio::select! {
            () = shutdown.cancelled() => return,
            event = events.recv() => match event {
                Ok(StoreEvent::PluginActivated { slot }) => match slot.parse() {
                    Ok(slot) => Work::Reload(vec![slot]),
                    Err(_) => continue,
                },
                Ok(StoreEvent::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    Work::Reload(Slot::ALL.to_vec())
                }
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            },
            Some(request) = async {
                match rollbacks.as_mut() {
                    Some(queue) => queue.recv().await,
                    None => std::future::pending().await,
                }
            } => Work::Rollback(request),
            _ = async {
                match resync.as_mut() {
                    Some(interval) => interval.tick().await,
                    None => std::future::pending().await,
                }
            } => Work::Reload(Slot::ALL.to_vec()),
        };
        let Some(host) = host.upgrade() else { return };
        match work {
            Work::Reload(slots) => {
                for slot in slots {
                    match host.reload(slot).await {
                        Ok(false) => {}
                        Ok(true) => host.restore(slot).await,
                        Err(err) => {
                            tracing::warn!(plugin = %slot, error = %err, "cannot reload plugin slot")
                        }
                    }
                }
            }
            Work::Rollback(request) => host.auto_rollback(request).await,
        }
    }
}

/// Installs the files of file-fed slots at start and whenever one changes (checked by
/// modification time and size every second, then by content hash).
async fn watch_files(
    host: Weak<PluginHost>,
    files: std::collections::BTreeMap<Slot, PluginFile>,
    shutdown: CancellationToken,
) {
    // Per slot: the (mtime, len) last seen, and the sha256 last installed from the file.
    let mut seen: HashMap<Slot, (Option<SystemTime>, u64)> = HashMap::new();
    let mut installed: HashMap<Slot, String> = HashMap::new();
    let mut tick = tokio::time::interval(FILE_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(host) = host.upgrade() else { return };
        for (slot, file) in &files {
            let stamp = match tokio::fs::metadata(&file.path).await {
                Ok(meta) => (meta.modified().ok(), meta.len()),
                Err(err) => {
                    if seen.insert(*slot, (None, 0)) != Some((None, 0)) {
                        tracing::warn!(plugin = %slot, path = %file.path.display(), error = %err, "cannot read plugin file");
                    }
                    continue;
                }
            };
            if seen.get(slot) == Some(&stamp) {
                continue;
            }
            seen.insert(*slot, stamp);
            install_file(&host, *slot, &file.path, &file.config, &mut installed).await;
        }
    }
}

async fn install_file(
    host: &PluginHost,
    slot: Slot,
    path: &Path,
    config: &serde_json::Value,
    installed: &mut HashMap<Slot, String>,
) {
    let wasm = match tokio::fs::read(path).await {
        Ok(wasm) => wasm,
        Err(err) => {
            tracing::warn!(plugin = %slot, path = %path.display(), error = %err, "cannot read plugin file");
            return;
        }
    };
    let sha256 = hex::encode(Sha256::digest(&wasm));
    if installed.get(&slot) == Some(&sha256) {
        return;
    }
    let actor = format!("file:{}", PathBuf::from(path).display());
    let config = config.to_string();
    match host.install(slot, &wasm, &config, &actor).await {
        Ok(_) => {
            installed.insert(slot, sha256);
        }
        Err(err) => {
            tracing::error!(plugin = %slot, path = %path.display(), error = %err, "plugin file refused")
        }
    }
}

/// How a call picks between canary and active.
#[derive(Clone, Copy)]
enum Pick<'a> {
    /// By a hash of an id: the same request (admit, then settle) lands on the same version.
    Hash(&'a str),
    Random,
}

impl Pick<'_> {
    /// A number in 0..100.
    fn draw(self) -> u8 {
        match self {
            Pick::Hash(id) => {
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                id.hash(&mut hasher);
                (hasher.finish() % 100) as u8
            }
            Pick::Random => rand::random_range(0..100),
        }
    }
}

fn check_route(order: Vec<u32>, candidates: usize) -> Result<Vec<u32>, (FaultKind, String)> {
    if order.is_empty() {
        return Err((FaultKind::BadOutput, "router returned an empty list".into()));
    }
    if order.len() > candidates {
        return Err((
            FaultKind::BadOutput,
            format!(
                "router returned {} indices for {candidates} candidates",
                order.len()
            ),
        ));
    }
    let mut seen = vec![false; candidates];
    for &index in &order {
        match seen.get_mut(index as usize) {
            None => {
                return Err((
                    FaultKind::BadOutput,
                    format!("router returned index {index} for {candidates} candidates"),
                ));
            }
            Some(true) => {
                return Err((
                    FaultKind::BadOutput,
                    format!("router returned index {index} twice"),
                ));
            }
            Some(flag) => *flag = true,
        }
    }
    Ok(order)
}

fn check_decision(mut decision: Decision) -> Decision {
    if decision.reason.chars().count() > MAX_REASON_CHARS {
        decision.reason = cut(&decision.reason, MAX_REASON_CHARS);
    }
    decision
}

/// The rate limiter version that admitted a request (see [`PluginHost::admit_reserving`]).
#[derive(Clone)]
pub struct Reservation(Arc<LoadedPlugin>);

impl Reservation {
    /// The version (component and configuration) that admitted the request.
    pub fn version(&self) -> &VersionInfo {
        &self.0.info
    }
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Reservation({})", short(&self.0.info.sha256))
    }
}

/// The model, key, request and backend a configuration check names: no real one.
const CONFIG_CHECK: &str = "garage-config-check";
/// The least time a configuration check gets (see [`PluginHost::check_config`]).
const CONFIG_CHECK_DEADLINE: Duration = Duration::from_secs(1);

/// Largest amount (credits of one charge, points of one award) the gateway records: ledgers sum
/// amounts as integer millionths in 64-bit counters, which this keeps far from overflowing
/// (9.2e12 in all). A plugin that answers more is faulty, not rich.
const MAX_AMOUNT: f64 = 1e9;

fn check_charge(charge: Charge) -> Result<Charge, (FaultKind, String)> {
    if !charge.credits.is_finite() || !(0.0..=MAX_AMOUNT).contains(&charge.credits) {
        return Err((
            FaultKind::BadOutput,
            format!("meter charged {} credits", charge.credits),
        ));
    }
    Ok(charge)
}

fn check_awards(awards: Vec<Award>) -> Result<Vec<Award>, (FaultKind, String)> {
    if awards.len() > MAX_AWARDS {
        return Err((
            FaultKind::BadOutput,
            format!(
                "reward plugin granted {} awards (at most {MAX_AWARDS})",
                awards.len()
            ),
        ));
    }
    for award in &awards {
        if !award.points.is_finite() || award.points.abs() > MAX_AMOUNT {
            return Err((
                FaultKind::BadOutput,
                format!("reward plugin granted {} points", award.points),
            ));
        }
        if award.operator.is_empty() || award.operator.chars().count() > MAX_OPERATOR_CHARS {
            return Err((
                FaultKind::BadOutput,
                "reward plugin named an empty or overlong operator".into(),
            ));
        }
    }
    Ok(awards
        .into_iter()
        .map(|mut award| {
            award.reason = cut(&award.reason, MAX_REASON_CHARS);
            award
        })
        .collect())
}

fn unexpected(answer: &Answer) -> (FaultKind, String) {
    (
        FaultKind::Host,
        format!("internal: unexpected answer {answer:?}"),
    )
}

fn version_id(slot: Slot, sha256: &str) -> String {
    format!("{slot}:{sha256}")
}

fn short(sha256: &str) -> &str {
    &sha256[..sha256.len().min(12)]
}

fn cut(text: &str, max_chars: usize) -> String {
    text.chars().take(max_chars).collect()
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn store_json(err: serde_json::Error) -> PluginError {
    PluginError::Store(crate::store::StoreError::Corrupt(err.to_string()))
}
