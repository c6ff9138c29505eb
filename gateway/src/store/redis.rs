//! The Redis store: the shared state of several gateway replicas.
//!
//! Layout (every key under `garage:`): `key:{id}` → JSON record, `keyhash:{hash}` → id,
//! `keys` → sorted set of ids by creation time, `kv:{name}` → plugin state,
//! `rec:{kind}` → hash of JSON records by id; work queues as `q:{name}:waiting` (sorted set by
//! arrival), `q:{name}:leased` (sorted set by lease deadline, Unix ms by the server's clock),
//! `q:{name}:items` (hash of payloads) and `q:{name}:seq`; events on the `garage:events` channel.

use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use redis::AsyncCommands;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use super::{ApiKeyRecord, EVENT_BUFFER, QueueCounts, QueueItem, Store, StoreError, StoreEvent};

const EVENTS_CHANNEL: &str = "garage:events";

/// INCRBY that sets the expiry only on a key that has none, so a rate-limit window starts when
/// its counter is created and does not slide with every hit.
const INCR_WITH_TTL: &str = r"
local v = redis.call('INCRBY', KEYS[1], ARGV[1])
if tonumber(ARGV[2]) > 0 and redis.call('PTTL', KEYS[1]) == -1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return v
";

/// Adds to a counter only if the result stays within a limit (nil when it would not), with the
/// same create-time expiry as `INCR_WITH_TTL`.
const RESERVE_WITH_TTL: &str = r"
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current == nil then
  return redis.error_reply('value is not an integer')
end
if current + tonumber(ARGV[1]) > tonumber(ARGV[2]) then
  return false
end
local v = redis.call('INCRBY', KEYS[1], ARGV[1])
if tonumber(ARGV[3]) > 0 and redis.call('PTTL', KEYS[1]) == -1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return v
";

/// Queues items not already there (waiting or leased); every payload is replaced.
/// KEYS: waiting, leased, items, seq. ARGV: id, payload, id, payload...
const QUEUE_PUSH: &str = r"
for i = 1, #ARGV, 2 do
  local id = ARGV[i]
  redis.call('HSET', KEYS[3], id, ARGV[i + 1])
  if not redis.call('ZSCORE', KEYS[2], id) and not redis.call('ZSCORE', KEYS[1], id) then
    redis.call('ZADD', KEYS[1], redis.call('INCR', KEYS[4]), id)
  end
end
return 1
";

/// The server's clock in Unix milliseconds, so that every replica agrees on lease deadlines.
const NOW_MS: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
";

/// Puts items whose lease ran out back at the head of the queue (score 0).
const REQUEUE_EXPIRED: &str = r"
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for _, id in ipairs(expired) do
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZADD', KEYS[1], 0, id)
end
";

/// KEYS: waiting, leased, items. ARGV: max, lease ms. Returns id, payload, id, payload...
const QUEUE_LEASE: &str = r"
local popped = redis.call('ZPOPMIN', KEYS[1], ARGV[1])
local out = {}
for i = 1, #popped, 2 do
  local id = popped[i]
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), id)
  out[#out + 1] = id
  out[#out + 1] = redis.call('HGET', KEYS[3], id) or ''
end
return out
";

/// KEYS: waiting, leased, items, seq. ARGV: ids. Returns how many of them were there.
const QUEUE_ACK: &str = r"
local found = 0
for i = 1, #ARGV do
  if redis.call('ZREM', KEYS[2], ARGV[i]) + redis.call('ZREM', KEYS[1], ARGV[i]) > 0 then
    found = found + 1
  end
  redis.call('HDEL', KEYS[3], ARGV[i])
end
if redis.call('HLEN', KEYS[3]) == 0 then
  redis.call('DEL', KEYS[4])
end
return found
";

/// KEYS: waiting, leased. ARGV: id. Returns 1 when the item was leased.
const QUEUE_RELEASE: &str = r"
if redis.call('ZREM', KEYS[2], ARGV[1]) == 1 then
  redis.call('ZADD', KEYS[1], 0, ARGV[1])
  return 1
end
return 0
";

/// KEYS: waiting, leased. Returns {waiting, leased}, an expired lease counting as waiting.
const QUEUE_COUNTS: &str = r"
local expired = redis.call('ZCOUNT', KEYS[2], '-inf', now)
return {redis.call('ZCARD', KEYS[1]) + expired, redis.call('ZCARD', KEYS[2]) - expired}
";

/// KEYS: waiting, leased, items. Returns how many waiting items it removed.
const QUEUE_DROP_WAITING: &str = r"
local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
for _, id in ipairs(ids) do
  redis.call('HDEL', KEYS[3], id)
end
redis.call('DEL', KEYS[1])
return #ids
";

/// A queue's keys: waiting, leased, items, seq.
fn queue_keys(name: &str) -> [String; 4] {
    ["waiting", "leased", "items", "seq"].map(|part| format!("garage:q:{name}:{part}"))
}

/// Pushes go in chunks: one script call stays short, so other clients are not held up.
const PUSH_CHUNK: usize = 500;

pub struct RedisStore {
    conn: ConnectionManager,
    events: broadcast::Sender<StoreEvent>,
    incr_script: redis::Script,
    reserve_script: redis::Script,
    queue_push: redis::Script,
    queue_lease: redis::Script,
    queue_ack: redis::Script,
    queue_release: redis::Script,
    queue_counts: redis::Script,
    queue_drop_waiting: redis::Script,
    subscriber: JoinHandle<()>,
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        self.subscriber.abort();
    }
}

fn key_key(id: &str) -> String {
    format!("garage:key:{id}")
}
fn hash_key(hash: &str) -> String {
    format!("garage:keyhash:{hash}")
}
fn kv_key(name: &str) -> String {
    format!("garage:kv:{name}")
}
/// Records of one kind live in one hash: listing a kind is one HVALS.
fn record_key(kind: &str) -> String {
    format!("garage:rec:{kind}")
}
const KEYS_INDEX: &str = "garage:keys";

impl RedisStore {
    /// Connects (and fails if Redis cannot be reached now); later outages are retried.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url)?;
        // Bounded waits: on the request path a store outage must turn into a quick 503, not a
        // request that hangs while the client library retries.
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2);
        let conn = ConnectionManager::new_with_config(client.clone(), manager_config).await?;
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let subscriber = tokio::spawn(forward_events(client, events.clone()));
        Ok(RedisStore {
            conn,
            events,
            incr_script: redis::Script::new(INCR_WITH_TTL),
            reserve_script: redis::Script::new(RESERVE_WITH_TTL),
            queue_push: redis::Script::new(QUEUE_PUSH),
            queue_lease: redis::Script::new(&format!("{NOW_MS}{REQUEUE_EXPIRED}{QUEUE_LEASE}")),
            queue_ack: redis::Script::new(QUEUE_ACK),
            queue_release: redis::Script::new(QUEUE_RELEASE),
            queue_counts: redis::Script::new(&format!("{NOW_MS}{QUEUE_COUNTS}")),
            queue_drop_waiting: redis::Script::new(&format!(
                "{NOW_MS}{REQUEUE_EXPIRED}{QUEUE_DROP_WAITING}"
            )),
            subscriber,
        })
    }
}

/// Relays the Redis channel into the local broadcast, reconnecting after a loss. A reconnect
/// means events may have been missed, so it announces `Resync` for caches to drop everything.
async fn forward_events(client: redis::Client, events: broadcast::Sender<StoreEvent>) {
    let mut backoff = Duration::from_millis(100);
    let mut first = true;
    loop {
        match client.get_async_pubsub().await {
            Ok(mut pubsub) => {
                if let Err(err) = pubsub.subscribe(EVENTS_CHANNEL).await {
                    tracing::warn!(error = %err, "cannot subscribe to store events");
                } else {
                    if !first {
                        let _ = events.send(StoreEvent::Resync);
                    }
                    first = false;
                    backoff = Duration::from_millis(100);
                    let mut messages = pubsub.on_message();
                    while let Some(msg) = messages.next().await {
                        let payload: Vec<u8> = msg.get_payload_bytes().to_vec();
                        match serde_json::from_slice::<StoreEvent>(&payload) {
                            Ok(event) => {
                                let _ = events.send(event);
                            }
                            Err(err) => tracing::warn!(error = %err, "unreadable store event"),
                        }
                    }
                    tracing::warn!("store event subscription lost; reconnecting");
                }
            }
            Err(err) => tracing::warn!(error = %err, "cannot reach store for events"),
        }
        tokio::time::sleep(backoff).await;
        // Reconnect quickly at first (a restart of Redis), then back off to a few seconds.
        backoff = (backoff * 2).min(Duration::from_secs(5));
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
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("SET");
        cmd.arg(kv_key(key)).arg(value);
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
        let mut conn = self.conn.clone();
        let ttl_ms = ttl.map_or(0, |ttl| ttl.as_millis().max(1) as u64);
        Ok(self
            .incr_script
            .key(kv_key(key))
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
        let mut conn = self.conn.clone();
        let _: () = conn.del(kv_key(key)).await?;
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
