//! The operator's console: overview, rigs, models, keys, plugins, usage, rewards.

use axum::Json;
use axum::Router;
use axum::extract::{Multipart, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use maud::{Markup, html};
use prometheus::core::Collector;
use serde::{Deserialize, Serialize};

use super::view::{self, Section};
use super::{AdminConsole, Console, refuse_post, respond};
use crate::error::ApiError;
use crate::ledger::payouts::csv_field;
use crate::nodes::{CreateEnrollmentToken, NodeInfo};
use crate::plugins::Slot;
use crate::state::AppState;

/// Who the admin API's plugin history names for changes made in the console.
const ACTOR: &str = "console";

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/console/live", get(live))
        .route("/console/rigs", get(rigs))
        .route("/console/rigs/enroll", post(enroll))
        .route("/console/rigs/{id}/{action}", post(rig_action))
        .route("/console/models", get(models))
        .route("/console/keys", get(keys).post(create_key))
        .route("/console/keys/{id}/revoke", post(revoke_key))
        .route("/console/plugins", get(plugins))
        .route("/console/plugins/{slot}/upload", post(upload_plugin))
        .route("/console/plugins/{slot}/{action}", post(plugin_action))
        .route("/console/usage", get(usage))
        .route("/console/usage.csv", get(usage_csv))
        .route("/console/rewards", get(rewards))
        .route("/console/batches", get(batches))
        .route("/console/payouts/{id}/csv", get(payout_csv))
        .route("/console/operators", get(operators).post(create_operator))
        .route("/console/operators/{id}/revoke", post(revoke_operator))
}

// ---- overview -------------------------------------------------------------------------------

/// The overview's numbers, cumulative since this replica started: the page's script turns
/// two readings into rates.
#[derive(Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Live {
    pub requests: u64,
    pub errors: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub in_flight: i64,
    /// Estimated from the latency histogram's buckets, milliseconds.
    pub latency_p50_ms: Option<f64>,
    pub latency_p95_ms: Option<f64>,
    pub ttft_p50_ms: Option<f64>,
    pub ttft_p95_ms: Option<f64>,
    pub rigs_routable: usize,
}

fn live_numbers(state: &AppState) -> Live {
    let metrics = state.metrics();
    let mut live = Live::default();
    for family in metrics.requests.collect() {
        for metric in family.get_metric() {
            let value = metric.get_counter().get_value() as u64;
            live.requests += value;
            let status = metric
                .get_label()
                .iter()
                .find(|l| l.name() == "status")
                .map(|l| l.value().to_owned())
                .unwrap_or_default();
            if !status.starts_with('2') {
                live.errors += value;
            }
        }
    }
    for family in metrics.tokens.collect() {
        for metric in family.get_metric() {
            let value = metric.get_counter().get_value() as u64;
            match metric.get_label().iter().find(|l| l.name() == "direction") {
                Some(l) if l.value() == "prompt" => live.prompt_tokens += value,
                Some(_) => live.completion_tokens += value,
                None => {}
            }
        }
    }
    let quantiles = |vec: &prometheus::HistogramVec| {
        // Buckets summed over every series: (upper bound, cumulative count).
        let mut buckets: Vec<(f64, u64)> = Vec::new();
        let mut total = 0;
        for family in vec.collect() {
            for metric in family.get_metric() {
                let histogram = metric.get_histogram();
                total += histogram.get_sample_count();
                for (i, bucket) in histogram.get_bucket().iter().enumerate() {
                    match buckets.get_mut(i) {
                        Some(slot) => slot.1 += bucket.cumulative_count(),
                        None => buckets.push((bucket.upper_bound(), bucket.cumulative_count())),
                    }
                }
            }
        }
        let at = |q: f64| {
            let rank = (total as f64 * q).ceil() as u64;
            (total > 0).then(|| {
                buckets
                    .iter()
                    .find(|(_, count)| *count >= rank)
                    .map_or(f64::INFINITY, |(bound, _)| bound * 1000.0)
            })
        };
        (at(0.5), at(0.95))
    };
    (live.latency_p50_ms, live.latency_p95_ms) = quantiles(&metrics.request_duration);
    (live.ttft_p50_ms, live.ttft_p95_ms) = quantiles(&metrics.time_to_first_token);
    let snapshot = state.backends().snapshot();
    live.in_flight = snapshot
        .all()
        .iter()
        .map(|b| i64::from(b.local_in_flight()))
        .sum();
    live.rigs_routable = snapshot
        .all()
        .iter()
        .filter(|b| b.rig.is_some() && b.is_healthy())
        .count();
    live
}

/// The overview's live numbers, as JSON (the page's script polls it).
/// The overview's live numbers (cumulative on this replica).
#[utoipa::path(
    get, path = "/console/live", tag = "console",
    responses(
        (status = 200, body = Live),
        (status = 303, description = "Not logged in: to the login page"),
        (status = 403, description = "Logged in as another kind of account", content_type = "text/html"),
        (status = 500, description = "Internal error", content_type = "text/html"),
        (status = 503, description = "The store is unreachable", content_type = "text/html"),
    ),
    security(("console_session" = []))
)]
pub(crate) async fn live(_session: AdminConsole, State(state): State<AppState>) -> Json<Live> {
    Json(live_numbers(&state))
}

fn ms(value: Option<f64>) -> String {
    match value {
        Some(v) if v.is_finite() => format!("{v:.0} ms"),
        Some(_) => "> 300 s".into(),
        None => "–".into(),
    }
}

pub(super) async fn overview(state: &AppState, console: &Console) -> Response {
    let live = live_numbers(state);
    let nodes = match state.nodes().list().await {
        Ok(nodes) => nodes,
        Err(err) => return respond(Err(err)),
    };
    let by_trust = |status: &str| {
        nodes
            .iter()
            .filter(|n| n.trust.status.as_str() == status)
            .count()
    };
    let body = html! {
        section.cards data-live="/console/live" {
            div.card { h2 { "Requests / s" } p data-rate="requests" { "–" } small { (view::count(live.requests)) " in all" } }
            div.card { h2 { "Tokens / s" } p data-rate="tokens" { "–" } small { (view::count(live.prompt_tokens + live.completion_tokens)) " in all" } }
            div.card { h2 { "Errors / s" } p data-rate="errors" { "–" } small { (view::count(live.errors)) " in all" } }
            div.card { h2 { "Latency p50 / p95" } p { span data-field="latency_p50_ms" { (ms(live.latency_p50_ms)) } " / " span data-field="latency_p95_ms" { (ms(live.latency_p95_ms)) } } }
            div.card { h2 { "Time to first token p50 / p95" } p { span data-field="ttft_p50_ms" { (ms(live.ttft_p50_ms)) } " / " span data-field="ttft_p95_ms" { (ms(live.ttft_p95_ms)) } } }
            div.card { h2 { "In flight" } p data-field="in_flight" { (live.in_flight) } }
            div.card { h2 { "Rigs in routing" } p data-field="rigs_routable" { (live.rigs_routable) } small { (nodes.len()) " enrolled" } }
        }
        section {
            h2 { "Trust" }
            p {
                (by_trust("verified")) " verified · " (by_trust("unverified")) " unverified · "
                (by_trust("suspect")) " suspect · " (by_trust("quarantined")) " quarantined"
            }
        }
        p.note { "Rates are computed in your browser from this replica's counters, every two seconds." }
    };
    view::page(&console.session, Section::Overview, "Overview", body).into_response()
}

// ---- rigs -----------------------------------------------------------------------------------

fn gib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / f64::from(1u32 << 30))
}

pub(super) fn rig_row(console: &Console, node: &NodeInfo, actions: bool) -> Markup {
    let heartbeat = node.heartbeat.as_ref();
    html! {
        tr data-rig=(node.id) {
            td { strong.name { (node.name) } br; small.id { (node.id) } }
            td { (node.operator) }
            td {
                @for gpu in heartbeat.map(|h| h.gpus.as_slice()).unwrap_or_default() {
                    div.gpu {
                        (gpu.name) br;
                        small { (gpu.utilization_percent) " % · " (gib(gpu.memory_used_bytes)) " / "
                            (gib(gpu.memory_total_bytes)) " GiB · " (gpu.temperature_celsius) " °C" }
                    }
                }
            }
            td {
                @for engine in heartbeat.map(|h| h.engines.as_slice()).unwrap_or_default() {
                    div { (engine.name) ": " (format!("{:?}", engine.state).to_lowercase()) " · "
                        (engine.models.join(", ")) }
                }
            }
            td {
                @if node.revoked { span.bad { "removed" } }
                @else if node.drained { span.warn { "drained" } }
                @else if node.routable { span.good { "routable" } }
                @else if node.connected { span.warn { "connected, not routable" } }
                @else { span.bad { "offline" } }
                br;
                small { @match node.last_heartbeat_at { Some(at) => { "heartbeat " (view::ago(at)) }, None => { "no heartbeat" } } }
            }
            td {
                span class=(format!("trust {}", node.trust.status.as_str())) { (node.trust.status.as_str()) }
                br;
                small { (node.trust.checks_passed) " passed · " (node.trust.checks_failed) " failed" }
                @if let Some(why) = &node.trust.last_discrepancy { br; small.why { (why) } }
            }
            td {
                (format!("{:?}", node.hardware.verdict).to_lowercase())
                @if let Some(detail) = &node.hardware.detail { br; small.why { (detail) } }
            }
            td.actions {
                @if actions && !node.revoked {
                    @let actions: &[(&str, &str)] = if node.drained {
                        &[("resume", "Resume"), ("verify", "Verify now")]
                    } else {
                        &[("drain", "Drain"), ("verify", "Verify now")]
                    };
                    @for (action, label) in actions {
                        form method="post" action=(format!("/console/rigs/{}/{action}", node.id)) {
                            (view::csrf(&console.session))
                            button type="submit" { (label) }
                        }
                    }
                    @if node.trust.status.as_str() == "quarantined" {
                        form method="post" action=(format!("/console/rigs/{}/reinstate", node.id)) {
                            (view::csrf(&console.session))
                            button type="submit" { "Reinstate" }
                        }
                    }
                    form method="post" action=(format!("/console/rigs/{}/remove", node.id)) {
                        (view::csrf(&console.session))
                        label { input type="checkbox" name="confirm" value="yes" required; " sure" }
                        button.danger type="submit" { "Remove" }
                    }
                }
            }
        }
    }
}

/// Rigs: health, GPUs, engines, trust, hardware; drain, resume, verify, reinstate, remove.
#[utoipa::path(
    get, path = "/console/rigs", tag = "console",
    responses(super::Page),
    security(("console_session" = []))
)]
pub(crate) async fn rigs(
    AdminConsole(console): AdminConsole,
    State(state): State<AppState>,
) -> Response {
    respond(rigs_page(&state, &console, None).await)
}

async fn rigs_page(
    state: &AppState,
    console: &Console,
    enrolled: Option<(String, String)>,
) -> Result<Markup, ApiError> {
    let nodes = state.nodes().list().await?;
    let body = html! {
        @if let Some((operator, token)) = &enrolled {
            section.secret {
                h2 { "Enrollment token for " (operator) }
                p { "Shown once. On the rig, with node-runner installed:" }
                (view::enrollment_command(state, token))
                p { "or put it in the rig's config as " code { "enrollment_token" } "." }
            }
        }
        table.rigs {
            thead { tr { th { "Rig" } th { "Operator" } th { "GPUs" } th { "Engines" } th { "Health" } th { "Trust" } th { "Hardware" } th { "" } } }
            tbody {
                @for node in &nodes { (rig_row(console, node, true)) }
                @if nodes.is_empty() { tr { td colspan="8" { "No rig has enrolled yet." } } }
            }
        }
        section {
            h2 { "Add a rig" }
            form method="post" action="/console/rigs/enroll" {
                (view::csrf(&console.session))
                label for="operator" { "Operator (whose rewards its work earns)" }
                input id="operator" name="operator" required maxlength="128";
                button type="submit" { "Make an enrollment token" }
            }
        }
    };
    Ok(view::page(&console.session, Section::Rigs, "Rigs", body))
}

#[derive(Deserialize, utoipa::ToSchema)]
pub(crate) struct EnrollForm {
    csrf: Option<String>,
    operator: String,
}

/// Makes an enrollment token for an operator, shown once with the node-runner command.
#[utoipa::path(
    post, path = "/console/rigs/enroll", tag = "console",
    responses(super::Action),
    security(("console_session" = []))
)]
pub(crate) async fn enroll(
    AdminConsole(console): AdminConsole,
    State(state): State<AppState>,
    headers: HeaderMap,
    axum::Form(form): axum::Form<EnrollForm>,
) -> Response {
    if let Some(refused) = refuse_post(&console, &headers, form.csrf.as_deref()) {
        return refused;
    }
    let created = state
        .nodes()
        .create_enrollment_token(CreateEnrollmentToken {
            operator: form.operator,
            expires_in_secs: None,
            max_uses: None,
        })
        .await;
    match created {
        Ok(token) => {
            respond(rigs_page(&state, &console, Some((token.operator, token.token))).await)
        }
        Err(err) => respond(Err(err)),
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
pub(crate) struct ActionForm {
    csrf: Option<String>,
    confirm: Option<String>,
}

/// A rig action: drain, resume, verify, reinstate, remove (with confirm).
#[utoipa::path(
    post, path = "/console/rigs/{id}/{action}", tag = "console",
    params(("id" = String, Path, description = "Node id"), ("action" = String, Path, description = "drain, resume, verify, reinstate or remove")),
    responses(super::Action),
    security(("console_session" = []))
)]
pub(crate) async fn rig_action(
    AdminConsole(console): AdminConsole,
    State(state): State<AppState>,
    Path((id, action)): Path<(String, String)>,
    headers: HeaderMap,
    axum::Form(form): axum::Form<ActionForm>,
) -> Response {
    if let Some(refused) = refuse_post(&console, &headers, form.csrf.as_deref()) {
        return refused;
    }
    let nodes = state.nodes();
    let done = match action.as_str() {
        "drain" => nodes.set_drained(&id, true).await.map(drop),
        "resume" => nodes.set_drained(&id, false).await.map(drop),
        "verify" => nodes.spot_check(&id, &state.config().trust).await.map(drop),
        "reinstate" => nodes.reinstate(&id).await.map(drop),
        "remove" if form.confirm.as_deref() == Some("yes") => nodes.revoke(&id).await.map(drop),
        "remove" => Err(ApiError::bad_request(
            "Tick the box to confirm removing the rig.",
            Some("confirm"),
        )),
        _ => Err(ApiError::NotFound(format!("No rig action `{action}`."))),
    };
    match done {
        Ok(()) => Redirect::to("/console/rigs").into_response(),
        Err(err) => respond(Err(err)),
    }
}

// ---- models ---------------------------------------------------------------------------------

/// Models: which rigs serve each, running and queued requests.
#[utoipa::path(
    get, path = "/console/models", tag = "console",
    responses(super::Page),
    security(("console_session" = []))
)]
pub(crate) async fn models(
    AdminConsole(console): AdminConsole,
    State(state): State<AppState>,
) -> Response {
    respond(
        async {
            let nodes = state.nodes().list().await?;
            let mut by_model: std::collections::BTreeMap<String, (Vec<&NodeInfo>, f64, f64)> =
                Default::default();
            for node in &nodes {
                for engine in node.heartbeat.iter().flat_map(|h| &h.engines) {
                    for model in &engine.models {
                        let entry = by_model.entry(model.clone()).or_default();
                        if !entry.0.iter().any(|n| n.id == node.id) {
                            entry.0.push(node);
                        }
                        if let Some(stats) = engine.stats {
                            entry.1 += stats.requests_running;
                            entry.2 += stats.requests_waiting;
                        }
                    }
                }
            }
            // What each model costs now, as the meter quotes it (nothing for a meter that
            // quotes nothing).
            let mut prices = std::collections::BTreeMap::new();
            for model in by_model.keys() {
                let price = crate::inference::api::current_price(&state, model, false).await;
                prices.insert(model.as_str(), price);
            }
            let body = html! {
                table {
                    thead { tr { th { "Model" } th { "Rigs serving it" } th { "In routing" } th { "Running" } th { "Queued" } th { "Price now (credits per 1,000 prompt / completion tokens)" } } }
                    tbody {
                        @for (model, (rigs, running, waiting)) in &by_model {
                            tr {
                                td { (model) }
                                td { @for rig in rigs { span.tag { (rig.name) } " " } }
                                td { (rigs.iter().filter(|r| r.routable).count()) }
                                td { (running) }
                                td { (waiting) }
                                td {
                                    @match prices.get(model.as_str()).copied().flatten() {
                                        Some(price) => { (price.prompt_per_1k) " / " (price.completion_per_1k) }
                                        None => { "—" }
                                    }
                                }
                            }
                        }
                        @if by_model.is_empty() { tr { td colspan="6" { "No rig serves a model yet." } } }
                    }
                }
            };
            Ok(view::page(&console.session, Section::Models, "Models", body))
        }
        .await,
    )
}

// ---- keys -----------------------------------------------------------------------------------

/// API keys with their usage; create and revoke.
#[utoipa::path(
    get, path = "/console/keys", tag = "console",
    responses(super::Page),
    security(("console_session" = []))
)]
pub(crate) async fn keys(
    AdminConsole(console): AdminConsole,
    State(state): State<AppState>,
) -> Response {
    respond(keys_page(&state, &console, None).await)
}

async fn keys_page(
    state: &AppState,
    console: &Console,
    created: Option<(String, String)>,
) -> Result<Markup, ApiError> {
    let mut keys = state.store().list_keys().await?;
    keys.sort_by_key(|k| std::cmp::Reverse(k.created_at));
    let usage = state.usage().daily(None).await?;
    let spent = |id: &str| -> (u64, f64) {
        usage
            .iter()
            .filter(|u| u.key_id == id)
            .fold((0, 0.0), |(r, c), u| (r + u.requests, c + u.credits))
    };
    let body = html! {
        @if let Some((name, secret)) = &created {
            section.secret {
                h2 { "New key: " (name) }
                p { "Copy it now: it is shown once and stored only as a hash." }
                pre { code data-secret { (secret) } }
            }
        }
        table.keys {
            thead { tr { th { "Name" } th { "Key" } th { "Models" } th { "Metadata" } th { "Usage" } th { "Created" } th { "" } } }
            tbody {
                @for key in &keys {
                    @let (requests, credits) = spent(&key.id);
                    tr data-key=(key.id) {
                        td { (key.name) br; small.id { (key.id) } }
                        td { code { (key.prefix) "…" } }
                        td { @match &key.allowed_models { Some(models) => { (models.join(", ")) }, None => { "all" } } }
                        td { code { (serde_json::Value::Object(key.metadata.clone())) } }
                        td { (view::count(requests)) " requests · " (format!("{credits:.4}")) " credits" }
                        td { (view::ago(key.created_at)) }
                        td.actions {
                            @if key.revoked_at.is_some() { span.bad { "revoked" } }
                            @else {
                                form method="post" action=(format!("/console/keys/{}/revoke", key.id)) {
                                    (view::csrf(&console.session))
                                    button.danger type="submit" { "Revoke" }
                                }
                            }
                        }
                    }
                }
            }
        }
        section {
            h2 { "Create a key" }
            form method="post" action="/console/keys" {
                (view::csrf(&console.session))
                label for="name" { "Name" }
                input id="name" name="name" required maxlength="256";
                label for="allowed_models" { "Models it may use (comma-separated; empty for all)" }
                input id="allowed_models" name="allowed_models";
                label for="metadata" { "Metadata (JSON object: limits, min_trust…)" }
                textarea id="metadata" name="metadata" rows="3" { "{}" }
                button type="submit" { "Create" }
            }
        }
    };
    Ok(view::page(&console.session, Section::Keys, "Keys", body))
}

#[derive(Deserialize, utoipa::ToSchema)]
pub(crate) struct KeyForm {
    csrf: Option<String>,
    name: String,
    allowed_models: Option<String>,
    metadata: Option<String>,
}

/// Creates an API key; the page shows its secret once.
#[utoipa::path(
    post, path = "/console/keys", tag = "console",
    responses(super::Action),
    security(("console_session" = []))
)]
pub(crate) async fn create_key(
    AdminConsole(console): AdminConsole,
    State(state): State<AppState>,
    headers: HeaderMap,
    axum::Form(form): axum::Form<KeyForm>,
) -> Response {
    if let Some(refused) = refuse_post(&console, &headers, form.csrf.as_deref()) {
        return refused;
    }
    let result = async {
        let metadata = match form.metadata.as_deref().map(str::trim) {
            None | Some("") => serde_json::Map::new(),
            Some(text) => match serde_json::from_str::<serde_json::Value>(text) {
                Ok(serde_json::Value::Object(map)) => map,
                _ => {
                    return Err(ApiError::bad_request(
                        "Metadata must be a JSON object.",
                        Some("metadata"),
                    ));
                }
            },
        };
        let allowed: Vec<String> = form
            .allowed_models
            .as_deref()
            .unwrap_or_default()
            .split(',')
            .map(|m| m.trim().to_owned())
            .filter(|m| !m.is_empty())
            .collect();
        let request = crate::keys::api::CreateKeyRequest {
            name: form.name,
            allowed_models: (!allowed.is_empty()).then_some(allowed),
            metadata,
            account: None,
        };
        let (record, secret) = crate::keys::api::create(&state, request).await?;
        keys_page(&state, &console, Some((record.name, secret))).await
    }
    .await;
    respond(result)
}

/// Revokes an API key.
#[utoipa::path(
    post, path = "/console/keys/{id}/revoke", tag = "console",
    params(("id" = String, Path, description = "Id")),
    responses(super::Action),
    security(("console_session" = []))
)]
pub(crate) async fn revoke_key(
    AdminConsole(console): AdminConsole,
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    axum::Form(form): axum::Form<ActionForm>,
) -> Response {
    if let Some(refused) = refuse_post(&console, &headers, form.csrf.as_deref()) {
        return refused;
    }
    match state.auth().revoke(&id).await {
        Ok(Some(_)) => Redirect::to("/console/keys").into_response(),
        Ok(None) => respond(Err(ApiError::NotFound(format!(
            "No API key with id `{id}`."
        )))),
        Err(err) => respond(Err(err.into())),
    }
}

// ---- plugins --------------------------------------------------------------------------------

fn short(sha256: &str) -> &str {
    sha256.get(..12).unwrap_or(sha256)
}

/// Plugin slots: active version, canary, faults, history; upload, promote, roll back.
#[utoipa::path(
    get, path = "/console/plugins", tag = "console",
    responses(super::Page),
    security(("console_session" = []))
)]
pub(crate) async fn plugins(
    AdminConsole(console): AdminConsole,
    State(state): State<AppState>,
) -> Response {
    let slots = state.plugins().status();
    let body = html! {
        @for slot in &slots {
            @let name = slot.slot.as_str();
            section.slot data-slot=(name) {
                h2 { (name) }
                p {
                    "Active: "
                    @match &slot.active {
                        Some(v) => { code.sha { (short(&v.sha256)) } " · " (view::count(v.size)) " bytes · by " (v.activated_by) " " (view::ago(v.activated_at)) },
                        None => { "the built-in fallback" },
                    }
                }
                @if let Some(canary) = &slot.canary {
                    p { "Canary: " code.sha { (short(&canary.version.sha256)) } " at " (canary.percent) " %" }
                    form method="post" action=(format!("/console/plugins/{name}/promote")) {
                        (view::csrf(&console.session))
                        button type="submit" { "Promote the canary" }
                    }
                }
                p {
                    (view::count(slot.calls)) " calls · faults: " (slot.faults.trap) " traps, "
                    (slot.faults.timeout) " timeouts, " (slot.faults.memory_cap) " over memory, "
                    (slot.faults.bad_output) " bad answers, " (slot.faults.plugin_error) " errors · "
                    (slot.history.len()) " earlier versions"
                }
                @if let Some(error) = &slot.load_error { p.error { (error) } }
                @if !slot.history.is_empty() || slot.canary.is_some() {
                    form method="post" action=(format!("/console/plugins/{name}/rollback")) {
                        (view::csrf(&console.session))
                        label { input type="checkbox" name="confirm" value="yes" required; " roll " (name) " back to its previous version" }
                        button.danger type="submit" { "Roll back" }
                    }
                }
                form method="post" action=(format!("/console/plugins/{name}/upload")) enctype="multipart/form-data" {
                    (view::csrf(&console.session))
                    label { "Component (.wasm) " input type="file" name="component" accept=".wasm,application/wasm" required; }
                    label { "Config (JSON) " input name="config" value="{}"; }
                    label { "Canary % (empty: all traffic) " input name="canary" type="number" min="1" max="99"; }
                    button type="submit" { "Upload and activate" }
                }
            }
        }
    };
    view::page(&console.session, Section::Plugins, "Plugins", body).into_response()
}

fn slot_named(name: &str) -> Result<Slot, ApiError> {
    name.parse::<Slot>()
        .map_err(|_| ApiError::NotFound(format!("No plugin slot `{name}`.")))
}

/// Promotes a slot's canary, or rolls the slot back (with confirm).
#[utoipa::path(
    post, path = "/console/plugins/{slot}/{action}", tag = "console",
    params(("slot" = String, Path, description = "router, rate-limiter, meter or reward"), ("action" = String, Path, description = "promote or rollback")),
    responses(super::Action),
    security(("console_session" = []))
)]
pub(crate) async fn plugin_action(
    AdminConsole(console): AdminConsole,
    State(state): State<AppState>,
    Path((name, action)): Path<(String, String)>,
    headers: HeaderMap,
    axum::Form(form): axum::Form<ActionForm>,
) -> Response {
    if let Some(refused) = refuse_post(&console, &headers, form.csrf.as_deref()) {
        return refused;
    }
    let result = async {
        let slot = slot_named(&name)?;
        let plugins = state.plugins();
        match action.as_str() {
            "promote" => plugins.promote(slot, ACTOR).await.map(drop)?,
            "rollback" if form.confirm.as_deref() == Some("yes") => {
                plugins.rollback(slot, ACTOR).await.map(drop)?
            }
            "rollback" => {
                return Err(ApiError::bad_request(
                    "Tick the box to confirm the rollback.",
                    Some("confirm"),
                ));
            }
            _ => return Err(ApiError::NotFound(format!("No plugin action `{action}`."))),
        }
        tracing::info!(plugin = %slot, action, "plugin changed in the console");
        Ok(())
    }
    .await;
    match result {
        Ok(()) => Redirect::to("/console/plugins").into_response(),
        Err(err) => respond(Err(err)),
    }
}

/// Uploads a component (multipart: component, config, canary, csrf) and activates it.
#[utoipa::path(
    post, path = "/console/plugins/{slot}/upload", tag = "console",
    params(("slot" = String, Path, description = "router, rate-limiter, meter or reward")),
    responses(super::Action),
    security(("console_session" = []))
)]
pub(crate) async fn upload_plugin(
    AdminConsole(console): AdminConsole,
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Response {
    let result = async {
        let slot = slot_named(&name)?;
        let mut multipart =
            multipart.map_err(|r| crate::error::from_rejection(r.status(), r.body_text()))?;
        let (mut csrf, mut wasm, mut config, mut canary) = (None, None, None, None);
        while let Some(field) = multipart
            .next_field()
            .await
            .map_err(|e| ApiError::bad_request(format!("Unreadable form: {e}"), None))?
        {
            let field_name = field.name().unwrap_or_default().to_owned();
            let bytes = field
                .bytes()
                .await
                .map_err(|e| ApiError::bad_request(format!("Unreadable form: {e}"), None))?;
            let text = || String::from_utf8_lossy(&bytes).trim().to_owned();
            match field_name.as_str() {
                "csrf" => csrf = Some(text()),
                "component" => wasm = Some(bytes.clone()),
                "config" => config = Some(text()),
                "canary" => canary = Some(text()),
                _ => {}
            }
        }
        if let Some(refused) = refuse_post(&console, &headers, csrf.as_deref()) {
            return Ok(Some(refused));
        }
        let wasm = wasm.ok_or_else(|| {
            ApiError::bad_request("Choose a component (.wasm) to upload.", Some("component"))
        })?;
        let config = config
            .filter(|c| !c.is_empty())
            .unwrap_or_else(|| "{}".into());
        let canary = match canary.filter(|c| !c.is_empty()) {
            None => None,
            Some(text) => Some(text.parse::<u8>().map_err(|_| {
                ApiError::bad_request(
                    "The canary share is a whole percent, 1 to 99.",
                    Some("canary"),
                )
            })?),
        };
        let plugins = state.plugins();
        let version = plugins.upload(slot, &wasm, &config, ACTOR).await?;
        plugins
            .activate(slot, &version.sha256, canary, ACTOR)
            .await?;
        tracing::info!(plugin = %slot, sha256 = %version.sha256, "plugin uploaded in the console");
        Ok(None)
    }
    .await;
    match result {
        Ok(None) => Redirect::to("/console/plugins").into_response(),
        Ok(Some(refused)) => refused,
        Err(err) => respond(Err(err)),
    }
}

// ---- usage and rewards ----------------------------------------------------------------------

/// Usage and billing per key, model and day, with a chart.
#[utoipa::path(
    get, path = "/console/usage", tag = "console",
    responses(super::Page),
    security(("console_session" = []))
)]
pub(crate) async fn usage(
    AdminConsole(console): AdminConsole,
    State(state): State<AppState>,
) -> Response {
    respond(
        async {
            let rows = state.usage().daily(None).await?;
            Ok(view::page(
                &console.session,
                Section::Usage,
                "Usage and billing",
                usage_body(&rows, Some("/console/usage.csv")),
            ))
        }
        .await,
    )
}

/// Usage rows as a chart of credits by day and a table, with a CSV link.
pub(super) fn usage_body(rows: &[crate::ledger::DailyUsage], csv: Option<&str>) -> Markup {
    let mut by_day: std::collections::BTreeMap<&str, f64> = Default::default();
    for row in rows {
        *by_day.entry(row.day.as_str()).or_default() += row.credits;
    }
    let points: Vec<(String, f64)> = by_day
        .into_iter()
        .map(|(day, credits)| (day.to_owned(), credits))
        .collect();
    // `+ 0.0`: a sum of nothing is -0.0, which prints as `-0.0000`.
    let total: f64 = rows.iter().map(|r| r.credits).sum::<f64>() + 0.0;
    html! {
        p { (format!("{total:.4}")) " credits over " (view::count(rows.iter().map(|r| r.requests).sum())) " requests."
            @if let Some(csv) = csv { " " a href=(csv) download { "Export CSV" } } }
        @if !points.is_empty() { (view::bars(&points, "credits")) }
        table {
            thead { tr { th { "Day" } th { "Key" } th { "Model" } th { "Requests" } th { "Prompt tokens" } th { "Completion tokens" } th { "Credits" } } }
            tbody {
                @for row in rows {
                    tr {
                        td { (row.day) } td { (row.key_id) } td { (row.model) }
                        td { (view::count(row.requests)) } td { (view::count(row.prompt_tokens)) }
                        td { (view::count(row.completion_tokens)) } td { (format!("{:.6}", row.credits)) }
                    }
                }
                @if rows.is_empty() { tr { td colspan="7" { "No usage yet." } } }
            }
        }
    }
}

/// Usage per key, model and day as CSV.
#[utoipa::path(
    get, path = "/console/usage.csv", tag = "console",
    responses(
        (status = 200, description = "CSV", content_type = "text/csv"),
        (status = 303, description = "Not logged in: to the login page"),
        (status = 403, description = "Logged in as another kind of account", content_type = "text/html"),
        (status = 500, description = "Internal error", content_type = "text/html"),
        (status = 503, description = "The store is unreachable", content_type = "text/html"),
    ),
    security(("console_session" = []))
)]
pub(crate) async fn usage_csv(_session: AdminConsole, State(state): State<AppState>) -> Response {
    let rows = match state.usage().daily(None).await {
        Ok(rows) => rows,
        Err(err) => return respond(Err(err.into())),
    };
    let mut csv =
        String::from("day,key_id,model,requests,prompt_tokens,completion_tokens,credits\n");
    for row in rows {
        csv.push_str(&format!(
            "{},{},{},{},{},{},{}\n",
            csv_field(&row.day),
            csv_field(&row.key_id),
            csv_field(&row.model),
            row.requests,
            row.prompt_tokens,
            row.completion_tokens,
            row.credits
        ));
    }
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"usage.csv\"",
            ),
        ],
        csv,
    )
        .into_response()
}

/// Rewards leaderboard.
#[utoipa::path(
    get, path = "/console/rewards", tag = "console",
    responses(super::Page),
    security(("console_session" = []))
)]
pub(crate) async fn rewards(
    AdminConsole(console): AdminConsole,
    State(state): State<AppState>,
) -> Response {
    respond(
        async {
            let board = state.usage().leaderboard().await?;
            let payouts = state.usage().payouts().await?;
            let body = html! {
                p { "Points for rig operators: the reward plugin's awards, for verified work by default." }
                table {
                    thead { tr { th { "Operator" } th { "Points" } th { "Withheld" } } }
                    tbody {
                        @for row in &board {
                            tr { td { (row.operator) } td { (format!("{:.4}", row.points)) } td { (format!("{:.4}", row.withheld_points)) } }
                        }
                        @if board.is_empty() { tr { td colspan="3" { "No points awarded yet." } } }
                    }
                }
                h2 { "Payout runs" }
                p.note { "A run pays each operator's points not paid yet: " code { "POST /admin/payouts" } "." }
                table {
                    thead { tr { th { "Run" } th { "When" } th { "Operators" } th { "Total" } th { "" } } }
                    tbody {
                        @for payout in &payouts {
                            tr {
                                td { code { (payout.id) } }
                                td { (view::ago(payout.created_at)) }
                                td { (payout.lines.len()) }
                                td { (format!("{:.2}", payout.total_amount)) " " (payout.currency) }
                                td { a href=(format!("/console/payouts/{}/csv", payout.id)) download { "CSV" } }
                            }
                        }
                        @if payouts.is_empty() { tr { td colspan="5" { "No payout run yet." } } }
                    }
                }
            };
            Ok(view::page(&console.session, Section::Rewards, "Rewards", body))
        }
        .await,
    )
}

/// Every key's batches with their progress.
#[utoipa::path(
    get, path = "/console/batches", tag = "console",
    responses(super::Page),
    security(("console_session" = []))
)]
pub(crate) async fn batches(
    AdminConsole(console): AdminConsole,
    State(state): State<AppState>,
) -> Response {
    respond(
        async {
            let batches = state.batches().list_all_batches(100).await?;
            let body = html! {
                table {
                    thead { tr { th { "Batch" } th { "Key" } th { "Status" } th { "Lines" } th { "Created" } } }
                    tbody {
                        @for owned in &batches {
                            @let batch = &owned.batch;
                            tr {
                                td { code { (batch.id) } br; small { (batch.endpoint) } }
                                td { small.id { (owned.owner) } }
                                (view::batch_progress(batch))
                                td { (view::ago(batch.created_at)) }
                            }
                        }
                        @if batches.is_empty() { tr { td colspan="5" { "No batches yet." } } }
                    }
                }
            };
            Ok(view::page(&console.session, Section::Batches, "Batches", body))
        }
        .await,
    )
}

/// One payout run as CSV.
#[utoipa::path(
    get, path = "/console/payouts/{id}/csv", tag = "console",
    params(("id" = String, Path, description = "Payout id")),
    responses(
        (status = 200, description = "CSV", content_type = "text/csv"),
        (status = 303, description = "Not logged in: to the login page"),
        (status = 403, description = "Logged in as another kind of account", content_type = "text/html"),
        (status = 404, description = "No such payout", content_type = "text/html"),
        (status = 500, description = "Internal error", content_type = "text/html"),
        (status = 503, description = "The store is unreachable", content_type = "text/html"),
    ),
    security(("console_session" = []))
)]
pub(crate) async fn payout_csv(
    _session: AdminConsole,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Response {
    match state.usage().payout(&id).await {
        Ok(payout) => (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
                (
                    header::CONTENT_DISPOSITION,
                    "attachment; filename=\"payout.csv\"",
                ),
            ],
            crate::ledger::payouts::csv(&payout),
        )
            .into_response(),
        Err(err) => respond(Err(err)),
    }
}

// ---- operators ------------------------------------------------------------------------------

/// Rig owners: their operator tokens (created with the token shown once, revoked).
#[utoipa::path(
    get, path = "/console/operators", tag = "console",
    responses(super::Page),
    security(("console_session" = []))
)]
pub(crate) async fn operators(
    AdminConsole(console): AdminConsole,
    State(state): State<AppState>,
) -> Response {
    respond(operators_page(&state, &console, None).await)
}

async fn operators_page(
    state: &AppState,
    console: &Console,
    created: Option<(String, String)>,
) -> Result<Markup, ApiError> {
    let operators = state.nodes().list_operators().await?;
    let body = html! {
        @if let Some((name, token)) = &created {
            section.secret {
                h2 { "Operator token for " (name) }
                p { "Give it to them: it is shown once. They log in to the console with it, and \
                     make enrollment tokens for their own rigs." }
                pre { code data-secret { (token) } }
            }
        }
        table {
            thead { tr { th { "Operator" } th { "Id" } th { "Created" } th { "" } } }
            tbody {
                @for operator in &operators {
                    tr data-operator=(operator.id) {
                        td { (operator.name) }
                        td { small.id { (operator.id) } }
                        td { (view::ago(operator.created_at)) }
                        td.actions {
                            @if operator.revoked_at.is_some() { span.bad { "revoked" } }
                            @else {
                                form method="post" action=(format!("/console/operators/{}/revoke", operator.id)) {
                                    (view::csrf(&console.session))
                                    button.danger type="submit" { "Revoke" }
                                }
                            }
                        }
                    }
                }
                @if operators.is_empty() { tr { td colspan="4" { "No operator yet." } } }
            }
        }
        section {
            h2 { "Add an operator" }
            form method="post" action="/console/operators" {
                (view::csrf(&console.session))
                label for="operator-name" { "Name (their rigs' rewards go to it)" }
                input id="operator-name" name="name" required maxlength="128";
                button type="submit" { "Create" }
            }
        }
    };
    Ok(view::page(
        &console.session,
        Section::Operators,
        "Operators",
        body,
    ))
}

#[derive(Deserialize, utoipa::ToSchema)]
pub(crate) struct OperatorForm {
    csrf: Option<String>,
    name: String,
}

/// Creates an operator; the page shows their token once.
#[utoipa::path(
    post, path = "/console/operators", tag = "console",
    responses(
        (status = 200, description = "The page with the token", content_type = "text/html"),
        (status = 303, description = "Not logged in: to the login page"),
        (status = 400, description = "Bad name", content_type = "text/html"),
        (status = 403, description = "Another kind of account, or no valid CSRF token, or another site's request", content_type = "text/html"),
        (status = 409, description = "A live operator has that name", content_type = "text/html"),
        (status = 500, description = "Internal error", content_type = "text/html"),
        (status = 503, description = "The store is unreachable", content_type = "text/html"),
    ),
    security(("console_session" = []))
)]
pub(crate) async fn create_operator(
    AdminConsole(console): AdminConsole,
    State(state): State<AppState>,
    headers: HeaderMap,
    axum::Form(form): axum::Form<OperatorForm>,
) -> Response {
    if let Some(refused) = refuse_post(&console, &headers, form.csrf.as_deref()) {
        return refused;
    }
    let created = state
        .nodes()
        .create_operator(crate::nodes::operators::CreateOperator { name: form.name })
        .await;
    match created {
        Ok(created) => respond(
            operators_page(&state, &console, Some((created.info.name, created.token))).await,
        ),
        Err(err) => respond(Err(err)),
    }
}

/// Revokes an operator's token.
#[utoipa::path(
    post, path = "/console/operators/{id}/revoke", tag = "console",
    params(("id" = String, Path, description = "Operator id")),
    responses(
        (status = 303, description = "Done: back to the page, or not logged in: to the login page"),
        (status = 403, description = "Another kind of account, or no valid CSRF token, or another site's request", content_type = "text/html"),
        (status = 404, description = "No such operator", content_type = "text/html"),
        (status = 500, description = "Internal error", content_type = "text/html"),
        (status = 503, description = "The store is unreachable", content_type = "text/html"),
    ),
    security(("console_session" = []))
)]
pub(crate) async fn revoke_operator(
    AdminConsole(console): AdminConsole,
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    axum::Form(form): axum::Form<ActionForm>,
) -> Response {
    if let Some(refused) = refuse_post(&console, &headers, form.csrf.as_deref()) {
        return refused;
    }
    match state.nodes().revoke_operator(&id).await {
        Ok(_) => Redirect::to("/console/operators").into_response(),
        Err(err) => respond(Err(err)),
    }
}
