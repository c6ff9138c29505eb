//! One version of a plugin, compiled, checked and ready to call.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use wasmtime::{Store, Trap};

use super::bindings::{Answer, Call, Live, Prepared};
use super::config::{Isolation, SlotLimits};
use super::engine::PluginEngine;
use super::registry::VersionInfo;
use super::state::{HostState, PluginContext};
use super::{FaultKind, Slot};

/// A version loaded into the engine: what a call needs, plus the version's fault window.
pub(crate) struct LoadedPlugin {
    pub slot: Slot,
    pub info: VersionInfo,
    prepared: Arc<Prepared>,
    ctx: Arc<PluginContext>,
    deadline: Duration,
    memory_cap_bytes: usize,
    /// Shared with the task that trims it when idle (which holds it weakly).
    warm: Option<Arc<WarmPool>>,
    /// Fresh instances made ahead of calls (when not `warm`).
    ready: Option<ReadyPool>,
    /// When recent faults happened, for the automatic rollback.
    faults: Mutex<VecDeque<Instant>>,
    /// Set once a rollback was asked for, so a burst of faults asks once.
    rollback_requested: AtomicBool,
    /// When a fault was last logged: a plugin faulting on every request logs once a second.
    last_fault_log: Mutex<Option<Instant>>,
    /// This version's recent quotes, when it is a meter (see `PluginHost::quote`).
    pub quotes: crate::plugins::host::QuoteCache,
    /// This version's promises of keys it does not limit, when it is a rate limiter (see
    /// `PluginHost::admit_reserving`).
    pub unlimited: crate::plugins::host::Unlimited,
}

/// An instance with its store.
struct Instance {
    store: Store<HostState>,
    live: Live,
    uses: u32,
    born: Instant,
    /// When it was last put back into the warm pool.
    idle_since: Instant,
}

/// Used instances waiting to be torn down per version, at most; fewer with a small instance
/// pool (see [`max_retired`]).
const MAX_RETIRED: usize = 64;

/// How many used instances one version may leave waiting to be torn down: a sixteenth of the
/// instance pool, so that the versions of all slots together (active and canary) hold well
/// under half of it even when their refill tasks are starved. Past that a call tears its
/// instance down itself.
pub(crate) fn max_retired(max_instances: u32) -> usize {
    (max_instances as usize / 16).clamp(1, MAX_RETIRED)
}

/// Fresh instances no call has touched yet, made off the request's path.
struct ReadyPool {
    idle: Mutex<Vec<Instance>>,
    keep: usize,
    /// Used instances waiting to be torn down off the request's path (bounded: past
    /// `max_retired` a call tears its instance down itself).
    retired: Mutex<Vec<Instance>>,
    max_retired: usize,
    /// Set while a refill runs, so calls in a burst start one refill, not one each.
    refilling: AtomicBool,
    /// Cleared when making an instance ahead failed: calls then instantiate themselves (and
    /// report the fault) until a call succeeds again.
    healthy: AtomicBool,
}

/// Idle instances of a version, elastic: a call takes the most recently used one; one that
/// finds none instantiates, and puts its instance back after the call, so the pool grows to as
/// many instances as calls were in flight at once (up to `max`). Instances idle for
/// `idle_for` are torn down, least recently used first, down to `floor`: a burst's instances
/// stay while bursts keep coming, and a pool at rest holds `floor`.
struct WarmPool {
    /// Ordered by `idle_since`, oldest first (instances are pushed and popped at the end).
    idle: Mutex<Vec<Instance>>,
    floor: usize,
    max: usize,
    idle_for: Duration,
    max_uses: u32,
    max_age: Duration,
    /// Set while a task is scheduled to trim the pool back to its floor.
    trimming: AtomicBool,
    /// Instances made for calls that found the pool empty, since the version was loaded.
    instantiated: AtomicU64,
}

impl WarmPool {
    fn retires(&self, instance: &Instance) -> bool {
        instance.uses >= self.max_uses || instance.born.elapsed() >= self.max_age
    }

    /// Takes out the instances idle since before `now - idle_for`, past the floor, and those
    /// due for retirement; the caller tears them down outside the lock. Also says whether the
    /// pool is still above its floor.
    fn take_stale(&self, now: Instant) -> (Vec<Instance>, bool) {
        let mut idle = lock(&self.idle);
        let spare = idle.len().saturating_sub(self.floor);
        let stale = idle
            .iter()
            .take(spare)
            .take_while(|instance| {
                now.saturating_duration_since(instance.idle_since) >= self.idle_for
            })
            .count();
        let mut gone: Vec<Instance> = idle.drain(..stale).collect();
        let mut kept = Vec::with_capacity(idle.len());
        for instance in idle.drain(..) {
            if self.retires(&instance) {
                gone.push(instance);
            } else {
                kept.push(instance);
            }
        }
        *idle = kept;
        let above = idle.len() > self.floor;
        (gone, above)
    }

    /// Starts the task that trims the pool back to its floor once its instances sat idle, unless
    /// one runs. The task holds the pool weakly: a version swapped out takes its pool with it.
    fn schedule_trim(self: &Arc<Self>) {
        if self.trimming.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.trimming.store(false, Ordering::Release);
            return;
        };
        let pool: Weak<WarmPool> = Arc::downgrade(self);
        let period = self.idle_for;
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let Some(pool) = pool.upgrade() else { return };
                let (gone, above) = pool.take_stale(Instant::now());
                drop(gone);
                if above {
                    continue;
                }
                pool.trimming.store(false, Ordering::Release);
                // A call may have grown the pool between the trim and the flag's clearing, and
                // seen the flag still set: look again, and go on if nobody else took over.
                if lock(&pool.idle).len() <= pool.floor
                    || pool.trimming.swap(true, Ordering::AcqRel)
                {
                    return;
                }
            }
        });
    }
}

impl LoadedPlugin {
    pub fn new(
        slot: Slot,
        info: VersionInfo,
        prepared: Prepared,
        ctx: Arc<PluginContext>,
        deadline: Duration,
        limits: &SlotLimits,
        max_retired: usize,
    ) -> Self {
        let warm = limits.isolation == Isolation::Warm;
        LoadedPlugin {
            slot,
            info,
            prepared: Arc::new(prepared),
            ctx,
            deadline,
            memory_cap_bytes: limits.memory_bytes(),
            warm: warm.then(|| {
                Arc::new(WarmPool {
                    idle: Mutex::new(Vec::new()),
                    floor: limits.warm_instances,
                    max: limits.warm_max_instances.max(limits.warm_instances),
                    idle_for: Duration::from_secs(limits.warm_idle_secs),
                    max_uses: limits.warm_max_uses,
                    max_age: Duration::from_secs(limits.warm_max_age_secs),
                    trimming: AtomicBool::new(false),
                    instantiated: AtomicU64::new(0),
                })
            }),
            ready: (!warm && limits.ready_instances > 0).then(|| ReadyPool {
                idle: Mutex::new(Vec::new()),
                keep: limits.ready_instances,
                retired: Mutex::new(Vec::new()),
                max_retired,
                refilling: AtomicBool::new(false),
                healthy: AtomicBool::new(true),
            }),
            faults: Mutex::new(VecDeque::new()),
            rollback_requested: AtomicBool::new(false),
            last_fault_log: Mutex::new(None),
            quotes: Default::default(),
            unlimited: Default::default(),
        }
    }

    /// Whether the version's meter or reward export takes many usage events per call
    /// (`garage:policy@0.3.0`); a 0.2.0 component takes one.
    pub fn takes_lists(&self) -> bool {
        self.prepared.takes_lists()
    }

    /// The compiled, checked component, for a replay's scratch instances.
    pub fn prepared(&self) -> &Arc<Prepared> {
        &self.prepared
    }

    /// Whether the version's meter quotes prices (`garage:policy@0.5.0`).
    pub fn quotes(&self) -> bool {
        self.prepared.quotes()
    }

    /// Whether this loaded version can stand for `info` (same bytes, same configuration), so a
    /// reload keeps its warm instances and fault window.
    pub fn serves(&self, info: &VersionInfo) -> bool {
        self.info.sha256 == info.sha256 && self.info.config == info.config
    }

    /// Calls the plugin: a warm instance if reuse is on and one is idle, else a fresh one (made
    /// ahead when there is one ready); the instance is put away before the answer returns.
    pub async fn invoke(
        &self,
        engine: &PluginEngine,
        call: Call<'_>,
    ) -> Result<Answer, (FaultKind, String)> {
        let _ticking = engine.ticking();
        let mut instance = self.checkout(engine).await?;
        instance.store.set_epoch_deadline(1);
        let result = instance.live.call(&mut instance.store, call).await;
        match result {
            Ok(answer) => {
                instance.uses += 1;
                if let Some(ready) = &self.ready
                    && !ready.healthy.load(Ordering::Relaxed)
                {
                    ready.healthy.store(true, Ordering::Relaxed);
                }
                self.put_away(instance, true);
                Ok(answer)
            }
            // A faulted instance is never reused.
            Err(err) => {
                let fault = classify(&err, instance.store.data(), false);
                self.put_away(instance, false);
                Err(fault)
            }
        }
    }

    /// The instance for a call: a warm one, else one made ahead, else a fresh one.
    async fn checkout(&self, engine: &PluginEngine) -> Result<Instance, (FaultKind, String)> {
        if let Some(mut instance) = self.take_warm().or_else(|| self.take_ready()) {
            instance.store.data_mut().begin_call(self.deadline);
            return Ok(instance);
        }
        let instance = match self.instantiate(engine).await {
            Ok(instance) => instance,
            // The pool is full, maybe of this version's used instances that a starved refill
            // has not torn down yet: tear them down here and try once more.
            Err((FaultKind::Host, _)) if self.drop_retired() => self.instantiate(engine).await?,
            Err(fault) => return Err(fault),
        };
        if let Some(warm) = &self.warm {
            warm.instantiated.fetch_add(1, Ordering::Relaxed);
        }
        Ok(instance)
    }

    /// A fresh instance, its instantiation on the call's clock (start functions run guest
    /// code).
    async fn instantiate(&self, engine: &PluginEngine) -> Result<Instance, (FaultKind, String)> {
        let _ticking = engine.ticking();
        let mut store = engine.new_store(self.ctx.clone(), self.memory_cap_bytes);
        store.data_mut().begin_call(self.deadline);
        store.set_epoch_deadline(1);
        match self.prepared.instantiate(&mut store).await {
            Ok(live) => {
                let now = Instant::now();
                Ok(Instance {
                    store,
                    live,
                    uses: 0,
                    born: now,
                    idle_since: now,
                })
            }
            Err(err) => Err(classify(&err, store.data(), true)),
        }
    }

    /// Right after a call: keeps its instance warm when reuse is on and the call went well;
    /// else the instance is torn down (returning its memory to the pool resets it), off the
    /// request's path by [`refill`](Self::refill) when instances are made ahead, here
    /// otherwise. The queue of instances to tear down is bounded, so a refill task starved
    /// under load cannot pile them up until the pool runs dry.
    fn put_away(&self, instance: Instance, reusable: bool) {
        if reusable && self.warm.is_some() {
            self.put_back(instance);
            return;
        }
        if let Some(ready) = &self.ready {
            let mut retired = lock(&ready.retired);
            if retired.len() < ready.max_retired {
                retired.push(instance);
            }
        }
    }

    /// Whether instances wait to be torn down, or the ready ones need topping up (and nobody
    /// is at it yet).
    pub fn wants_refill(&self) -> bool {
        self.ready.as_ref().is_some_and(|ready| {
            !ready.refilling.load(Ordering::Relaxed)
                && (!lock(&ready.retired).is_empty()
                    || (ready.healthy.load(Ordering::Relaxed)
                        && lock(&ready.idle).len() < ready.keep))
        })
    }

    /// Off the request's path: tears used instances down and tops the ready ones up.
    pub async fn refill(&self, engine: &PluginEngine) {
        let Some(ready) = &self.ready else { return };
        if ready.refilling.swap(true, Ordering::AcqRel) {
            return;
        }
        let retired = std::mem::take(&mut *lock(&ready.retired));
        drop(retired);
        while ready.healthy.load(Ordering::Relaxed) && lock(&ready.idle).len() < ready.keep {
            match self.instantiate(engine).await {
                Ok(instance) => lock(&ready.idle).push(instance),
                Err((kind, message)) => {
                    // The next calls instantiate themselves and report it as their fault.
                    tracing::debug!(plugin = %self.slot, kind = kind.as_str(), "cannot make an instance ahead: {message}");
                    ready.healthy.store(false, Ordering::Relaxed);
                    break;
                }
            }
        }
        ready.refilling.store(false, Ordering::Release);
    }

    /// Tears down this version's idle instances (warm, made ahead or waiting to be torn down),
    /// giving their slots back to the instance pool; true when there were some. For a call of
    /// another slot that found the pool full.
    pub fn trim(&self) -> bool {
        let warm = self
            .warm
            .as_ref()
            .map(|warm| std::mem::take(&mut *lock(&warm.idle)))
            .unwrap_or_default();
        let ready = self
            .ready
            .as_ref()
            .map(|ready| std::mem::take(&mut *lock(&ready.idle)))
            .unwrap_or_default();
        let retired = self.drop_retired();
        !warm.is_empty() || !ready.is_empty() || retired
    }

    /// Tears down the used instances waiting for a refill; true when there were some.
    fn drop_retired(&self) -> bool {
        let Some(ready) = &self.ready else {
            return false;
        };
        let retired = std::mem::take(&mut *lock(&ready.retired));
        !retired.is_empty()
    }

    fn take_ready(&self) -> Option<Instance> {
        let ready = self.ready.as_ref()?;
        lock(&ready.idle).pop()
    }

    /// The most recently used idle instance that is not due for retirement (an instance that
    /// sat idle past its age is torn down here).
    fn take_warm(&self) -> Option<Instance> {
        let warm = self.warm.as_ref()?;
        loop {
            let instance = lock(&warm.idle).pop()?;
            if !warm.retires(&instance) {
                return Some(instance);
            }
        }
    }

    /// Keeps a used instance warm, unless it is due for retirement or the pool holds its
    /// maximum; past the floor, the pool is trimmed once idle (see [`WarmPool`]).
    fn put_back(&self, mut instance: Instance) {
        let Some(warm) = &self.warm else { return };
        if warm.retires(&instance) {
            return;
        }
        instance.idle_since = Instant::now();
        let above = {
            let mut idle = lock(&warm.idle);
            if idle.len() >= warm.max {
                // Torn down below, outside the lock.
                None
            } else {
                idle.push(instance);
                Some(idle.len() > warm.floor)
            }
        };
        if above == Some(true) {
            warm.schedule_trim();
        }
    }

    /// The warm pool's idle instances now, and the instances made since the version was loaded
    /// for calls that found none idle (`None` for `per-call` isolation).
    #[cfg(test)]
    fn warm_counts(&self) -> Option<(usize, u64)> {
        let warm = self.warm.as_ref()?;
        Some((
            lock(&warm.idle).len(),
            warm.instantiated.load(Ordering::Relaxed),
        ))
    }

    /// Notes a fault that counts towards a rollback; true when the version crossed the
    /// threshold and nobody asked for its rollback yet.
    pub fn note_fault(&self, window: Duration, threshold: u32) -> bool {
        let now = Instant::now();
        let mut faults = lock(&self.faults);
        faults.push_back(now);
        while faults
            .front()
            .is_some_and(|at| now.duration_since(*at) > window)
        {
            faults.pop_front();
        }
        faults.len() >= threshold as usize && !self.rollback_requested.swap(true, Ordering::SeqCst)
    }

    /// Lets a failed rollback be asked for again.
    pub fn clear_rollback_request(&self) {
        self.rollback_requested.store(false, Ordering::SeqCst);
    }

    /// Whether a fault should be logged now (at most one line a second per version); the
    /// metrics count every one.
    pub fn should_log_fault(&self) -> bool {
        let now = Instant::now();
        let mut last = lock(&self.last_fault_log);
        if last.is_some_and(|at| now.duration_since(at) < Duration::from_secs(1)) {
            return false;
        }
        *last = Some(now);
        true
    }
}

/// Calls a version once, on a fresh instance, before it is stored: how the gateway checks that
/// a plugin can work with the configuration it is uploaded with. A trap (the Rust SDK's
/// plugins trap on a configuration they cannot read), a blown deadline or memory cap, or a line
/// logged at error level refuses it, with the plugin's own words. `ctx` gives it a key-value
/// store of its own, so the check touches no real state.
pub(crate) async fn check_config(
    engine: &PluginEngine,
    prepared: &Prepared,
    ctx: Arc<PluginContext>,
    deadline: Duration,
    memory_cap_bytes: usize,
    call: Call<'_>,
) -> Result<(), String> {
    let _ticking = engine.ticking();
    let mut store = engine.new_store(ctx, memory_cap_bytes);
    store.data_mut().begin_call(deadline);
    store.set_epoch_deadline(1);
    // What the plugin logged at error level says more than the trap that may follow it.
    let failed = |err: &wasmtime::Error, store: &Store<HostState>, instantiating: bool| match store
        .data()
        .error_logged()
    {
        Some(message) => message.to_owned(),
        None => classify(err, store.data(), instantiating).1,
    };
    let live = match prepared.instantiate(&mut store).await {
        Ok(live) => live,
        Err(err) => return Err(failed(&err, &store, true)),
    };
    store.data_mut().begin_call(deadline);
    store.set_epoch_deadline(1);
    match live.call(&mut store, call).await {
        Err(err) => Err(failed(&err, &store, false)),
        Ok(_) => match store.data().error_logged() {
            Some(message) => Err(message.to_owned()),
            None => Ok(()),
        },
    }
}

/// How the message of a fault that found the instance pool full begins.
const POOL_FULL: &str = "instance pool full: ";

/// Whether a call failed only because the instance pool was full (see
/// [`LoadedPlugin::trim`]).
pub(crate) fn is_pool_full(fault: &(FaultKind, String)) -> bool {
    fault.0 == FaultKind::Host && fault.1.starts_with(POOL_FULL)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Names the cause of a failed instantiation or call.
pub(crate) fn classify(
    err: &wasmtime::Error,
    state: &HostState,
    instantiating: bool,
) -> (FaultKind, String) {
    let message = format!("{err:#}");
    if let Some(host) = state.host_error() {
        return (FaultKind::Host, host.to_owned());
    }
    if state.memory_cap_hit() {
        return (FaultKind::MemoryCap, message);
    }
    match err.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => (
            FaultKind::Timeout,
            format!("deadline of {:?} exceeded", state.deadline()),
        ),
        Some(_) => (FaultKind::Trap, message),
        // Instantiation failing without a trap: the instance pool is full, or the like.
        None if instantiating
            && err
                .downcast_ref::<wasmtime::PoolConcurrencyLimitError>()
                .is_some() =>
        {
            (FaultKind::Host, format!("{POOL_FULL}{message}"))
        }
        // Otherwise a host import refused the guest (a key too long...): the plugin's doing.
        None => (FaultKind::Trap, message),
    }
}

#[cfg(test)]
mod tests {
    //! The warm pool's sizes, on real instances of the default router: calls in flight are
    //! instances checked out and not yet put back.

    use super::*;
    use crate::plugins::config::PluginsConfig;
    use crate::store::MemoryStore;

    async fn router(limits: &SlotLimits) -> (PluginEngine, LoadedPlugin) {
        let engine = PluginEngine::new(&PluginsConfig::default()).expect("engine");
        let wasm = Arc::new(garage_plugins::ROUTER_LEAST_LOADED.to_vec());
        let component = engine.compile("pool-test", wasm).await.expect("compiles");
        let prepared = engine.prepare(Slot::Router, &component).expect("a router");
        let ctx = Arc::new(PluginContext::new(
            Slot::Router,
            "pool-test",
            "{}".into(),
            Arc::new(MemoryStore::new()),
        ));
        let info = VersionInfo {
            sha256: "pool-test".into(),
            size: 0,
            config: serde_json::json!({}),
            activated_at: 0,
            activated_by: "test".into(),
        };
        let deadline = Duration::from_secs(1);
        let plugin = LoadedPlugin::new(Slot::Router, info, prepared, ctx, deadline, limits, 1);
        (engine, plugin)
    }

    fn elastic(floor: usize, max: usize) -> SlotLimits {
        SlotLimits {
            warm_instances: floor,
            warm_max_instances: max,
            warm_idle_secs: 1,
            ..SlotLimits::default()
        }
    }

    /// `n` calls in flight at once: `n` instances checked out.
    async fn in_flight(engine: &PluginEngine, plugin: &LoadedPlugin, n: usize) -> Vec<Instance> {
        let mut instances = Vec::new();
        for _ in 0..n {
            let mut instance = plugin.checkout(engine).await.expect("an instance");
            instance.uses += 1;
            instances.push(instance);
        }
        instances
    }

    fn finish(plugin: &LoadedPlugin, instances: Vec<Instance>) {
        for instance in instances {
            plugin.put_away(instance, true);
        }
    }

    #[tokio::test]
    async fn the_pool_grows_to_the_calls_in_flight_and_trims_back_to_its_floor() {
        let (engine, plugin) = router(&elastic(2, 6)).await;
        let burst = in_flight(&engine, &plugin, 5).await;
        assert_eq!(
            plugin.warm_counts(),
            Some((0, 5)),
            "an empty pool: five made"
        );
        finish(&plugin, burst);
        assert_eq!(plugin.warm_counts(), Some((5, 5)), "all five kept");
        // The same burst again finds all of its instances warm.
        let burst = in_flight(&engine, &plugin, 5).await;
        assert_eq!(plugin.warm_counts(), Some((0, 5)), "none made");
        finish(&plugin, burst);
        // Quiet: the trim task takes the pool back to its floor, and no further.
        let pool = plugin.warm.as_ref().unwrap();
        let mut idle = 5;
        for _ in 0..100 {
            idle = plugin.warm_counts().unwrap().0;
            if idle <= 2 && !pool.trimming.load(Ordering::Acquire) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(idle, 2, "trimmed to warm_instances");
        let (gone, above) = pool.take_stale(Instant::now() + Duration::from_secs(3600));
        assert!(
            gone.is_empty() && !above,
            "the floor stays however long it idles"
        );
        assert!(
            !pool.trimming.load(Ordering::Acquire),
            "the trim task is done"
        );
    }

    /// Hostile: a burst far beyond the cap is served (on instances made for it), and keeps only
    /// the cap; a faulted instance and one past its uses are never put back.
    #[tokio::test]
    async fn a_burst_beyond_the_cap_keeps_only_the_cap_and_never_a_faulted_instance() {
        let mut limits = elastic(1, 4);
        limits.warm_max_uses = 3;
        let (engine, plugin) = router(&limits).await;
        let burst = in_flight(&engine, &plugin, 12).await;
        assert_eq!(burst.len(), 12);
        finish(&plugin, burst);
        assert_eq!(
            plugin.warm_counts(),
            Some((4, 12)),
            "the cap, of twelve made"
        );

        let mut burst = in_flight(&engine, &plugin, 4).await;
        assert_eq!(plugin.warm_counts(), Some((0, 12)));
        let faulted = burst.pop().unwrap();
        plugin.put_away(faulted, false);
        let mut worn = burst.pop().unwrap();
        worn.uses = limits.warm_max_uses;
        plugin.put_away(worn, true);
        finish(&plugin, burst);
        assert_eq!(
            plugin.warm_counts(),
            Some((2, 12)),
            "neither the faulted nor the worn-out instance is back"
        );
    }

    /// Hot swap: a version's trim task holds its pool weakly, so a version swapped out (its
    /// last call finished) is torn down with its instances, trim pending or not.
    #[tokio::test]
    async fn a_pending_trim_does_not_keep_a_swapped_out_version_alive() {
        let (engine, plugin) = router(&elastic(1, 8)).await;
        let burst = in_flight(&engine, &plugin, 4).await;
        finish(&plugin, burst);
        let pool = plugin.warm.as_ref().unwrap();
        assert!(pool.trimming.load(Ordering::Acquire), "a trim is pending");
        let weak = Arc::downgrade(pool);
        drop(plugin);
        assert!(weak.upgrade().is_none(), "the pool went with its version");
    }
}
