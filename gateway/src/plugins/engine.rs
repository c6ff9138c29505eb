//! The wasmtime engine every plugin runs in: its configuration, the linker with the imports a
//! plugin may use, the epoch ticker that enforces deadlines, validation of a component against
//! its slot's world, and the cache of compiled components.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wasmtime::UpdateDeadline;
use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, Linker};
use wasmtime::{
    Config, Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store,
};

use super::bindings::{self, Prepared};
use super::config::PluginsConfig;
use super::state::{HostState, PluginContext};
use super::{PluginError, Slot};

/// How often the epoch advances: the granularity of every deadline.
pub(crate) const EPOCH_TICK: Duration = Duration::from_millis(1);

/// WASI interfaces a component may import (version 0.2.x). The host links them with nothing
/// granted (see `state::empty_wasi`); anything else outside `garage:policy` is refused at load.
const ALLOWED_WASI_PACKAGES: &[&str] = &[
    "wasi:cli/",
    "wasi:io/",
    "wasi:clocks/",
    "wasi:random/",
    "wasi:filesystem/",
    "wasi:sockets/",
];
const OUR_PACKAGE: &str = "garage:policy/";

pub(crate) struct PluginEngine {
    engine: Engine,
    linker: Linker<HostState>,
    /// Hex digest of the engine's compatibility hash: compiled code is only valid for an engine
    /// with the same hash (wasmtime version, target, settings).
    compatibility: String,
    /// Compiled components by `sha256@compatibility`.
    compiled: Mutex<HashMap<String, Component>>,
    ticker: EpochTicker,
}

impl PluginEngine {
    pub(crate) fn new(config: &PluginsConfig) -> Result<Self, PluginError> {
        let engine = Engine::new(&engine_config(config)).map_err(|err| {
            PluginError::Engine(format!("cannot configure the wasm engine: {err}"))
        })?;
        let mut linker = Linker::new(&engine);
        bindings::add_to_linker(&mut linker)
            .and_then(|()| wasmtime_wasi::p2::add_to_linker_async(&mut linker))
            .map_err(|err| PluginError::Engine(format!("cannot link plugin imports: {err}")))?;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let compatibility = format!("{:016x}", hasher.finish());
        let ticker = EpochTicker::start(&engine)
            .map_err(|err| PluginError::Engine(format!("cannot start the epoch thread: {err}")))?;
        Ok(PluginEngine {
            engine,
            linker,
            compatibility,
            compiled: Mutex::new(HashMap::new()),
            ticker,
        })
    }

    /// Keeps the epoch ticking while the guard lives: taken around anything that runs guest
    /// code (a call, an instantiation).
    pub(crate) fn ticking(&self) -> Ticking<'_> {
        self.ticker.ticking()
    }

    fn cache_key(&self, sha256: &str) -> String {
        format!("{sha256}@{}", self.compatibility)
    }

    /// Compiles `wasm` (or takes it from the cache). Compiling is CPU-heavy (seconds for a
    /// Python component), so it runs off the async workers.
    pub(crate) async fn compile(
        &self,
        sha256: &str,
        wasm: Arc<Vec<u8>>,
    ) -> Result<Component, PluginError> {
        let key = self.cache_key(sha256);
        if let Some(component) = self.lock_cache().get(&key) {
            return Ok(component.clone());
        }
        check_header(&wasm)?;
        let engine = self.engine.clone();
        let started = Instant::now();
        let component = tokio::task::spawn_blocking(move || compile_on_own_threads(&engine, &wasm))
            .await
            .map_err(|err| PluginError::Engine(format!("compilation task failed: {err}")))?
            .map_err(|err| PluginError::Invalid(format!("{err:#}")))?;
        return_garbage_later();
        tracing::info!(
            version = &sha256[..12.min(sha256.len())],
            elapsed_ms = started.elapsed().as_millis() as u64,
            "plugin compiled"
        );
        self.lock_cache().insert(key, component.clone());
        Ok(component)
    }

    /// The compiled component of a version, if it is in the cache.
    pub(crate) fn cached(&self, sha256: &str) -> Option<Component> {
        self.lock_cache().get(&self.cache_key(sha256)).cloned()
    }

    /// Forgets compiled components no slot refers to any more.
    pub(crate) fn retain_compiled(&self, referenced: &[&str]) {
        let keys: Vec<String> = referenced.iter().map(|sha| self.cache_key(sha)).collect();
        self.lock_cache().retain(|key, _| keys.contains(key));
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, HashMap<String, Component>> {
        self.compiled.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks that `component` implements `slot`'s world and imports nothing beyond what a
    /// plugin may use, and prepares it for instantiation.
    pub(crate) fn prepare(
        &self,
        slot: Slot,
        component: &Component,
    ) -> Result<Prepared, PluginError> {
        let ty = component.component_type();
        let refused: Vec<String> = ty
            .imports(&self.engine)
            .map(|(name, _)| name)
            .filter(|name| !import_allowed(name))
            .map(str::to_owned)
            .collect();
        if !refused.is_empty() {
            return Err(PluginError::ForbiddenImport {
                slot,
                imports: refused,
            });
        }
        let exports: Vec<String> = ty
            .exports(&self.engine)
            .filter(|(_, item)| matches!(item.ty, ComponentItem::ComponentFunc(_)))
            .map(|(name, _)| name.to_owned())
            .collect();
        let missing: Vec<&str> = bindings::required_exports(slot)
            .iter()
            .copied()
            .filter(|name| !exports.iter().any(|e| e == name))
            .collect();
        if !missing.is_empty() {
            return Err(PluginError::WrongWorld {
                slot,
                reason: wrong_world_reason(slot, &missing, &exports),
            });
        }
        Prepared::new(slot, &self.linker, component).map_err(|err| PluginError::WrongWorld {
            slot,
            reason: format!("{err:#}"),
        })
    }

    /// A store for one instance of a plugin: memory cap, and the epoch callback that enforces
    /// the call's deadline.
    pub(crate) fn new_store(
        &self,
        ctx: Arc<PluginContext>,
        memory_cap_bytes: usize,
    ) -> Store<HostState> {
        let mut store = Store::new(&self.engine, HostState::new(ctx, memory_cap_bytes));
        store.limiter(|state| state.limiter());
        // Every tick, a running guest comes here: past its deadline it traps (`Trap::Interrupt`);
        // otherwise a long call yields to the executor (see `HostState::yields`), and the time
        // it spends yielded is not counted against the plugin.
        store.epoch_deadline_callback(|mut context| {
            let state = context.data_mut();
            if state.deadline_passed() {
                return Ok(UpdateDeadline::Interrupt);
            }
            if !state.yields() {
                return Ok(UpdateDeadline::Continue(1));
            }
            let yielded = state.yielded_nanos();
            Ok(UpdateDeadline::YieldCustom(
                1,
                Box::pin(async move {
                    let started = Instant::now();
                    tokio::task::yield_now().await;
                    yielded.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
                }),
            ))
        });
        store
    }
}

/// Compiles on a thread pool made for this compilation and dropped after it, so that its
/// threads exit and hand their allocator heaps back. wasmtime compiles a component's functions
/// in parallel on rayon's current pool; the global one lives as long as the process, each of
/// its threads keeping what compiling allocated and freed. A small component gets one thread:
/// compiling the default policies on two threads took no less time on two cores, and left the
/// gateway 5 to 7 MB larger at rest than on one (fragments of the compiled component spread
/// over both threads' pages). A big one (Python, JavaScript: 10 to 20 MB) gets a thread per
/// [`BYTES_PER_COMPILE_THREAD`], up to one per core.
fn compile_on_own_threads(engine: &Engine, wasm: &[u8]) -> wasmtime::Result<Component> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (1 + wasm.len() / BYTES_PER_COMPILE_THREAD).min(cores);
    match rayon_core::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("plugin-compile-{i}"))
        .build()
    {
        Ok(pool) => pool.install(|| Component::new(engine, wasm)),
        // No threads to be had: compile on this one.
        Err(_) => Component::new(engine, wasm),
    }
}

/// Component bytes per thread compiling it (see [`compile_on_own_threads`]).
const BYTES_PER_COMPILE_THREAD: usize = 4 << 20;

/// How long after a compilation [`return_garbage_later`] frees its block: past mimalloc's purge
/// delay (1 s by default).
const RETURN_GARBAGE_AFTER: Duration = Duration::from_millis(1200);

/// Compiling a component allocates and frees tens of megabytes; the gateway's allocator
/// (mimalloc) gives freed memory back to the system only when some thread frees a page of its
/// own after its purge delay, and a gateway that just started (or just loaded a plugin) often
/// rests: the memory stayed resident until a request or a periodic task came by (the gateway
/// with the default policies held 69 MB for about 40 s after it started, then 58). So a moment
/// after a compilation this frees a block large enough to be a page of its own, which purges
/// what is due. It allocates address space, never touched; with another allocator it is one
/// allocation and one free.
fn return_garbage_later() {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async {
        tokio::time::sleep(RETURN_GARBAGE_AFTER).await;
        let block: Vec<u8> = Vec::with_capacity(GARBAGE_TRIGGER_BYTES);
        drop(std::hint::black_box(block));
    });
}

/// Larger than mimalloc's largest size class (an object of this size gets a page to itself).
const GARBAGE_TRIGGER_BYTES: usize = 32 << 20;

/// The engine's settings. Every knob that trades memory for speed is commented.
fn engine_config(config: &PluginsConfig) -> Config {
    let mut wasm = Config::new();
    wasm.wasm_component_model(true);
    // On by default since wasmtime 43 for component-model async, which our synchronous policy
    // exports do not use; it makes every component call several times dearer.
    wasm.concurrency_support(false);
    // Deadlines: generated code checks a global epoch that a thread advances every tick.
    wasm.epoch_interruption(true);

    let instances = config.max_instances;
    let mut pool = PoolingAllocationConfig::new();
    // Component instances alive at once: calls in flight plus warm instances.
    pool.total_component_instances(instances);
    // A Rust component holds 2–4 core instances (its module and the canonical ABI's shims);
    // Python and JavaScript runtimes hold a dozen or more.
    pool.total_core_instances(instances.saturating_mul(8));
    // Linear memories and tables: one or two per component for a compiled language, more for
    // interpreted runtimes. Each memory reserves address space (not RAM) up front.
    pool.total_memories(instances.saturating_mul(2));
    pool.total_tables(instances.saturating_mul(4));
    // Async stacks: one per call in flight (calls run on a fiber so imports can await the store).
    pool.total_stacks(instances);
    // A memory may grow to the largest cap of any slot; the per-slot cap is enforced by
    // `StoreLimits`, which makes the trap say so.
    pool.max_memory_size(config.max_memory_bytes());
    // Component metadata per instance: the default 1 MiB fits Python's and JavaScript's large
    // components with room to spare; most of it is address space, touched only as needed.
    pool.max_component_instance_size(1 << 20);
    // A few slots left affine to each version keep their page mappings warm between calls.
    pool.max_unused_warm_slots(instances.min(100));
    // Resetting a memory for its next instance: with Linux's `PAGEMAP_SCAN` (6.7 and later)
    // wasmtime finds the pages the call dirtied and copies them back from the image, up to this
    // many bytes, instead of unmapping them (an `madvise` now and a page fault per page on the
    // next call). A Rust guest dirties a few pages of its stack (the top of its first MiB) and
    // of its heap, so the whole first few MiB stay resident. Without the ioctl, wasmtime falls
    // back to `memset` of the lowest `KEEP_RESIDENT_FALLBACK` bytes.
    if PoolingAllocationConfig::is_pagemap_scan_available() {
        pool.pagemap_scan(Enabled::Yes);
        pool.linear_memory_keep_resident(KEEP_RESIDENT_SCANNED);
    } else {
        pool.linear_memory_keep_resident(KEEP_RESIDENT_FALLBACK);
    }
    pool.table_keep_resident(16 << 10);
    wasm.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    wasm
}

/// Dirty bytes of a memory reset in place (copied back from its image) when the kernel can
/// say which pages were written.
const KEEP_RESIDENT_SCANNED: usize = 4 << 20;
/// Bytes reset with `memset` when it cannot: only the lowest addresses, as every call would pay
/// for all of them.
const KEEP_RESIDENT_FALLBACK: usize = 64 << 10;

/// Garbage, or a core module where a component is needed, gets a plain message before the
/// compiler's.
fn check_header(wasm: &[u8]) -> Result<(), PluginError> {
    const MAGIC: &[u8] = b"\0asm";
    if wasm.len() < 8 || &wasm[..4] != MAGIC {
        return Err(PluginError::Invalid(
            "not a WebAssembly component (no `\\0asm` header)".into(),
        ));
    }
    // Bytes 4..8: version and layer; a core module is version 1, layer 0.
    if wasm[4..8] == [1, 0, 0, 0] {
        return Err(PluginError::Invalid(
            "a core WebAssembly module, not a component: build for `wasm32-wasip2`, or wrap it \
             with `wasm-tools component new`"
                .into(),
        ));
    }
    Ok(())
}

fn import_allowed(name: &str) -> bool {
    if name.starts_with(OUR_PACKAGE) {
        return true;
    }
    ALLOWED_WASI_PACKAGES
        .iter()
        .any(|package| name.starts_with(package))
        && name.contains("@0.2.")
}

/// Explains a missing export, naming the world the component seems to implement instead.
fn wrong_world_reason(slot: Slot, missing: &[&str], exports: &[String]) -> String {
    let implemented = Slot::ALL.into_iter().find(|other| {
        *other != slot
            && bindings::required_exports(*other)
                .iter()
                .all(|name| exports.iter().any(|e| e == name))
    });
    let missing = missing.join("`, `");
    match implemented {
        Some(other) => {
            format!("it implements the `{other}` world, not `{slot}` (missing export `{missing}`)")
        }
        None => format!(
            "missing export `{missing}` of the `{slot}` world (it exports: {})",
            if exports.is_empty() {
                "nothing".to_owned()
            } else {
                exports.join(", ")
            }
        ),
    }
}

/// The thread that advances the engine's epoch every [`EPOCH_TICK`] while guest code runs, and
/// sleeps (parked, no wake-ups) once none has run for [`IDLE_TICKS_BEFORE_PARKING`] ticks: a
/// gateway with no plugin installed, or an idle one, is not woken a thousand times a second for
/// nothing, and a busy one does not wake the thread for every call (a warm call takes
/// microseconds; waking a parked thread, and parking it again, costs more than that). A thread rather than an async task:
/// a guest in an infinite loop occupies an async worker until the epoch moves, so with every
/// worker busy a task could never tick. Stopped and joined on drop.
struct EpochTicker {
    shared: Arc<TickerShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct TickerShared {
    stop: AtomicBool,
    /// Guards alive: calls and instantiations running guest code.
    running: AtomicUsize,
    /// Set while the thread parks (or is about to): the next guard wakes it.
    parked: AtomicBool,
}

/// Ticks without guest code running after which the epoch thread parks: 50 ms.
const IDLE_TICKS_BEFORE_PARKING: u32 = 50;

/// See [`PluginEngine::ticking`].
pub(crate) struct Ticking<'a>(&'a EpochTicker);

impl Drop for Ticking<'_> {
    fn drop(&mut self) {
        self.0.shared.running.fetch_sub(1, Ordering::SeqCst);
    }
}

impl EpochTicker {
    fn start(engine: &Engine) -> std::io::Result<Self> {
        let shared = Arc::new(TickerShared {
            stop: AtomicBool::new(false),
            running: AtomicUsize::new(0),
            parked: AtomicBool::new(false),
        });
        let engine = engine.weak();
        let ticker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("plugin-epoch".into())
            .spawn(move || {
                let mut idle_ticks = 0;
                while !ticker.stop.load(Ordering::Relaxed) {
                    if ticker.running.load(Ordering::SeqCst) > 0 {
                        idle_ticks = 0;
                    } else if idle_ticks < IDLE_TICKS_BEFORE_PARKING {
                        idle_ticks += 1;
                    } else {
                        // Either a guard taken from here on sees `parked` and wakes the thread,
                        // or the thread sees the guard and does not park (both orders are
                        // sequentially consistent). An unpark that came before `park` makes it
                        // return at once.
                        ticker.parked.store(true, Ordering::SeqCst);
                        if ticker.running.load(Ordering::SeqCst) == 0 {
                            std::thread::park();
                        }
                        ticker.parked.store(false, Ordering::SeqCst);
                        idle_ticks = 0;
                        continue;
                    }
                    std::thread::sleep(EPOCH_TICK);
                    match engine.upgrade() {
                        Some(engine) => engine.increment_epoch(),
                        None => return,
                    }
                }
            })?;
        Ok(EpochTicker {
            shared,
            thread: Some(thread),
        })
    }

    fn ticking(&self) -> Ticking<'_> {
        self.shared.running.fetch_add(1, Ordering::SeqCst);
        if self.shared.parked.load(Ordering::SeqCst)
            && let Some(thread) = &self.thread
        {
            thread.thread().unpark();
        }
        Ticking(self)
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}
