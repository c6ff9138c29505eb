//! The operators' API: `/admin/operators` for the admin (create, list, revoke), and
//! `/operator/v1/...` for an operator with their token: their rigs, enrollment tokens for new
//! ones, their earnings per day and their rigs' statements. An operator sees only their own.

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderMap, StatusCode};
use garage_node_protocol::Statement;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::api::{STATEMENT_PAGE, StatementQuery};
use super::operators::{CreateOperator, CreatedOperator, OperatorInfo};
use crate::error::{ApiError, ApiPath, ApiQuery, ErrorBody, json_body};
use crate::nodes::{CreateEnrollmentToken, CreatedEnrollmentToken, NodeInfo};
use crate::state::AppState;

/// Creates an operator and their token (shown once).
#[utoipa::path(
    post, path = "/admin/operators", tag = "admin",
    request_body = CreateOperator,
    responses(
        (status = 201, body = CreatedOperator),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 409, description = "A live operator has that name", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
    ),
    security(("admin_token" = []))
)]
pub async fn create_operator(
    State(state): State<AppState>,
    body: Result<Json<CreateOperator>, JsonRejection>,
) -> Result<(StatusCode, Json<CreatedOperator>), ApiError> {
    let created = state.nodes().create_operator(json_body(body)?).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// Operators.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OperatorList {
    pub object: String,
    pub data: Vec<OperatorInfo>,
}

/// Every operator (revoked ones included).
#[utoipa::path(
    get, path = "/admin/operators", tag = "admin",
    responses((status = 200, body = OperatorList), (status = 401, body = ErrorBody)),
    security(("admin_token" = []))
)]
pub async fn list_operators(State(state): State<AppState>) -> Result<Json<OperatorList>, ApiError> {
    Ok(Json(OperatorList {
        object: "list".into(),
        data: state.nodes().list_operators().await?,
    }))
}

/// Revokes an operator's token; their rigs keep serving and earning.
#[utoipa::path(
    delete, path = "/admin/operators/{id}", tag = "admin",
    params(("id" = String, Path, description = "Operator id")),
    responses(
        (status = 200, body = OperatorInfo),
        (status = 400, description = "Malformed path", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody),
    ),
    security(("admin_token" = []))
)]
pub async fn revoke_operator(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<OperatorInfo>, ApiError> {
    Ok(Json(state.nodes().revoke_operator(&id).await?))
}

/// An operator's rigs.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OwnNodes {
    pub object: String,
    pub data: Vec<NodeInfo>,
}

/// The operator's own rigs: health, GPUs, engines, trust, hardware.
#[utoipa::path(
    get, path = "/operator/v1/nodes", tag = "operator",
    responses(
        (status = 200, body = OwnNodes),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The operator token was revoked", body = ErrorBody),
    ),
    security(("operator_token" = []))
)]
pub async fn own_nodes(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<OwnNodes>, ApiError> {
    let operator = state.nodes().operator_of(&headers).await?;
    Ok(Json(OwnNodes {
        object: "list".into(),
        data: state.nodes().rigs_of(&operator.name).await?,
    }))
}

/// `POST /operator/v1/enrollment-tokens` body.
#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OwnEnrollmentToken {
    /// Lifetime in seconds; the gateway's default when omitted.
    #[serde(default)]
    pub expires_in_secs: Option<u64>,
    /// How many rigs may enroll with it (default 1).
    #[serde(default)]
    pub max_uses: Option<u32>,
}

/// An enrollment token for a new rig of the operator's own (shown once).
#[utoipa::path(
    post, path = "/operator/v1/enrollment-tokens", tag = "operator",
    request_body = OwnEnrollmentToken,
    responses(
        (status = 201, body = CreatedEnrollmentToken),
        (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The operator token was revoked", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
    ),
    security(("operator_token" = []))
)]
pub async fn own_enrollment_token(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<OwnEnrollmentToken>, JsonRejection>,
) -> Result<(StatusCode, Json<CreatedEnrollmentToken>), ApiError> {
    let operator = state.nodes().operator_of(&headers).await?;
    let request = json_body(body)?;
    let created = state
        .nodes()
        .create_enrollment_token(CreateEnrollmentToken {
            operator: operator.name,
            expires_in_secs: request.expires_in_secs,
            max_uses: request.max_uses,
        })
        .await?;
    Ok((StatusCode::CREATED, Json(created)))
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct EarningsQuery {
    /// Days back, 1 to 366; default 30.
    pub days: Option<u64>,
}

/// One day's points.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DayPoints {
    /// `YYYY-MM-DD`, UTC.
    pub day: String,
    pub points: f64,
}

/// An operator's earnings.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Earnings {
    pub operator: String,
    /// Points now (withheld ones taken out).
    pub points: f64,
    /// Points withheld from quarantined rigs (docs/trust.md).
    pub withheld_points: f64,
    /// Points awarded per day, oldest first (before any withholding).
    pub days: Vec<DayPoints>,
}

/// The operator's points, withheld points and points per day.
#[utoipa::path(
    get, path = "/operator/v1/earnings", tag = "operator",
    params(EarningsQuery),
    responses(
        (status = 200, body = Earnings),
        (status = 400, description = "Malformed query", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The operator token was revoked", body = ErrorBody),
    ),
    security(("operator_token" = []))
)]
pub async fn own_earnings(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<EarningsQuery>,
) -> Result<Json<Earnings>, ApiError> {
    let operator = state.nodes().operator_of(&headers).await?;
    Ok(Json(
        earnings(&state, &operator.name, query.days.unwrap_or(30)).await?,
    ))
}

/// An operator's earnings over the last `days` days.
pub async fn earnings(state: &AppState, operator: &str, days: u64) -> Result<Earnings, ApiError> {
    let usage = state.usage();
    let standing = usage.operator_standing(operator).await?;
    let days = usage
        .daily_points(operator, days.clamp(1, 366))
        .await?
        .into_iter()
        .map(|(day, points)| DayPoints { day, points })
        .collect();
    Ok(Earnings {
        operator: operator.to_owned(),
        points: standing.points,
        withheld_points: standing.withheld_points,
        days,
    })
}

/// A statement of one of the operator's rigs, with its receipts.
#[utoipa::path(
    get, path = "/operator/v1/nodes/{id}/statement", tag = "operator",
    params(("id" = String, Path, description = "Node id"), StatementQuery),
    responses(
        (status = 200, body = Statement),
        (status = 400, description = "Malformed path or query", body = ErrorBody),
        (status = 401, body = ErrorBody),
        (status = 403, description = "The operator token was revoked", body = ErrorBody),
        (status = 404, description = "No rig of this operator's with that id", body = ErrorBody),
        (status = 503, description = "The store is unavailable", body = ErrorBody),
    ),
    security(("operator_token" = []))
)]
pub async fn own_statement(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<StatementQuery>,
) -> Result<Json<Statement>, ApiError> {
    let operator = state.nodes().operator_of(&headers).await?;
    let rig = state.nodes().rig_of(&operator.name, &id).await?;
    Ok(Json(
        state
            .nodes()
            .statement(
                &rig.id,
                &rig.operator,
                query.after.as_deref(),
                query.limit.unwrap_or(STATEMENT_PAGE),
            )
            .await?,
    ))
}
