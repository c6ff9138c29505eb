//! A simulated vLLM OpenAI-compatible server for machines with no GPU.
//!
//! It speaks the subset of vLLM's HTTP surface the gateway relies on (chat and text completions,
//! streamed or not, with log-probabilities, embeddings, the Responses API, Anthropic's Messages
//! API, `/v1/models`, `/health`, `/version`, `/metrics`), generates text that is a deterministic function of the model, the prompt and
//! the seed (see the `model` module), paces tokens like a real engine when asked to, queues
//! beyond `max_num_seqs`, and injects failures (500s, hangs, dropped streams) at configurable
//! rates. It can also cheat, for testing a gateway that checks its rigs: generate as another
//! model than the one it names, or inflate the usage it reports (see [`Faults`]). With no
//! latency configured it is fast enough to be the baseline of the gateway's benchmarks.

mod api;
mod logprobs;
mod messages;
mod model;
mod responses;
mod scoring;
mod state;
mod synth;
mod traces;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinHandle;

pub use api::router;
pub use garage_tls::server_config as tls_server_config;
pub use state::SimState;

/// The model name served when none is configured.
pub const DEFAULT_MODEL: &str = "sim-llama-3-8b";

/// The tokenizer the simulated engine counts with (`tokenizer.json`, Hugging Face's format): a
/// gateway configured with it counts the tokens of simulated rigs as they do.
pub const TOKENIZER_JSON: &str = include_str!("../tokenizer.json");

/// Tokens the simulated engine's chat template adds per message (a gateway's
/// `chat_template_tokens` for it).
pub const CHAT_TEMPLATE_TOKENS: u32 = 4;

/// How a simulated engine behaves.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Served model names; a request naming another gets vLLM's 404. Empty means [`DEFAULT_MODEL`].
    pub models: Vec<String>,
    /// Time to first token.
    pub ttft: Duration,
    /// Decode speed after the first token; 0 means unlimited (no delay at all).
    pub tokens_per_sec: f64,
    /// Tokens generated when a request sets no `max_tokens` (finish reason `stop`).
    pub default_max_tokens: u32,
    /// Requests running at once; the others wait in a queue, as in vLLM's scheduler.
    pub max_num_seqs: usize,
    /// Failure injection at startup; see [`SimEngine::set_faults`] to change it later.
    pub faults: Faults,
    /// Length of the vectors `/v1/embeddings` returns.
    pub embedding_dim: usize,
    /// When set, `/v1/*` requires `Authorization: Bearer <api_key>` and answers 401 without it,
    /// as vLLM's `--api-key` does; `/health`, `/metrics` and `/version` stay open.
    pub api_key: Option<String>,
    /// Legitimate hardware noise: the standard deviation (in nats) of a deterministic deviation
    /// added to every reported log-probability, never changing a generated token. 0 reports
    /// the model's exact values. Different GPUs running one model differ this way.
    pub logprob_noise: f64,
    /// Seeds this engine's [`SimConfig::logprob_noise`]: engines with the same id deviate
    /// alike. `None` draws one at start, so each engine deviates its own way.
    pub engine_id: Option<String>,
    /// Export a span per inference request to this OTLP/HTTP traces URL
    /// (`http://HOST:4318/v1/traces`), as a child of the request's `traceparent`, as vLLM's
    /// `--otlp-traces-endpoint` does. `None`: no spans, and no cost.
    pub otlp_traces_endpoint: Option<String>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            models: vec![DEFAULT_MODEL.to_owned()],
            ttft: Duration::ZERO,
            tokens_per_sec: 0.0,
            default_max_tokens: 16,
            max_num_seqs: 64,
            faults: Faults::default(),
            embedding_dim: 16,
            api_key: None,
            logprob_noise: 0.0,
            engine_id: None,
            otlp_traces_endpoint: None,
        }
    }
}

/// Failure injection and dishonesty. Each rate is the share (0..=1) of requests it hits, decided
/// per request; the dishonest fields apply to every request. [`SimEngine::set_faults`] changes
/// them at runtime: a rig that turns dishonest once it has been verified, say.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Faults {
    /// Share of inference requests answered 500 with an OpenAI error body.
    pub error_rate: f64,
    /// Share of inference requests that never answer (until the client leaves or we shut down).
    pub hang_rate: f64,
    /// Share of streamed requests whose connection is dropped after a few chunks, without
    /// `[DONE]` or the terminal HTTP chunk.
    pub drop_rate: f64,
    /// A dishonest engine: every chat and completion answer reports this many prompt and
    /// completion tokens, whatever it generated. For testing what a gateway believes.
    pub claim_tokens: Option<u64>,
    /// A dishonest engine: answers under the names it serves, but generates (tokens and
    /// log-probabilities) as this model would; e.g. a small model under a big one's name.
    pub impersonate: Option<String>,
    /// A dishonest engine: every token count it reports (prompt and completion, streamed or
    /// not, on every endpoint) is multiplied by this and rounded; the text is unchanged and
    /// `/metrics` still counts the real work. [`Faults::claim_tokens`] takes precedence.
    pub usage_inflation: Option<f64>,
}

/// A running simulated engine, serving on its own task until [`SimEngine::shutdown`] or drop.
pub struct SimEngine {
    bound: Bound,
    /// `http`, or `https` when started with TLS.
    scheme: &'static str,
    state: SimState,
    task: Option<JoinHandle<std::io::Result<()>>>,
    /// The exporter of the engine's spans, when it makes any.
    traces: Option<traces::Traces>,
}

impl SimEngine {
    /// Binds `addr` (port 0 picks a free port) and starts serving on a spawned task.
    pub async fn start(addr: SocketAddr, config: SimConfig) -> std::io::Result<SimEngine> {
        Self::start_with(addr, config, None).await
    }

    /// Like [`SimEngine::start`], serving HTTPS with `tls` (see [`tls_server_config`]).
    pub async fn start_tls(
        addr: SocketAddr,
        config: SimConfig,
        tls: rustls::ServerConfig,
    ) -> std::io::Result<SimEngine> {
        Self::start_with(addr, config, Some(Arc::new(tls))).await
    }

    /// Serves plain HTTP on a Unix domain socket at `path` (vLLM's `--uds`), made anew: a file
    /// already there is an error (the bind fails). The socket file is removed on shutdown.
    pub async fn start_unix(path: &Path, config: SimConfig) -> std::io::Result<SimEngine> {
        let traces = start_traces(&config)?;
        let listener = UnixListener::bind(path)?;
        let state = SimState::new(config);
        let task = spawn_server(listener, &state, traces.as_ref());
        Ok(SimEngine {
            bound: Bound::Unix(path.to_owned()),
            scheme: "http",
            state,
            task: Some(task),
            traces,
        })
    }

    async fn start_with(
        addr: SocketAddr,
        config: SimConfig,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> std::io::Result<SimEngine> {
        let traces = start_traces(&config)?;
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = SimState::new(config);
        let tls_on = tls.is_some();
        let task = match tls {
            // Streaming sends many small frames: Nagle's algorithm would hold them back.
            None => spawn_server(
                listener.tap_io(|tcp| {
                    let _ = tcp.set_nodelay(true);
                }),
                &state,
                traces.as_ref(),
            ),
            Some(tls) => spawn_server(
                garage_tls::TlsListener::new(listener, tls)?,
                &state,
                traces.as_ref(),
            ),
        };
        Ok(SimEngine {
            bound: Bound::Tcp(addr),
            scheme: if tls_on { "https" } else { "http" },
            state,
            task: Some(task),
            traces,
        })
    }

    /// The bound TCP address; none for an engine on a Unix socket.
    pub fn addr(&self) -> Option<SocketAddr> {
        match &self.bound {
            Bound::Tcp(addr) => Some(*addr),
            Bound::Unix(_) => None,
        }
    }

    /// The Unix socket served, for an engine started with [`SimEngine::start_unix`].
    pub fn unix_socket(&self) -> Option<&Path> {
        match &self.bound {
            Bound::Tcp(_) => None,
            Bound::Unix(path) => Some(path),
        }
    }

    /// The OpenAI base URL, `http://ADDR/v1` (`https` when serving TLS). On a Unix socket,
    /// `http://localhost/v1`: the URL a client sends over the socket.
    pub fn base_url(&self) -> String {
        match &self.bound {
            Bound::Tcp(addr) => format!("{}://{addr}/v1", self.scheme),
            Bound::Unix(_) => "http://localhost/v1".to_owned(),
        }
    }

    /// Where it listens, for messages: `SCHEME://ADDR`, or `unix:PATH`.
    pub fn listening_on(&self) -> String {
        match &self.bound {
            Bound::Tcp(addr) => format!("{}://{addr}", self.scheme),
            Bound::Unix(path) => format!("unix:{}", path.display()),
        }
    }

    /// `http` or `https`.
    pub fn scheme(&self) -> &'static str {
        self.scheme
    }

    /// Changes failure injection for requests admitted from now on.
    pub fn set_faults(&self, faults: Faults) {
        self.state.set_faults(faults);
    }

    /// Requests answered in full so far (generation finished or embeddings returned).
    pub fn requests_served(&self) -> u64 {
        self.state.requests_served()
    }

    /// The shared state, e.g. to read metrics without HTTP.
    pub fn state(&self) -> &SimState {
        &self.state
    }

    /// Stops accepting, ends hung and paced requests, and waits for connections to close.
    pub async fn shutdown(mut self) {
        self.state.shutdown();
        if let Some(task) = self.task.take() {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::warn!(%error, "sim-engine server failed"),
                Err(error) => tracing::warn!(%error, "sim-engine server task panicked"),
            }
        }
        if let Bound::Unix(path) = &self.bound {
            let _ = std::fs::remove_file(path);
        }
        // The last requests' spans go out.
        if let Some(traces) = self.traces.take() {
            traces.shutdown().await;
        }
    }
}

/// The span exporter `config` asks for, if any.
fn start_traces(config: &SimConfig) -> std::io::Result<Option<traces::Traces>> {
    config
        .otlp_traces_endpoint
        .as_deref()
        .map(traces::Traces::start)
        .transpose()
}

/// Serves the engine's API on `listener` until `state` is shut down.
fn spawn_server<L>(
    listener: L,
    state: &SimState,
    traces: Option<&traces::Traces>,
) -> JoinHandle<std::io::Result<()>>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let shutdown = state.shutdown_token().cancelled_owned();
    let app = router(state.clone());
    // Only when asked for: an engine without traces pays for no layer.
    let app = match traces {
        Some(traces) => app.layer(axum::middleware::from_fn_with_state(
            traces.tracer(),
            traces::trace_request,
        )),
        None => app,
    };
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
    })
}

/// Where a [`SimEngine`] listens.
enum Bound {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl Drop for SimEngine {
    fn drop(&mut self) {
        // The server task winds down on its own once told to; nobody waits for it here.
        self.state.shutdown();
    }
}
