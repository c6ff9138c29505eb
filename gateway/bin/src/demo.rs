//! `gateway demo`: the gateway, simulated rigs and a ready API key, in one command.
//!
//! The rigs are real `node-runner` agents (in this process) with simulated engines: they enroll
//! with a token, open their tunnels and send heartbeats exactly as rigs in garages do.

use std::time::{Duration, Instant};

use garage_node_runner::agent::{Agent, AgentError, AgentOptions};
use garage_node_runner::cli::simulated_engine;
use garage_node_runner::config::Driver;
use garage_node_runner::engines::EngineSet;

use garage_gateway::config::Config;
use garage_gateway::nodes::CreateEnrollmentToken;
use garage_gateway::nodes::operators::CreateOperator;
use garage_gateway::server::{Gateway, StartError};

/// Models the simulated rigs serve: two chat models and an embedding model.
pub const DEMO_MODELS: &[&str] = &[
    "llama-3.1-8b-instruct",
    "qwen2.5-7b-instruct",
    "bge-small-en",
];

/// The GPUs the simulated rigs report, in turn (their load follows the engine's).
const DEMO_GPUS: &[&str] = &[
    "NVIDIA GeForce RTX 4090",
    "NVIDIA GeForce RTX 3090",
    "NVIDIA GeForce RTX 4080",
];

/// The operator the demo's rigs belong to.
const DEMO_OPERATOR: &str = "demo-operator";
/// Rigs come up in well under a second on loopback; this only bounds a broken start.
const RIGS_READY_BOUND: Duration = Duration::from_secs(30);

pub struct DemoOptions {
    pub nodes: usize,
    pub api_key: Option<String>,
    /// Simulated time to first token.
    pub ttft: Duration,
    /// Simulated decode speed; 0 for no delay.
    pub tokens_per_sec: f64,
}

/// Spot checks every this often in the demo (600 s by default): its rigs pass the three that
/// make them verified, and start earning, within a minute.
const DEMO_SPOT_CHECK_INTERVAL_SECS: u64 = 15;

/// The demo's gateway counts its rigs' tokens itself, with the simulated engine's tokenizer, and
/// checks them often: the default reward pays only verified, gateway-counted work, and the
/// demo should show some.
fn trust_the_simulated_rigs(config: &mut Config) -> Result<(), DemoError> {
    config.trust.spot_check_interval_secs = DEMO_SPOT_CHECK_INTERVAL_SECS;
    if !config.tokenizers.is_empty() {
        return Ok(());
    }
    let file =
        std::env::temp_dir().join(format!("garage-demo-tokenizer-{}.json", std::process::id()));
    std::fs::write(&file, garage_sim_engine::TOKENIZER_JSON).map_err(|err| {
        DemoError::Setup(format!(
            "cannot write the simulated tokenizer to {}: {err}",
            file.display()
        ))
    })?;
    for model in DEMO_MODELS {
        config.tokenizers.insert(
            (*model).to_owned(),
            garage_gateway::config::TokenizerConfig {
                file: file.clone(),
                chat_template_tokens: garage_sim_engine::CHAT_TEMPLATE_TOKENS,
            },
        );
    }
    Ok(())
}

/// A running demo: the gateway, its rigs and the key it made.
pub struct Demo {
    pub gateway: Gateway,
    pub rigs: Vec<Agent>,
    pub api_key: String,
    /// The demo operator's token: a rig owner's console login.
    pub operator_token: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("cannot set up the demo: {0}")]
    Setup(String),
    #[error("a simulated rig cannot join: {0}")]
    Rig(#[from] AgentError),
    #[error("the simulated rigs did not come up within {0:?}")]
    RigsNotReady(Duration),
}

impl Demo {
    pub async fn start(mut config: Config, options: DemoOptions) -> Result<Demo, DemoError> {
        trust_the_simulated_rigs(&mut config)?;
        let gateway = Gateway::start(config).await?;
        let state = gateway.state();
        let (_, api_key) = state
            .auth()
            .create(
                "demo".into(),
                None,
                Default::default(),
                options.api_key,
                None,
            )
            .await
            .map_err(|e| DemoError::Setup(e.to_string()))?;
        let operator_token = state
            .nodes()
            .create_operator(CreateOperator {
                name: DEMO_OPERATOR.into(),
            })
            .await
            .map_err(|e| DemoError::Setup(e.to_string()))?
            .token;
        let token = state
            .nodes()
            .create_enrollment_token(CreateEnrollmentToken {
                operator: DEMO_OPERATOR.into(),
                expires_in_secs: Some(600),
                max_uses: Some(options.nodes as u32),
            })
            .await
            .map_err(|e| DemoError::Setup(e.to_string()))?;
        let models: Vec<String> = DEMO_MODELS.iter().map(|m| m.to_string()).collect();
        let http = garage_node_runner::agent::http_client();
        let mut rigs = Vec::with_capacity(options.nodes);
        for i in 0..options.nodes {
            let mut engine = simulated_engine(
                "sim-vllm",
                &models,
                options.ttft.as_millis() as u64,
                options.tokens_per_sec,
            );
            if let Driver::Simulated(sim) = &mut engine.driver {
                sim.reported_gpus = vec![DEMO_GPUS[i % DEMO_GPUS.len()].to_owned()];
            }
            let engines = EngineSet::start(vec![engine]).await;
            let rig = Agent::start(
                AgentOptions {
                    gateway_url: gateway.url(),
                    name: format!("sim-rig-{}", i + 1),
                    enrollment_token: Some(token.token.clone()),
                    state_file: None,
                    heartbeat_interval: None,
                    drain_timeout: Duration::from_secs(10),
                    http: Some(http.clone()),
                    probe_gpus: false,
                    batch: garage_node_runner::batch::BatchOptions::default(),
                    labels: Default::default(),
                },
                engines,
            )
            .await?;
            rigs.push(rig);
        }
        let started = Instant::now();
        while state.backends().snapshot().healthy_count() < options.nodes {
            if started.elapsed() > RIGS_READY_BOUND {
                return Err(DemoError::RigsNotReady(RIGS_READY_BOUND));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Demo {
            gateway,
            rigs,
            api_key,
            operator_token,
        })
    }

    /// Drains the rigs, then stops the gateway within `grace`.
    pub async fn shutdown(self, grace: Duration) -> bool {
        let finished = self.gateway.shutdown(grace).await;
        futures::future::join_all(self.rigs.into_iter().map(Agent::shutdown)).await;
        finished
    }

    /// What the demo prints for a person to try it.
    pub fn banner(&self) -> String {
        let url = self.gateway.url();
        let model = DEMO_MODELS[0];
        // The `garage` command line is built beside this binary (scripts/demo.sh builds both).
        let garage = std::env::current_exe()
            .ok()
            .and_then(|exe| Some(exe.parent()?.join("garage")))
            .filter(|path| path.exists())
            .map_or_else(|| "garage".to_owned(), |path| path.display().to_string());
        format!(
            "\nGarage AI gateway demo is running with {rigs} simulated rigs (node-runner agents \
             with simulated vLLM engines, connected through their tunnels).\n\n\
             \x20 listen address  {addr}\n\
             \x20 OpenAI base URL {url}/v1\n\
             \x20 API key         {key}\n\
             \x20 admin token     in {admin_file}\n\
             \x20 models          {models}\n\
             \x20 console         {url}/console\n\
             \x20   operator      log in with the admin token (in {admin_file})\n\
             \x20   rig owner     log in with {operator} (the demo rigs' operator)\n\
             \x20   app developer log in with the API key above\n\
             \x20 API docs        {url}/docs\n\
             \x20 rigs            curl -H \"Authorization: Bearer $(cat {admin_file})\" {url}/admin/nodes\n\n\
             Try it:\n\n\
             \x20 curl {url}/v1/chat/completions \\\n\
             \x20   -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \\\n\
             \x20   -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'\n\n\
             Add \"stream\": true for a streamed answer (curl -N).\n\n\
             A batch job, run by the rigs when they have room (one prompt per line):\n\n\
             \x20 printf 'Hello!\\nWhat is a GPU?\\n' > prompts.txt\n\
             \x20 GARAGE_URL={url} GARAGE_API_KEY={key} {garage} job submit \\\n\
             \x20   --model {model} --input prompts.txt --wait\n\n\
             Ctrl-C stops.\n",
            rigs = self.rigs.len(),
            addr = self.gateway.addr(),
            key = self.api_key,
            admin_file = self.gateway.admin_token_file().map_or_else(
                || "the config (auth.admin_token)".to_owned(),
                |p| p.display().to_string()
            ),
            models = DEMO_MODELS.join(", "),
            operator = self.operator_token,
        )
    }
}
