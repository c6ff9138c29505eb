//! The admin API of webhooks (`/admin/webhooks`) and of the usage export
//! (`/admin/usage/events`), behind the admin token.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::delivery::{DELIVERIES_KEPT, Delivery};
use super::endpoint::{CreateEndpoint, CreatedEndpoint, EndpointInfo};
use super::export::{Format, MAX_WINDOW_SECS};
use crate::error::{ApiError, ApiPath, ApiQuery, ErrorBody};
use crate::state::AppState;

/// Webhook endpoints.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EndpointList {
    /// Always `list`.
    pub object: String,
    /// Oldest first.
    pub data: Vec<EndpointInfo>,
}

/// An endpoint's recent deliveries.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeliveryList {
    /// Always `list`.
    pub object: String,
    /// Newest first.
    pub data: Vec<Delivery>,
}

/// Creates a webhook endpoint. Its signing secret is in this answer only.
#[utoipa::path(
    post, path = "/admin/webhooks", tag = "admin",
    request_body = CreateEndpoint,
    responses(
        (status = 201, body = CreatedEndpoint),
        (status = 400, description = "A URL that is not http(s), an unknown event type, no event type", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
    ),
    security(("admin_token" = []))
)]
pub async fn create_endpoint(
    State(state): State<AppState>,
    body: Result<Json<CreateEndpoint>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<CreatedEndpoint>), ApiError> {
    let request = crate::error::json_body(body)?;
    let (record, secret) = state.webhooks().create_endpoint(request).await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedEndpoint {
            secret,
            info: (&record).into(),
        }),
    ))
}

/// Every webhook endpoint (never their secrets).
#[utoipa::path(
    get, path = "/admin/webhooks", tag = "admin",
    responses((status = 200, body = EndpointList), (status = 401, body = ErrorBody)),
    security(("admin_token" = []))
)]
pub async fn list_endpoints(State(state): State<AppState>) -> Result<Json<EndpointList>, ApiError> {
    state.webhooks().reload().await?;
    Ok(Json(EndpointList {
        object: "list".into(),
        data: state
            .webhooks()
            .endpoints()
            .iter()
            .map(|e| EndpointInfo::from(e.as_ref()))
            .collect(),
    }))
}

/// Deletes a webhook endpoint and its deliveries; what was queued for it is not sent.
#[utoipa::path(
    delete, path = "/admin/webhooks/{id}", tag = "admin",
    params(("id" = String, Path, description = "Endpoint id")),
    responses(
        (status = 200, body = EndpointInfo),
        (status = 400, description = "Malformed path", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ),
    security(("admin_token" = []))
)]
pub async fn delete_endpoint(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<EndpointInfo>, ApiError> {
    let record = state
        .webhooks()
        .delete_endpoint(&id)
        .await?
        .ok_or_else(|| not_found(&id))?;
    Ok(Json((&record).into()))
}

fn not_found(id: &str) -> ApiError {
    let shown: String = id.chars().take(64).collect();
    ApiError::NotFound(format!("No webhook endpoint with id `{shown}`."))
}

/// How many deliveries to list.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct DeliveriesQuery {
    /// At most this many, newest first (default 100, at most 1000).
    pub limit: Option<usize>,
}

/// An endpoint's recent deliveries: each event's attempts, last status or error, next attempt,
/// and whether it was delivered or failed.
#[utoipa::path(
    get, path = "/admin/webhooks/{id}/deliveries", tag = "admin",
    params(("id" = String, Path, description = "Endpoint id"), DeliveriesQuery),
    responses(
        (status = 200, body = DeliveryList),
        (status = 400, description = "Malformed path or query", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ),
    security(("admin_token" = []))
)]
pub async fn list_deliveries(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<DeliveriesQuery>,
) -> Result<Json<DeliveryList>, ApiError> {
    let limit = query.limit.unwrap_or(100);
    if limit == 0 || limit > DELIVERIES_KEPT {
        return Err(ApiError::bad_request(
            format!("limit must be from 1 to {DELIVERIES_KEPT}."),
            Some("limit"),
        ));
    }
    if state.webhooks().endpoint(&id).await?.is_none() {
        return Err(not_found(&id));
    }
    Ok(Json(DeliveryList {
        object: "list".into(),
        data: state.webhooks().deliveries(&id, limit).await?,
    }))
}

/// The window and format of a usage export.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ExportQuery {
    /// Requests that ended at or after this time, Unix seconds.
    pub from: u64,
    /// … and before this one, Unix seconds (default: now). At most 32 days after `from`.
    pub to: Option<u64>,
    /// `csv` or `jsonl` (CloudEvents, one per line); without it, the `Accept` header decides
    /// (`application/x-ndjson` or `application/jsonl` for JSON lines), else CSV.
    pub format: Option<String>,
}

/// Every request the usage ledger charged in a window, one row each: as CSV (formula cells
/// defused) or as CloudEvents JSON lines (the `usage.recorded` events), streamed.
#[utoipa::path(
    get, path = "/admin/usage/events", tag = "admin",
    params(ExportQuery),
    responses(
        (status = 200, description = "CSV (text/csv) or CloudEvents JSON lines (application/x-ndjson), ordered by the requests' ends", content_type = "text/csv"),
        (status = 400, description = "A window that is empty, reversed or over 32 days; an unknown format", body = ErrorBody),
        (status = 401, body = ErrorBody),
    ),
    security(("admin_token" = []))
)]
pub async fn export_usage(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<ExportQuery>,
) -> Result<Response, ApiError> {
    let to = query.to.unwrap_or_else(crate::keys::unix_now);
    if to <= query.from {
        return Err(ApiError::bad_request(
            "to must be after from (Unix seconds).",
            Some("to"),
        ));
    }
    if to - query.from > MAX_WINDOW_SECS {
        return Err(ApiError::bad_request(
            format!(
                "The window is {} days at most; export a long period in parts.",
                MAX_WINDOW_SECS / 86_400
            ),
            Some("to"),
        ));
    }
    let format = match query.format.as_deref() {
        Some("csv") => Format::Csv,
        Some("jsonl" | "ndjson") => Format::JsonLines,
        Some(_) => {
            return Err(ApiError::bad_request(
                "format must be csv or jsonl.",
                Some("format"),
            ));
        }
        None => {
            let accept = headers
                .get(header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if accept.contains("application/x-ndjson") || accept.contains("application/jsonl") {
                Format::JsonLines
            } else {
                Format::Csv
            }
        }
    };
    let (from_ms, to_ms) = (query.from.saturating_mul(1000), to.saturating_mul(1000));
    let filename = match format {
        Format::Csv => format!("attachment; filename=\"usage-{}-{to}.csv\"", query.from),
        Format::JsonLines => format!("attachment; filename=\"usage-{}-{to}.jsonl\"", query.from),
    };
    let body = axum::body::Body::from_stream(super::export::stream(
        state.webhooks().clone(),
        from_ms,
        to_ms,
        format,
    ));
    Ok((
        [
            (header::CONTENT_TYPE, format.content_type().to_owned()),
            (header::CONTENT_DISPOSITION, filename),
        ],
        body,
    )
        .into_response())
}
