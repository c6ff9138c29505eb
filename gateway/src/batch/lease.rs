//! Rigs' side: leasing lines to rigs that serve their model, taking their answers, billing
//! them, and checking their receipts (see [`crate::nodes::receipts`]).

use garage_node_protocol::receipt::{AnswerHasher, batch_request_id, canonical_json};

use super::*;
use crate::backends::TrustStatus;
use crate::ledger::billing::Usage as TokenUsage;
use crate::nodes::receipts::{Answer, Served};

impl Batches {
    /// Lines in every batch's work queue, by queue (`/metrics` sums them by model).
    pub async fn backlog(&self) -> Result<Vec<crate::metrics::BatchBacklogSample>, StoreError> {
        let mut backlog = Vec::new();
        for bytes in self.store.record_list(QUEUES).await? {
            let Ok(queue) = serde_json::from_slice::<QueueIndex>(&bytes) else {
                continue;
            };
            let counts = (self.store)
                .queue_counts(&queue_name(&queue.batch_id, &queue.model))
                .await?;
            backlog.push(crate::metrics::BatchBacklogSample {
                model: queue.model,
                waiting: counts.waiting,
                leased: counts.leased,
            });
        }
        Ok(backlog)
    }

    /// Leases lines of the given models to a rig, waiting up to `wait` for some to appear.
    pub async fn lease(
        &self,
        node: &NodeRecord,
        models: &[String],
        max: u32,
        wait: Duration,
        accounts: &crate::accounts::Accounts,
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
            let items = self
                .lease_now(&node.id, &models, max, lease, accounts)
                .await?;
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

    pub(super) async fn lease_now(
        &self,
        node_id: &str,
        models: &[String],
        max: usize,
        lease: Duration,
        accounts: &crate::accounts::Accounts,
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
        // Whether the rig may take a batch's lines: it is running, the rig is verified if the
        // batch's key takes verified rigs only, and the key's account (if any) may spend.
        let verified = self.nodes.trust_of(node_id) == TrustStatus::Verified;
        let mut takes: HashMap<String, bool> = HashMap::new();
        for queue in queues {
            if items.len() >= max {
                break;
            }
            let may_take = match takes.get(&queue.batch_id) {
                Some(may_take) => *may_take,
                None => {
                    let may_take = match self.load(&queue.batch_id).await? {
                        Some(b) => {
                            b.batch.status == BatchStatus::InProgress
                                && (verified || !b.verified_only)
                                && accounts.batch_may_run(&b.owner).await?
                        }
                        None => false,
                    };
                    takes.insert(queue.batch_id.clone(), may_take);
                    may_take
                }
            };
            if !may_take {
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
        // Whether the rig says it signs batch lines (an older node-runner does not).
        let receipt_expected = self.nodes.signs_batch_lines(&node.id).await?;
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
            // What the rig's receipt covers: the body as the rig sent it, before billing
            // writes a corrected count into it.
            let (answer, reported) = answer_of(&mut result);
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
                let mut finished_at_ms = unix_now() * 1000;
                if let Some(billed) = billed {
                    let event = usage_event(
                        &result.batch_id,
                        &result.model,
                        result.line,
                        &stored.owner,
                        (node, self.nodes.trust_of(&node.id)),
                        billed,
                        result.latency_ms,
                    );
                    finished_at_ms = event.finished_at_ms;
                    self.usage.record(event);
                }
                // Its receipt checked and its statement entry kept, off this request's path,
                // as a tunnel answer's are.
                self.nodes.note_served(Served {
                    node: node.id.clone(),
                    request_id: batch_request_id(&result.batch_id, result.line),
                    model: result.model.clone(),
                    finished_at_ms,
                    billed: billed.map_or_else(TokenUsage::default, |billed| TokenUsage {
                        prompt_tokens: billed.input,
                        completion_tokens: billed.output,
                    }),
                    reported,
                    answer: Some(answer),
                    receipt_expected,
                });
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
    pub(super) fn bill_line(
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
}

/// What a rig's receipt of a batch line is checked against: the answer as the rig sent it (its
/// status, and the length and SHA-256 of its body's canonical JSON; the receipt taken out of
/// the result), and the usage the body reported.
fn answer_of(result: &mut BatchLineResult) -> (Answer, Option<TokenUsage>) {
    let mut hasher = AnswerHasher::default();
    hasher.update(&canonical_json(&result.body));
    let (sha256, bytes) = hasher.finish();
    let reported = result
        .body
        .get("usage")
        .and_then(|usage| TokenUsage::deserialize(usage).ok());
    let answer = Answer {
        status: result.status_code,
        bytes,
        sha256,
        receipt: result.receipt.take(),
    };
    (answer, reported)
}
