//! The `node-runner` command line.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::agent::{Agent, AgentOptions};
use crate::config::{Driver, EngineConfig, NodeConfig, SimulatedDriver};
use crate::engines::EngineSet;

#[derive(Parser)]
#[command(
    name = "node-runner",
    version,
    about = "Garage rig agent: serves this rig's GPUs to a Garage gateway, with no port forwarding"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log as JSON lines.
    #[arg(long, global = true)]
    log_json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run the rig: enroll (first time), start the engines, connect to the gateway.
    Run {
        /// The rig's TOML config.
        #[arg(long, short, default_value = "node-runner.toml")]
        config: PathBuf,
    },
    /// Fetch this rig's statement from the gateway (its requests, what was billed, its
    /// receipts) and check every receipt in it against the rig's own key; fails when one does
    /// not hold.
    Statement {
        /// The rig's TOML config (its gateway and state file).
        #[arg(long, short, default_value = "node-runner.toml")]
        config: PathBuf,
    },
    /// Run many simulated rigs in this one process (load and scale testing, no GPU needed).
    Swarm {
        /// Gateway base URL; for several replicas of one gateway, their URLs separated by
        /// commas (each rig keeps its tunnel on one and moves when that one goes away).
        #[arg(long, value_parser = gateway_list)]
        gateway: String,
        /// An enrollment token good for `--count` rigs.
        #[arg(long)]
        token: String,
        /// Number of rigs.
        #[arg(long, default_value_t = 10)]
        count: usize,
        /// Models each rig serves.
        #[arg(long = "model", default_value = "sim-llama-3-8b")]
        models: Vec<String>,
        /// Simulated time to first token, milliseconds.
        #[arg(long, default_value_t = 0)]
        ttft_ms: u64,
        /// Simulated decode speed (0: no delay).
        #[arg(long, default_value_t = 0.0)]
        tokens_per_sec: f64,
    },
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// The engine of one simulated rig.
pub fn simulated_engine(
    name: &str,
    models: &[String],
    ttft_ms: u64,
    tokens_per_sec: f64,
) -> EngineConfig {
    EngineConfig {
        name: name.into(),
        models: models.to_vec(),
        gpus: Vec::new(),
        port: 0,
        driver: Driver::Simulated(SimulatedDriver {
            ttft_ms,
            tokens_per_sec,
            ..SimulatedDriver::default()
        }),
        health_timeout_secs: 30,
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    init_logging(cli.log_json);
    match cli.command {
        Command::Run { config } => {
            let config = NodeConfig::load_file(&config, std::env::vars())
                .with_context(|| format!("cannot load {}", config.display()))?;
            let name = config.node_name();
            let http = config
                .gateway_ca_file
                .as_deref()
                .map(crate::agent::http_client_trusting)
                .transpose()?;
            let engines = EngineSet::start(config.engines.clone()).await;
            let agent = Agent::start(
                AgentOptions {
                    gateway_url: config.gateways().join(","),
                    name,
                    enrollment_token: config.enrollment_token.clone(),
                    state_file: Some(config.state_file.clone()),
                    heartbeat_interval: config.heartbeat_interval_secs.map(Duration::from_secs),
                    drain_timeout: Duration::from_secs(config.drain_timeout_secs),
                    http,
                    probe_gpus: true,
                    batch: config.batch.options(),
                    labels: config.labels.clone(),
                },
                engines,
            )
            .await
            .context("cannot join the gateway")?;
            tracing::info!(node = %agent.node_id(), gateways = %config.gateways().join(","), "rig running; Ctrl-C drains and stops");
            let revoked = tokio::select! {
                result = wait_for_signal() => { result?; false }
                _ = agent.revoked() => true,
            };
            tracing::info!("draining");
            agent.shutdown().await;
            if revoked {
                anyhow::bail!("this rig was removed by the gateway's admin");
            }
            tracing::info!("stopped cleanly");
            Ok(())
        }
        Command::Statement { config } => {
            let config = NodeConfig::load_file(&config, std::env::vars())
                .with_context(|| format!("cannot load {}", config.display()))?;
            let identity = crate::agent::read_identity(&config.state_file)?.with_context(|| {
                format!(
                    "no identity in {}: the rig has not enrolled yet",
                    config.state_file.display()
                )
            })?;
            let http = match config.gateway_ca_file.as_deref() {
                Some(ca_file) => crate::agent::http_client_trusting(ca_file)?,
                None => crate::agent::http_client(),
            };
            let gateways = crate::gateways::Gateways::new(&config.gateways(), &identity.node_id)?;
            let report = crate::agent::check_statement_of(&identity, &gateways, &http).await?;
            print!("{report}");
            if !report.mismatches.is_empty() {
                anyhow::bail!(
                    "{} receipts in the statement do not hold for this rig",
                    report.mismatches.len()
                );
            }
            Ok(())
        }
        Command::Swarm {
            gateway,
            token,
            count,
            models,
            ttft_ms,
            tokens_per_sec,
        } => {
            let http = crate::agent::http_client();
            let mut agents = Vec::with_capacity(count);
            for i in 0..count {
                let engines = EngineSet::start(vec![simulated_engine(
                    "sim",
                    &models,
                    ttft_ms,
                    tokens_per_sec,
                )])
                .await;
                let agent = Agent::start(
                    AgentOptions {
                        gateway_url: gateway.clone(),
                        name: format!("swarm-rig-{}", i + 1),
                        enrollment_token: Some(token.clone()),
                        state_file: None,
                        heartbeat_interval: None,
                        drain_timeout: Duration::from_secs(10),
                        http: Some(http.clone()),
                        probe_gpus: false,
                        batch: crate::batch::BatchOptions::default(),
                        labels: Default::default(),
                    },
                    engines,
                )
                .await
                .with_context(|| format!("rig {} cannot join", i + 1))?;
                agents.push(agent);
            }
            println!("{count} simulated rigs running; Ctrl-C stops them");
            wait_for_signal().await?;
            futures::future::join_all(agents.into_iter().map(Agent::shutdown)).await;
            Ok(())
        }
    }
}

/// `--gateway`: one URL or a comma-separated list of replicas, checked before any rig starts.
fn gateway_list(list: &str) -> Result<String, crate::gateways::GatewaysError> {
    crate::gateways::Gateways::parse(list, "")?;
    Ok(list.to_owned())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("cannot listen for SIGINT")?,
        _ = terminate.recv() => {}
    }
    Ok(())
}
