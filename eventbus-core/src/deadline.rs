//! A deadline that costs nothing for work that finishes at once.
//!
//! `tokio::time::timeout` reads the clock and sets up a timer entry as soon as it is created. Most handler
//! calls, and most waits for room on the publish path (an in-memory topic's backlog, the NATS client's send
//! queue), complete at their first poll, so [`LazyTimeout`] starts its timer only once the work has to wait: its
//! limit runs from that first poll. (Publish acks need none: the window's collector keeps one timer for all.)
//!
//! ```
//! use std::time::Duration;
//! use eventbus_core::deadline::{lazy_timeout, TimedOut};
//!
//! # #[tokio::main] async fn main() {
//! assert_eq!(lazy_timeout(Duration::from_secs(1), async { 7 }).await, Ok(7));
//! let stuck = std::future::pending::<()>();
//! assert_eq!(lazy_timeout(Duration::from_millis(10), stuck).await, Err(TimedOut));
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Sleep;

/// The work did not finish within its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the work did not finish within its limit")]
pub struct TimedOut;

pin_project! {
    /// Runs `work` for at most `limit` from its first poll; see [`lazy_timeout`].
    #[must_use = "futures do nothing unless polled"]
    pub struct LazyTimeout<F> {
        #[pin]
        work: F,
        limit: Duration,
        #[pin]
        timer: Option<Sleep>,
    }
}

/// Runs `work` for at most `limit` from its first poll, starting a timer only if that poll does not finish it.
pub fn lazy_timeout<F: Future>(limit: Duration, work: F) -> LazyTimeout<F> {
    LazyTimeout { work, limit, timer: None }
}

impl<F: Future> Future for LazyTimeout<F> {
    type Output = Result<F::Output, TimedOut>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Poll::Ready(output) = this.work.poll(cx) {
            return Poll::Ready(Ok(output));
        }
        if this.timer.is_none() {
            this.timer.set(Some(tokio::time::sleep(*this.limit)));
        }
        match this.timer.as_pin_mut().map(|timer| timer.poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(Err(TimedOut)),
            _ => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn finished_work_needs_no_timer_and_slow_work_times_out() {
        assert_eq!(lazy_timeout(Duration::ZERO, std::future::ready(7)).await, Ok(7));
        let started = tokio::time::Instant::now();
        let slow = tokio::time::sleep(Duration::from_secs(10));
        assert_eq!(lazy_timeout(Duration::from_secs(2), slow).await, Err(TimedOut));
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        let quick = tokio::time::sleep(Duration::from_secs(1));
        assert_eq!(lazy_timeout(Duration::from_secs(2), quick).await, Ok(()));
    }
}
