//! Shared engine state: configuration, the run queue, fault dice and vLLM's metrics.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::model::{self, Generation, Noise};
use crate::{DEFAULT_MODEL, Faults, SimConfig};

/// Everything the handlers share; cheap to clone. Build one with [`SimState::new`] to serve
/// [`crate::router`] on a listener of your own.
#[derive(Clone)]
pub struct SimState(Arc<Inner>);

struct Inner {
    config: SimConfig,
    faults: ArcSwap<Faults>,
    slots: Arc<Semaphore>,
    /// Gap between tokens, `None` when decoding is unlimited.
    token_gap: Option<Duration>,
    /// First served model name, escaped for a Prometheus label (vLLM labels with this one).
    metric_label: String,
    /// This engine's deviation from the model's exact log-probabilities.
    noise: Noise,
    shutdown: CancellationToken,
    stats: Stats,
}

#[derive(Default)]
struct Stats {
    running: AtomicU64,
    waiting: AtomicU64,
    prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
    finished_stop: AtomicU64,
    finished_length: AtomicU64,
    finished_abort: AtomicU64,
}

/// Why generation ended, as vLLM reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Finish {
    Stop,
    Length,
}

impl Finish {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// What an engine reports of the tokens it counted: honestly, or as [`Faults`] make it lie.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Report {
    /// Chat and completions report this for prompt and completion alike (see
    /// [`Faults::claim_tokens`]).
    pub(crate) claim: Option<u64>,
    /// Every count reported is multiplied by this (see [`Faults::usage_inflation`]).
    pub(crate) inflation: Option<f64>,
}

impl Report {
    fn of(faults: &Faults) -> Report {
        Report {
            claim: faults.claim_tokens,
            inflation: faults.usage_inflation,
        }
    }

    /// What a chat-like answer (chat, completions, Anthropic's Messages) reports of
    /// `prompt` and `generated` tokens: the claim, if the engine makes one, for both.
    pub(crate) fn usage(self, prompt: u32, generated: u32) -> (u64, u64) {
        match self.claim {
            Some(claim) => (claim, claim),
            None => (self.tokens(prompt), self.tokens(generated)),
        }
    }

    /// What is reported of `counted` tokens.
    pub(crate) fn tokens(self, counted: u32) -> u64 {
        match self.inflation {
            // `as` saturates: an absurd factor reports u64::MAX, never wraps.
            Some(factor) => (f64::from(counted) * factor).round() as u64,
            None => counted.into(),
        }
    }
}

/// What the dice decided for one request.
pub(crate) enum Fate {
    Serve,
    Fail,
    Hang,
    DropStream,
}

impl SimState {
    /// Builds the state; an empty model list serves [`DEFAULT_MODEL`], `max_num_seqs` is at least 1.
    pub fn new(mut config: SimConfig) -> Self {
        if config.models.is_empty() {
            config.models.push(DEFAULT_MODEL.to_owned());
        }
        config.max_num_seqs = config.max_num_seqs.max(1);
        let token_gap = (config.tokens_per_sec.is_finite() && config.tokens_per_sec > 0.0)
            .then(|| Duration::from_secs_f64(1.0 / config.tokens_per_sec));
        let metric_label = config.models[0].replace('\\', "\\\\").replace('"', "\\\"");
        // Without an id, each engine deviates its own way, as separate GPUs do.
        let engine_id = config
            .engine_id
            .clone()
            .unwrap_or_else(|| format!("{:032x}", rand::random::<u128>()));
        let noise = Noise::new(config.logprob_noise, &engine_id);
        Self(Arc::new(Inner {
            noise,
            faults: ArcSwap::from_pointee(config.faults.clone()),
            slots: Arc::new(Semaphore::new(config.max_num_seqs)),
            token_gap,
            metric_label,
            shutdown: CancellationToken::new(),
            stats: Stats::default(),
            config,
        }))
    }

    pub(crate) fn config(&self) -> &SimConfig {
        &self.0.config
    }

    /// Changes failure injection for requests admitted from now on.
    pub fn set_faults(&self, faults: Faults) {
        self.0.faults.store(Arc::new(faults));
    }

    /// Requests answered in full so far.
    pub fn requests_served(&self) -> u64 {
        let stats = &self.0.stats;
        stats.finished_stop.load(Relaxed) + stats.finished_length.load(Relaxed)
    }

    /// Ends hung and paced requests and stops a server started by [`crate::SimEngine`].
    pub fn shutdown(&self) {
        self.0.shutdown.cancel();
    }

    pub(crate) fn shutdown_token(&self) -> CancellationToken {
        self.0.shutdown.clone()
    }

    /// Resolves the requested model name; vLLM serves the first name when none is given.
    pub(crate) fn model<'a>(&'a self, requested: Option<&'a str>) -> Option<&'a str> {
        let models = &self.0.config.models;
        match requested {
            None => Some(models[0].as_str()),
            Some(name) => models.iter().any(|m| m == name).then_some(name),
        }
    }

    /// How this engine reports the tokens it counts, decided once per request.
    pub(crate) fn report(&self) -> Report {
        Report::of(&self.0.faults.load())
    }

    /// Generates as this engine does: as `request.model`, or as the model an impersonator
    /// copies; with the usage report decided from the same look at the faults.
    pub(crate) fn generate(&self, request: model::Request<'_>) -> (Generation, Report) {
        let faults = self.0.faults.load();
        let request = match &faults.impersonate {
            Some(copied) => model::Request {
                model: copied,
                ..request
            },
            None => request,
        };
        (model::generate(request, self.0.noise), Report::of(&faults))
    }

    /// Rolls the fault dice; drops apply to streamed requests only.
    pub(crate) fn roll(&self, streamed: bool) -> Fate {
        fn hit(rate: f64) -> bool {
            rate > 0.0 && (rate >= 1.0 || rand::random::<f64>() < rate)
        }
        let faults = self.0.faults.load();
        if hit(faults.error_rate) {
            Fate::Fail
        } else if hit(faults.hang_rate) {
            Fate::Hang
        } else if streamed && hit(faults.drop_rate) {
            Fate::DropStream
        } else {
            Fate::Serve
        }
    }

    /// Resolves only when the engine shuts down (or never, as the client leaves first).
    pub(crate) async fn hang(&self) {
        self.0.shutdown.cancelled().await;
    }

    /// Waits for a running slot, counting the request as waiting meanwhile.
    pub(crate) async fn admit(&self) -> Option<Running> {
        let _waiting = Gauge::up(self.clone(), |s| &s.waiting);
        let permit = tokio::select! {
            permit = self.0.slots.clone().acquire_owned() => permit.ok()?,
            () = self.0.shutdown.cancelled() => return None,
        };
        Some(Running {
            gauge: Gauge::up(self.clone(), |s| &s.running),
            _permit: permit,
            finished: false,
        })
    }

    /// When the token `index` (0-based) is due for a request started at `start`, if pacing is on.
    pub(crate) fn token_due(&self, start: Instant, index: u32) -> Option<Instant> {
        let ttft = self.0.config.ttft;
        match self.0.token_gap {
            Some(gap) => Some(start + ttft + gap * index),
            None if !ttft.is_zero() => Some(start + ttft),
            None => None,
        }
    }

    /// Sleeps until `due`; false when the engine shut down first.
    pub(crate) async fn pace(&self, due: Option<Instant>) -> bool {
        let Some(due) = due else { return true };
        tokio::select! {
            () = tokio::time::sleep_until(due) => true,
            () = self.0.shutdown.cancelled() => false,
        }
    }

    /// Renders `/metrics` in Prometheus text format with vLLM's metric names.
    pub fn render_metrics(&self) -> String {
        let stats = &self.0.stats;
        let label = &self.0.metric_label;
        let running = stats.running.load(Relaxed);
        let cache_usage = running as f64 / self.0.config.max_num_seqs as f64;
        let gauges = [
            (
                "vllm:num_requests_running",
                "Number of requests in model execution batches.",
                running as f64,
            ),
            (
                "vllm:num_requests_waiting",
                "Number of requests waiting to be processed.",
                stats.waiting.load(Relaxed) as f64,
            ),
            (
                "vllm:kv_cache_usage_perc",
                "KV-cache usage. 1 means 100 percent usage.",
                cache_usage,
            ),
            (
                "vllm:gpu_cache_usage_perc",
                "GPU KV-cache usage. 1 means 100 percent usage.",
                cache_usage,
            ),
        ];
        let counters = [
            (
                "vllm:prompt_tokens_total",
                "Number of prefill tokens processed.",
                &stats.prompt_tokens,
            ),
            (
                "vllm:generation_tokens_total",
                "Number of generation tokens processed.",
                &stats.generation_tokens,
            ),
        ];
        let mut out = String::with_capacity(2048);
        // Writing to a String cannot fail, so the fmt::Results below carry no information.
        for (name, help, value) in gauges {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{model_name=\"{label}\"}} {value}\n"
            );
        }
        for (name, help, value) in counters {
            let value = value.load(Relaxed);
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name}{{model_name=\"{label}\"}} {value}\n"
            );
        }
        let name = "vllm:request_success_total";
        let _ = write!(
            out,
            "# HELP {name} Count of successfully processed requests.\n# TYPE {name} counter\n"
        );
        for (reason, value) in [
            ("stop", &stats.finished_stop),
            ("length", &stats.finished_length),
            ("abort", &stats.finished_abort),
        ] {
            let value = value.load(Relaxed);
            let _ = writeln!(
                out,
                "{name}{{finished_reason=\"{reason}\",model_name=\"{label}\"}} {value}"
            );
        }
        out
    }
}

/// Keeps a gauge raised for as long as it lives, so cancelled futures lower it too.
struct Gauge {
    state: SimState,
    pick: fn(&Stats) -> &AtomicU64,
}

impl Gauge {
    fn up(state: SimState, pick: fn(&Stats) -> &AtomicU64) -> Self {
        pick(&state.0.stats).fetch_add(1, Relaxed);
        Self { state, pick }
    }
}

impl Drop for Gauge {
    fn drop(&mut self) {
        (self.pick)(&self.state.0.stats).fetch_sub(1, Relaxed);
    }
}

/// A request holding a running slot. Dropped before [`Running::finish`], it counts as aborted
/// (client gone, dropped stream, shutdown).
pub(crate) struct Running {
    gauge: Gauge,
    _permit: OwnedSemaphorePermit,
    finished: bool,
}

impl Running {
    /// Records a completed request in the counters.
    pub(crate) fn finish(&mut self, prompt_tokens: u32, generated: u32, finish: Finish) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let stats = &self.gauge.state.0.stats;
        stats.prompt_tokens.fetch_add(prompt_tokens.into(), Relaxed);
        stats.generation_tokens.fetch_add(generated.into(), Relaxed);
        match finish {
            Finish::Stop => &stats.finished_stop,
            Finish::Length => &stats.finished_length,
        }
        .fetch_add(1, Relaxed);
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.finished {
            self.gauge
                .state
                .0
                .stats
                .finished_abort
                .fetch_add(1, Relaxed);
        }
    }
}
