//! The clients: connectors for inference requests, hyper's pooled client for the rest, and
//! sending through a rig's tunnel.

use super::*;

/// What the gateway reaches backends with: a connector for the inference requests, which bring
/// their own connections (see [`ConnPool`]), and hyper's pooled client for everything else
/// (health probes). Cheap to clone.
#[derive(Clone)]
pub struct HttpClient {
    pub(super) connector: Connector,
    pub(super) pooled: Client<Connector, RequestBody>,
}

/// Why a send failed, as far as retrying is concerned.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SendError {
    /// Nothing reached the backend (refused, unreachable, closed tunnel): safe to try another.
    pub connect: bool,
    pub message: String,
}

impl SendError {
    /// Nothing reached the backend.
    pub fn nothing_sent(message: impl Into<String>) -> Self {
        SendError {
            connect: true,
            message: message.into(),
        }
    }

    /// The request may have reached the backend.
    pub(super) fn maybe_sent(message: impl Into<String>) -> Self {
        SendError {
            connect: false,
            message: message.into(),
        }
    }
}

/// An HTTP client for URL backends: TCP_NODELAY (a proxy that writes a response in two pieces
/// otherwise waits ~40 ms for the peer's delayed ACK), pooled keep-alive connections, a connect
/// timeout, and no overall timeout (streams last as long as generation does). `https` backends
/// are verified against the public web roots plus the CAs of `ca_file` (an upstream's own
/// `tls_ca_file`, else `dispatch.tls_ca_file`).
pub fn http_client(
    dispatch: &DispatchConfig,
    ca_file: Option<&Path>,
) -> Result<HttpClient, CaFileError> {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.enforce_http(false);
    http.set_connect_timeout(Some(dispatch.connect_timeout()));
    let tls = garage_tls::client_config(ca_file)?;
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(client_with(Connector::Tcp(connector)))
}

/// An HTTP client that reaches its backend over the Unix domain socket at `path`, whatever the
/// URL's host (plain HTTP: an upstream's `unix_socket`).
pub fn unix_client(dispatch: &DispatchConfig, path: &Path) -> HttpClient {
    client_with(Connector::Unix {
        path: path.into(),
        timeout: dispatch.connect_timeout(),
    })
}

pub(super) fn client_with(connector: Connector) -> HttpClient {
    let pooled = Client::builder(TokioExecutor::new())
        // Idle connections to a backend are cheap to keep and dear to re-open.
        .pool_idle_timeout(IDLE_TIMEOUT)
        .pool_max_idle_per_host(MAX_IDLE)
        .build(connector.clone());
    HttpClient { connector, pooled }
}

impl HttpClient {
    pub fn connector(&self) -> &Connector {
        &self.connector
    }
}

/// Sends a request through hyper's pooled client (health probes: not worth a pool of our own).
pub async fn send_http(
    client: &HttpClient,
    request: http::Request<RequestBody>,
) -> Result<http::Response<Incoming>, SendError> {
    client
        .pooled
        .request(request)
        .await
        .map_err(|err| SendError {
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
        return Err(SendError::nothing_sent(format!("rig tunnel closed: {err}")));
    }
    match sender.send_request(request).await {
        Ok(response) => Ok(response.map(UpstreamBody::tunneled)),
        Err(err) => Err(SendError {
            connect: err.is_closed() || err.is_canceled(),
            message: format!("rig tunnel: {err}"),
        }),
    }
}
