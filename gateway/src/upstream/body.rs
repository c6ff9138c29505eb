//! The body of a backend's answer, which drives its pooled connection while it is read.

use super::*;

/// The body of a backend's answer. On a pooled connection, reading it drives the connection,
/// and the connection goes back to its pool when the body has been read whole (dropped
/// before that, it is closed: an HTTP/1 connection cannot skip the rest of an answer).
pub struct UpstreamBody {
    pub(super) body: Incoming,
    pub(super) driver: Option<Driver>,
}

pub(super) struct Driver {
    pub(super) conn: Box<Conn>,
    pub(super) pool: Arc<ConnPool>,
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
