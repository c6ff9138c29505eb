//! The supervisors' HTTP client for `/health` and `/metrics` on 127.0.0.1.
//!
//! Plain hyper rather than reqwest: engines are only ever reached over loopback HTTP, so there is
//! no TLS provider to install, no proxy environment to bypass, and building it cannot fail.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// A `/health` or `/metrics` answer slower than this counts as a failure: a healthy vLLM answers
/// in milliseconds, and the supervisor checks again a second later anyway.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// vLLM's `/metrics` is tens of kilobytes (histograms per model); anything far larger is not an
/// engine we understand.
const MAX_BODY_BYTES: usize = 4 << 20;

#[derive(Clone)]
pub(crate) struct Client(HyperClient<HttpConnector, Empty<Bytes>>);

impl Client {
    pub(crate) fn new() -> Client {
        Client(HyperClient::builder(TokioExecutor::new()).build_http())
    }

    /// Whether `GET http://127.0.0.1:port/health` answers 200.
    pub(crate) async fn healthy(&self, port: u16) -> bool {
        self.get(port, "/health").await.is_some()
    }

    /// The body of a 200 answer to `GET http://127.0.0.1:port{path}`, or `None`.
    pub(crate) async fn get(&self, port: u16, path: &str) -> Option<Bytes> {
        let uri: http::Uri = format!("http://127.0.0.1:{port}{path}").parse().ok()?;
        let exchange = async {
            let response = self.0.get(uri).await.ok()?;
            if response.status() != http::StatusCode::OK {
                return None;
            }
            let body = Limited::new(response.into_body(), MAX_BODY_BYTES);
            Some(body.collect().await.ok()?.to_bytes())
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .ok()
            .flatten()
    }
}
