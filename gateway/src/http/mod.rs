//! The HTTP surface: every route, its OpenAPI description, and the layers around them; how
//! connections are accepted ([`listener`]).

pub mod idempotency;
pub mod listener;

use axum::Json;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde::{Deserialize, Serialize};
use tower_http::compression::CompressionLayer;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use utoipa_swagger_ui::SwaggerUi;

use crate::accounts::api as accounts_api;
use crate::batch::api as batch_api;
use crate::error::{ApiError, ErrorShape};
use crate::inference::api as openai;
use crate::keys::api as admin;
use crate::ledger::api as usage_api;
use crate::nodes::api as node_api;
use crate::nodes::operator_api;
use crate::plugins::api as plugins_api;
use crate::request_id::RequestIdLayer;
use crate::state::AppState;
use crate::webhooks::api as webhooks_api;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Garage AI gateway",
        description = "An OpenAI-compatible inference gateway for a community GPU network.",
        license(name = "MIT")
    ),
    paths(
        openai::get_model,
        crate::cluster::api::forwarded,
        crate::console::home,
        crate::console::login_page,
        crate::console::login,
        crate::console::logout,
        crate::console::admin::live,
        crate::console::admin::rigs,
        crate::console::admin::enroll,
        crate::console::admin::rig_action,
        crate::console::admin::models,
        crate::console::admin::keys,
        crate::console::admin::create_key,
        crate::console::admin::revoke_key,
        crate::console::accounts::accounts,
        crate::console::accounts::create_account,
        crate::console::accounts::account,
        crate::console::accounts::top_up,
        crate::console::admin::plugins,
        crate::console::admin::plugin_action,
        crate::console::admin::upload_plugin,
        crate::console::admin::usage,
        crate::console::admin::usage_csv,
        crate::console::admin::rewards,
        crate::console::admin::batches,
        crate::console::admin::payout_csv,
        crate::console::admin::operators,
        crate::console::admin::create_operator,
        crate::console::admin::revoke_operator,
        crate::console::webhooks::webhooks,
        crate::console::webhooks::create_webhook,
        crate::console::webhooks::delete_webhook,
        crate::console::webhooks::deliveries,
        crate::console::app::home,
        crate::console::app::batches,
        crate::console::app::file,
        crate::console::app::playground,
        crate::console::operator::home,
        crate::console::operator::enroll,
        crate::console::operator::statement,
    ),
    modifiers(&SecuritySchemes),
    tags(
        (name = "openai", description = "OpenAI-compatible API; authenticate with an API key"),
        (name = "anthropic", description = "Anthropic's Messages API, as vLLM serves it; authenticate with an API key, as `x-api-key` or a bearer token; errors in Anthropic's shape"),
        (name = "admin", description = "The gateway operator's API; authenticate with the admin token"),
        (name = "operator", description = "Rig owners' API: their own rigs, enrollment tokens, earnings, statements; authenticate with an operator token"),
        (name = "nodes", description = "Node protocol, spoken by node-runner; authenticate with the node credential"),
        (name = "cluster", description = "Between the gateway's own replicas; authenticate with the cluster secret"),
        (name = "ops", description = "Health, readiness and metrics"),
        (name = "console", description = "The web console's pages (HTML); log in at /console/login, then the session cookie")
    )
)]
struct ApiDoc;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let bearer =
            || SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build());
        components.add_security_scheme("api_key", bearer());
        components.add_security_scheme(
            "x_api_key",
            SecurityScheme::ApiKey(utoipa::openapi::security::ApiKey::Header(
                utoipa::openapi::security::ApiKeyValue::new("x-api-key"),
            )),
        );
        components.add_security_scheme("admin_token", bearer());
        components.add_security_scheme("node_credential", bearer());
        components.add_security_scheme("operator_token", bearer());
        components.add_security_scheme(
            "console_session",
            SecurityScheme::ApiKey(utoipa::openapi::security::ApiKey::Cookie(
                utoipa::openapi::security::ApiKeyValue::new(crate::console::session::COOKIE),
            )),
        );
        components.add_security_scheme(
            "cluster_secret",
            SecurityScheme::ApiKey(utoipa::openapi::security::ApiKey::Header(
                utoipa::openapi::security::ApiKeyValue::new(crate::cluster::SECRET_HEADER.as_str()),
            )),
        );
    }
}

/// Routes and spec, built together so that a route cannot be served without being described.
///
/// A layer for every request does not go here: the inference routes are answered before the
/// router ([`InferenceFirst`], the fast path), so a `Router::layer` added to these routes would
/// run for `/v1/models` and never for a chat request. Such layers go in [`app`], around both.
pub fn routes(state: AppState) -> (axum::Router, utoipa::openapi::OpenApi) {
    let admin = OpenApiRouter::new()
        .routes(routes!(admin::create_key, admin::list_keys))
        .routes(routes!(admin::get_key, admin::revoke_key))
        .routes(routes!(
            accounts_api::create_account,
            accounts_api::list_accounts
        ))
        .routes(routes!(
            accounts_api::get_account,
            accounts_api::update_account,
            accounts_api::close_account
        ))
        .routes(routes!(
            accounts_api::credit_account,
            accounts_api::list_credits
        ))
        .routes(routes!(
            accounts_api::assign_key,
            accounts_api::unassign_key
        ))
        .routes(routes!(node_api::create_enrollment_token))
        .routes(routes!(node_api::list_nodes))
        .routes(routes!(node_api::get_node, node_api::remove_node))
        .routes(routes!(node_api::drain_node))
        .routes(routes!(node_api::resume_node))
        .routes(routes!(node_api::verify_node))
        .routes(routes!(node_api::reinstate_node))
        .routes(routes!(node_api::set_reference))
        .routes(routes!(node_api::node_statement))
        .routes(routes!(
            operator_api::create_operator,
            operator_api::list_operators
        ))
        .routes(routes!(operator_api::revoke_operator))
        .routes(routes!(batch_api::all_batches))
        .routes(routes!(usage_api::all_usage))
        .routes(routes!(usage_api::ledger_entry))
        .routes(routes!(usage_api::leaderboard))
        .routes(routes!(usage_api::run_payout, usage_api::list_payouts))
        .routes(routes!(usage_api::payout_csv))
        .routes(routes!(usage_api::payout_statement))
        .routes(routes!(
            webhooks_api::create_endpoint,
            webhooks_api::list_endpoints
        ))
        .routes(routes!(webhooks_api::delete_endpoint))
        .routes(routes!(webhooks_api::list_deliveries))
        .routes(routes!(webhooks_api::export_usage))
        .routes(routes!(plugins_api::list))
        .routes(routes!(plugins_api::versions))
        .routes(routes!(plugins_api::activate))
        .routes(routes!(plugins_api::promote))
        .routes(routes!(plugins_api::rollback))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            admin::require_admin,
        ));
    // Components are bigger than chat requests (a Python plugin is ~20 MB): their route gets the
    // plugin size limit instead of `max_body_bytes`.
    let uploads = OpenApiRouter::new()
        .routes(routes!(plugins_api::upload, plugins_api::deactivate))
        .routes(routes!(plugins_api::replay))
        .routes(routes!(
            plugins_api::start_shadow,
            plugins_api::shadow,
            plugins_api::stop_shadow
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            admin::require_admin,
        ))
        .layer(DefaultBodyLimit::max(
            state.config().plugins.max_component_bytes,
        ));
    // Batch input files are bigger than chat requests: the upload gets `batch.max_file_bytes`.
    let files = OpenApiRouter::new()
        .routes(routes!(batch_api::upload_file, batch_api::list_files))
        .layer(DefaultBodyLimit::max(state.config().batch.max_file_bytes));
    // Big text that browsers and scrapers fetch with `Accept-Encoding: gzip`: compressed when
    // asked. Not the inference routes: their answers are small, or streamed event by event.
    let docs = OpenApiRouter::new()
        .routes(routes!(metrics))
        .routes(routes!(openapi_json))
        .layer(CompressionLayer::new());
    let (router, spec) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(openai::chat_completions))
        .routes(routes!(openai::completions))
        .routes(routes!(openai::embeddings))
        .routes(routes!(openai::responses))
        .routes(routes!(openai::rerank))
        .routes(routes!(openai::score))
        .routes(routes!(openai::messages))
        .routes(routes!(openai::count_tokens))
        .routes(routes!(openai::list_models))
        // A wildcard, for a model name with a slash sent as is (vLLM serves Hugging Face ids
        // such as `meta-llama/Llama-3.1-8B-Instruct`; the SDKs send it encoded, `%2F`). OpenAPI
        // has no template for several segments: `ApiDoc` describes it as `/v1/models/{model}`.
        .route("/v1/models/{*model}", axum::routing::get(openai::get_model))
        .routes(routes!(batch_api::get_file, batch_api::delete_file))
        .routes(routes!(batch_api::file_content))
        .routes(routes!(batch_api::create_batch, batch_api::list_batches))
        .routes(routes!(batch_api::get_batch))
        .routes(routes!(batch_api::cancel_batch))
        .routes(routes!(usage_api::own_usage))
        .routes(routes!(health))
        .routes(routes!(ready))
        .routes(routes!(node_api::enroll))
        .routes(routes!(node_api::connect))
        .routes(routes!(node_api::heartbeat))
        .routes(routes!(node_api::deregister))
        .routes(routes!(node_api::register_receipt_key))
        .routes(routes!(node_api::statement))
        .routes(routes!(operator_api::own_nodes))
        .routes(routes!(operator_api::own_enrollment_token))
        .routes(routes!(operator_api::own_earnings))
        .routes(routes!(operator_api::own_statement))
        .routes(routes!(usage_api::own_payouts))
        .routes(routes!(usage_api::own_payout_statement))
        .routes(routes!(batch_api::lease))
        .routes(routes!(batch_api::results))
        .route(
            "/internal/rigs/{node}/v1/{*path}",
            axum::routing::post(crate::cluster::api::forwarded),
        )
        .merge(admin)
        .merge(uploads)
        .merge(files)
        .merge(docs)
        .with_state(state)
        .split_for_parts();
    (router, spec)
}

/// Every route, with the docs and the error fallbacks, but without the layers that every request
/// goes through (see [`app`]).
pub fn router(state: AppState) -> axum::Router {
    let (router, spec) = routes(state.clone());
    // Served by `openapi_json`, where Swagger UI reads it. Every router built from one state
    // describes the same routes, so a second build finds it written already.
    let _ = state
        .openapi()
        .get_or_init(|| match serde_json::to_vec(&spec) {
            Ok(json) => json.into(),
            Err(err) => unreachable!("the OpenAPI document serializes: {err}"),
        });
    let swagger_ui =
        SwaggerUi::new("/docs").config(utoipa_swagger_ui::Config::from("/openapi.json"));
    router
        .merge(axum::Router::from(swagger_ui).layer(CompressionLayer::new()))
        .merge(crate::console::router(state))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
}

/// The whole application: the router inside the layers every request goes through (request ids,
/// panics, the body limit).
///
/// The layers wrap the router once, instead of being added with `Router::layer`, which wraps
/// each route: that costs a boxed clone of every layer and a boxed future per layer on every
/// request (measured: about 4 µs of CPU per request, see docs/journal/benchmarks.md).
pub fn app(
    state: AppState,
) -> impl tower::Service<
    axum::extract::Request,
    Response = axum::response::Response,
    Error = std::convert::Infallible,
    Future: Send,
> + Clone
+ Send
+ Sync
+ 'static {
    let max_body = state.config().max_body_bytes;
    // The inference routes apply `max_body_bytes` themselves; everything else gets it from this
    // layer. Routes with bigger bodies (plugin and batch file uploads) set their own limit,
    // which replaces this one.
    let router = tower::Layer::layer(&DefaultBodyLimit::max(max_body), router(state.clone()));
    tower::ServiceBuilder::new()
        .layer(RequestIdLayer)
        .option_layer(cors(&state.config().cors))
        .service(InferenceFirst { router, state })
}

/// CORS for the origins the config lists (none: no layer, and nothing for a request to pay).
/// Preflight requests are answered here, ahead of every route; the request headers a page may
/// send are whatever its preflight asks for (the OpenAI SDKs add their own `x-stainless-*`
/// ones), and it may read every response header (`x-request-id`, `retry-after`, the rate
/// limit's). Credentials are never allowed: keys travel in the `Authorization` header, which a
/// browser sends only when the page's own code sets it.
fn cors(config: &crate::config::CorsConfig) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer, ExposeHeaders};
    let origins = &config.allowed_origins;
    let allow_origin = match origins.as_slice() {
        [] => return None,
        [any] if any == "*" => AllowOrigin::any(),
        // Checked when the config was loaded.
        listed => AllowOrigin::list(
            listed
                .iter()
                .filter_map(|origin| http::HeaderValue::from_str(origin).ok()),
        ),
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow_origin)
            .allow_methods([
                http::Method::GET,
                http::Method::POST,
                http::Method::PUT,
                http::Method::DELETE,
            ])
            .allow_headers(AllowHeaders::mirror_request())
            .expose_headers(ExposeHeaders::any())
            .max_age(std::time::Duration::from_secs(config.max_age_secs)),
    )
}

/// The three inference routes, taken before the router, which answers everything else (other
/// methods on their paths included: a `GET` still gets its 405). They are nearly every request
/// a gateway serves, and the router's path match, its URL-parameter extension and its boxing
/// of the handler cost about 3,300 instructions each (docs/journal/benchmarks.md). The routes stay in
/// the router too, where the OpenAPI document is built from them.
///
/// They read the request body within `max_body_bytes` themselves, which spares every inference
/// request the `DefaultBodyLimit` layer's mark in its extensions (a map allocated per request)
/// and axum's boxing of the limited body.
#[derive(Clone)]
struct InferenceFirst<R> {
    /// The router, inside the body limit layer.
    router: R,
    state: AppState,
}

impl<R> tower::Service<axum::extract::Request> for InferenceFirst<R>
where
    R: tower::Service<
            axum::extract::Request,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        >,
{
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = futures::future::Either<
        futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>,
        R::Future,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.router.poll_ready(cx)
    }

    fn call(&mut self, request: axum::extract::Request) -> Self::Future {
        use futures::FutureExt;
        match openai::InferenceRoute::of(&request) {
            Some(route) => {
                futures::future::Either::Left(route.serve(&self.state, request).map(Ok).boxed())
            }
            None => futures::future::Either::Right(self.router.call(request)),
        }
    }
}

async fn not_found(uri: http::Uri) -> axum::response::Response {
    ApiError::NotFound("Unknown route. See /docs for the API.".into())
        .into_response_as(ErrorShape::of_path(uri.path()))
}

async fn method_not_allowed(uri: http::Uri) -> axum::response::Response {
    ApiError::MethodNotAllowed("This route does not take that method. See /docs.".into())
        .into_response_as(ErrorShape::of_path(uri.path()))
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// `ok`
    pub status: String,
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/health", tag = "ops", responses((status = 200, body = Health)))]
pub async fn health() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct Readiness {
    /// `ready` or `not_ready`.
    pub status: String,
    /// Whether the state store answered.
    pub store: bool,
    /// Backends currently in rotation.
    pub healthy_backends: usize,
}

/// Readiness: the store answers and at least one backend is healthy.
#[utoipa::path(
    get, path = "/ready", tag = "ops",
    responses((status = 200, body = Readiness), (status = 503, body = Readiness))
)]
pub async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    let store = state.store().ping().await.is_ok();
    let healthy_backends = state.backends().snapshot().healthy_count();
    let is_ready = store && healthy_backends > 0;
    let status = if is_ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(Readiness {
            status: if is_ready { "ready" } else { "not_ready" }.into(),
            store,
            healthy_backends,
        }),
    )
}

/// Prometheus metrics.
#[utoipa::path(
    get, path = "/metrics", tag = "ops",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain"))
)]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    // Counted by the backends themselves (a stream until it ends), so requests pay nothing
    // more for the gauge; a rig that left is no longer summed, even while it finishes streams.
    let in_flight: u64 = (state.backends().snapshot().all().iter())
        .map(|b| u64::from(b.in_flight()))
        .sum();
    state.metrics().in_flight.set(in_flight as i64);
    observe(&state).await;
    let runtime = tokio::runtime::Handle::current().metrics();
    (state.metrics().runtime_workers).set(runtime.num_workers() as i64);
    (state.metrics().runtime_tasks).set(runtime.num_alive_tasks() as i64);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics().render(),
    )
}

/// How long a scrape waits for the store before reporting it down: well under Prometheus's
/// default scrape timeout (10 s), so the scrape itself still succeeds.
const SCRAPE_STORE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The store's reachability, each model's backends, this replica's rigs, the batch queues and
/// the usage queue, into the metrics.
async fn observe(state: &AppState) {
    let store_up = tokio::time::timeout(SCRAPE_STORE_TIMEOUT, state.store().ping())
        .await
        .is_ok_and(|r| r.is_ok());
    let (batch_backlog, usage_queued) = if store_up {
        let (backlog, queued) = tokio::join!(
            tokio::time::timeout(SCRAPE_STORE_TIMEOUT, state.batches().backlog()),
            tokio::time::timeout(SCRAPE_STORE_TIMEOUT, state.usage().queued_len()),
        );
        (
            backlog.ok().and_then(Result::ok),
            queued.ok().and_then(Result::ok).map(|n| n as u64),
        )
    } else {
        (None, None)
    };
    let snapshot = state.backends().snapshot();
    let mut models: std::collections::BTreeMap<&str, (usize, usize)> = Default::default();
    for backend in snapshot.all() {
        let healthy = usize::from(backend.is_healthy());
        for model in &backend.models {
            let entry = models.entry(model.as_str()).or_default();
            entry.0 += healthy;
            entry.1 += 1;
        }
    }
    state.metrics().observe(crate::metrics::Observation {
        store_up,
        models: (models.into_iter())
            .map(|(model, (healthy, total))| crate::metrics::ModelSample {
                model,
                healthy,
                total,
            })
            .collect(),
        rigs: state.nodes().tunnel_samples(),
        batch_backlog,
        usage_queued,
    });
}

/// This OpenAPI document.
#[utoipa::path(
    get, path = "/openapi.json", tag = "ops",
    responses((status = 200, description = "The OpenAPI 3.1 spec", content_type = "application/json"))
)]
pub async fn openapi_json(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        state.openapi().get().cloned().unwrap_or_default(),
    )
}
