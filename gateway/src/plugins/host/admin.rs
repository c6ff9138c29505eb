//! The registry: uploading (with the trial call), activating, canaries, promotion,
//! rollback, emptying a slot, reloading it from the store and restoring one the store lost.

use super::*;

impl PluginHost {
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
    pub(super) async fn check_config(
        &self,
        slot: Slot,
        sha256: &str,
        prepared: &crate::plugins::bindings::Prepared,
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
        let candidates = vec![Candidate {
            key: crate::plugins::candidate_key(CONFIG_CHECK),
            in_flight: 0,
            engine_running: 0,
            engine_waiting: 0,
            kv_cache_usage: 0.0,
            tokens_per_second: 0.0,
            latency_ms: 0.0,
            gpu_utilization: 0.0,
            gpu_memory_free_bytes: 0,
            trust: crate::plugins::Trust::Configured,
        }];
        let infos: Arc<[Arc<CandidateInfo>]> = Arc::new([Arc::new(CandidateInfo {
            id: CONFIG_CHECK.into(),
            rig: String::new(),
            operator: String::new(),
            labels: Vec::new(),
        })]);
        let route = RouteInput {
            request,
            candidates,
            infos,
        };
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
            counted_by: crate::plugins::CountedBy::Gateway,
            reported_prompt_tokens: Some(1),
            reported_completion_tokens: Some(1),
            trust: crate::plugins::Trust::Configured,
            price: None,
        };
        let call = match slot {
            Slot::Router => Call::Route(&route),
            Slot::RateLimiter => Call::Admit(&admission),
            Slot::Meter => Call::Charge(std::slice::from_ref(&event)),
            Slot::Reward => Call::OnUsage(std::slice::from_ref(&event)),
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
    pub(super) async fn change<F>(
        &self,
        slot: Slot,
        edit: F,
    ) -> Result<Option<VersionInfo>, PluginError>
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

    pub(super) async fn read_record(&self, slot: Slot) -> Result<SlotRecord, PluginError> {
        match self.store.record_get(SLOT_KIND, slot.as_str()).await? {
            Some(bytes) => serde_json::from_slice(&bytes).map_err(store_json),
            None => Ok(SlotRecord::empty(slot)),
        }
    }

    pub(super) async fn write_record(&self, record: &SlotRecord) -> Result<(), PluginError> {
        let json = serde_json::to_vec(record).map_err(store_json)?;
        self.store
            .record_put(SLOT_KIND, record.slot.as_str(), &json)
            .await?;
        Ok(())
    }

    pub(super) async fn publish(&self, slot: Slot) {
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
    pub(super) async fn load_bundle(
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

    pub(super) async fn load_version(
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
    pub(super) async fn reload(&self, slot: Slot) -> Result<bool, PluginError> {
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
    pub(super) async fn restore(&self, slot: Slot) {
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

    pub(super) fn retain_compiled(&self) {
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
}
