//! Keeping a host current: the background tasks that follow other replicas' changes, carry
//! out automatic rollbacks and watch plugin files, and the work it owns off the request path.

use super::*;

impl PluginHost {
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
pub(super) async fn follow(
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
pub(super) async fn watch_files(
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

pub(super) async fn install_file(
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
