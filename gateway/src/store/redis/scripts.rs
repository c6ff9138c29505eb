//! The Lua scripts of the Redis store. Each touches only the keys it is given, and the keys
//! of one call share a hash tag (see the layout in `mod.rs`), so each runs on one node of a
//! Redis Cluster.

/// INCRBY that sets the expiry only on a key that has none, so a rate-limit window starts when
/// its counter is created and does not slide with every hit.
pub(super) const INCR_WITH_TTL: &str = r"
local v = redis.call('INCRBY', KEYS[1], ARGV[1])
if tonumber(ARGV[2]) > 0 and redis.call('PTTL', KEYS[1]) == -1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return v
";

/// Adds to a counter only if the result stays within a limit (nil when it would not), with the
/// same create-time expiry as `INCR_WITH_TTL`.
pub(super) const RESERVE_WITH_TTL: &str = r"
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

/// A reservation that may take a slice for the replica's local lease (see `leases`).
/// KEYS: the counter. ARGV: need, limit, TTL ms (0: none), extra wanted, units to give back
/// first (a slice taken under another limit), the slice's share (1/N of what the call leaves).
/// Returns {granted (1 or 0), the counter's value, extra granted, the counter's PTTL}: the
/// counter grows by need + extra only if need fits within the limit, and the extra is at most
/// 1/N of what is left after the need, so the last units of a limit are taken one at a time.
pub(super) const RESERVE_SLICE: &str = r"
local raw = redis.call('GET', KEYS[1])
local current = tonumber(raw or '0')
if current == nil then
  return redis.error_reply('value is not an integer')
end
local give_back = tonumber(ARGV[5])
if raw and give_back > 0 then
  current = redis.call('DECRBY', KEYS[1], give_back)
end
local need = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
if current + need > limit then
  return {0, current, 0, redis.call('PTTL', KEYS[1])}
end
local extra = math.floor((limit - current - need) / tonumber(ARGV[6]))
extra = math.max(0, math.min(tonumber(ARGV[4]), extra))
local v = redis.call('INCRBY', KEYS[1], need + extra)
local pttl = redis.call('PTTL', KEYS[1])
if tonumber(ARGV[3]) > 0 and pttl == -1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  pttl = tonumber(ARGV[3])
end
return {1, v, extra, pttl}
";

/// Gives a replica's unspent slice back to its counter, if the counter still exists (an
/// expired one took the slice with it). KEYS: the counter. ARGV: units. Returns the counter.
pub(super) const RETURN_SLICE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.call('DECRBY', KEYS[1], ARGV[1])
end
return 0
";

/// Queues items not already there (waiting or leased); every payload is replaced.
/// KEYS: waiting, leased, items, seq. ARGV: id, payload, id, payload...
pub(super) const QUEUE_PUSH: &str = r"
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
pub(super) const NOW_MS: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
";

/// Puts items whose lease ran out back at the head of the queue (score 0).
pub(super) const REQUEUE_EXPIRED: &str = r"
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for _, id in ipairs(expired) do
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZADD', KEYS[1], 0, id)
end
";

/// KEYS: waiting, leased, items. ARGV: max, lease ms. Returns id, payload, id, payload...
pub(super) const QUEUE_LEASE: &str = r"
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
pub(super) const QUEUE_ACK: &str = r"
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
pub(super) const QUEUE_RELEASE: &str = r"
if redis.call('ZREM', KEYS[2], ARGV[1]) == 1 then
  redis.call('ZADD', KEYS[1], 0, ARGV[1])
  return 1
end
return 0
";

/// KEYS: leased. ARGV: id, lease ms. Returns 1 when the item was leased (and its lease had not
/// run out: then it is the queue's again).
pub(super) const QUEUE_EXTEND: &str = r"
local deadline = redis.call('ZSCORE', KEYS[1], ARGV[1])
if deadline and tonumber(deadline) > now then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
  return 1
end
return 0
";

/// KEYS: waiting, leased. Returns {waiting, leased}, an expired lease counting as waiting.
pub(super) const QUEUE_COUNTS: &str = r"
local expired = redis.call('ZCOUNT', KEYS[2], '-inf', now)
return {redis.call('ZCARD', KEYS[1]) + expired, redis.call('ZCARD', KEYS[2]) - expired}
";

/// KEYS: waiting, leased, items. Returns how many waiting items it removed.
pub(super) const QUEUE_DROP_WAITING: &str = r"
local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
for _, id in ipairs(ids) do
  redis.call('HDEL', KEYS[3], id)
end
redis.call('DEL', KEYS[1])
return #ids
";
