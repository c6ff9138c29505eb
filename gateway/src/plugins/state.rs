//! What a plugin's instance can reach: the per-store state behind every import.
//!
//! One [`HostState`] lives in each wasmtime `Store` (one per call, or per warm instance). It
//! holds the plugin's shared context (slot, namespace, configuration, the gateway's store), the
//! memory cap, an empty WASI context, and the bookkeeping of the call in progress: when it
//! started, how long it waited on the host, and whether the host or a limit caused a trap.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::Slot;
use super::types::CandidateInfo;
use crate::store::local::LocalKv;
use crate::store::{Store, StoreError};

/// Longest key a plugin may use, before namespacing.
const MAX_KV_KEY_BYTES: usize = 512;
/// Largest value a plugin may store: state is for counters and small documents, and every
/// replica shares it through the store.
const MAX_KV_VALUE_BYTES: usize = 1 << 20;
/// Store operations one call may make. A policy needs a handful; a guest looping on the store
/// would hammer Redis while its deadline (which excludes host time) barely moves.
const MAX_KV_CALLS_PER_CALL: u32 = 1000;
/// Keys under this prefix are this replica's own, kept in the loaded version's memory instead of
/// the shared store (see [`LocalKv`] and docs/plugins.md, "Replica-local state").
pub const LOCAL_KEY_PREFIX: &str = "local:";
/// Log lines one call may write; the rest are dropped (and counted).
const MAX_LOG_LINES_PER_CALL: u32 = 32;
/// Log lines one plugin version may write per second across all its calls.
const MAX_LOG_LINES_PER_SECOND: u32 = 100;
/// Longest log message kept; longer ones are cut (at a character boundary).
const MAX_LOG_MESSAGE_BYTES: usize = 2048;
/// Wall-clock bound on a call, whatever it waited on, as a multiple of its deadline plus a
/// constant: the deadline itself excludes host waits and scheduling delays (see
/// [`HostState::deadline_passed`]), and this keeps a call that mostly waits from running forever.
const WALL_CLOCK_FACTOR: u32 = 20;
const WALL_CLOCK_SLACK: Duration = Duration::from_secs(5);
/// Calls with a deadline above this yield to the executor every epoch tick, so a long call (a
/// meter with a 1 s deadline) never holds an async worker for more than a tick. Shorter calls
/// (the hot path) run to their end or deadline without being rescheduled: blocking a worker for
/// a few milliseconds at most costs less than a trip through the run queue.
const YIELD_ABOVE: Duration = Duration::from_millis(10);

/// What every instance of one plugin version shares.
pub(crate) struct PluginContext {
    pub slot: Slot,
    /// Short form of the version's sha256, for logs.
    pub version: String,
    /// Prefix of every key this plugin touches in the store (`plugin:<slot>:`). Versions of a
    /// slot share it, so an upgrade keeps the counters of the version it replaces.
    namespace: String,
    config_json: String,
    store: Arc<dyn Store>,
    /// The `local:` keys of this loaded version on this replica.
    local: LocalKv,
    log_budget: LogBudget,
    /// What `clock.now-ms` answers, when set: a replay's recorded time of each call.
    clock: Option<Arc<AtomicU64>>,
}

impl PluginContext {
    pub fn new(slot: Slot, sha256: &str, config_json: String, store: Arc<dyn Store>) -> Self {
        PluginContext {
            slot,
            version: sha256.chars().take(12).collect(),
            namespace: kv_namespace(slot),
            config_json,
            store,
            local: LocalKv::default(),
            log_budget: LogBudget::default(),
            clock: None,
        }
    }

    /// The same context with a clock that reads `clock` (Unix ms) instead of the time: a
    /// replay sets it to each recorded call's time, so windows and periods fall as they did.
    pub fn with_clock(mut self, clock: Arc<AtomicU64>) -> Self {
        self.clock = Some(clock);
        self
    }
}

/// The store prefix of a slot's plugin state.
pub fn kv_namespace(slot: Slot) -> String {
    crate::store::keyspace::plugin_namespace(slot.as_str())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

/// The per-store state.
pub(crate) struct HostState {
    ctx: Arc<PluginContext>,
    limits: CallLimits,
    wasi: WasiCtx,
    table: ResourceTable,
    call: CallClock,
    /// Set when a host operation (the store) failed and trapped the guest: the fault is the
    /// host's, not the plugin's, and does not count towards a rollback.
    host_error: Option<String>,
    kv_calls: u32,
    log_lines: u32,
    /// The first message the call logged at error level: how a plugin says its configuration
    /// is unusable (see `PluginHost::upload`'s configuration check).
    error_logged: Option<String>,
    /// Who the candidates of the `route` call in progress are, for `candidates.describe`.
    candidates: Option<Arc<[Arc<CandidateInfo>]>>,
    /// The market of the model of the `quote` call in progress, for `market.get`.
    market: Option<crate::plugins::Market>,
}

impl HostState {
    pub fn new(ctx: Arc<PluginContext>, memory_cap_bytes: usize) -> Self {
        HostState {
            ctx,
            limits: CallLimits::new(memory_cap_bytes),
            wasi: empty_wasi(),
            table: ResourceTable::new(),
            call: CallClock::new(Duration::ZERO, Arc::new(AtomicU64::new(0))),
            host_error: None,
            kv_calls: 0,
            log_lines: 0,
            error_logged: None,
            candidates: None,
            market: None,
        }
    }

    /// Sets who the candidates of the coming `route` call are (`None` after it): the call's
    /// own list, shared, not copied.
    pub fn set_candidates(&mut self, infos: Option<&Arc<[Arc<CandidateInfo>]>>) {
        self.candidates = infos.cloned();
    }

    /// Sets the market of the coming `quote` call (`None` after it).
    pub fn set_market(&mut self, market: Option<crate::plugins::Market>) {
        self.market = market;
    }

    /// The market of the `quote` call in progress.
    pub fn market(&self) -> Option<&crate::plugins::Market> {
        self.market.as_ref()
    }

    /// Who `candidates[index]` of the `route` call in progress is.
    pub fn candidate(&self, index: u32) -> Option<&CandidateInfo> {
        self.candidates
            .as_ref()?
            .get(index as usize)
            .map(|info| &**info)
    }

    pub fn limiter(&mut self) -> &mut dyn ResourceLimiter {
        &mut self.limits
    }

    /// Starts the bookkeeping of a call that may run for `deadline` of guest time.
    pub fn begin_call(&mut self, deadline: Duration) {
        // The yield counter is reused: a yield's future ends before its call does.
        let yielded = self.call.yielded_nanos.clone();
        yielded.store(0, Ordering::Relaxed);
        self.call = CallClock::new(deadline, yielded);
        self.host_error = None;
        self.limits.hit = false;
        self.kv_calls = 0;
        self.log_lines = 0;
        self.error_logged = None;
    }

    /// The first error-level line of the call in progress, if any.
    pub fn error_logged(&self) -> Option<&str> {
        self.error_logged.as_deref()
    }

    /// Whether the call has run out of time. Guest time is the wall time since the call began
    /// less the time spent waiting for the store and yielded to the executor: a slow Redis or a
    /// busy runtime does not make a well-behaved plugin miss its deadline.
    ///
    /// On a busy machine the thread running the guest can wait for a core for milliseconds,
    /// and wall time would count that against the plugin: a 5 ms limiter missed its deadline
    /// under a burst of requests and the fallback decided instead. So a call that does not
    /// yield (the hot path) and is past its deadline by the wall clock is measured from then on
    /// by the CPU time its thread spends on it, and ends when that reaches another deadline: a
    /// guest spinning on a core of its own ends at twice its deadline, one that mostly waited
    /// for a core gets a deadline of real work to finish. The CPU clock is read only from that
    /// moment: reading a thread's CPU clock is a system call (no vDSO), and reading it at the
    /// start of every call cost a few percent of the gateway's CPU. The wall clock still bounds
    /// every call (`WALL_CLOCK_FACTOR`).
    pub fn deadline_passed(&mut self) -> bool {
        let wall = self.call.started.elapsed();
        if wall >= self.call.deadline * WALL_CLOCK_FACTOR + WALL_CLOCK_SLACK {
            return true;
        }
        let waited = self.call.host_wait + self.call.yielded();
        if wall.saturating_sub(waited) < self.call.deadline {
            return false;
        }
        if self.call.deadline > YIELD_ABOVE {
            return true;
        }
        match &self.call.cpu {
            // First time past the deadline: the CPU clock starts now.
            None => match thread_cpu() {
                Some(now) => {
                    self.call.cpu = Some(CpuClock {
                        used: Duration::ZERO,
                        stretch: Some(now),
                    });
                    false
                }
                None => true,
            },
            Some(_) => self
                .call
                .cpu_used()
                .is_none_or(|cpu| cpu >= self.call.deadline),
        }
    }

    /// Whether the call should yield to the executor at each epoch tick.
    pub fn yields(&self) -> bool {
        self.call.deadline > YIELD_ABOVE
    }

    pub fn deadline(&self) -> Duration {
        self.call.deadline
    }

    /// The counter the epoch callback adds yielded time to.
    pub fn yielded_nanos(&self) -> Arc<AtomicU64> {
        self.call.yielded_nanos.clone()
    }

    pub fn host_error(&self) -> Option<&str> {
        self.host_error.as_deref()
    }

    pub fn memory_cap_hit(&self) -> bool {
        self.limits.hit
    }

    /// Checks a key against the quotas and says where it lives: a `local:` key in the loaded
    /// version's memory, any other in the shared store under the slot's namespace.
    fn key<'k>(&mut self, key: &'k str) -> wasmtime::Result<Key<'k>> {
        if key.len() > MAX_KV_KEY_BYTES {
            wasmtime::bail!("kv key of {} bytes (at most {MAX_KV_KEY_BYTES})", key.len());
        }
        self.kv_calls += 1;
        if self.kv_calls > MAX_KV_CALLS_PER_CALL {
            wasmtime::bail!("more than {MAX_KV_CALLS_PER_CALL} kv operations in one call");
        }
        Ok(if key.starts_with(LOCAL_KEY_PREFIX) {
            Key::Local(key)
        } else {
            Key::Shared(format!("{}{key}", self.ctx.namespace))
        })
    }

    /// A store operation starts: the guest's time stops until [`settle`](Self::settle).
    fn wait_begins(&mut self) -> Instant {
        self.call.pause_cpu();
        Instant::now()
    }

    /// Accounts for one store operation: its time is the host's, and its failure traps the
    /// guest as a host fault.
    fn settle<T>(
        &mut self,
        started: Instant,
        result: Result<T, StoreError>,
    ) -> wasmtime::Result<T> {
        self.call.host_wait += started.elapsed();
        self.call.resume_cpu();
        result.map_err(|err| {
            let message = format!("store: {err}");
            self.host_error = Some(message.clone());
            wasmtime::Error::msg(message)
        })
    }

    pub async fn kv_get(&mut self, key: &str) -> wasmtime::Result<Option<Vec<u8>>> {
        let key = match self.key(key)? {
            Key::Local(key) => return Ok(self.ctx.local.get(key)),
            Key::Shared(key) => key,
        };
        let store = self.ctx.store.clone();
        let started = self.wait_begins();
        let result = store.kv_get(&key).await;
        self.settle(started, result)
    }

    pub async fn kv_set(
        &mut self,
        key: &str,
        value: &[u8],
        ttl_ms: Option<u64>,
    ) -> wasmtime::Result<()> {
        if value.len() > MAX_KV_VALUE_BYTES {
            wasmtime::bail!(
                "kv value of {} bytes (at most {MAX_KV_VALUE_BYTES})",
                value.len()
            );
        }
        let key = match self.key(key)? {
            Key::Local(key) => return local(self.ctx.local.set(key, value, ttl(ttl_ms))),
            Key::Shared(key) => key,
        };
        let store = self.ctx.store.clone();
        let started = self.wait_begins();
        let result = store.kv_set(&key, value, ttl(ttl_ms)).await;
        self.settle(started, result)
    }

    pub async fn kv_delete(&mut self, key: &str) -> wasmtime::Result<()> {
        let key = match self.key(key)? {
            Key::Local(key) => {
                self.ctx.local.delete(key);
                return Ok(());
            }
            Key::Shared(key) => key,
        };
        let store = self.ctx.store.clone();
        let started = self.wait_begins();
        let result = store.kv_delete(&key).await;
        self.settle(started, result)
    }

    pub async fn kv_incr(
        &mut self,
        key: &str,
        delta: i64,
        ttl_ms: Option<u64>,
    ) -> wasmtime::Result<i64> {
        let key = match self.key(key)? {
            Key::Local(key) => return local(self.ctx.local.incr(key, delta, ttl(ttl_ms))),
            Key::Shared(key) => key,
        };
        let store = self.ctx.store.clone();
        let started = self.wait_begins();
        let result = store.kv_incr(&key, delta, ttl(ttl_ms)).await;
        self.settle(started, result)
    }

    pub async fn kv_reserve(
        &mut self,
        key: &str,
        amount: i64,
        limit: i64,
        ttl_ms: Option<u64>,
    ) -> wasmtime::Result<Option<i64>> {
        let key = match self.key(key)? {
            Key::Local(key) => {
                return local(self.ctx.local.reserve(key, amount, limit, ttl(ttl_ms)));
            }
            Key::Shared(key) => key,
        };
        let store = self.ctx.store.clone();
        let started = self.wait_begins();
        let result = store.kv_reserve(&key, amount, limit, ttl(ttl_ms)).await;
        self.settle(started, result)
    }

    pub fn clock_now_ms(&self) -> u64 {
        if let Some(clock) = &self.ctx.clock {
            return clock.load(Ordering::Relaxed);
        }
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }

    pub fn config_json(&self) -> &str {
        &self.ctx.config_json
    }

    pub fn log_line(&mut self, level: LogLevel, message: &str) {
        if matches!(level, LogLevel::Error) && self.error_logged.is_none() {
            self.error_logged = Some(sanitize(message));
        }
        self.log_lines += 1;
        if self.log_lines > MAX_LOG_LINES_PER_CALL || !self.ctx.log_budget.take(&self.ctx) {
            return;
        }
        let message = sanitize(message);
        let plugin = self.ctx.slot.as_str();
        let version = self.ctx.version.as_str();
        match level {
            LogLevel::Debug => tracing::debug!(plugin, version, "{message}"),
            LogLevel::Info => tracing::info!(plugin, version, "{message}"),
            LogLevel::Warn => tracing::warn!(plugin, version, "{message}"),
            LogLevel::Error => tracing::error!(plugin, version, "{message}"),
        }
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// WASI with nothing granted. Rust guests built for `wasm32-wasip2` (and other languages'
/// runtimes) import parts of WASI even when the policy never uses them, so it is linked, but a
/// plugin gets no environment variables, arguments, preopened directories (so no filesystem),
/// network (no TCP, UDP or name lookup), stdin, and its stdout and stderr go nowhere. Clocks and
/// random numbers stay: they reveal nothing and `HashMap` needs a seed.
fn empty_wasi() -> WasiCtx {
    WasiCtx::builder()
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .build()
}

fn ttl(ttl_ms: Option<u64>) -> Option<Duration> {
    ttl_ms.map(Duration::from_millis)
}

/// Where a plugin's key lives.
enum Key<'k> {
    /// A `local:` key, as the plugin named it, in the loaded version's [`LocalKv`].
    Local(&'k str),
    /// Any other, with the slot's namespace, in the shared store.
    Shared(String),
}

/// The answer of a `local:` key's operation. It fails only for the plugin's own doing (a
/// counter on a value that is not an integer, replica-local state full of keys without a
/// TTL): a trap that counts as the plugin's fault, unlike a shared store's failure.
fn local<T>(result: Result<T, StoreError>) -> wasmtime::Result<T> {
    result.map_err(|err| wasmtime::Error::msg(format!("kv: {err}")))
}

/// Cuts a plugin's message to [`MAX_LOG_MESSAGE_BYTES`] and neutralises control characters, so
/// a plugin cannot forge log lines or flood the log with one giant message.
fn sanitize(message: &str) -> String {
    let mut end = message.len().min(MAX_LOG_MESSAGE_BYTES);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let mut out: String = message[..end]
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if end < message.len() {
        out.push_str(" [cut]");
    }
    out
}

/// The time accounting of the call in progress.
struct CallClock {
    started: Instant,
    deadline: Duration,
    host_wait: Duration,
    /// Time the call spent yielded to the executor, in nanoseconds; written by the futures the
    /// epoch callback hands to wasmtime, which outlive the borrow of the state.
    yielded_nanos: Arc<AtomicU64>,
    /// CPU time the guest's thread spent on the call since it passed its deadline by the wall
    /// clock, for calls that do not yield (see [`HostState::deadline_passed`]); `None` before
    /// that, for calls that yield, or where the thread's CPU clock cannot be read.
    cpu: Option<CpuClock>,
}

/// The CPU time of a call's thread, over the stretches the guest runs (between host waits,
/// after which the call may go on on another thread).
struct CpuClock {
    /// CPU time of the stretches that ended.
    used: Duration,
    /// The thread's CPU clock when the current stretch began; `None` during a host wait.
    /// (A reading, not `cpu_time::ThreadTime`, which may not leave its thread: the state does,
    /// between stretches.)
    stretch: Option<Duration>,
}

/// The CPU clock of the calling thread.
fn thread_cpu() -> Option<Duration> {
    cpu_time::ThreadTime::try_now()
        .ok()
        .map(|now| now.as_duration())
}

impl CallClock {
    fn new(deadline: Duration, yielded_nanos: Arc<AtomicU64>) -> Self {
        CallClock {
            started: Instant::now(),
            deadline,
            host_wait: Duration::ZERO,
            yielded_nanos,
            cpu: None,
        }
    }

    fn pause_cpu(&mut self) {
        if let Some(cpu) = &mut self.cpu
            && let Some(stretch) = cpu.stretch.take()
        {
            cpu.used += thread_cpu().map_or(Duration::ZERO, |now| now.saturating_sub(stretch));
        }
    }

    fn resume_cpu(&mut self) {
        if let Some(cpu) = &mut self.cpu {
            cpu.stretch = thread_cpu();
        }
    }

    /// CPU time spent on the call so far, if it is measured.
    fn cpu_used(&self) -> Option<Duration> {
        let cpu = self.cpu.as_ref()?;
        let stretch = match (cpu.stretch, thread_cpu()) {
            (Some(start), Some(now)) => now.saturating_sub(start),
            _ => Duration::ZERO,
        };
        Some(cpu.used + stretch)
    }

    fn yielded(&self) -> Duration {
        Duration::from_nanos(self.yielded_nanos.load(Ordering::Relaxed))
    }
}

/// `StoreLimits` (the memory cap) plus a note of whether it refused something, so a trap can be
/// told apart as "memory cap".
struct CallLimits {
    inner: StoreLimits,
    hit: bool,
}

impl CallLimits {
    fn new(memory_cap_bytes: usize) -> Self {
        CallLimits {
            inner: StoreLimitsBuilder::new()
                .memory_size(memory_cap_bytes)
                // A guest whose `memory.grow` fails usually aborts anyway; trapping at once
                // makes the cause plain.
                .trap_on_grow_failure(true)
                .build(),
            hit: false,
        }
    }
}

impl ResourceLimiter for CallLimits {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = self.inner.memory_growing(current, desired, maximum);
        if !matches!(allowed, Ok(true)) {
            self.hit = true;
        }
        allowed
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = self.inner.table_growing(current, desired, maximum);
        if !matches!(allowed, Ok(true)) {
            self.hit = true;
        }
        allowed
    }

    fn instances(&self) -> usize {
        self.inner.instances()
    }

    fn tables(&self) -> usize {
        self.inner.tables()
    }

    fn memories(&self) -> usize {
        self.inner.memories()
    }
}

/// A per-version bound on log lines per second.
#[derive(Default)]
struct LogBudget {
    window: Mutex<LogWindow>,
}

#[derive(Default)]
struct LogWindow {
    started: Option<Instant>,
    lines: u32,
    dropped: u64,
}

impl LogBudget {
    /// Whether one more line may be written now.
    fn take(&self, ctx: &PluginContext) -> bool {
        let mut window = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if window
            .started
            .is_none_or(|started| now.duration_since(started) >= Duration::from_secs(1))
        {
            if window.dropped > 0 {
                tracing::warn!(
                    plugin = ctx.slot.as_str(),
                    version = ctx.version.as_str(),
                    dropped = window.dropped,
                    "plugin log lines dropped (more than {MAX_LOG_LINES_PER_SECOND} a second)"
                );
            }
            *window = LogWindow {
                started: Some(now),
                lines: 0,
                dropped: 0,
            };
        }
        if window.lines >= MAX_LOG_LINES_PER_SECOND {
            window.dropped += 1;
            return false;
        }
        window.lines += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    fn version(slot: Slot, sha256: &str, store: &Arc<MemoryStore>) -> Arc<PluginContext> {
        let store: Arc<dyn Store> = store.clone();
        Arc::new(PluginContext::new(slot, sha256, "{}".into(), store))
    }

    fn instance(ctx: &Arc<PluginContext>) -> HostState {
        let mut state = HostState::new(ctx.clone(), 1 << 20);
        state.begin_call(Duration::from_secs(1));
        state
    }

    /// `local:` keys stay in the loaded version's memory: its instances share them, the
    /// shared store never has them, and neither another version of the slot nor another slot
    /// can read them (while shared keys are the slot's, whichever version wrote them).
    #[tokio::test]
    async fn local_keys_are_the_loaded_versions_own() {
        let store = Arc::new(MemoryStore::new());
        let limiter_a = version(Slot::RateLimiter, A, &store);
        let limiter_b = version(Slot::RateLimiter, B, &store);
        let meter_a = version(Slot::Meter, A, &store);

        let mut writer = instance(&limiter_a);
        writer.kv_set("local:held:r1", b"k", None).await.unwrap();
        writer.kv_set("shared", b"s", None).await.unwrap();
        assert_eq!(writer.kv_incr("local:n", 2, None).await.unwrap(), 2);

        let mut other_instance = instance(&limiter_a);
        assert_eq!(
            other_instance
                .kv_get("local:held:r1")
                .await
                .unwrap()
                .as_deref(),
            Some(&b"k"[..])
        );
        assert_eq!(other_instance.kv_incr("local:n", 1, None).await.unwrap(), 3);

        let mut next_version = instance(&limiter_b);
        assert_eq!(next_version.kv_get("local:held:r1").await.unwrap(), None);
        assert_eq!(next_version.kv_incr("local:n", 1, None).await.unwrap(), 1);
        assert_eq!(
            next_version.kv_get("shared").await.unwrap().as_deref(),
            Some(&b"s"[..]),
            "shared keys are the slot's"
        );
        let mut other_slot = instance(&meter_a);
        assert_eq!(other_slot.kv_get("local:held:r1").await.unwrap(), None);
        assert_eq!(other_slot.kv_get("shared").await.unwrap(), None);

        // The shared store holds only the shared key, under the slot's namespace.
        let namespace = kv_namespace(Slot::RateLimiter);
        for name in ["local:held:r1", "local:n"] {
            assert_eq!(
                store.kv_get(&format!("{namespace}{name}")).await.unwrap(),
                None
            );
            assert_eq!(store.kv_get(name).await.unwrap(), None);
        }
        assert!(
            store
                .kv_get(&format!("{namespace}shared"))
                .await
                .unwrap()
                .is_some()
        );

        writer.kv_delete("local:held:r1").await.unwrap();
        assert_eq!(other_instance.kv_get("local:held:r1").await.unwrap(), None);
        // Deleting a local key in one version touches no other's.
        let mut b_writer = instance(&limiter_b);
        b_writer.kv_set("local:x", b"b", None).await.unwrap();
        writer.kv_delete("local:x").await.unwrap();
        assert!(b_writer.kv_get("local:x").await.unwrap().is_some());
    }

    /// Local keys expire as shared ones do, and a counter's window does not slide.
    #[tokio::test]
    async fn local_keys_expire_like_shared_ones() {
        let store = Arc::new(MemoryStore::new());
        let ctx = version(Slot::RateLimiter, A, &store);
        let mut state = instance(&ctx);
        state.kv_set("local:brief", b"1", Some(5)).await.unwrap();
        assert_eq!(
            state.kv_reserve("local:w", 3, 4, Some(5)).await.unwrap(),
            Some(3)
        );
        assert_eq!(
            state
                .kv_reserve("local:w", 3, 4, Some(60_000))
                .await
                .unwrap(),
            None
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(state.kv_get("local:brief").await.unwrap(), None);
        assert_eq!(
            state.kv_reserve("local:w", 3, 4, None).await.unwrap(),
            Some(3),
            "a new window"
        );
    }

    /// The quotas of shared keys hold for local ones: key and value sizes, operations per
    /// call; and a local key's failure is the plugin's fault, not the host's.
    #[tokio::test]
    async fn local_keys_keep_the_kv_quotas() {
        let store = Arc::new(MemoryStore::new());
        let ctx = version(Slot::RateLimiter, A, &store);
        let mut state = instance(&ctx);
        let long = format!("local:{}", "k".repeat(MAX_KV_KEY_BYTES));
        let error = state.kv_set(&long, b"1", None).await.unwrap_err();
        assert!(error.to_string().contains("kv key of"), "{error}");
        let huge = vec![0u8; MAX_KV_VALUE_BYTES + 1];
        let error = state.kv_set("local:v", &huge, None).await.unwrap_err();
        assert!(error.to_string().contains("kv value of"), "{error}");

        state
            .kv_set("local:text", b"not a number", None)
            .await
            .unwrap();
        let error = state.kv_incr("local:text", 1, None).await.unwrap_err();
        assert!(error.to_string().contains("not an integer"), "{error}");
        assert_eq!(state.host_error(), None, "the plugin's own doing");

        state.begin_call(Duration::from_secs(1));
        for i in 0..MAX_KV_CALLS_PER_CALL {
            state.kv_get(&format!("local:{i}")).await.unwrap();
        }
        let error = state.kv_get("local:one-more").await.unwrap_err();
        assert!(
            error.to_string().contains("kv operations in one call"),
            "{error}"
        );
        // The next call starts afresh.
        state.begin_call(Duration::from_secs(1));
        assert_eq!(
            state.kv_get("local:text").await.unwrap().as_deref(),
            Some(&b"not a number"[..])
        );
    }
}
