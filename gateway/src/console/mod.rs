//! The console: the gateway's own web pages, served at `/` and under `/console/`, for the
//! gateway's operator (the admin token) and app developers (an API key).
//!
//! Pages are HTML built on the server with [`maud`], which escapes every value it writes
//! (a rig named `<img src=x onerror=alert(1)>` is text), from the same functions the admin and
//! public APIs call, with the same checks: the console can do nothing the APIs cannot. A
//! small script of our own (`gateway/console/console.js`, served from here, no inline script)
//! refreshes the overview every two seconds and streams the playground's answers; without
//! it every page still works. Login exchanges a pasted token for a session cookie
//! ([`session`]); a strict Content-Security-Policy and the other security headers go on every
//! console response. See docs/console.md.

pub(crate) mod accounts;
pub(crate) mod admin;
pub(crate) mod app;
pub(crate) mod operator;
pub mod session;
mod view;
pub(crate) mod webhooks;

use axum::Router;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use maud::Markup;
use serde::Deserialize;

use crate::error::ApiError;
use crate::state::AppState;
use session::{Role, Session};

/// The console's stylesheet and script, built into the binary.
const CSS: &str = include_str!("../../console/console.css");
const JS: &str = include_str!("../../console/console.js");

/// Every console response's Content-Security-Policy: scripts, styles and fetches from the
/// gateway only, no inline script or style, no framing, forms posting only here.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The console's routes (HTML pages and the overview's live numbers).
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/console") }))
        .route("/console", get(home))
        .route("/console/login", get(login_page).post(login))
        .route("/console/logout", post(logout))
        .route("/console/assets/console.css", get(css))
        .route("/console/assets/console.js", get(js))
        .merge(admin::routes())
        .merge(accounts::routes())
        .merge(app::routes())
        .merge(operator::routes())
        .merge(webhooks::routes())
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(state)
}

async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // `same-origin`, not `no-referrer`: under `no-referrer` a browser sends `Origin: null` with
    // the console's own form posts, which the origin check must then refuse.
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

async fn css() -> Response {
    asset(CSS, "text/css; charset=utf-8")
}

async fn js() -> Response {
    asset(JS, "text/javascript; charset=utf-8")
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        body,
    )
        .into_response()
}

/// What a console page answers with, for the OpenAPI document (`responses(Page)`).
#[derive(utoipa::IntoResponses)]
#[allow(dead_code, reason = "describes responses for the OpenAPI document")]
pub(crate) enum Page {
    #[response(status = 200, description = "The page", content_type = "text/html")]
    Ok(String),
    #[response(status = 303, description = "Not logged in: to the login page")]
    LoggedOut,
    #[response(
        status = 403,
        description = "Logged in as another kind of account",
        content_type = "text/html"
    )]
    Forbidden(String),
    #[response(
        status = 500,
        description = "Internal error",
        content_type = "text/html"
    )]
    Internal(String),
    #[response(
        status = 503,
        description = "The store is unreachable",
        content_type = "text/html"
    )]
    StoreDown(String),
}

/// What a console form's post answers with, for the OpenAPI document (`responses(Action)`).
#[derive(utoipa::IntoResponses)]
#[allow(dead_code, reason = "describes responses for the OpenAPI document")]
pub(crate) enum Action {
    #[response(
        status = 200,
        description = "The page with the outcome",
        content_type = "text/html"
    )]
    Ok(String),
    #[response(
        status = 303,
        description = "Done: back to the page, or not logged in: to the login page"
    )]
    Done,
    #[response(status = 400, description = "Bad input", content_type = "text/html")]
    BadInput(String),
    #[response(
        status = 403,
        description = "Another kind of account, or no valid CSRF token, or another site's request",
        content_type = "text/html"
    )]
    Forbidden(String),
    #[response(
        status = 404,
        description = "No such item or action",
        content_type = "text/html"
    )]
    NotFound(String),
    #[response(
        status = 413,
        description = "Body too large",
        content_type = "text/html"
    )]
    TooLarge(String),
    #[response(
        status = 500,
        description = "Internal error",
        content_type = "text/html"
    )]
    Internal(String),
    #[response(
        status = 503,
        description = "The store is unreachable",
        content_type = "text/html"
    )]
    StoreDown(String),
}

/// A logged-in person: their session (and its id, for logging out).
pub struct Console {
    pub id: String,
    pub session: Session,
}

/// Why a console request was refused.
pub enum Refused {
    /// No live session: to the login page.
    LoggedOut,
    /// Logged in, but not as someone who may see this.
    Forbidden,
    /// The store could not be read.
    Error(ApiError),
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        match self {
            Refused::LoggedOut => Redirect::to("/console/login").into_response(),
            Refused::Forbidden => view::error_page(
                StatusCode::FORBIDDEN,
                "This page is for another kind of account. Log out and in with the right token.",
            ),
            Refused::Error(err) => view::error_page(err.status(), &err.body().error.message),
        }
    }
}

/// The session cookie's value, if the request has one.
fn cookie_value(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(cookie::Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == session::COOKIE)
        .map(|c| c.value().to_owned())
}

impl FromRequestParts<AppState> for Console {
    type Rejection = Refused;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Refused> {
        let id = cookie_value(&parts.headers).ok_or(Refused::LoggedOut)?;
        let session = session::find(state.store().as_ref(), &id)
            .await
            .map_err(|err| Refused::Error(err.into()))?
            .ok_or(Refused::LoggedOut)?;
        // A key or an operator token revoked since its login ends its sessions.
        match &session.role {
            Role::App { key_id } => {
                let key = state
                    .store()
                    .key_by_id(key_id)
                    .await
                    .map_err(|err| Refused::Error(err.into()))?;
                if key.is_none_or(|k| k.revoked_at.is_some()) {
                    return Err(Refused::LoggedOut);
                }
            }
            Role::Operator { id, .. } => {
                let live = state
                    .nodes()
                    .live_operator(id)
                    .await
                    .map_err(|err| Refused::Error(err.into()))?;
                if live.is_none() {
                    return Err(Refused::LoggedOut);
                }
            }
            Role::Admin => {}
        }
        Ok(Console { id, session })
    }
}

/// The operator's session, or a refusal.
pub struct AdminConsole(pub Console);

impl FromRequestParts<AppState> for AdminConsole {
    type Rejection = Refused;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Refused> {
        let console = Console::from_request_parts(parts, state).await?;
        match console.session.role {
            Role::Admin => Ok(AdminConsole(console)),
            _ => Err(Refused::Forbidden),
        }
    }
}

/// An app developer's session and its key id, or a refusal.
pub struct AppConsole(pub Console, pub String);

impl FromRequestParts<AppState> for AppConsole {
    type Rejection = Refused;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Refused> {
        let console = Console::from_request_parts(parts, state).await?;
        match &console.session.role {
            Role::App { key_id } => {
                let key_id = key_id.clone();
                Ok(AppConsole(console, key_id))
            }
            _ => Err(Refused::Forbidden),
        }
    }
}

/// A rig owner's session and their operator name, or a refusal.
pub struct OperatorConsole(pub Console, pub String);

impl FromRequestParts<AppState> for OperatorConsole {
    type Rejection = Refused;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Refused> {
        let console = Console::from_request_parts(parts, state).await?;
        match &console.session.role {
            Role::Operator { name, .. } => {
                let name = name.clone();
                Ok(OperatorConsole(console, name))
            }
            _ => Err(Refused::Forbidden),
        }
    }
}

/// Checks a state-changing request: its CSRF token, and that it comes from the console's own
/// origin when the browser says where it comes from. `Some` is the refusal to send.
pub fn refuse_post(console: &Console, headers: &HeaderMap, csrf: Option<&str>) -> Option<Response> {
    if !same_origin(headers) {
        return Some(view::error_page(
            StatusCode::FORBIDDEN,
            "This request came from another site.",
        ));
    }
    let presented = csrf.or_else(|| headers.get("x-csrf-token").and_then(|v| v.to_str().ok()));
    match presented {
        Some(token) if console.session.csrf_matches(token) => None,
        _ => Some(view::error_page(
            StatusCode::FORBIDDEN,
            "This form has expired or did not come from the console: reload the page and try again.",
        )),
    }
}

/// Whether the browser's `Origin` (when it sends one) is this host.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    origin
        .split_once("://")
        .is_some_and(|(_, rest)| rest.trim_end_matches('/') == host)
}

/// The console: the operator's overview, an app developer's usage, or the login page.
#[utoipa::path(
    get, path = "/console", tag = "console",
    responses(Page),
    security(("console_session" = []))
)]
pub(crate) async fn home(
    console: Result<Console, Refused>,
    State(state): State<AppState>,
) -> Response {
    match console {
        Ok(console) => match console.session.role {
            Role::Admin => admin::overview(&state, &console).await,
            Role::App { .. } => Redirect::to("/console/app").into_response(),
            Role::Operator { .. } => Redirect::to("/console/operator").into_response(),
        },
        Err(Refused::LoggedOut) => Redirect::to("/console/login").into_response(),
        Err(refused) => refused.into_response(),
    }
}

/// The login page.
#[utoipa::path(
    get, path = "/console/login", tag = "console",
    responses((status = 200, description = "The page", content_type = "text/html")),
)]
pub(crate) async fn login_page() -> Markup {
    view::login(None)
}

#[derive(Deserialize, utoipa::ToSchema)]
pub(crate) struct LoginForm {
    token: String,
}

/// A pasted token becomes a session: the admin token an operator's, an API key an app
/// developer's. Nothing about the token is kept but who it belongs to.
/// Exchanges a pasted token (the admin token or an API key) for a session cookie.
#[utoipa::path(
    post, path = "/console/login", tag = "console",
    request_body(content_type = "application/x-www-form-urlencoded", description = "`token`"),
    responses(
        (status = 303, description = "Logged in: the session cookie is set"),
        (status = 400, description = "No token", content_type = "text/html"),
        (status = 401, description = "Not the admin token or a live API key", content_type = "text/html"),
        (status = 403, description = "Another site's request", content_type = "text/html"),
        (status = 503, description = "The store is unreachable", content_type = "text/html"),
    ),
)]
pub(crate) async fn login(
    State(state): State<AppState>,
    headers: HeaderMap,
    form: Result<axum::Form<LoginForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    if !same_origin(&headers) {
        return view::error_page(
            StatusCode::FORBIDDEN,
            "This request came from another site.",
        );
    }
    let Ok(axum::Form(form)) = form else {
        return (StatusCode::BAD_REQUEST, view::login(Some("Paste a token."))).into_response();
    };
    let token = form.token.trim();
    let role = if crate::keys::admin_token_matches(token, state.admin_token()) {
        Role::Admin
    } else if token.starts_with("opr_") {
        match state.nodes().authenticate_operator(token).await {
            Ok(operator) => Role::Operator {
                id: operator.id,
                name: operator.name,
            },
            Err(_) => {
                tracing::info!("console login refused");
                return (
                    StatusCode::UNAUTHORIZED,
                    view::login(Some("That operator token is not a live one.")),
                )
                    .into_response();
            }
        }
    } else {
        match state.auth().authenticate_secret(token).await {
            Ok(key) => Role::App {
                key_id: key.id.clone(),
            },
            Err(_) => {
                tracing::info!("console login refused");
                return (
                    StatusCode::UNAUTHORIZED,
                    view::login(Some("That token is not the admin token or a live API key.")),
                )
                    .into_response();
            }
        }
    };
    let (id, _) = match session::create(state.store().as_ref(), role).await {
        Ok(created) => created,
        Err(err) => {
            let err = ApiError::from(err);
            return view::error_page(err.status(), &err.body().error.message);
        }
    };
    (
        StatusCode::SEE_OTHER,
        [
            (
                header::SET_COOKIE,
                session_cookie(&state, &id, session::SESSION_TTL),
            ),
            (header::LOCATION, "/console".to_owned()),
        ],
    )
        .into_response()
}

/// The session cookie's `Set-Cookie` value: `HttpOnly`, `SameSite=Strict`, `Secure` when the
/// gateway serves TLS; an empty value with no lifetime deletes it.
fn session_cookie(state: &AppState, value: &str, lifetime: std::time::Duration) -> String {
    cookie::Cookie::build((session::COOKIE, value))
        .http_only(true)
        .same_site(cookie::SameSite::Strict)
        .secure(state.config().tls_cert_file.is_some())
        .path("/")
        .max_age(cookie::time::Duration::seconds(lifetime.as_secs() as i64))
        .build()
        .to_string()
}

#[derive(Deserialize, utoipa::ToSchema)]
pub(crate) struct CsrfForm {
    csrf: Option<String>,
}

/// Ends the session.
#[utoipa::path(
    post, path = "/console/logout", tag = "console",
    responses(Action),
    security(("console_session" = []))
)]
pub(crate) async fn logout(
    console: Console,
    State(state): State<AppState>,
    headers: HeaderMap,
    axum::Form(form): axum::Form<CsrfForm>,
) -> Response {
    if let Some(refused) = refuse_post(&console, &headers, form.csrf.as_deref()) {
        return refused;
    }
    if let Err(err) = session::end(state.store().as_ref(), &console.id).await {
        let err = ApiError::from(err);
        return view::error_page(err.status(), &err.body().error.message);
    }
    (
        StatusCode::SEE_OTHER,
        [
            (
                header::SET_COOKIE,
                session_cookie(&state, "", std::time::Duration::ZERO),
            ),
            (header::LOCATION, "/console/login".to_owned()),
        ],
    )
        .into_response()
}

/// A page or, when an action failed, the error it met.
pub fn respond(result: Result<Markup, ApiError>) -> Response {
    match result {
        Ok(page) => page.into_response(),
        Err(err) => view::error_page(err.status(), &err.body().error.message),
    }
}
