//! How bytes reach a backend: HTTP/1 keep-alive connections to URL backends (TCP, plain or TLS,
//! or a local Unix socket), each driven by the request using it, and — for rigs — an HTTP/2
//! connection the rig opened to us. Both answer with the same `Response<UpstreamBody>`, so
//! dispatch and streaming do not care which one carried a request.

use std::future::{Future, poll_fn};
use std::io::IoSlice;
use std::path::Path;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tower::ServiceExt;

use crate::config::DispatchConfig;
pub use garage_tls::CaFileError;

/// Request bodies are always whole: the gateway has read and checked them before dispatch.
pub type RequestBody = Full<Bytes>;
pub type UpstreamResponse = http::Response<UpstreamBody>;

/// How connections to a backend are made: TCP, with TLS for `https` backends, or a Unix domain
/// socket (an upstream's `unix_socket`), whatever the URL's host.
#[derive(Clone)]
pub enum Connector {
    Tcp(HttpsConnector<HttpConnector>),
    Unix { path: Arc<Path>, timeout: Duration },
}

/// A connection a [`Connector`] made.
// The TCP variant carries the TLS state inline; a `Conn` holding it is boxed anyway, and a box
// here would cost an indirection on every read and write.
#[allow(clippy::large_enum_variant)]
pub enum Io {
    Tcp(MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>),
    Unix(TokioIo<tokio::net::UnixStream>),
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<http::Uri> for Connector {
    type Response = Io;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Io, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match self {
            Connector::Tcp(tcp) => tcp.poll_ready(cx),
            Connector::Unix { .. } => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        match self {
            Connector::Tcp(tcp) => {
                let connecting = tcp.call(uri);
                Box::pin(async move { connecting.await.map(Io::Tcp) })
            }
            Connector::Unix { path, timeout } => {
                let (path, timeout) = (Arc::clone(path), *timeout);
                Box::pin(async move {
                    let stream =
                        tokio::time::timeout(timeout, tokio::net::UnixStream::connect(&*path))
                            .await
                            .map_err(|_| format!("connecting to {} timed out", path.display()))?
                            .map_err(|err| format!("{}: {err}", path.display()))?;
                    Ok(Io::Unix(TokioIo::new(stream)))
                })
            }
        }
    }
}

impl Connection for Io {
    fn connected(&self) -> Connected {
        match self {
            Io::Tcp(tcp) => tcp.connected(),
            Io::Unix(_) => Connected::new(),
        }
    }
}

impl hyper::rt::Read for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Io::Unix(unix) => Pin::new(unix).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Tcp(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Io::Unix(unix) => Pin::new(unix).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Tcp(tcp) => Pin::new(tcp).poll_write_vectored(cx, bufs),
            Io::Unix(unix) => Pin::new(unix).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Tcp(tcp) => tcp.is_write_vectored(),
            Io::Unix(unix) => unix.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(tcp) => Pin::new(tcp).poll_flush(cx),
            Io::Unix(unix) => Pin::new(unix).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Io::Unix(unix) => Pin::new(unix).poll_shutdown(cx),
        }
    }
}

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

impl SendError {
    /// Nothing reached the backend.
    pub fn nothing_sent(message: impl Into<String>) -> Self {
        SendError {
            connect: true,
            message: message.into(),
        }
    }

    /// The request may have reached the backend.
    fn maybe_sent(message: impl Into<String>) -> Self {
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

fn client_with(connector: Connector) -> HttpClient {
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
    /// What the connection and its body are polled with.
    gate: Arc<Gate>,
}

/// The waker a request's connection is polled with. Polling the connection and its body wakes
/// the request's own task all the time: the body taking a frame tells the connection to read
/// on, the connection handing one over tells the body, a request sent tells the connection.
/// Passed straight through, each such wake-up made tokio schedule the task again after it
/// returned pending (at the back of the queue, waking another worker to run it: one eventfd
/// write and one more `epoll_wait` per request). Through the gate, a wake-up during the poll
/// only marks it: the poller polls again before it returns, and returns pending only when
/// nothing woke it meanwhile. Wake-ups while nobody polls (the socket became readable) go to
/// the task.
struct Gate {
    task: futures::task::AtomicWaker,
    state: AtomicU8,
}

const POLLING: u8 = 1;
const WOKEN: u8 = 2;
/// Rounds of polling again because the connection woke itself, before yielding to the
/// scheduler (tokio's cooperative budget, once spent, makes I/O wake and pend every time).
const GATE_ROUNDS: usize = 4;

impl Gate {
    fn new() -> Arc<Self> {
        Arc::new(Gate {
            task: futures::task::AtomicWaker::new(),
            state: AtomicU8::new(0),
        })
    }

    /// Polls `poll` with the gate's waker, again while it woke itself and is pending.
    fn run<T>(
        self: &Arc<Self>,
        cx: &mut Context<'_>,
        mut poll: impl FnMut(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        self.task.register(cx.waker());
        let waker = Waker::from(Arc::clone(self));
        let mut gated = Context::from_waker(&waker);
        for _ in 0..GATE_ROUNDS {
            self.state.store(POLLING, Ordering::SeqCst);
            let result = poll(&mut gated);
            let state = self.state.swap(0, Ordering::SeqCst);
            if result.is_ready() || state & WOKEN == 0 {
                return result;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl Wake for Gate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.state.fetch_or(WOKEN, Ordering::SeqCst) & POLLING == 0 {
            self.task.wake();
        }
    }
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
                Err(Unsent(_, message)) => return Err(SendError::nothing_sent(message)),
                Err(Failed(message)) => return Err(SendError::maybe_sent(message)),
            }
        }
    }
}

async fn connect(connector: &Connector, origin: &http::Uri) -> Result<Box<Conn>, SendError> {
    let io = connector
        .clone()
        .oneshot(origin.clone())
        .await
        .map_err(|e| SendError::nothing_sent(format!("connecting to {origin}: {e}")))?;
    let (sender, conn) = http1::handshake(io)
        .await
        .map_err(|e| SendError::nothing_sent(e.to_string()))?;
    Ok(Box::new(Conn {
        sender,
        conn,
        closed: false,
        gate: Gate::new(),
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
        let gate = Arc::clone(&self.gate);
        let ready = poll_fn(|cx| {
            gate.run(cx, |cx| {
                self.drive(cx);
                if self.closed {
                    return Poll::Ready(false);
                }
                self.sender.poll_ready(cx).map(|ready| ready.is_ok())
            })
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
            gate.run(cx, |cx| {
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
        let frame = match &mut this.driver {
            Some(driver) => {
                let gate = Arc::clone(&driver.conn.gate);
                gate.run(cx, |cx| {
                    driver.conn.drive(cx);
                    Pin::new(&mut this.body).poll_frame(cx)
                })
            }
            None => Pin::new(&mut this.body).poll_frame(cx),
        };
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts the wake-ups of the task that polls through the gate.
    #[derive(Default)]
    struct CountingTask(AtomicUsize);

    impl Wake for CountingTask {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Runs `poll` through a fresh gate; returns its result and the task whose wake-ups count.
    fn gated<T>(poll: impl FnMut(&mut Context<'_>) -> Poll<T>) -> (Poll<T>, Arc<CountingTask>) {
        let task = Arc::new(CountingTask::default());
        let waker = Waker::from(Arc::clone(&task));
        let result = Gate::new().run(&mut Context::from_waker(&waker), poll);
        (result, task)
    }

    fn wakes(task: &CountingTask) -> usize {
        task.0.load(Ordering::SeqCst)
    }

    #[test]
    fn a_wake_up_during_the_poll_polls_again_instead_of_waking_the_task() {
        let mut polls = 0;
        // Wakes itself on its first two polls (a frame handed over), then waits.
        let (result, task) = gated(|cx| {
            polls += 1;
            if polls <= 2 {
                cx.waker().wake_by_ref();
            }
            Poll::<()>::Pending
        });
        assert!(result.is_pending());
        assert_eq!(polls, 3);
        assert_eq!(wakes(&task), 0, "the task was not woken");
    }

    #[test]
    fn a_wake_up_while_nobody_polls_wakes_the_task() {
        let mut kept = None;
        let (result, task) = gated(|cx| {
            kept = Some(cx.waker().clone());
            Poll::<()>::Pending
        });
        assert!(result.is_pending());
        // The socket became readable later.
        kept.expect("the gate's waker").wake();
        assert_eq!(wakes(&task), 1);
    }

    #[test]
    fn a_poll_that_always_wakes_itself_yields_to_the_scheduler() {
        let mut polls = 0;
        // Like I/O once tokio's budget is spent: wakes and pends every time.
        let (result, task) = gated(|cx| {
            polls += 1;
            cx.waker().wake_by_ref();
            Poll::<()>::Pending
        });
        assert!(result.is_pending());
        assert_eq!(polls, GATE_ROUNDS);
        assert_eq!(wakes(&task), 1, "woken to run again later");
    }

    #[test]
    fn a_ready_poll_returns_at_once() {
        let mut polls = 0;
        let (result, _) = gated(|cx| {
            polls += 1;
            cx.waker().wake_by_ref();
            Poll::Ready(7)
        });
        assert_eq!(result, Poll::Ready(7));
        assert_eq!(polls, 1);
    }
}
