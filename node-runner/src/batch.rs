//! Batch work: the rig pulls lines of Batch API jobs from the gateway while it has spare
//! capacity, runs them on its engines and sends back what they answered.
//!
//! Interactive traffic comes first. The rig asks for batch lines only while
//! - fewer than `max_concurrency` of its batch lines are running (keep it well under the
//!   engine's `max_num_seqs`, so an interactive request always finds a free sequence), and
//! - no engine has more than `max_waiting` requests queued (from the engines' `/metrics`,
//!   scraped every second): a queue means the engine is full, and batch work would only make
//!   interactive requests wait longer.
//!
//! A line whose engine fails to answer (the engine died) is retried a few times, then left: its
//! lease runs out at the gateway and another rig takes it. Results are sent in small batches and
//! retried until the gateway takes them; the gateway keeps the first answer of each line.
//!
//! Each result carries the rig's signed receipt of it (see [`crate::receipts`]), as a tunnel
//! answer does in its trailer.
//!
//! Work is asked of the replica that holds the rig's tunnel; a poll waiting on a replica the
//! tunnel has left is given up at once. Results go to any replica that can be reached.

use std::sync::Arc;
use std::time::{Duration, Instant};

use garage_node_protocol::{
    BATCH_LEASE_PATH, BATCH_RESULTS_PATH, BatchLease, BatchLeaseRequest, BatchLineResult,
    BatchResults, BatchWorkItem,
};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::engines::EngineSet;
use crate::gateways::Gateways;
use crate::receipts::Signer;

/// How the rig takes batch work.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchOptions {
    /// Pull batch work at all.
    pub enabled: bool,
    /// Most batch lines running at once on this rig.
    pub max_concurrency: usize,
    /// Take batch work only while no engine has more requests than this waiting.
    pub max_waiting: u32,
    /// How long one request for work may wait at the gateway (a long poll).
    pub poll_wait: Duration,
}

impl Default for BatchOptions {
    fn default() -> Self {
        BatchOptions {
            enabled: true,
            max_concurrency: 4,
            max_waiting: 0,
            poll_wait: Duration::from_secs(20),
        }
    }
}

/// What the batch worker needs from the agent.
pub(crate) struct Context {
    pub gateways: Arc<Gateways>,
    pub credential: String,
    pub http: reqwest::Client,
    pub local: reqwest::Client,
    pub engines: Arc<EngineSet>,
    /// Cancelled when the gateway refuses the credential.
    pub revoked: CancellationToken,
    /// Signs each line's result, as the tunnel's answers are; `None`: the rig signs nothing.
    pub signer: Option<Arc<Signer>>,
}

/// Results sent per request to the gateway.
const RESULTS_PER_POST: usize = 64;
/// Tries of one line on the local engine before leaving it to another rig.
const LINE_ATTEMPTS: u32 = 3;

/// Pulls and runs batch lines until `stop`; then lets running lines finish (within `drain`)
/// and sends their results.
pub(crate) async fn run(
    context: Arc<Context>,
    options: BatchOptions,
    stop: CancellationToken,
    drain: Duration,
) {
    let slots = Arc::new(Semaphore::new(options.max_concurrency.max(1)));
    let (results, results_rx) = mpsc::unbounded_channel();
    let reporter = tokio::spawn(report(Arc::clone(&context), results_rx));
    let mut tunnel_moves = context.gateways.watch_tunnel();
    let mut backoff = Duration::from_millis(200);
    loop {
        // A free slot first: nothing is leased that could not start at once.
        let first = tokio::select! {
            _ = stop.cancelled() => break,
            _ = context.revoked.cancelled() => break,
            permit = Arc::clone(&slots).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let models = context.engines.healthy_models();
        if models.is_empty() || context.engines.busy(options.max_waiting) {
            drop(first);
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_millis(250)) => continue,
            }
        }
        let mut permits = vec![first];
        while let Ok(permit) = Arc::clone(&slots).try_acquire_owned() {
            permits.push(permit);
        }
        let request = BatchLeaseRequest {
            models,
            max: permits.len() as u32,
            wait_ms: options.poll_wait.as_millis() as u64,
        };
        tunnel_moves.mark_unchanged();
        let gateway = context.gateways.tunnel_url();
        let sent = context
            .http
            .post(format!("{gateway}{BATCH_LEASE_PATH}"))
            .bearer_auth(&context.credential)
            .timeout(options.poll_wait + Duration::from_secs(10))
            .json(&request)
            .send();
        let response = tokio::select! {
            _ = stop.cancelled() => break,
            response = sent => response,
            // The tunnel left that replica (most likely it died): ask the new one. Lines it
            // leased meanwhile go to another rig when their lease runs out.
            moved = tunnel_moves.changed() => {
                if moved.is_err() {
                    break;
                }
                continue;
            }
        };
        let lease: BatchLease = match response {
            Ok(r) if r.status().is_success() => match r.json().await {
                Ok(lease) => lease,
                Err(err) => {
                    tracing::warn!(error = %err, "unreadable batch lease");
                    pause(&stop, &mut backoff).await;
                    continue;
                }
            },
            Ok(r) if matches!(r.status().as_u16(), 401 | 403) => {
                tracing::error!("the gateway refused this rig's credential: no more batch work");
                break;
            }
            Ok(r) => {
                tracing::warn!(
                    status = r.status().as_u16(),
                    "batch lease refused; retrying"
                );
                pause(&stop, &mut backoff).await;
                continue;
            }
            Err(err) => {
                tracing::debug!(error = %err, "cannot reach the gateway for batch work; retrying");
                pause(&stop, &mut backoff).await;
                continue;
            }
        };
        backoff = Duration::from_millis(200);
        if !lease.items.is_empty() {
            tracing::debug!(lines = lease.items.len(), "leased batch lines");
        }
        for (item, permit) in lease.items.into_iter().zip(permits) {
            let context = Arc::clone(&context);
            let results = results.clone();
            tokio::spawn(async move {
                if let Some(result) = run_line(&context, item).await {
                    let _ = results.send(result);
                }
                drop(permit);
            });
        }
    }
    // Let running lines finish, then flush their results.
    let all = options.max_concurrency.max(1) as u32;
    if tokio::time::timeout(drain, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(
            "batch lines still running after the drain timeout; their leases will run out"
        );
    }
    drop(results);
    let _ = tokio::time::timeout(Duration::from_secs(10), reporter).await;
}

async fn pause(stop: &CancellationToken, backoff: &mut Duration) {
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = tokio::time::sleep(*backoff) => {}
    }
    *backoff = (*backoff * 2).min(Duration::from_secs(10));
}

/// Runs one line on a local engine serving its model; `None` when no engine could answer.
async fn run_line(context: &Context, item: BatchWorkItem) -> Option<BatchLineResult> {
    let started = Instant::now();
    for attempt in 1..=LINE_ATTEMPTS {
        let Some(base) = context.engines.base_url_for(&item.model) else {
            tokio::time::sleep(Duration::from_secs(u64::from(attempt))).await;
            continue;
        };
        let response = context
            .local
            .post(format!("{base}{}", item.url))
            .json(&item.body)
            .send()
            .await;
        let response = match response {
            Ok(response) => response,
            Err(err) => {
                tracing::warn!(batch = %item.batch_id, line = item.line, error = %err, "engine did not answer a batch line; retrying");
                tokio::time::sleep(Duration::from_secs(u64::from(attempt))).await;
                continue;
            }
        };
        let status = response.status().as_u16();
        let body = match response.bytes().await {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                let body = garage_node_protocol::ErrorBody::new(
                    String::from_utf8_lossy(&bytes),
                    "server_error",
                    None,
                );
                serde_json::to_value(body).unwrap_or_default()
            }),
            Err(err) => {
                tracing::warn!(batch = %item.batch_id, line = item.line, error = %err, "engine broke off a batch answer; retrying");
                continue;
            }
        };
        let mut result = BatchLineResult {
            batch_id: item.batch_id,
            model: item.model,
            line: item.line,
            status_code: status,
            body,
            latency_ms: started.elapsed().as_millis() as u64,
            receipt: None,
        };
        if let Some(signer) = &context.signer {
            result.receipt = signer.batch_receipt(&result);
        }
        return Some(result);
    }
    tracing::warn!(batch = %item.batch_id, line = item.line, "no engine answered a batch line; leaving it to another rig");
    None
}

/// Sends results to the gateway in small batches, retrying each until the gateway takes it.
async fn report(context: Arc<Context>, mut results: mpsc::UnboundedReceiver<BatchLineResult>) {
    while let Some(first) = results.recv().await {
        let mut chunk = vec![first];
        while chunk.len() < RESULTS_PER_POST {
            match results.try_recv() {
                Ok(result) => chunk.push(result),
                Err(_) => break,
            }
        }
        let body = BatchResults { results: chunk };
        let mut backoff = Duration::from_millis(100);
        loop {
            let response = context
                .gateways
                .send(|gateway| {
                    context
                        .http
                        .post(format!("{gateway}{BATCH_RESULTS_PATH}"))
                        .bearer_auth(&context.credential)
                        .timeout(Duration::from_secs(30))
                        .json(&body)
                })
                .await
                .map(|(_, response)| response);
            match response {
                Ok(r) if r.status().is_success() => break,
                Ok(r) if matches!(r.status().as_u16(), 400 | 401 | 403) => {
                    tracing::error!(
                        status = r.status().as_u16(),
                        "the gateway refused batch results; dropping them"
                    );
                    break;
                }
                Ok(r) => tracing::warn!(
                    status = r.status().as_u16(),
                    "batch results refused; retrying"
                ),
                Err(err) => tracing::warn!(error = %err, "cannot send batch results; retrying"),
            }
            if context.revoked.is_cancelled() {
                break;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }
}
