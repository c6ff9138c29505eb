//! The wire shapes of OpenAI's Files and Batches API, as the gateway serves them.
//!
//! Only what the command line reads is modelled; unknown fields are ignored, so a newer gateway
//! (or OpenAI itself) adding fields breaks nothing.

use std::fmt;

use serde::Deserialize;

/// A File object: the answer to an upload.
#[derive(Debug, Clone, Deserialize)]
pub struct FileObject {
    pub id: String,
    #[serde(default)]
    pub bytes: Option<u64>,
    #[serde(default)]
    pub filename: Option<String>,
}

/// A Batch object.
#[derive(Debug, Clone, Deserialize)]
pub struct Batch {
    pub id: String,
    pub endpoint: String,
    #[serde(default)]
    pub errors: Option<BatchErrors>,
    pub input_file_id: String,
    pub completion_window: String,
    pub status: BatchStatus,
    #[serde(default)]
    pub output_file_id: Option<String>,
    #[serde(default)]
    pub error_file_id: Option<String>,
    pub created_at: i64,
    #[serde(default)]
    pub in_progress_at: Option<i64>,
    #[serde(default)]
    pub expires_at: Option<i64>,
    #[serde(default)]
    pub finalizing_at: Option<i64>,
    #[serde(default)]
    pub completed_at: Option<i64>,
    #[serde(default)]
    pub failed_at: Option<i64>,
    #[serde(default)]
    pub expired_at: Option<i64>,
    #[serde(default)]
    pub cancelling_at: Option<i64>,
    #[serde(default)]
    pub cancelled_at: Option<i64>,
    /// Absent or null before validation has counted the requests.
    #[serde(default)]
    pub request_counts: Option<RequestCounts>,
    #[serde(default)]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    /// OpenAI's newer Batch objects name the model; older ones (and gateways that do not) leave
    /// it out, and the listing shows `-` then.
    #[serde(default)]
    pub model: Option<String>,
}

impl Batch {
    pub fn counts(&self) -> RequestCounts {
        self.request_counts.unwrap_or_default()
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct RequestCounts {
    #[serde(default)]
    pub total: u64,
    #[serde(default)]
    pub completed: u64,
    #[serde(default)]
    pub failed: u64,
}

impl RequestCounts {
    /// Requests that have an outcome, good or bad.
    pub fn done(&self) -> u64 {
        self.completed + self.failed
    }
}

/// Why a batch failed validation: `{object: "list", data: [...]}`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct BatchErrors {
    #[serde(default)]
    pub data: Vec<BatchError>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct BatchError {
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub param: Option<String>,
    /// 1-based line of the input file at fault.
    #[serde(default)]
    pub line: Option<u64>,
}

/// A page of `GET /v1/batches`.
#[derive(Debug, Clone, Deserialize)]
pub struct BatchList {
    pub data: Vec<Batch>,
    #[serde(default)]
    pub last_id: Option<String>,
    #[serde(default)]
    pub has_more: bool,
}

/// OpenAI's error envelope: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ErrorDetail {
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub param: Option<String>,
    /// A string in OpenAI's API; some servers send a number.
    #[serde(default)]
    pub code: Option<serde_json::Value>,
}

/// A batch's lifecycle state. A status this version does not know is kept by name, so a newer
/// gateway still displays correctly.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "String")]
pub enum BatchStatus {
    Validating,
    Failed,
    InProgress,
    Finalizing,
    Completed,
    Expired,
    Cancelling,
    Cancelled,
    Other(String),
}

impl BatchStatus {
    /// No further change will happen.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            BatchStatus::Completed
                | BatchStatus::Failed
                | BatchStatus::Expired
                | BatchStatus::Cancelled
        )
    }

    /// Ended without running to completion.
    pub fn is_unsuccessful(&self) -> bool {
        matches!(
            self,
            BatchStatus::Failed | BatchStatus::Expired | BatchStatus::Cancelled
        )
    }

    pub fn as_str(&self) -> &str {
        match self {
            BatchStatus::Validating => "validating",
            BatchStatus::Failed => "failed",
            BatchStatus::InProgress => "in_progress",
            BatchStatus::Finalizing => "finalizing",
            BatchStatus::Completed => "completed",
            BatchStatus::Expired => "expired",
            BatchStatus::Cancelling => "cancelling",
            BatchStatus::Cancelled => "cancelled",
            BatchStatus::Other(name) => name,
        }
    }
}

impl From<String> for BatchStatus {
    fn from(name: String) -> Self {
        match name.as_str() {
            "validating" => BatchStatus::Validating,
            "failed" => BatchStatus::Failed,
            "in_progress" => BatchStatus::InProgress,
            "finalizing" => BatchStatus::Finalizing,
            "completed" => BatchStatus::Completed,
            "expired" => BatchStatus::Expired,
            "cancelling" => BatchStatus::Cancelling,
            "cancelled" => BatchStatus::Cancelled,
            _ => BatchStatus::Other(name),
        }
    }
}

impl fmt::Display for BatchStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_openai_batch_parses_and_unknown_fields_are_ignored() {
        let batch: Batch = serde_json::from_value(serde_json::json!({
            "id": "batch_abc123",
            "object": "batch",
            "endpoint": "/v1/chat/completions",
            "errors": null,
            "input_file_id": "file-abc123",
            "completion_window": "24h",
            "status": "completed",
            "output_file_id": "file-cvaTdG",
            "error_file_id": "file-HOWS94",
            "created_at": 1711471533,
            "in_progress_at": 1711471538,
            "expires_at": 1711557933,
            "finalizing_at": 1711493133,
            "completed_at": 1711493163,
            "failed_at": null,
            "expired_at": null,
            "cancelling_at": null,
            "cancelled_at": null,
            "request_counts": {"total": 100, "completed": 95, "failed": 5},
            "metadata": {"customer_id": "user_123456789"},
            "usage": {"input_tokens": 10},
            "some_future_field": [1, 2, 3]
        }))
        .expect("a Batch object");
        assert_eq!(batch.status, BatchStatus::Completed);
        assert_eq!(batch.counts().done(), 100);
        assert_eq!(batch.model, None);
        assert_eq!(batch.failed_at, None);
    }

    #[test]
    fn validation_errors_parse() {
        let batch: Batch = serde_json::from_value(serde_json::json!({
            "id": "batch_1", "endpoint": "/v1/chat/completions", "input_file_id": "file-1",
            "completion_window": "24h", "status": "failed", "created_at": 1,
            "request_counts": null,
            "errors": {"object": "list", "data": [
                {"code": "missing_custom_id", "message": "no custom_id", "param": null, "line": 3}
            ]}
        }))
        .expect("a failed Batch object");
        assert_eq!(batch.counts(), RequestCounts::default());
        let errors = batch.errors.expect("errors").data;
        assert_eq!(errors[0].line, Some(3));
        assert_eq!(errors[0].code.as_deref(), Some("missing_custom_id"));
    }

    #[test]
    fn an_unknown_status_keeps_its_name() {
        let status: BatchStatus = serde_json::from_str("\"paused\"").expect("a status");
        assert_eq!(status.to_string(), "paused");
        assert!(!status.is_terminal());
        let status: BatchStatus = serde_json::from_str("\"in_progress\"").expect("a status");
        assert_eq!(status, BatchStatus::InProgress);
    }
}
