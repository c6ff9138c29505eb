//! The `[telemetry]` section: OpenTelemetry traces of the request path, exported with OTLP/HTTP
//! (docs/tracing.md). Off unless a collector is named.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The standard variable that names a collector when the config names none. The config (and
/// `GARAGE_TELEMETRY_OTLP_ENDPOINT`) wins over it.
pub const OTEL_EXPORTER_OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// The path under an OTLP/HTTP endpoint that takes traces (the OTLP specification's).
pub const TRACES_PATH: &str = "/v1/traces";

/// OpenTelemetry traces: where they go, which requests are sampled, and how much may wait.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Base URL of an OTLP/HTTP collector (`http://otel-collector:4318`; `/v1/traces` is
    /// appended, as for `OTEL_EXPORTER_OTLP_ENDPOINT`). Unset: no traces are made, and a
    /// client's `traceparent` passes to the backend unchanged.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the gateway's spans.
    pub service_name: String,
    /// Share of new traces recorded (0 to 1). A request whose client sent a `traceparent`
    /// follows its sampled flag instead (parent-based sampling).
    pub sampling_ratio: f64,
    /// Spans waiting for export at most; more are dropped (and counted by the exporter's
    /// logs), so a dead or slow collector costs a bounded amount of memory. 2048 is
    /// OpenTelemetry's default: a few hundred requests at six spans each.
    pub max_queued_spans: usize,
    /// How long a finished span may wait to go out with others (OpenTelemetry's default is
    /// 5 s): fewer, bigger exports against fresher traces.
    pub export_delay_ms: u64,
    /// One export's deadline; a collector slower than this loses that batch.
    pub export_timeout_ms: u64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_name: "garage-gateway".into(),
            sampling_ratio: 1.0,
            max_queued_spans: 2048,
            export_delay_ms: 5000,
            export_timeout_ms: 10_000,
        }
    }
}

/// Most spans `max_queued_spans` may hold: a bound that is still a bound.
const MAX_QUEUED_SPANS: usize = 1_000_000;

impl TelemetryConfig {
    /// Whether traces are made and exported.
    pub fn enabled(&self) -> bool {
        self.otlp_endpoint.is_some()
    }

    /// The URL spans are posted to: the endpoint with `/v1/traces`.
    pub fn traces_url(&self) -> Option<String> {
        let base = self.otlp_endpoint.as_deref()?;
        Some(format!("{}{TRACES_PATH}", base.trim_end_matches('/')))
    }

    pub fn export_delay(&self) -> Duration {
        Duration::from_millis(self.export_delay_ms)
    }

    pub fn export_timeout(&self) -> Duration {
        Duration::from_millis(self.export_timeout_ms)
    }

    /// Takes `OTEL_EXPORTER_OTLP_ENDPOINT`'s value when the config names no endpoint.
    pub(crate) fn adopt_standard_endpoint(&mut self, value: Option<String>) {
        if self.otlp_endpoint.is_none() {
            self.otlp_endpoint = value.filter(|v| !v.trim().is_empty());
        }
    }

    pub(crate) fn validate(&self) -> Result<(), String> {
        if let Some(endpoint) = &self.otlp_endpoint {
            let uri = endpoint.parse::<http::Uri>().ok();
            let scheme_ok = uri
                .as_ref()
                .and_then(|u| u.scheme_str())
                .is_some_and(|s| s == "http" || s == "https");
            let host_ok = uri
                .as_ref()
                .and_then(|u| u.host())
                .is_some_and(|h| !h.is_empty());
            if !scheme_ok || !host_ok || uri.as_ref().and_then(|u| u.query()).is_some() {
                return Err(format!(
                    "telemetry.otlp_endpoint = {endpoint:?}: expected the base URL of an OTLP/HTTP \
                     collector, such as \"http://otel-collector:4318\" (traces go to its /v1/traces)"
                ));
            }
        }
        if self.service_name.trim().is_empty() {
            return Err(
                "telemetry.service_name is empty: name the service its spans come from".into(),
            );
        }
        if !(0.0..=1.0).contains(&self.sampling_ratio) {
            return Err(format!(
                "telemetry.sampling_ratio = {}: expected a share between 0 and 1",
                self.sampling_ratio
            ));
        }
        if self.max_queued_spans == 0 || self.max_queued_spans > MAX_QUEUED_SPANS {
            return Err(format!(
                "telemetry.max_queued_spans = {}: expected 1 to {MAX_QUEUED_SPANS}",
                self.max_queued_spans
            ));
        }
        if self.export_delay_ms == 0 || self.export_timeout_ms == 0 {
            return Err(
                "telemetry.export_delay_ms and telemetry.export_timeout_ms must be above 0".into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn load(text: Option<&str>, env: &[(&str, &str)]) -> Config {
        let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        Config::load(text, env).expect("loads").0
    }

    #[test]
    fn off_unless_an_endpoint_is_named_and_the_config_wins_over_the_standard_variable() {
        assert!(!load(None, &[]).telemetry.enabled());
        let standard = load(
            None,
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel:4318/")],
        );
        assert_eq!(
            standard.telemetry.traces_url().as_deref(),
            Some("http://otel:4318/v1/traces")
        );
        let text = "[telemetry]\notlp_endpoint = \"http://mine:4318\"\n";
        let both = load(
            Some(text),
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel:4318")],
        );
        assert_eq!(
            both.telemetry.traces_url().as_deref(),
            Some("http://mine:4318/v1/traces")
        );
        let ours = load(
            Some(text),
            &[("GARAGE_TELEMETRY_OTLP_ENDPOINT", "https://env:4318")],
        );
        assert_eq!(
            ours.telemetry.traces_url().as_deref(),
            Some("https://env:4318/v1/traces")
        );
        // An empty standard variable is no endpoint.
        assert!(
            !load(None, &[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")])
                .telemetry
                .enabled()
        );
    }

    #[test]
    fn a_bad_standard_variable_is_refused_like_a_bad_config() {
        let env = [(
            "OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(),
            "otel:4318".to_owned(),
        )];
        let error = Config::load(None, env).unwrap_err().to_string();
        assert!(error.contains("telemetry.otlp_endpoint"), "{error}");
        for (field, value) in [
            ("sampling_ratio", "nan"),
            ("sampling_ratio", "-0.1"),
            ("max_queued_spans", "0"),
            ("export_timeout_ms", "0"),
            ("service_name", "\" \""),
        ] {
            let text = format!("[telemetry]\n{field} = {value}\n");
            let error = Config::load(Some(&text), std::iter::empty())
                .unwrap_err()
                .to_string();
            assert!(
                error.contains(&format!("telemetry.{field}")),
                "{field}: {error}"
            );
        }
    }
}
