//! Accepting clients' connections: how many, from whom, for how long, and how they end.
//!
//! The gateway stands on the internet, where one host can open twenty thousand connections and
//! send half a request head on each. So, in the accept loop and on every connection:
//!
//! - **a cap on connections**, all together (`connections.max`, by default what the process's
//!   file descriptors allow, with room for the backends' side) and **per client address**
//!   (`connections.max_per_ip`): past the first the loop stops accepting until one closes;
//!   past the second a new connection from that address is closed at once;
//! - **a deadline on request heads** (`connections.header_read_timeout_secs`): hyper closes a
//!   connection whose head does not arrive in time. It also bounds how long a kept-alive
//!   connection may sit idle between requests: hyper starts the clock as it waits for the next
//!   head. A TLS handshake has its own deadline;
//! - **a deadline between the pieces of a request body** (`connections.body_read_timeout_secs`);
//! - **a graceful end**: at shutdown every connection is told to finish its requests, and one
//!   with no request in flight (idle, or part way through a head) is closed at once, so a
//!   half-sent head cannot hold a SIGTERM for the whole grace period.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ConnectionsConfig;

/// File descriptors kept for everything but client connections: the store, backends' pools,
/// rigs' tunnels, files, the plugin engine.
const RESERVED_FDS: u64 = 256;
/// How often a connection that was told to finish looks whether its last request is done.
const DRAIN_CHECK: Duration = Duration::from_millis(20);
/// How long to wait before accepting again after `accept` failed (out of descriptors, say):
/// retrying at once would spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// The caps and deadlines, resolved from the config.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub max_per_ip: usize,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub tls_handshake_timeout: Duration,
}

impl Limits {
    /// `config`, with `max = 0` turned into what the process's descriptors allow: its soft
    /// limit raised to the hard one first (as nginx's `worker_rlimit_nofile` does), then half of
    /// it less a reserve, since a proxied request holds a descriptor on each side.
    pub fn resolve(config: &ConnectionsConfig) -> Limits {
        let max_connections = match config.max {
            0 => {
                let fds = match rlimit::increase_nofile_limit(u64::MAX) {
                    Ok(fds) => fds,
                    Err(err) => {
                        tracing::warn!(error = %err, "cannot read the file descriptor limit; assuming 1024");
                        1024
                    }
                };
                usize::try_from(fds.saturating_sub(RESERVED_FDS) / 2)
                    .unwrap_or(usize::MAX)
                    .max(64)
            }
            max => max,
        };
        Limits {
            max_connections,
            max_per_ip: match config.max_per_ip {
                0 => usize::MAX,
                max => max,
            },
            header_read_timeout: Duration::from_secs(config.header_read_timeout_secs.max(1)),
            body_read_timeout: Duration::from_secs(config.body_read_timeout_secs.max(1)),
            tls_handshake_timeout: Duration::from_secs(config.tls_handshake_timeout_secs.max(1)),
        }
    }
}

/// Counts of connections the caps turned away, for `/metrics`.
#[derive(Clone)]
pub struct ListenerMetrics {
    pub open: prometheus::IntGauge,
    pub refused: prometheus::IntCounterVec,
}

impl ListenerMetrics {
    pub fn new() -> Self {
        ListenerMetrics {
            open: prometheus::IntGauge::new(
                "garage_connections_open",
                "Client connections open now",
            )
            .unwrap_or_else(|e| unreachable!("static metric definition: {e}")),
            refused: prometheus::IntCounterVec::new(
                prometheus::Opts::new(
                    "garage_connections_refused_total",
                    "Client connections closed at once, by reason (per_ip: the address has \
                     connections.max_per_ip open; tls: the handshake failed or timed out)",
                ),
                &["reason"],
            )
            .unwrap_or_else(|e| unreachable!("static metric definition: {e}")),
        }
    }

    pub fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![Box::new(self.open.clone()), Box::new(self.refused.clone())]
    }
}

impl Default for ListenerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Connections open per client address.
#[derive(Default)]
struct PerIp(Mutex<HashMap<IpAddr, usize>>);

impl PerIp {
    /// Counts a connection from `ip`, unless it has `max` open already.
    fn enter(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<IpSlot> {
        let mut open = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let count = open.entry(ip).or_default();
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(IpSlot {
            per_ip: Arc::clone(self),
            ip,
        })
    }
}

/// One connection's place in its address's count, given back when it closes.
struct IpSlot {
    per_ip: Arc<PerIp>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut open = self.per_ip.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Serves `app` on `listener` (over TLS with `tls`) until `shutdown`, then lets the connections'
/// requests finish and returns once every connection is closed.
pub async fn serve<S>(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    app: S,
    limits: Limits,
    metrics: ListenerMetrics,
    shutdown: CancellationToken,
) -> std::io::Result<()>
where
    S: tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let limits = Arc::new(limits);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let per_ip = Arc::new(PerIp::default());
    let connections = TaskTracker::new();
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        // Notices a client that vanished without closing (a NAT that forgot it).
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .enable_connect_protocol();
    let builder = Arc::new(builder);
    loop {
        // A free slot first: at the cap, connections wait in the kernel's backlog.
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let Some(slot) = per_ip.enter(peer.ip(), limits.max_per_ip) else {
            metrics.refused.with_label_values(&["per_ip"]).inc();
            tracing::debug!(%peer, "connection refused: too many from this address");
            drop(tcp);
            continue;
        };
        // Nagle off on every client socket: see `state::backend_client`.
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(error = %err, "cannot set TCP_NODELAY");
        }
        let connection = Connection {
            app: app.clone(),
            builder: Arc::clone(&builder),
            limits: Arc::clone(&limits),
            shutdown: shutdown.clone(),
            metrics: metrics.clone(),
        };
        let tls = tls.clone();
        let open = metrics.open.clone();
        connections.spawn(async move {
            let _held = (permit, slot);
            open.inc();
            connection.run(tcp, peer, tls).await;
            open.dec();
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
    Ok(())
}

/// What one connection's task needs.
struct Connection<S> {
    app: S,
    builder: Arc<Builder<TokioExecutor>>,
    limits: Arc<Limits>,
    shutdown: CancellationToken,
    metrics: ListenerMetrics,
}

impl<S> Connection<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    async fn run(self, tcp: TcpStream, peer: SocketAddr, tls: Option<tokio_rustls::TlsAcceptor>) {
        let Some(tls) = tls else {
            return self.serve(tcp).await;
        };
        let handshake = tokio::select! {
            _ = self.shutdown.cancelled() => return,
            handshake = tokio::time::timeout(self.limits.tls_handshake_timeout, tls.accept(tcp)) => handshake,
        };
        match handshake {
            Ok(Ok(stream)) => self.serve(stream).await,
            Ok(Err(error)) => {
                self.metrics.refused.with_label_values(&["tls"]).inc();
                tracing::debug!(%peer, %error, "TLS handshake failed");
            }
            Err(_) => {
                self.metrics.refused.with_label_values(&["tls"]).inc();
                tracing::debug!(%peer, "TLS handshake timed out");
            }
        }
    }

    async fn serve<I>(self, io: I)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let in_flight = Arc::new(AtomicUsize::new(0));
        let service = Tracked {
            app: self.app,
            in_flight: Arc::clone(&in_flight),
            body_read_timeout: self.limits.body_read_timeout,
        };
        let service = hyper_util::service::TowerToHyperService::new(service);
        // hyper's header deadline starts once it knows the connection speaks HTTP/1; before
        // that, telling HTTP/1 from HTTP/2 waits for the first bytes with no deadline at all.
        let io = FirstBytes::new(io, self.limits.header_read_timeout);
        let conn = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(io), service);
        let mut conn = std::pin::pin!(conn);
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(err) = result {
                    tracing::trace!(error = %err, "connection ended with an error");
                }
                return;
            }
            _ = self.shutdown.cancelled() => {}
        }
        // Shutting down: no new requests on this connection; those in flight finish. One with
        // none (idle, or part way through a head) is closed now.
        conn.as_mut().graceful_shutdown();
        let mut check = tokio::time::interval(DRAIN_CHECK);
        loop {
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = check.tick() => {
                    if in_flight.load(Ordering::Acquire) == 0 {
                        return;
                    }
                }
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// A connection that must send its first bytes within a deadline (then hyper's own
    /// deadlines take over).
    struct FirstBytes<I> {
        #[pin]
        io: I,
        deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    }
}

impl<I> FirstBytes<I> {
    fn new(io: I, within: Duration) -> Self {
        FirstBytes {
            io,
            deadline: Some(Box::pin(tokio::time::sleep(within))),
        }
    }
}

impl<I: AsyncRead> AsyncRead for FirstBytes<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let polled = this.io.poll_read(cx, buf);
        if let Some(deadline) = this.deadline {
            match &polled {
                Poll::Ready(_) if buf.filled().len() > before => *this.deadline = None,
                Poll::Ready(_) => {}
                Poll::Pending => {
                    if deadline.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Err(std::io::ErrorKind::TimedOut.into()));
                    }
                }
            }
        }
        polled
    }
}

impl<I: AsyncWrite> AsyncWrite for FirstBytes<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The application, counting the connection's requests in flight (from the call until the
/// response body is done) and putting a deadline between the pieces of each request body.
/// Neither boxes anything per request beyond what the application does.
#[derive(Clone)]
struct Tracked<S> {
    app: S,
    in_flight: Arc<AtomicUsize>,
    body_read_timeout: Duration,
}

impl<S> tower::Service<http::Request<hyper::body::Incoming>> for Tracked<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Counted>;
    type Error = Infallible;
    type Future = Respond<S::Future>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<hyper::body::Incoming>) -> Self::Future {
        let guard = InFlight::new(Arc::clone(&self.in_flight));
        let within = self.body_read_timeout;
        let request = request.map(|body| {
            Body::new(BodyDeadline {
                body,
                within,
                sleep: None,
            })
        });
        Respond {
            inner: self.app.call(request),
            guard: Some(guard),
        }
    }
}

pin_project_lite::pin_project! {
    /// The application's answer, its body counted in flight until it is done.
    struct Respond<F> {
        #[pin]
        inner: F,
        guard: Option<InFlight>,
    }
}

impl<F> Future for Respond<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<http::Response<Counted>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = match std::task::ready!(this.inner.poll(cx)) {
            Ok(response) => response,
            Err(never) => match never {},
        };
        let in_flight = this.guard.take();
        Poll::Ready(Ok(response.map(|body| Counted {
            body,
            _in_flight: in_flight,
        })))
    }
}

/// One request in flight on a connection, until dropped.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(count: Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        InFlight(count)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted in flight until it is done or dropped.
    struct Counted {
        #[pin]
        body: Body,
        _in_flight: Option<InFlight>,
    }
}

impl HttpBody for Counted {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// A request body that may not go quiet for longer than `within`. The clock starts only
    /// when the body has nothing ready: a body that came with its head (nearly every one) never
    /// touches a timer.
    struct BodyDeadline<B> {
        #[pin]
        body: B,
        within: Duration,
        sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    }
}

/// A request body that went quiet for `connections.body_read_timeout_secs`.
#[derive(Debug)]
struct BodyTimedOut(Duration);

impl std::fmt::Display for BodyTimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the request body sent nothing for {:?}", self.0)
    }
}

impl std::error::Error for BodyTimedOut {}

impl<B> HttpBody for BodyDeadline<B>
where
    B: HttpBody<Data = bytes::Bytes>,
    B::Error: Into<axum::BoxError>,
{
    type Data = bytes::Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        match this.body.poll_frame(cx) {
            Poll::Ready(frame) => {
                *this.sleep = None;
                Poll::Ready(frame.map(|frame| frame.map_err(Into::into)))
            }
            Poll::Pending => {
                let within = *this.within;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(within)));
                if sleep.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Some(Err(Box::new(BodyTimedOut(within)))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_ip_slots_are_counted_and_given_back() {
        let per_ip = Arc::new(PerIp::default());
        let ip: IpAddr = [10, 0, 0, 1].into();
        let a = per_ip.enter(ip, 2).unwrap();
        let _b = per_ip.enter(ip, 2).unwrap();
        assert!(per_ip.enter(ip, 2).is_none());
        assert!(per_ip.enter([10, 0, 0, 2].into(), 2).is_some());
        drop(a);
        assert!(per_ip.enter(ip, 2).is_some());
    }
}
