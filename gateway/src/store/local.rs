//! Replica-local key-value state: what a plugin keeps under `local:` keys (see
//! docs/plugins.md, "Replica-local state"). One [`LocalKv`] per loaded plugin version, in this
//! process's memory: never sent to the shared store, never seen by another replica, another
//! slot or another version, and gone with the replica. The operations and their expiry rules
//! are those of [`Store`](super::Store)'s kv (a TTL set on creation by `incr` and `reserve`, so
//! a window does not slide; expired keys removed as new ones are written), but synchronous: no
//! round trip, nothing to wait for.
//!
//! Memory is bounded: the keys and values held count against [`LOCAL_KV_BUDGET_BYTES`]. A write
//! that would pass it removes expired keys, then the keys that expire soonest (Redis's
//! `volatile-ttl`); when only keys without a TTL are left, the write fails.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::StoreError;
use super::memory::{HashMap as Map, counter, live};

/// What one loaded version's local keys may hold, keys and values together, each key counted
/// with [`ENTRY_OVERHEAD_BYTES`] more: about 140,000 of the default rate limiter's records of a
/// request in flight.
pub const LOCAL_KV_BUDGET_BYTES: usize = 16 << 20;
/// What the maps spend around each key, roughly: counted so that many tiny keys cannot hold
/// far more memory than the budget says.
const ENTRY_OVERHEAD_BYTES: usize = 96;
/// Expired keys removed per write, at most (as in the embedded store).
const EXPIRED_PER_WRITE: usize = 8;

/// One loaded version's replica-local keys.
pub struct LocalKv {
    budget: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Names shared with `expiries`.
    kv: Map<Arc<str>, (Vec<u8>, Option<Instant>)>,
    /// Keys with a TTL, soonest first.
    expiries: BTreeSet<(Instant, Arc<str>)>,
    /// What the keys and values held cost, by [`cost`].
    bytes: usize,
}

fn cost(key: &str, value: &[u8]) -> usize {
    key.len() + value.len() + ENTRY_OVERHEAD_BYTES
}

impl Default for LocalKv {
    fn default() -> Self {
        Self::with_budget(LOCAL_KV_BUDGET_BYTES)
    }
}

impl LocalKv {
    /// A store that holds at most `budget` bytes (by the count above).
    pub fn with_budget(budget: usize) -> Self {
        LocalKv {
            budget,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every update leaves the maps consistent before it can panic.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        let now = Instant::now();
        let mut inner = self.lock();
        match inner.kv.get(key) {
            Some(entry) if live(entry, now) => Some(entry.0.clone()),
            Some(_) => {
                inner.remove(key);
                None
            }
            None => None,
        }
    }

    pub fn set(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> Result<(), StoreError> {
        let expiry = ttl.map(|ttl| Instant::now() + ttl);
        self.lock().put(key, value.to_vec(), expiry, self.budget)
    }

    pub fn delete(&self, key: &str) {
        self.lock().remove(key);
    }

    /// `kv.incr`: adds `delta` (a missing key counts as 0); the TTL applies on creation only.
    pub fn incr(&self, key: &str, delta: i64, ttl: Option<Duration>) -> Result<i64, StoreError> {
        let mut inner = self.lock();
        let (value, expiry) = counter(&inner.kv, key, ttl)?;
        let next = value.saturating_add(delta);
        inner.put(key, next.to_string().into_bytes(), expiry, self.budget)?;
        Ok(next)
    }

    /// `kv.reserve`: adds `amount` only if the result stays at or below `limit`.
    pub fn reserve(
        &self,
        key: &str,
        amount: i64,
        limit: i64,
        ttl: Option<Duration>,
    ) -> Result<Option<i64>, StoreError> {
        let mut inner = self.lock();
        let (value, expiry) = counter(&inner.kv, key, ttl)?;
        let next = value.saturating_add(amount);
        if next > limit {
            return Ok(None);
        }
        inner.put(key, next.to_string().into_bytes(), expiry, self.budget)?;
        Ok(Some(next))
    }

    /// Keys held (expired ones not yet removed included).
    pub fn len(&self) -> usize {
        self.lock().kv.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What the keys held cost against the budget.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

impl Inner {
    fn remove(&mut self, key: &str) {
        if let Some((name, (value, expiry))) = self.kv.remove_entry(key) {
            self.bytes -= cost(&name, &value);
            if let Some(at) = expiry {
                self.expiries.remove(&(at, name));
            }
        }
    }

    /// Removes the key that expires first; false when no key has a TTL.
    fn remove_soonest(&mut self) -> bool {
        let Some((_, name)) = self.expiries.pop_first() else {
            return false;
        };
        if let Some((value, _)) = self.kv.remove(&name) {
            self.bytes -= cost(&name, &value);
        }
        true
    }

    fn put(
        &mut self,
        key: &str,
        value: Vec<u8>,
        expiry: Option<Instant>,
        budget: usize,
    ) -> Result<(), StoreError> {
        let now = Instant::now();
        for _ in 0..EXPIRED_PER_WRITE {
            match self.expiries.first() {
                Some((at, _)) if *at <= now => {}
                _ => break,
            }
            self.remove_soonest();
        }
        let before = self.kv.get(key).map_or(0, |(old, _)| cost(key, old));
        let after = cost(key, &value);
        if after > budget {
            return Err(StoreError::Backend(format!(
                "local key {key} of {after} bytes does not fit replica-local state ({budget} bytes)"
            )));
        }
        // Make room: expired keys first (they are first in `expiries`), then the soonest to
        // expire, never the key being written.
        while self.bytes - before + after > budget {
            if self
                .expiries
                .first()
                .is_some_and(|(_, name)| &**name == key)
            {
                // The key itself is the soonest: remove it and write it afresh.
                self.remove(key);
                return self.put(key, value, expiry, budget);
            }
            if !self.remove_soonest() {
                return Err(StoreError::Backend(format!(
                    "replica-local state is full ({budget} bytes of keys without a TTL)"
                )));
            }
        }
        self.remove(key);
        let name: Arc<str> = Arc::from(key);
        if let Some(at) = expiry {
            self.expiries.insert((at, Arc::clone(&name)));
        }
        self.bytes += after;
        self.kv.insert(name, (value, expiry));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Option<Duration> = Some(Duration::from_secs(3600));

    #[test]
    fn the_kv_operations_keep_the_shared_stores_rules() {
        let kv = LocalKv::default();
        assert_eq!(kv.get("a"), None);
        kv.set("a", b"x", None).unwrap();
        assert_eq!(kv.get("a").as_deref(), Some(&b"x"[..]));
        assert_eq!(kv.incr("n", 5, HOUR).unwrap(), 5);
        assert_eq!(kv.incr("n", -2, None).unwrap(), 3);
        assert_eq!(kv.reserve("n", 7, 10, None).unwrap(), Some(10));
        assert_eq!(
            kv.reserve("n", 1, 10, None).unwrap(),
            None,
            "past the limit"
        );
        assert_eq!(kv.get("n").as_deref(), Some(&b"10"[..]));
        assert!(kv.incr("a", 1, None).is_err(), "not an integer");
        kv.delete("a");
        kv.delete("n");
        assert!(kv.is_empty());
        assert_eq!(kv.bytes(), 0);
    }

    #[test]
    fn keys_expire_and_a_counters_ttl_is_set_on_creation_only() {
        let kv = LocalKv::default();
        kv.set("brief", b"1", Some(Duration::from_millis(5)))
            .unwrap();
        assert_eq!(
            kv.incr("window", 1, Some(Duration::from_millis(5)))
                .unwrap(),
            1
        );
        // A later incr with a long TTL does not slide the window.
        assert_eq!(kv.incr("window", 1, HOUR).unwrap(), 2);
        std::thread::sleep(Duration::from_millis(10));
        assert_eq!(kv.get("brief"), None);
        assert_eq!(kv.incr("window", 1, HOUR).unwrap(), 1, "a new window");
        // Expired keys leave memory as others are written.
        for i in 0..100 {
            kv.set(&format!("e{i}"), b"1", Some(Duration::from_millis(1)))
                .unwrap();
        }
        std::thread::sleep(Duration::from_millis(5));
        for i in 0..20 {
            kv.set(&format!("k{i}"), b"1", None).unwrap();
        }
        assert_eq!(kv.len(), 21, "the window and the 20 kept");
    }

    #[test]
    fn past_the_budget_the_soonest_to_expire_go_and_without_ttls_writes_fail() {
        let entry = cost("k00", b"v");
        let kv = LocalKv::with_budget(entry * 10);
        for i in 0..10 {
            let ttl = Duration::from_secs(100 + i);
            kv.set(&format!("k{i:02}"), b"v", Some(ttl)).unwrap();
        }
        assert_eq!(kv.bytes(), entry * 10);
        // Full: the key expiring first (k00) makes room.
        kv.set("k10", b"v", HOUR).unwrap();
        assert_eq!(kv.get("k00"), None);
        assert_eq!(kv.len(), 10);
        // Rewriting a key that is there needs no room.
        kv.set("k05", b"w", HOUR).unwrap();
        assert_eq!(kv.len(), 10);
        assert!(kv.get("k01").is_some());
        // Keys without a TTL are never evicted: once only they are left, writes fail.
        let kv = LocalKv::with_budget(entry * 3);
        for i in 0..3 {
            kv.set(&format!("p{i:02}"), b"v", None).unwrap();
        }
        let full = kv.set("p03", b"v", HOUR).unwrap_err().to_string();
        assert!(full.contains("replica-local state is full"), "{full}");
        assert_eq!(kv.len(), 3);
        assert!(kv.incr("p04", 1, None).is_err());
        // A value larger than the whole budget is refused, and nothing is evicted for it.
        let kv = LocalKv::with_budget(1000);
        kv.set("a", b"1", HOUR).unwrap();
        assert!(kv.set("big", &[0; 1000], HOUR).is_err());
        assert_eq!(kv.get("a").as_deref(), Some(&b"1"[..]));
        assert_eq!(kv.bytes(), cost("a", b"1"));
    }
}
