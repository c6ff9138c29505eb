//! Prometheus metrics of the gateway, served at `GET /metrics`.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
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
    /// The series of each model's requests, by route (see [`RouteSeries`]). Read on every
    /// request without a lock; a model's first request copies the map to add its own.
    series: ArcSwap<HashMap<Box<str>, Vec<Arc<RouteSeries>>, foldhash::fast::RandomState>>,
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
        ] {
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
