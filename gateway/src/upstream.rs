//! How bytes reach a backend: HTTP/1 keep-alive connections to URL backends (plain or TLS),
//! each driven by the request using it, and — for rigs — an HTTP/2 connection the rig opened to
//! us. Both answer with the same `Response<UpstreamBody>`, so dispatch and streaming do not care
//! which one carried a request.

use std::future::poll_fn;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tower::ServiceExt;

use crate::config::Config;

/// Request bodies are always whole: the gateway has read and checked them before dispatch.
pub type RequestBody = Full<Bytes>;
pub type UpstreamResponse = http::Response<UpstreamBody>;
/// TCP, with TLS for `https` backends.
pub type Connector = HttpsConnector<HttpConnector>;
type Io = MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>;

/// What the gateway reaches backends with: a connector for the inference requests, which bring
/// their own connections (see [`ConnPool`]), and hyper's pooled client for everything else
/// (health probes). Cheap to clone.
#[derive(Clone)]
pub struct HttpClient {
    connector: Connector,
    pooled: Client<Connector, RequestBody>,
}

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
    let pooled = Client::builder(TokioExecutor::new())
        // Idle connections to a backend are cheap to keep and dear to re-open.
        .pool_idle_timeout(IDLE_TIMEOUT)
        .pool_max_idle_per_host(MAX_IDLE)
        .build(connector.clone());
    HttpClient { connector, pooled }
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

/// Most idle connections kept per backend.
const MAX_IDLE: usize = 256;
/// Idle connections older than this are closed rather than reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// The idle keep-alive connections to one backend. A request takes one and drives it itself:
/// writes the request, reads the answer and its body, then puts the connection back once the
/// body has been read whole. hyper's pooled client instead runs each connection in a task of
/// its own, so every request hands over to that task and back, twice or more, often across
/// worker threads (a futex wake-up each).
#[derive(Default)]
pub struct ConnPool {
    /// Oldest first: taken from the end (the warmest), expired from the front.
    idle: Mutex<Vec<(Instant, Box<Conn>)>>,
}

/// One HTTP/1 connection: the handle to send on and the connection state machine, which
/// whoever holds it polls. Always boxed: it is large (the TLS state is inline), and it moves
/// between the pool, the request's future and the body.
struct Conn {
    sender: http1::SendRequest<RequestBody>,
    conn: http1::Connection<Io, RequestBody>,
    /// The connection future finished (closed, or failed): never poll or reuse it again.
    closed: bool,
}

impl ConnPool {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Instant, Box<Conn>)>> {
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn checkout(&self) -> Option<Box<Conn>> {
        let mut idle = self.lock();
        while let Some((since, conn)) = idle.pop() {
            if since.elapsed() < IDLE_TIMEOUT && !conn.sender.is_closed() {
                return Some(conn);
            }
        }
        None
    }

    fn checkin(&self, conn: Box<Conn>) {
        if conn.closed || conn.sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let expired: Vec<_> = {
            let mut idle = self.lock();
            let stale = idle
                .iter()
                .take_while(|(since, _)| now.duration_since(*since) >= IDLE_TIMEOUT)
                .count();
            let expired = idle.drain(..stale).collect();
            if idle.len() < MAX_IDLE {
                idle.push((now, conn));
            }
            expired
        };
        // Closed outside the lock.
        drop(expired);
    }

    /// Idle connections now (for tests).
    pub fn idle_len(&self) -> usize {
        self.lock().len()
    }

    /// Closes the idle connections that expired or that the backend closed: nothing polls an
    /// idle connection, so without this a backend that gets no traffic would keep them
    /// half-closed (CLOSE_WAIT) until its next request.
    pub fn prune(&self) {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let closed: Vec<_> = {
            let mut idle = self.lock();
            let mut closed = Vec::new();
            let mut kept = Vec::with_capacity(idle.len());
            for (since, mut conn) in idle.drain(..) {
                conn.drive(&mut cx);
                if conn.closed || since.elapsed() >= IDLE_TIMEOUT {
                    closed.push(conn);
                } else {
                    kept.push((since, conn));
                }
            }
            *idle = kept;
            closed
        };
        drop(closed);
    }

    /// Sends a request (origin-form URI, `Host` set) to the backend at `origin` on an idle
    /// connection, or a new one. A pooled connection the backend closed while it sat idle
    /// took nothing, and the request goes out on the next one.
    pub async fn send(
        self: &Arc<Self>,
        connector: &Connector,
        origin: &http::Uri,
        mut request: http::Request<RequestBody>,
    ) -> Result<UpstreamResponse, SendError> {
        loop {
            let (mut conn, reused) = match self.checkout() {
                Some(conn) => (conn, true),
                None => (connect(connector, origin).await?, false),
            };
            match conn.send(request).await {
                Ok(response) => {
                    let pool = Arc::clone(self);
                    return Ok(response.map(|body| UpstreamBody {
                        body,
                        driver: Some(Driver { conn, pool }),
                    }));
                }
                Err(Unsent(unsent, _)) if reused => request = *unsent,
                Err(Unsent(_, message)) => {
                    return Err(SendError {
                        connect: true,
                        message,
                    });
                }
                Err(Failed(message)) => {
                    return Err(SendError {
                        connect: false,
                        message,
                    });
                }
            }
        }
    }
}

async fn connect(connector: &Connector, origin: &http::Uri) -> Result<Box<Conn>, SendError> {
    let connect_error = |message: String| SendError {
        connect: true,
        message,
    };
    let io = connector
        .clone()
        .oneshot(origin.clone())
        .await
        .map_err(|e| connect_error(format!("connecting to {origin}: {e}")))?;
    let (sender, conn) = http1::handshake(io)
        .await
        .map_err(|e| connect_error(e.to_string()))?;
    Ok(Box::new(Conn {
        sender,
        conn,
        closed: false,
    }))
}

enum SendFailure {
    /// Nothing was written: the request, to send elsewhere.
    Unsent(Box<http::Request<RequestBody>>, String),
    /// The request may have reached the backend.
    Failed(String),
}
use SendFailure::{Failed, Unsent};

impl Conn {
    /// Polls the connection itself; notes when it finished.
    fn drive(&mut self, cx: &mut Context<'_>) {
        if !self.closed && Pin::new(&mut self.conn).poll(cx).is_ready() {
            self.closed = true;
        }
    }

    /// Sends `request` and waits for the answer's head, driving the connection meanwhile.
    async fn send(
        &mut self,
        request: http::Request<RequestBody>,
    ) -> Result<http::Response<Incoming>, SendFailure> {
        let ready = poll_fn(|cx| {
            self.drive(cx);
            if self.closed {
                return Poll::Ready(false);
            }
            self.sender.poll_ready(cx).map(|ready| ready.is_ok())
        })
        .await;
        if !ready {
            return Err(Unsent(
                Box::new(request),
                "the backend closed the connection".into(),
            ));
        }
        let mut answer = pin!(self.sender.try_send_request(request));
        poll_fn(|cx| {
            self.drive(cx);
            match answer.as_mut().poll(cx) {
                Poll::Ready(Ok(response)) => Poll::Ready(Ok(response)),
                Poll::Ready(Err(mut err)) => Poll::Ready(Err(match err.take_message() {
                    Some(request) => Unsent(Box::new(request), err.into_error().to_string()),
                    None => Failed(err.into_error().to_string()),
                })),
                // A finished connection answers every waiting request; should one be left,
                // nothing would ever wake it.
                Poll::Pending if self.closed => Poll::Ready(Err(Failed(
                    "the backend closed the connection before answering".into(),
                ))),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }
}

/// The body of a backend's answer. On a pooled connection, reading it drives the connection,
/// and the connection goes back to its pool when the body has been read whole (dropped
/// before that, it is closed: an HTTP/1 connection cannot skip the rest of an answer).
pub struct UpstreamBody {
    body: Incoming,
    driver: Option<Driver>,
}

struct Driver {
    conn: Box<Conn>,
    pool: Arc<ConnPool>,
}

impl UpstreamBody {
    /// A body whose connection someone else drives (a rig's tunnel).
    pub fn tunneled(body: Incoming) -> Self {
        UpstreamBody { body, driver: None }
    }

    /// Polling this body drives its connection: when it is pending, nothing more has arrived.
    /// (A tunneled body may be pending while its connection's task holds frames already read.)
    pub fn drives_its_connection(&self) -> bool {
        self.driver.is_some()
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some(driver) = &mut this.driver {
            driver.conn.drive(cx);
        }
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        let ended = match &frame {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => this.body.is_end_stream(),
            Poll::Ready(Some(Err(_))) => {
                this.driver = None;
                false
            }
            Poll::Pending => false,
        };
        if ended && let Some(Driver { conn, pool }) = this.driver.take() {
            pool.checkin(conn);
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
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
    match sender.send_request(request).await {
        Ok(response) => Ok(response.map(UpstreamBody::tunneled)),
        Err(err) => Err(SendError {
            connect: err.is_closed() || err.is_canceled(),
            message: format!("rig tunnel: {err}"),
        }),
    }
}
