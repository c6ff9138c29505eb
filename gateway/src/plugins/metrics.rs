//! Counters of the plugin host, for the gateway's Prometheus registry.

use std::sync::{Arc, OnceLock};

use prometheus::core::Collector;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
};

use super::Slot;

/// Call latency buckets, seconds: a compiled router answers in tens of microseconds, an
/// interpreted meter in milliseconds, and a deadline blows at 5 ms or 1 s.
const CALL_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5,
];

/// The plugin host's metrics. Register them with [`PluginMetrics::register`].
#[derive(Clone)]
pub struct PluginMetrics {
    /// `garage_plugin_calls_total{slot, role}`: calls made, by slot and `active`/`canary`.
    pub calls: IntCounterVec,
    /// `garage_plugin_faults_total{slot, kind}`: calls that fell back, by kind of fault.
    pub faults: IntCounterVec,
    /// `garage_plugin_call_duration_seconds{slot}`: what a caller waits for: getting an instance
    /// (instantiating it when none is ready), the call, and putting the instance away.
    pub call_duration: HistogramVec,
    /// `garage_plugin_rollbacks_total{slot}`: automatic rollbacks after repeated faults.
    pub rollbacks: IntCounterVec,
    /// `garage_plugin_restores_total{slot}`: slots the store lost (a Redis that came back
    /// empty) and the gateway reinstalled.
    pub restores: IntCounterVec,
    /// `garage_plugin_admissions_promised_total{role}`: requests the gateway allowed without
    /// calling the rate limiter, on its promise that it does not limit their key and model
    /// (`garage:policy@0.7.0`).
    pub promised: IntCounterVec,
    /// The series every call touches, resolved on first use (`with_label_values` hashes the
    /// labels and takes the vector's lock each time; two per call on the request path).
    per_call: Arc<PerCall>,
}

/// `calls` by slot and role (active, canary), and `call_duration` by slot.
#[derive(Default)]
struct PerCall {
    calls: [[OnceLock<IntCounter>; 2]; 4],
    durations: [OnceLock<Histogram>; 4],
    promised: [OnceLock<IntCounter>; 2],
}

impl PluginMetrics {
    pub fn new() -> Self {
        let calls = IntCounterVec::new(
            Opts::new("garage_plugin_calls_total", "Plugin calls by slot and role"),
            &["slot", "role"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let faults = IntCounterVec::new(
            Opts::new(
                "garage_plugin_faults_total",
                "Plugin calls that fell back, by slot and kind (trap, timeout, memory_cap, \
                 bad_output, plugin_error, host)",
            ),
            &["slot", "kind"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let call_duration = HistogramVec::new(
            HistogramOpts::new(
                "garage_plugin_call_duration_seconds",
                "Plugin call latency: getting an instance, the call, putting the instance away",
            )
            .buckets(CALL_BUCKETS.to_vec()),
            &["slot"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let rollbacks = IntCounterVec::new(
            Opts::new(
                "garage_plugin_rollbacks_total",
                "Automatic rollbacks of a plugin slot after repeated faults",
            ),
            &["slot"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let restores = IntCounterVec::new(
            Opts::new(
                "garage_plugin_restores_total",
                "Plugin slots the store lost (it came back empty) and the gateway reinstalled",
            ),
            &["slot"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let promised = IntCounterVec::new(
            Opts::new(
                "garage_plugin_admissions_promised_total",
                "Requests allowed without calling the rate limiter, on its promise that it does \
                 not limit their key and model, by the role of its version",
            ),
            &["role"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        PluginMetrics {
            calls,
            faults,
            call_duration,
            rollbacks,
            restores,
            promised,
            per_call: Arc::default(),
        }
    }

    /// Counts a call into `slot` as `role` (`active` or `canary`).
    pub fn count_call(&self, slot: Slot, role: &'static str) {
        let cell = &self.per_call.calls[slot.index()][usize::from(role == "canary")];
        cell.get_or_init(|| self.calls.with_label_values(&[slot.as_str(), role]))
            .inc();
    }

    /// Counts a request allowed on a promise of the rate limiter's version of `role`.
    pub fn count_promised(&self, role: &'static str) {
        self.per_call.promised[usize::from(role == "canary")]
            .get_or_init(|| self.promised.with_label_values(&[role]))
            .inc();
    }

    /// Records how long a caller waited for a call into `slot`.
    pub fn observe_call(&self, slot: Slot, seconds: f64) {
        self.per_call.durations[slot.index()]
            .get_or_init(|| self.call_duration.with_label_values(&[slot.as_str()]))
            .observe(seconds);
    }

    /// The collectors, to register with a Prometheus registry.
    pub fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.calls.clone()),
            Box::new(self.faults.clone()),
            Box::new(self.call_duration.clone()),
            Box::new(self.rollbacks.clone()),
            Box::new(self.restores.clone()),
            Box::new(self.promised.clone()),
        ]
    }

    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        for collector in self.collectors() {
            registry.register(collector)?;
        }
        Ok(())
    }
}

impl Default for PluginMetrics {
    fn default() -> Self {
        Self::new()
    }
}
