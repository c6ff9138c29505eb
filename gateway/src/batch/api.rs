//! HTTP endpoints of the Batch API (`/v1/files`, `/v1/batches`, as OpenAI defines them) and of
//! the rigs' side of it (`/node/v1/batch/*`). The logic is in [`crate::batch`].

use std::collections::BTreeSet;
use std::time::Duration;

use axum::Json;
use axum::extract::multipart::MultipartError;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Multipart, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use garage_node_protocol::{BatchLease, BatchLeaseRequest, BatchResults, BatchResultsAck};
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

use crate::batch::{
    AllBatches, BatchList, BatchObject, CreateBatch, FileDeleted, FileList, FileObject,
};
use crate::error::{ApiError, ApiPath, ApiQuery, ErrorBody, json_body};
use crate::http::idempotency;
use crate::state::AppState;

fn multipart_error(err: MultipartError) -> ApiError {
    if err.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge(
            "The file is larger than this gateway accepts (batch.max_file_bytes).".into(),
        )
    } else {
        ApiError::bad_request(format!("Unreadable multipart body: {err}"), None)
    }
}

/// `POST /v1/files` form (multipart/form-data).
#[derive(ToSchema)]
#[allow(
    dead_code,
    reason = "describes the multipart form for the OpenAPI spec"
)]
pub struct UploadFile {
    /// `batch`.
    purpose: String,
    /// The JSONL file of requests.
    #[schema(format = Binary, content_media_type = "application/octet-stream")]
    file: String,
}

/// Uploads a file (purpose `batch`: a JSONL of requests for the Batch API).
#[utoipa::path(
    post, path = "/v1/files", tag = "openai",
    request_body(content = UploadFile, content_type = "multipart/form-data"),
    params(("Idempotency-Key" = Option<String>, Header, description = "A retry with the same key and upload gets the first answer (`Idempotent-Replayed: true`); nothing is stored twice")),
    responses(
        (status = 200, body = FileObject),
        (status = 409, description = "A request with this Idempotency-Key is in progress", body = ErrorBody),
        (status = 400, description = "Malformed upload, or the key's files fill its quota (`file_quota_exceeded`)", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 413, body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn upload_file(
    State(state): State<AppState>,
    headers: HeaderMap,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Response, ApiError> {
    let key = state.auth().authenticate(&headers).await?;
    let mut multipart = multipart.map_err(|r| {
        ApiError::bad_request(
            format!("Expected a multipart/form-data body: {}", r.body_text()),
            None,
        )
    })?;
    // Room in the key's quotas before the upload is read: the body's declared length, or the
    // most a file may be.
    let max_file = state.config().batch.max_file_bytes as u64;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .map_or(max_file, |length| length.min(max_file));
    let quota = state.batches().reserve_upload(&key.id, declared).await?;
    let mut purpose = None;
    let mut file = None;
    while let Some(field) = multipart.next_field().await.map_err(multipart_error)? {
        match field.name() {
            Some("purpose") => purpose = Some(field.text().await.map_err(multipart_error)?),
            Some("file") => {
                let filename = field.file_name().unwrap_or("upload.jsonl").to_owned();
                file = Some((filename, field.bytes().await.map_err(multipart_error)?));
            }
            // Fields we do not model (`expires_after`...) are read and ignored.
            _ => {
                field.bytes().await.map_err(multipart_error)?;
            }
        }
    }
    let purpose = purpose
        .ok_or_else(|| ApiError::bad_request("Missing the `purpose` field.", Some("purpose")))?;
    let (filename, content) =
        file.ok_or_else(|| ApiError::bad_request("Missing the `file` field.", Some("file")))?;
    let purpose = purpose.trim();
    let fingerprint = [
        purpose.as_bytes(),
        b"\0",
        filename.as_bytes(),
        b"\0",
        &content,
    ]
    .concat();
    let (file, replayed) = idempotency::once(
        state.store().as_ref(),
        &headers,
        &key.id,
        "files",
        &fingerprint,
        state
            .batches()
            .create_file(&key.id, quota, &filename, purpose, &content),
    )
    .await?;
    Ok(idempotent(Json(file), replayed))
}

/// An answer, marked `Idempotent-Replayed: true` when it is a retry's.
fn idempotent<T: IntoResponse>(answer: T, replayed: bool) -> Response {
    let mut response = answer.into_response();
    if replayed {
        response.headers_mut().insert(
            idempotency::REPLAYED,
            axum::http::HeaderValue::from_static("true"),
        );
    }
    response
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct FileQuery {
    /// Only files of this purpose.
    pub purpose: Option<String>,
    /// A file id: list the files after it.
    pub after: Option<String>,
    /// 1 to 10,000; default 10,000.
    pub limit: Option<usize>,
}

/// The key's files, newest first.
#[utoipa::path(
    get, path = "/v1/files", tag = "openai",
    params(FileQuery),
    responses((status = 200, body = FileList), (status = 401, body = ErrorBody), (status = 400, description = "Malformed path or query", body = ErrorBody)),
    security(("api_key" = []))
)]
pub async fn list_files(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<FileQuery>,
) -> Result<Json<FileList>, ApiError> {
    let key = state.auth().authenticate(&headers).await?;
    let limit = query.limit.unwrap_or(10_000).clamp(1, 10_000);
    Ok(Json(
        state
            .batches()
            .list_files(
                &key.id,
                query.purpose.as_deref(),
                query.after.as_deref(),
                limit,
            )
            .await?,
    ))
}

/// One file.
#[utoipa::path(
    get, path = "/v1/files/{file_id}", tag = "openai",
    params(("file_id" = String, Path, description = "File id")),
    responses((status = 200, body = FileObject), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 400, description = "Malformed path or query", body = ErrorBody)),
    security(("api_key" = []))
)]
pub async fn get_file(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<FileObject>, ApiError> {
    let key = state.auth().authenticate(&headers).await?;
    Ok(Json(state.batches().file(&key.id, &id).await?))
}

/// Deletes a file.
#[utoipa::path(
    delete, path = "/v1/files/{file_id}", tag = "openai",
    params(("file_id" = String, Path, description = "File id")),
    responses((status = 200, body = FileDeleted), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 400, description = "Malformed path or query", body = ErrorBody)),
    security(("api_key" = []))
)]
pub async fn delete_file(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<FileDeleted>, ApiError> {
    let key = state.auth().authenticate(&headers).await?;
    Ok(Json(state.batches().delete_file(&key.id, &id).await?))
}

/// A file's content.
#[utoipa::path(
    get, path = "/v1/files/{file_id}/content", tag = "openai",
    params(("file_id" = String, Path, description = "File id")),
    responses(
        (status = 200, description = "The file as uploaded or written", content_type = "application/octet-stream"),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 400, description = "Malformed path or query", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn file_content(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let key = state.auth().authenticate(&headers).await?;
    let content = state.batches().file_content(&key.id, &id).await?;
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        content,
    )
        .into_response())
}

/// Creates a batch from an uploaded file. A file with bad lines gives a `failed` batch whose
/// `errors` name each line, as OpenAI does.
#[utoipa::path(
    post, path = "/v1/batches", tag = "openai",
    request_body = CreateBatch,
    params(("Idempotency-Key" = Option<String>, Header, description = "A retry with the same key and body gets the first answer (`Idempotent-Replayed: true`); no second batch")),
    responses(
        (status = 200, body = BatchObject),
        (status = 409, description = "A request with this Idempotency-Key is in progress", body = ErrorBody),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The key's account is closed or missing", body = ErrorBody),
        (status = 404, description = "No such input file", body = ErrorBody),
        (status = 429, description = "insufficient_quota: the key's account has no credits available, or a period budget is spent", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn create_batch(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<CreateBatch>, JsonRejection>,
) -> Result<Response, ApiError> {
    let key = state.auth().authenticate(&headers).await?;
    let request = json_body(body)?;
    // A key's account must be able to pay for lines when the batch is made (they are charged
    // as they complete; see `accounts::holds`).
    state.accounts().may_spend(&key).await?;
    let fingerprint = serde_json::to_vec(&request)
        .map_err(|err| ApiError::Internal(format!("cannot read the request back: {err}")))?;
    let local: BTreeSet<String> = state
        .backends()
        .snapshot()
        .all()
        .iter()
        .flat_map(|b| b.models.iter().cloned())
        .collect();
    let (batch, replayed) = idempotency::once(
        state.store().as_ref(),
        &headers,
        &key.id,
        "batches",
        &fingerprint,
        state.batches().create_batch(&key, request, local),
    )
    .await?;
    Ok(idempotent(Json(batch), replayed))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct BatchQuery {
    /// A batch id: list the batches after it.
    pub after: Option<String>,
    /// 1 to 100; default 20.
    pub limit: Option<usize>,
}

/// The key's batches, newest first.
#[utoipa::path(
    get, path = "/v1/batches", tag = "openai",
    params(BatchQuery),
    responses((status = 200, body = BatchList), (status = 401, body = ErrorBody), (status = 400, description = "Malformed path or query", body = ErrorBody)),
    security(("api_key" = []))
)]
pub async fn list_batches(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<BatchQuery>,
) -> Result<Json<BatchList>, ApiError> {
    let key = state.auth().authenticate(&headers).await?;
    let limit = query.limit.unwrap_or(20).clamp(1, 100);
    Ok(Json(
        state
            .batches()
            .list_batches(&key.id, query.after.as_deref(), limit)
            .await?,
    ))
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct AllBatchesQuery {
    /// 1 to 1,000; default 100.
    pub limit: Option<usize>,
}

/// Every key's batches, newest first, with their owners and progress.
#[utoipa::path(
    get, path = "/admin/batches", tag = "admin",
    params(AllBatchesQuery),
    responses((status = 200, body = AllBatches), (status = 401, body = ErrorBody), (status = 400, description = "Malformed query", body = ErrorBody)),
    security(("admin_token" = []))
)]
pub async fn all_batches(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<AllBatchesQuery>,
) -> Result<Json<AllBatches>, ApiError> {
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    Ok(Json(AllBatches {
        object: "list".into(),
        data: state.batches().list_all_batches(limit).await?,
    }))
}

/// One batch, with live request counts.
#[utoipa::path(
    get, path = "/v1/batches/{batch_id}", tag = "openai",
    params(("batch_id" = String, Path, description = "Batch id")),
    responses((status = 200, body = BatchObject), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 400, description = "Malformed path or query", body = ErrorBody)),
    security(("api_key" = []))
)]
pub async fn get_batch(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<BatchObject>, ApiError> {
    let key = state.auth().authenticate(&headers).await?;
    Ok(Json(state.batches().batch(&key.id, &id).await?))
}

/// Cancels a batch: lines not started are dropped, running ones finish, then it is `cancelled`
/// with the answers it has.
#[utoipa::path(
    post, path = "/v1/batches/{batch_id}/cancel", tag = "openai",
    params(("batch_id" = String, Path, description = "Batch id")),
    responses(
        (status = 200, body = BatchObject),
        (status = 400, description = "The batch already ended", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ),
    security(("api_key" = []))
)]
pub async fn cancel_batch(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<BatchObject>, ApiError> {
    let key = state.auth().authenticate(&headers).await?;
    Ok(Json(state.batches().cancel(&key.id, &id).await?))
}

/// A rig asks for batch lines of the models it serves (a long poll: held open up to `wait_ms`
/// until some are queued).
#[utoipa::path(
    post, path = "/node/v1/batch/lease", tag = "nodes",
    request_body = BatchLeaseRequest,
    responses(
        (status = 200, body = BatchLease),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The rig was removed", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
    ),
    security(("node_credential" = []))
)]
pub async fn lease(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<BatchLeaseRequest>, JsonRejection>,
) -> Result<Json<BatchLease>, ApiError> {
    let node = state.nodes().authenticate(&headers).await?;
    let request = json_body(body)?;
    Ok(Json(
        state
            .batches()
            .lease(
                &node,
                &request.models,
                request.max,
                Duration::from_millis(request.wait_ms),
                state.accounts(),
            )
            .await?,
    ))
}

/// A rig sends the answers of lines it leased.
#[utoipa::path(
    post, path = "/node/v1/batch/results", tag = "nodes",
    request_body = BatchResults,
    responses(
        (status = 200, body = BatchResultsAck),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The rig was removed", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
    ),
    security(("node_credential" = []))
)]
pub async fn results(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<BatchResults>, JsonRejection>,
) -> Result<Json<BatchResultsAck>, ApiError> {
    let node = state.nodes().authenticate(&headers).await?;
    let results = json_body(body)?.results;
    Ok(Json(state.batches().record_results(&node, results).await?))
}
