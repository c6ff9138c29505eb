//! Request ids: the gateway mints one for every request, sends it to the backend and returns it
//! in the `x-request-id` response header, and it keys the request's usage ledger entry.
//!
//! The id is always the gateway's own, as with OpenAI's API: an id the client chose cannot key
//! the ledger, where "charged once per request id" would let a client that repeats one id be
//! charged once for many requests. A client that wants its own id on the answer sends
//! `x-client-request-id`, which is echoed back and logged beside the gateway's id.
//!
//! Ids are UUIDv7: unique, and ordered by time, so the ledger's ordered maps take new entries
//! at their right edge instead of at random places.
//!
//! One hand-written layer instead of tower-http's set-id, propagate-id and trace layers: it is
//! on every request's path, and it does only what the gateway needs of those three (no response
//! classifier, no body wrapper, no id parsing).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use axum::http::{HeaderName, HeaderValue, Request, Response};
use tower::{Layer, Service};
use tracing::Instrument;
use tracing::instrument::Instrumented;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_CLIENT_REQUEST_ID: HeaderName = HeaderName::from_static("x-client-request-id");

/// A new request id: a hyphenated lowercase UUIDv7.
pub fn mint() -> HeaderValue {
    let mut buf = uuid::Uuid::encode_buffer();
    let id = uuid::Uuid::now_v7().hyphenated().encode_lower(&mut buf);
    HeaderValue::from_str(id).unwrap_or_else(|_| unreachable!("a UUID is a valid header value"))
}

/// Gives every request a fresh `x-request-id` (replacing any the client sent), runs it inside
/// a `request` span, and puts the id (and the client's `x-client-request-id`) on the response.
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestIdLayer;

impl<S> Layer<S> for RequestIdLayer {
    type Service = RequestId<S>;

    fn layer(&self, inner: S) -> RequestId<S> {
        RequestId { inner }
    }
}

#[derive(Clone, Debug)]
pub struct RequestId<S> {
    inner: S,
}

impl<S, B, R> Service<Request<B>> for RequestId<S>
where
    S: Service<Request<B>, Response = Response<R>>,
{
    type Response = Response<R>;
    type Error = S::Error;
    type Future = WithRequestId<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let id = mint();
        let client_id = request.headers().get(X_CLIENT_REQUEST_ID).cloned();
        let span = tracing::info_span!(
            "request",
            method = %request.method(),
            path = %request.uri().path(),
            request_id = id.to_str().unwrap_or_default(),
            client_request_id = tracing::field::Empty,
        );
        if let Some(client_id) = client_id.as_ref().and_then(|v| v.to_str().ok()) {
            span.record("client_request_id", client_id);
        }
        request.headers_mut().insert(X_REQUEST_ID, id.clone());
        let started = tracing::enabled!(tracing::Level::DEBUG).then(Instant::now);
        WithRequestId {
            inner: self.inner.call(request).instrument(span),
            id: Some(id),
            client_id,
            started,
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner service's future; puts the ids on its response.
    pub struct WithRequestId<F> {
        #[pin]
        inner: Instrumented<F>,
        id: Option<HeaderValue>,
        client_id: Option<HeaderValue>,
        started: Option<Instant>,
    }
}

impl<F, R, E> Future for WithRequestId<F>
where
    F: Future<Output = Result<Response<R>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = ready!(this.inner.poll(cx))?;
        let headers = response.headers_mut();
        if let Some(id) = this.id.take() {
            headers.insert(X_REQUEST_ID, id);
        }
        if let Some(client_id) = this.client_id.take() {
            headers.insert(X_CLIENT_REQUEST_ID, client_id);
        }
        if let Some(started) = this.started {
            tracing::debug!(
                status = response.status().as_u16(),
                latency_us = started.elapsed().as_micros() as u64,
                "response head sent"
            );
        }
        Poll::Ready(Ok(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_ids_are_uuids_in_time_order() {
        let ids: Vec<String> = (0..1000)
            .map(|_| mint().to_str().unwrap().to_owned())
            .collect();
        for id in &ids {
            let parsed = uuid::Uuid::parse_str(id).unwrap();
            assert_eq!(parsed.get_version_num(), 7, "{id}");
            assert_eq!(id, &parsed.hyphenated().to_string());
        }
        // Strictly increasing: no two alike, and the ledger's maps grow at one end.
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
    }
}
