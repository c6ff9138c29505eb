//! The `simulated` driver: the simulated vLLM engine, served from inside node-runner.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use garage_sim_engine::{Faults, SimConfig, SimEngine};

use super::EngineError;
use crate::config::{EngineConfig, SimulatedDriver};

pub(crate) struct SimulatedEngine {
    engine: Option<SimEngine>,
    port: u16,
}

impl SimulatedEngine {
    pub(crate) async fn start(
        config: &EngineConfig,
        driver: &SimulatedDriver,
    ) -> Result<SimulatedEngine, EngineError> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, config.port));
        let sim_config = SimConfig {
            models: config.models.clone(),
            ttft: Duration::from_millis(driver.ttft_ms),
            tokens_per_sec: driver.tokens_per_sec,
            default_max_tokens: driver.default_max_tokens,
            max_num_seqs: driver.max_num_seqs,
            faults: Faults {
                error_rate: driver.error_rate,
                hang_rate: driver.hang_rate,
                drop_rate: driver.drop_rate,
                claim_tokens: driver.claim_tokens,
                impersonate: driver.impersonate.clone(),
                usage_inflation: driver.usage_inflation,
            },
            logprob_noise: driver.logprob_noise,
            ..SimConfig::default()
        };
        let engine = SimEngine::start(addr, sim_config)
            .await
            .map_err(|source| EngineError::Listen { addr, source })?;
        Ok(SimulatedEngine {
            // Started on TCP, so bound to a port (the one asked for, or a free one for 0).
            port: engine.addr().map_or(addr.port(), |bound| bound.port()),
            engine: Some(engine),
        })
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// Ends hung and paced requests and waits up to `grace` for connections to close.
    pub(crate) async fn stop(&mut self, grace: Duration) {
        if let Some(engine) = self.engine.take() {
            // On timeout the shutdown future is dropped; the engine's own drop has already
            // told its server to wind down.
            let _ = tokio::time::timeout(grace, engine.shutdown()).await;
        }
    }
}
