//! Idle keep-alive connections to one backend, each driven by the request using it, and the
//! waker that keeps such a request from starving the scheduler.

use super::*;

/// Most idle connections kept per backend.
pub(super) const MAX_IDLE: usize = 256;
/// Idle connections older than this are closed rather than reused.
pub(super) const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// The idle keep-alive connections to one backend. A request takes one and drives it itself:
/// writes the request, reads the answer and its body, then puts the connection back once the
/// body has been read whole. hyper's pooled client instead runs each connection in a task of
/// its own, so every request hands over to that task and back, twice or more, often across
/// worker threads (a futex wake-up each).
#[derive(Default)]
pub struct ConnPool {
    /// Oldest first: taken from the end (the warmest), expired from the front.
    pub(super) idle: Mutex<Vec<(Instant, Box<Conn>)>>,
}

/// One HTTP/1 connection: the handle to send on and the connection state machine, which
/// whoever holds it polls. Always boxed: it is large (the TLS state is inline), and it moves
/// between the pool, the request's future and the body.
pub(super) struct Conn {
    pub(super) sender: http1::SendRequest<RequestBody>,
    pub(super) conn: http1::Connection<Io, RequestBody>,
    /// The connection future finished (closed, or failed): never poll or reuse it again.
    pub(super) closed: bool,
    /// What the connection and its body are polled with.
    pub(super) gate: Arc<Gate>,
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
pub(super) struct Gate {
    pub(super) task: futures::task::AtomicWaker,
    pub(super) state: AtomicU8,
}

pub(super) const POLLING: u8 = 1;
pub(super) const WOKEN: u8 = 2;
/// Rounds of polling again because the connection woke itself, before yielding to the
/// scheduler (tokio's cooperative budget, once spent, makes I/O wake and pend every time).
pub(super) const GATE_ROUNDS: usize = 4;

impl Gate {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Gate {
            task: futures::task::AtomicWaker::new(),
            state: AtomicU8::new(0),
        })
    }

    /// Polls `poll` with the gate's waker, again while it woke itself and is pending.
    pub(super) fn run<T>(
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
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Instant, Box<Conn>)>> {
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(super) fn checkout(&self) -> Option<Box<Conn>> {
        let mut idle = self.lock();
        while let Some((since, conn)) = idle.pop() {
            if since.elapsed() < IDLE_TIMEOUT && !conn.sender.is_closed() {
                return Some(conn);
            }
        }
        None
    }

    pub(super) fn checkin(&self, conn: Box<Conn>) {
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

pub(super) async fn connect(
    connector: &Connector,
    origin: &http::Uri,
) -> Result<Box<Conn>, SendError> {
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

pub(super) enum SendFailure {
    /// Nothing was written: the request, to send elsewhere.
    Unsent(Box<http::Request<RequestBody>>, String),
    /// The request may have reached the backend.
    Failed(String),
}
use SendFailure::{Failed, Unsent};

impl Conn {
    /// Polls the connection itself; notes when it finished.
    pub(super) fn drive(&mut self, cx: &mut Context<'_>) {
        if !self.closed && Pin::new(&mut self.conn).poll(cx).is_ready() {
            self.closed = true;
        }
    }

    /// Sends `request` and waits for the answer's head, driving the connection meanwhile.
    pub(super) async fn send(
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
