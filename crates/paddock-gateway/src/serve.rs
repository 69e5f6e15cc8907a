//! The HTTP server loop: axum's router on hyper's HTTP/1 and HTTP/2 connections (with
//! upgrades, for the agents' WebSockets), as `axum::serve` makes them, with two additions:
//! `TCP_NODELAY` on every connection, and [`PollAgain`] around each connection's future.
//!
//! Shutdown: the loop stops accepting when `stop` fires; each connection then finishes the
//! request it is serving and closes ([`graceful_shutdown`]); [`serve`] returns once every
//! connection has closed.
//!
//! [`graceful_shutdown`]: hyper_util::server::conn::auto::UpgradeableConnection::graceful_shutdown

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Serves `app` on `listener` until `stop` fires, then until the open connections close.
pub(crate) async fn serve(listener: tokio::net::TcpListener, app: Router, stop: CancellationToken) {
    let connections = TaskTracker::new();
    loop {
        let (tcp, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                // The peer gave up before we took it: nothing wrong here.
                Err(e) if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::ConnectionRefused
                ) => continue,
                Err(e) => {
                    // Out of descriptors and the like: pause, as axum::serve does, and retry.
                    tracing::error!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        // Without it, a small frame written while the previous one is unacknowledged (a
        // `dispatch` right after a `result_ack`) waits for the peer's delayed ACK, 20-40 ms on
        // Linux (issue 6 benchmark).
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY: {e}");
        }
        let service = TowerToHyperService::new(app.clone());
        let stop = stop.clone();
        connections.spawn(PollAgain::new(async move {
            let builder = Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                done = conn.as_mut() => {
                    if let Err(e) = done {
                        tracing::trace!("connection ended: {e}");
                    }
                    return;
                }
                () = stop.cancelled() => conn.as_mut().graceful_shutdown(),
            }
            if let Err(e) = conn.await {
                tracing::trace!("connection ended: {e}");
            }
        }));
    }
    // New connections are refused at once while the open ones finish.
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// Most polls of the inner future in one turn of [`PollAgain`], after which a future that
/// keeps waking itself is left to the runtime's scheduling like any other (a request with a
/// body takes two or three).
const MAX_POLLS_PER_TURN: usize = 4;

/// Polls a future again at once when it woke its own task while being polled, instead of
/// leaving that wake-up to the runtime.
///
/// hyper's HTTP/1 connection wakes its own task on every request with a body: the handler's
/// first read of the body tells the connection, which is the task being polled, that the body
/// is wanted. A task woken while it runs is re-queued by tokio as a yield, and a yield wakes
/// a parked worker thread (a futex wake and a cross-CPU interrupt) that then mostly finds
/// nothing to do: on these 2-CPU VMs that cost the submit-and-wait round trip tens of
/// microseconds. Here the wake-up is caught and the connection polled again in the same
/// turn, which is what the yield would have led to.
struct PollAgain<F> {
    inner: Pin<Box<F>>,
    flag: Arc<Flag>,
    waker: Waker,
}

/// The waker [`PollAgain`] polls its future with.
#[derive(Default)]
struct Flag {
    /// The inner future is being polled.
    polling: AtomicBool,
    /// It was woken during that poll.
    woken: AtomicBool,
    /// The task's own waker, for wake-ups between polls.
    outer: Mutex<Option<Waker>>,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.polling.load(Ordering::SeqCst) {
            self.woken.store(true, Ordering::SeqCst);
            // Still polling after `woken` was set: the poller reads `woken` once its poll
            // ends, and polls again. Otherwise it may have looked already: wake the task.
            if self.polling.load(Ordering::SeqCst) {
                return;
            }
        }
        let outer = self
            .outer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if let Some(w) = outer {
            w.wake();
        }
    }
}

impl<F: Future<Output = ()>> PollAgain<F> {
    fn new(inner: F) -> PollAgain<F> {
        let flag = Arc::new(Flag::default());
        PollAgain {
            inner: Box::pin(inner),
            waker: Waker::from(flag.clone()),
            flag,
        }
    }
}

impl<F: Future<Output = ()>> Future for PollAgain<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        {
            let mut outer = this
                .flag
                .outer
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !outer.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *outer = Some(cx.waker().clone());
            }
        }
        let mut inner_cx = Context::from_waker(&this.waker);
        for _ in 0..MAX_POLLS_PER_TURN {
            this.flag.woken.store(false, Ordering::SeqCst);
            this.flag.polling.store(true, Ordering::SeqCst);
            let done = this.inner.as_mut().poll(&mut inner_cx);
            this.flag.polling.store(false, Ordering::SeqCst);
            if done.is_ready() {
                return Poll::Ready(());
            }
            if !this.flag.woken.load(Ordering::SeqCst) {
                return Poll::Pending;
            }
            // Woken because the task's budget ran out (tokio's cooperative scheduling): that
            // wake-up is the runtime's to schedule.
            if !tokio::task::coop::has_budget_remaining() {
                break;
            }
        }
        // Woke itself on every poll, or out of budget: take a turn in the queue like any task.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// A future that wakes itself `n` times while being polled, then completes; counts
    /// its polls.
    struct SelfWaking {
        left: usize,
        polls: Arc<AtomicUsize>,
    }

    impl Future for SelfWaking {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            if self.left == 0 {
                return Poll::Ready(());
            }
            self.left -= 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    /// Counts the wake-ups of the task that polls [`PollAgain`].
    #[derive(Default)]
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn poll_once<F: Future<Output = ()>>(f: &mut PollAgain<F>, task: &Arc<Count>) -> Poll<()> {
        let waker = Waker::from(task.clone());
        Pin::new(f).poll(&mut Context::from_waker(&waker))
    }

    /// A wake-up given during the poll is absorbed: the future is polled again in the same
    /// turn, and the task is not woken.
    #[test]
    fn self_wakes_are_polled_again_in_the_same_turn() {
        let polls = Arc::new(AtomicUsize::new(0));
        let mut f = PollAgain::new(SelfWaking {
            left: 3,
            polls: polls.clone(),
        });
        let task = Arc::new(Count::default());
        assert_eq!(poll_once(&mut f, &task), Poll::Ready(()));
        assert_eq!(polls.load(Ordering::SeqCst), 4);
        assert_eq!(task.0.load(Ordering::SeqCst), 0, "the task was never woken");
    }

    /// A future that wakes itself on every poll gets at most MAX_POLLS_PER_TURN polls a
    /// turn, then its task is woken to take its turn in the queue.
    #[test]
    fn a_future_that_always_wakes_itself_yields_to_the_runtime() {
        let polls = Arc::new(AtomicUsize::new(0));
        let mut f = PollAgain::new(SelfWaking {
            left: usize::MAX,
            polls: polls.clone(),
        });
        let task = Arc::new(Count::default());
        assert_eq!(poll_once(&mut f, &task), Poll::Pending);
        assert_eq!(polls.load(Ordering::SeqCst), MAX_POLLS_PER_TURN);
        assert_eq!(task.0.load(Ordering::SeqCst), 1);
    }

    /// A wake-up between polls (the usual kind: I/O, a channel) reaches the task.
    #[test]
    fn wakes_between_polls_reach_the_task() {
        let stash: Arc<Mutex<Option<Waker>>> = Arc::default();
        let s = stash.clone();
        let mut first = true;
        let mut f = PollAgain::new(std::future::poll_fn(move |cx| {
            if first {
                first = false;
                *s.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                    Some(cx.waker().clone());
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        }));
        let task = Arc::new(Count::default());
        assert_eq!(poll_once(&mut f, &task), Poll::Pending);
        assert_eq!(task.0.load(Ordering::SeqCst), 0);
        let w = stash
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        w.expect("the inner future kept its waker").wake();
        assert_eq!(task.0.load(Ordering::SeqCst), 1, "the task was woken");
        assert_eq!(poll_once(&mut f, &task), Poll::Ready(()));
    }
}
