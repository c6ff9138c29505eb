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
//! The same layer catches a handler that panics and answers 500 in OpenAI's shape instead of
//! dropping the connection (the rest of the process is unaffected either way).
//!
//! One hand-written layer instead of tower-http's set-id, propagate-id, trace and catch-panic
//! layers: it is on every request's path, and it does only what the gateway needs of those four
//! (no response classifier, no id parsing, and no boxing of the response body, which
//! catch-panic does for every response and every frame of a stream).

use std::any::Any;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use axum::body::Body;
use axum::http::{HeaderName, HeaderValue, Request, Response};
use axum::response::IntoResponse;
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
/// a `request` span, puts the id (and the client's `x-client-request-id`) on the response, and
/// turns a panic of the inner service into a 500.
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

impl<S, B> Service<Request<B>> for RequestId<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = WithRequestId<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        let id = mint();
        let client_id = request.headers().get(X_CLIENT_REQUEST_ID).cloned();
        // Made for every request, and formatted when it is made: the id alone, which is what
        // ties a line logged inside the request to it (method and path go on the debug line
        // when the response leaves). With method and path too, it cost ~11k instructions per
        // request at the default level, 15 % of the gateway's (docs/journal/benchmarks.md).
        let span = tracing::info_span!(
            "request",
            // Display, not Debug: Debug escapes a `str` character by character.
            request_id = %id.to_str().unwrap_or_default(),
            client_request_id = tracing::field::Empty,
        );
        if let Some(client_id) = client_id.as_ref().and_then(|v| v.to_str().ok()) {
            span.record("client_request_id", tracing::field::display(client_id));
        }
        request.headers_mut().insert(X_REQUEST_ID, id.clone());
        let access = tracing::enabled!(tracing::Level::DEBUG).then(|| Access {
            started: Instant::now(),
            method: request.method().clone(),
            path: request.uri().path().to_owned(),
        });
        let inner = span.in_scope(|| {
            catch_unwind(AssertUnwindSafe(|| self.inner.call(request)))
                .map_err(|panic| log_panic(panic.as_ref()))
                .ok()
        });
        WithRequestId {
            inner: inner.map(|future| future.instrument(span)),
            id: Some(id),
            client_id,
            access,
        }
    }
}

/// What the debug line logged when the response leaves says about the request.
struct Access {
    started: Instant,
    method: http::Method,
    path: String,
}

pin_project_lite::pin_project! {
    /// The inner service's future; puts the ids on its response. `None`: the inner service
    /// panicked (in `call`, or in this future, which is not polled again).
    pub struct WithRequestId<F> {
        #[pin]
        inner: Option<Instrumented<F>>,
        id: Option<HeaderValue>,
        client_id: Option<HeaderValue>,
        access: Option<Access>,
    }
}

impl<F, E> Future for WithRequestId<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let mut response = match this.inner.as_mut().as_pin_mut() {
            // Unwinding out of `poll` leaves the future unusable; it is dropped, never polled
            // again.
            Some(inner) => match catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
                Ok(poll) => ready!(poll)?,
                Err(panic) => {
                    log_panic(panic.as_ref());
                    this.inner.set(None);
                    internal_error()
                }
            },
            None => internal_error(),
        };
        if let (Some(access), Some(id)) = (this.access.take(), this.id.as_ref()) {
            tracing::debug!(
                request_id = %id.to_str().unwrap_or_default(),
                method = %access.method,
                path = %access.path,
                status = response.status().as_u16(),
                latency_us = access.started.elapsed().as_micros() as u64,
                "response head sent"
            );
        }
        let headers = response.headers_mut();
        if let Some(id) = this.id.take() {
            headers.insert(X_REQUEST_ID, id);
        }
        if let Some(client_id) = this.client_id.take() {
            headers.insert(X_CLIENT_REQUEST_ID, client_id);
        }
        Poll::Ready(Ok(response))
    }
}

fn log_panic(panic: &(dyn Any + Send)) {
    let what = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("(no message)");
    tracing::error!(panic = what, "request handler panicked");
}

fn internal_error() -> Response<Body> {
    crate::error::ApiError::Internal(
        "The gateway hit an internal error while handling this request.".into(),
    )
    .into_response()
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

    async fn answer_of(
        service: impl tower::Service<
            Request<Body>,
            Response = Response<Body>,
            Error = std::convert::Infallible,
        >,
    ) -> (axum::http::StatusCode, bool, serde_json::Value) {
        use http_body_util::BodyExt;
        use tower::ServiceExt;
        let request = Request::get("/boom").body(Body::empty()).unwrap();
        let response = RequestIdLayer
            .layer(service)
            .oneshot(request)
            .await
            .unwrap();
        let has_id = response.headers().contains_key(X_REQUEST_ID);
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, has_id, serde_json::from_slice(&body).unwrap())
    }

    fn assert_internal_error(
        (status, has_id, body): (axum::http::StatusCode, bool, serde_json::Value),
    ) {
        assert_eq!(status, axum::http::StatusCode::INTERNAL_SERVER_ERROR);
        assert!(has_id, "the 500 carries the request id");
        assert_eq!(body["error"]["type"], "server_error");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("internal error"), "{message}");
    }

    /// Lines logged inside a request carry its id (from the span); the debug line logged when
    /// the response leaves carries the id, method, path and status.
    #[tokio::test]
    async fn logs_inside_a_request_and_its_access_line_carry_the_request_id() {
        use tower::ServiceExt;
        #[derive(Clone, Default)]
        struct Lines(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Lines {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let lines = Lines::default();
        let writer = lines.clone();
        let _subscriber = tracing::subscriber::set_default(
            tracing_subscriber::fmt()
                .with_max_level(tracing::Level::DEBUG)
                .with_ansi(false)
                .with_writer(move || writer.clone())
                .finish(),
        );
        async fn hello() -> &'static str {
            tracing::warn!("inside the handler");
            "hi"
        }
        let app = axum::Router::new().route("/hello", axum::routing::get(hello));
        let request = Request::get("/hello?x=1").body(Body::empty()).unwrap();
        let response = RequestIdLayer.layer(app).oneshot(request).await.unwrap();
        let id = response.headers()[X_REQUEST_ID]
            .to_str()
            .unwrap()
            .to_owned();
        let logged = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        let line = |needle: &str| {
            logged
                .lines()
                .find(|l| l.contains(needle))
                .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{logged}"))
                .to_owned()
        };
        assert!(
            line("inside the handler").contains(&format!("request{{request_id={id}}}")),
            "{logged}"
        );
        let access = line("response head sent");
        for field in [
            format!("request_id={id}"),
            "method=GET".into(),
            "path=/hello".into(),
            "status=200".into(),
        ] {
            assert!(access.contains(&field), "{field} missing: {access}");
        }
    }

    #[tokio::test]
    async fn a_handler_that_panics_answers_500_in_openai_shape() {
        async fn boom() -> &'static str {
            panic!("bug in a handler")
        }
        let app = axum::Router::new().route("/boom", axum::routing::get(boom));
        assert_internal_error(answer_of(app).await);
    }

    #[tokio::test]
    async fn a_service_that_panics_when_called_answers_500_in_openai_shape() {
        let service = tower::service_fn(|_: Request<Body>| -> std::future::Ready<
            Result<Response<Body>, std::convert::Infallible>,
        > { panic!("bug before the future") });
        assert_internal_error(answer_of(service).await);
    }
}
