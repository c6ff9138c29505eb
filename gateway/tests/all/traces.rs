//! OpenTelemetry traces (docs/tracing.md) against an OTLP/HTTP receiver the test runs: one
//! trace from the client's `traceparent` through the gateway's phases, a real rig
//! (`node-runner` with the process driver) and the engine (`sim-engine` exporting its own span,
//! as vLLM's `--otlp-traces-endpoint` does); a malformed or unsampled `traceparent`; traces off;
//! a dead and a stuck collector.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message;
use serde_json::json;
use tokio::sync::Semaphore;

use crate::support::*;

/// A span as the receiver got it.
#[derive(Clone, Debug)]
struct Got {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    /// Empty for a root.
    parent: String,
    kind: i32,
    attributes: BTreeMap<String, String>,
    events: Vec<String>,
    /// OTLP's status code: 2 is an error.
    status: i32,
}

/// OTLP's `SPAN_KIND_SERVER` and `SPAN_KIND_CLIENT`.
const SERVER: i32 = 2;
const CLIENT: i32 = 3;

#[derive(Default)]
struct Received {
    spans: Vec<Got>,
    /// Spans in exports that arrived, whether answered or not.
    arrived: usize,
}

/// An OTLP/HTTP receiver on loopback: decodes every export with the protocol's own messages.
/// With a gate, each export waits for a permit before it is answered (a stuck collector).
struct Receiver {
    addr: SocketAddr,
    received: Arc<Mutex<Received>>,
    gate: Option<Arc<Semaphore>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct ReceiverState {
    received: Arc<Mutex<Received>>,
    gate: Option<Arc<Semaphore>>,
}

async fn export(State(state): State<ReceiverState>, body: Bytes) -> axum::http::StatusCode {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return axum::http::StatusCode::BAD_REQUEST;
    };
    let mut spans = Vec::new();
    for resource_spans in request.resource_spans {
        let service = resource_spans
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .map(|kv| text(kv.value.as_ref().and_then(|v| v.value.as_ref())))
            .unwrap_or_default();
        for span in resource_spans
            .scope_spans
            .into_iter()
            .flat_map(|scope| scope.spans)
        {
            spans.push(Got {
                service: service.clone(),
                name: span.name,
                trace_id: hex(&span.trace_id),
                span_id: hex(&span.span_id),
                parent: hex(&span.parent_span_id),
                kind: span.kind,
                attributes: span
                    .attributes
                    .into_iter()
                    .map(|kv| {
                        (
                            kv.key,
                            text(kv.value.as_ref().and_then(|v| v.value.as_ref())),
                        )
                    })
                    .collect(),
                events: span.events.into_iter().map(|e| e.name).collect(),
                status: span.status.map_or(0, |s| s.code),
            });
        }
    }
    state.received.lock().unwrap().arrived += spans.len();
    if let Some(gate) = &state.gate {
        let _permit = gate.acquire().await;
    }
    state.received.lock().unwrap().spans.extend(spans);
    axum::http::StatusCode::OK
}

fn text(value: Option<&Value>) -> String {
    match value {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(n)) => n.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Receiver {
    async fn start(gate: Option<Arc<Semaphore>>) -> Receiver {
        let received = Arc::new(Mutex::new(Received::default()));
        let app = axum::Router::new()
            .route("/v1/traces", post(export))
            .with_state(ReceiverState {
                received: Arc::clone(&received),
                gate: gate.clone(),
            });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver {
            addr,
            received,
            gate,
            task,
        }
    }

    /// The base URL, as `[telemetry] otlp_endpoint` takes it.
    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn spans(&self) -> Vec<Got> {
        self.received.lock().unwrap().spans.clone()
    }

    fn arrived(&self) -> usize {
        self.received.lock().unwrap().arrived
    }

    fn of_trace(&self, trace_id: &str) -> Vec<Got> {
        self.spans()
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect()
    }

    /// Waits until the trace holds spans named each of `names` (by any service).
    async fn wait_for(&self, trace_id: &str, names: &[&str]) -> Vec<Got> {
        wait_until(
            Duration::from_secs(30),
            &format!("spans {names:?} of trace {trace_id}"),
            || async {
                let spans = self.of_trace(trace_id);
                names.iter().all(|n| spans.iter().any(|s| s.name == *n))
            },
        )
        .await;
        self.of_trace(trace_id)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(gate) = &self.gate {
            gate.close();
        }
        self.task.abort();
    }
}

/// A gateway exporting to `endpoint`, quickly (a test waits for its spans).
fn traced_config(endpoint: String) -> garage_gateway::Config {
    let mut cfg = config(vec![]);
    cfg.nodes.heartbeat_interval_secs = 1;
    cfg.telemetry.otlp_endpoint = Some(endpoint);
    cfg.telemetry.export_delay_ms = 50;
    cfg
}

fn one<'a>(spans: &'a [Got], name: &str) -> &'a Got {
    let found: Vec<&Got> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "one {name} span in {spans:#?}");
    found[0]
}

/// A fresh client trace: its trace id and its span id (the gateway's parent).
fn client_trace(n: u8) -> (String, String, String) {
    let trace_id = format!(
        "{:032x}",
        0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4700_u128 + u128::from(n)
    );
    let span_id = format!("{:016x}", 0x00f0_67aa_0ba9_0200_u64 + u64::from(n));
    let header = format!("00-{trace_id}-{span_id}-01");
    (trace_id, span_id, header)
}

async fn chat_with_headers(
    base: &str,
    key: &str,
    stream: bool,
    headers: &[(&str, &str)],
) -> (String, String) {
    let mut request = client()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&chat(stream));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("gateway answers");
    assert_eq!(response.status(), 200);
    let request_id = response
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .expect("x-request-id")
        .to_owned();
    let body = response.text().await.unwrap();
    (request_id, body)
}

/// Checks the gateway's spans of one request and returns its dispatch span's id.
fn check_gateway_spans(spans: &[Got], parent: &str, request_id: &str, stream: bool) -> String {
    let root = one(spans, "POST /v1/chat/completions");
    assert_eq!(root.service, "garage-gateway");
    assert_eq!(root.kind, SERVER);
    assert_eq!(
        root.parent, parent,
        "the client's span is the request's parent"
    );
    assert_eq!(root.attributes["garage.request_id"], request_id);
    assert_eq!(root.attributes["http.response.status_code"], "200");
    assert_eq!(root.status, 0, "a 200 leaves the status unset");
    assert_eq!(root.attributes["gen_ai.request.model"], MODEL);
    assert_eq!(root.attributes["gen_ai.operation.name"], "chat");
    assert_eq!(root.attributes["garage.stream"], stream.to_string());
    assert!(root.attributes.contains_key("garage.rig"), "{root:?}");
    assert_eq!(root.attributes["gen_ai.usage.output_tokens"], "5");
    assert!(
        root.attributes["gen_ai.usage.input_tokens"]
            .parse::<u64>()
            .unwrap()
            > 0
    );
    let admission = one(spans, "admission");
    assert_eq!(admission.parent, root.span_id);
    assert_eq!(one(spans, "auth").parent, admission.span_id);
    assert_eq!(one(spans, "limiter").parent, admission.span_id);
    assert_eq!(one(spans, "route").parent, root.span_id);
    let dispatch = one(spans, "dispatch");
    assert_eq!(dispatch.parent, root.span_id);
    assert_eq!(dispatch.kind, CLIENT);
    assert_eq!(dispatch.attributes["http.response.status_code"], "200");
    assert_eq!(
        dispatch.attributes.get("garage.rig"),
        root.attributes.get("garage.rig")
    );
    let response = one(spans, "response");
    assert_eq!(response.parent, root.span_id);
    if stream {
        assert_eq!(response.events, ["first_token", "end_of_stream"]);
        assert_eq!(response.attributes["garage.stream.end"], "done");
    }
    dispatch.span_id.clone()
}

#[tokio::test]
async fn one_trace_runs_from_the_client_through_the_gateway_and_a_rig_to_the_engine() {
    let receiver = Receiver::start(None).await;
    let gw = gateway(traced_config(receiver.endpoint())).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "t"})).await;
    let token = enrollment_token(&base, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let rig_config = format!(
        r#"gateway_url = "{base}"
enrollment_token = "{token}"
name = "traced-rig"
state_file = "{state}"

[[engines]]
name = "vllm"
models = ["{MODEL}"]
port = {port}
driver = "process"
command = ["{sim}", "--listen", "127.0.0.1:{{port}}", "--model", "{MODEL}", "--otlp-traces-endpoint", "{endpoint}/v1/traces"]
"#,
        state = dir.path().join("state.json").display(),
        sim = workspace_binary("sim-engine").display(),
        endpoint = receiver.endpoint(),
        port = free_port(),
    );
    let _rig = NodeRunner::start(dir.path(), &rig_config);
    wait_until(Duration::from_secs(30), "the rig in routing", || async {
        routable_rigs(&base).await == 1
    })
    .await;

    for (n, stream) in [(1, false), (2, true)] {
        let (trace_id, client_span, traceparent) = client_trace(n);
        let (request_id, body) =
            chat_with_headers(&base, &key, stream, &[("traceparent", &traceparent)]).await;
        if stream {
            assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
        }
        let spans = receiver
            .wait_for(
                &trace_id,
                &["POST /v1/chat/completions", "response", "llm_request"],
            )
            .await;
        let dispatch = check_gateway_spans(&spans, &client_span, &request_id, stream);
        // The engine's own span, exported by the engine, under the gateway's dispatch.
        let engine = one(&spans, "llm_request");
        assert_eq!(engine.service, "sim-engine");
        assert_eq!(
            engine.parent, dispatch,
            "the engine's parent is the dispatch"
        );
        assert_eq!(engine.attributes["gen_ai.request.id"], request_id);
        assert_eq!(engine.attributes["gen_ai.request.model"], MODEL);
        assert_eq!(engine.attributes["http.response.status_code"], "200");
    }
    gw.shutdown(Duration::from_secs(5)).await;
}

/// A gateway on `receiver` in front of an in-process engine that exports to it too.
async fn traced_pair(
    receiver: &Receiver,
    gateway_traces: bool,
) -> (
    garage_gateway::Gateway,
    garage_sim_engine::SimEngine,
    String,
) {
    let engine = sim(garage_sim_engine::SimConfig {
        models: vec![MODEL.into()],
        otlp_traces_endpoint: Some(format!("{}/v1/traces", receiver.endpoint())),
        ..Default::default()
    })
    .await;
    let mut cfg = traced_config(receiver.endpoint());
    if !gateway_traces {
        cfg.telemetry.otlp_endpoint = None;
    }
    cfg.upstreams = vec![upstream("sim", engine.base_url())];
    let gw = gateway(cfg).await;
    let (_, key) = create_key(&gw.url(), json!({"name": "t"})).await;
    (gw, engine, key)
}

/// The engine's span of `request_id`, once it arrived.
async fn engine_span(receiver: &Receiver, request_id: &str) -> Got {
    let find = || {
        receiver.spans().into_iter().find(|s| {
            s.name == "llm_request"
                && s.attributes.get("gen_ai.request.id").map(String::as_str) == Some(request_id)
        })
    };
    wait_until(Duration::from_secs(30), "the engine's span", || async {
        find().is_some()
    })
    .await;
    find().unwrap()
}

#[tokio::test]
async fn a_malformed_traceparent_starts_a_new_trace_and_is_never_an_error() {
    let receiver = Receiver::start(None).await;
    let (gw, _engine, key) = traced_pair(&receiver, true).await;
    let base = gw.url();
    for bad in [
        "00-nonsense",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
    ] {
        let (request_id, _) = chat_with_headers(&base, &key, false, &[("traceparent", bad)]).await;
        let engine = engine_span(&receiver, &request_id).await;
        assert_ne!(engine.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736", "{bad}");
        let spans = receiver
            .wait_for(&engine.trace_id, &["POST /v1/chat/completions", "dispatch"])
            .await;
        let root = one(&spans, "POST /v1/chat/completions");
        assert_eq!(root.parent, "", "{bad}: a new root");
        assert_eq!(root.attributes["garage.request_id"], request_id);
        assert_eq!(engine.parent, one(&spans, "dispatch").span_id, "{bad}");
    }
}

#[tokio::test]
async fn an_unsampled_client_trace_is_not_recorded_but_its_flag_reaches_the_engine() {
    let receiver = Receiver::start(None).await;
    let (gw, _engine, key) = traced_pair(&receiver, true).await;
    let base = gw.url();
    let unsampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
    let (unsampled_id, _) =
        chat_with_headers(&base, &key, true, &[("traceparent", unsampled)]).await;
    // A sampled request after it: once its spans are in, the first one's would be too (the
    // exporters send in order).
    let (trace_id, _, sampled) = client_trace(9);
    let (sampled_id, _) = chat_with_headers(&base, &key, true, &[("traceparent", &sampled)]).await;
    receiver
        .wait_for(&trace_id, &["POST /v1/chat/completions", "llm_request"])
        .await;
    engine_span(&receiver, &sampled_id).await;
    let leaked: Vec<Got> = receiver
        .spans()
        .into_iter()
        .filter(|s| {
            s.trace_id == "0af7651916cd43dd8448eb211c80319c"
                || s.attributes.values().any(|v| v == &unsampled_id)
        })
        .collect();
    assert!(leaked.is_empty(), "unsampled spans exported: {leaked:#?}");
}

#[tokio::test]
async fn with_traces_off_nothing_is_exported_and_only_a_clients_traceparent_reaches_the_engine() {
    let receiver = Receiver::start(None).await;
    let (gw, _engine, key) = traced_pair(&receiver, false).await;
    let base = gw.url();
    assert!(!gw.state().telemetry().is_on());
    // No traceparent from the client: the gateway sends none of its own (the engine's span
    // is a root).
    let (alone, _) = chat_with_headers(&base, &key, false, &[]).await;
    assert_eq!(engine_span(&receiver, &alone).await.parent, "");
    // A client's passes unchanged: the engine's span is the client's span's child.
    let (trace_id, client_span, traceparent) = client_trace(3);
    for stream in [false, true] {
        let (request_id, _) =
            chat_with_headers(&base, &key, stream, &[("traceparent", &traceparent)]).await;
        let engine = engine_span(&receiver, &request_id).await;
        assert_eq!(engine.trace_id, trace_id);
        assert_eq!(engine.parent, client_span);
    }
    // A malformed one is not passed on.
    let (bad, _) = chat_with_headers(&base, &key, false, &[("traceparent", "00-junk-01")]).await;
    assert_eq!(engine_span(&receiver, &bad).await.parent, "");
    let gateway_spans: Vec<Got> = receiver
        .spans()
        .into_iter()
        .filter(|s| s.service != "sim-engine")
        .collect();
    assert!(gateway_spans.is_empty(), "{gateway_spans:#?}");
}

#[tokio::test]
async fn a_stuck_collector_slows_no_request_and_holds_a_bounded_queue() {
    // Nobody answers the exporter until the end.
    let gate = Arc::new(Semaphore::new(0));
    let receiver = Receiver::start(Some(Arc::clone(&gate))).await;
    let engine = fast_sim().await;
    let mut cfg = traced_config(receiver.endpoint());
    cfg.telemetry.max_queued_spans = 32;
    cfg.telemetry.export_timeout_ms = 120_000;
    cfg.upstreams = vec![upstream("sim", engine.base_url())];
    let gw = gateway(cfg).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "t"})).await;
    // 200 requests make 1,400 spans; the first export is stuck in the collector throughout.
    for n in 0..200 {
        let stream = n % 2 == 0;
        let (status, body) = post_chat(&base, &key, &chat(stream)).await;
        assert_eq!(status, 200, "{body}");
    }
    wait_until(Duration::from_secs(30), "the first export", || async {
        receiver.arrived() > 0
    })
    .await;
    // Let everything through: what was kept is the queue (and the one batch in flight).
    gate.add_permits(1_000);
    assert!(gw.shutdown(Duration::from_secs(5)).await);
    let arrived = receiver.arrived();
    assert!(
        arrived <= 2 * 32 + 7,
        "{arrived} spans exported: more than the queue held"
    );
}

#[tokio::test]
async fn a_dead_collector_fails_no_request() {
    // A port nobody listens on.
    let endpoint = format!("http://127.0.0.1:{}", free_port());
    let engine = fast_sim().await;
    let mut cfg = traced_config(endpoint);
    cfg.telemetry.max_queued_spans = 16;
    cfg.upstreams = vec![upstream("sim", engine.base_url())];
    let gw = gateway(cfg).await;
    let base = gw.url();
    let (_, key) = create_key(&base, json!({"name": "t"})).await;
    for n in 0..50 {
        let (status, body) = post_chat(&base, &key, &chat(n % 2 == 0)).await;
        assert_eq!(status, 200, "{body}");
    }
    // And it stops, its last export failed within the bound.
    assert!(gw.shutdown(Duration::from_secs(5)).await);
}
