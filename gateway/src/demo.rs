//! `gateway demo`: the gateway, simulated rigs and a ready API key, in one command.

use std::net::SocketAddr;
use std::time::Duration;

use garage_sim_engine::{SimConfig, SimEngine};

use crate::config::{Config, UpstreamConfig};
use crate::server::{Gateway, StartError};

/// Models the simulated rigs serve: two chat models and an embedding model.
pub const DEMO_MODELS: &[&str] = &[
    "llama-3.1-8b-instruct",
    "qwen2.5-7b-instruct",
    "bge-small-en",
];

pub struct DemoOptions {
    pub nodes: usize,
    pub api_key: Option<String>,
    /// Simulated time to first token.
    pub ttft: Duration,
    /// Simulated decode speed; 0 for no delay.
    pub tokens_per_sec: f64,
}

/// A running demo: the gateway, its rigs and the key it made.
pub struct Demo {
    pub gateway: Gateway,
    pub engines: Vec<SimEngine>,
    pub api_key: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot start a simulated rig: {0}")]
    Engine(std::io::Error),
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("cannot create the demo API key: {0}")]
    Key(#[from] crate::store::StoreError),
}

impl Demo {
    pub async fn start(mut config: Config, options: DemoOptions) -> Result<Demo, DemoError> {
        let mut engines = Vec::with_capacity(options.nodes);
        for i in 0..options.nodes {
            let sim = SimConfig {
                models: DEMO_MODELS.iter().map(|m| m.to_string()).collect(),
                ttft: options.ttft,
                tokens_per_sec: options.tokens_per_sec,
                ..SimConfig::default()
            };
            let engine = SimEngine::start(SocketAddr::from(([127, 0, 0, 1], 0)), sim)
                .await
                .map_err(DemoError::Engine)?;
            config.upstreams.push(UpstreamConfig {
                name: format!("sim-rig-{}", i + 1),
                base_url: engine.base_url(),
                models: DEMO_MODELS.iter().map(|m| m.to_string()).collect(),
                api_key: None,
                health_path: Some("/health".into()),
            });
            engines.push(engine);
        }
        let gateway = Gateway::start(config).await?;
        let (_, api_key) = gateway
            .state()
            .auth
            .create("demo".into(), None, Default::default(), options.api_key)
            .await?;
        Ok(Demo {
            gateway,
            engines,
            api_key,
        })
    }

    /// What the demo prints for a person to try it.
    pub fn banner(&self) -> String {
        let url = self.gateway.url();
        let model = DEMO_MODELS[0];
        format!(
            "\nGarage AI gateway demo is running with {rigs} simulated rigs.\n\n\
             \x20 listen address  {addr}\n\
             \x20 OpenAI base URL {url}/v1\n\
             \x20 API key         {key}\n\
             \x20 admin token     {admin}\n\
             \x20 models          {models}\n\
             \x20 API docs        {url}/docs\n\n\
             Try it:\n\n\
             \x20 curl {url}/v1/chat/completions \\\n\
             \x20   -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\\n\
             \x20   -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'\n\n\
             Add \"stream\": true for a streamed answer (curl -N). Ctrl-C stops.\n",
            rigs = self.engines.len(),
            addr = self.gateway.addr(),
            key = self.api_key,
            admin = self.gateway.admin_token(),
            models = DEMO_MODELS.join(", "),
        )
    }
}
