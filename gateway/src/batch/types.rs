//! The Batch API's objects, as OpenAI defines them, and the records it keeps.

use super::*;

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
pub(super) struct StoredFile {
    #[serde(flatten)]
    pub(super) file: FileObject,
    /// Key id of the owner.
    pub(super) owner: String,
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
pub(super) struct StoredBatch {
    #[serde(flatten)]
    pub(super) batch: BatchObject,
    pub(super) owner: String,
    /// Models of its lines: one queue each.
    pub(super) models: Vec<String>,
    /// Its key takes verified rigs only: its lines are leased to verified rigs only.
    #[serde(default)]
    pub(super) verified_only: bool,
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

/// A batch and the key that owns it (`GET /admin/batches`).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OwnedBatch {
    /// Id of the API key that created it.
    pub owner: String,
    #[serde(flatten)]
    pub batch: BatchObject,
}

/// `GET /admin/batches` answer.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AllBatches {
    /// Always `list`.
    pub object: String,
    pub data: Vec<OwnedBatch>,
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
pub(super) struct QueueIndex {
    pub(super) batch_id: String,
    pub(super) model: String,
    /// Unix seconds; older batches are served first.
    pub(super) created_at: u64,
}

impl QueueIndex {
    pub(super) fn id(&self) -> String {
        queue_index_id(&self.batch_id, &self.model)
    }
}

pub(super) fn queue_index_id(batch_id: &str, model: &str) -> String {
    format!("{batch_id}|{model}")
}

/// What a queued line carries to the rig.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct QueuedLine {
    pub(super) url: String,
    pub(super) body: serde_json::Value,
}

/// Who holds a leased line, and what its request allows its usage to be: the value of the
/// line's holder key.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Held {
    pub(super) node: String,
    pub(super) bounds: LineBounds,
}

impl Held {
    pub(super) fn read(bytes: &[u8]) -> Option<Held> {
        serde_json::from_slice(bytes).ok()
    }
}

/// A batch line's request, as far as billing its answer goes (see [`crate::ledger::billing`]).
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct LineBounds {
    pub(super) request_bytes: u64,
    pub(super) max_tokens: Option<u32>,
    pub(super) choices: u32,
    pub(super) media_parts: u64,
}

impl LineBounds {
    pub(super) fn of(body: &serde_json::Value) -> Self {
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
pub(super) struct StoredResult {
    pub(super) line: u64,
    pub(super) status_code: u16,
    pub(super) body: serde_json::Value,
    pub(super) node_id: String,
}

/// A validated input line.
pub(super) struct Line {
    pub(super) number: u64,
    pub(super) model: String,
    pub(super) body: serde_json::Value,
}
