//! Deliveries: each event, for each endpoint that takes it, is an item of the store's webhook
//! queue and a record of what became of it.
//!
//! - **Every replica sends, one per attempt.** A replica leases an item for one attempt (the
//!   lease outlasts the attempt's timeout), so no other replica sends it meanwhile; a replica
//!   that dies mid-attempt loses the lease and another tries again.
//! - **Retries wait in the queue.** A failed attempt keeps its item leased until the next is
//!   due (the lease set again to the backoff, [`Store::queue_extend`]): a restart or another
//!   replica picks it up then. Network errors, timeouts and every non-2xx answer are retried,
//!   4xx included: a receiver that refuses (a secret being rotated, a bad deploy) is usually
//!   fixed within the hours the schedule spans, and a redirect is not followed (it fails).
//! - **The same `webhook-id` every time**: the event's id, which receivers dedupe on.
//! - **Bounded**: an attempt has a timeout from connect to the answer's body, and at most
//!   [`MAX_RESPONSE_BYTES`] of the answer is read.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::event::{Event, EventKind};
use super::{EndpointRecord, HttpClient, Webhooks};
use crate::store::keyspace::{WEBHOOK_QUEUE, webhook_deliveries};
use crate::store::{QueueItem, StoreError};

/// Most of a receiver's answer read (the rest is not): enough for an error message.
pub const MAX_RESPONSE_BYTES: usize = 4096;
/// Characters of a failed answer's body kept in the deliveries list.
const ERROR_SNIPPET_CHARS: usize = 200;
/// Deliveries kept per endpoint for `GET /admin/webhooks/{id}/deliveries` (finished ones go
/// first past it).
pub const DELIVERIES_KEPT: usize = 1000;
/// Attempts one replica makes at once.
const CONCURRENCY: usize = 16;
/// How much longer than an attempt's timeout its lease lasts: the store round trips around
/// it, and a busy replica's scheduling.
const LEASE_MARGIN: Duration = Duration::from_secs(30);

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// Waiting for its first or next attempt.
    Pending,
    /// An attempt got a 2xx.
    Delivered,
    /// Every attempt failed.
    Failed,
}

/// One event's delivery to one endpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Delivery {
    /// The event's id: the `webhook-id` header of every attempt.
    pub event_id: String,
    /// The event's kind (`usage.recorded`…).
    #[serde(rename = "type")]
    #[schema(value_type = String)]
    pub kind: EventKind,
    pub state: DeliveryState,
    /// Attempts made so far.
    pub attempts: u32,
    /// The last attempt's HTTP status, if it got an answer.
    pub last_status: Option<u16>,
    /// Why the last attempt failed (a network error, a timeout, the start of a non-2xx body).
    pub last_error: Option<String>,
    /// Unix milliseconds.
    pub created_at_ms: u64,
    pub last_attempt_at_ms: Option<u64>,
    /// When the next attempt is due (pending only), Unix milliseconds.
    pub next_attempt_at_ms: Option<u64>,
}

/// A queue item: everything an attempt needs, whichever replica makes it.
#[derive(Debug, Serialize, Deserialize)]
struct Queued {
    endpoint: String,
    event_id: String,
    kind: EventKind,
    /// The CloudEvent, as sent on every attempt.
    body: String,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn item_id(endpoint: &str, event_id: &str) -> String {
    format!("{endpoint}:{event_id}")
}

/// The client deliveries go out with: plain HTTP and HTTPS (public web roots), HTTP/1.1,
/// connections kept for the next delivery, and hyper's default of following no redirect.
pub(super) fn client(
    config: &super::WebhooksConfig,
) -> Result<HttpClient, crate::upstream::CaFileError> {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    http.set_connect_timeout(Some(config.timeout()));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(garage_tls::client_config(None)?)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(4)
            .build(connector),
    )
}

/// What one attempt came to.
enum Attempt {
    Delivered(u16),
    Refused { status: u16, snippet: String },
    Failed(String),
}

impl Webhooks {
    /// Queues `events` for `endpoint`: one delivery record per event id (the first write
    /// wins), and a queue item for each new one. Returns how many were queued.
    pub(super) async fn enqueue(
        &self,
        endpoint: &EndpointRecord,
        events: &[&Event],
    ) -> Result<usize, StoreError> {
        let kind = webhook_deliveries(&endpoint.id);
        self.store.bound_records(&kind, DELIVERIES_KEPT);
        let created_at_ms = now_ms();
        let records: Vec<Vec<u8>> = events
            .iter()
            .map(|event| {
                serde_json::to_vec(&Delivery {
                    event_id: event.id.clone(),
                    kind: event.kind,
                    state: DeliveryState::Pending,
                    attempts: 0,
                    last_status: None,
                    last_error: None,
                    created_at_ms,
                    last_attempt_at_ms: None,
                    next_attempt_at_ms: Some(created_at_ms),
                })
            })
            .collect::<Result<_, _>>()?;
        let pairs: Vec<(&str, &[u8])> = events
            .iter()
            .zip(&records)
            .map(|(event, record)| (event.id.as_str(), record.as_slice()))
            .collect();
        let inserted = self.store.record_put_new_many(&kind, &pairs).await?;
        let mut items = Vec::new();
        for (event, inserted) in events.iter().zip(inserted) {
            // Already there: delivered, failed or on its way, unless its queue item was never
            // written (a crash in between): then it has no attempt yet, and is queued again
            // (a second push of a queued item changes nothing).
            if !inserted
                && !self
                    .delivery(&endpoint.id, &event.id)
                    .await?
                    .is_some_and(|d| d.state == DeliveryState::Pending && d.attempts == 0)
            {
                continue;
            }
            let queued = Queued {
                endpoint: endpoint.id.clone(),
                event_id: event.id.clone(),
                kind: event.kind,
                body: serde_json::to_string(&event.to_cloudevent())?,
            };
            items.push(QueueItem {
                id: item_id(&endpoint.id, &event.id),
                payload: serde_json::to_vec(&queued)?,
            });
        }
        if !items.is_empty() {
            self.store.queue_push(WEBHOOK_QUEUE, &items).await?;
        }
        Ok(items.len())
    }

    /// One delivery's record.
    pub async fn delivery(
        &self,
        endpoint_id: &str,
        event_id: &str,
    ) -> Result<Option<Delivery>, StoreError> {
        match self
            .store
            .record_get(&webhook_deliveries(endpoint_id), event_id)
            .await?
        {
            Some(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
            None => Ok(None),
        }
    }

    /// An endpoint's recent deliveries, newest first.
    pub async fn deliveries(
        &self,
        endpoint_id: &str,
        limit: usize,
    ) -> Result<Vec<Delivery>, StoreError> {
        let mut deliveries: Vec<Delivery> = self
            .store
            .record_list(&webhook_deliveries(endpoint_id))
            .await?
            .iter()
            .filter_map(|bytes| serde_json::from_slice(bytes).ok())
            .collect();
        deliveries
            .sort_by(|a, b| (b.created_at_ms, &b.event_id).cmp(&(a.created_at_ms, &a.event_id)));
        deliveries.truncate(limit);
        Ok(deliveries)
    }

    /// Leases due deliveries and attempts them, [`CONCURRENCY`] at a time, for good.
    pub(super) async fn run_deliveries(self: Arc<Self>) {
        let lease = self.config.timeout() + LEASE_MARGIN;
        let mut running = tokio::task::JoinSet::new();
        loop {
            while running.try_join_next().is_some() {}
            let free = CONCURRENCY - running.len();
            let mut leased = 0;
            if free > 0 {
                match self.store.queue_lease(WEBHOOK_QUEUE, free, lease).await {
                    Ok(items) => {
                        leased = items.len();
                        for item in items {
                            running.spawn(Arc::clone(&self).attempt(item));
                        }
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "webhook queue unavailable; retrying");
                    }
                }
            }
            // Every free slot filled: more may be waiting.
            if free > 0 && leased == free {
                continue;
            }
            tokio::select! {
                Some(_) = running.join_next(), if !running.is_empty() => {}
                () = self.wake.notified() => {}
                () = tokio::time::sleep(self.config.poll_interval()) => {}
            }
        }
    }

    /// One attempt of one delivery, and what follows from it: delivered, retried later, or
    /// failed for good.
    async fn attempt(self: Arc<Self>, item: QueueItem) {
        if let Err(err) = self.try_attempt(&item).await {
            // The item stays leased; when the lease runs out it is tried again.
            tracing::warn!(item = %item.id, error = %err, "webhook delivery: store unavailable");
        }
    }

    async fn try_attempt(&self, item: &QueueItem) -> Result<(), StoreError> {
        let queued: Queued = match serde_json::from_slice(&item.payload) {
            Ok(queued) => queued,
            Err(err) => {
                tracing::error!(item = %item.id, error = %err, "unreadable webhook delivery dropped");
                self.store.queue_ack(WEBHOOK_QUEUE, &item.id).await?;
                return Ok(());
            }
        };
        let Some(endpoint) = self.endpoint(&queued.endpoint).await? else {
            // Deleted since.
            self.store.queue_ack(WEBHOOK_QUEUE, &item.id).await?;
            return Ok(());
        };
        let now = now_ms();
        let mut delivery = match self.delivery(&endpoint.id, &queued.event_id).await? {
            Some(delivery) => delivery,
            // Pushed out of the list by newer ones: kept going all the same.
            None => Delivery {
                event_id: queued.event_id.clone(),
                kind: queued.kind,
                state: DeliveryState::Pending,
                attempts: 0,
                last_status: None,
                last_error: None,
                created_at_ms: now,
                last_attempt_at_ms: None,
                next_attempt_at_ms: None,
            },
        };
        if delivery.state != DeliveryState::Pending {
            self.store.queue_ack(WEBHOOK_QUEUE, &item.id).await?;
            return Ok(());
        }
        let outcome = self.send(&endpoint, &queued).await;
        let finished = now_ms();
        delivery.attempts += 1;
        delivery.last_attempt_at_ms = Some(finished);
        delivery.next_attempt_at_ms = None;
        let (status, error) = match &outcome {
            Attempt::Delivered(status) => (Some(*status), None),
            Attempt::Refused { status, snippet } => (
                Some(*status),
                Some(if snippet.is_empty() {
                    format!("HTTP {status}")
                } else {
                    format!("HTTP {status}: {snippet}")
                }),
            ),
            Attempt::Failed(error) => (None, Some(error.clone())),
        };
        delivery.last_status = status;
        delivery.last_error = error;
        let retry_in = match outcome {
            Attempt::Delivered(_) => {
                delivery.state = DeliveryState::Delivered;
                None
            }
            _ if delivery.attempts >= self.config.max_attempts => {
                delivery.state = DeliveryState::Failed;
                None
            }
            _ => {
                let wait = self
                    .config
                    .backoff(delivery.attempts, rand::random::<f64>());
                delivery.next_attempt_at_ms = Some(finished + wait.as_millis() as u64);
                Some(wait)
            }
        };
        let kind = webhook_deliveries(&endpoint.id);
        self.store
            .record_put(&kind, &delivery.event_id, &serde_json::to_vec(&delivery)?)
            .await?;
        match retry_in {
            Some(wait) => {
                self.outcomes.with_label_values(&["retried"]).inc();
                tracing::debug!(endpoint = %endpoint.id, event_id = %delivery.event_id, attempts = delivery.attempts, error = ?delivery.last_error, "webhook attempt failed; retrying");
                // Out of sight until the next attempt is due, on whichever replica.
                self.store
                    .queue_extend(WEBHOOK_QUEUE, &item.id, wait)
                    .await?;
            }
            None => {
                if delivery.state == DeliveryState::Delivered {
                    self.outcomes.with_label_values(&["delivered"]).inc();
                } else {
                    self.outcomes.with_label_values(&["failed"]).inc();
                    tracing::warn!(
                        endpoint = %endpoint.id,
                        url = %endpoint.url,
                        event_id = %delivery.event_id,
                        kind = %delivery.kind,
                        attempts = delivery.attempts,
                        error = ?delivery.last_error,
                        "webhook delivery failed; giving up"
                    );
                }
                self.store.queue_ack(WEBHOOK_QUEUE, &item.id).await?;
                self.prune(&kind).await?;
            }
        }
        Ok(())
    }

    /// Keeps an endpoint's list of deliveries near [`DELIVERIES_KEPT`]: past a tenth more, the
    /// oldest finished ones go (the embedded store bounds the kind by itself).
    async fn prune(&self, kind: &str) -> Result<(), StoreError> {
        let count = self.store.record_count(kind).await? as usize;
        if count <= DELIVERIES_KEPT + DELIVERIES_KEPT / 10 {
            return Ok(());
        }
        let mut finished: Vec<Delivery> = self
            .store
            .record_list(kind)
            .await?
            .iter()
            .filter_map(|bytes| serde_json::from_slice::<Delivery>(bytes).ok())
            .filter(|d| d.state != DeliveryState::Pending)
            .collect();
        finished
            .sort_by(|a, b| (a.created_at_ms, &a.event_id).cmp(&(b.created_at_ms, &b.event_id)));
        for delivery in finished.iter().take(count - DELIVERIES_KEPT) {
            self.store.record_delete(kind, &delivery.event_id).await?;
        }
        Ok(())
    }

    /// POSTs the event, signed, within the timeout; reads at most [`MAX_RESPONSE_BYTES`] of
    /// the answer.
    async fn send(&self, endpoint: &EndpointRecord, queued: &Queued) -> Attempt {
        let timestamp = crate::keys::unix_now();
        let signature =
            self.keys
                .key(&endpoint.id)
                .sign(&queued.event_id, timestamp, queued.body.as_bytes());
        let request = http::Request::post(&endpoint.url)
            .header(http::header::CONTENT_TYPE, "application/cloudevents+json")
            .header(http::header::USER_AGENT, "garage-gateway-webhooks")
            .header("webhook-id", &queued.event_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(Full::new(Bytes::from(queued.body.clone())));
        let request = match request {
            Ok(request) => request,
            Err(err) => return Attempt::Failed(format!("cannot make the request: {err}")),
        };
        // The answer's head within the timeout decides; its body, read within what is left
        // of it, only explains a refusal.
        let deadline = tokio::time::Instant::now() + self.config.timeout();
        let response = match tokio::time::timeout_at(deadline, self.client.request(request)).await {
            Err(_) => {
                return Attempt::Failed(format!(
                    "timed out after {} ms",
                    self.config.timeout().as_millis()
                ));
            }
            Ok(Err(err)) => return Attempt::Failed(describe(&err)),
            Ok(Ok(response)) => response,
        };
        let status = response.status();
        if status.is_success() {
            // Read (within bounds) so that the connection can carry the next delivery.
            let _ = tokio::time::timeout_at(
                deadline,
                read_at_most(response.into_body(), MAX_RESPONSE_BYTES),
            )
            .await;
            return Attempt::Delivered(status.as_u16());
        }
        let body = tokio::time::timeout_at(
            deadline,
            read_at_most(response.into_body(), MAX_RESPONSE_BYTES),
        )
        .await
        .unwrap_or_default();
        Attempt::Refused {
            status: status.as_u16(),
            snippet: String::from_utf8_lossy(&body)
                .chars()
                .filter(|c| !c.is_control())
                .take(ERROR_SNIPPET_CHARS)
                .collect(),
        }
    }
}

/// A client error with its causes (hyper's own message is only "client error (Connect)").
fn describe(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Up to `max` bytes of a body; the rest is left unread (the connection is then not reused).
async fn read_at_most(mut body: hyper::body::Incoming, max: usize) -> Vec<u8> {
    let mut out = Vec::new();
    while out.len() < max {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let room = max - out.len();
                    out.extend_from_slice(&data[..data.len().min(room)]);
                }
            }
            _ => break,
        }
    }
    out
}
