//! Prometheus metrics of the gateway, served at `GET /metrics`.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets in seconds: from sub-millisecond (errors, cached answers) to minutes (long
/// generations).
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub time_to_first_token: HistogramVec,
    pub tokens: IntCounterVec,
    pub backend_errors: IntCounterVec,
    /// Set from the backends' own counts when scraped (see [`Metrics::render`]'s callers).
    pub in_flight: IntGauge,
    /// The async runtime's worker threads and live tasks, read when scraped.
    pub runtime_workers: IntGauge,
    pub runtime_tasks: IntGauge,
    /// What this replica sees of the store, the models, its rigs and the batch queues, set
    /// when scraped ([`Metrics::observe`]).
    observed: Observed,
    /// The series of each model's requests, by route (see [`RouteSeries`]). Read on every
    /// request without a lock; a model's first request copies the map to add its own.
    series: ArcSwap<HashMap<Box<str>, Vec<Arc<RouteSeries>>, foldhash::fast::RandomState>>,
}

/// One model's backends as the routing table holds them now.
pub struct ModelSample<'a> {
    pub model: &'a str,
    pub healthy: usize,
    pub total: usize,
}

/// A rig whose tunnel this replica holds (each rig is counted by one replica only).
pub struct RigSample {
    pub node: String,
    pub name: String,
    pub operator: String,
    /// Since its last heartbeat; `None` before the first.
    pub heartbeat_age: Option<std::time::Duration>,
    pub heartbeat: Option<garage_node_protocol::Heartbeat>,
}

/// Batch lines of one model in the store's work queues, every batch together.
pub struct BatchBacklogSample {
    pub model: String,
    pub waiting: u64,
    pub leased: u64,
}

/// What [`Metrics::observe`] takes: each part `None` when it could not be read (the store did
/// not answer), which leaves that part's series as they were.
pub struct Observation<'a> {
    pub store_up: bool,
    pub models: Vec<ModelSample<'a>>,
    pub rigs: Vec<RigSample>,
    pub batch_backlog: Option<Vec<BatchBacklogSample>>,
    /// Usage events waiting for the meter and reward plugins (in memory and in the store).
    pub usage_queued: Option<u64>,
}

/// Gauges set at scrape time from the gateway's live state.
struct Observed {
    store_up: IntGauge,
    model_backends: IntGaugeVec,
    /// Every model ever seen: one whose last backend left reads 0 (what "no healthy rig for a
    /// model" alerts on) instead of vanishing.
    known_models: Mutex<BTreeSet<String>>,
    rigs_connected: IntGauge,
    rig_info: IntGaugeVec,
    rig_heartbeat_age: GaugeVec,
    rig_engine_requests: GaugeVec,
    rig_kv_cache_usage: GaugeVec,
    rig_gpu_utilization: GaugeVec,
    rig_gpu_memory_used: GaugeVec,
    rig_gpu_memory_total: GaugeVec,
    rig_gpu_temperature: GaugeVec,
    rig_gpu_power: GaugeVec,
    batch_lines: IntGaugeVec,
    usage_queued: IntGauge,
}

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    GaugeVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"))
}

impl Observed {
    fn new() -> Self {
        Observed {
            store_up: IntGauge::new(
                "garage_store_up",
                "Whether the state store (memory or Redis) answered a ping at the last scrape",
            )
            .unwrap_or_else(|e| unreachable!("static metric definition: {e}")),
            model_backends: IntGaugeVec::new(
                Opts::new(
                    "garage_model_backends",
                    "Backends (rigs and upstreams) serving each model, by state (healthy: in routing)",
                ),
                &["model", "state"],
            )
            .unwrap_or_else(|e| unreachable!("static metric definition: {e}")),
            known_models: Mutex::new(BTreeSet::new()),
            rigs_connected: IntGauge::new(
                "garage_rigs_connected",
                "Rigs whose tunnel this replica holds",
            )
            .unwrap_or_else(|e| unreachable!("static metric definition: {e}")),
            rig_info: IntGaugeVec::new(
                Opts::new(
                    "garage_rig_info",
                    "1 for each rig tunnelled to this replica: its name, operator and node-runner \
                     version by node id",
                ),
                &["node", "name", "operator", "version"],
            )
            .unwrap_or_else(|e| unreachable!("static metric definition: {e}")),
            rig_heartbeat_age: gauge_vec(
                "garage_rig_heartbeat_age_seconds",
                "Seconds since the rig's last heartbeat (rigs tunnelled to this replica)",
                &["node"],
            ),
            rig_engine_requests: gauge_vec(
                "garage_rig_engine_requests",
                "Requests on the rig's engines, by state (running, waiting), from vLLM's metrics",
                &["node", "state"],
            ),
            rig_kv_cache_usage: gauge_vec(
                "garage_rig_kv_cache_usage_ratio",
                "Highest KV-cache use among the rig's engines, 0 to 1",
                &["node"],
            ),
            rig_gpu_utilization: gauge_vec(
                "garage_rig_gpu_utilization_ratio",
                "GPU utilisation over the rig's last sample period, 0 to 1",
                &["node", "gpu", "product"],
            ),
            rig_gpu_memory_used: gauge_vec(
                "garage_rig_gpu_memory_used_bytes",
                "GPU memory in use",
                &["node", "gpu", "product"],
            ),
            rig_gpu_memory_total: gauge_vec(
                "garage_rig_gpu_memory_total_bytes",
                "GPU memory in all",
                &["node", "gpu", "product"],
            ),
            rig_gpu_temperature: gauge_vec(
                "garage_rig_gpu_temperature_celsius",
                "GPU core temperature",
                &["node", "gpu", "product"],
            ),
            rig_gpu_power: gauge_vec(
                "garage_rig_gpu_power_watts",
                "GPU power draw",
                &["node", "gpu", "product"],
            ),
            batch_lines: IntGaugeVec::new(
                Opts::new(
                    "garage_batch_lines",
                    "Batch lines in the work queues, by model and state (waiting, leased)",
                ),
                &["model", "state"],
            )
            .unwrap_or_else(|e| unreachable!("static metric definition: {e}")),
            usage_queued: IntGauge::new(
                "garage_usage_events_queued",
                "Usage events waiting to be metered and rewarded (a growing queue: the meter or \
                 reward plugin is failing, or the store is away)",
            )
            .unwrap_or_else(|e| unreachable!("static metric definition: {e}")),
        }
    }

    fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.store_up.clone()),
            Box::new(self.model_backends.clone()),
            Box::new(self.rigs_connected.clone()),
            Box::new(self.rig_info.clone()),
            Box::new(self.rig_heartbeat_age.clone()),
            Box::new(self.rig_engine_requests.clone()),
            Box::new(self.rig_kv_cache_usage.clone()),
            Box::new(self.rig_gpu_utilization.clone()),
            Box::new(self.rig_gpu_memory_used.clone()),
            Box::new(self.rig_gpu_memory_total.clone()),
            Box::new(self.rig_gpu_temperature.clone()),
            Box::new(self.rig_gpu_power.clone()),
            Box::new(self.batch_lines.clone()),
            Box::new(self.usage_queued.clone()),
        ]
    }
}

/// The series one route and model's requests update, found once and kept. Each
/// `with_label_values` hashes its labels, takes the vector's read lock and clones the series
/// out; a request made six of those (counter, duration, tokens twice, time to first token).
pub struct RouteSeries {
    route: &'static str,
    model: Box<str>,
    /// `garage_requests_total` with status 200, the usual one; other statuses are looked up.
    pub ok: IntCounter,
    pub duration: Histogram,
    pub time_to_first_token: Histogram,
    pub prompt_tokens: IntCounter,
    pub completion_tokens: IntCounter,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let observed = Observed::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "garage_requests_total",
                "Requests by route, model and status",
            ),
            &["route", "model", "status"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "garage_request_duration_seconds",
                "Time from request to the end of the response",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route", "model"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let time_to_first_token = HistogramVec::new(
            HistogramOpts::new(
                "garage_time_to_first_token_seconds",
                "Time from request to the first streamed chunk from the backend",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["model"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let tokens = IntCounterVec::new(
            Opts::new(
                "garage_tokens_total",
                "Tokens by model and direction (prompt or completion)",
            ),
            &["model", "direction"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let backend_errors = IntCounterVec::new(
            Opts::new(
                "garage_backend_errors_total",
                "Backend failures by backend and kind (connect, send, status_5xx, unauthorized, timeout, stream)",
            ),
            &["backend", "kind"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let in_flight = IntGauge::new(
            "garage_requests_in_flight",
            "Requests the backends in routing are serving now, streams until they end",
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let runtime_workers = IntGauge::new(
            "garage_runtime_workers",
            "Threads serving requests (worker_threads; 1 is the single-threaded runtime)",
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let runtime_tasks = IntGauge::new(
            "garage_runtime_tasks",
            "Tasks alive in the async runtime: connections, streams, background work",
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        for collector in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(request_duration.clone()),
            Box::new(time_to_first_token.clone()),
            Box::new(tokens.clone()),
            Box::new(backend_errors.clone()),
            Box::new(in_flight.clone()),
            Box::new(runtime_workers.clone()),
            Box::new(runtime_tasks.clone()),
        ]
        .into_iter()
        .chain(observed.collectors())
        {
            registry
                .register(collector)
                .unwrap_or_else(|e| unreachable!("metric names are unique: {e}"));
        }
        Metrics {
            registry,
            requests,
            request_duration,
            time_to_first_token,
            tokens,
            backend_errors,
            in_flight,
            runtime_workers,
            runtime_tasks,
            observed,
            series: ArcSwap::default(),
        }
    }

    /// The series of `route`'s requests for `model`. Call it only for a model some backend
    /// serves: each model named here stays in the metrics for good.
    pub fn route_series(&self, route: &'static str, model: &str) -> Arc<RouteSeries> {
        let find = |map: &HashMap<Box<str>, Vec<Arc<RouteSeries>>, _>| {
            map.get(model)?.iter().find(|s| s.route == route).cloned()
        };
        if let Some(found) = find(&self.series.load()) {
            return found;
        }
        let made = Arc::new(RouteSeries {
            route,
            model: model.into(),
            ok: self.requests.with_label_values(&[route, model, "200"]),
            duration: self.request_duration.with_label_values(&[route, model]),
            time_to_first_token: self.time_to_first_token.with_label_values(&[model]),
            prompt_tokens: self.tokens.with_label_values(&[model, "prompt"]),
            completion_tokens: self.tokens.with_label_values(&[model, "completion"]),
        });
        // Another request may have added it meanwhile: keep the first one in the map (both
        // hold handles to the same series, so either counts the same).
        self.series.rcu(|map| {
            let mut map = HashMap::clone(map);
            let routes = map.entry(model.into()).or_default();
            if !routes.iter().any(|s| s.route == route) {
                routes.push(Arc::clone(&made));
            }
            map
        });
        made
    }

    /// Counts a request that got an answer with `status`.
    pub fn count(&self, series: &RouteSeries, status: http::StatusCode) {
        if status == http::StatusCode::OK {
            series.ok.inc();
        } else {
            self.requests
                .with_label_values(&[series.route, &series.model, status.as_str()])
                .inc();
        }
    }

    /// Adds collectors defined elsewhere (the plugin host's) to this registry.
    pub fn register_all(&self, collectors: Vec<Box<dyn prometheus::core::Collector>>) {
        for collector in collectors {
            if let Err(err) = self.registry.register(collector) {
                tracing::error!(error = %err, "cannot register a metric");
            }
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(err) = encoder.encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %err, "cannot encode metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Sets the gauges of what the gateway sees now. Rigs that left (and batch queues that
    /// emptied) lose their series; a model keeps its series at zero.
    pub fn observe(&self, now: Observation<'_>) {
        let o = &self.observed;
        o.store_up.set(i64::from(now.store_up));
        let mut known = o.known_models.lock().unwrap_or_else(|p| p.into_inner());
        for model in known.iter() {
            if !now.models.iter().any(|m| m.model == model.as_str()) {
                o.model_backends
                    .with_label_values(&[model, "healthy"])
                    .set(0);
                o.model_backends
                    .with_label_values(&[model, "unhealthy"])
                    .set(0);
            }
        }
        for m in &now.models {
            known.insert(m.model.to_owned());
            let unhealthy = m.total.saturating_sub(m.healthy);
            (o.model_backends.with_label_values(&[m.model, "healthy"])).set(m.healthy as i64);
            (o.model_backends.with_label_values(&[m.model, "unhealthy"])).set(unhealthy as i64);
        }

        o.rigs_connected.set(now.rigs.len() as i64);
        o.rig_info.reset();
        for vec in [
            &o.rig_heartbeat_age,
            &o.rig_engine_requests,
            &o.rig_kv_cache_usage,
            &o.rig_gpu_utilization,
            &o.rig_gpu_memory_used,
            &o.rig_gpu_memory_total,
            &o.rig_gpu_temperature,
            &o.rig_gpu_power,
        ] {
            vec.reset();
        }
        for rig in &now.rigs {
            let node = rig.node.as_str();
            if let Some(age) = rig.heartbeat_age {
                o.rig_heartbeat_age
                    .with_label_values(&[node])
                    .set(age.as_secs_f64());
            }
            let version = rig.heartbeat.as_ref().map_or("", |h| h.version.as_str());
            let info = [node, rig.name.as_str(), rig.operator.as_str(), version];
            o.rig_info.with_label_values(&info).set(1);
            let Some(heartbeat) = &rig.heartbeat else {
                continue;
            };
            let stats: Vec<_> = heartbeat.engines.iter().filter_map(|e| e.stats).collect();
            // Folded from +0.0: `sum` of no floats is -0.0, which would read "-0".
            let running = stats.iter().fold(0.0, |n, s| n + s.requests_running);
            let waiting = stats.iter().fold(0.0, |n, s| n + s.requests_waiting);
            let kv = stats.iter().map(|s| s.kv_cache_usage).fold(0.0, f64::max);
            (o.rig_engine_requests.with_label_values(&[node, "running"])).set(running);
            (o.rig_engine_requests.with_label_values(&[node, "waiting"])).set(waiting);
            o.rig_kv_cache_usage.with_label_values(&[node]).set(kv);
            for gpu in &heartbeat.gpus {
                let index = gpu.index.to_string();
                let labels = [node, index.as_str(), gpu.name.as_str()];
                (o.rig_gpu_utilization.with_label_values(&labels))
                    .set(f64::from(gpu.utilization_percent) / 100.0);
                (o.rig_gpu_memory_used.with_label_values(&labels))
                    .set(gpu.memory_used_bytes as f64);
                (o.rig_gpu_memory_total.with_label_values(&labels))
                    .set(gpu.memory_total_bytes as f64);
                (o.rig_gpu_temperature.with_label_values(&labels))
                    .set(f64::from(gpu.temperature_celsius));
                o.rig_gpu_power
                    .with_label_values(&labels)
                    .set(gpu.power_watts);
            }
        }

        if let Some(queued) = now.usage_queued {
            o.usage_queued.set(queued as i64);
        }
        if let Some(backlog) = now.batch_backlog {
            // Every model served reads 0 lines rather than nothing, so that a backlog's growth
            // is measured from zero.
            let mut lines: std::collections::BTreeMap<&str, (u64, u64)> =
                known.iter().map(|m| (m.as_str(), (0, 0))).collect();
            for queue in &backlog {
                let entry = lines.entry(queue.model.as_str()).or_default();
                entry.0 += queue.waiting;
                entry.1 += queue.leased;
            }
            o.batch_lines.reset();
            for (model, (waiting, leased)) in lines {
                (o.batch_lines.with_label_values(&[model, "waiting"])).set(waiting as i64);
                (o.batch_lines.with_label_values(&[model, "leased"])).set(leased as i64);
            }
        }
    }

    pub fn backend_error(&self, backend: &str, kind: &str) {
        self.backend_errors
            .with_label_values(&[backend, kind])
            .inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
