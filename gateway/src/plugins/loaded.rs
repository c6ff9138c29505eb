//! One version of a plugin, compiled, checked and ready to call.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
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
    warm: Option<WarmPool>,
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
}

/// An instance with its store.
struct Instance {
    store: Store<HostState>,
    live: Live,
    uses: u32,
    born: Instant,
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

struct WarmPool {
    idle: Mutex<Vec<Instance>>,
    keep: usize,
    max_uses: u32,
    max_age: Duration,
}

impl WarmPool {
    fn retires(&self, instance: &Instance) -> bool {
        instance.uses >= self.max_uses || instance.born.elapsed() >= self.max_age
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
            warm: warm.then(|| WarmPool {
                idle: Mutex::new(Vec::new()),
                keep: limits.warm_instances,
                max_uses: limits.warm_max_uses,
                max_age: Duration::from_secs(limits.warm_max_age_secs),
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
        let mut instance = match self.take_warm().or_else(|| self.take_ready()) {
            Some(mut instance) => {
                instance.store.data_mut().begin_call(self.deadline);
                instance
            }
            None => match self.instantiate(engine).await {
                Ok(instance) => instance,
                // The pool is full, maybe of this version's used instances that a starved
                // refill has not torn down yet: tear them down here and try once more.
                Err((FaultKind::Host, _)) if self.drop_retired() => {
                    self.instantiate(engine).await?
                }
                Err(fault) => return Err(fault),
            },
        };
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

    /// A fresh instance, its instantiation on the call's clock (start functions run guest
    /// code).
    async fn instantiate(&self, engine: &PluginEngine) -> Result<Instance, (FaultKind, String)> {
        let _ticking = engine.ticking();
        let mut store = engine.new_store(self.ctx.clone(), self.memory_cap_bytes);
        store.data_mut().begin_call(self.deadline);
        store.set_epoch_deadline(1);
        match self.prepared.instantiate(&mut store).await {
            Ok(live) => Ok(Instance {
                store,
                live,
                uses: 0,
                born: Instant::now(),
            }),
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

    fn put_back(&self, instance: Instance) {
        let Some(warm) = &self.warm else { return };
        if warm.retires(&instance) {
            return;
        }
        let mut idle = lock(&warm.idle);
        if idle.len() < warm.keep {
            idle.push(instance);
        }
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
