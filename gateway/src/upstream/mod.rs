//! How bytes reach a backend: HTTP/1 keep-alive connections to URL backends (TCP, plain or TLS,
//! or a local Unix socket), each driven by the request using it, and — for rigs — an HTTP/2
//! connection the rig opened to us. Both answer with the same `Response<UpstreamBody>`, so
//! dispatch and streaming do not care which one carried a request.

mod body;
mod client;
mod connector;
mod pool;

pub use body::*;
pub use client::*;
pub use connector::*;
pub use pool::*;

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
