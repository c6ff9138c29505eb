//! Batches: creating one (its lines queued per model), reading, listing and cancelling.

use super::*;

impl Batches {
    /// Models a batch line may name: those served by this replica's backends and by any rig
    /// that heartbeats to the network.
    pub(super) async fn known_models(
        &self,
        local: BTreeSet<String>,
    ) -> Result<BTreeSet<String>, ApiError> {
        let mut models = local;
        for node in self.nodes.list().await? {
            if !node.revoked {
                models.extend(node.models);
            }
        }
        Ok(models)
    }

    /// Creates a batch for `key`, with the models it may use; `local_models` are those this
    /// replica's backends serve. A key that takes verified rigs only has its lines leased to
    /// verified rigs only.
    pub async fn create_batch(
        &self,
        key: &ApiKeyRecord,
        request: CreateBatch,
        local_models: BTreeSet<String>,
    ) -> Result<BatchObject, ApiError> {
        let (owner, allowed) = (key.id.as_str(), key.allowed_models.as_deref());
        let verified_only = crate::keys::wants_verified_rigs(key);
        if !ENDPOINTS.contains(&request.endpoint.as_str()) {
            return Err(ApiError::bad_request(
                format!(
                    "endpoint must be one of {}, not `{}`.",
                    ENDPOINTS.join(", "),
                    request.endpoint
                ),
                Some("endpoint"),
            ));
        }
        if request.completion_window != COMPLETION_WINDOW {
            return Err(ApiError::bad_request(
                format!("completion_window must be `{COMPLETION_WINDOW}`."),
                Some("completion_window"),
            ));
        }
        check_metadata(&request.metadata)?;
        let input = self.stored_file(owner, &request.input_file_id).await?;
        if input.file.purpose != "batch" {
            return Err(ApiError::bad_request(
                "The input file must have been uploaded with purpose `batch`.",
                Some("input_file_id"),
            ));
        }
        let content = self
            .store
            .record_get(FILE_CONTENT, &input.file.id)
            .await?
            .unwrap_or_default();
        let mut known = self.known_models(local_models).await?;
        if let Some(allowed) = allowed {
            known.retain(|m| allowed.contains(m));
        }
        let now = unix_now();
        let mut batch = BatchObject {
            id: new_id("batch_"),
            object: "batch".into(),
            endpoint: request.endpoint.clone(),
            errors: None,
            input_file_id: input.file.id.clone(),
            completion_window: request.completion_window,
            status: BatchStatus::Validating,
            output_file_id: None,
            error_file_id: None,
            model: None,
            created_at: now,
            in_progress_at: None,
            expires_at: Some(now + COMPLETION_WINDOW_SECS),
            finalizing_at: None,
            completed_at: None,
            failed_at: None,
            expired_at: None,
            cancelling_at: None,
            cancelled_at: None,
            request_counts: RequestCounts::default(),
            usage: None,
            metadata: request.metadata,
        };
        let lines = match validate(
            &content,
            &request.endpoint,
            &known,
            self.config.max_requests,
            self.config.max_errors,
        ) {
            Ok(lines) => lines,
            Err(errors) => {
                batch.status = BatchStatus::Failed;
                batch.failed_at = Some(now);
                batch.errors = Some(BatchErrors {
                    object: "list".into(),
                    data: errors,
                });
                self.save_new(&StoredBatch {
                    batch: batch.clone(),
                    owner: owner.to_owned(),
                    models: Vec::new(),
                    verified_only,
                })
                .await?;
                return Ok(batch);
            }
        };
        batch.model = lines.first().map(|l| l.model.clone());
        batch.request_counts.total = lines.len() as u64;
        let mut by_model: BTreeMap<&str, Vec<QueueItem>> = BTreeMap::new();
        for line in &lines {
            let payload = serde_json::to_vec(&QueuedLine {
                url: request.endpoint.clone(),
                body: line.body.clone(),
            })
            .map_err(corrupt)?;
            by_model.entry(&line.model).or_default().push(QueueItem {
                id: line.number.to_string(),
                payload,
            });
        }
        // Lines and index first, the batch record last: rigs take lines only from batches whose
        // record says `in_progress`, and a crash before the record leaves an orphan index entry
        // that the sweeper removes.
        for (model, items) in &by_model {
            self.store
                .queue_push(&queue_name(&batch.id, model), items)
                .await?;
            let index = QueueIndex {
                batch_id: batch.id.clone(),
                model: (*model).to_owned(),
                created_at: now,
            };
            let json = serde_json::to_vec(&index).map_err(corrupt)?;
            self.store.record_put(QUEUES, &index.id(), &json).await?;
        }
        batch.status = BatchStatus::InProgress;
        batch.in_progress_at = Some(now);
        let models: Vec<String> = by_model.keys().map(|m| (*m).to_owned()).collect();
        self.save_new(&StoredBatch {
            batch: batch.clone(),
            owner: owner.to_owned(),
            models: models.clone(),
            verified_only,
        })
        .await?;
        for model in models {
            // Best effort: rigs also look now and then by themselves.
            let _ = self.store.publish(&StoreEvent::BatchQueued { model }).await;
        }
        tracing::info!(batch = %batch.id, lines = lines.len(), "batch queued");
        Ok(batch)
    }

    pub(super) async fn save(&self, stored: &StoredBatch) -> Result<(), StoreError> {
        let json = serde_json::to_vec(stored).map_err(corrupt)?;
        self.store
            .record_put(BATCHES, &stored.batch.id, &json)
            .await
    }

    /// Saves a new batch and adds it to its owner's index.
    pub(super) async fn save_new(&self, stored: &StoredBatch) -> Result<(), StoreError> {
        self.save(stored).await?;
        self.store
            .record_put(
                &batches_of(&stored.owner),
                &stored.batch.id,
                stored.batch.id.as_bytes(),
            )
            .await
    }

    /// Builds the per-owner indexes of files and batches from the records, once per store: a
    /// store an older gateway wrote has records and no indexes. Idempotent; a crash half way
    /// does it again at the next start.
    pub async fn index_owners(&self) -> Result<(), StoreError> {
        if self.store.kv_get(OWNER_INDEX_DONE).await?.is_some() {
            return Ok(());
        }
        let mut files = 0;
        for bytes in self.store.record_list(FILES).await? {
            if let Ok(stored) = serde_json::from_slice::<StoredFile>(&bytes) {
                let file = serde_json::to_vec(&stored.file).map_err(corrupt)?;
                self.store
                    .record_put(&files_of(&stored.owner), &stored.file.id, &file)
                    .await?;
                files += 1;
            }
        }
        let mut batches = 0;
        for bytes in self.store.record_list(BATCHES).await? {
            if let Ok(stored) = serde_json::from_slice::<StoredBatch>(&bytes) {
                self.store
                    .record_put(
                        &batches_of(&stored.owner),
                        &stored.batch.id,
                        stored.batch.id.as_bytes(),
                    )
                    .await?;
                batches += 1;
            }
        }
        self.store.kv_set(OWNER_INDEX_DONE, b"1", None).await?;
        if files + batches > 0 {
            tracing::info!(files, batches, "indexed files and batches by owner");
        }
        Ok(())
    }

    pub(super) async fn load(&self, id: &str) -> Result<Option<StoredBatch>, StoreError> {
        match self.store.record_get(BATCHES, id).await? {
            Some(bytes) => Ok(Some(serde_json::from_slice(&bytes).map_err(corrupt)?)),
            None => Ok(None),
        }
    }

    pub(super) async fn owned(&self, owner: &str, id: &str) -> Result<StoredBatch, ApiError> {
        match self.load(id).await? {
            Some(stored) if stored.owner == owner => Ok(stored),
            _ => Err(ApiError::NotFound(format!("No such batch: `{id}`."))),
        }
    }

    pub(super) async fn count(&self, key: &str) -> Result<u64, StoreError> {
        Ok(read_counter(self.store.as_ref(), key).await?.max(0) as u64)
    }

    /// The batch as a client sees it: live counts while it runs.
    pub(super) async fn view(&self, mut stored: StoredBatch) -> Result<BatchObject, StoreError> {
        if !stored.batch.status.is_terminal() {
            let counts = &mut stored.batch.request_counts;
            counts.completed = self.count(&counter(&stored.batch.id, "completed")).await?;
            counts.failed = self.count(&counter(&stored.batch.id, "failed")).await?;
        }
        Ok(stored.batch)
    }

    pub async fn batch(&self, owner: &str, id: &str) -> Result<BatchObject, ApiError> {
        let stored = self.owned(owner, id).await?;
        Ok(self.view(stored).await?)
    }

    /// The key's batches, newest first.
    pub async fn list_batches(
        &self,
        owner: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<BatchList, ApiError> {
        // The key's own index of ids: only the page's batches are read and decoded.
        let mut ids: Vec<String> = self
            .store
            .record_list(&batches_of(owner))
            .await?
            .into_iter()
            .filter_map(|bytes| String::from_utf8(bytes).ok())
            .collect();
        ids.sort_by(|a, b| b.cmp(a));
        let (page, has_more) = page(ids, |id| id, after, limit);
        let mut data = Vec::with_capacity(page.len());
        for id in page {
            match self.load(&id).await? {
                Some(stored) if stored.owner == owner => data.push(self.view(stored).await?),
                _ => {}
            }
        }
        Ok(BatchList {
            object: "list".into(),
            first_id: data.first().map(|b| b.id.clone()),
            last_id: data.last().map(|b| b.id.clone()),
            data,
            has_more,
        })
    }

    /// Every key's batches, newest first, at most `limit`, with the key that owns each (the
    /// admin API and the operator's console). Reads every batch record: for an operator's
    /// overview, not for a hot path.
    pub async fn list_all_batches(&self, limit: usize) -> Result<Vec<OwnedBatch>, ApiError> {
        let mut stored: Vec<StoredBatch> = self
            .store
            .record_list(BATCHES)
            .await?
            .iter()
            .filter_map(|bytes| serde_json::from_slice(bytes).ok())
            .collect();
        stored.sort_by(|a, b| {
            (b.batch.created_at, &b.batch.id).cmp(&(a.batch.created_at, &a.batch.id))
        });
        let mut out = Vec::new();
        for batch in stored.into_iter().take(limit) {
            let owner = batch.owner.clone();
            out.push(OwnedBatch {
                owner,
                batch: self.view(batch).await?,
            });
        }
        Ok(out)
    }

    /// Cancels: no new line starts; lines being run finish (their answers are kept), then the
    /// batch ends `cancelled` with what it has.
    pub async fn cancel(&self, owner: &str, id: &str) -> Result<BatchObject, ApiError> {
        let mut stored = self.owned(owner, id).await?;
        match stored.batch.status {
            BatchStatus::Validating | BatchStatus::InProgress => {}
            BatchStatus::Cancelling => return Ok(self.view(stored).await?),
            status => {
                return Err(ApiError::bad_request(
                    format!("A batch that is {} cannot be cancelled.", status.name()),
                    None,
                ));
            }
        }
        stored.batch.status = BatchStatus::Cancelling;
        stored.batch.cancelling_at = Some(unix_now());
        self.save(&stored).await?;
        for model in &stored.models {
            self.store
                .queue_drop_waiting(&queue_name(id, model))
                .await?;
        }
        self.try_finalize(id).await?;
        let stored = self.owned(owner, id).await?;
        Ok(self.view(stored).await?)
    }
}
