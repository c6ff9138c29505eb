//! How bytes reach a backend: a pooled HTTP client for URL backends (plain or TLS), and — for
//! rigs — an HTTP/2 connection the rig opened to us. Both answer with the same
//! `Response<Incoming>`, so dispatch and streaming do not care which one carried a request.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::config::Config;

/// Request bodies are always whole: the gateway has read and checked them before dispatch.
pub type RequestBody = Full<Bytes>;
pub type UpstreamResponse = http::Response<Incoming>;
pub type HttpClient = Client<HttpsConnector<HttpConnector>, RequestBody>;

/// Why a send failed, as far as retrying is concerned.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SendError {
    /// Nothing reached the backend (refused, unreachable, closed tunnel): safe to try another.
    pub connect: bool,
    pub message: String,
}

/// The HTTP client for URL backends: TCP_NODELAY (a proxy that writes a response in two pieces
/// otherwise waits ~40 ms for the peer's delayed ACK), pooled keep-alive connections, a connect
/// timeout, and no overall timeout (streams last as long as generation does).
pub fn http_client(config: &Config) -> HttpClient {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    http.set_connect_timeout(Some(config.dispatch.connect_timeout()));
    let tls = tls_config();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        // Idle connections to a backend are cheap to keep and dear to re-open.
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .build(connector)
}

fn tls_config() -> rustls::ClientConfig {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|e| unreachable!("ring supports the default TLS versions: {e}"))
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// Sends a request through the pooled client.
pub async fn send_http(
    client: &HttpClient,
    request: http::Request<RequestBody>,
) -> Result<UpstreamResponse, SendError> {
    client.request(request).await.map_err(|err| SendError {
        connect: err.is_connect(),
        message: err.to_string(),
    })
}

/// Sends a request through a rig's tunnel. A tunnel that is closed or refuses the stream
/// (the rig is draining) took nothing: safe to try another backend.
pub async fn send_tunnel(
    mut sender: hyper::client::conn::http2::SendRequest<RequestBody>,
    request: http::Request<RequestBody>,
) -> Result<UpstreamResponse, SendError> {
    if let Err(err) = sender.ready().await {
        return Err(SendError {
            connect: true,
            message: format!("rig tunnel closed: {err}"),
        });
    }
    sender.send_request(request).await.map_err(|err| SendError {
        connect: err.is_closed() || err.is_canceled(),
        message: format!("rig tunnel: {err}"),
    })
}
