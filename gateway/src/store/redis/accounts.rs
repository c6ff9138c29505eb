//! Accounts' money on Redis: the steps of `store::accounts::Book` as Lua scripts, each atomic.
//!
//! An account's keys share the hash tag `{acct:<id>}` (one slot of a Redis Cluster):
//! `money` (a hash: `balance`, `reserved`, `spent`), `holds` (a hash: request id → amount),
//! `hold_expiry` (a sorted set: request id by expiry, Unix ms of the caller's clock),
//! `settled` (a sorted set: settled request ids by until when they are remembered),
//! `credits` (a list: `<balance after> <entry>`), and `period:<name>` (counters).
//!
//! Lua numbers are doubles: amounts stay exact below 2^53 micro-credits (the gateway keeps
//! balances and charges far below, see `accounts::MAX_MONEY`), and a number computed in a
//! script goes back to Redis through `int()` (`%d`), never as Lua's own text for it (which is
//! `1e+15` for large values, and not an integer to `HINCRBY`).

use redis::Script;

use super::Connection;
use crate::store::{
    CreditOutcome, CreditRecord, HoldOutcome, HoldRequest, Money, SettleOutcome, SettleRequest,
    StoreError,
};

/// The keys of one account, all in the account's hash slot.
fn key(account: &str, part: &str) -> String {
    format!("garage:{{acct:{account}}}:{part}")
}

fn period_key(account: &str, period: &str) -> String {
    key(account, &format!("period:{period}"))
}

/// Helpers every script starts with; `now` is ARGV[1] in the scripts that expire holds.
const PRELUDE: &str = r"
local function int(n) return string.format('%d', n) end
";

/// Releases the holds that ran out. KEYS[1..3]: money, holds, hold_expiry; needs `now`.
const EXPIRE_HOLDS: &str = r"
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
for _, id in ipairs(expired) do
  local held = redis.call('HGET', KEYS[2], id)
  redis.call('HDEL', KEYS[2], id)
  redis.call('ZREM', KEYS[3], id)
  if held then
    redis.call('HINCRBY', KEYS[1], 'reserved', int(-tonumber(held)))
  end
end
";

/// KEYS: money, holds, hold_expiry, then each period counter. ARGV: now, request id, amount,
/// expires at, then each period's cap. Returns {1, available after} when held, {0, available}
/// when the balance does not cover it, {2, available, period index (0-based), spent, reserved}
/// when a period would pass its cap.
const HOLD: &str = r"
local now = tonumber(ARGV[1])
{EXPIRE_HOLDS}
local m = redis.call('HMGET', KEYS[1], 'balance', 'reserved')
local balance = tonumber(m[1] or '0')
local reserved = tonumber(m[2] or '0')
local available = balance - reserved
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 then
  return {1, available}
end
local amount = tonumber(ARGV[3])
local covered
if amount > 0 then covered = amount <= available else covered = available > 0 end
if not covered then
  return {0, available}
end
for i = 4, #KEYS do
  local spent = tonumber(redis.call('GET', KEYS[i]) or '0')
  local cap = tonumber(ARGV[i + 1])
  local committed = spent + reserved
  local within
  if amount > 0 then within = committed + amount <= cap else within = committed < cap end
  if not within then
    return {2, available, i - 4, spent, reserved}
  end
end
if amount > 0 then
  redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[2])
  redis.call('HINCRBY', KEYS[1], 'reserved', ARGV[3])
end
return {1, available - amount}
";

/// KEYS: money, holds, hold_expiry, settled, then each period counter. ARGV: now, request id,
/// charge, remember until, then each period counter's time to live (ms). Returns {0} when
/// settled already, else {1, balance after, each period's spend after}.
const SETTLE: &str = r"
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
if redis.call('ZSCORE', KEYS[4], ARGV[2]) then
  return {0}
end
local held = redis.call('HGET', KEYS[2], ARGV[2])
if held then
  redis.call('HDEL', KEYS[2], ARGV[2])
  redis.call('ZREM', KEYS[3], ARGV[2])
  redis.call('HINCRBY', KEYS[1], 'reserved', int(-tonumber(held)))
end
local balance = redis.call('HINCRBY', KEYS[1], 'balance', int(-tonumber(ARGV[3])))
redis.call('HINCRBY', KEYS[1], 'spent', ARGV[3])
local out = {1, balance}
for i = 5, #KEYS do
  out[#out + 1] = redis.call('INCRBY', KEYS[i], ARGV[3])
  if redis.call('PTTL', KEYS[i]) == -1 then
    redis.call('PEXPIRE', KEYS[i], ARGV[i])
  end
end
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[2])
return out
";

/// KEYS: money, holds, hold_expiry. ARGV: request id. Returns 1 when it held something.
const RELEASE: &str = r"
local held = redis.call('HGET', KEYS[2], ARGV[1])
if not held then
  return 0
end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HINCRBY', KEYS[1], 'reserved', int(-tonumber(held)))
return 1
";

/// KEYS: money, credits. ARGV: delta, min balance, max balance, entry. Returns {1, balance
/// after} when credited, {0, balance} when refused.
const CREDIT: &str = r"
local balance = tonumber(redis.call('HGET', KEYS[1], 'balance') or '0')
local delta = tonumber(ARGV[1])
local after = balance + delta
if after > tonumber(ARGV[3]) or (delta < 0 and after < tonumber(ARGV[2])) then
  return {0, balance}
end
local b = redis.call('HINCRBY', KEYS[1], 'balance', ARGV[1])
redis.call('RPUSH', KEYS[2], int(b) .. ' ' .. ARGV[4])
return {1, b}
";

/// KEYS: money, holds, hold_expiry, then each period counter. ARGV: now. Returns {balance,
/// reserved, spent, holds, each period's spend}.
const MONEY: &str = r"
local now = tonumber(ARGV[1])
{EXPIRE_HOLDS}
local m = redis.call('HMGET', KEYS[1], 'balance', 'reserved', 'spent')
local out = {tonumber(m[1] or '0'), tonumber(m[2] or '0'), tonumber(m[3] or '0'),
  redis.call('HLEN', KEYS[2])}
for i = 4, #KEYS do
  out[#out + 1] = tonumber(redis.call('GET', KEYS[i]) or '0')
end
return out
";

/// The scripts, loaded once per store.
pub(super) struct Scripts {
    hold: Script,
    settle: Script,
    release: Script,
    credit: Script,
    money: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        let with = |body: &str| {
            Script::new(&format!(
                "{PRELUDE}{}",
                body.replace("{EXPIRE_HOLDS}", EXPIRE_HOLDS)
            ))
        };
        Scripts {
            hold: with(HOLD),
            settle: with(SETTLE),
            release: with(RELEASE),
            credit: with(CREDIT),
            money: with(MONEY),
        }
    }
}

/// The three keys every hold script starts with.
fn hold_keys(account: &str) -> [String; 3] {
    [
        key(account, "money"),
        key(account, "holds"),
        key(account, "hold_expiry"),
    ]
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("unexpected answer from an account script: {what}"))
}

pub(super) async fn hold(
    conn: &Connection,
    scripts: &Scripts,
    hold: &HoldRequest<'_>,
) -> Result<HoldOutcome, StoreError> {
    let mut call = scripts.hold.prepare_invoke();
    call.key(&hold_keys(hold.account)[..]);
    for (period, _) in hold.caps {
        call.key(period_key(hold.account, period));
    }
    call.arg(hold.now_ms)
        .arg(hold.request_id)
        .arg(hold.amount.max(0))
        .arg(hold.expires_at_ms);
    for (_, cap) in hold.caps {
        call.arg(*cap);
    }
    let mut conn = conn.clone();
    let answer: Vec<i64> = call.invoke_async(&mut conn).await?;
    match answer.as_slice() {
        [1, available] => Ok(HoldOutcome::Held {
            available: *available,
        }),
        [0, available] => Ok(HoldOutcome::Insufficient {
            available: *available,
        }),
        [2, _, index, spent, reserved] => Ok(HoldOutcome::OverCap {
            index: usize::try_from(*index).map_err(|_| corrupt("a period index"))?,
            spent: *spent,
            reserved: *reserved,
        }),
        _ => Err(corrupt("hold")),
    }
}

pub(super) async fn settle(
    conn: &Connection,
    scripts: &Scripts,
    settle: &SettleRequest<'_>,
) -> Result<SettleOutcome, StoreError> {
    let mut call = scripts.settle.prepare_invoke();
    call.key(&hold_keys(settle.account)[..])
        .key(key(settle.account, "settled"));
    for (period, _) in settle.periods {
        call.key(period_key(settle.account, period));
    }
    call.arg(settle.now_ms)
        .arg(settle.request_id)
        .arg(settle.charge.max(0))
        .arg(settle.remember_until_ms);
    for (_, until) in settle.periods {
        call.arg(until.saturating_sub(settle.now_ms).max(1));
    }
    let mut conn = conn.clone();
    let answer: Vec<i64> = call.invoke_async(&mut conn).await?;
    match answer.as_slice() {
        [0] => Ok(SettleOutcome::AlreadySettled),
        [1, balance, periods @ ..] if periods.len() == settle.periods.len() => {
            Ok(SettleOutcome::Settled {
                balance: *balance,
                periods: periods.to_vec(),
            })
        }
        _ => Err(corrupt("settle")),
    }
}

pub(super) async fn release(
    conn: &Connection,
    scripts: &Scripts,
    account: &str,
    request_id: &str,
) -> Result<bool, StoreError> {
    let mut conn = conn.clone();
    let released: i64 = scripts
        .release
        .key(&hold_keys(account)[..])
        .arg(request_id)
        .invoke_async(&mut conn)
        .await?;
    Ok(released == 1)
}

pub(super) async fn credit(
    conn: &Connection,
    scripts: &Scripts,
    account: &str,
    (delta, min_balance, max_balance): (i64, i64, i64),
    entry: &[u8],
) -> Result<CreditOutcome, StoreError> {
    let mut conn = conn.clone();
    let answer: Vec<i64> = scripts
        .credit
        .key(key(account, "money"))
        .key(key(account, "credits"))
        .arg(delta)
        .arg(min_balance)
        .arg(max_balance)
        .arg(entry)
        .invoke_async(&mut conn)
        .await?;
    match answer.as_slice() {
        [1, balance] => Ok(CreditOutcome::Credited { balance: *balance }),
        [0, balance] => Ok(CreditOutcome::Refused { balance: *balance }),
        _ => Err(corrupt("credit")),
    }
}

pub(super) async fn credits(
    conn: &Connection,
    account: &str,
) -> Result<Vec<CreditRecord>, StoreError> {
    let mut conn = conn.clone();
    let items: Vec<Vec<u8>> = redis::cmd("LRANGE")
        .arg(key(account, "credits"))
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await?;
    items
        .into_iter()
        .map(|item| {
            let space = item
                .iter()
                .position(|b| *b == b' ')
                .ok_or_else(|| corrupt("a credit ledger entry"))?;
            let balance_after = std::str::from_utf8(&item[..space])
                .ok()
                .and_then(|text| text.parse().ok())
                .ok_or_else(|| corrupt("a credit ledger balance"))?;
            Ok(CreditRecord {
                balance_after,
                entry: item[space + 1..].to_vec(),
            })
        })
        .collect()
}

pub(super) async fn money(
    conn: &Connection,
    scripts: &Scripts,
    account: &str,
    now_ms: u64,
    periods: &[String],
) -> Result<Money, StoreError> {
    let mut call = scripts.money.prepare_invoke();
    call.key(&hold_keys(account)[..]);
    for period in periods {
        call.key(period_key(account, period));
    }
    call.arg(now_ms);
    let mut conn = conn.clone();
    let answer: Vec<i64> = call.invoke_async(&mut conn).await?;
    match answer.as_slice() {
        [balance, reserved, spent, holds, spends @ ..] if spends.len() == periods.len() => {
            Ok(Money {
                balance: *balance,
                reserved: *reserved,
                spent: *spent,
                holds: u64::try_from(*holds).unwrap_or(0),
                periods: spends.to_vec(),
            })
        }
        _ => Err(corrupt("money")),
    }
}
