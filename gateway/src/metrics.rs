//! Prometheus metrics of the gateway, served at `GET /metrics`.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
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
    pub in_flight: IntGauge,
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
        let in_flight = IntGauge::new("garage_requests_in_flight", "Requests being served now")
            .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        for collector in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(request_duration.clone()),
            Box::new(time_to_first_token.clone()),
            Box::new(tokens.clone()),
            Box::new(backend_errors.clone()),
            Box::new(in_flight.clone()),
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
