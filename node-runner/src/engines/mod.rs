//! The rig's engines: each one runs under its own supervisor task, which starts it through its
//! driver (a container, a process, or the simulated engine in-process), waits for `/health`,
//! watches it, scrapes its load from `/metrics`, and restarts it with backoff when it dies.
//!
//! [`EngineSet`] is the handle the rest of node-runner uses: current statuses for heartbeats, and
//! the address of a healthy engine for a model when a request arrives through the tunnel.

pub mod docker;
pub mod group;
mod http;
pub mod metrics;
mod output;
mod process;
mod simulated;
mod supervisor;
pub mod vllm;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::OptionFuture;
use garage_node_protocol::{EngineState, EngineStats, EngineStatus};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::config::EngineConfig;

pub use docker::container_spec;

/// Why an engine could not be started or checked. The supervisor logs it and retries.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot start `{program}`: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot connect to the container engine at {host}: {source}")]
    DockerConnect {
        host: String,
        source: bollard::errors::Error,
    },
    #[error("container engine: {action}: {source}")]
    Docker {
        action: &'static str,
        source: bollard::errors::Error,
    },
    #[error("exited during startup ({0})")]
    ExitedDuringStartup(String),
    #[error("no answer on /health within {0:?}")]
    HealthTimeout(Duration),
}

/// What a supervisor publishes about its engine; read without waiting by [`EngineSet`].
#[derive(Debug, Clone)]
pub(crate) struct Live {
    pub state: EngineState,
    pub restarts: u32,
    pub stats: Option<EngineStats>,
    /// The port it listens on now (a simulated engine on port 0 gets a new one per start).
    pub port: u16,
    /// The process id, for the process driver.
    pub pid: Option<u32>,
}

struct Engine {
    name: String,
    models: Vec<String>,
    /// GPUs a simulated engine reports (`reported_gpus` in its config).
    simulated_gpus: Vec<String>,
    live: Arc<watch::Sender<Live>>,
    /// An engine group's members as its head last saw them (empty for other engines).
    members: Arc<Mutex<Vec<garage_node_protocol::GroupMember>>>,
    /// Tells the supervisor to stop its engine, with this grace; taken by the first stop.
    stop: Mutex<Option<oneshot::Sender<Duration>>>,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// The rig's engines, each under its own supervisor task.
pub struct EngineSet {
    engines: Vec<Engine>,
    /// Breaks ties between equally loaded engines serving the same model.
    next: AtomicUsize,
}

impl EngineSet {
    /// Spawns one supervisor per engine and returns at once; engines come up in the background
    /// (see [`EngineSet::wait_healthy`]). Expects a validated config (unique names and ports).
    pub async fn start(engines: Vec<EngineConfig>) -> EngineSet {
        let client = http::Client::new();
        let engines = engines
            .into_iter()
            .map(|config| {
                let live = Arc::new(watch::Sender::new(Live {
                    state: EngineState::Starting,
                    restarts: 0,
                    stats: None,
                    port: config.port,
                    pid: None,
                }));
                let (stop, stop_rx) = oneshot::channel();
                let name = config.name.clone();
                let models = config.models.clone();
                let simulated_gpus = match &config.driver {
                    crate::config::Driver::Simulated(sim) => sim.reported_gpus.clone(),
                    _ => Vec::new(),
                };
                let members = Arc::new(Mutex::new(Vec::new()));
                let task = tokio::spawn(supervisor::supervise(
                    config,
                    live.clone(),
                    Arc::clone(&members),
                    client.clone(),
                    stop_rx,
                ));
                Engine {
                    name,
                    models,
                    simulated_gpus,
                    live,
                    members,
                    stop: Mutex::new(Some(stop)),
                    task: Mutex::new(Some(task)),
                }
            })
            .collect();
        EngineSet {
            engines,
            next: AtomicUsize::new(0),
        }
    }

    /// Every engine's state, restart count and last scraped load, in config order.
    pub fn statuses(&self) -> Vec<EngineStatus> {
        self.engines
            .iter()
            .map(|engine| {
                let live = engine.live.borrow();
                EngineStatus {
                    name: engine.name.clone(),
                    models: engine.models.clone(),
                    state: live.state,
                    restarts: live.restarts,
                    stats: live.stats,
                    members: lock(&engine.members).clone(),
                }
            })
            .collect()
    }

    /// The GPUs simulated engines say they run on, for a rig where NVML finds none: each at
    /// 24 GiB, busy and warm in proportion to its engine's requests and KV cache.
    pub fn simulated_gpus(&self) -> Vec<garage_node_protocol::GpuStats> {
        const MEMORY: u64 = 24 << 30;
        let mut gpus = Vec::new();
        for engine in &self.engines {
            let stats = engine.live.borrow().stats.unwrap_or_default();
            let busy = (stats.requests_running * 25.0).clamp(0.0, 100.0) as u32;
            let kv = stats.kv_cache_usage.clamp(0.0, 1.0);
            for (i, name) in engine.simulated_gpus.iter().enumerate() {
                gpus.push(garage_node_protocol::GpuStats {
                    index: gpus.len() as u32,
                    name: name.clone(),
                    uuid: format!("GPU-simulated-{}-{i}", engine.name),
                    memory_total_bytes: MEMORY,
                    // Weights take about half, the KV cache the rest as it fills.
                    memory_used_bytes: MEMORY / 2 + (MEMORY as f64 / 2.0 * kv) as u64,
                    utilization_percent: busy,
                    temperature_celsius: 40 + busy * 4 / 10,
                    power_watts: 60.0 + f64::from(busy) * 3.0,
                });
            }
        }
        gpus
    }

    /// `http://127.0.0.1:PORT` (no `/v1`) of a healthy engine serving `model`: the least loaded
    /// (requests running + waiting) when several do, taking turns among equals.
    pub fn base_url_for(&self, model: &str) -> Option<String> {
        let candidates: Vec<(u16, f64)> = self
            .engines
            .iter()
            .filter(|engine| engine.models.iter().any(|m| m == model))
            .filter_map(|engine| {
                let live = engine.live.borrow();
                (live.state == EngineState::Healthy).then(|| {
                    let load = live
                        .stats
                        .map_or(0.0, |s| s.requests_running + s.requests_waiting);
                    (live.port, load)
                })
            })
            .collect();
        let least = candidates
            .iter()
            .map(|(_, load)| *load)
            .min_by(f64::total_cmp)?;
        let idle: Vec<u16> = candidates
            .iter()
            .filter(|(_, load)| *load == least)
            .map(|(port, _)| *port)
            .collect();
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % idle.len();
        Some(format!("http://127.0.0.1:{}", idle[turn]))
    }

    /// Models served by healthy engines, sorted, without repeats.
    pub fn healthy_models(&self) -> Vec<String> {
        let mut models: Vec<String> = self
            .engines
            .iter()
            .filter(|engine| engine.live.borrow().state == EngineState::Healthy)
            .flat_map(|engine| engine.models.iter().cloned())
            .collect();
        models.sort();
        models.dedup();
        models
    }

    /// Whether a healthy engine has more than `max_waiting` requests queued (last scrape): it
    /// is full, and batch work should wait.
    pub fn busy(&self, max_waiting: u32) -> bool {
        self.engines.iter().any(|engine| {
            let live = engine.live.borrow();
            live.state == EngineState::Healthy
                && live
                    .stats
                    .is_some_and(|s| s.requests_waiting > f64::from(max_waiting))
        })
    }

    /// Whether any engine is healthy (the rig can take some request).
    pub fn serves_any(&self) -> bool {
        self.engines
            .iter()
            .any(|engine| engine.live.borrow().state == EngineState::Healthy)
    }

    /// Waits until every engine is healthy at once; false if `bound` passes first.
    pub async fn wait_healthy(&self, bound: Duration) -> bool {
        let all = async {
            let mut receivers: Vec<_> = self.engines.iter().map(|e| e.live.subscribe()).collect();
            loop {
                for receiver in &mut receivers {
                    // The sender lives in `self`, so this only fails if the set is gone.
                    if receiver
                        .wait_for(|live| live.state == EngineState::Healthy)
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                // One may have fallen over while we waited for another: check them together.
                if receivers
                    .iter()
                    .all(|r| r.borrow().state == EngineState::Healthy)
                {
                    return;
                }
            }
        };
        tokio::time::timeout(bound, all).await.is_ok()
    }

    /// The process id of a process-driver engine while it runs.
    pub fn pid(&self, engine: &str) -> Option<u32> {
        self.find(engine)?.live.borrow().pid
    }

    /// The port an engine listens on now (for a simulated engine on port 0, the one it picked).
    pub fn port(&self, engine: &str) -> Option<u16> {
        Some(self.find(engine)?.live.borrow().port)
    }

    /// Waits until `engine` is in `state` with at least `min_restarts` restarts behind it; false
    /// if `bound` passes first or there is no such engine.
    pub async fn wait_for_state(
        &self,
        engine: &str,
        state: EngineState,
        min_restarts: u32,
        bound: Duration,
    ) -> bool {
        let Some(engine) = self.find(engine) else {
            return false;
        };
        let mut receiver = engine.live.subscribe();
        let reached =
            receiver.wait_for(|live| live.state == state && live.restarts >= min_restarts);
        matches!(tokio::time::timeout(bound, reached).await, Ok(Ok(_)))
    }

    /// Stops every engine (all at once): SIGTERM then SIGKILL after `grace` for processes, a
    /// stop with `grace` then removal for containers, a shutdown for simulated engines. Every
    /// state ends `Stopped`.
    pub async fn stop(self, grace: Duration) {
        self.shutdown(grace).await;
    }

    /// [`EngineSet::stop`] for a shared set (e.g. behind an `Arc`); statuses stay readable and
    /// say `Stopped`. A second call finds nothing left to stop.
    pub async fn shutdown(&self, grace: Duration) {
        let tasks = self.engines.iter().map(|engine| {
            // A supervisor that already ended dropped its receiver: nothing to tell it.
            if let Some(stop) = lock(&engine.stop).take() {
                let _ = stop.send(grace);
            }
            let task = lock(&engine.task).take();
            async move {
                if let Some(Err(error)) = OptionFuture::from(task).await {
                    tracing::error!(engine = %engine.name, %error, "engine supervisor failed");
                }
                engine.live.send_modify(|live| {
                    live.state = EngineState::Stopped;
                    live.pid = None;
                });
            }
        });
        futures::future::join_all(tasks).await;
    }

    fn find(&self, name: &str) -> Option<&Engine> {
        self.engines.iter().find(|engine| engine.name == name)
    }
}

/// The guarded values are plain `Option`s, valid whatever a panicking holder left behind.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl std::fmt::Debug for EngineSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.statuses()).finish()
    }
}
