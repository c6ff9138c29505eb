//! Files: uploads within each key's quotas, reads, deletes, listings by owner.

use super::*;

/// Room held in a key's file quotas for one upload (see [`Batches::reserve_upload`]). Dropped
/// without being spent or released (a client that went away mid-upload), it gives the room
/// back from a task.
pub struct UploadQuota {
    pub(super) store: Arc<dyn Store>,
    pub(super) count_key: String,
    pub(super) bytes_key: String,
    /// Bytes held.
    pub(super) bytes: i64,
    pub(super) spent: bool,
}

impl UploadQuota {
    /// Holds exactly `bytes` (the file's size) instead of the upper bound taken before the
    /// upload was read.
    pub(super) async fn settle(mut self, bytes: u64) -> Result<Self, StoreError> {
        let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
        if bytes != self.bytes {
            self.store
                .kv_incr(&self.bytes_key, bytes - self.bytes, None)
                .await?;
            self.bytes = bytes;
        }
        Ok(self)
    }

    /// The file is stored: the room is its for good (until it is deleted).
    pub(super) fn spend(mut self) {
        self.spent = true;
    }

    /// Gives the room back.
    pub async fn release(mut self) {
        self.spent = true;
        give_back(&*self.store, &self.count_key, &self.bytes_key, self.bytes).await;
    }
}

pub(super) async fn give_back(store: &dyn Store, count_key: &str, bytes_key: &str, bytes: i64) {
    let count = store.kv_incr(count_key, -1, None).await;
    let bytes = store.kv_incr(bytes_key, -bytes, None).await;
    if let Err(err) = count.and(bytes) {
        tracing::warn!(error = %err, key = count_key, "cannot give back file quota");
    }
}

impl Drop for UploadQuota {
    fn drop(&mut self) {
        if self.spent {
            return;
        }
        let (store, count_key, bytes_key, bytes) = (
            Arc::clone(&self.store),
            std::mem::take(&mut self.count_key),
            std::mem::take(&mut self.bytes_key),
            self.bytes,
        );
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { give_back(&*store, &count_key, &bytes_key, bytes).await });
        }
    }
}

impl Batches {
    /// Holds room for an upload of at most `max_bytes` in `owner`'s quotas (a file, and its
    /// bytes), before the upload is read: concurrent uploads cannot together exceed them.
    /// Give it back with [`UploadQuota::release`] or spend it with [`Batches::create_file`].
    pub async fn reserve_upload(
        &self,
        owner: &str,
        max_bytes: u64,
    ) -> Result<UploadQuota, ApiError> {
        let config = &self.config;
        let count_key = file_quota_count(owner);
        let bytes_key = file_quota_bytes(owner);
        let limit = |value: u64| i64::try_from(value).unwrap_or(i64::MAX);
        if self
            .store
            .kv_reserve(&count_key, 1, limit(config.max_files_per_key), None)
            .await?
            .is_none()
        {
            return Err(ApiError::bad_request_code(
                format!(
                    "This key has {} files, the most it may keep (batch.max_files_per_key); \
                     delete some first.",
                    config.max_files_per_key
                ),
                Some("file"),
                "file_quota_exceeded",
            ));
        }
        let bytes = limit(max_bytes);
        let reserved = self
            .store
            .kv_reserve(
                &bytes_key,
                bytes,
                limit(config.max_file_bytes_per_key),
                None,
            )
            .await;
        if !matches!(reserved, Ok(Some(_))) {
            self.store.kv_incr(&count_key, -1, None).await?;
            reserved?;
            return Err(ApiError::bad_request_code(
                format!(
                    "This key's files would take more than {} bytes \
                     (batch.max_file_bytes_per_key); delete some first.",
                    config.max_file_bytes_per_key
                ),
                Some("file"),
                "file_quota_exceeded",
            ));
        }
        Ok(UploadQuota {
            store: Arc::clone(&self.store),
            count_key,
            bytes_key,
            bytes,
            spent: false,
        })
    }

    /// Stores an uploaded file in the room `quota` holds (what the file does not use goes
    /// back; so does all of it if the file is refused).
    pub async fn create_file(
        &self,
        owner: &str,
        quota: UploadQuota,
        filename: &str,
        purpose: &str,
        content: &[u8],
    ) -> Result<FileObject, ApiError> {
        if purpose != "batch" {
            quota.release().await;
            return Err(ApiError::bad_request(
                format!(
                    "Files here are for the Batch API: purpose must be `batch`, not `{purpose}`."
                ),
                Some("purpose"),
            ));
        }
        if content.is_empty() {
            quota.release().await;
            return Err(ApiError::bad_request("The file is empty.", Some("file")));
        }
        let quota = quota.settle(content.len() as u64).await?;
        match self
            .put_file(owner, &new_id("file-"), filename, purpose, content)
            .await
        {
            Ok(file) => {
                quota.spend();
                Ok(file)
            }
            Err(err) => {
                quota.release().await;
                Err(err.into())
            }
        }
    }

    pub(super) async fn put_file(
        &self,
        owner: &str,
        id: &str,
        filename: &str,
        purpose: &str,
        content: &[u8],
    ) -> Result<FileObject, StoreError> {
        let file = FileObject {
            id: id.to_owned(),
            object: "file".into(),
            bytes: content.len() as u64,
            created_at: unix_now(),
            filename: filename.to_owned(),
            purpose: purpose.to_owned(),
            status: "processed".into(),
            expires_at: None,
        };
        // The content first: a file record always has its content.
        self.store.record_put(FILE_CONTENT, id, content).await?;
        let stored = StoredFile {
            file: file.clone(),
            owner: owner.to_owned(),
        };
        let json = serde_json::to_vec(&stored).map_err(corrupt)?;
        self.store.record_put(FILES, id, &json).await?;
        self.store
            .record_put(
                &files_of(owner),
                id,
                &serde_json::to_vec(&file).map_err(corrupt)?,
            )
            .await?;
        Ok(file)
    }

    pub(super) async fn stored_file(&self, owner: &str, id: &str) -> Result<StoredFile, ApiError> {
        let not_found = || ApiError::NotFound(format!("No such file: `{id}`."));
        let bytes = self
            .store
            .record_get(FILES, id)
            .await?
            .ok_or_else(not_found)?;
        let stored: StoredFile = serde_json::from_slice(&bytes).map_err(corrupt)?;
        // Someone else's file is as good as missing: no hint that it exists.
        if stored.owner != owner {
            return Err(not_found());
        }
        Ok(stored)
    }

    pub async fn file(&self, owner: &str, id: &str) -> Result<FileObject, ApiError> {
        Ok(self.stored_file(owner, id).await?.file)
    }

    pub async fn file_content(&self, owner: &str, id: &str) -> Result<Vec<u8>, ApiError> {
        self.stored_file(owner, id).await?;
        Ok(self
            .store
            .record_get(FILE_CONTENT, id)
            .await?
            .unwrap_or_default())
    }

    pub async fn delete_file(&self, owner: &str, id: &str) -> Result<FileDeleted, ApiError> {
        let stored = self.stored_file(owner, id).await?;
        self.store.record_delete(FILES, id).await?;
        self.store.record_delete(FILE_CONTENT, id).await?;
        self.store.record_delete(&files_of(owner), id).await?;
        // Uploads count against the key's quotas; the files a batch writes do not.
        if stored.file.purpose == "batch" {
            let bytes = i64::try_from(stored.file.bytes).unwrap_or(i64::MAX);
            self.store
                .kv_incr(&file_quota_count(owner), -1, None)
                .await?;
            self.store
                .kv_incr(&file_quota_bytes(owner), -bytes, None)
                .await?;
        }
        Ok(FileDeleted {
            id: id.to_owned(),
            object: "file".into(),
            deleted: true,
        })
    }

    /// The key's files, newest first.
    pub async fn list_files(
        &self,
        owner: &str,
        purpose: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<FileList, ApiError> {
        // The key's own index: listing costs what the key has, not what every key has.
        let mut files: Vec<FileObject> = self
            .store
            .record_list(&files_of(owner))
            .await?
            .iter()
            .filter_map(|bytes| serde_json::from_slice::<FileObject>(bytes).ok())
            .filter(|f| purpose.is_none_or(|p| f.purpose == p))
            .collect();
        files.sort_by(|a, b| b.id.cmp(&a.id));
        let (data, has_more) = page(files, |f| &f.id, after, limit);
        Ok(FileList {
            object: "list".into(),
            first_id: data.first().map(|f| f.id.clone()),
            last_id: data.last().map(|f| f.id.clone()),
            data,
            has_more,
        })
    }
}
