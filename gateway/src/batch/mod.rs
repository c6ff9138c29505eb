//! The Batch API: files of requests that need no answer in real time, run by rigs that pull
//! them when they have spare capacity.
//!
//! - **Files** (`/v1/files`) are kept in the store, owned by the key that uploaded them.
//! - **Creating a batch** validates every line of its input file (OpenAI's per-line errors:
//!   `invalid_json_line`, `duplicate_custom_id`, `url_mismatch`, `model_not_found`...). A valid
//!   batch's lines go into one work queue per (batch, model) in the store; an index record per
//!   queue tells rigs where to look.
//! - **Rigs lease lines** (`/node/v1/batch/lease`, a long poll), run them on their engines and
//!   send the results (`/node/v1/batch/results`). A result counts only from the rig that holds
//!   the line's lease, and is stored under its line number only if that line has none yet
//!   (first writer wins); then the line leaves the queue. A lease that runs out (the rig died or
//!   stalled) puts the line back for another rig. So no line is lost
//!   and none is answered twice, on the memory store and across Redis replicas alike.
//! - **Finalizing** writes the output and error files (in input order) once every line has a
//!   result, or when the batch is cancelled or expires; any replica may do it, under a lock.
//! - Every answered line becomes a usage event marked `batch`, metered and rewarded by the same
//!   plugins as interactive requests.

pub mod api;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use garage_node_protocol::{BatchLease, BatchLineResult, BatchResultsAck, BatchWorkItem};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::config::BatchConfig;
use crate::error::ApiError;
use crate::keys::unix_now;
use crate::ledger::billing::{OutputCount, RequestBounds, TextKind, bill};
use crate::ledger::{Usage, UsageEvent};
use crate::nodes::{NodeRecord, Nodes};
use crate::store::keyspace::{
    BATCH_OWNER_INDEX_DONE as OWNER_INDEX_DONE, BATCH_QUEUES as QUEUES, BATCHES, FILE_CONTENT,
    FILES, batch_count as counter, batch_finalize_lock, batch_holder as holder_key,
    batch_queue as queue_name, batch_results as results_kind, batches_of, file_quota_bytes,
    file_quota_count, files_of,
};
use crate::store::{QueueItem, Store, StoreError, StoreEvent, read_counter};

/// The endpoints a batch may target.
pub const ENDPOINTS: &[&str] = &[
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/rerank",
    "/v1/score",
];
/// The only completion window OpenAI offers, and so the only one we accept.
pub const COMPLETION_WINDOW: &str = "24h";
const COMPLETION_WINDOW_SECS: u64 = 24 * 3600;

/// How long one replica may finalize a batch before another may take over.
const FINALIZE_LOCK: Duration = Duration::from_secs(60);
/// An index record whose batch record never appeared (a crash while creating it) is dropped
/// after this long.
const ORPHAN_AFTER_SECS: u64 = 300;

/// Ids that sort by creation time (UUIDv7), so listings are newest first even within a second.
fn new_id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::now_v7().simple())
}

fn corrupt(err: serde_json::Error) -> StoreError {
    StoreError::Corrupt(err.to_string())
}

/// OpenAI's File object.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct FileObject {
    pub id: String,
    /// Always `file`.
    pub object: String,
    /// Size in bytes.
    pub bytes: u64,
    /// Unix seconds.
    pub created_at: u64,
    pub filename: String,
    /// `batch` for input files, `batch_output` for the files a batch writes.
    pub purpose: String,
    /// Always `processed` (deprecated by OpenAI, still read by older clients).
    pub status: String,
    /// Unix seconds; files do not expire here.
    pub expires_at: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredFile {
    #[serde(flatten)]
    file: FileObject,
    /// Key id of the owner.
    owner: String,
}

/// Room held in a key's file quotas for one upload (see [`Batches::reserve_upload`]). Dropped
/// without being spent or released (a client that went away mid-upload), it gives the room
/// back from a task.
pub struct UploadQuota {
    store: Arc<dyn Store>,
    count_key: String,
    bytes_key: String,
    /// Bytes held.
    bytes: i64,
    spent: bool,
}

impl UploadQuota {
    /// Holds exactly `bytes` (the file's size) instead of the upper bound taken before the
    /// upload was read.
    async fn settle(mut self, bytes: u64) -> Result<Self, StoreError> {
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
    fn spend(mut self) {
        self.spent = true;
    }

    /// Gives the room back.
    pub async fn release(mut self) {
        self.spent = true;
        give_back(&*self.store, &self.count_key, &self.bytes_key, self.bytes).await;
    }
}

async fn give_back(store: &dyn Store, count_key: &str, bytes_key: &str, bytes: i64) {
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

/// `DELETE /v1/files/{id}` answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct FileDeleted {
    pub id: String,
    /// Always `file`.
    pub object: String,
    pub deleted: bool,
}

/// A batch's lifecycle, as OpenAI names it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BatchStatus {
    Validating,
    Failed,
    InProgress,
    Finalizing,
    Completed,
    Expired,
    Cancelling,
    Cancelled,
}

impl BatchStatus {
    /// The name OpenAI gives it.
    pub fn name(self) -> &'static str {
        match self {
            BatchStatus::Validating => "validating",
            BatchStatus::Failed => "failed",
            BatchStatus::InProgress => "in_progress",
            BatchStatus::Finalizing => "finalizing",
            BatchStatus::Completed => "completed",
            BatchStatus::Expired => "expired",
            BatchStatus::Cancelling => "cancelling",
            BatchStatus::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            BatchStatus::Failed
                | BatchStatus::Completed
                | BatchStatus::Expired
                | BatchStatus::Cancelled
        )
    }
}

/// One problem with the input file.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct BatchError {
    /// `invalid_json_line`, `duplicate_custom_id`, `url_mismatch`, `model_not_found`,
    /// `missing_required_parameter`, `invalid_method`, `empty_file`, `too_many_tasks`.
    pub code: String,
    pub message: String,
    /// The field at fault.
    pub param: Option<String>,
    /// The line of the input file (1-based).
    pub line: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct BatchErrors {
    /// Always `list`.
    pub object: String,
    pub data: Vec<BatchError>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct RequestCounts {
    pub total: u64,
    pub completed: u64,
    pub failed: u64,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct InputTokensDetails {
    pub cached_tokens: u64,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct OutputTokensDetails {
    pub reasoning_tokens: u64,
}

/// Tokens of the batch's answered lines (set when it ends).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct BatchUsage {
    pub input_tokens: u64,
    pub input_tokens_details: InputTokensDetails,
    pub output_tokens: u64,
    pub output_tokens_details: OutputTokensDetails,
    pub total_tokens: u64,
}

/// OpenAI's Batch object.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct BatchObject {
    pub id: String,
    /// Always `batch`.
    pub object: String,
    pub endpoint: String,
    /// Problems with the input file (a `failed` batch).
    pub errors: Option<BatchErrors>,
    pub input_file_id: String,
    pub completion_window: String,
    pub status: BatchStatus,
    /// Answers with a 2xx status, in input order.
    pub output_file_id: Option<String>,
    /// Answers with an error status, and lines that were never run.
    pub error_file_id: Option<String>,
    /// The model of the lines (the first one, when they name several).
    pub model: Option<String>,
    /// Unix seconds, like every `*_at` field.
    pub created_at: u64,
    pub in_progress_at: Option<u64>,
    pub expires_at: Option<u64>,
    pub finalizing_at: Option<u64>,
    pub completed_at: Option<u64>,
    pub failed_at: Option<u64>,
    pub expired_at: Option<u64>,
    pub cancelling_at: Option<u64>,
    pub cancelled_at: Option<u64>,
    pub request_counts: RequestCounts,
    pub usage: Option<BatchUsage>,
    pub metadata: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredBatch {
    #[serde(flatten)]
    batch: BatchObject,
    owner: String,
    /// Models of its lines: one queue each.
    models: Vec<String>,
}

/// `POST /v1/batches` body.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateBatch {
    /// A file uploaded with purpose `batch`.
    pub input_file_id: String,
    /// `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, `/v1/responses`,
    /// `/v1/rerank` or `/v1/score`.
    pub endpoint: String,
    /// `24h`.
    pub completion_window: String,
    /// Up to 16 pairs; keys up to 64 characters, values up to 512.
    #[serde(default)]
    pub metadata: Option<BTreeMap<String, String>>,
    /// Output file expiry (accepted for compatibility; files do not expire here).
    #[serde(default)]
    pub output_expires_after: Option<serde_json::Value>,
}

/// `GET /v1/batches` answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BatchList {
    /// Always `list`.
    pub object: String,
    pub data: Vec<BatchObject>,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    pub has_more: bool,
}

/// `GET /v1/files` answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct FileList {
    /// Always `list`.
    pub object: String,
    pub data: Vec<FileObject>,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    pub has_more: bool,
}

/// An index entry: a queue that holds lines of a batch for a model.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct QueueIndex {
    batch_id: String,
    model: String,
    /// Unix seconds; older batches are served first.
    created_at: u64,
}

impl QueueIndex {
    fn id(&self) -> String {
        queue_index_id(&self.batch_id, &self.model)
    }
}

fn queue_index_id(batch_id: &str, model: &str) -> String {
    format!("{batch_id}|{model}")
}

/// What a queued line carries to the rig.
#[derive(Debug, Serialize, Deserialize)]
struct QueuedLine {
    url: String,
    body: serde_json::Value,
}

/// Who holds a leased line, and what its request allows its usage to be: the value of the
/// line's holder key.
#[derive(Debug, Serialize, Deserialize)]
struct Held {
    node: String,
    bounds: LineBounds,
}

impl Held {
    fn read(bytes: &[u8]) -> Option<Held> {
        serde_json::from_slice(bytes).ok()
    }
}

/// A batch line's request, as far as billing its answer goes (see [`crate::ledger::billing`]).
#[derive(Debug, Serialize, Deserialize)]
struct LineBounds {
    request_bytes: u64,
    max_tokens: Option<u32>,
    choices: u32,
    media_parts: u64,
}

impl LineBounds {
    fn of(body: &serde_json::Value) -> Self {
        let bytes = serde_json::to_vec(body).unwrap_or_default();
        let max_tokens = ["max_completion_tokens", "max_tokens", "max_output_tokens"]
            .iter()
            .find_map(|name| body.get(*name)?.as_u64())
            .map(|max| u32::try_from(max).unwrap_or(u32::MAX));
        let n = body
            .get("n")
            .and_then(|n| n.as_u64())
            .map_or(1, |n| u32::try_from(n).unwrap_or(u32::MAX))
            .max(1);
        // A completions request may send a list of prompts (strings or token lists).
        let prompts = match body.get("prompt") {
            Some(serde_json::Value::Array(items))
                if items.first().is_some_and(|i| i.is_string() || i.is_array()) =>
            {
                u32::try_from(items.len()).unwrap_or(u32::MAX).max(1)
            }
            _ => 1,
        };
        LineBounds {
            request_bytes: bytes.len() as u64,
            max_tokens,
            choices: n.saturating_mul(prompts),
            media_parts: crate::ledger::billing::media_parts(&bytes),
        }
    }
}

/// A line's answer as stored until the batch is finalized.
#[derive(Debug, Serialize, Deserialize)]
struct StoredResult {
    line: u64,
    status_code: u16,
    body: serde_json::Value,
    node_id: String,
}

/// A validated input line.
struct Line {
    number: u64,
    model: String,
    body: serde_json::Value,
}

/// Reads an input file: the valid lines, or every problem found (OpenAI reports them all).
fn validate(
    content: &[u8],
    endpoint: &str,
    known_models: &BTreeSet<String>,
    max_requests: usize,
    max_errors: usize,
) -> Result<Vec<Line>, Vec<BatchError>> {
    let mut errors = ErrorList::new(max_errors);
    let mut lines = Vec::new();
    let mut seen = HashSet::new();
    let error = |code: &str, message: String, param: Option<&str>, line: u64| BatchError {
        code: code.into(),
        message,
        param: param.map(str::to_owned),
        line: Some(line),
    };
    for (index, raw) in content.split(|b| *b == b'\n').enumerate() {
        let number = index as u64 + 1;
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let value: serde_json::Value = match serde_json::from_slice(raw) {
            Ok(serde_json::Value::Object(map)) => serde_json::Value::Object(map),
            _ => {
                errors.push(error(
                    "invalid_json_line",
                    "This line is not parseable as valid JSON.".into(),
                    None,
                    number,
                ));
                continue;
            }
        };
        let Some(custom_id) = value.get("custom_id").and_then(|v| v.as_str()) else {
            errors.push(error(
                "missing_required_parameter",
                "Each line needs a `custom_id` string.".into(),
                Some("custom_id"),
                number,
            ));
            continue;
        };
        if !seen.insert(custom_id.to_owned()) {
            errors.push(error(
                "duplicate_custom_id",
                format!("The custom_id `{custom_id}` is used by an earlier line; each request in a batch needs its own."),
                Some("custom_id"),
                number,
            ));
            continue;
        }
        let method = value
            .get("method")
            .and_then(|v| v.as_str())
            .unwrap_or("POST");
        if !method.eq_ignore_ascii_case("POST") {
            errors.push(error(
                "invalid_method",
                format!("The method must be POST, not `{method}`."),
                Some("method"),
                number,
            ));
            continue;
        }
        let url = value
            .get("url")
            .and_then(|v| v.as_str())
            .unwrap_or(endpoint);
        if url != endpoint {
            errors.push(error(
                "url_mismatch",
                format!("The url `{url}` does not match the batch's endpoint `{endpoint}`."),
                Some("url"),
                number,
            ));
            continue;
        }
        let Some(body) = value.get("body").filter(|b| b.is_object()) else {
            errors.push(error(
                "missing_required_parameter",
                "Each line needs a `body` object: the request.".into(),
                Some("body"),
                number,
            ));
            continue;
        };
        let Some(model) = body.get("model").and_then(|m| m.as_str()) else {
            errors.push(error(
                "missing_required_parameter",
                "The request body needs a `model`.".into(),
                Some("body.model"),
                number,
            ));
            continue;
        };
        if !known_models.contains(model) {
            errors.push(error(
                "model_not_found",
                format!("The model `{model}` does not exist or is not available to this key."),
                Some("body.model"),
                number,
            ));
            continue;
        }
        if body.get("stream").and_then(|s| s.as_bool()) == Some(true) {
            errors.push(error(
                "invalid_request",
                "Batch requests cannot stream.".into(),
                Some("body.stream"),
                number,
            ));
            continue;
        }
        lines.push(Line {
            number,
            model: model.to_owned(),
            body: body.clone(),
        });
    }
    if errors.is_empty() && lines.is_empty() {
        errors.push_always(BatchError {
            code: "empty_file".into(),
            message: "The input file has no requests.".into(),
            param: None,
            line: None,
        });
    }
    if lines.len() > max_requests {
        errors.push_always(BatchError {
            code: "too_many_tasks".into(),
            message: format!(
                "The input file has {} requests; a batch may have at most {max_requests}.",
                lines.len()
            ),
            param: None,
            line: None,
        });
    }
    if errors.is_empty() {
        Ok(lines)
    } else {
        Err(errors.finish())
    }
}

/// The problems of an input file, at most `max` of them with a line each: a file of 200,000
/// bad lines is no reason to store 200,000 errors in a batch object that every read of the
/// batch decodes. Past `max`, one last `too_many_errors` entry says how many more there were,
/// as OpenAI's shape allows.
struct ErrorList {
    errors: Vec<BatchError>,
    max: usize,
    /// Line errors not kept.
    more: u64,
}

impl ErrorList {
    fn new(max: usize) -> Self {
        ErrorList {
            errors: Vec::new(),
            max: max.max(1),
            more: 0,
        }
    }

    fn push(&mut self, error: BatchError) {
        if self.errors.len() < self.max {
            self.errors.push(error);
        } else {
            self.more += 1;
        }
    }

    /// A problem of the file as a whole: always kept.
    fn push_always(&mut self, error: BatchError) {
        self.errors.push(error);
    }

    fn is_empty(&self) -> bool {
        self.errors.is_empty() && self.more == 0
    }

    fn finish(mut self) -> Vec<BatchError> {
        if self.more > 0 {
            self.errors.push(BatchError {
                code: "too_many_errors".into(),
                message: format!(
                    "{} more lines have problems; fix the ones above and upload the file again.",
                    self.more
                ),
                param: None,
                line: None,
            });
        }
        self.errors
    }
}

fn check_metadata(metadata: &Option<BTreeMap<String, String>>) -> Result<(), ApiError> {
    let Some(metadata) = metadata else {
        return Ok(());
    };
    let bad = metadata.len() > 16
        || metadata
            .iter()
            .any(|(k, v)| k.chars().count() > 64 || v.chars().count() > 512);
    if bad {
        return Err(ApiError::bad_request(
            "metadata holds at most 16 pairs, keys up to 64 characters and values up to 512.",
            Some("metadata"),
        ));
    }
    Ok(())
}

/// The Batch API's state, shared by every request handler.
pub struct Batches {
    store: Arc<dyn Store>,
    nodes: Arc<Nodes>,
    usage: Arc<Usage>,
    config: BatchConfig,
    /// Woken when lines are queued (on any replica): rigs waiting for work look again.
    queued: tokio::sync::Notify,
    /// Cancelled at shutdown: rigs waiting for work get their answer at once.
    stopping: tokio_util::sync::CancellationToken,
    metrics: BatchMetrics,
}

/// Prometheus metrics of the Batch API.
#[derive(Clone)]
pub struct BatchMetrics {
    /// Lines handed to rigs (a line leased again after a lost lease counts again).
    pub leased: prometheus::IntCounter,
    /// Answers from rigs by outcome: `completed`, `failed` (an error status), `ignored` (the
    /// line already had an answer, or its batch ended).
    pub answers: prometheus::IntCounterVec,
    /// Batches that ended, by final status.
    pub finished: prometheus::IntCounterVec,
}

impl BatchMetrics {
    fn new() -> Self {
        BatchMetrics {
            leased: prometheus::IntCounter::new(
                "garage_batch_lines_leased_total",
                "Batch lines handed to rigs",
            )
            .unwrap_or_else(|e| unreachable!("static metric definition: {e}")),
            answers: prometheus::IntCounterVec::new(
                prometheus::Opts::new(
                    "garage_batch_answers_total",
                    "Batch line answers from rigs by outcome (completed, failed, ignored)",
                ),
                &["outcome"],
            )
            .unwrap_or_else(|e| unreachable!("static metric definition: {e}")),
            finished: prometheus::IntCounterVec::new(
                prometheus::Opts::new(
                    "garage_batches_finished_total",
                    "Batches that ended, by status",
                ),
                &["status"],
            )
            .unwrap_or_else(|e| unreachable!("static metric definition: {e}")),
        }
    }

    pub fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.leased.clone()),
            Box::new(self.answers.clone()),
            Box::new(self.finished.clone()),
        ]
    }
}

impl Batches {
    pub fn new(
        store: Arc<dyn Store>,
        nodes: Arc<Nodes>,
        usage: Arc<Usage>,
        config: BatchConfig,
    ) -> Arc<Self> {
        Arc::new(Batches {
            store,
            nodes,
            usage,
            config,
            queued: tokio::sync::Notify::new(),
            stopping: tokio_util::sync::CancellationToken::new(),
            metrics: BatchMetrics::new(),
        })
    }

    pub fn metrics(&self) -> &BatchMetrics {
        &self.metrics
    }

    /// Ends every wait for work (the gateway is shutting down).
    pub fn stop(&self) {
        self.stopping.cancel();
    }

    pub fn config(&self) -> &BatchConfig {
        &self.config
    }

    // ---- files ------------------------------------------------------------------------------

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

    async fn put_file(
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

    async fn stored_file(&self, owner: &str, id: &str) -> Result<StoredFile, ApiError> {
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

    // ---- batches ----------------------------------------------------------------------------

    /// Models a batch line may name: those served by this replica's backends and by any rig
    /// that heartbeats to the network.
    async fn known_models(&self, local: BTreeSet<String>) -> Result<BTreeSet<String>, ApiError> {
        let mut models = local;
        for node in self.nodes.list().await? {
            if !node.revoked {
                models.extend(node.models);
            }
        }
        Ok(models)
    }

    /// Creates a batch for the key `owner`, which may use only `allowed` models (all if
    /// `None`); `local_models` are those this replica's backends serve.
    pub async fn create_batch(
        &self,
        owner: &str,
        allowed: Option<&[String]>,
        request: CreateBatch,
        local_models: BTreeSet<String>,
    ) -> Result<BatchObject, ApiError> {
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
        })
        .await?;
        for model in models {
            // Best effort: rigs also look now and then by themselves.
            let _ = self.store.publish(&StoreEvent::BatchQueued { model }).await;
        }
        tracing::info!(batch = %batch.id, lines = lines.len(), "batch queued");
        Ok(batch)
    }

    async fn save(&self, stored: &StoredBatch) -> Result<(), StoreError> {
        let json = serde_json::to_vec(stored).map_err(corrupt)?;
        self.store
            .record_put(BATCHES, &stored.batch.id, &json)
            .await
    }

    /// Saves a new batch and adds it to its owner's index.
    async fn save_new(&self, stored: &StoredBatch) -> Result<(), StoreError> {
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

    async fn load(&self, id: &str) -> Result<Option<StoredBatch>, StoreError> {
        match self.store.record_get(BATCHES, id).await? {
            Some(bytes) => Ok(Some(serde_json::from_slice(&bytes).map_err(corrupt)?)),
            None => Ok(None),
        }
    }

    async fn owned(&self, owner: &str, id: &str) -> Result<StoredBatch, ApiError> {
        match self.load(id).await? {
            Some(stored) if stored.owner == owner => Ok(stored),
            _ => Err(ApiError::NotFound(format!("No such batch: `{id}`."))),
        }
    }

    async fn count(&self, key: &str) -> Result<u64, StoreError> {
        Ok(read_counter(self.store.as_ref(), key).await?.max(0) as u64)
    }

    /// The batch as a client sees it: live counts while it runs.
    async fn view(&self, mut stored: StoredBatch) -> Result<BatchObject, StoreError> {
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

    // ---- rigs -------------------------------------------------------------------------------

    /// Leases lines of the given models to a rig, waiting up to `wait` for some to appear.
    pub async fn lease(
        &self,
        node: &NodeRecord,
        models: &[String],
        max: u32,
        wait: Duration,
    ) -> Result<BatchLease, ApiError> {
        let max = max.min(self.config.max_lease) as usize;
        let lease = Duration::from_secs(self.config.lease_secs.max(1));
        let deadline =
            tokio::time::Instant::now() + wait.min(Duration::from_millis(self.config.max_wait_ms));
        let lease_secs = lease.as_secs();
        // Only models the rig serves right now, by its own recent heartbeat: a credential that
        // never heartbeated, or names a model it does not serve, gets nothing (and reads
        // nobody's prompts).
        let advertised = self.nodes.serving_now(&node.id).await?;
        let models: Vec<String> = models
            .iter()
            .filter(|model| advertised.contains(model))
            .cloned()
            .collect();
        if node.drained || max == 0 || models.is_empty() {
            return Ok(BatchLease {
                items: Vec::new(),
                lease_secs,
            });
        }
        loop {
            // Register for the wake-up before looking, so a batch queued in between is not
            // missed.
            let queued = self.queued.notified();
            let items = self.lease_now(&node.id, &models, max, lease).await?;
            self.metrics.leased.inc_by(items.len() as u64);
            if !items.is_empty() {
                return Ok(BatchLease { items, lease_secs });
            }
            let now = tokio::time::Instant::now();
            if now >= deadline || self.stopping.is_cancelled() {
                return Ok(BatchLease { items, lease_secs });
            }
            // Expired leases and other replicas' batches are found by looking again now and
            // then; new batches wake us at once.
            let pause = (deadline - now).min(Duration::from_secs(1));
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = queued => {}
                _ = self.stopping.cancelled() => {}
            }
        }
    }

    async fn lease_now(
        &self,
        node_id: &str,
        models: &[String],
        max: usize,
        lease: Duration,
    ) -> Result<Vec<BatchWorkItem>, ApiError> {
        let mut queues: Vec<QueueIndex> = self
            .store
            .record_list(QUEUES)
            .await?
            .iter()
            .filter_map(|bytes| serde_json::from_slice::<QueueIndex>(bytes).ok())
            .filter(|q| models.contains(&q.model))
            .collect();
        // Oldest batch first.
        queues.sort_by(|a, b| (a.created_at, &a.batch_id).cmp(&(b.created_at, &b.batch_id)));
        let mut items = Vec::new();
        let mut statuses: HashMap<String, bool> = HashMap::new();
        for queue in queues {
            if items.len() >= max {
                break;
            }
            let running = match statuses.get(&queue.batch_id) {
                Some(running) => *running,
                None => {
                    let running = self
                        .load(&queue.batch_id)
                        .await?
                        .is_some_and(|b| b.batch.status == BatchStatus::InProgress);
                    statuses.insert(queue.batch_id.clone(), running);
                    running
                }
            };
            if !running {
                continue;
            }
            let leased = self
                .store
                .queue_lease(
                    &queue_name(&queue.batch_id, &queue.model),
                    max - items.len(),
                    lease,
                )
                .await?;
            for item in leased {
                let (Ok(line), Ok(queued)) = (
                    item.id.parse::<u64>(),
                    serde_json::from_slice::<QueuedLine>(&item.payload),
                ) else {
                    tracing::error!(batch = %queue.batch_id, item = %item.id, "unreadable queued line dropped");
                    continue;
                };
                let held = Held {
                    node: node_id.to_owned(),
                    bounds: LineBounds::of(&queued.body),
                };
                self.store
                    .kv_set(
                        &holder_key(&queue.batch_id, &queue.model, line),
                        &serde_json::to_vec(&held).map_err(corrupt)?,
                        Some(lease),
                    )
                    .await?;
                items.push(BatchWorkItem {
                    batch_id: queue.batch_id.clone(),
                    model: queue.model.clone(),
                    line,
                    url: queued.url,
                    body: queued.body,
                });
            }
        }
        Ok(items)
    }

    /// Records a rig's answers: each line's first answer counts, later ones are ignored.
    pub async fn record_results(
        &self,
        node: &NodeRecord,
        results: Vec<BatchLineResult>,
    ) -> Result<BatchResultsAck, ApiError> {
        let mut ack = BatchResultsAck {
            accepted: 0,
            ignored: 0,
        };
        let mut touched = BTreeSet::new();
        let mut batches: HashMap<String, Option<StoredBatch>> = HashMap::new();
        for result in results {
            if !batches.contains_key(&result.batch_id) {
                let loaded = self.load(&result.batch_id).await?;
                batches.insert(result.batch_id.clone(), loaded);
            }
            let Some(Some(stored)) = batches.get(&result.batch_id) else {
                ack.ignored += 1;
                continue;
            };
            let live = matches!(
                stored.batch.status,
                BatchStatus::InProgress | BatchStatus::Cancelling
            );
            if !live || result.line == 0 || result.line > u64::MAX / 2 {
                ack.ignored += 1;
                self.metrics.answers.with_label_values(&["ignored"]).inc();
                continue;
            }
            // Only the rig holding the line's lease may answer it: a rig cannot answer lines
            // it was never given, nor one whose lease it lost to another rig.
            let holder = holder_key(&result.batch_id, &result.model, result.line);
            let held = self.store.kv_get(&holder).await?;
            let Some(held) = held
                .as_deref()
                .and_then(Held::read)
                .filter(|h| h.node == node.id)
            else {
                ack.ignored += 1;
                self.metrics.answers.with_label_values(&["ignored"]).inc();
                continue;
            };
            let ok = (200..300).contains(&result.status_code);
            let mut result = result;
            let billed = if ok {
                Some(self.bill_line(&stored.batch.endpoint, &held, node, &mut result.body))
            } else {
                None
            };
            let record = StoredResult {
                line: result.line,
                status_code: result.status_code,
                body: result.body,
                node_id: node.id.clone(),
            };
            let json = serde_json::to_vec(&record).map_err(corrupt)?;
            let first = self
                .store
                .record_put_new(
                    &results_kind(&result.batch_id),
                    &result.line.to_string(),
                    &json,
                )
                .await?;
            if first {
                ack.accepted += 1;
                let name = if ok { "completed" } else { "failed" };
                self.metrics.answers.with_label_values(&[name]).inc();
                self.store
                    .kv_incr(&counter(&result.batch_id, name), 1, None)
                    .await?;
                if let Some(billed) = billed {
                    self.usage.record(usage_event(
                        &result.batch_id,
                        &result.model,
                        result.line,
                        &stored.owner,
                        node,
                        billed,
                        result.latency_ms,
                    ));
                }
            } else {
                ack.ignored += 1;
                self.metrics.answers.with_label_values(&["ignored"]).inc();
            }
            // Whoever answered first, the line is done.
            self.store.kv_delete(&holder).await?;
            self.store
                .queue_ack(
                    &queue_name(&result.batch_id, &result.model),
                    &result.line.to_string(),
                )
                .await?;
            touched.insert(result.batch_id.clone());
        }
        for batch_id in touched {
            self.try_finalize(&batch_id).await?;
        }
        Ok(ack)
    }

    /// What a line's answer is billed: the rig's reported usage bounded by the line's request
    /// and the answer's text (see [`crate::ledger::billing`]). A corrected count is written into the
    /// answer too, so the output file and the batch's usage say what was billed.
    fn bill_line(
        &self,
        endpoint: &str,
        held: &Held,
        node: &NodeRecord,
        body: &mut serde_json::Value,
    ) -> Counts {
        let mut counts = Counts::of(body);
        let text = match endpoint {
            "/v1/chat/completions" => TextKind::Chat,
            "/v1/completions" => TextKind::Completions,
            "/v1/responses" => TextKind::Responses,
            _ => TextKind::None,
        };
        let mut output = OutputCount::default();
        if text != TextKind::None {
            output.scan(&serde_json::to_vec(body).unwrap_or_default(), text);
        }
        let bounds = RequestBounds {
            request_bytes: held.bounds.request_bytes,
            prompt_estimate: held.bounds.request_bytes / 4,
            max_tokens: held.bounds.max_tokens,
            choices: held.bounds.choices,
            text,
        };
        let reported = crate::ledger::billing::Usage {
            prompt_tokens: counts.input,
            completion_tokens: counts.output,
        };
        let billed = bill(Some(reported), &output, &bounds, || held.bounds.media_parts);
        self.usage.note_corrections(
            &billed.corrections,
            &format!("rig:{}", node.id),
            "",
            Some(reported),
            billed.usage,
        );
        if !billed.corrections.is_empty() {
            counts.input = billed.usage.prompt_tokens;
            counts.output = billed.usage.completion_tokens;
            counts.write_into(body);
        }
        counts.cached = counts.cached.min(counts.input);
        counts.reasoning = counts.reasoning.min(counts.output);
        counts
    }

    // ---- finishing --------------------------------------------------------------------------

    /// Ends the batch if it is done (every line answered, cancelled with nothing running, or
    /// past its window); does nothing otherwise. Safe to call from any replica, any time.
    pub async fn try_finalize(&self, id: &str) -> Result<(), StoreError> {
        let Some(stored) = self.load(id).await? else {
            return Ok(());
        };
        let answered = self.store.record_count(&results_kind(id)).await?;
        let total = stored.batch.request_counts.total;
        let outcome = match stored.batch.status {
            BatchStatus::InProgress | BatchStatus::Finalizing => {
                if answered >= total {
                    BatchStatus::Completed
                } else if stored.batch.expires_at.is_some_and(|at| unix_now() >= at) {
                    BatchStatus::Expired
                } else {
                    return Ok(());
                }
            }
            BatchStatus::Cancelling => {
                let mut running = 0;
                for model in &stored.models {
                    let queue = queue_name(id, model);
                    // Expired leases came back as waiting lines: drop them too.
                    self.store.queue_drop_waiting(&queue).await?;
                    running += self.store.queue_counts(&queue).await?.leased;
                }
                if running > 0 && answered < total {
                    return Ok(());
                }
                BatchStatus::Cancelled
            }
            _ => return Ok(()),
        };
        let lock = batch_finalize_lock(id);
        if self.store.kv_incr(&lock, 1, Some(FINALIZE_LOCK)).await? != 1 {
            return Ok(());
        }
        let result = self.finalize(stored, outcome).await;
        self.store.kv_delete(&lock).await?;
        result
    }

    async fn finalize(
        &self,
        mut stored: StoredBatch,
        outcome: BatchStatus,
    ) -> Result<(), StoreError> {
        let id = stored.batch.id.clone();
        let now = unix_now();
        if stored.batch.status != BatchStatus::Finalizing && outcome == BatchStatus::Completed {
            stored.batch.status = BatchStatus::Finalizing;
            stored.batch.finalizing_at = Some(now);
            self.save(&stored).await?;
        }
        let input = self
            .store
            .record_get(FILE_CONTENT, &stored.batch.input_file_id)
            .await?
            .unwrap_or_default();
        let custom_ids = custom_ids(&input);
        let mut results: BTreeMap<u64, StoredResult> = BTreeMap::new();
        for bytes in self.store.record_list(&results_kind(&id)).await? {
            if let Ok(result) = serde_json::from_slice::<StoredResult>(&bytes) {
                results.insert(result.line, result);
            }
        }
        let mut output = Vec::new();
        let mut errors = Vec::new();
        let mut counts = RequestCounts {
            total: stored.batch.request_counts.total,
            ..RequestCounts::default()
        };
        let mut usage = BatchUsage::default();
        let (unrun_code, unrun_message) = match outcome {
            BatchStatus::Expired => (
                "batch_expired",
                "This line was not run within the batch's completion window.",
            ),
            _ => (
                "batch_cancelled",
                "The batch was cancelled before this line ran.",
            ),
        };
        for (line, custom_id) in &custom_ids {
            let request_id = format!("batch_req_{}_{line}", id.trim_start_matches("batch_"));
            let entry = match results.get(line) {
                Some(result) => {
                    let ok = (200..300).contains(&result.status_code);
                    if ok {
                        counts.completed += 1;
                        add_usage(&mut usage, &result.body);
                    } else {
                        counts.failed += 1;
                    }
                    let line = serde_json::json!({
                        "id": request_id,
                        "custom_id": custom_id,
                        "response": {
                            "status_code": result.status_code,
                            "request_id": request_id,
                            "body": result.body,
                        },
                        "error": null,
                    });
                    if ok {
                        output.push(line);
                    } else {
                        errors.push(line);
                    }
                    continue;
                }
                None if outcome == BatchStatus::Completed => continue,
                None => serde_json::json!({
                    "id": request_id,
                    "custom_id": custom_id,
                    "response": null,
                    "error": {"code": unrun_code, "message": unrun_message},
                }),
            };
            counts.failed += 1;
            errors.push(entry);
        }
        let suffix = id.trim_start_matches("batch_");
        if !output.is_empty() {
            let file = self
                .put_file(
                    &stored.owner,
                    &format!("file-{suffix}out"),
                    &format!("{id}_output.jsonl"),
                    "batch_output",
                    &jsonl(&output),
                )
                .await?;
            stored.batch.output_file_id = Some(file.id);
        }
        if !errors.is_empty() {
            let file = self
                .put_file(
                    &stored.owner,
                    &format!("file-{suffix}err"),
                    &format!("{id}_error.jsonl"),
                    "batch_output",
                    &jsonl(&errors),
                )
                .await?;
            stored.batch.error_file_id = Some(file.id);
        }
        usage.total_tokens = usage.input_tokens.saturating_add(usage.output_tokens);
        stored.batch.usage = Some(usage);
        stored.batch.request_counts = counts;
        stored.batch.status = outcome;
        match outcome {
            BatchStatus::Completed => stored.batch.completed_at = Some(now),
            BatchStatus::Expired => stored.batch.expired_at = Some(now),
            _ => stored.batch.cancelled_at = Some(now),
        }
        self.save(&stored).await?;
        self.metrics
            .finished
            .with_label_values(&[outcome.name()])
            .inc();
        // The batch is over: its queues, index entries, answers and counters go.
        for model in &stored.models {
            let queue = queue_name(&id, model);
            self.store.queue_drop_waiting(&queue).await?;
            self.store
                .record_delete(QUEUES, &queue_index_id(&id, model))
                .await?;
        }
        self.store.record_delete_kind(&results_kind(&id)).await?;
        self.store.kv_delete(&counter(&id, "completed")).await?;
        self.store.kv_delete(&counter(&id, "failed")).await?;
        tracing::info!(batch = %id, status = ?outcome, completed = counts.completed, failed = counts.failed, "batch finished");
        Ok(())
    }

    /// Finishes what is due, forever: batches whose last answer was lost in a crash, cancelled
    /// ones whose running lines ended, expired ones, orphan queues.
    pub async fn run_sweeper(self: Arc<Self>, interval: Duration) {
        let mut ticks = tokio::time::interval(interval);
        loop {
            ticks.tick().await;
            if let Err(err) = self.sweep().await {
                tracing::warn!(error = %err, "batch sweep failed; retrying");
            }
        }
    }

    pub async fn sweep(&self) -> Result<(), StoreError> {
        let queues: Vec<QueueIndex> = self
            .store
            .record_list(QUEUES)
            .await?
            .iter()
            .filter_map(|bytes| serde_json::from_slice::<QueueIndex>(bytes).ok())
            .collect();
        let mut seen = BTreeSet::new();
        for queue in queues {
            if !seen.insert(queue.batch_id.clone()) {
                continue;
            }
            if self.load(&queue.batch_id).await?.is_none() {
                if unix_now().saturating_sub(queue.created_at) > ORPHAN_AFTER_SECS {
                    let name = queue_name(&queue.batch_id, &queue.model);
                    self.store.queue_drop_waiting(&name).await?;
                    self.store.record_delete(QUEUES, &queue.id()).await?;
                }
                continue;
            }
            self.try_finalize(&queue.batch_id).await?;
        }
        Ok(())
    }

    /// Wakes local rigs waiting for work when any replica queues lines.
    pub async fn watch_events(self: Arc<Self>) {
        let mut events = self.store.subscribe();
        loop {
            match events.recv().await {
                Ok(StoreEvent::BatchQueued { .. } | StoreEvent::Resync) => {
                    self.queued.notify_waiters()
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    self.queued.notify_waiters()
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}

/// One page of a newest-first listing: items after `after` (exclusive), at most `limit`.
fn page<T>(
    items: Vec<T>,
    id: impl Fn(&T) -> &String,
    after: Option<&str>,
    limit: usize,
) -> (Vec<T>, bool) {
    let start = match after {
        Some(after) => items
            .iter()
            .position(|item| id(item) == after)
            .map_or(items.len(), |i| i + 1),
        None => 0,
    };
    let rest = items.len().saturating_sub(start);
    let data: Vec<T> = items.into_iter().skip(start).take(limit).collect();
    (data, rest > limit)
}

/// `custom_id` of every request line, by line number (the file was validated).
fn custom_ids(input: &[u8]) -> BTreeMap<u64, String> {
    #[derive(Deserialize)]
    struct Id {
        custom_id: String,
    }
    input
        .split(|b| *b == b'\n')
        .enumerate()
        .filter_map(|(i, raw)| {
            let id: Id = serde_json::from_slice(raw).ok()?;
            Some((i as u64 + 1, id.custom_id))
        })
        .collect()
}

fn jsonl(lines: &[serde_json::Value]) -> Vec<u8> {
    let mut out = Vec::new();
    for line in lines {
        if serde_json::to_writer(&mut out, line).is_ok() {
            out.push(b'\n');
        }
    }
    out
}

/// The token counts in an answer's body, 0 where absent: chat, completions and embeddings
/// name them `prompt_tokens` and `completion_tokens`, the Responses API `input_tokens` and
/// `output_tokens`.
#[derive(Debug, Clone, Copy)]
struct Counts {
    input: u64,
    output: u64,
    cached: u64,
    reasoning: u64,
}

impl Counts {
    fn of(body: &serde_json::Value) -> Self {
        // The first of the two names present.
        let get = |pointers: [&str; 2]| {
            pointers
                .iter()
                .find_map(|pointer| body.pointer(pointer)?.as_u64())
                .unwrap_or(0)
        };
        Counts {
            input: get(["/usage/prompt_tokens", "/usage/input_tokens"]),
            output: get(["/usage/completion_tokens", "/usage/output_tokens"]),
            cached: get([
                "/usage/prompt_tokens_details/cached_tokens",
                "/usage/input_tokens_details/cached_tokens",
            ]),
            reasoning: get([
                "/usage/completion_tokens_details/reasoning_tokens",
                "/usage/output_tokens_details/reasoning_tokens",
            ]),
        }
    }
}

impl Counts {
    /// Writes the prompt and completion counts into the answer's `usage`, under the names it
    /// uses (OpenAI's or the Responses API's), with their total.
    fn write_into(self, body: &mut serde_json::Value) {
        let Some(usage) = body.get_mut("usage").and_then(|u| u.as_object_mut()) else {
            return;
        };
        let (input, output) = if usage.contains_key("input_tokens") {
            ("input_tokens", "output_tokens")
        } else {
            ("prompt_tokens", "completion_tokens")
        };
        usage.insert(input.into(), self.input.into());
        usage.insert(output.into(), self.output.into());
        usage.insert(
            "total_tokens".into(),
            self.input.saturating_add(self.output).into(),
        );
    }
}

fn add_usage(usage: &mut BatchUsage, body: &serde_json::Value) {
    let counts = Counts::of(body);
    let add = |total: &mut u64, count: u64| *total = total.saturating_add(count);
    add(&mut usage.input_tokens, counts.input);
    add(&mut usage.output_tokens, counts.output);
    add(&mut usage.input_tokens_details.cached_tokens, counts.cached);
    add(
        &mut usage.output_tokens_details.reasoning_tokens,
        counts.reasoning,
    );
    usage.total_tokens = usage.input_tokens.saturating_add(usage.output_tokens);
}

fn usage_event(
    batch_id: &str,
    model: &str,
    line: u64,
    key_id: &str,
    node: &NodeRecord,
    counts: Counts,
    latency_ms: u64,
) -> UsageEvent {
    let finished_at_ms = unix_now() * 1000;
    UsageEvent {
        // Stable per line: a line answered twice is still metered once.
        request_id: format!("{batch_id}:{line}"),
        key_id: key_id.to_owned(),
        model: model.to_owned(),
        prompt_tokens: counts.input,
        completion_tokens: counts.output,
        cached_tokens: counts.cached,
        latency_ms,
        ttft_ms: 0,
        backend: format!("rig:{}", node.id),
        rig: node.id.clone(),
        operator: node.operator.clone(),
        started_at_ms: finished_at_ms.saturating_sub(latency_ms),
        finished_at_ms,
        batch: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn models() -> BTreeSet<String> {
        ["m".to_owned()].into()
    }

    #[test]
    fn every_bad_line_is_reported_with_its_number() {
        let input = concat!(
            r#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"m","messages":[]}}"#,
            "\n",
            "not json\n",
            "\n",
            r#"{"method":"POST","url":"/v1/chat/completions","body":{"model":"m"}}"#,
            "\n",
            r#"{"custom_id":"a","body":{"model":"m"}}"#,
            "\n",
            r#"{"custom_id":"b","url":"/v1/embeddings","body":{"model":"m"}}"#,
            "\n",
            r#"{"custom_id":"c","body":{"model":"nope"}}"#,
            "\n",
            r#"{"custom_id":"d","method":"GET","body":{"model":"m"}}"#,
            "\n",
            r#"{"custom_id":"e"}"#,
            "\n",
            r#"{"custom_id":"f","body":{"messages":[]}}"#,
            "\n",
            r#"{"custom_id":"g","body":{"model":"m","stream":true}}"#,
            "\n",
        );
        let errors = match validate(
            input.as_bytes(),
            "/v1/chat/completions",
            &models(),
            100,
            100,
        ) {
            Err(errors) => errors,
            Ok(_) => panic!("the file has bad lines"),
        };
        let got: Vec<(Option<u64>, &str)> =
            errors.iter().map(|e| (e.line, e.code.as_str())).collect();
        assert_eq!(
            got,
            [
                (Some(2), "invalid_json_line"),
                (Some(4), "missing_required_parameter"),
                (Some(5), "duplicate_custom_id"),
                (Some(6), "url_mismatch"),
                (Some(7), "model_not_found"),
                (Some(8), "invalid_method"),
                (Some(9), "missing_required_parameter"),
                (Some(10), "missing_required_parameter"),
                (Some(11), "invalid_request"),
            ]
        );
    }

    /// A file of bad lines keeps its first errors and says how many more there were.
    #[test]
    fn a_flood_of_bad_lines_is_summarised() {
        let input = "not json\n".repeat(1000);
        let errors = match validate(input.as_bytes(), "/v1/completions", &models(), 100, 10) {
            Err(errors) => errors,
            Ok(_) => panic!("every line is bad"),
        };
        assert_eq!(errors.len(), 11);
        assert_eq!(errors[9].line, Some(10));
        assert_eq!(errors[10].code, "too_many_errors");
        assert!(
            errors[10].message.starts_with("990 more lines"),
            "{}",
            errors[10].message
        );
    }

    #[test]
    fn valid_lines_keep_their_numbers_and_bodies() {
        let input = "\n{\"custom_id\":\"x\",\"body\":{\"model\":\"m\",\"n\":1}}\n\n{\"custom_id\":\"y\",\"body\":{\"model\":\"m\"}}";
        let lines = match validate(input.as_bytes(), "/v1/completions", &models(), 100, 100) {
            Ok(lines) => lines,
            Err(errors) => panic!("valid file refused: {errors:?}"),
        };
        let got: Vec<u64> = lines.iter().map(|l| l.number).collect();
        assert_eq!(got, [2, 4]);
        assert_eq!(lines[0].body["n"], 1);
        assert_eq!(
            custom_ids(input.as_bytes()).into_iter().collect::<Vec<_>>(),
            [(2, "x".to_owned()), (4, "y".to_owned())]
        );
    }

    #[test]
    fn empty_and_oversized_files_fail_as_a_whole() {
        let empty = validate(b"\n\n", "/v1/completions", &models(), 10, 10).err();
        assert_eq!(
            empty.map(|e| e[0].code.clone()).as_deref(),
            Some("empty_file")
        );
        let two = "{\"custom_id\":\"x\",\"body\":{\"model\":\"m\"}}\n{\"custom_id\":\"y\",\"body\":{\"model\":\"m\"}}\n";
        let big = validate(two.as_bytes(), "/v1/completions", &models(), 1, 10).err();
        assert_eq!(
            big.map(|e| e[0].code.clone()).as_deref(),
            Some("too_many_tasks")
        );
    }

    #[test]
    fn usage_is_read_under_either_api_s_names() {
        let chat = serde_json::json!({"usage": {"prompt_tokens": 5, "completion_tokens": 2,
            "prompt_tokens_details": {"cached_tokens": 3},
            "completion_tokens_details": {"reasoning_tokens": 1}}});
        let responses = serde_json::json!({"object": "response", "usage": {"input_tokens": 7,
            "output_tokens": 4, "input_tokens_details": {"cached_tokens": 2},
            "output_tokens_details": {"reasoning_tokens": 3}, "total_tokens": 11}});
        let mut usage = BatchUsage::default();
        add_usage(&mut usage, &chat);
        add_usage(&mut usage, &responses);
        add_usage(&mut usage, &serde_json::json!({"data": []}));
        assert_eq!((usage.input_tokens, usage.output_tokens), (12, 6));
        assert_eq!(usage.input_tokens_details.cached_tokens, 5);
        assert_eq!(usage.output_tokens_details.reasoning_tokens, 4);
    }

    #[test]
    fn pages_follow_after_and_report_more() {
        let items: Vec<String> = ["a", "b", "c", "d"].map(String::from).into();
        assert_eq!(
            page(items.clone(), |s| s, None, 2),
            (vec!["a".into(), "b".into()], true)
        );
        assert_eq!(
            page(items.clone(), |s| s, Some("b"), 2),
            (vec!["c".into(), "d".into()], false)
        );
        assert_eq!(page(items.clone(), |s| s, Some("d"), 2), (vec![], false));
        assert_eq!(page(items, |s| s, Some("zz"), 2), (vec![], false));
    }
}
