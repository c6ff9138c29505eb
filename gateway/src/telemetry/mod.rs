//! Traces of the request path, with OpenTelemetry (docs/tracing.md).
//!
//! Off unless `[telemetry] otlp_endpoint` (or `OTEL_EXPORTER_OTLP_ENDPOINT`) names a collector.
//! Off, a request costs one header lookup: no span is built, and a client's valid
//! `traceparent` passes to the backend unchanged, so the app's trace still reaches the engine.
//! On, every request is a trace (or a child of the client's `traceparent`, sampled as the
//! client decided): a server span for the request, children for admission (`auth`,
//! `limiter`), `route`, each `dispatch` to a backend (whose context goes to the backend as its
//! `traceparent`, so the rig's engine can hang its own span under it) and the `response`, with
//! the first token and the end of the stream as its events. Spans use the API directly, with
//! explicit parents, rather than through `tracing`: a request's spans cross tasks and outlive
//! its handler (a stream ends in its body), and nothing is made at all when traces are off.
//!
//! Finished spans go to a batch processor on its own thread, which exports them with OTLP/HTTP
//! (protobuf) through a blocking client: never on the runtime that serves requests. Its queue
//! is bounded (`max_queued_spans`): a dead or slow collector drops spans, never slows a
//! request or grows memory.

use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider,
};

use crate::config::telemetry::TelemetryConfig;

pub use opentelemetry::KeyValue;

/// W3C Trace Context's header: version, trace id, parent span id, flags.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// W3C Trace Context's vendor-specific companion of `traceparent`.
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// The instrumentation scope of the gateway's spans.
const SCOPE: &str = "garage-gateway";

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot set up the OTLP exporter: {0}")]
    Exporter(String),
}

/// The gateway's traces: off, or a tracer whose spans go to an OTLP collector.
pub struct Telemetry {
    on: Option<On>,
}

struct On {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

impl Telemetry {
    /// No traces.
    pub fn off() -> Self {
        Telemetry { on: None }
    }

    /// Traces as `config` says: off without an endpoint, or exported to it.
    pub fn start(config: &TelemetryConfig) -> Result<Self, TelemetryError> {
        let Some(url) = config.traces_url() else {
            return Ok(Self::off());
        };
        let provider = provider(config, url)?;
        let tracer = provider.tracer(SCOPE);
        tracing::info!(endpoint = ?config.otlp_endpoint, ratio = config.sampling_ratio, "traces exported with OTLP/HTTP");
        Ok(Telemetry {
            on: Some(On { provider, tracer }),
        })
    }

    pub fn is_on(&self) -> bool {
        self.on.is_some()
    }

    /// The trace of a request that just arrived on `route` (its metrics label) at `path`,
    /// with the client's `headers`: `None` when traces are off and the client sent no valid
    /// `traceparent`, which is the cost of a request with traces off.
    pub fn request(
        &self,
        headers: &HeaderMap,
        route: &'static str,
        path: &'static str,
        request_id: Option<&HeaderValue>,
    ) -> Option<Box<RequestTrace>> {
        let Some(on) = &self.on else {
            let traceparent = headers.get(TRACEPARENT)?;
            // Only a valid one: an engine need not make sense of what a client made up.
            let parent = TraceContextPropagator::new().extract(&Headers(headers));
            if !parent.span().span_context().is_valid() {
                return None;
            }
            return Some(Box::new(RequestTrace::Passed(TraceHeaders {
                traceparent: traceparent.clone(),
                tracestate: headers.get(TRACESTATE).cloned(),
            })));
        };
        // An invalid or absent `traceparent` extracts as an empty context: a new root.
        let parent = TraceContextPropagator::new().extract(&Headers(headers));
        let request_id = request_id
            .and_then(|id| id.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let route_path = format!("/v1{path}");
        let span = on
            .tracer
            .span_builder(format!("POST {route_path}"))
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("http.request.method", "POST"),
                KeyValue::new("http.route", route_path.clone()),
                KeyValue::new("url.path", route_path),
                KeyValue::new("gen_ai.operation.name", operation(route)),
                KeyValue::new("garage.request_id", request_id),
            ])
            .start_with_context(&on.tracer, &parent);
        Some(Box::new(RequestTrace::Recorded(Recorded {
            tracer: on.tracer.clone(),
            root: parent.with_span(span),
        })))
    }

    /// Exports what is queued and stops, within `bound` (a dead collector gets no longer).
    pub async fn shutdown(&self, bound: Duration) {
        let Some(on) = &self.on else {
            return;
        };
        let provider = on.provider.clone();
        let stopped =
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(bound)).await;
        match stopped {
            Ok(Ok(())) => tracing::debug!("traces exported at shutdown"),
            Ok(Err(err)) => tracing::warn!(error = %err, "traces not all exported at shutdown"),
            Err(err) => tracing::warn!(error = %err, "traces not exported at shutdown"),
        }
    }
}

/// The tracer provider: a batch processor on its own thread exporting to `url`.
fn provider(config: &TelemetryConfig, url: String) -> Result<SdkTracerProvider, TelemetryError> {
    let timeout = config.export_timeout();
    let tls =
        garage_tls::client_config(None).map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    // Made on a thread of its own: a blocking client must not be made (or dropped) on an async
    // runtime's thread, and it lives on the batch processor's thread from here on.
    let client = std::thread::spawn(move || {
        reqwest::blocking::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .tcp_nodelay(true)
            .tls_backend_preconfigured(tls)
            .build()
    })
    .join()
    .map_err(|_| TelemetryError::Exporter("the HTTP client's thread panicked".into()))?
    .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(url)
        .with_timeout(timeout)
        .with_http_client(client)
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let batch = BatchConfigBuilder::default()
        .with_max_queue_size(config.max_queued_spans)
        // OpenTelemetry's default export size, within the queue.
        .with_max_export_batch_size(config.max_queued_spans.min(512))
        .with_scheduled_delay(config.export_delay())
        .build();
    let processor = BatchSpanProcessor::builder(exporter)
        .with_batch_config(batch)
        .build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            config.sampling_ratio,
        ))))
        .with_resource(
            Resource::builder()
                .with_service_name(config.service_name.clone())
                .build(),
        )
        .build())
}

/// GenAI's `gen_ai.operation.name` of an inference route.
fn operation(route: &str) -> &'static str {
    match route {
        "chat_completions" | "messages" | "responses" => "chat",
        "completions" => "text_completion",
        "embeddings" => "embeddings",
        "messages_count_tokens" => "count_tokens",
        "rerank" | "score" => "rerank",
        _ => "other",
    }
}

/// What a backend is sent of a request's trace.
#[derive(Clone, Debug)]
pub struct TraceHeaders {
    pub traceparent: HeaderValue,
    pub tracestate: Option<HeaderValue>,
}

impl TraceHeaders {
    /// Sets these on `headers`.
    pub fn apply(&self, headers: &mut HeaderMap) {
        headers.insert(TRACEPARENT, self.traceparent.clone());
        if let Some(state) = &self.tracestate {
            headers.insert(TRACESTATE, state.clone());
        }
    }
}

/// A request's trace.
pub enum RequestTrace {
    /// Traces off: the client's `traceparent`, passed on as it came.
    Passed(TraceHeaders),
    /// Traces on: the request's span, its phases' parent.
    Recorded(Recorded),
}

pub struct Recorded {
    tracer: SdkTracer,
    /// The request's server span, in the context of the client's trace.
    root: Context,
}

impl RequestTrace {
    /// A phase of the request: a child span, ended when dropped.
    pub fn phase(&self, name: &'static str) -> Option<Phase> {
        match self {
            RequestTrace::Passed(_) => None,
            RequestTrace::Recorded(recorded) => Some(Phase::start(
                &recorded.tracer,
                &recorded.root,
                name,
                SpanKind::Internal,
            )),
        }
    }

    /// An attempt at `backend` (a rig's `rig`): its span, and the headers that make the
    /// backend's own spans its children.
    pub fn dispatch(&self, backend: &str, rig: Option<&str>) -> (Option<Phase>, TraceHeaders) {
        match self {
            RequestTrace::Passed(headers) => (None, headers.clone()),
            RequestTrace::Recorded(recorded) => {
                let phase = Phase::start(
                    &recorded.tracer,
                    &recorded.root,
                    "dispatch",
                    SpanKind::Client,
                );
                phase.set(KeyValue::new("garage.backend", backend.to_owned()));
                if let Some(rig) = rig {
                    phase.set(KeyValue::new("garage.rig", rig.to_owned()));
                }
                let headers = phase.headers();
                (Some(phase), headers)
            }
        }
    }

    /// Sets `attribute` on the request's span.
    pub fn set(&self, attribute: KeyValue) {
        if let RequestTrace::Recorded(recorded) = self {
            recorded.root.span().set_attribute(attribute);
        }
    }

    /// Ends the request's span with the `status` its client got, who served it and the tokens
    /// it was billed.
    pub fn end(&self, status: StatusCode, served: Option<Served<'_>>) {
        let RequestTrace::Recorded(recorded) = self else {
            return;
        };
        let span = recorded.root.span();
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status.as_u16()),
        ));
        if let Some(served) = served {
            span.set_attribute(KeyValue::new("garage.backend", served.backend.to_owned()));
            if let Some(rig) = served.rig {
                span.set_attribute(KeyValue::new("garage.rig", rig.to_owned()));
            }
            span.set_attribute(KeyValue::new(
                "gen_ai.usage.input_tokens",
                saturating_i64(served.input_tokens),
            ));
            span.set_attribute(KeyValue::new(
                "gen_ai.usage.output_tokens",
                saturating_i64(served.output_tokens),
            ));
        }
        // OpenTelemetry's HTTP conventions: a server span fails on 5xx only (a 4xx is the
        // client's doing).
        if status.is_server_error() {
            span.set_attribute(KeyValue::new("error.type", status.as_str().to_owned()));
            span.set_status(Status::error(
                status.canonical_reason().unwrap_or("server error"),
            ));
        }
        span.end();
    }
}

/// Who served a request, and what it was billed, for its span.
pub struct Served<'a> {
    pub backend: &'a str,
    pub rig: Option<&'a str>,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

fn saturating_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A span of one phase of a request, ended when dropped.
pub struct Phase {
    tracer: SdkTracer,
    cx: Context,
}

impl Phase {
    fn start(tracer: &SdkTracer, parent: &Context, name: &'static str, kind: SpanKind) -> Self {
        let span = tracer
            .span_builder(name)
            .with_kind(kind)
            .start_with_context(tracer, parent);
        Phase {
            tracer: tracer.clone(),
            cx: parent.with_span(span),
        }
    }

    /// A phase within this one.
    pub fn child(&self, name: &'static str) -> Phase {
        Phase::start(&self.tracer, &self.cx, name, SpanKind::Internal)
    }

    pub fn set(&self, attribute: KeyValue) {
        self.cx.span().set_attribute(attribute);
    }

    /// Marks a moment of the phase (`first_token`).
    pub fn event(&self, name: &'static str) {
        self.cx.span().add_event(name, Vec::new());
    }

    /// The phase failed: `message` says how.
    pub fn fail(&self, message: String) {
        self.cx.span().set_status(Status::error(message));
    }

    /// This phase as the parent of a callee's spans.
    fn headers(&self) -> TraceHeaders {
        let mut collect = Collect::default();
        TraceContextPropagator::new().inject_context(&self.cx, &mut collect);
        TraceHeaders {
            traceparent: collect
                .traceparent
                .unwrap_or_else(|| HeaderValue::from_static("")),
            tracestate: collect.tracestate,
        }
    }
}

impl Drop for Phase {
    fn drop(&mut self) {
        self.cx.span().end();
    }
}

/// A request's headers, as the propagator reads them.
struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

/// The headers the propagator writes.
#[derive(Default)]
struct Collect {
    traceparent: Option<HeaderValue>,
    tracestate: Option<HeaderValue>,
}

impl Injector for Collect {
    fn set(&mut self, key: &str, value: String) {
        let Ok(value) = HeaderValue::from_str(&value) else {
            return;
        };
        match key {
            "traceparent" => self.traceparent = Some(value),
            "tracestate" if !value.is_empty() => self.tracestate = Some(value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn off_passes_a_valid_traceparent_and_nothing_else() {
        let off = Telemetry::off();
        assert!(
            off.request(
                &HeaderMap::new(),
                "chat_completions",
                "/chat/completions",
                None
            )
            .is_none()
        );
        let bad = headers(&[("traceparent", "00-nonsense-01")]);
        assert!(
            off.request(&bad, "chat_completions", "/chat/completions", None)
                .is_none()
        );
        let all_zero = headers(&[(
            "traceparent",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        )]);
        assert!(
            off.request(&all_zero, "chat_completions", "/chat/completions", None)
                .is_none()
        );
        let good = headers(&[("traceparent", PARENT), ("tracestate", "vendor=1")]);
        let trace = off
            .request(&good, "chat_completions", "/chat/completions", None)
            .expect("passed");
        assert!(trace.phase("admission").is_none(), "no spans when off");
        let (span, sent) = trace.dispatch("b", None);
        assert!(span.is_none());
        assert_eq!(sent.traceparent, PARENT);
        assert_eq!(sent.tracestate.unwrap(), "vendor=1");
    }

    #[test]
    fn every_route_names_an_operation() {
        for route in [
            "chat_completions",
            "completions",
            "embeddings",
            "responses",
            "rerank",
            "score",
            "messages",
            "messages_count_tokens",
        ] {
            assert_ne!(operation(route), "other", "{route}");
        }
    }
}
