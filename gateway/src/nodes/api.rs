//! HTTP endpoints of the node protocol (`/node/v1/*`, called by `node-runner`) and the admin
//! API for rigs (`/admin/nodes`, `/admin/enrollment-tokens`).

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use garage_node_protocol::{
    EnrollRequest, EnrollResponse, Heartbeat, HeartbeatAck, ReceiptKey, Statement, TUNNEL_PROTOCOL,
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ApiPath, ApiQuery, ErrorBody, json_body};
use crate::nodes::{CreateEnrollmentToken, CreatedEnrollmentToken, NodeInfo};
use crate::state::AppState;

/// Trades an enrollment token for the rig's node id and credential (shown once).
#[utoipa::path(
    post, path = "/node/v1/enroll", tag = "nodes",
    request_body = EnrollRequest,
    responses(
        (status = 200, body = EnrollResponse),
        (status = 400, body = ErrorBody),
        (status = 401, description = "Invalid, expired or used-up token", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
    )
)]
pub async fn enroll(
    State(state): State<AppState>,
    body: Result<Json<EnrollRequest>, JsonRejection>,
) -> Result<Json<EnrollResponse>, ApiError> {
    Ok(Json(state.nodes().enroll(json_body(body)?).await?))
}

/// Opens the rig's tunnel: after `101 Switching Protocols` the connection speaks HTTP/2 with the
/// gateway as client and the rig as server.
#[utoipa::path(
    get, path = "/node/v1/connect", tag = "nodes",
    params(("upgrade" = String, Header, description = "Must be `garage-tunnel/1`")),
    responses(
        (status = 101, description = "Switching to the tunnel"),
        (status = 400, description = "Not an upgrade request", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The rig was removed", body = ErrorBody),
    ),
    security(("node_credential" = []))
)]
pub async fn connect(
    State(state): State<AppState>,
    mut request: Request,
) -> Result<Response, ApiError> {
    let record = state.nodes().authenticate(request.headers()).await?;
    let upgrade = request
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok());
    if upgrade != Some(TUNNEL_PROTOCOL) {
        return Err(ApiError::bad_request(
            format!("Expected `Upgrade: {TUNNEL_PROTOCOL}`."),
            None,
        ));
    }
    let Some(on_upgrade) = request
        .extensions_mut()
        .remove::<hyper::upgrade::OnUpgrade>()
    else {
        return Err(ApiError::bad_request(
            "This connection cannot be upgraded (HTTP/1.1 is required).",
            None,
        ));
    };
    state.nodes().spawn_tunnel(record, on_upgrade);
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, TUNNEL_PROTOCOL)
        .body(Body::empty())
        .map_err(|e| ApiError::Internal(e.to_string()))
}

/// A rig's heartbeat: its GPUs and engines. Missed heartbeats take it out of routing.
#[utoipa::path(
    post, path = "/node/v1/heartbeat", tag = "nodes",
    request_body = Heartbeat,
    responses(
        (status = 200, body = HeartbeatAck),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The rig was removed", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
    ),
    security(("node_credential" = []))
)]
pub async fn heartbeat(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<Heartbeat>, JsonRejection>,
) -> Result<Json<HeartbeatAck>, ApiError> {
    let record = state.nodes().authenticate(&headers).await?;
    let heartbeat = json_body(body)?;
    Ok(Json(state.nodes().heartbeat(&record, heartbeat).await?))
}

/// Acknowledgement of a deregistration.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Deregistered {
    pub node_id: String,
}

/// The rig is shutting down: no new requests; what is in flight finishes.
#[utoipa::path(
    post, path = "/node/v1/deregister", tag = "nodes",
    responses((status = 200, body = Deregistered), (status = 401, body = ErrorBody)),
    security(("node_credential" = []))
)]
pub async fn deregister(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Deregistered>, ApiError> {
    let record = state.nodes().authenticate(&headers).await?;
    state.nodes().deregister(&record.id);
    tracing::info!(node = %record.id, "rig deregistered; draining");
    Ok(Json(Deregistered { node_id: record.id }))
}

/// Registers the receipt key of a rig enrolled before receipts (see docs/trust.md). A rig's
/// first key only: the same key again is accepted, another one refused.
#[utoipa::path(
    post, path = "/node/v1/receipt-key", tag = "nodes",
    request_body = ReceiptKey,
    responses(
        (status = 200, description = "The rig's key, registered", body = ReceiptKey),
        (status = 400, description = "Not an Ed25519 public key in base64", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The rig was removed", body = ErrorBody),
        (status = 409, description = "The rig registered another key", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
    ),
    security(("node_credential" = []))
)]
pub async fn register_receipt_key(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<ReceiptKey>, JsonRejection>,
) -> Result<Json<ReceiptKey>, ApiError> {
    let record = state.nodes().authenticate(&headers).await?;
    let key = json_body(body)?;
    state
        .nodes()
        .register_receipt_key(&record, &key.public_key)
        .await?;
    Ok(Json(key))
}

/// A page of a statement.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StatementQuery {
    /// A request id of the statement: the page starts after it (at the first when omitted).
    pub after: Option<String>,
    /// 1 to 1,000; default 100.
    pub limit: Option<usize>,
}

/// Entries of a statement page when the query names no limit.
pub(crate) const STATEMENT_PAGE: usize = 100;

/// The rig's statement: every request it served, oldest first, as the gateway billed it, with
/// the receipt the rig signed and what the gateway's check of it found, and the points its
/// operator was awarded. The rig's own requests only; kept for the last 35 days.
#[utoipa::path(
    get, path = "/node/v1/statement", tag = "nodes",
    params(StatementQuery),
    responses(
        (status = 200, body = Statement),
        (status = 400, description = "Malformed query, or `after` is not a request id", body = ErrorBody),
        (status = 401, description = "Not a node credential", body = ErrorBody),
        (status = 403, description = "The rig was removed", body = ErrorBody),
        (status = 503, description = "The store is unavailable", body = ErrorBody),
    ),
    security(("node_credential" = []))
)]
pub async fn statement(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<StatementQuery>,
) -> Result<Json<Statement>, ApiError> {
    let record = state.nodes().authenticate(&headers).await?;
    Ok(Json(
        state
            .nodes()
            .statement(
                &record.id,
                &record.operator,
                query.after.as_deref(),
                query.limit.unwrap_or(STATEMENT_PAGE),
            )
            .await?,
    ))
}

/// A rig's statement, as the rig itself reads it (`GET /node/v1/statement`).
#[utoipa::path(
    get, path = "/admin/nodes/{id}/statement", tag = "admin",
    params(("id" = String, Path, description = "Node id"), StatementQuery),
    responses(
        (status = 200, body = Statement),
        (status = 400, description = "Malformed path or query, or `after` is not a request id", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 503, description = "The store is unavailable", body = ErrorBody),
    ),
    security(("admin_token" = []))
)]
pub async fn node_statement(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<StatementQuery>,
) -> Result<Json<Statement>, ApiError> {
    let info = state.nodes().get_info(&id).await?;
    Ok(Json(
        state
            .nodes()
            .statement(
                &info.id,
                &info.operator,
                query.after.as_deref(),
                query.limit.unwrap_or(STATEMENT_PAGE),
            )
            .await?,
    ))
}

/// Issues an enrollment token for an operator's rigs (shown once).
#[utoipa::path(
    post, path = "/admin/enrollment-tokens", tag = "admin",
    request_body = CreateEnrollmentToken,
    responses(
        (status = 201, body = CreatedEnrollmentToken),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
    ),
    security(("admin_token" = []))
)]
pub async fn create_enrollment_token(
    State(state): State<AppState>,
    body: Result<Json<CreateEnrollmentToken>, JsonRejection>,
) -> Result<(StatusCode, Json<CreatedEnrollmentToken>), ApiError> {
    let created = state
        .nodes()
        .create_enrollment_token(json_body(body)?)
        .await?;
    Ok((StatusCode::CREATED, Json(created)))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct NodeList {
    /// Always `list`.
    pub object: String,
    pub data: Vec<NodeInfo>,
}

/// Lists rigs with their GPUs, engines, models, health and last heartbeat.
#[utoipa::path(
    get, path = "/admin/nodes", tag = "admin",
    responses((status = 200, body = NodeList), (status = 401, body = ErrorBody)),
    security(("admin_token" = []))
)]
pub async fn list_nodes(State(state): State<AppState>) -> Result<Json<NodeList>, ApiError> {
    Ok(Json(NodeList {
        object: "list".into(),
        data: state.nodes().list().await?,
    }))
}

/// One rig.
#[utoipa::path(
    get, path = "/admin/nodes/{id}", tag = "admin",
    params(("id" = String, Path, description = "Node id")),
    responses((status = 200, body = NodeInfo), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 400, description = "Malformed path or query", body = ErrorBody)),
    security(("admin_token" = []))
)]
pub async fn get_node(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<NodeInfo>, ApiError> {
    Ok(Json(state.nodes().get_info(&id).await?))
}

/// Removes a rig: its credential is refused and its tunnel closed at once.
#[utoipa::path(
    delete, path = "/admin/nodes/{id}", tag = "admin",
    params(("id" = String, Path, description = "Node id")),
    responses((status = 200, body = NodeInfo), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 400, description = "Malformed path or query", body = ErrorBody)),
    security(("admin_token" = []))
)]
pub async fn remove_node(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<NodeInfo>, ApiError> {
    Ok(Json(state.nodes().revoke(&id).await?))
}

/// Drains a rig: out of routing (in-flight requests finish) until resumed.
#[utoipa::path(
    post, path = "/admin/nodes/{id}/drain", tag = "admin",
    params(("id" = String, Path, description = "Node id")),
    responses((status = 200, body = NodeInfo), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 400, description = "Malformed path or query", body = ErrorBody)),
    security(("admin_token" = []))
)]
pub async fn drain_node(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<NodeInfo>, ApiError> {
    Ok(Json(state.nodes().set_drained(&id, true).await?))
}

/// Puts a drained rig back in routing (with its next heartbeat).
#[utoipa::path(
    post, path = "/admin/nodes/{id}/resume", tag = "admin",
    params(("id" = String, Path, description = "Node id")),
    responses((status = 200, body = NodeInfo), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 400, description = "Malformed path or query", body = ErrorBody)),
    security(("admin_token" = []))
)]
pub async fn resume_node(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<NodeInfo>, ApiError> {
    Ok(Json(state.nodes().set_drained(&id, false).await?))
}

/// A spot check's outcome, with the rig as it stands after it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SpotCheckResult {
    /// `passed`, `failed` or `inconclusive` (no other rig to compare with, references split,
    /// or the rig did not answer).
    pub verdict: String,
    /// What the check found, unless it passed.
    pub detail: Option<String>,
    pub node: NodeInfo,
}

/// Spot-checks a rig now: a challenge compared with other rigs serving its model (see
/// docs/trust.md); the verdict counts toward its trust.
#[utoipa::path(
    post, path = "/admin/nodes/{id}/verify", tag = "admin",
    params(("id" = String, Path, description = "Node id")),
    responses(
        (status = 200, body = SpotCheckResult),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 503, description = "The rig is not in routing", body = ErrorBody),
        (status = 400, description = "Malformed path or query", body = ErrorBody),
    ),
    security(("admin_token" = []))
)]
pub async fn verify_node(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<SpotCheckResult>, ApiError> {
    state.nodes().get_info(&id).await?;
    let verdict = state.nodes().spot_check(&id, &state.config().trust).await?;
    let (verdict, detail) = match verdict {
        crate::nodes::Verdict::Passed => ("passed", None),
        crate::nodes::Verdict::Failed(why) => ("failed", Some(why)),
        crate::nodes::Verdict::Inconclusive(why) => ("inconclusive", Some(why)),
    };
    Ok(Json(SpotCheckResult {
        verdict: verdict.into(),
        detail,
        node: state.nodes().get_info(&id).await?,
    }))
}

/// Brings a rig back after quarantine: `unverified`, in routing with its next heartbeat; its
/// check history is kept.
#[utoipa::path(
    post, path = "/admin/nodes/{id}/reinstate", tag = "admin",
    params(("id" = String, Path, description = "Node id")),
    responses((status = 200, body = NodeInfo), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 400, description = "Malformed path or query", body = ErrorBody)),
    security(("admin_token" = []))
)]
pub async fn reinstate_node(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<NodeInfo>, ApiError> {
    Ok(Json(state.nodes().reinstate(&id).await?))
}

/// Whether the operator vouches for a rig.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetReference {
    /// `true`: spot checks of the rig's model compare with it first (docs/trust.md).
    pub reference: bool,
}

/// Marks a rig the operator vouches for (say, their own): spot checks of its model are compared
/// with it first, so a new network with one honest rig can still catch a cheat.
#[utoipa::path(
    post, path = "/admin/nodes/{id}/reference", tag = "admin",
    params(("id" = String, Path, description = "Node id")),
    request_body = SetReference,
    responses(
        (status = 200, body = NodeInfo),
        (status = 400, description = "Malformed path, query or body", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
    ),
    security(("admin_token" = []))
)]
pub async fn set_reference(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    body: Result<Json<SetReference>, JsonRejection>,
) -> Result<Json<NodeInfo>, ApiError> {
    let body = json_body(body)?;
    Ok(Json(
        state.nodes().set_reference(&id, body.reference).await?,
    ))
}
