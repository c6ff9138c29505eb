//! One engine's supervisor: start it, wait for `/health`, watch it, restart it with backoff.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use garage_node_protocol::{EngineState, GroupMember};
use rand::Rng as _;
use tokio::sync::{oneshot, watch};
use tokio::time::{Instant, MissedTickBehavior};

use super::docker::{DockerEngine, DockerLauncher};
use super::group::{GroupInstance, GroupLauncher};
use super::process::ProcessEngine;
use super::simulated::SimulatedEngine;
use super::{EngineError, Live, http, metrics};
use crate::config::{Driver, EngineConfig, ProcessDriver, SimulatedDriver};

/// How often a starting engine is asked for `/health`: vLLM takes minutes, but the simulated
/// engine and a restarted container take well under a second, and a probe costs nothing.
const STARTUP_POLL: Duration = Duration::from_millis(250);

/// How often a healthy engine is checked (alive, `/health`) and its load scraped: the load feeds
/// routing, so it should be fresher than a heartbeat.
const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Failed `/health` checks in a row before a live engine is restarted: one slow answer under load
/// is no reason to throw away a model that took minutes to load.
const MAX_HEALTH_FAILURES: u32 = 3;

/// First restart delay; doubles per failed start up to [`MAX_BACKOFF`].
const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
/// A minute between attempts keeps a broken engine (bad model name, GPU gone) from hammering the
/// rig, and is still quick to recover once the cause is fixed.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// An engine healthy this long counts as recovered: its next failure restarts it promptly.
const STABLE_AFTER: Duration = Duration::from_secs(60);

/// Grace given to a failed engine's leftovers before they are killed: it already failed, so
/// there is nothing to drain, only the GPU memory to release cleanly.
const FAILED_STOP_GRACE: Duration = Duration::from_secs(10);

/// Runs `config`'s engine until `stop` says how much grace to give it (or is dropped: no grace).
pub(crate) async fn supervise(
    config: EngineConfig,
    live: Arc<watch::Sender<Live>>,
    members: Arc<std::sync::Mutex<Vec<GroupMember>>>,
    client: http::Client,
    stop: oneshot::Receiver<Duration>,
) {
    let mut supervisor = Supervisor {
        launcher: Launcher::new(&config, members),
        config,
        live,
        client,
        instance: None,
    };
    let grace = tokio::select! {
        never = supervisor.run() => match never {},
        grace = stop => grace.unwrap_or(Duration::ZERO),
    };
    supervisor.shut_down(grace).await;
}

struct Supervisor {
    config: EngineConfig,
    launcher: Launcher,
    live: Arc<watch::Sender<Live>>,
    client: http::Client,
    /// The running instance. Kept here rather than in `run`'s locals so that a stop arriving at
    /// any await point still finds it.
    instance: Option<Instance>,
}

impl Supervisor {
    async fn run(&mut self) -> Infallible {
        let mut backoff = Backoff::default();
        loop {
            match self.start().await {
                Ok(()) => {
                    self.set_state(EngineState::Healthy);
                    tracing::info!(engine = %self.config.name, port = self.port(), "engine is healthy");
                    self.watch(&mut backoff).await;
                }
                Err(error) => {
                    tracing::warn!(engine = %self.config.name, %error, "engine failed to start");
                }
            }
            self.live.send_modify(|live| {
                live.state = EngineState::Restarting;
                live.stats = None;
            });
            if let Some(instance) = &mut self.instance {
                instance.stop(FAILED_STOP_GRACE).await;
            }
            self.instance = None;
            let delay = backoff.next_delay();
            let mut restarts = 0;
            self.live.send_modify(|live| {
                live.restarts += 1;
                live.pid = None;
                restarts = live.restarts;
            });
            tracing::warn!(
                engine = %self.config.name,
                restarts,
                delay_ms = delay.as_millis() as u64,
                "restarting the engine in {delay:.1?}"
            );
            tokio::time::sleep(delay).await;
        }
    }

    /// Starts the engine and waits until it answers `/health`.
    async fn start(&mut self) -> Result<(), EngineError> {
        self.set_state(EngineState::Starting);
        let instance = self.launcher.start(&self.config).await?;
        let (port, pid) = (instance.port(), instance.pid());
        self.live.send_modify(|live| {
            live.port = port;
            live.pid = pid;
        });
        tracing::info!(engine = %self.config.name, port, pid, "engine started; waiting for /health");
        let instance = self.instance.insert(instance);
        let bound = Duration::from_secs(self.config.health_timeout_secs);
        let deadline = Instant::now() + bound;
        loop {
            if let Some(exit) = instance.exited().await {
                return Err(EngineError::ExitedDuringStartup(exit));
            }
            if self.client.healthy(port).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(EngineError::HealthTimeout(bound));
            }
            tokio::time::sleep(STARTUP_POLL).await;
        }
    }

    /// Watches a healthy engine and returns once it has died or stopped answering.
    async fn watch(&mut self, backoff: &mut Backoff) {
        let name = &self.config.name;
        let Some(instance) = &mut self.instance else {
            return;
        };
        let port = instance.port();
        let healthy_since = Instant::now();
        let mut failures = 0;
        let mut ticks = tokio::time::interval(CHECK_INTERVAL);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ticks.tick().await; // The first tick is immediate; the engine was just checked.
        loop {
            ticks.tick().await;
            if let Some(exit) = instance.exited().await {
                tracing::warn!(engine = %name, exit, "engine died");
                return;
            }
            if !self.client.healthy(port).await {
                failures += 1;
                tracing::warn!(engine = %name, failures, "engine failed its health check");
                if failures >= MAX_HEALTH_FAILURES {
                    tracing::warn!(engine = %name, "engine stopped answering /health");
                    return;
                }
                continue;
            }
            failures = 0;
            if healthy_since.elapsed() >= STABLE_AFTER {
                backoff.reset();
            }
            let stats = match self.client.get(port, "/metrics").await {
                Some(page) => metrics::parse(&String::from_utf8_lossy(&page)),
                None => None,
            };
            // Keep the last good scrape through a missed one: routing prefers stale load to none.
            if stats.is_some() {
                self.live.send_if_modified(|live| {
                    let changed = live.stats != stats;
                    live.stats = stats;
                    changed
                });
            } else {
                tracing::debug!(engine = %name, "no load found on /metrics");
            }
        }
    }

    async fn shut_down(mut self, grace: Duration) {
        let name = &self.config.name;
        tracing::info!(engine = %name, grace_ms = grace.as_millis() as u64, "stopping the engine");
        match &mut self.instance {
            Some(instance) => instance.stop(grace).await,
            // Stopped between attempts, or in the middle of a start: clear what a start may
            // have left (a created container).
            None => self.launcher.clean_up(&self.config).await,
        }
        self.live.send_modify(|live| {
            live.state = EngineState::Stopped;
            live.pid = None;
        });
        tracing::info!(engine = %name, "engine stopped");
    }

    fn set_state(&self, state: EngineState) {
        self.live.send_if_modified(|live| {
            let changed = live.state != state;
            live.state = state;
            changed
        });
    }

    fn port(&self) -> u16 {
        self.live.borrow().port
    }
}

/// Restart delays: doubling from [`INITIAL_BACKOFF`] to [`MAX_BACKOFF`], each drawn from its
/// upper half so that engines which failed together (a driver crash) do not restart in lockstep.
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
}

impl Backoff {
    fn next_delay(&mut self) -> Duration {
        let ceiling = INITIAL_BACKOFF
            .saturating_mul(1 << self.failures.min(16))
            .min(MAX_BACKOFF);
        self.failures = self.failures.saturating_add(1);
        ceiling.mul_f64(rand::rng().random_range(0.5..=1.0))
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}

/// Starts instances of one engine; holds what outlives an instance (the Docker connection).
enum Launcher {
    Process(ProcessDriver),
    Simulated(SimulatedDriver),
    Docker(Box<DockerLauncher>),
    Group(Box<GroupLauncher>),
}

impl Launcher {
    fn new(config: &EngineConfig, members: Arc<std::sync::Mutex<Vec<GroupMember>>>) -> Launcher {
        match &config.driver {
            Driver::Process(driver) => match &driver.group {
                Some(group) => {
                    Launcher::Group(Box::new(GroupLauncher::new(driver, group, members)))
                }
                None => Launcher::Process(driver.clone()),
            },
            Driver::Simulated(driver) => Launcher::Simulated(driver.clone()),
            Driver::Docker(driver) => Launcher::Docker(Box::new(DockerLauncher::new(driver))),
        }
    }

    async fn start(&mut self, config: &EngineConfig) -> Result<Instance, EngineError> {
        match self {
            Launcher::Process(driver) => {
                ProcessEngine::spawn(config, driver).map(Instance::Process)
            }
            Launcher::Simulated(driver) => SimulatedEngine::start(config, driver)
                .await
                .map(Instance::Simulated),
            Launcher::Docker(launcher) => launcher
                .start(config)
                .await
                .map(|engine| Instance::Docker(Box::new(engine))),
            Launcher::Group(launcher) => launcher
                .start(config)
                .await
                .map(|group| Instance::Group(Box::new(group))),
        }
    }

    async fn clean_up(&mut self, config: &EngineConfig) {
        if let Launcher::Docker(launcher) = self {
            launcher.remove_leftover(config).await;
        }
    }
}

/// A running engine, whatever its driver.
enum Instance {
    Process(ProcessEngine),
    Simulated(SimulatedEngine),
    Docker(Box<DockerEngine>),
    Group(Box<GroupInstance>),
}

impl Instance {
    fn port(&self) -> u16 {
        match self {
            Instance::Process(engine) => engine.port(),
            Instance::Simulated(engine) => engine.port(),
            Instance::Docker(engine) => engine.port(),
            Instance::Group(group) => group.port(),
        }
    }

    fn pid(&self) -> Option<u32> {
        match self {
            Instance::Process(engine) => Some(engine.pid()),
            Instance::Group(group) => Some(group.pid()),
            Instance::Simulated(_) | Instance::Docker(_) => None,
        }
    }

    /// `Some(how)` once the engine is gone. A container engine that cannot be asked counts as
    /// alive: the health check decides.
    async fn exited(&mut self) -> Option<String> {
        match self {
            Instance::Process(engine) => engine.exited(),
            Instance::Simulated(_) => None,
            Instance::Docker(engine) => engine.exited().await,
            Instance::Group(group) => group.exited().await,
        }
    }

    /// Stops the engine, waiting up to `grace` before forcing it. Safe to call again.
    async fn stop(&mut self, grace: Duration) {
        match self {
            Instance::Process(engine) => engine.stop(grace).await,
            Instance::Simulated(engine) => engine.stop(grace).await,
            Instance::Docker(engine) => engine.stop(grace).await,
            Instance::Group(group) => group.stop(grace).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_minute_with_jitter_and_resets() {
        let mut backoff = Backoff::default();
        let ceilings = [1, 2, 4, 8, 16, 32, 60, 60, 60];
        for ceiling in ceilings {
            let delay = backoff.next_delay();
            let ceiling = Duration::from_secs(ceiling);
            assert!(
                delay <= ceiling && delay >= ceiling / 2,
                "{delay:?} vs {ceiling:?}"
            );
        }
        for _ in 0..100 {
            backoff.next_delay();
        }
        assert!(backoff.next_delay() <= MAX_BACKOFF);
        backoff.reset();
        assert!(backoff.next_delay() <= INITIAL_BACKOFF);
    }
}
