//! Making connections to a backend: TCP, with TLS for `https`, or a Unix domain socket.

use super::*;

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

pub(super) type BoxError = Box<dyn std::error::Error + Send + Sync>;

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
