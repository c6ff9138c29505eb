//! vLLM's `--otlp-traces-endpoint`: a span for every inference request, a child of the
//! caller's W3C `traceparent` (a new root without one), exported with OTLP/HTTP protobuf. vLLM
//! names it `llm_request`; so does the simulator, with the request's model, id and token limit,
//! from the request's arrival to the last byte of its answer.

use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use opentelemetry::KeyValue;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{Span as _, SpanKind, Status, Tracer as _, TracerProvider as _};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracer, SdkTracerProvider,
};

/// Longest request body read to name the span's model (the API's own limit is axum's).
const BODY_LIMIT: usize = 64 * 1024 * 1024;

/// The engine's tracer and the provider exporting its spans.
pub(crate) struct Traces {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
}

impl Traces {
    /// Spans posted to `endpoint`, the full OTLP/HTTP traces URL (`http://HOST:4318/v1/traces`).
    pub(crate) fn start(endpoint: &str) -> std::io::Result<Traces> {
        let invalid = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            return Err(invalid(format!(
                "--otlp-traces-endpoint {endpoint:?}: expected an http:// or https:// URL"
            )));
        }
        let tls = garage_tls::client_config(None).map_err(|e| invalid(e.to_string()))?;
        let timeout = Duration::from_secs(10);
        // A blocking client is made (and lives) off the async runtime's threads.
        let client = std::thread::spawn(move || {
            reqwest::blocking::Client::builder()
                .timeout(timeout)
                .tls_backend_preconfigured(tls)
                .build()
        })
        .join()
        .map_err(|_| invalid("the OTLP client's thread panicked".into()))?
        .map_err(|e| invalid(e.to_string()))?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(endpoint)
            .with_timeout(timeout)
            .with_http_client(client)
            .build()
            .map_err(|e| invalid(e.to_string()))?;
        // A simulator's spans are read by tests that wait for them: sent within a tenth of a
        // second rather than OpenTelemetry's five.
        let batch = BatchConfigBuilder::default()
            .with_scheduled_delay(Duration::from_millis(100))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(
                BatchSpanProcessor::builder(exporter)
                    .with_batch_config(batch)
                    .build(),
            )
            .with_resource(Resource::builder().with_service_name("sim-engine").build())
            .build();
        let tracer = provider.tracer("garage-sim-engine");
        Ok(Traces { provider, tracer })
    }

    pub(crate) fn tracer(&self) -> SdkTracer {
        self.tracer.clone()
    }

    /// Exports what is queued, within a few seconds.
    pub(crate) async fn shutdown(self) {
        let provider = self.provider;
        let _ = tokio::task::spawn_blocking(move || {
            provider.shutdown_with_timeout(Duration::from_secs(5))
        })
        .await;
    }
}

/// A request's headers, as the propagator reads them.
struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

#[derive(serde::Deserialize, Default)]
struct Named {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    max_tokens: Option<i64>,
}

/// The span of one inference request, ended with its answer's last byte.
pub(crate) async fn trace_request(
    State(tracer): State<SdkTracer>,
    request: Request,
    next: Next,
) -> Response {
    if request.method() != http::Method::POST || !request.uri().path().starts_with("/v1/") {
        return next.run(request).await;
    }
    let parent = TraceContextPropagator::new().extract(&Headers(request.headers()));
    let (parts, body) = request.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, BODY_LIMIT).await else {
        return next.run(Request::from_parts(parts, Body::empty())).await;
    };
    let named: Named = serde_json::from_slice(&bytes).unwrap_or_default();
    let mut attributes = vec![
        KeyValue::new("gen_ai.operation.name", "chat"),
        KeyValue::new("url.path", parts.uri.path().to_owned()),
    ];
    if let Some(model) = named.model {
        attributes.push(KeyValue::new("gen_ai.request.model", model));
    }
    if let Some(max_tokens) = named.max_tokens {
        attributes.push(KeyValue::new("gen_ai.request.max_tokens", max_tokens));
    }
    if let Some(id) = parts
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
    {
        attributes.push(KeyValue::new("gen_ai.request.id", id.to_owned()));
    }
    let mut span = tracer
        .span_builder("llm_request")
        .with_kind(SpanKind::Server)
        .with_attributes(attributes)
        .start_with_context(&tracer, &parent);
    let response = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    let status = response.status();
    span.set_attribute(KeyValue::new(
        "http.response.status_code",
        i64::from(status.as_u16()),
    ));
    if status.is_server_error() {
        span.set_status(Status::error(status.as_str().to_owned()));
    }
    let (parts, body) = response.into_parts();
    Response::from_parts(
        parts,
        Body::new(SpannedBody {
            body,
            span: Some(span),
        }),
    )
}

/// An answer's body that ends its span with its last frame (or when dropped unfinished).
struct SpannedBody {
    body: Body,
    span: Option<opentelemetry_sdk::trace::Span>,
}

impl HttpBody for SpannedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(None) = polled
            && let Some(mut span) = self.span.take()
        {
            span.end();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

// A whole body is not polled past its last frame: its span ends when it is dropped, as does
// the span of an answer whose client went away before its end.
impl Drop for SpannedBody {
    fn drop(&mut self) {
        if let Some(mut span) = self.span.take() {
            if !self.body.is_end_stream() {
                span.set_status(Status::error("the client went away"));
            }
            span.end();
        }
    }
}
