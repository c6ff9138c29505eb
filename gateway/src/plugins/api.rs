//! The admin API for policy plugins: upload and activate, canaries, promotion, rollback,
//! replay and shadow.

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::{BytesRejection, JsonRejection};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ApiPath, ApiQuery, ErrorBody, from_rejection};
use crate::plugins::replay::{DEFAULT_REPLAY_LIMIT, MAX_RECORDED, ReplayReport};
use crate::plugins::{PluginError, Slot, SlotStatus, StoredVersion, VersionInfo};
use crate::state::AppState;

/// Who the registry records as having made a change. The admin token is one shared secret,
/// so there is one admin.
const ADMIN_ACTOR: &str = "admin";

impl From<PluginError> for ApiError {
    fn from(err: PluginError) -> Self {
        match err {
            PluginError::UnknownSlot(_)
            | PluginError::UnknownVersion(_)
            | PluginError::NoShadow(_) => ApiError::NotFound(err.to_string()),
            PluginError::NoActive(_) | PluginError::ReplayBusy => {
                ApiError::Conflict(err.to_string())
            }
            PluginError::TooLarge { .. } => ApiError::PayloadTooLarge(err.to_string()),
            err if err.is_client_error() => ApiError::bad_request(err.to_string(), None),
            PluginError::Store(store) => store.into(),
            err => ApiError::Internal(err.to_string()),
        }
    }
}

fn slot(name: &str) -> Result<Slot, ApiError> {
    Ok(name.parse::<Slot>()?)
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PluginSlots {
    /// Always `list`.
    pub object: String,
    pub data: Vec<SlotStatus>,
}

/// Every slot with its active version (sha256, when, by whom), canary, history and faults.
#[utoipa::path(
    get, path = "/admin/plugins", tag = "admin",
    responses((status = 200, body = PluginSlots), (status = 401, body = ErrorBody)),
    security(("admin_token" = []))
)]
pub async fn list(State(state): State<AppState>) -> Json<PluginSlots> {
    Json(PluginSlots {
        object: "list".into(),
        data: state.plugins().status(),
    })
}

/// How an upload is activated.
#[derive(Debug, Deserialize, IntoParams)]
pub struct UploadQuery {
    /// The plugin's configuration, JSON (what its `config.get` returns); `{}` when omitted.
    pub config: Option<String>,
    /// Activate as a canary taking this share of traffic (0–100) instead of replacing the
    /// active version.
    pub canary: Option<u8>,
}

/// Uploads a component (`application/wasm` body) for a slot and activates it, on every replica.
/// It is validated against the slot's world and compiled first: a bad component changes nothing.
#[utoipa::path(
    put, path = "/admin/plugins/{slot}", tag = "admin",
    params(("slot" = String, Path, description = "router, rate-limiter, meter or reward"), UploadQuery),
    request_body(content = Vec<u8>, content_type = "application/wasm", description = "The WebAssembly component"),
    responses(
        (status = 200, body = VersionInfo),
        (status = 400, description = "Not a component of this slot's world, or bad config", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, description = "Unknown slot", body = ErrorBody),
        (status = 413, body = ErrorBody),
    ),
    security(("admin_token" = []))
)]
pub async fn upload(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(query): ApiQuery<UploadQuery>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<VersionInfo>, ApiError> {
    let slot = slot(&name)?;
    let wasm = body.map_err(|r| from_rejection(r.status(), r.body_text()))?;
    let config = query.config.as_deref().unwrap_or("{}");
    let plugins = &state.plugins();
    let version = plugins.upload(slot, &wasm, config, ADMIN_ACTOR).await?;
    let info = plugins
        .activate(slot, &version.sha256, query.canary, ADMIN_ACTOR)
        .await?;
    tracing::info!(plugin = %slot, sha256 = %info.sha256, canary = ?query.canary, "plugin uploaded and activated");
    Ok(Json(info))
}

/// Stored versions of a slot, newest first.
#[utoipa::path(
    get, path = "/admin/plugins/{slot}/versions", tag = "admin",
    params(("slot" = String, Path, description = "router, rate-limiter, meter or reward")),
    responses((status = 200, body = Vec<StoredVersion>), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 400, description = "Malformed path or query", body = ErrorBody)),
    security(("admin_token" = []))
)]
pub async fn versions(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Vec<StoredVersion>>, ApiError> {
    Ok(Json(state.plugins().versions(slot(&name)?).await?))
}

/// Activates a stored version.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Activate {
    /// The version's sha256.
    pub sha256: String,
    /// As a canary with this share of traffic (0–100), instead of replacing the active one.
    #[serde(default)]
    pub canary_percent: Option<u8>,
}

/// Activates a stored version by hash, outright or as a canary.
#[utoipa::path(
    post, path = "/admin/plugins/{slot}/activate", tag = "admin",
    params(("slot" = String, Path, description = "router, rate-limiter, meter or reward")),
    request_body = Activate,
    responses((status = 200, body = VersionInfo), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 413, description = "Body too large", body = ErrorBody)),
    security(("admin_token" = []))
)]
pub async fn activate(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    body: Result<Json<Activate>, JsonRejection>,
) -> Result<Json<VersionInfo>, ApiError> {
    let slot = slot(&name)?;
    let Json(request) = body.map_err(ApiError::from)?;
    Ok(Json(
        state
            .plugins()
            .activate(slot, &request.sha256, request.canary_percent, ADMIN_ACTOR)
            .await?,
    ))
}

/// Makes the canary the active version.
#[utoipa::path(
    post, path = "/admin/plugins/{slot}/promote", tag = "admin",
    params(("slot" = String, Path, description = "router, rate-limiter, meter or reward")),
    responses((status = 200, body = VersionInfo), (status = 400, description = "No canary", body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, description = "Unknown slot", body = ErrorBody)),
    security(("admin_token" = []))
)]
pub async fn promote(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<VersionInfo>, ApiError> {
    Ok(Json(
        state.plugins().promote(slot(&name)?, ADMIN_ACTOR).await?,
    ))
}

/// Goes back one version (or drops the canary).
#[utoipa::path(
    post, path = "/admin/plugins/{slot}/rollback", tag = "admin",
    params(("slot" = String, Path, description = "router, rate-limiter, meter or reward")),
    responses((status = 200, body = VersionInfo), (status = 400, description = "Nothing to roll back to", body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, description = "Unknown slot", body = ErrorBody)),
    security(("admin_token" = []))
)]
pub async fn rollback(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<VersionInfo>, ApiError> {
    Ok(Json(
        state.plugins().rollback(slot(&name)?, ADMIN_ACTOR).await?,
    ))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Deactivated {
    pub slot: Slot,
}

/// Empties a slot: the gateway's built-in fallback takes over.
#[utoipa::path(
    delete, path = "/admin/plugins/{slot}", tag = "admin",
    params(("slot" = String, Path, description = "router, rate-limiter, meter or reward")),
    responses((status = 200, body = Deactivated), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 400, description = "Malformed path or query", body = ErrorBody)),
    security(("admin_token" = []))
)]
pub async fn deactivate(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Deactivated>, ApiError> {
    let slot = slot(&name)?;
    state.plugins().deactivate(slot, ADMIN_ACTOR).await?;
    Ok(Json(Deactivated { slot }))
}

/// Which recorded calls a replay takes, and the candidate's configuration.
#[derive(Debug, Deserialize, IntoParams)]
pub struct ReplayQuery {
    /// The candidate's configuration, JSON (as on upload); `{}` when omitted.
    pub config: Option<String>,
    /// The most recent recorded calls to replay: 1 to 10000, default 1000.
    pub limit: Option<usize>,
}

/// Replays the slot's recently recorded calls through a candidate component (`application/wasm`
/// body, not stored) and through the active version, each from an empty scratch state with the
/// recorded clock, and answers what would change: first choices that move (router), requests
/// newly refused or allowed (rate limiter), charges per key (meter), awards per operator
/// (reward). Recorded on this replica, in memory; nothing recorded yet answers `replayed: 0`.
#[utoipa::path(
    post, path = "/admin/plugins/{slot}/replay", tag = "admin",
    params(("slot" = String, Path, description = "router, rate-limiter, meter or reward"), ReplayQuery),
    request_body(content = Vec<u8>, content_type = "application/wasm", description = "The candidate WebAssembly component"),
    responses(
        (status = 200, body = ReplayReport),
        (status = 400, description = "Not a component of this slot's world, it fails to load or refuses its config, or a bad limit", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, description = "Unknown slot", body = ErrorBody),
        (status = 409, description = "The slot has no active version, or another replay is running", body = ErrorBody),
        (status = 413, body = ErrorBody),
    ),
    security(("admin_token" = []))
)]
pub async fn replay(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(query): ApiQuery<ReplayQuery>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ReplayReport>, ApiError> {
    let slot = slot(&name)?;
    let limit = query.limit.unwrap_or(DEFAULT_REPLAY_LIMIT);
    if !(1..=MAX_RECORDED).contains(&limit) {
        return Err(ApiError::bad_request(
            format!("limit must be within 1..={MAX_RECORDED}, got {limit}"),
            Some("limit"),
        ));
    }
    let wasm = body.map_err(|r| from_rejection(r.status(), r.body_text()))?;
    let config = query.config.as_deref().unwrap_or("{}");
    Ok(Json(
        state.plugins().replay(slot, &wasm, config, limit).await?,
    ))
}

/// The candidate's configuration of a shadow.
#[derive(Debug, Deserialize, IntoParams)]
pub struct ShadowQuery {
    /// The candidate's configuration, JSON (as on upload); `{}` when omitted.
    pub config: Option<String>,
    /// Percent of live calls given to the shadow, 1 to 100 (default 100): a shadow repeats the
    /// policy's work, and a share bounds what it takes from a busy machine. A rate limiter's
    /// shadow then counts only its share of the requests.
    pub share: Option<u8>,
}

/// Starts a shadow (replacing any): the candidate (`application/wasm` body, not stored) is
/// called after the active version with the same live inputs, off the request path, on its own
/// scratch state; its decisions are compared and never acted on. On this replica only.
#[utoipa::path(
    put, path = "/admin/plugins/{slot}/shadow", tag = "admin",
    params(("slot" = String, Path, description = "router, rate-limiter, meter or reward"), ShadowQuery),
    request_body(content = Vec<u8>, content_type = "application/wasm", description = "The candidate WebAssembly component"),
    responses(
        (status = 200, description = "The shadow runs; its (empty) diff", body = ReplayReport),
        (status = 400, description = "Not a component of this slot's world, it fails to load or refuses its config, or a bad share", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, description = "Unknown slot", body = ErrorBody),
        (status = 413, body = ErrorBody),
    ),
    security(("admin_token" = []))
)]
pub async fn start_shadow(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(query): ApiQuery<ShadowQuery>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ReplayReport>, ApiError> {
    let slot = slot(&name)?;
    let share = query.share.unwrap_or(100);
    if !(1..=100).contains(&share) {
        return Err(ApiError::bad_request(
            format!("share must be within 1..=100 percent, got {share}"),
            Some("share"),
        ));
    }
    let wasm = body.map_err(|r| from_rejection(r.status(), r.body_text()))?;
    let config = query.config.as_deref().unwrap_or("{}");
    Ok(Json(
        state
            .plugins()
            .start_shadow(slot, &wasm, config, share)
            .await?,
    ))
}

/// The shadow's diff over the live calls since it started.
#[utoipa::path(
    get, path = "/admin/plugins/{slot}/shadow", tag = "admin",
    params(("slot" = String, Path, description = "router, rate-limiter, meter or reward")),
    responses(
        (status = 200, body = ReplayReport),
        (status = 400, description = "Malformed path", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, description = "Unknown slot, or no shadow runs", body = ErrorBody),
    ),
    security(("admin_token" = []))
)]
pub async fn shadow(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<ReplayReport>, ApiError> {
    Ok(Json(state.plugins().shadow_report(slot(&name)?)?))
}

/// Stops the shadow; its final diff.
#[utoipa::path(
    delete, path = "/admin/plugins/{slot}/shadow", tag = "admin",
    params(("slot" = String, Path, description = "router, rate-limiter, meter or reward")),
    responses(
        (status = 200, body = ReplayReport),
        (status = 400, description = "Malformed path", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, description = "Unknown slot, or no shadow runs", body = ErrorBody),
    ),
    security(("admin_token" = []))
)]
pub async fn stop_shadow(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<ReplayReport>, ApiError> {
    Ok(Json(state.plugins().stop_shadow(slot(&name)?)?))
}
