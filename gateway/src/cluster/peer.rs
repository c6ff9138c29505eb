//! Connections to another replica: HTTP/2 without TLS (h2c) on the private network between
//! replicas, a few of them per peer so that one connection's stream limit (the server's
//! `max_concurrent_streams`) does not cap forwarding.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::upstream::{RequestBody, SendError, UpstreamResponse, send_tunnel};

/// Connections kept to each peer, used in turn.
const CONNECTIONS_PER_PEER: usize = 4;
/// Pings on an idle or busy connection: a peer that vanished without closing (a machine that
/// lost power) is noticed within interval + timeout, and its forwarded streams fail.
const PING_INTERVAL: Duration = Duration::from_secs(5);
const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// Another replica, as this one forwards requests to it.
pub struct Peer {
    url: String,
    authority: String,
    secret: http::HeaderValue,
    connect_timeout: Duration,
    connections: [tokio::sync::Mutex<Option<SendRequest<RequestBody>>>; CONNECTIONS_PER_PEER],
    next: AtomicUsize,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Peer({})", self.url)
    }
}

impl Peer {
    pub(super) fn new(url: &str, secret: http::HeaderValue, connect_timeout: Duration) -> Self {
        let authority = url
            .strip_prefix("http://")
            .unwrap_or(url)
            .trim_end_matches('/')
            .to_owned();
        Peer {
            url: url.to_owned(),
            authority,
            secret,
            connect_timeout,
            connections: Default::default(),
            next: AtomicUsize::new(0),
        }
    }

    /// The peer's advertised URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A ready connection: the one in turn, opened (again) when it is closed.
    async fn sender(&self) -> Result<SendRequest<RequestBody>, SendError> {
        let turn = self.next.fetch_add(1, Ordering::Relaxed) % CONNECTIONS_PER_PEER;
        let mut slot = self.connections[turn].lock().await;
        if let Some(sender) = slot.as_ref()
            && !sender.is_closed()
        {
            return Ok(sender.clone());
        }
        let unreachable = |err: &dyn std::fmt::Display| {
            SendError::nothing_sent(format!("replica {}: {err}", self.url))
        };
        let tcp = tokio::time::timeout(
            self.connect_timeout,
            tokio::net::TcpStream::connect(self.authority.as_str()),
        )
        .await
        .map_err(|_| unreachable(&"connect timed out"))?
        .map_err(|e| unreachable(&e))?;
        // A proxy that writes in pieces waits out the peer's delayed ACK without it.
        let _ = tcp.set_nodelay(true);
        let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(PING_INTERVAL)
            .keep_alive_timeout(PING_TIMEOUT)
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| unreachable(&e))?;
        // Lives until the connection closes: the peer closes it, a ping goes unanswered, or
        // every sender is dropped (the peer was forgotten).
        tokio::spawn(connection);
        *slot = Some(sender.clone());
        Ok(sender)
    }

    /// Sends `POST /internal/rigs/{node}/v1{path}` to the peer, which passes it to the rig's
    /// tunnel. Failing to reach the peer took nothing: safe to try another backend.
    pub async fn forward(
        &self,
        node: &str,
        path: &str,
        body: Bytes,
        request_id: Option<&http::HeaderValue>,
        trace: Option<&crate::telemetry::TraceHeaders>,
    ) -> Result<UpstreamResponse, SendError> {
        let uri = http::Uri::try_from(format!(
            "http://{}{}{node}/v1{path}",
            self.authority,
            super::FORWARD_PREFIX
        ))
        .map_err(|e| SendError::nothing_sent(format!("replica {}: {e}", self.url)))?;
        let mut request = http::Request::new(RequestBody::new(body));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = uri;
        let headers = request.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        headers.insert(super::SECRET_HEADER, self.secret.clone());
        if let Some(id) = request_id {
            headers.insert(crate::request_id::X_REQUEST_ID, id.clone());
            headers.insert(super::REQUEST_ID_HEADER, id.clone());
        }
        if let Some(trace) = trace {
            trace.apply(headers);
        }
        let sender = self.sender().await?;
        let response = send_tunnel(sender, request).await?;
        if response.headers().contains_key(super::REFUSED_HEADER) {
            // The peer answered for itself: the rig left it, or the replicas disagree on the
            // secret (misconfigured). Nothing reached a rig; another backend may take it.
            if response.status() == http::StatusCode::UNAUTHORIZED {
                tracing::error!(replica = %self.url, "the replica refused this cluster's secret: do the replicas share `cluster.secret`?");
            }
            return Err(SendError::nothing_sent(format!(
                "replica {} refused the request ({})",
                self.url,
                response.status()
            )));
        }
        Ok(response)
    }
}
