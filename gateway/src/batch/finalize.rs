//! Ending a batch: output and error files in input order, its usage, its status.

use super::*;
use crate::backends::TrustStatus;

impl Batches {
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

    pub(super) async fn finalize(
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
pub(super) fn page<T>(
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
pub(super) fn custom_ids(input: &[u8]) -> BTreeMap<u64, String> {
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

pub(super) fn jsonl(lines: &[serde_json::Value]) -> Vec<u8> {
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
pub(super) struct Counts {
    pub(super) input: u64,
    pub(super) output: u64,
    pub(super) cached: u64,
    pub(super) reasoning: u64,
}

impl Counts {
    pub(super) fn of(body: &serde_json::Value) -> Self {
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
    pub(super) fn write_into(self, body: &mut serde_json::Value) {
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

pub(super) fn add_usage(usage: &mut BatchUsage, body: &serde_json::Value) {
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

pub(super) fn usage_event(
    batch_id: &str,
    model: &str,
    line: u64,
    key_id: &str,
    (node, trust): (&NodeRecord, TrustStatus),
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
        // Batch answers are billed within the bounds of the line (not counted yet).
        counted: Default::default(),
        trust: Some(trust),
        // Priced when metered (the meter's `charge` decides; batch quotes are shown in
        // `/v1/models`).
        price: None,
    }
}
