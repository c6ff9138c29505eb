//! What the gateway offers a plugin: the imports of every `garage:policy` world.

use crate::{CandidateInfo, LogLevel, Market};

/// The gateway as a plugin sees it: key-value state, a clock, logging, the plugin's own
/// configuration, and for a router who its candidates are (WIT interfaces `kv`, `clock`, `log`,
/// `config` and `candidates`).
///
/// A plugin receives a `&dyn Host` in every call. Inside a component it is backed by the WIT
/// imports; in native unit tests it is a [`MemoryHost`](crate::testing::MemoryHost).
///
/// Key-value state is namespaced per plugin by the gateway and shared by every gateway replica;
/// an instance serves many calls but may be retired at any time, so this is the only state
/// that surely outlives a call.
///
/// Counters written by [`kv_incr`](Host::kv_incr) and [`kv_reserve`](Host::kv_reserve) read
/// back through [`kv_get`](Host::kv_get) as decimal ASCII (`b"42"`), as in Redis.
///
/// ```
/// use garage_plugin_sdk::{Host, LogLevel, testing::MemoryHost};
///
/// fn count_visit(host: &dyn Host) -> i64 {
///     let visits = host.kv_incr("visits", 1, None);
///     host.log(LogLevel::Debug, &format!("visit {visits}"));
///     visits
/// }
///
/// let host = MemoryHost::new();
/// assert_eq!(count_visit(&host), 1);
/// assert_eq!(count_visit(&host), 2);
/// assert_eq!(host.kv_get("visits"), Some(b"2".to_vec()));
/// ```
pub trait Host {
    /// The value of `key`, if set and not expired.
    fn kv_get(&self, key: &str) -> Option<Vec<u8>>;

    /// Sets `key`; with `ttl_ms` it expires by itself, without it never (replacing any TTL).
    fn kv_set(&self, key: &str, value: &[u8], ttl_ms: Option<u64>);

    /// Deletes `key`.
    fn kv_delete(&self, key: &str);

    /// Atomically adds `delta` to the integer at `key` (a missing key counts as 0) and returns
    /// the new value. The TTL applies only when the key is created: a window does not slide.
    fn kv_incr(&self, key: &str, delta: i64, ttl_ms: Option<u64>) -> i64;

    /// Atomically adds `amount` to the counter at `key` only if the result stays at or below
    /// `limit`; returns the new value when it did, `None` when it would have exceeded the
    /// limit. The TTL applies only when the key is created.
    ///
    /// This is how a limit reserves capacity across concurrent requests and replicas.
    fn kv_reserve(&self, key: &str, amount: i64, limit: i64, ttl_ms: Option<u64>) -> Option<i64>;

    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;

    /// Writes `message` into the gateway's log, tagged with the plugin.
    fn log(&self, level: LogLevel, message: &str);

    /// The plugin's configuration as JSON text (`{}` when the operator gave none). See
    /// [`config::parse`](crate::config::parse) to read it into a struct.
    fn config(&self) -> String;

    /// Whether [`config`](Host::config) answers the same for the life of this host, so that
    /// [`config::cached`](crate::config::cached) may parse it once: `true` inside a component
    /// (an instance belongs to one version of a plugin with one configuration), `false` by
    /// default.
    fn config_is_fixed(&self) -> bool {
        false
    }

    /// Who `candidates[index]` of the `route` call in progress is (WIT
    /// `candidates.describe`); `None` when `index` is out of range, and outside a `route` call.
    ///
    /// Candidates carry numbers only, so handing a router a hundred of them costs next to
    /// nothing; a router that needs a backend's id, operator or labels asks here, for the
    /// candidates it cares about.
    fn candidate(&self, index: u32) -> Option<CandidateInfo> {
        let _ = index;
        None
    }

    /// Supply and demand for `model` now (WIT `market.get`), during a meter's
    /// [`quote`](crate::Meter::quote) of that model; `None` otherwise.
    fn market(&self, model: &str) -> Option<Market> {
        let _ = model;
        None
    }
}
