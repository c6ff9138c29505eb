//! The `gateway` command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::demo::{Demo, DemoOptions};
use garage_gateway::config::{Config, LogFormat};
use garage_gateway::server::Gateway;

#[derive(Parser)]
#[command(
    name = "gateway",
    version,
    about = "Garage AI gateway: OpenAI-compatible inference over a community GPU network"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway from a config file (or embedded defaults), overridable by GARAGE_* variables.
    Serve(ServeArgs),
    /// Run the gateway with simulated rigs and a ready API key: the one-command experience.
    Demo(DemoArgs),
    /// Exit 0 when the gateway answers its liveness check (`/health`) with 200, 1 otherwise: the
    /// container image's health check, which has no curl.
    Health(HealthArgs),
}

#[derive(Args)]
struct HealthArgs {
    /// The address the gateway listens on, as `serve` takes it (GARAGE_LISTEN, so the image's
    /// setting is the check's too). An unspecified address (0.0.0.0, ::) is asked on loopback.
    #[arg(long, env = "GARAGE_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Ask this URL instead of the one --listen gives (another host or path, HTTPS).
    #[arg(long)]
    url: Option<String>,
}

#[derive(Args)]
struct CommonArgs {
    /// Address to listen on.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// A file holding the admin API's bearer token (generated there if it does not exist). The
    /// token itself is never a command-line argument, which every local user can read; it can
    /// also come from GARAGE_AUTH_ADMIN_TOKEN.
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    /// Log format.
    #[arg(long, value_enum)]
    log_format: Option<LogFormatArg>,
    /// Threads that serve requests (0: one per CPU core; 1: a single-threaded runtime).
    #[arg(long)]
    worker_threads: Option<usize>,
}

#[derive(Args)]
struct ServeArgs {
    /// TOML config file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// State store: `memory` or a Redis URL (redis://, redis+cluster://, redis+sentinel://).
    #[arg(long)]
    store: Option<String>,
    /// Serve HTTPS with this PEM certificate chain (with --tls-key-file).
    #[arg(long, requires = "tls_key_file")]
    tls_cert_file: Option<PathBuf>,
    /// The PEM private key of --tls-cert-file.
    #[arg(long, requires = "tls_cert_file")]
    tls_key_file: Option<PathBuf>,
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Args)]
struct DemoArgs {
    /// Number of simulated rigs.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Use this API key instead of a random one.
    #[arg(long)]
    api_key: Option<String>,
    /// Simulated time to first token, in milliseconds.
    #[arg(long, default_value_t = 60)]
    ttft_ms: u64,
    /// Simulated decode speed in tokens per second (0: no delay).
    #[arg(long, default_value_t = 40.0)]
    tokens_per_sec: f64,
    #[command(flatten)]
    common: CommonArgs,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormatArg {
    Text,
    Json,
}

impl CommonArgs {
    fn apply(&self, config: &mut Config) {
        if let Some(listen) = self.listen {
            config.listen = listen;
        }
        if let Some(path) = &self.admin_token_file {
            config.auth.admin_token = None;
            config.auth.admin_token_file = Some(path.clone());
        }
        if let Some(threads) = self.worker_threads {
            config.worker_threads = threads;
        }
        if let Some(format) = self.log_format {
            config.log_format = match format {
                LogFormatArg::Text => LogFormat::Text,
                LogFormatArg::Json => LogFormat::Json,
            };
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Runs the command line: reads the config, builds the runtime it asks for (`worker_threads`),
/// and runs the command on it until a signal stops it.
pub fn main(cli: Cli) -> anyhow::Result<()> {
    if let Command::Health(args) = &cli.command {
        return health(args);
    }
    let command = Prepared::new(cli)?;
    runtime(command.config().worker_threads)
        .context("cannot start the async runtime")?
        .block_on(command.run())
}

/// `gateway health`: one GET with a deadline, on a runtime of its own (it reads no config).
fn health(args: &HealthArgs) -> anyhow::Result<()> {
    /// A live gateway answers `/health` in microseconds; a container's check allows seconds.
    const TIMEOUT: Duration = Duration::from_secs(5);
    let url = args.url.clone().unwrap_or_else(|| {
        let mut address = args.listen;
        if address.ip().is_unspecified() {
            address.set_ip(match address {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        format!("http://{address}/health")
    });
    // The rig agent's client (reqwest with ring for HTTPS), which this binary links already; made
    // inside the runtime, whose timers it uses.
    let ask = async {
        let client = garage_node_runner::agent::http_client();
        client.get(&url).timeout(TIMEOUT).send().await
    };
    let answer = runtime(1)
        .context("cannot start the async runtime")?
        .block_on(ask)
        .with_context(|| format!("unhealthy: no answer from {url}"))?;
    if !answer.status().is_success() {
        anyhow::bail!("unhealthy: {url} answered {}", answer.status());
    }
    println!("healthy: {url}");
    Ok(())
}

/// A command with its config loaded and logging set up, before any runtime exists.
enum Prepared {
    Serve(Config),
    Demo(Config, DemoOptions),
}

impl Prepared {
    fn new(cli: Cli) -> anyhow::Result<Self> {
        let (mut config, ignored_env, common, demo) = match cli.command {
            Command::Serve(args) => {
                let (mut config, report) = match &args.config {
                    Some(path) => Config::load_file(path, std::env::vars())?,
                    None => Config::load(None, std::env::vars())?,
                };
                if let Some(store) = args.store {
                    config.store = store;
                }
                if args.tls_cert_file.is_some() {
                    config.tls_cert_file = args.tls_cert_file;
                    config.tls_key_file = args.tls_key_file;
                }
                (config, report.ignored_env, args.common, None)
            }
            Command::Health(_) => unreachable!("answered by `main` before any config is read"),
            Command::Demo(args) => {
                let (config, _) = Config::load(None, std::iter::empty())?;
                let options = DemoOptions {
                    nodes: args.nodes,
                    api_key: args.api_key,
                    ttft: Duration::from_millis(args.ttft_ms),
                    tokens_per_sec: args.tokens_per_sec,
                };
                (config, Vec::new(), args.common, Some(options))
            }
        };
        common.apply(&mut config);
        init_logging(config.log_format);
        for name in ignored_env {
            tracing::warn!(variable = %name, "not a gateway setting; ignored");
        }
        Ok(match demo {
            Some(options) => Prepared::Demo(config, options),
            None => Prepared::Serve(config),
        })
    }

    fn config(&self) -> &Config {
        match self {
            Prepared::Serve(config) | Prepared::Demo(config, _) => config,
        }
    }

    async fn run(self) -> anyhow::Result<()> {
        let grace = Duration::from_secs(self.config().shutdown_grace_secs);
        let mut signals = Signals::install()?;
        match self {
            Prepared::Serve(config) => {
                let Some(gateway) = signals.unless_signalled(Gateway::start(config)).await else {
                    return Ok(());
                };
                let gateway = gateway.context("cannot start the gateway")?;
                signals
                    .stop_on_signal(grace, |grace| gateway.shutdown(grace))
                    .await;
            }
            Prepared::Demo(config, options) => {
                // The gateway answers before every rig is in routing, so a signal may come while
                // the demo is still starting.
                let start = Demo::start(config, options);
                let Some(demo) = signals.unless_signalled(start).await else {
                    return Ok(());
                };
                let demo = demo.context("cannot start the demo")?;
                println!("{}", demo.banner());
                signals
                    .stop_on_signal(grace, |grace| demo.shutdown(grace))
                    .await;
            }
        }
        Ok(())
    }
}

/// The runtime `worker_threads` asks for: 1 is tokio's single-threaded scheduler, where every
/// task runs on this thread (no work stealing, no wake-ups across threads); 0 is one worker per
/// core (or `TOKIO_WORKER_THREADS`), as `#[tokio::main]` would make.
fn runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if worker_threads > 1 {
            builder.worker_threads(worker_threads);
        }
        builder
    };
    builder.enable_all().build()
}

/// SIGTERM and SIGINT, listened for from before the gateway starts: a signal that comes while it
/// is starting (it answers requests before it is done, in the demo) stops it cleanly instead of
/// killing the process.
struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            terminate: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
            interrupt: signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.terminate.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }

    /// `start`'s output, or `None` when a signal came first.
    async fn unless_signalled<T>(&mut self, start: impl Future<Output = T>) -> Option<T> {
        tokio::select! {
            started = start => Some(started),
            () = self.recv() => {
                tracing::info!("stopped while starting");
                None
            }
        }
    }

    /// Waits for a signal, then runs `shutdown` (true: everything in flight finished within
    /// `grace`) and says how it went.
    async fn stop_on_signal<F>(mut self, grace: Duration, shutdown: impl FnOnce(Duration) -> F)
    where
        F: Future<Output = bool>,
    {
        self.recv().await;
        tracing::info!(
            grace_secs = grace.as_secs(),
            "shutting down: finishing in-flight requests"
        );
        if shutdown(grace).await {
            tracing::info!("stopped cleanly");
        } else {
            tracing::warn!("grace period over; closing the remaining connections");
        }
    }
}
