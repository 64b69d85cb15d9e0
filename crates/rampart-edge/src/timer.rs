//! A timer for deadlines that move on with every request but almost never fire.
//!
//! A tokio [`Sleep`] registers the task's waker again on every poll and takes the
//! timer wheel's lock, or updates its entry, on every reset: a handful of locked
//! instructions each time. A connection that serves thousands of requests with a
//! 60-second timeout each needs none of that: its timer can stay armed at an
//! earlier deadline, and when that one fires, the deadline wanted by then is
//! checked and the timer moved to it. [`LazyTimer`] does this, and polls its
//! `Sleep` only when the last poll's registration may have lapsed.
//!
//! A `LazyTimer` belongs to one task: a registration made by a poll from this task
//! is what a later poll relies on.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::time::{Instant, Sleep};

pub struct LazyTimer {
    /// Made by the first poll: a timer never waited on (a connection closed after
    /// one request that was answered at once) costs no allocation.
    sleep: Option<Pin<Box<Sleep>>>,
    /// The deadline asked for; the sleep may be armed earlier, never later.
    want: Instant,
    /// The sleep holds this task's waker for its current deadline: polled
    /// `Pending` since it was last reset, and not fired since.
    registered: bool,
}

impl LazyTimer {
    pub fn new(at: Instant) -> Self {
        LazyTimer {
            sleep: None,
            want: at,
            registered: false,
        }
    }

    /// Expire at `at` instead of the deadline set before. A later deadline keeps
    /// the sleep as it is (it fires early and is moved on then); an earlier one,
    /// or a sleep that fired already, is reset.
    pub fn set(&mut self, at: Instant) {
        self.want = at;
        if let Some(sleep) = &mut self.sleep
            && (sleep.deadline() > at || sleep.is_elapsed())
        {
            sleep.as_mut().reset(at);
            self.registered = false;
        }
    }

    /// `Ready` once the deadline asked for has passed.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let want = self.want;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(want)));
        loop {
            // Registered and not fired: the waker stored by the last poll still
            // stands, and nothing has changed (one plain load).
            if self.registered && !sleep.is_elapsed() {
                return Poll::Pending;
            }
            match sleep.as_mut().poll(cx) {
                Poll::Pending => {
                    self.registered = true;
                    return Poll::Pending;
                }
                Poll::Ready(()) => {
                    self.registered = false;
                    if sleep.deadline() >= want {
                        return Poll::Ready(());
                    }
                    // Fired at an earlier deadline: move on to the one asked for.
                    sleep.as_mut().reset(want);
                }
            }
        }
    }

    /// Resolves once the deadline asked for has passed.
    pub async fn expired(&mut self) {
        std::future::poll_fn(|cx| self.poll_expired(cx)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MS: Duration = Duration::from_millis(1);

    /// One poll with the test task's own waker (a registration relies on it).
    async fn poll_once(t: &mut LazyTimer) -> Poll<()> {
        std::future::poll_fn(|cx| Poll::Ready(t.poll_expired(cx))).await
    }

    #[tokio::test(start_paused = true)]
    async fn fires_at_the_deadline_asked_for_not_an_earlier_one() {
        let start = Instant::now();
        let mut t = LazyTimer::new(start + 10 * MS);
        assert!(poll_once(&mut t).await.is_pending());
        // Moved later: the armed sleep is kept and fires at 10 ms, which is early.
        t.set(start + 50 * MS);
        t.expired().await;
        assert!(start.elapsed() >= 50 * MS, "fired after {:?}", start.elapsed());
        assert!(start.elapsed() < 60 * MS, "fired after {:?}", start.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_deadline_takes_effect() {
        let start = Instant::now();
        let mut t = LazyTimer::new(start + 500 * MS);
        assert!(poll_once(&mut t).await.is_pending());
        t.set(start + 20 * MS);
        t.expired().await;
        let took = start.elapsed();
        assert!((20 * MS..30 * MS).contains(&took), "fired after {took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn set_after_firing_arms_again() {
        let start = Instant::now();
        let mut t = LazyTimer::new(start + 5 * MS);
        t.expired().await;
        assert!(poll_once(&mut t).await.is_ready(), "still expired until set again");
        t.set(Instant::now() + 30 * MS);
        assert!(poll_once(&mut t).await.is_pending());
        t.expired().await;
        let took = start.elapsed();
        assert!((35 * MS..45 * MS).contains(&took), "fired after {took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_set_before_the_first_poll_is_the_one_armed() {
        let start = Instant::now();
        let mut t = LazyTimer::new(start + 500 * MS);
        t.set(start + 20 * MS);
        t.set(start + 30 * MS);
        t.expired().await;
        let took = start.elapsed();
        assert!((30 * MS..40 * MS).contains(&took), "fired after {took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_moved_on_by_many_requests_fires_once_past_the_last() {
        let start = Instant::now();
        let mut t = LazyTimer::new(start + 40 * MS);
        // A request every 10 ms, each moving the deadline 40 ms on from its start.
        for _ in 0..10 {
            t.set(Instant::now() + 40 * MS);
            assert!(poll_once(&mut t).await.is_pending());
            tokio::time::sleep(10 * MS).await;
        }
        // The sleep fired at 40 ms (early) while requests went on; the last deadline
        // (set at 90 ms) is 130 ms.
        t.expired().await;
        let took = start.elapsed();
        assert!((130 * MS..140 * MS).contains(&took), "fired after {took:?}");
    }
}
