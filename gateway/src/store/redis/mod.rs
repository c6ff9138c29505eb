//! The Redis store: the shared state of several gateway replicas, on one Redis server, a Redis
//! Cluster, or a primary with replicas watched by Redis Sentinel (the URL says which: see
//! [`deployment`]; docs/operations.md tells how to run each).
//!
//! Layout 2 (every key under `garage:`). Keys that one command, `MULTI` or script touches
//! together share a hash tag, the part in braces, so that on a Redis Cluster they live in one
//! slot; a key always used alone has no tag, and its whole name spreads it over the cluster:
//!
//! - API keys, tag `{keys}`: `{keys}:id:<id>` → JSON record, `{keys}:hash:<hash>` → id,
//!   `{keys}:index` → sorted set of ids by creation time (written together by `put_key`, read
//!   together by `list_keys`; the gateway caches keys, so their one slot is not a hot spot);
//! - `kv:<name>` → plugin state and counters (alone); a windowed counter with a large limit
//!   may run ahead of its reservations by the slices replicas hold (see [`leases`]);
//! - `rec:<kind>` → hash of JSON records by id (one key per kind);
//! - a work queue, tag `{q:<name>}`: `{q:<name>}:waiting` (sorted set by arrival),
//!   `{q:<name>}:leased` (sorted set by lease deadline, Unix ms by the server's clock),
//!   `{q:<name>}:items` (hash of payloads) and `{q:<name>}:seq` (its scripts use all four).
//!   A queue name holding `}` cuts its tag short there, but alike in all four names, so they
//!   still share a slot;
//! - an account's money, tag `{acct:<id>}`: its balance, holds, settlements, period counters
//!   and credit ledger (see [`accounts`]);
//! - `layout` → the layout's number; events on the `garage:events` channel.
//!
//! Layout 1 (before Redis Cluster support) had the same names without tags; [`migrate`] moves
//! a store of layout 1 when a gateway connects.

mod accounts;
mod connection;
mod deployment;
mod events;
mod leases;
mod migrate;
mod scripts;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::AsyncCommands;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use self::connection::{Connection, SentinelConnection};
use self::deployment::Deployment;
use self::events::{EVENTS_CHANNEL, EventSource, forward_events};
use self::leases::{Grant, Leases, Local};
use self::scripts::*;
use super::{
    ApiKeyRecord, CreditOutcome, CreditRecord, EVENT_BUFFER, HoldOutcome, HoldRequest, Money,
    QueueCounts, QueueItem, SettleOutcome, SettleRequest, Store, StoreError, StoreEvent,
};

/// The index of API keys by creation time.
const KEYS_INDEX: &str = "garage:{keys}:index";

fn key_key(id: &str) -> String {
    format!("garage:{{keys}}:id:{id}")
}

fn hash_key(hash: &str) -> String {
    format!("garage:{{keys}}:hash:{hash}")
}

fn kv_key(name: &str) -> String {
    format!("garage:kv:{name}")
}

/// Records of one kind live in one hash: listing a kind is one HVALS.
fn record_key(kind: &str) -> String {
    format!("garage:rec:{kind}")
}

/// One of a queue's keys (`waiting`, `leased`, `items`, `seq`). The tag starts with `q:`, so it
/// is never empty, whatever the queue's name.
fn queue_part_key(name: &str, part: &str) -> String {
    format!("garage:{{q:{name}}}:{part}")
}

/// A queue's keys: waiting, leased, items, seq.
fn queue_keys(name: &str) -> [String; 4] {
    ["waiting", "leased", "items", "seq"].map(|part| queue_part_key(name, part))
}

/// Pushes go in chunks: one script call stays short, so other clients are not held up.
const PUSH_CHUNK: usize = 500;

pub struct RedisStore {
    conn: Connection,
    events: broadcast::Sender<StoreEvent>,
    incr_script: redis::Script,
    reserve_script: redis::Script,
    reserve_slice: redis::Script,
    /// Slices of windowed counters this replica holds (see [`leases`]).
    leases: Arc<Leases>,
    queue_push: redis::Script,
    queue_lease: redis::Script,
    queue_ack: redis::Script,
    queue_release: redis::Script,
    queue_extend: redis::Script,
    queue_counts: redis::Script,
    queue_drop_waiting: redis::Script,
    accounts: accounts::Scripts,
    subscriber: JoinHandle<()>,
    /// Gives idle slices back to their counters.
    lease_sweeper: JoinHandle<()>,
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        self.subscriber.abort();
        self.lease_sweeper.abort();
    }
}

impl RedisStore {
    /// Connects to the deployment `url` names (and fails if it cannot be reached now); later
    /// outages are retried. A single server or Sentinel store of an older layout is moved to
    /// today's first.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let (mut conn, source) = match Deployment::parse(url)? {
            Deployment::Single(url) => {
                let source = EventSource::Single(redis::Client::open(url.as_str())?);
                (Connection::single(&url).await?, source)
            }
            Deployment::Cluster { seeds } => {
                let cluster = connection::cluster(&seeds).await?;
                let source = EventSource::cluster(&seeds, cluster.clone())?;
                (Connection::Cluster(cluster), source)
            }
            Deployment::Sentinel(target) => {
                let conn = SentinelConnection::connect(&target).await?;
                let source = EventSource::sentinel(&target, conn.clone())?;
                (Connection::Sentinel(conn), source)
            }
        };
        if !matches!(conn, Connection::Cluster(_)) {
            migrate::to_current_layout(&mut conn).await?;
        }
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let subscriber = tokio::spawn(forward_events(source, events.clone()));
        let leases = Arc::new(Leases::default());
        let lease_sweeper = tokio::spawn(return_idle_slices(conn.clone(), leases.clone()));
        Ok(RedisStore {
            conn,
            events,
            incr_script: redis::Script::new(INCR_WITH_TTL),
            reserve_script: redis::Script::new(RESERVE_WITH_TTL),
            reserve_slice: redis::Script::new(RESERVE_SLICE),
            leases,
            queue_push: redis::Script::new(QUEUE_PUSH),
            queue_lease: redis::Script::new(&format!("{NOW_MS}{REQUEUE_EXPIRED}{QUEUE_LEASE}")),
            queue_ack: redis::Script::new(QUEUE_ACK),
            queue_release: redis::Script::new(QUEUE_RELEASE),
            queue_extend: redis::Script::new(&format!("{NOW_MS}{QUEUE_EXTEND}")),
            queue_counts: redis::Script::new(&format!("{NOW_MS}{QUEUE_COUNTS}")),
            queue_drop_waiting: redis::Script::new(&format!(
                "{NOW_MS}{REQUEUE_EXPIRED}{QUEUE_DROP_WAITING}"
            )),
            accounts: accounts::Scripts::new(),
            subscriber,
            lease_sweeper,
        })
    }

    /// `kv_reserve` of a windowed counter with a large limit: from this replica's slice when it
    /// holds enough, else one script that reserves and takes a new slice (see [`leases`]).
    async fn reserve_leased(
        &self,
        key: String,
        amount: i64,
        limit: i64,
        ttl: Duration,
    ) -> Result<Option<i64>, StoreError> {
        let asked_at = Instant::now();
        let (need, extra, give_back, from_slice) =
            match self.leases.take(&key, amount, limit, asked_at) {
                Local::Taken(value) => return Ok(Some(value)),
                Local::Ask {
                    need,
                    extra,
                    give_back,
                    from_slice,
                } => (need, extra, give_back, from_slice),
            };
        let mut conn = self.conn.clone();
        let answer: Result<(i64, i64, i64, i64), _> = self
            .reserve_slice
            .key(&key)
            .arg(need)
            .arg(limit)
            .arg(ttl.as_millis().max(1) as u64)
            .arg(extra)
            .arg(give_back)
            .arg(leases::SLICE_SHARE)
            .invoke_async(&mut conn)
            .await;
        match answer {
            Err(err) => {
                // The server may have lost its counters (a restart): nothing taken before is
                // spent after.
                self.leases.clear();
                Err(err.into())
            }
            Ok((0, ..)) => {
                self.leases.refused(&key, from_slice);
                Ok(None)
            }
            Ok((_, value, extra, pttl_ms)) => {
                let grant = Grant {
                    value,
                    extra,
                    pttl_ms,
                };
                Ok(Some(
                    self.leases.granted(&key, limit, amount, &grant, asked_at),
                ))
            }
        }
    }
}

/// Every [`leases::SWEEP_EVERY`], gives the slices no call has drawn from for
/// [`leases::LEASE_IDLE`] back to their counters, so that other replicas can have them.
async fn return_idle_slices(conn: Connection, leases: Arc<Leases>) {
    let script = redis::Script::new(RETURN_SLICE);
    let mut tick = tokio::time::interval(leases::SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let returns = leases.sweep(Instant::now());
        // One round trip for them all: the calls share the multiplexed connection.
        let calls = returns.iter().map(|(key, units)| {
            let mut conn = conn.clone();
            let script = &script;
            async move {
                let result: Result<i64, _> =
                    script.key(key).arg(*units).invoke_async(&mut conn).await;
                if let Err(error) = result {
                    // The units stay counted until the window ends: a replica may be refused
                    // early, never admitted past the limit.
                    tracing::warn!(%error, counter = %key, units, "could not give a slice back");
                }
            }
        });
        futures::future::join_all(calls).await;
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(())
    }

    async fn put_key(&self, key: &ApiKeyRecord) -> Result<(), StoreError> {
        let json = serde_json::to_string(key)?;
        let mut conn = self.conn.clone();
        let _: () = redis::pipe()
            .atomic()
            .set(key_key(&key.id), json)
            .ignore()
            .set(hash_key(&key.hash), &key.id)
            .ignore()
            .zadd(KEYS_INDEX, &key.id, key.created_at)
            .ignore()
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    async fn key_by_hash(&self, hash: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        let mut conn = self.conn.clone();
        let id: Option<String> = conn.get(hash_key(hash)).await?;
        match id {
            Some(id) => self.key_by_id(&id).await,
            None => Ok(None),
        }
    }

    async fn key_by_id(&self, id: &str) -> Result<Option<ApiKeyRecord>, StoreError> {
        let mut conn = self.conn.clone();
        let json: Option<String> = conn.get(key_key(id)).await?;
        Ok(json.map(|j| serde_json::from_str(&j)).transpose()?)
    }

    async fn list_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        let mut conn = self.conn.clone();
        let ids: Vec<String> = conn.zrange(KEYS_INDEX, 0, -1).await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| key_key(id)).collect();
        let records: Vec<Option<String>> =
            redis::cmd("MGET").arg(&keys).query_async(&mut conn).await?;
        records
            .into_iter()
            .flatten()
            .map(|json| serde_json::from_str(&json).map_err(StoreError::from))
            .collect()
    }

    async fn kv_get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut conn = self.conn.clone();
        Ok(conn.get(kv_key(key)).await?)
    }

    async fn kv_set(
        &self,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), StoreError> {
        let key = kv_key(key);
        self.leases.forget(&key);
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg(value);
        if let Some(ttl) = ttl {
            cmd.arg("PX").arg(ttl.as_millis().max(1) as u64);
        }
        let _: () = cmd.query_async(&mut conn).await?;
        Ok(())
    }

    async fn kv_incr(
        &self,
        key: &str,
        delta: i64,
        ttl: Option<Duration>,
    ) -> Result<i64, StoreError> {
        let key = kv_key(key);
        if ttl.is_some()
            && let Some(value) = self.leases.adjust(&key, delta, Instant::now())
        {
            return Ok(value);
        }
        let mut conn = self.conn.clone();
        let ttl_ms = ttl.map_or(0, |ttl| ttl.as_millis().max(1) as u64);
        Ok(self
            .incr_script
            .key(&key)
            .arg(delta)
            .arg(ttl_ms)
            .invoke_async(&mut conn)
            .await?)
    }

    async fn kv_reserve(
        &self,
        key: &str,
        amount: i64,
        limit: i64,
        ttl: Option<Duration>,
    ) -> Result<Option<i64>, StoreError> {
        if let Some(window) = ttl
            && Leases::eligible(amount, limit, ttl)
        {
            return self
                .reserve_leased(kv_key(key), amount, limit, window)
                .await;
        }
        let mut conn = self.conn.clone();
        let ttl_ms = ttl.map_or(0, |ttl| ttl.as_millis().max(1) as u64);
        Ok(self
            .reserve_script
            .key(kv_key(key))
            .arg(amount)
            .arg(limit)
            .arg(ttl_ms)
            .invoke_async(&mut conn)
            .await?)
    }

    async fn kv_delete(&self, key: &str) -> Result<(), StoreError> {
        let key = kv_key(key);
        self.leases.forget(&key);
        let mut conn = self.conn.clone();
        let _: () = conn.del(key).await?;
        Ok(())
    }

    async fn record_put(&self, kind: &str, id: &str, value: &[u8]) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: () = conn.hset(record_key(kind), id, value).await?;
        Ok(())
    }

    async fn record_get(&self, kind: &str, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut conn = self.conn.clone();
        Ok(conn.hget(record_key(kind), id).await?)
    }

    async fn record_list(&self, kind: &str) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut conn = self.conn.clone();
        Ok(conn.hvals(record_key(kind)).await?)
    }

    async fn record_delete(&self, kind: &str, id: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: () = conn.hdel(record_key(kind), id).await?;
        Ok(())
    }

    async fn record_put_new(&self, kind: &str, id: &str, value: &[u8]) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        Ok(conn.hset_nx(record_key(kind), id, value).await?)
    }

    async fn record_put_new_many(
        &self,
        kind: &str,
        records: &[(&str, &[u8])],
    ) -> Result<Vec<bool>, StoreError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let key = record_key(kind);
        let mut pipe = redis::pipe();
        for (id, value) in records {
            pipe.hset_nx(&key, *id, *value);
        }
        let mut conn = self.conn.clone();
        Ok(pipe.query_async(&mut conn).await?)
    }

    async fn records_exist(&self, kind: &str, ids: &[&str]) -> Result<Vec<bool>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let key = record_key(kind);
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.hexists(&key, *id);
        }
        let mut conn = self.conn.clone();
        Ok(pipe.query_async(&mut conn).await?)
    }

    async fn record_count(&self, kind: &str) -> Result<u64, StoreError> {
        let mut conn = self.conn.clone();
        Ok(conn.hlen(record_key(kind)).await?)
    }

    async fn record_delete_kind(&self, kind: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let _: () = conn.del(record_key(kind)).await?;
        Ok(())
    }

    async fn queue_push(&self, queue: &str, items: &[QueueItem]) -> Result<(), StoreError> {
        let keys = queue_keys(queue);
        let mut conn = self.conn.clone();
        for chunk in items.chunks(PUSH_CHUNK) {
            let mut call = self.queue_push.prepare_invoke();
            call.key(&keys[..]);
            for item in chunk {
                call.arg(&item.id).arg(&item.payload[..]);
            }
            let _: i64 = call.invoke_async(&mut conn).await?;
        }
        Ok(())
    }

    async fn queue_lease(
        &self,
        queue: &str,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<QueueItem>, StoreError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let keys = queue_keys(queue);
        let mut conn = self.conn.clone();
        let flat: Vec<Vec<u8>> = self
            .queue_lease
            .key(&keys[..3])
            .arg(max)
            .arg(lease.as_millis().max(1) as u64)
            .invoke_async(&mut conn)
            .await?;
        let mut items = Vec::with_capacity(flat.len() / 2);
        let mut flat = flat.into_iter();
        while let (Some(id), Some(payload)) = (flat.next(), flat.next()) {
            let id = String::from_utf8(id)
                .map_err(|_| StoreError::Corrupt(format!("queue {queue}: id is not UTF-8")))?;
            items.push(QueueItem { id, payload });
        }
        Ok(items)
    }

    async fn queue_release(&self, queue: &str, id: &str) -> Result<bool, StoreError> {
        let keys = queue_keys(queue);
        let mut conn = self.conn.clone();
        let released: i64 = self
            .queue_release
            .key(&keys[..2])
            .arg(id)
            .invoke_async(&mut conn)
            .await?;
        Ok(released == 1)
    }

    async fn queue_extend(
        &self,
        queue: &str,
        id: &str,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let keys = queue_keys(queue);
        let mut conn = self.conn.clone();
        let extended: i64 = self
            .queue_extend
            .key(&keys[1])
            .arg(id)
            .arg(lease.as_millis().max(1) as u64)
            .invoke_async(&mut conn)
            .await?;
        Ok(extended == 1)
    }

    async fn queue_ack(&self, queue: &str, id: &str) -> Result<bool, StoreError> {
        Ok(self.queue_ack_many(queue, &[id]).await? == 1)
    }

    async fn queue_ack_many(&self, queue: &str, ids: &[&str]) -> Result<u64, StoreError> {
        let keys = queue_keys(queue);
        let mut conn = self.conn.clone();
        let mut found = 0;
        for chunk in ids.chunks(PUSH_CHUNK) {
            let mut call = self.queue_ack.prepare_invoke();
            call.key(&keys[..]);
            for id in chunk {
                call.arg(*id);
            }
            let n: u64 = call.invoke_async(&mut conn).await?;
            found += n;
        }
        Ok(found)
    }

    async fn queue_counts(&self, queue: &str) -> Result<QueueCounts, StoreError> {
        let keys = queue_keys(queue);
        let mut conn = self.conn.clone();
        let (waiting, leased): (u64, u64) = self
            .queue_counts
            .key(&keys[..2])
            .invoke_async(&mut conn)
            .await?;
        Ok(QueueCounts { waiting, leased })
    }

    async fn queue_drop_waiting(&self, queue: &str) -> Result<u64, StoreError> {
        let keys = queue_keys(queue);
        let mut conn = self.conn.clone();
        Ok(self
            .queue_drop_waiting
            .key(&keys[..3])
            .invoke_async(&mut conn)
            .await?)
    }

    async fn account_hold(&self, hold: &HoldRequest<'_>) -> Result<HoldOutcome, StoreError> {
        accounts::hold(&self.conn, &self.accounts, hold).await
    }

    async fn account_settle(
        &self,
        settle: &SettleRequest<'_>,
    ) -> Result<SettleOutcome, StoreError> {
        accounts::settle(&self.conn, &self.accounts, settle).await
    }

    async fn account_release(&self, account: &str, request_id: &str) -> Result<bool, StoreError> {
        accounts::release(&self.conn, &self.accounts, account, request_id).await
    }

    async fn account_credit(
        &self,
        account: &str,
        delta: i64,
        min_balance: i64,
        max_balance: i64,
        entry: &[u8],
    ) -> Result<CreditOutcome, StoreError> {
        let bounds = (delta, min_balance, max_balance);
        accounts::credit(&self.conn, &self.accounts, account, bounds, entry).await
    }

    async fn account_credits(&self, account: &str) -> Result<Vec<CreditRecord>, StoreError> {
        accounts::credits(&self.conn, account).await
    }

    async fn account_money(
        &self,
        account: &str,
        now_ms: u64,
        periods: &[String],
    ) -> Result<Money, StoreError> {
        accounts::money(&self.conn, &self.accounts, account, now_ms, periods).await
    }

    async fn publish(&self, event: &StoreEvent) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let json = serde_json::to_string(event)?;
        let _: () = conn.publish(EVENTS_CHANNEL, json).await?;
        Ok(())
    }

    fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
        self.events.subscribe()
    }
}
