//! The internal endpoint another replica forwards requests for our rigs to
//! (`POST /internal/rigs/{node}/v1/...`): authenticated with the cluster secret, never with an
//! API key; the rig's answer streams back as it comes.

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use http_body::{Frame, SizeHint};

use crate::backends::{INFERENCE_PATHS, InFlight};
use crate::cluster::REFUSED_HEADER;
use crate::error::{ApiError, ErrorBody};
use crate::state::AppState;

/// Passes a request another replica routed to a rig tunnelled here.
#[utoipa::path(
    post, path = "/internal/rigs/{node}/v1/{path}", tag = "cluster",
    params(
        ("node" = String, Path, description = "A rig tunnelled to this replica"),
        ("path" = String, Path, description = "An inference path: `chat/completions`, `completions`, `embeddings`, `responses`, `rerank`, `score`, `messages` or `messages/count_tokens`"),
    ),
    request_body(content = serde_json::Value, description = "The request as the forwarding replica checked it"),
    responses(
        (status = 200, description = "The rig's answer, streamed as it comes"),
        (status = 401, description = "No or a wrong cluster secret", body = ErrorBody),
        (status = 404, description = "No cluster configured here, or not an inference path", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 502, description = "The rig's tunnel failed", body = ErrorBody),
        (status = 503, description = "The rig is not in routing on this replica", body = ErrorBody),
        (status = "default", description = "The rig's own answer, whatever its status"),
    ),
    security(("cluster_secret" = []))
)]
pub async fn forwarded(
    State(state): State<AppState>,
    Path((node, path)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match forward(&state, &node, &path, &headers, body).await {
        Ok(response) => response,
        Err(err) => {
            let mut response = err.into_response();
            response
                .headers_mut()
                .insert(REFUSED_HEADER, http::HeaderValue::from_static("1"));
            response
        }
    }
}

async fn forward(
    state: &AppState,
    node: &str,
    path: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let Some(cluster) = state.nodes().cluster() else {
        return Err(ApiError::NotFound(
            "This gateway is not one of several replicas (no `cluster` configured).".into(),
        ));
    };
    if !cluster.authenticates(headers) {
        return Err(ApiError::Unauthorized(
            "This endpoint is for the gateway's own replicas (the cluster secret).".into(),
        ));
    }
    let path = format!("/{path}");
    if !INFERENCE_PATHS.contains(&path.as_str()) {
        return Err(ApiError::NotFound(format!(
            "Only the inference paths are forwarded, not `/v1{path}`."
        )));
    }
    // Out of routing here (silent, cooling down after a failure): the forwarding replica
    // tries another rig, as it would have had it known.
    let Some(backend) = state
        .nodes()
        .local_backend(node)
        .filter(|backend| backend.is_healthy())
    else {
        return Err(ApiError::Unavailable(format!(
            "The rig `{node}` is not in routing on this replica."
        )));
    };
    let in_flight = backend.track();
    // The forwarding replica's id, which keys the ledger entry and the rig's receipt; this
    // replica's own otherwise.
    let request_id = headers
        .get(crate::cluster::REQUEST_ID_HEADER)
        .or_else(|| headers.get(crate::request_id::X_REQUEST_ID));
    // The forwarding replica's dispatch span is the rig's parent: passed on as it came.
    let trace = headers
        .get(crate::telemetry::TRACEPARENT)
        .map(|traceparent| crate::telemetry::TraceHeaders {
            traceparent: traceparent.clone(),
            tracestate: headers.get(crate::telemetry::TRACESTATE).cloned(),
        });
    let response = backend
        .post(&path, body, request_id, trace.as_ref())
        .await
        .map_err(|err| ApiError::BadGateway(format!("The rig `{node}`: {err}")))?;
    let (mut parts, body) = response.into_parts();
    parts.headers.remove(REFUSED_HEADER);
    Ok(Response::from_parts(
        parts,
        Body::new(Tracked {
            body,
            _in_flight: in_flight,
        }),
    ))
}

/// A rig's answer that counts as in flight to the rig until it is read or dropped (the other
/// replica's client went away: dropping it resets the tunnel's stream, and the engine stops).
struct Tracked<B> {
    body: B,
    _in_flight: InFlight,
}

impl<B: http_body::Body + Unpin> http_body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
