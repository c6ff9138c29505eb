//! Webhooks: endpoints through the admin API, signed deliveries retried with one webhook-id,
//! failures visible, `usage.recorded` per charged request (once, however often the ledger
//! retries), `payout.completed` per run, the usage export as CSV and CloudEvents lines, and two
//! replicas on one Redis delivering each event once.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::support::*;
use garage_gateway::config::Config;
use garage_gateway::webhooks::{Event, EventKind};

/// One delivery as the receiver saw it.
#[derive(Debug, Clone)]
struct Received {
    id: String,
    timestamp: String,
    signature: String,
    content_type: String,
    body: Vec<u8>,
}

/// What the receiver answers.
#[derive(Clone)]
enum Behaviour {
    /// 500 to the first `n` deliveries of each webhook-id, then 200.
    FailFirst(usize),
    /// Never answers.
    Hang,
    /// A redirect to another URL.
    Redirect(String),
    /// 500 with a megabyte of body.
    HugeError,
}

/// A webhook receiver on loopback: records every delivery, answers as told.
struct Receiver {
    url: String,
    received: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    async fn start(behaviour: Behaviour) -> Receiver {
        let received: Arc<Mutex<Vec<Received>>> = Arc::default();
        let log = received.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
                let (log, behaviour) = (log.clone(), behaviour.clone());
                async move {
                    let header = |name: &str| {
                        headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned()
                    };
                    let delivery = Received {
                        id: header("webhook-id"),
                        timestamp: header("webhook-timestamp"),
                        signature: header("webhook-signature"),
                        content_type: header("content-type"),
                        body: body.to_vec(),
                    };
                    let seen = {
                        let mut log = log.lock().unwrap();
                        log.push(delivery.clone());
                        log.iter().filter(|d| d.id == delivery.id).count()
                    };
                    match behaviour {
                        Behaviour::FailFirst(n) if seen <= n => {
                            (StatusCode::INTERNAL_SERVER_ERROR, "not now").into_response()
                        }
                        Behaviour::FailFirst(_) => (StatusCode::OK, "ok").into_response(),
                        Behaviour::Hang => std::future::pending().await,
                        Behaviour::Redirect(to) => {
                            axum::response::Redirect::temporary(&to).into_response()
                        }
                        Behaviour::HugeError => {
                            (StatusCode::INTERNAL_SERVER_ERROR, "x".repeat(1 << 20)).into_response()
                        }
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Receiver {
            url,
            received,
            task,
        }
    }

    fn all(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    fn of(&self, id: &str) -> Vec<Received> {
        self.all().into_iter().filter(|d| d.id == id).collect()
    }
}

/// The receiver's check, written from the Standard Webhooks specification (not with the
/// gateway's code): HMAC-SHA256 of `{id}.{timestamp}.{body}` under the base64 key after
/// `whsec_`, any `v1,` signature of the header, and a timestamp within five minutes of `now`.
fn verifies(secret: &str, delivery: &Received, now: u64) -> bool {
    let b64 = base64::engine::general_purpose::STANDARD;
    let Some(key) = secret
        .strip_prefix("whsec_")
        .and_then(|k| b64.decode(k).ok())
    else {
        return false;
    };
    let Ok(timestamp) = delivery.timestamp.parse::<u64>() else {
        return false;
    };
    if now.abs_diff(timestamp) > 300 {
        return false;
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
    mac.update(format!("{}.{}.", delivery.id, delivery.timestamp).as_bytes());
    mac.update(&delivery.body);
    let expected = mac.finalize().into_bytes();
    delivery
        .signature
        .split(' ')
        .filter_map(|s| s.strip_prefix("v1,"))
        .filter_map(|s| b64.decode(s).ok())
        .any(|given| given.as_slice() == expected.as_slice())
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A test config with quick webhooks: attempts a few milliseconds apart.
fn quick(mut config: Config, attempts: u32) -> Config {
    config.webhooks.max_attempts = attempts;
    config.webhooks.backoff_base_ms = 20;
    config.webhooks.backoff_max_ms = 80;
    config.webhooks.timeout_ms = 500;
    config.webhooks.poll_interval_ms = 20;
    config
}

/// Creates an endpoint; returns its id and secret.
async fn endpoint(base: &str, url: &str, events: &[&str]) -> (String, String) {
    let (status, body) = admin_post(
        base,
        "/admin/webhooks",
        json!({"url": url, "events": events, "description": "billing"}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    (
        body["id"].as_str().unwrap().to_owned(),
        body["secret"].as_str().unwrap().to_owned(),
    )
}

async fn deliveries(base: &str, id: &str) -> Vec<Value> {
    admin_get(base, &format!("/admin/webhooks/{id}/deliveries")).await["data"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn event(id: &str, kind: EventKind) -> Event {
    Event {
        id: id.into(),
        kind,
        subject: "key_1".into(),
        data: json!({"scope": "key", "threshold_percent": 80}),
        time_ms: 1_795_329_644_041,
    }
}

fn counter(metrics: &str, outcome: &str) -> u64 {
    let prefix = format!("garage_webhook_deliveries_total{{outcome=\"{outcome}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .map_or(0, |v| v.trim().parse().unwrap())
}

#[tokio::test]
async fn a_delivery_is_signed_retried_under_one_id_and_delivered_once() {
    let gw = gateway(quick(config(vec![]), 5)).await;
    let base = gw.url();
    let receiver = Receiver::start(Behaviour::FailFirst(2)).await;
    let (id, secret) = endpoint(&base, &receiver.url, &["budget.threshold"]).await;
    assert!(secret.starts_with("whsec_"), "{secret}");

    // Another kind: nobody takes it, nothing is sent.
    gw.state()
        .webhooks()
        .emit(event("payout-x", EventKind::PayoutCompleted));
    gw.state().webhooks().emit(event(
        "budget:key:key_1:month:0:80",
        EventKind::BudgetThreshold,
    ));
    wait_until(Duration::from_secs(20), "the third attempt", || async {
        receiver.all().len() >= 3
    })
    .await;
    wait_until(Duration::from_secs(10), "the delivery recorded", || async {
        deliveries(&base, &id)
            .await
            .first()
            .map(|d| d["state"].clone())
            == Some(json!("delivered"))
    })
    .await;

    let got = receiver.all();
    assert_eq!(got.len(), 3, "{got:?}");
    for delivery in &got {
        // The same webhook-id (the event's id) and body on every attempt, each signed.
        assert_eq!(delivery.id, "budget:key:key_1:month:0:80");
        assert_eq!(delivery.body, got[0].body);
        assert_eq!(delivery.content_type, "application/cloudevents+json");
        assert!(verifies(&secret, delivery, now()), "{delivery:?}");
    }
    let cloudevent: Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(cloudevent["specversion"], "1.0");
    assert_eq!(cloudevent["id"], "budget:key:key_1:month:0:80");
    assert_eq!(cloudevent["type"], "dev.garage.budget.threshold");
    assert_eq!(cloudevent["source"], "urn:garage:gateway");
    assert_eq!(cloudevent["subject"], "key_1");
    assert_eq!(cloudevent["time"], "2026-11-22T06:40:44.041Z");
    assert_eq!(cloudevent["datacontenttype"], "application/json");
    assert_eq!(cloudevent["data"]["threshold_percent"], 80);

    // What a receiver must refuse: another secret, a tampered body, a stale timestamp, a
    // signature moved to another id.
    let delivery = &got[2];
    assert!(!verifies("whsec_c2VjcmV0IG9mIGFub3RoZXI=", delivery, now()));
    let mut tampered = delivery.clone();
    tampered.body = cloudevent.to_string().replace("80", "50").into_bytes();
    assert!(!verifies(&secret, &tampered, now()));
    assert!(!verifies(&secret, delivery, now() + 3600));
    let mut moved = delivery.clone();
    moved.id = "budget:key:key_1:month:0:100".into();
    assert!(!verifies(&secret, &moved, now()));

    let list = deliveries(&base, &id).await;
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["event_id"], "budget:key:key_1:month:0:80");
    assert_eq!(list[0]["type"], "budget.threshold");
    assert_eq!(list[0]["attempts"], 3);
    assert_eq!(list[0]["last_status"], 200);
    assert_eq!(list[0]["next_attempt_at_ms"], Value::Null);

    // The same event again (noticed twice): not delivered twice. A later event is, after it.
    gw.state().webhooks().emit(event(
        "budget:key:key_1:month:0:80",
        EventKind::BudgetThreshold,
    ));
    // An id that cannot be a header: dropped and counted, not tried.
    gw.state().webhooks().emit(event(
        "budget:key:key_1\r\nx-evil: 1",
        EventKind::BudgetThreshold,
    ));
    gw.state().webhooks().emit(event(
        "budget:key:key_1:month:0:100",
        EventKind::BudgetThreshold,
    ));
    wait_until(Duration::from_secs(20), "the second event", || async {
        deliveries(&base, &id)
            .await
            .iter()
            .any(|d| d["event_id"] == "budget:key:key_1:month:0:100" && d["state"] == "delivered")
    })
    .await;
    assert_eq!(receiver.of("budget:key:key_1:month:0:80").len(), 3);
    assert_eq!(deliveries(&base, &id).await.len(), 2);
    let metrics = metrics_text(&base).await;
    assert_eq!(counter(&metrics, "delivered"), 2, "{metrics}");
    assert_eq!(counter(&metrics, "retried"), 4, "{metrics}");
    assert_eq!(counter(&metrics, "failed"), 0, "{metrics}");
    assert_eq!(counter(&metrics, "dropped"), 1, "{metrics}");
    assert_eq!(receiver.all().len(), 6);
}

#[tokio::test]
async fn a_receiver_that_never_answers_ends_failed_and_visible() {
    let mut cfg = quick(config(vec![]), 3);
    cfg.webhooks.timeout_ms = 200;
    let gw = gateway(cfg).await;
    let base = gw.url();
    let receiver = Receiver::start(Behaviour::Hang).await;
    let (id, _) = endpoint(&base, &receiver.url, &["budget.threshold"]).await;
    gw.state()
        .webhooks()
        .emit_now(&[event("evt-hang", EventKind::BudgetThreshold)])
        .await
        .unwrap();
    wait_until(Duration::from_secs(20), "the delivery to fail", || async {
        deliveries(&base, &id)
            .await
            .first()
            .map(|d| d["state"].clone())
            == Some(json!("failed"))
    })
    .await;
    let list = deliveries(&base, &id).await;
    assert_eq!(list[0]["attempts"], 3, "{list:?}");
    assert_eq!(list[0]["last_status"], Value::Null);
    let error = list[0]["last_error"].as_str().unwrap();
    assert!(error.contains("timed out"), "{error}");
    assert_eq!(receiver.of("evt-hang").len(), 3);
    let metrics = metrics_text(&base).await;
    assert_eq!(counter(&metrics, "failed"), 1, "{metrics}");
    assert_eq!(counter(&metrics, "retried"), 2, "{metrics}");
    assert_eq!(counter(&metrics, "delivered"), 0, "{metrics}");
}

#[tokio::test]
async fn endpoints_are_managed_and_bad_input_is_refused_in_openai_shape() {
    let gw = gateway(config(vec![])).await;
    let base = gw.url();
    let post = |body: Value| {
        let base = base.clone();
        async move {
            let response = client()
                .post(format!("{base}/admin/webhooks"))
                .bearer_auth(ADMIN)
                .json(&body)
                .send()
                .await
                .unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    for (body, param) in [
        (
            json!({"url": "ftp://example.com/x", "events": ["usage.recorded"]}),
            "url",
        ),
        (
            json!({"url": "not a url", "events": ["usage.recorded"]}),
            "url",
        ),
        (
            json!({"url": "https://u:p@example.com/", "events": ["usage.recorded"]}),
            "url",
        ),
        (
            json!({"url": "https://example.com/", "events": ["usage.everything"]}),
            "events",
        ),
        (
            json!({"url": "https://example.com/", "events": []}),
            "events",
        ),
        (
            json!({"url": "https://example.com/", "events": ["usage.recorded"], "description": "a\u{7}b"}),
            "description",
        ),
    ] {
        let (status, text) = post(body.clone()).await;
        assert_eq!(status, 400, "{body}: {text}");
        assert_eq!(error_of(&text)["param"], param, "{body}: {text}");
    }
    for body in [
        json!({"url": "https://example.com/"}),
        json!({"url": "https://example.com/", "events": ["usage.recorded"], "secret": "mine"}),
    ] {
        let (status, text) = post(body.clone()).await;
        assert_eq!(status, 400, "{body}: {text}");
        error_of(&text);
    }
    let response = client()
        .post(format!("{base}/admin/webhooks"))
        .json(&json!({"url": "https://example.com/", "events": ["usage.recorded"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    error_of(&response.text().await.unwrap());

    let (id, secret) = endpoint(
        &base,
        "https://billing.example.com/in",
        &["usage.recorded", "payout.completed"],
    )
    .await;
    let list = admin_get(&base, "/admin/webhooks").await;
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    assert_eq!(list["data"][0]["id"], id.as_str());
    assert_eq!(
        list["data"][0]["events"],
        json!(["usage.recorded", "payout.completed"])
    );
    assert!(
        !list.to_string().contains(&secret),
        "the secret is shown once: {list}"
    );
    assert!(list["data"][0].get("secret").is_none());

    for path in [
        "/admin/webhooks/we_nope/deliveries".to_owned(),
        format!("/admin/webhooks/{}/deliveries", "x".repeat(300)),
    ] {
        let response = client()
            .get(format!("{base}{path}"))
            .bearer_auth(ADMIN)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 404);
        error_of(&response.text().await.unwrap());
    }
    let response = client()
        .get(format!("{base}/admin/webhooks/{id}/deliveries?limit=0"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(error_of(&response.text().await.unwrap())["param"], "limit");
    let response = client()
        .get(format!("{base}/admin/webhooks/{id}/deliveries?limit=many"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    error_of(&response.text().await.unwrap());

    let delete = |id: String| {
        let base = base.clone();
        async move {
            let response = client()
                .delete(format!("{base}/admin/webhooks/{id}"))
                .bearer_auth(ADMIN)
                .send()
                .await
                .unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    let (status, text) = delete("we_nope".into()).await;
    assert_eq!(status, 404, "{text}");
    error_of(&text);
    let (status, text) = delete(id.clone()).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(admin_get(&base, "/admin/webhooks").await["data"], json!([]));
    assert!(!gw.state().webhooks().wants(EventKind::UsageRecorded));
    let (status, _) = delete(id).await;
    assert_eq!(status, 404);
}

/// Chat requests through the gateway; their request ids.
async fn chats(base: &str, key: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..n {
        let response = client()
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(key)
            .json(&chat(false))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        ids.push(
            response.headers()["x-request-id"]
                .to_str()
                .unwrap()
                .to_owned(),
        );
    }
    ids
}

#[tokio::test]
async fn each_charged_request_is_one_usage_event_even_when_the_ledger_retries() {
    let redis = RedisServer::start();
    let sim = fast_sim().await;
    let mut cfg = quick(config(vec![upstream("sim", sim.base_url())]), 5);
    cfg.store = redis.url();
    cfg.auth.key_secret = Some("a key secret shared by replicas".into());
    cfg.default_plugins = true;
    let gw = gateway(cfg).await;
    let base = gw.url();
    let receiver = Receiver::start(Behaviour::FailFirst(0)).await;
    let (endpoint_id, secret) = endpoint(&base, &receiver.url, &["usage.recorded"]).await;
    let (key_id, key) = create_key(&base, json!({"name": "app"})).await;
    let ids = chats(&base, &key, 3).await;
    wait_until(Duration::from_secs(30), "three usage events", || async {
        receiver.all().len() >= 3
    })
    .await;
    for id in &ids {
        let got = receiver.of(id);
        assert_eq!(got.len(), 1, "{id}: {got:?}");
        assert!(verifies(&secret, &got[0], now()));
        let cloudevent: Value = serde_json::from_slice(&got[0].body).unwrap();
        let entry = ledger_entry(&base, id).await;
        assert_eq!(cloudevent["id"], id.as_str());
        assert_eq!(cloudevent["type"], "dev.garage.usage.recorded");
        assert_eq!(cloudevent["subject"], key_id.as_str());
        let data = &cloudevent["data"];
        assert_eq!(data["request_id"], id.as_str());
        assert_eq!(data["key_id"], key_id.as_str());
        assert_eq!(data["model"], MODEL);
        assert_eq!(data["batch"], false);
        for tokens in ["prompt_tokens", "completion_tokens", "cached_tokens"] {
            assert_eq!(data[tokens], entry["event"][tokens], "{tokens}");
        }
        assert!(data["completion_tokens"].as_u64().unwrap() > 0);
        assert_eq!(data["credits"], entry["outcome"]["credits"]);
        assert!(data["credits"].as_f64().unwrap() > 0.0, "{data}");
        assert_eq!(data["counted_by"], "backend");
        assert_eq!(data["finished_at_ms"], entry["event"]["finished_at_ms"]);
    }

    // The ledger gets the first request's event again (a worker that stopped after writing its
    // entry, before acknowledging it): it is not charged again, nor sent again.
    let entry = gw
        .state()
        .usage()
        .ledger_entry(&ids[0])
        .await
        .unwrap()
        .unwrap();
    let item = garage_gateway::store::QueueItem {
        id: ids[0].clone(),
        payload: serde_json::to_vec(&entry.event).unwrap(),
    };
    gw.state()
        .store()
        .queue_push(garage_gateway::store::keyspace::USAGE_QUEUE, &[item])
        .await
        .unwrap();
    wait_until(
        Duration::from_secs(10),
        "the replayed event processed",
        || async { gw.state().usage().queued_len().await.unwrap() == 0 },
    )
    .await;
    let later = chats(&base, &key, 1).await;
    wait_until(
        Duration::from_secs(20),
        "the later request's event",
        || async { !receiver.of(&later[0]).is_empty() },
    )
    .await;
    assert_eq!(receiver.of(&ids[0]).len(), 1);
    assert_eq!(receiver.all().len(), 4);
    assert_eq!(deliveries(&base, &endpoint_id).await.len(), 4);
}

#[tokio::test]
async fn a_payout_run_is_one_payout_event() {
    let gw = gateway(quick(config(vec![]), 5)).await;
    let base = gw.url();
    let receiver = Receiver::start(Behaviour::FailFirst(0)).await;
    let (endpoint_id, secret) = endpoint(&base, &receiver.url, &["payout.completed"]).await;
    let award = |id: &'static str, points: f64| {
        let usage = gw.state().usage().clone();
        async move {
            let award = garage_gateway::ledger::Award {
                operator: "op-paid".into(),
                points,
                reason: "served".into(),
            };
            usage.award(id, &[award]).await.unwrap();
        }
    };
    award("report-1", 4.0).await;
    let run = |key: Option<&'static str>| {
        let base = base.clone();
        async move {
            let mut request = client()
                .post(format!("{base}/admin/payouts"))
                .bearer_auth(ADMIN)
                .json(&json!({"rate_per_point": 0.5, "currency": "USD"}));
            if let Some(key) = key {
                request = request.header("idempotency-key", key);
            }
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 201);
            response.json::<Value>().await.unwrap()
        }
    };
    let first = run(Some("run-1")).await;
    // Its retry is the same run; a second run pays nobody: neither is an event.
    assert_eq!(run(Some("run-1")).await["id"], first["id"]);
    let empty = run(None).await;
    assert_eq!(empty["lines"], json!([]));
    award("report-2", 2.0).await;
    let second = run(None).await;
    wait_until(Duration::from_secs(20), "two payout events", || async {
        receiver.all().len() >= 2
    })
    .await;
    let first_id = first["id"].as_str().unwrap();
    let got = receiver.of(first_id);
    assert_eq!(got.len(), 1);
    assert!(verifies(&secret, &got[0], now()));
    let cloudevent: Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(cloudevent["type"], "dev.garage.payout.completed");
    assert_eq!(cloudevent["data"]["payout_id"], first_id);
    assert_eq!(cloudevent["data"]["lines"], first["lines"]);
    assert_eq!(cloudevent["data"]["total_amount"], 2.0);
    assert_eq!(cloudevent["data"]["lines"][0]["operator"], "op-paid");
    let second_id = second["id"].as_str().unwrap();
    let got = receiver.of(second_id);
    assert_eq!(got.len(), 1);
    let cloudevent: Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(cloudevent["data"]["total_amount"], 1.0);
    assert_eq!(receiver.all().len(), 2);
    assert!(receiver.of(empty["id"].as_str().unwrap()).is_empty());
    wait_until(
        Duration::from_secs(10),
        "both recorded delivered",
        || async {
            let list = deliveries(&base, &endpoint_id).await;
            list.len() == 2 && list.iter().all(|d| d["state"] == "delivered")
        },
    )
    .await;
}

/// A model whose name a spreadsheet would run as a formula.
const FORMULA_MODEL: &str = "=HYPERLINK(\"http://evil.example\",\"x\")";

#[tokio::test]
async fn the_usage_export_has_a_row_per_request_in_csv_and_cloudevents() {
    let sim = sim(garage_sim_engine::SimConfig {
        models: vec![MODEL.into(), FORMULA_MODEL.into()],
        ttft: Duration::ZERO,
        ..Default::default()
    })
    .await;
    let mut upstream = upstream("sim", sim.base_url());
    upstream.models.push(FORMULA_MODEL.into());
    let mut cfg = config(vec![upstream]);
    cfg.default_plugins = true;
    let gw = gateway(cfg).await;
    let base = gw.url();
    let (key_id, key) = create_key(&base, json!({"name": "app"})).await;
    let from = now();
    let mut ids = chats(&base, &key, 3).await;
    let mut body = chat(false);
    body["model"] = json!(FORMULA_MODEL);
    let response = client()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let formula_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    ids.push(formula_id.clone());
    for id in &ids {
        ledger_entry(&base, id).await;
    }
    let to = now() + 1;
    let export = |query: String, accept: Option<&'static str>| {
        let base = base.clone();
        async move {
            let mut request = client()
                .get(format!("{base}/admin/usage/events?{query}"))
                .bearer_auth(ADMIN);
            if let Some(accept) = accept {
                request = request.header("accept", accept);
            }
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let content_type = response
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default();
            (status, content_type, response.text().await.unwrap())
        }
    };
    let (status, content_type, csv) = export(format!("from={from}&to={to}"), None).await;
    assert_eq!(status, 200, "{csv}");
    assert!(content_type.starts_with("text/csv"), "{content_type}");
    let mut lines = csv.lines();
    assert_eq!(
        lines.next().unwrap(),
        "request_id,key_id,model,batch,prompt_tokens,completion_tokens,cached_tokens,\
         counted_by,credits,rig,operator,started_at,finished_at"
    );
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), 4, "{csv}");
    let mut exported: Vec<String> = Vec::new();
    for row in &rows {
        let id = row.split(',').next().unwrap();
        exported.push(id.to_owned());
        let entry = ledger_entry(&base, id).await;
        let event = &entry["event"];
        if id == formula_id {
            // Defused: a leading quote, and quoted for its commas and quotes.
            assert!(
                row.contains("\"'=HYPERLINK(\"\"http://evil.example\"\",\"\"x\"\")\""),
                "{row}"
            );
            continue;
        }
        let cells: Vec<&str> = row.split(',').collect();
        assert_eq!(cells[1], key_id);
        assert_eq!(cells[2], MODEL);
        assert_eq!(cells[3], "false");
        assert_eq!(cells[4], event["prompt_tokens"].to_string());
        assert_eq!(cells[5], event["completion_tokens"].to_string());
        assert_eq!(
            cells[8].parse::<f64>().unwrap(),
            entry["outcome"]["credits"].as_f64().unwrap()
        );
    }
    let mut sorted_ids = ids.clone();
    sorted_ids.sort();
    exported.sort();
    assert_eq!(exported, sorted_ids);

    // CloudEvents lines: by format, or by Accept.
    for (query, accept) in [
        (format!("from={from}&to={to}&format=jsonl"), None),
        (format!("from={from}&to={to}"), Some("application/x-ndjson")),
    ] {
        let (status, content_type, text) = export(query, accept).await;
        assert_eq!(status, 200, "{text}");
        assert_eq!(content_type, "application/x-ndjson");
        let events: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(events.len(), 4);
        let mut got: Vec<String> = events
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_owned())
            .collect();
        got.sort();
        assert_eq!(got, sorted_ids);
        assert!(
            events
                .iter()
                .all(|e| e["type"] == "dev.garage.usage.recorded")
        );
    }

    // A window before the requests: a header and nothing else.
    let (status, _, csv) = export(format!("from={}&to={from}", from - 3600), None).await;
    assert_eq!(status, 200);
    assert_eq!(csv.lines().count(), 1, "{csv}");

    // Bad windows and formats.
    for query in [
        format!("from={to}&to={from}"),
        format!("from={from}&to={from}"),
        format!("from={}&to={from}", from - 40 * 86_400),
        format!("from={from}&format=xml"),
        "to=5".to_owned(),
        "from=yesterday".to_owned(),
        format!("from={from}&extra=1"),
    ] {
        let (status, _, text) = export(query.clone(), None).await;
        assert_eq!(status, 400, "{query}: {text}");
        error_of(&text);
    }
}

#[tokio::test]
async fn two_replicas_on_one_redis_deliver_each_event_once() {
    let redis = RedisServer::start();
    let cfg = || {
        let mut cfg = quick(config(vec![]), 5);
        cfg.store = redis.url();
        cfg.auth.key_secret = Some("a key secret shared by replicas".into());
        cfg
    };
    let a = gateway(cfg()).await;
    let b = gateway(cfg()).await;
    // Every event's first attempt fails: its retry may be made by either replica.
    let receiver = Receiver::start(Behaviour::FailFirst(1)).await;
    let (endpoint_id, secret) = endpoint(&a.url(), &receiver.url, &["budget.threshold"]).await;
    wait_until(
        Duration::from_secs(10),
        "the other replica to hear of it",
        || async { b.state().webhooks().wants(EventKind::BudgetThreshold) },
    )
    .await;
    // Each event noticed by both replicas.
    let ids: Vec<String> = (0..10)
        .map(|i| format!("budget:key:k{i}:day:0:50"))
        .collect();
    for id in &ids {
        a.state()
            .webhooks()
            .emit(event(id, EventKind::BudgetThreshold));
        b.state()
            .webhooks()
            .emit(event(id, EventKind::BudgetThreshold));
    }
    wait_until(Duration::from_secs(30), "every event delivered", || async {
        let list = deliveries(&b.url(), &endpoint_id).await;
        list.len() == 10 && list.iter().all(|d| d["state"] == "delivered")
    })
    .await;
    for id in &ids {
        let got = receiver.of(id);
        // One failed attempt and one delivery, signed alike by either replica.
        assert_eq!(got.len(), 2, "{id}: {got:?}");
        assert!(got.iter().all(|d| verifies(&secret, d, now())));
    }
    assert_eq!(receiver.all().len(), 20);
    let delivered = counter(&metrics_text(&a.url()).await, "delivered")
        + counter(&metrics_text(&b.url()).await, "delivered");
    assert_eq!(delivered, 10);
}

#[tokio::test]
async fn a_retry_pending_at_a_restart_is_made_by_the_next_replica() {
    let redis = RedisServer::start();
    let cfg = || {
        let mut cfg = quick(config(vec![]), 5);
        cfg.store = redis.url();
        cfg.auth.key_secret = Some("a key secret shared by replicas".into());
        // The retry is due well after the first replica is gone.
        cfg.webhooks.backoff_base_ms = 1_500;
        cfg.webhooks.backoff_max_ms = 1_500;
        cfg
    };
    let receiver = Receiver::start(Behaviour::FailFirst(1)).await;
    let first = gateway(cfg()).await;
    let (endpoint_id, secret) = endpoint(&first.url(), &receiver.url, &["balance.low"]).await;
    first
        .state()
        .webhooks()
        .emit_now(&[event("balance:acct_1:topup_1:10", EventKind::BalanceLow)])
        .await
        .unwrap();
    wait_until(Duration::from_secs(10), "the first attempt", || async {
        deliveries(&first.url(), &endpoint_id)
            .await
            .first()
            .map(|d| d["attempts"].clone())
            == Some(json!(1))
    })
    .await;
    assert!(first.shutdown(Duration::from_secs(5)).await);
    assert_eq!(receiver.all().len(), 1);

    let second = gateway(cfg()).await;
    wait_until(
        Duration::from_secs(20),
        "the retry by the new replica",
        || async {
            deliveries(&second.url(), &endpoint_id)
                .await
                .first()
                .map(|d| d["state"].clone())
                == Some(json!("delivered"))
        },
    )
    .await;
    let got = receiver.of("balance:acct_1:topup_1:10");
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].body, got[1].body);
    assert!(got.iter().all(|d| verifies(&secret, d, now())));
    assert_eq!(counter(&metrics_text(&second.url()).await, "delivered"), 1);
}

#[tokio::test]
async fn a_redirect_is_not_followed_and_a_huge_answer_is_cut_short() {
    let gw = gateway(quick(config(vec![]), 2)).await;
    let base = gw.url();
    let elsewhere = Receiver::start(Behaviour::FailFirst(0)).await;
    let redirecting = Receiver::start(Behaviour::Redirect(elsewhere.url.clone())).await;
    let huge = Receiver::start(Behaviour::HugeError).await;
    let (redirect_id, _) = endpoint(&base, &redirecting.url, &["budget.threshold"]).await;
    let (huge_id, _) = endpoint(&base, &huge.url, &["budget.threshold"]).await;
    gw.state()
        .webhooks()
        .emit_now(&[event("budget:key:k:day:0:100", EventKind::BudgetThreshold)])
        .await
        .unwrap();
    for id in [&redirect_id, &huge_id] {
        wait_until(Duration::from_secs(20), "the delivery to fail", || async {
            deliveries(&base, id)
                .await
                .first()
                .map(|d| d["state"].clone())
                == Some(json!("failed"))
        })
        .await;
    }
    let redirected = &deliveries(&base, &redirect_id).await[0];
    assert_eq!(redirected["last_status"], 307, "{redirected}");
    assert_eq!(redirected["attempts"], 2);
    assert_eq!(redirecting.all().len(), 2);
    assert!(elsewhere.all().is_empty(), "a redirect was followed");
    let refused = &deliveries(&base, &huge_id).await[0];
    assert_eq!(refused["last_status"], 500);
    let error = refused["last_error"].as_str().unwrap();
    assert!(error.starts_with("HTTP 500: xxxx"), "{error}");
    assert!(error.len() < 300, "{} bytes kept", error.len());
}
