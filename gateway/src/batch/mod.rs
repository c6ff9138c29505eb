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
mod create;
mod files;
mod finalize;
mod lease;
mod types;
mod validate;

pub use files::UploadQuota;
use finalize::*;
pub use types::*;
use validate::*;

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
use crate::store::{ApiKeyRecord, QueueItem, Store, StoreError, StoreEvent, read_counter};

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
