//! The `node-runner` command line.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::agent::{Agent, AgentOptions};
use crate::config::{Driver, EngineConfig, NodeConfig, SimulatedDriver};
use crate::doctor::DoctorOptions;
use crate::engines::EngineSet;
use crate::probe::GpuInventory;
use crate::setup::SetupOptions;

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
    /// Exit 0 when this rig has enrolled and every engine on a fixed port answers `/health` on
    /// 127.0.0.1, 1 otherwise, saying what failed: the container image's health check, which
    /// has no curl (deploy/docker/node-runner.Dockerfile).
    Health {
        /// The rig's TOML config (its state file and engines).
        #[arg(long, short, default_value = "node-runner.toml")]
        config: PathBuf,
    },
    /// Set this rig up in one command: find the GPUs and the container engine, take the
    /// gateway and a token, pick a model that fits, write the config, enroll, start and
    /// benchmark the engine, and install the systemd unit (as root) or say how.
    Setup {
        /// Write below this directory instead of `/` (etc/node-runner, var/lib/node-runner,
        /// etc/systemd/system): a dry run, or tests.
        #[arg(long, default_value = "/")]
        root: PathBuf,
        /// The gateway's URL (asked for on a terminal when missing).
        #[arg(long)]
        gateway_url: Option<String>,
        /// An enrollment token from the gateway's admin (asked for on a terminal when missing).
        #[arg(long, env = "NODE_RUNNER_ENROLLMENT_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// The model to serve; by default the largest of the catalogue that fits the GPUs.
        #[arg(long)]
        model: Option<String>,
        /// The rig's name at the gateway (the hostname when unset).
        #[arg(long)]
        name: Option<String>,
        /// A PEM file of the private CA the gateway's certificate comes from.
        #[arg(long)]
        gateway_ca_file: Option<PathBuf>,
        /// Allow a plain http:// gateway on another machine (a LAN you trust).
        #[arg(long)]
        allow_insecure_http: bool,
        /// The container engine's API (`unix:///run/podman/podman.sock`, `tcp://…`); by
        /// default DOCKER_HOST or the local socket.
        #[arg(long)]
        docker_host: Option<String>,
        /// Take these GPUs instead of asking NVML: `none`, or `NAME:GIB` items separated by
        /// commas (`NVIDIA GeForce RTX 4090:24,NVIDIA GeForce RTX 4090:24`).
        #[arg(long, value_parser = gpu_inventory)]
        assume_gpus: Option<GpuInventory>,
        /// The engine's port on 127.0.0.1.
        #[arg(long, default_value_t = 8001)]
        port: u16,
        /// Answer yes to every question: overwrite a config, take the first proposed model.
        #[arg(long, short)]
        yes: bool,
        /// Write the config and the unit only: no engine, no enrollment, no service.
        #[arg(long)]
        no_start: bool,
    },
    /// Check this rig and explain what is wrong, one line per check: the gateway (reachable,
    /// TLS), the enrollment, Docker and GPU passthrough, the GPUs, the engines' ports and
    /// health. Exits non-zero when a check fails.
    Doctor {
        /// The rig's TOML config.
        #[arg(long, short, default_value = "/etc/node-runner/node-runner.toml")]
        config: PathBuf,
        /// Take these GPUs instead of asking NVML (as for `setup`).
        #[arg(long, value_parser = gpu_inventory)]
        assume_gpus: Option<GpuInventory>,
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

fn gpu_inventory(spec: &str) -> Result<GpuInventory, String> {
    GpuInventory::parse(spec)
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    // setup and doctor talk to a person: their lines are the output, not log lines.
    if !matches!(cli.command, Command::Setup { .. } | Command::Doctor { .. }) {
        init_logging(cli.log_json);
    }
    match cli.command {
        Command::Run { config } => {
            let config = NodeConfig::load_file(&config, std::env::vars())
                .with_context(|| format!("cannot load {}", config.display()))?;
            // A rig lending its GPUs to another rig's engine group answers that head.
            let member = match config.group_member.clone() {
                Some(member) => Some(
                    crate::engines::group::Member::start(member)
                        .await
                        .context("cannot start the engine group's member channel")?,
                ),
                None => None,
            };
            let engines = EngineSet::start(config.engines.clone()).await;
            let agent = Agent::start(config.agent_options()?, engines)
                .await
                .context("cannot join the gateway")?;
            tracing::info!(node = %agent.node_id(), gateways = %config.gateways().join(","), "rig running; Ctrl-C drains and stops");
            let revoked = tokio::select! {
                result = wait_for_signal() => { result?; false }
                _ = agent.revoked() => true,
            };
            tracing::info!("draining");
            agent.shutdown().await;
            if let Some(member) = member {
                member.stop().await;
            }
            if revoked {
                anyhow::bail!("this rig was removed by the gateway's admin");
            }
            tracing::info!("stopped cleanly");
            Ok(())
        }
        Command::Setup {
            root,
            gateway_url,
            token,
            model,
            name,
            gateway_ca_file,
            allow_insecure_http,
            docker_host,
            assume_gpus,
            port,
            yes,
            no_start,
        } => {
            let options = SetupOptions {
                gateway_url,
                token,
                model,
                name,
                gateway_ca_file,
                allow_insecure_http,
                docker_host,
                gpus: assume_gpus,
                port,
                yes,
                no_start,
                ..SetupOptions::new(root)
            };
            crate::setup::setup(options, &mut std::io::stdout()).await?;
            Ok(())
        }
        Command::Doctor {
            config,
            assume_gpus,
        } => {
            let checks = crate::doctor::doctor(&DoctorOptions {
                config,
                env: std::env::vars().collect(),
                gpus: assume_gpus,
            })
            .await;
            for check in &checks {
                println!("{check}");
            }
            let failed = checks.iter().filter(|check| !check.ok).count();
            if failed > 0 {
                anyhow::bail!("{failed} of {} checks failed", checks.len());
            }
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
        Command::Health { config } => {
            let config = NodeConfig::load_file(&config, std::env::vars())
                .with_context(|| format!("cannot load {}", config.display()))?;
            let problems = health_problems(&config).await?;
            if problems.is_empty() {
                println!("healthy");
                return Ok(());
            }
            anyhow::bail!("unhealthy: {}", problems.join("; "))
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

/// What keeps this rig from serving, as `node-runner health` sees it from outside the running
/// agent: no identity yet (it has not enrolled), or an engine on a fixed port that does not
/// answer `/health`. Simulated engines live inside the agent on a port of their own choosing,
/// so only the agent knows them.
async fn health_problems(config: &NodeConfig) -> anyhow::Result<Vec<String>> {
    /// A healthy engine answers `/health` in milliseconds; the image's health check allows more.
    const TIMEOUT: Duration = Duration::from_secs(5);
    let mut problems = Vec::new();
    if crate::agent::read_identity(&config.state_file)?.is_none() {
        problems.push(format!(
            "not enrolled (no identity in {})",
            config.state_file.display()
        ));
    }
    let http = crate::agent::http_client();
    for engine in &config.engines {
        if matches!(engine.driver, Driver::Simulated(_)) || engine.port == 0 {
            continue;
        }
        let url = format!("http://127.0.0.1:{}/health", engine.port);
        match http.get(&url).timeout(TIMEOUT).send().await {
            Ok(answer) if answer.status().is_success() => {}
            Ok(answer) => problems.push(format!(
                "engine {} answered {} at {url}",
                engine.name,
                answer.status()
            )),
            Err(error) => problems.push(format!("engine {} at {url}: {error}", engine.name)),
        }
    }
    Ok(problems)
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
