//! Events pushed to operators' systems by webhook, and pulled as files.
//!
//! - [`endpoint`] says where events go (managed through `/admin/webhooks`), each endpoint
//!   with a signing key derived from the server's key secret;
//! - [`event`] has the kinds of event and their data, as CloudEvents 1.0;
//! - [`signing`] makes Standard Webhooks signatures, and checks them as a receiver does;
//! - [`delivery`] keeps deliveries in the store's queue, so that every replica sends, exactly
//!   one sends each attempt, and a restart resumes them; retried with backoff, then failed;
//! - [`usage`] makes `usage.recorded` of every request the ledger charges, and keeps the
//!   per-hour copy of the ledger that [`export`] serves as CSV or CloudEvents JSON lines.
//!
//! Other parts of the gateway emit with [`Webhooks::emit`] (never blocks, costs nothing
//! when no endpoint takes the event's kind) or [`Webhooks::emit_now`] (waits until the event
//! is in the store).

pub mod api;
pub mod config;
pub mod delivery;
pub mod endpoint;
pub mod event;
pub mod export;
pub mod signing;
pub mod usage;

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

pub use config::WebhooksConfig;
pub use delivery::{Delivery, DeliveryState};
pub use endpoint::{EndpointRecord, KeyDeriver};
pub use event::{BalanceLow, BudgetThreshold, CloudEvent, Event, EventKind};

use crate::error::ApiError;
use crate::store::keyspace::{WEBHOOK_ENDPOINTS, webhook_deliveries};
use crate::store::{Store, StoreError, StoreEvent};

/// Events [`Webhooks::emit`] holds for the store. Past this (the store is down, or far behind)
/// an event is dropped, counted and logged: bounded memory beats a crash that loses them all.
const EMIT_BUFFER: usize = 10_000;
/// Longest event id: it is a header and part of store names.
const MAX_EVENT_ID_BYTES: usize = 200;
/// How often a replica reloads the endpoints even without a change event (a safety net for a
/// missed one).
const RELOAD_INTERVAL: Duration = Duration::from_secs(30);

type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Webhook endpoints, the events for them, and their deliveries.
pub struct Webhooks {
    store: Arc<dyn Store>,
    config: WebhooksConfig,
    keys: KeyDeriver,
    /// Every endpoint, as last loaded from the store.
    endpoints: ArcSwap<Vec<Arc<EndpointRecord>>>,
    /// The kinds some endpoint takes, one bit each: what `emit` checks first.
    wanted: AtomicU8,
    emitted: mpsc::Sender<Event>,
    emitted_rx: Mutex<Option<mpsc::Receiver<Event>>>,
    /// Wakes the delivery worker: deliveries were queued here.
    wake: Notify,
    /// `garage_webhook_deliveries_total{outcome}`.
    outcomes: prometheus::IntCounterVec,
    client: HttpClient,
    /// On the embedded store, about how many requests the usage export keeps (see
    /// [`usage`]); none on Redis.
    export_cap: Option<usize>,
    /// The newest hour the usage export has a copy for, as far as this replica knows.
    newest_export_hour: AtomicU64,
}

fn bit(kind: EventKind) -> u8 {
    1 << (kind as u8)
}

impl Webhooks {
    /// `server_secret` is the key secret (the same on every replica); `export_cap` bounds the
    /// usage export on a store that keeps everything in memory.
    pub fn new(
        store: Arc<dyn Store>,
        config: WebhooksConfig,
        server_secret: &[u8],
        export_cap: Option<usize>,
    ) -> Result<Arc<Self>, crate::upstream::CaFileError> {
        let (emitted, emitted_rx) = mpsc::channel(EMIT_BUFFER);
        let client = delivery::client(&config)?;
        Ok(Arc::new(Webhooks {
            store,
            keys: KeyDeriver::new(server_secret),
            config,
            endpoints: ArcSwap::default(),
            wanted: AtomicU8::new(0),
            emitted,
            emitted_rx: Mutex::new(Some(emitted_rx)),
            wake: Notify::new(),
            outcomes: prometheus::IntCounterVec::new(
                prometheus::Opts::new(
                    "garage_webhook_deliveries_total",
                    "Webhook delivery attempts by outcome: delivered (a 2xx), retried (failed, \
                     another attempt scheduled), failed (the last attempt failed: given up), \
                     dropped (not queued: the emit buffer was full, or a malformed event id)",
                ),
                &["outcome"],
            )
            .unwrap_or_else(|e| unreachable!("static metric definition: {e}")),
            client,
            export_cap,
            newest_export_hour: AtomicU64::new(0),
        }))
    }

    pub fn config(&self) -> &WebhooksConfig {
        &self.config
    }

    /// The metrics this registers.
    pub fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![Box::new(self.outcomes.clone())]
    }

    /// Whether some endpoint takes events of `kind` (as far as this replica knows).
    pub fn wants(&self, kind: EventKind) -> bool {
        self.wanted.load(Ordering::Relaxed) & bit(kind) != 0
    }

    /// Queues an event for the endpoints that take its kind, without waiting: nothing at all
    /// when none does; otherwise it reaches the store within milliseconds, and each endpoint
    /// gets it once however often the same event (the same `id`) is emitted. For the request
    /// path; a caller that must know the event is kept uses [`emit_now`](Self::emit_now).
    pub fn emit(&self, event: Event) {
        if !self.wants(event.kind) {
            return;
        }
        if let Err(err) = self.emitted.try_send(event) {
            self.outcomes.with_label_values(&["dropped"]).inc();
            let event = match &err {
                mpsc::error::TrySendError::Full(event)
                | mpsc::error::TrySendError::Closed(event) => event,
            };
            tracing::warn!(event_id = %event.id, kind = %event.kind, "webhook event dropped: the store is not keeping up");
        }
    }

    /// Queues events for the endpoints that take their kinds, and returns once they are in the
    /// store (each endpoint gets each event id once); how many deliveries were queued.
    pub async fn emit_now(&self, events: &[Event]) -> Result<usize, StoreError> {
        let endpoints = self.endpoints.load_full();
        let mut queued = 0;
        for endpoint in endpoints.iter() {
            let events: Vec<&Event> = events
                .iter()
                .filter(|e| endpoint.takes(e.kind) && self.sendable(e))
                .collect();
            if !events.is_empty() {
                queued += self.enqueue(endpoint, &events).await?;
            }
        }
        if queued > 0 {
            self.wake.notify_one();
        }
        Ok(queued)
    }

    /// Whether an event's id can be a `webhook-id` header and a store name: 1 to
    /// [`MAX_EVENT_ID_BYTES`] visible ASCII characters. One that cannot is dropped (an emitter's
    /// bug), counted and logged, rather than failing every attempt.
    fn sendable(&self, event: &Event) -> bool {
        let ok = !event.id.is_empty()
            && event.id.len() <= MAX_EVENT_ID_BYTES
            && event.id.bytes().all(|b| b.is_ascii_graphic());
        if !ok {
            self.outcomes.with_label_values(&["dropped"]).inc();
            tracing::error!(event_id = ?event.id, kind = %event.kind, "webhook event dropped: its id is not 1 to 200 visible ASCII characters");
        }
        ok
    }

    /// Loads the endpoints from the store.
    pub async fn reload(&self) -> Result<(), StoreError> {
        let mut endpoints: Vec<Arc<EndpointRecord>> = self
            .store
            .record_list(WEBHOOK_ENDPOINTS)
            .await?
            .iter()
            .filter_map(|bytes| match serde_json::from_slice(bytes) {
                Ok(record) => Some(Arc::new(record)),
                Err(err) => {
                    tracing::error!(error = %err, "unreadable webhook endpoint skipped");
                    None
                }
            })
            .collect();
        endpoints.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        let wanted = endpoints
            .iter()
            .flat_map(|e| e.events.iter())
            .fold(0, |bits, kind| bits | bit(*kind));
        self.endpoints.store(Arc::new(endpoints));
        self.wanted.store(wanted, Ordering::Relaxed);
        Ok(())
    }

    /// Every endpoint, oldest first.
    pub fn endpoints(&self) -> Arc<Vec<Arc<EndpointRecord>>> {
        self.endpoints.load_full()
    }

    /// Creates an endpoint; returns it with its signing secret (shown once).
    pub async fn create_endpoint(
        &self,
        request: endpoint::CreateEndpoint,
    ) -> Result<(EndpointRecord, String), ApiError> {
        let (url, events, description) = request.validate()?;
        self.reload().await?;
        if self.endpoints.load().len() >= endpoint::MAX_ENDPOINTS {
            return Err(ApiError::bad_request(
                format!(
                    "A gateway has at most {} webhook endpoints; delete one first.",
                    endpoint::MAX_ENDPOINTS
                ),
                None,
            ));
        }
        let record = EndpointRecord {
            id: format!("we_{}", crate::keys::random_token(24)),
            url,
            events,
            description,
            created_at: crate::keys::unix_now(),
        };
        let json = serde_json::to_vec(&record).map_err(StoreError::from)?;
        self.store
            .record_put(WEBHOOK_ENDPOINTS, &record.id, &json)
            .await?;
        self.changed().await;
        let secret = self.keys.key(&record.id).secret();
        tracing::info!(endpoint = %record.id, url = %record.url, "webhook endpoint created");
        Ok((record, secret))
    }

    /// Deletes an endpoint and its deliveries (those still queued are dropped when their turn
    /// comes).
    pub async fn delete_endpoint(&self, id: &str) -> Result<Option<EndpointRecord>, ApiError> {
        let Some(record) = self.endpoint(id).await? else {
            return Ok(None);
        };
        self.store.record_delete(WEBHOOK_ENDPOINTS, id).await?;
        self.store
            .record_delete_kind(&webhook_deliveries(id))
            .await?;
        self.changed().await;
        tracing::info!(endpoint = %id, "webhook endpoint deleted");
        Ok(Some(record))
    }

    /// One endpoint, from the store (this replica's copy may lag a change elsewhere).
    pub async fn endpoint(&self, id: &str) -> Result<Option<EndpointRecord>, StoreError> {
        match self.store.record_get(WEBHOOK_ENDPOINTS, id).await? {
            Some(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
            None => Ok(None),
        }
    }

    /// This replica reloads now; the others when they hear of it.
    async fn changed(&self) {
        if let Err(err) = self.reload().await {
            tracing::warn!(error = %err, "cannot reload webhook endpoints");
        }
        if let Err(err) = self.store.publish(&StoreEvent::WebhooksChanged).await {
            tracing::warn!(error = %err, "cannot tell the other replicas of a webhook change; they reload within a minute");
        }
    }

    /// The tasks that keep webhooks going: endpoint reloads, the emit buffer's writer, the
    /// delivery worker. Aborting them stops them (attempts in flight go back to the queue
    /// when their lease runs out).
    pub fn spawn_background(self: &Arc<Self>) -> Vec<JoinHandle<()>> {
        let mut tasks = vec![
            tokio::spawn(Arc::clone(self).follow_changes()),
            tokio::spawn(Arc::clone(self).run_deliveries()),
        ];
        let receiver = self
            .emitted_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(receiver) = receiver {
            tasks.push(tokio::spawn(Arc::clone(self).write_emitted(receiver)));
        }
        tasks
    }

    async fn follow_changes(self: Arc<Self>) {
        let mut events = self.store.subscribe();
        loop {
            let reload = tokio::select! {
                event = events.recv() => match event {
                    Ok(StoreEvent::WebhooksChanged | StoreEvent::Resync)
                    | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => true,
                    Ok(_) => false,
                    // No more events (the store is going away): reload now and then only.
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        tokio::time::sleep(RELOAD_INTERVAL).await;
                        true
                    }
                },
                () = tokio::time::sleep(RELOAD_INTERVAL) => true,
            };
            if reload && let Err(err) = self.reload().await {
                tracing::warn!(error = %err, "cannot reload webhook endpoints; retrying");
            }
        }
    }

    /// Writes what [`emit`](Self::emit) buffered to the store, retrying while it is down.
    async fn write_emitted(self: Arc<Self>, mut receiver: mpsc::Receiver<Event>) {
        let mut batch = Vec::new();
        while receiver.recv_many(&mut batch, 256).await > 0 {
            let mut pause = Duration::from_millis(100);
            while let Err(err) = self.emit_now(&batch).await {
                tracing::warn!(error = %err, events = batch.len(), "cannot queue webhook events; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            batch.clear();
        }
    }
}
