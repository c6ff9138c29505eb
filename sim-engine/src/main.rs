//! `sim-engine`: runs the simulated vLLM server until SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use garage_sim_engine::{DEFAULT_MODEL, Faults, SimConfig, SimEngine};
use tokio::signal::unix::{SignalKind, signal};

/// A simulated vLLM OpenAI-compatible server for machines with no GPU.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// Served model name (repeatable); the first labels the metrics.
    #[arg(long = "model", default_value = DEFAULT_MODEL)]
    models: Vec<String>,
    /// Time to first token, in milliseconds.
    #[arg(long, default_value_t = 0)]
    ttft_ms: u64,
    /// Decode speed after the first token; 0 means unlimited.
    #[arg(long, default_value_t = 0.0)]
    tokens_per_sec: f64,
    /// Requests running at once; the rest wait in a queue.
    #[arg(long, default_value_t = 64)]
    max_num_seqs: usize,
    /// Tokens generated when a request sets no max_tokens.
    #[arg(long, default_value_t = 16)]
    default_max_tokens: u32,
    /// Length of embedding vectors.
    #[arg(long, default_value_t = 16)]
    embedding_dim: usize,
    /// Share of requests answered 500.
    #[arg(long, default_value_t = 0.0, value_parser = rate)]
    error_rate: f64,
    /// Share of requests never answered.
    #[arg(long, default_value_t = 0.0, value_parser = rate)]
    hang_rate: f64,
    /// Share of streamed requests whose connection is dropped mid-stream.
    #[arg(long, default_value_t = 0.0, value_parser = rate)]
    drop_rate: f64,
    /// A dishonest engine: report this many prompt and completion tokens in every chat and
    /// completion answer, whatever was generated (for testing what a gateway believes).
    #[arg(long)]
    claim_tokens: Option<u64>,
    /// A dishonest engine: answer under the --model names but generate (tokens and
    /// log-probabilities) as MODEL would, e.g. a small model under a big one's name.
    #[arg(long, value_name = "MODEL", value_parser = model_name)]
    impersonate: Option<String>,
    /// A dishonest engine: multiply every token count it reports (prompt and completion, in
    /// every answer's usage) by FACTOR.
    #[arg(long, value_name = "FACTOR", value_parser = non_negative)]
    inflate_usage: Option<f64>,
    /// Legitimate hardware noise: add a deterministic deviation of this standard deviation (in
    /// nats) to every reported log-probability, never changing a generated token.
    #[arg(long, value_name = "SIGMA", default_value_t = 0.0, value_parser = non_negative)]
    logprob_noise: f64,
    /// Seeds --logprob-noise: engines with the same id deviate alike (by default each engine
    /// draws its own at start).
    #[arg(long)]
    engine_id: Option<String>,
    /// Require this bearer token on /v1/* (vLLM's --api-key).
    #[arg(long, env = "VLLM_API_KEY")]
    api_key: Option<String>,
    /// Serve HTTPS with this PEM certificate chain (vLLM's --ssl-certfile); needs --ssl-keyfile.
    #[arg(long, requires = "ssl_keyfile")]
    ssl_certfile: Option<PathBuf>,
    /// The PEM private key of --ssl-certfile (vLLM's --ssl-keyfile).
    #[arg(long, requires = "ssl_certfile")]
    ssl_keyfile: Option<PathBuf>,
    /// Serve plain HTTP on this Unix domain socket instead of --listen (vLLM's --uds).
    #[arg(long, conflicts_with_all = ["listen", "ssl_certfile"])]
    uds: Option<PathBuf>,
    /// Export a span per request (a child of its traceparent) to this OTLP/HTTP traces URL,
    /// e.g. http://127.0.0.1:4318/v1/traces (vLLM's --otlp-traces-endpoint).
    #[arg(long, value_name = "URL")]
    otlp_traces_endpoint: Option<String>,
}

fn non_negative(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(value) if value.is_finite() && value >= 0.0 => Ok(value),
        _ => Err(format!("`{text}` is not a number of 0 or more")),
    }
}

fn model_name(text: &str) -> Result<String, String> {
    if text.trim().is_empty() {
        return Err("a model name cannot be empty".to_owned());
    }
    Ok(text.to_owned())
}

fn rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if (0.0..=1.0).contains(&rate) => Ok(rate),
        _ => Err(format!("`{text}` is not a rate between 0 and 1")),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let config = SimConfig {
        models: args.models,
        ttft: Duration::from_millis(args.ttft_ms),
        tokens_per_sec: args.tokens_per_sec,
        default_max_tokens: args.default_max_tokens,
        max_num_seqs: args.max_num_seqs,
        embedding_dim: args.embedding_dim,
        faults: Faults {
            error_rate: args.error_rate,
            hang_rate: args.hang_rate,
            drop_rate: args.drop_rate,
            claim_tokens: args.claim_tokens,
            impersonate: args.impersonate,
            usage_inflation: args.inflate_usage,
        },
        api_key: args.api_key,
        logprob_noise: args.logprob_noise,
        engine_id: args.engine_id,
        otlp_traces_endpoint: args.otlp_traces_endpoint,
    };
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let engine = match (&args.uds, &args.ssl_certfile, &args.ssl_keyfile) {
        (Some(path), _, _) => SimEngine::start_unix(path, config)
            .await
            .with_context(|| format!("listening on {}", path.display()))?,
        (None, Some(cert), Some(key)) => {
            let tls = garage_sim_engine::tls_server_config(cert, key)?;
            SimEngine::start_tls(args.listen, config, tls)
                .await
                .with_context(|| format!("listening on {}", args.listen))?
        }
        _ => SimEngine::start(args.listen, config)
            .await
            .with_context(|| format!("listening on {}", args.listen))?,
    };
    // Scripts and the node runner read this line to learn the (possibly ephemeral) port.
    println!("sim-engine listening on {}", engine.listening_on());
    tracing::info!(on = %engine.listening_on(), "sim-engine ready");
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("waiting for SIGINT")?,
        _ = terminate.recv() => {}
    }
    tracing::info!("shutting down");
    engine.shutdown().await;
    Ok(())
}
