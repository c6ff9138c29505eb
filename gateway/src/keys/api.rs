//! The admin API under `/admin/`, behind the admin bearer token.

use axum::Json;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{ApiError, ApiPath, ErrorBody};
use crate::keys::MIN_TRUST;
use crate::keys::{admin_token_matches, bearer};
use crate::state::AppState;
use crate::store::ApiKeyRecord;

/// Middleware: only the admin token passes. API keys and node credentials are not admin tokens.
pub async fn require_admin(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    match bearer(request.headers()) {
        Some(token) if admin_token_matches(token, state.admin_token()) => next.run(request).await,
        Some(_) => ApiError::Unauthorized("Invalid admin token.".into()).into_response(),
        None => ApiError::Unauthorized(
            "The admin API needs `Authorization: Bearer <admin token>`.".into(),
        )
        .into_response(),
    }
}

/// A new API key.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyRequest {
    /// A name for people: who or what uses the key.
    pub name: String,
    /// Models the key may call; omit for all.
    #[serde(default)]
    pub allowed_models: Option<Vec<String>>,
    /// Free-form metadata (limits and budgets are read from here by the policies).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// The account (`/admin/accounts`) whose credits the key spends; omit for a key of its own.
    #[serde(default)]
    pub account: Option<String>,
}

/// An API key as the admin API shows it: never the secret, never its hash.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct KeyInfo {
    pub id: String,
    pub name: String,
    /// The first characters of the secret.
    pub prefix: String,
    pub allowed_models: Option<Vec<String>>,
    #[schema(value_type = Object)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds, when revoked.
    pub revoked_at: Option<u64>,
    /// The account whose credits it spends, if any.
    pub account: Option<String>,
}

impl From<ApiKeyRecord> for KeyInfo {
    fn from(r: ApiKeyRecord) -> Self {
        KeyInfo {
            id: r.id,
            name: r.name,
            prefix: r.prefix,
            allowed_models: r.allowed_models,
            metadata: r.metadata,
            created_at: r.created_at,
            revoked_at: r.revoked_at,
            account: r.account,
        }
    }
}

/// A key just created: the only response that ever holds its secret.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreatedKey {
    /// The secret API key. Shown once: store it now.
    pub key: String,
    #[serde(flatten)]
    pub info: KeyInfo,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct KeyList {
    /// Always `list`.
    pub object: String,
    pub data: Vec<KeyInfo>,
}

/// Creates an API key. The secret is in this response only.
#[utoipa::path(
    post, path = "/admin/keys", tag = "admin",
    request_body = CreateKeyRequest,
    responses(
        (status = 201, body = CreatedKey),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
    ),
    security(("admin_token" = []))
)]
pub async fn create_key(
    State(state): State<AppState>,
    body: Result<Json<CreateKeyRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<CreatedKey>), ApiError> {
    let Json(request) = body.map_err(ApiError::from)?;
    let (record, secret) = create(&state, request).await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedKey {
            key: secret,
            info: record.into(),
        }),
    ))
}

/// Checks a new key's request and creates it: its record and its secret (shown once). The
/// admin API and the console both create keys here.
pub async fn create(
    state: &AppState,
    request: CreateKeyRequest,
) -> Result<(ApiKeyRecord, String), ApiError> {
    if request.name.trim().is_empty() {
        return Err(ApiError::bad_request(
            "name must not be empty",
            Some("name"),
        ));
    }
    if let Some(min_trust) = request.metadata.get(MIN_TRUST)
        && min_trust
            .as_str()
            .and_then(crate::backends::TrustStatus::parse)
            .is_none_or(|t| {
                !matches!(
                    t,
                    crate::backends::TrustStatus::Verified
                        | crate::backends::TrustStatus::Unverified
                )
            })
    {
        return Err(ApiError::bad_request(
            format!(
                "metadata.{MIN_TRUST} must be \"verified\" (only verified rigs serve this key) or \
                 \"unverified\" (any rig in routing), not {min_trust}"
            ),
            Some("metadata"),
        ));
    }
    if let Some(account) = &request.account {
        state.accounts().check_assignable(account).await?;
    }
    let (record, secret) = state
        .auth()
        .create(
            request.name,
            request.allowed_models,
            request.metadata,
            None,
            request.account,
        )
        .await?;
    tracing::info!(key_id = %record.id, name = %record.name, "api key created");
    Ok((record, secret))
}

/// Lists every API key (revoked ones included).
#[utoipa::path(
    get, path = "/admin/keys", tag = "admin",
    responses((status = 200, body = KeyList), (status = 401, body = ErrorBody)),
    security(("admin_token" = []))
)]
pub async fn list_keys(State(state): State<AppState>) -> Result<Json<KeyList>, ApiError> {
    let keys = state.store().list_keys().await?;
    Ok(Json(KeyList {
        object: "list".into(),
        data: keys.into_iter().map(KeyInfo::from).collect(),
    }))
}

/// One API key.
#[utoipa::path(
    get, path = "/admin/keys/{id}", tag = "admin",
    params(("id" = String, Path, description = "Key id")),
    responses((status = 200, body = KeyInfo), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 400, description = "Malformed path or query", body = ErrorBody)),
    security(("admin_token" = []))
)]
pub async fn get_key(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<KeyInfo>, ApiError> {
    state
        .store()
        .key_by_id(&id)
        .await?
        .map(|r| Json(r.into()))
        .ok_or_else(|| ApiError::NotFound(format!("No API key with id `{id}`.")))
}

/// Revokes an API key: every replica refuses it within a second.
#[utoipa::path(
    delete, path = "/admin/keys/{id}", tag = "admin",
    params(("id" = String, Path, description = "Key id")),
    responses((status = 200, body = KeyInfo), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 400, description = "Malformed path or query", body = ErrorBody)),
    security(("admin_token" = []))
)]
pub async fn revoke_key(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<KeyInfo>, ApiError> {
    let record = state
        .auth()
        .revoke(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("No API key with id `{id}`.")))?;
    tracing::info!(key_id = %record.id, "api key revoked");
    Ok(Json(record.into()))
}
