//! The state store: one trait, an embedded in-memory implementation (the default) and a Redis one
//! (for several gateway replicas: on one server, a Redis Cluster or a primary watched by Redis
//! Sentinel). All pass the same test suite (`tests/all/store_suite.rs`).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

pub mod accounts;
pub mod keyspace;
pub mod local;
mod memory;
mod redis;

pub use accounts::{
    CreditOutcome, CreditRecord, HoldOutcome, HoldRequest, Money, SettleOutcome, SettleRequest,
};
pub use memory::MemoryStore;
pub use redis::RedisStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store backend error: {0}")]
    Backend(String),
    #[error("corrupt record in store: {0}")]
    Corrupt(String),
}

impl From<::redis::RedisError> for StoreError {
    fn from(err: ::redis::RedisError) -> Self {
        StoreError::Backend(err.to_string())
    }
}

impl From<serde_json::Error> for StoreError {
    fn from(err: serde_json::Error) -> Self {
        StoreError::Corrupt(err.to_string())
    }
}

/// An API key as stored: the secret itself is never here, only its keyed hash.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ApiKeyRecord {
    pub id: String,
    pub name: String,
    /// HMAC-SHA256 of the secret under the server's key secret, hex.
    pub hash: String,
    /// The first characters of the secret, so people can tell their keys apart.
    pub prefix: String,
    /// Models this key may call; `None` means all.
    pub allowed_models: Option<Vec<String>>,
    /// Free-form metadata set by the admin (limits and budgets read it later).
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds; a revoked key is refused.
    pub revoked_at: Option<u64>,
    /// The account whose credits the key spends (`accounts`); none for a key of its own.
    /// Missing in records written before accounts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
}

/// Events every gateway replica hears, whichever replica caused them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum StoreEvent {
    /// A key was created, changed or revoked: drop it from caches.
    KeyChanged { id: String, hash: String },
    /// A node's record changed (drained, revoked...): replicas reload it.
    NodeChanged { id: String },
    /// A node's heartbeat, relayed to the replica that holds its tunnel.
    NodeHeartbeat {
        id: String,
        heartbeat: garage_node_protocol::Heartbeat,
    },
    /// A rig tunnelled to `replica` (reached at `url`), as that replica routes it: the other
    /// replicas route to it through `replica` (see `cluster`). Sent on every heartbeat it
    /// applies; empty `models`: out of routing.
    RigAdvertised {
        replica: String,
        url: String,
        node: String,
        operator: String,
        models: Vec<String>,
        /// Requests in flight to the rig through `replica`.
        in_flight: u32,
        heartbeat: garage_node_protocol::Heartbeat,
    },
    /// The rig's tunnel to `replica` closed.
    RigWithdrawn { replica: String, node: String },
    /// A replica started, or missed events: the others advertise their rigs to it now.
    AdvertsWanted { replica: String },
    /// A rig's trust changed (`verified`, `quarantined`...): replicas route accordingly.
    TrustChanged { node: String, status: String },
    /// A replica is stopping: its rigs will reconnect elsewhere.
    ReplicaStopped { replica: String, url: String },
    /// A plugin slot's active version or canary changed: replicas reload that slot.
    PluginActivated { slot: String },
    /// A batch's lines were queued: wake the rigs waiting for batch work of that model.
    BatchQueued { model: String },
    /// A webhook endpoint was created or deleted: replicas reload them.
    WebhooksChanged,
    /// The event stream had a gap (a reconnect): every cache must be dropped.
    Resync,
}

/// One item of a work queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueItem {
    pub id: String,
    pub payload: Vec<u8>,
}

/// The size of a work queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueCounts {
    pub waiting: u64,
    pub leased: u64,
}

/// A store every gateway replica shares. Implementations are cheap to share (`Arc<dyn Store>`).
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Checks the store is reachable.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Inserts or replaces a key record (indexed by id and by hash).
    async fn put_key(&self, key: &ApiKeyRecord) -> Result<(), StoreError>;
    async fn key_by_hash(&self, hash: &str) -> Result<Option<ApiKeyRecord>, StoreError>;
    async fn key_by_id(&self, id: &str) -> Result<Option<ApiKeyRecord>, StoreError>;
    /// All keys, oldest first.
    async fn list_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError>;

    /// Plain key-value state (plugins' counters and such), namespaced by the caller.
    async fn kv_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Sets a value; with a TTL it expires by itself.
    async fn kv_set(
        &self,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), StoreError>;
    /// Atomically adds `delta` (a missing key counts as 0) and returns the new value. The TTL,
    /// if any, is set only when the key is created, so a counter's window does not slide.
    async fn kv_incr(
        &self,
        key: &str,
        delta: i64,
        ttl: Option<Duration>,
    ) -> Result<i64, StoreError>;
    async fn kv_delete(&self, key: &str) -> Result<(), StoreError>;
    /// Atomically adds `amount` to the counter at `key` (a missing key counts as 0) only if the
    /// result stays at or below `limit`; returns the new value, or `None` (and changes nothing)
    /// when it would exceed the limit. The TTL, as with `kv_incr`, is set only on creation.
    ///
    /// A store shared by replicas may lend each a slice of a windowed counter with a large
    /// limit (the Redis store's quota leases): the units reserved across replicas still never
    /// pass the limit, but the stored value then runs ahead of them by the unspent slices, and
    /// the value returned is this replica's view of it.
    async fn kv_reserve(
        &self,
        key: &str,
        amount: i64,
        limit: i64,
        ttl: Option<Duration>,
    ) -> Result<Option<i64>, StoreError>;

    /// Records: JSON documents of one `kind` (nodes, enrollment tokens...) by id.
    async fn record_put(&self, kind: &str, id: &str, value: &[u8]) -> Result<(), StoreError>;
    async fn record_get(&self, kind: &str, id: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Every record of a kind, in no particular order.
    async fn record_list(&self, kind: &str) -> Result<Vec<Vec<u8>>, StoreError>;
    async fn record_delete(&self, kind: &str, id: &str) -> Result<(), StoreError>;

    /// Inserts a record only if none has that id; true when this call inserted it. The first
    /// writer wins, whichever replica it is on.
    async fn record_put_new(&self, kind: &str, id: &str, value: &[u8]) -> Result<bool, StoreError>;
    /// `record_put_new` for many records in one round trip; for each, true when this call
    /// inserted it.
    async fn record_put_new_many(
        &self,
        kind: &str,
        records: &[(&str, &[u8])],
    ) -> Result<Vec<bool>, StoreError>;
    /// For each id, whether a record of that kind has it (one round trip).
    async fn records_exist(&self, kind: &str, ids: &[&str]) -> Result<Vec<bool>, StoreError>;
    /// How many records of a kind there are.
    async fn record_count(&self, kind: &str) -> Result<u64, StoreError>;
    /// Deletes every record of a kind.
    async fn record_delete_kind(&self, kind: &str) -> Result<(), StoreError>;
    /// Keeps at most `max` records of `kind` (the oldest inserted go first) in a store that
    /// bounds its memory that way, the embedded one; a store that keeps everything ignores it.
    /// For kinds named at run time (a rig's statement day); asking again changes nothing.
    fn bound_records(&self, _kind: &str, _max: usize) {}

    /// Work queues. Items wait in FIFO order until a worker leases them; a lease hides an item
    /// until it is acknowledged (gone for good) or the lease runs out (back to the head of the
    /// queue, for another worker). Pushing an id that is already queued replaces its payload.
    async fn queue_push(&self, queue: &str, items: &[QueueItem]) -> Result<(), StoreError>;
    /// Leases up to `max` items, oldest first (items whose lease ran out come first).
    async fn queue_lease(
        &self,
        queue: &str,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<QueueItem>, StoreError>;
    /// Gives a leased item back before its lease runs out: it goes to the head of the queue.
    /// True when it was leased.
    async fn queue_release(&self, queue: &str, id: &str) -> Result<bool, StoreError>;
    /// Leases a leased item again for `lease` from now, longer or shorter than it was (SQS's
    /// visibility timeout): a worker keeps an item out of sight until it should be tried again.
    /// True when it was leased; a waiting or missing item is left as it is.
    async fn queue_extend(
        &self,
        queue: &str,
        id: &str,
        lease: Duration,
    ) -> Result<bool, StoreError>;
    /// Removes an item, leased or waiting; true when it was there.
    async fn queue_ack(&self, queue: &str, id: &str) -> Result<bool, StoreError>;
    /// `queue_ack` for many items in one round trip; returns how many were there.
    async fn queue_ack_many(&self, queue: &str, ids: &[&str]) -> Result<u64, StoreError>;
    /// Items waiting (an item whose lease ran out counts as waiting) and leased.
    async fn queue_counts(&self, queue: &str) -> Result<QueueCounts, StoreError>;
    /// Removes every waiting item (leased ones stay until acknowledged or expired); returns how
    /// many it removed.
    async fn queue_drop_waiting(&self, queue: &str) -> Result<u64, StoreError>;

    /// Accounts' money (see [`accounts`]): places a hold for a request if the account's
    /// available balance and every period cap cover it, atomically (concurrent requests on
    /// several replicas cannot hold more than there is). Expired holds are released first.
    async fn account_hold(&self, hold: &HoldRequest<'_>) -> Result<HoldOutcome, StoreError>;
    /// Settles a request once: debits its charge, counts it in its periods and releases its
    /// hold; a second settlement of the same request id (within `remember_until_ms`) changes
    /// nothing.
    async fn account_settle(&self, settle: &SettleRequest<'_>)
    -> Result<SettleOutcome, StoreError>;
    /// Releases a request's hold without a debit (it failed before producing usage); true when
    /// it held something.
    async fn account_release(&self, account: &str, request_id: &str) -> Result<bool, StoreError>;
    /// Forgets the settlements of these requests, whose ledger entries are written: on the
    /// embedded store an event is never handed over again once its entry is written (the
    /// usage worker takes it from memory once, and skips a request the ledger has), so the
    /// mark has done its work; kept for its `remember_until_ms` (a day), it was a day of
    /// request ids per account in memory. A shared store keeps its marks until they
    /// expire (a replica that dies leaves its events to another): this does nothing there.
    async fn account_forget_settled(&self, request_ids: &[&str]) -> Result<(), StoreError> {
        let _ = request_ids;
        Ok(())
    }
    /// Adds `delta` micro-credits to an account's balance and appends `entry` to its credit
    /// ledger, in one step; refused when the balance would pass `max_balance`, or when a
    /// negative `delta` would take it below `min_balance`.
    async fn account_credit(
        &self,
        account: &str,
        delta: i64,
        min_balance: i64,
        max_balance: i64,
        entry: &[u8],
    ) -> Result<CreditOutcome, StoreError>;
    /// An account's credit ledger, oldest first.
    async fn account_credits(&self, account: &str) -> Result<Vec<CreditRecord>, StoreError>;
    /// An account's money now (its expired holds released), and the spend of `periods`.
    async fn account_money(
        &self,
        account: &str,
        now_ms: u64,
        periods: &[String],
    ) -> Result<Money, StoreError>;

    /// Sends an event to every replica (this one included).
    async fn publish(&self, event: &StoreEvent) -> Result<(), StoreError>;
    /// Events published from now on.
    fn subscribe(&self) -> broadcast::Receiver<StoreEvent>;
}

/// The integer a counter (`kv_incr`) holds: 0 when it is missing or unreadable.
pub async fn read_counter(store: &dyn Store, key: &str) -> Result<i64, StoreError> {
    Ok(store
        .kv_get(key)
        .await?
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0))
}

/// Opens the store a config names: `memory` or a Redis URL (`redis://`, `redis+cluster://`,
/// `redis+sentinel://`; see docs/redis.md). On the embedded store, each kind in
/// `memory_caps` keeps at most that many records (the oldest inserted go first); Redis keeps all.
pub async fn open(url: &str, memory_caps: &[(&str, usize)]) -> Result<Arc<dyn Store>, StoreError> {
    if crate::config::is_embedded(url) {
        let store = MemoryStore::new();
        for (kind, max) in memory_caps {
            store.cap_records(kind, *max);
        }
        Ok(Arc::new(store))
    } else {
        Ok(Arc::new(RedisStore::connect(url).await?))
    }
}

/// How many events a slow subscriber may lag before it must resync. Events are rare (key and
/// plugin changes), so this is generous.
const EVENT_BUFFER: usize = 1024;
