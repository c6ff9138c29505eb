//! Native unit testing of plugins: [`MemoryHost`], a [`Host`] kept in memory.
//!
//! A plugin's logic is plain Rust behind the [`Host`] trait, so its tests run with `cargo test`
//! on the development machine, with no WebAssembly toolchain or runtime.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;

use crate::{CandidateInfo, Host, LogLevel, Market};

/// A [`Host`] for tests: key-value state in memory with TTLs that follow a clock the test
/// sets, captured log lines, and a configuration string.
///
/// It follows the gateway's semantics: `kv_incr` and `kv_reserve` set a TTL only when they
/// create the key, counters are stored as decimal ASCII and saturate at the ends of `i64`.
/// Using a non-integer value as a counter panics (in the gateway, the plugin call fails).
///
/// ```
/// use garage_plugin_sdk::{Host, LogLevel, testing::MemoryHost};
///
/// let host = MemoryHost::with_config(r#"{"limit": 2}"#);
/// assert_eq!(host.config(), r#"{"limit": 2}"#);
///
/// // A counter in a one-second window.
/// assert_eq!(host.kv_reserve("window", 1, 2, Some(1_000)), Some(1));
/// assert_eq!(host.kv_reserve("window", 1, 2, Some(1_000)), Some(2));
/// assert_eq!(host.kv_reserve("window", 1, 2, Some(1_000)), None);
///
/// // The window expires when the clock passes it.
/// host.advance_ms(1_000);
/// assert_eq!(host.kv_get("window"), None);
/// assert_eq!(host.kv_reserve("window", 1, 2, Some(1_000)), Some(1));
///
/// host.log(LogLevel::Warn, "slow rig");
/// assert!(host.logged(LogLevel::Warn, "slow"));
/// ```
#[derive(Debug)]
pub struct MemoryHost {
    entries: RefCell<BTreeMap<String, Entry>>,
    now_ms: Cell<u64>,
    logs: RefCell<Vec<(LogLevel, String)>>,
    config: RefCell<String>,
    candidates: RefCell<Vec<CandidateInfo>>,
    market: RefCell<Option<Market>>,
}

#[derive(Debug, Clone)]
struct Entry {
    value: Vec<u8>,
    /// Absolute expiry, milliseconds since the epoch on the host's clock.
    expires_at_ms: Option<u64>,
}

impl Entry {
    fn live_at(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_none_or(|at| now_ms < at)
    }
}

impl Default for MemoryHost {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryHost {
    /// Where a new host's clock starts: 2023-11-14T22:13:20Z, a realistic epoch time rather
    /// than 0, so window arithmetic in tests is not accidentally aligned.
    pub const DEFAULT_NOW_MS: u64 = 1_700_000_000_000;

    /// An empty store, the clock at [`DEFAULT_NOW_MS`](Self::DEFAULT_NOW_MS), config `{}`.
    pub fn new() -> Self {
        Self::with_config("{}")
    }

    /// An empty store with this plugin configuration (JSON text).
    pub fn with_config(config: impl Into<String>) -> Self {
        Self {
            entries: RefCell::default(),
            now_ms: Cell::new(Self::DEFAULT_NOW_MS),
            logs: RefCell::default(),
            config: RefCell::new(config.into()),
            candidates: RefCell::default(),
            market: RefCell::default(),
        }
    }

    /// Says who the candidates of the next `route` calls are, index for index, as the
    /// gateway does for a call ([`Host::candidate`]).
    ///
    /// ```
    /// use garage_plugin_sdk::{CandidateInfo, Host, testing::MemoryHost};
    ///
    /// let host = MemoryHost::new();
    /// host.set_candidates(vec![CandidateInfo::new("rig-a")]);
    /// assert_eq!(host.candidate(0).map(|c| c.id), Some("rig-a".to_owned()));
    /// assert_eq!(host.candidate(1), None);
    /// ```
    pub fn set_candidates(&self, infos: Vec<CandidateInfo>) {
        *self.candidates.borrow_mut() = infos;
    }

    /// Sets the market [`Host::market`] answers for its model, as the gateway does during a
    /// meter's `quote`.
    pub fn set_market(&self, market: Market) {
        *self.market.borrow_mut() = Some(market);
    }

    /// Replaces the plugin configuration.
    pub fn set_config(&self, config: impl Into<String>) {
        *self.config.borrow_mut() = config.into();
    }

    /// Sets the clock.
    pub fn set_now_ms(&self, now_ms: u64) {
        self.now_ms.set(now_ms);
    }

    /// Moves the clock forward (keys whose TTL runs out expire).
    pub fn advance_ms(&self, ms: u64) {
        self.now_ms.set(self.now_ms.get().saturating_add(ms));
    }

    /// Every line logged so far, oldest first.
    pub fn logs(&self) -> Vec<(LogLevel, String)> {
        self.logs.borrow().clone()
    }

    /// Whether a line at `level` containing `fragment` was logged.
    pub fn logged(&self, level: LogLevel, fragment: &str) -> bool {
        self.logs
            .borrow()
            .iter()
            .any(|(l, message)| *l == level && message.contains(fragment))
    }

    /// The keys currently set (expired ones left out), sorted.
    pub fn keys(&self) -> Vec<String> {
        let now = self.now_ms.get();
        self.entries
            .borrow()
            .iter()
            .filter(|(_, entry)| entry.live_at(now))
            .map(|(key, _)| key.clone())
            .collect()
    }

    /// The counter at `key`, if set, not expired and an integer.
    pub fn counter(&self, key: &str) -> Option<i64> {
        self.kv_get(key)
            .and_then(|bytes| std::str::from_utf8(&bytes).ok()?.parse().ok())
    }

    /// Milliseconds until `key` expires; `None` when it is missing or never expires.
    pub fn ttl_ms(&self, key: &str) -> Option<u64> {
        let now = self.now_ms.get();
        let entries = self.entries.borrow();
        let entry = entries.get(key).filter(|e| e.live_at(now))?;
        entry.expires_at_ms.map(|at| at - now)
    }

    fn expires_at(&self, ttl_ms: Option<u64>) -> Option<u64> {
        ttl_ms.map(|ttl| self.now_ms.get().saturating_add(ttl))
    }

    /// Reads the live counter at `key` for an update; `None` when missing or expired.
    fn live_counter(&self, key: &str) -> Option<i64> {
        let now = self.now_ms.get();
        let entries = self.entries.borrow();
        let entry = entries.get(key).filter(|e| e.live_at(now))?;
        let parsed = std::str::from_utf8(&entry.value)
            .ok()
            .and_then(|text| text.parse::<i64>().ok());
        match parsed {
            Some(value) => Some(value),
            None => panic!("MemoryHost: key {key:?} holds a value that is not an integer counter"),
        }
    }

    /// Stores `value` at `key`, keeping the key's expiry, or giving it `ttl_ms` when it is new.
    fn store_counter(&self, key: &str, value: i64, existed: bool, ttl_ms: Option<u64>) {
        let expires_at_ms = if existed {
            self.entries.borrow().get(key).and_then(|e| e.expires_at_ms)
        } else {
            self.expires_at(ttl_ms)
        };
        self.entries.borrow_mut().insert(
            key.to_owned(),
            Entry {
                value: value.to_string().into_bytes(),
                expires_at_ms,
            },
        );
    }
}

impl Host for MemoryHost {
    fn kv_get(&self, key: &str) -> Option<Vec<u8>> {
        let now = self.now_ms.get();
        self.entries
            .borrow()
            .get(key)
            .filter(|entry| entry.live_at(now))
            .map(|entry| entry.value.clone())
    }

    fn kv_set(&self, key: &str, value: &[u8], ttl_ms: Option<u64>) {
        let expires_at_ms = self.expires_at(ttl_ms);
        self.entries.borrow_mut().insert(
            key.to_owned(),
            Entry {
                value: value.to_vec(),
                expires_at_ms,
            },
        );
    }

    fn kv_delete(&self, key: &str) {
        self.entries.borrow_mut().remove(key);
    }

    fn kv_incr(&self, key: &str, delta: i64, ttl_ms: Option<u64>) -> i64 {
        let current = self.live_counter(key);
        let value = current.unwrap_or(0).saturating_add(delta);
        self.store_counter(key, value, current.is_some(), ttl_ms);
        value
    }

    fn kv_reserve(&self, key: &str, amount: i64, limit: i64, ttl_ms: Option<u64>) -> Option<i64> {
        let current = self.live_counter(key);
        let value = current.unwrap_or(0).saturating_add(amount);
        if value > limit {
            return None;
        }
        self.store_counter(key, value, current.is_some(), ttl_ms);
        Some(value)
    }

    fn now_ms(&self) -> u64 {
        self.now_ms.get()
    }

    fn log(&self, level: LogLevel, message: &str) {
        self.logs.borrow_mut().push((level, message.to_owned()));
    }

    fn config(&self) -> String {
        self.config.borrow().clone()
    }

    fn candidate(&self, index: u32) -> Option<CandidateInfo> {
        self.candidates.borrow().get(index as usize).cloned()
    }

    fn market(&self, model: &str) -> Option<Market> {
        self.market.borrow().clone().filter(|m| m.model == model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_replaces_the_ttl_and_get_hides_expired_keys() {
        let host = MemoryHost::new();
        host.kv_set("a", b"1", Some(10));
        assert_eq!(host.ttl_ms("a"), Some(10));
        host.kv_set("a", b"2", None);
        assert_eq!(host.ttl_ms("a"), None);
        host.advance_ms(100);
        assert_eq!(host.kv_get("a"), Some(b"2".to_vec()));

        host.kv_set("b", b"x", Some(5));
        host.advance_ms(5);
        assert_eq!(host.kv_get("b"), None);
        assert_eq!(host.keys(), vec!["a".to_owned()]);
    }

    #[test]
    fn incr_sets_the_ttl_only_when_it_creates_the_key() {
        let host = MemoryHost::new();
        assert_eq!(host.kv_incr("n", 5, Some(100)), 5);
        host.advance_ms(60);
        assert_eq!(host.kv_incr("n", -2, Some(100)), 3);
        assert_eq!(host.ttl_ms("n"), Some(40), "the window does not slide");
        host.advance_ms(40);
        assert_eq!(
            host.kv_incr("n", 1, None),
            1,
            "an expired counter starts again at 0"
        );
        assert_eq!(host.ttl_ms("n"), None);
    }

    #[test]
    fn reserve_stops_at_the_limit_and_creates_nothing_when_refused() {
        let host = MemoryHost::new();
        assert_eq!(host.kv_reserve("r", 10, 5, Some(100)), None);
        assert!(host.keys().is_empty());
        assert_eq!(host.kv_reserve("r", 5, 5, Some(100)), Some(5));
        assert_eq!(host.kv_reserve("r", 1, 5, Some(100)), None);
        assert_eq!(host.kv_reserve("r", -2, 5, Some(100)), Some(3));
        assert_eq!(host.counter("r"), Some(3));
    }

    #[test]
    #[should_panic(expected = "not an integer counter")]
    fn incr_on_a_non_integer_panics() {
        let host = MemoryHost::new();
        host.kv_set("s", b"text", None);
        host.kv_incr("s", 1, None);
    }

    #[test]
    fn delete_and_logs() {
        let host = MemoryHost::new();
        host.kv_set("k", b"v", None);
        host.kv_delete("k");
        assert_eq!(host.kv_get("k"), None);
        host.log(LogLevel::Info, "hello");
        assert_eq!(host.logs(), vec![(LogLevel::Info, "hello".to_owned())]);
        assert!(!host.logged(LogLevel::Error, "hello"));
    }
}
