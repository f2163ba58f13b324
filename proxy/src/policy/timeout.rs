//! The request and per-try timeouts of one exchange, kept on a single timer.
//!
//! `request` bounds the whole exchange (every attempt and backoff) until response headers;
//! `per_try` bounds one attempt until its response headers. Rather than one timer for each (and
//! one more per backoff), the exchange owns one [`Timer`], re-armed at the nearer of the bounds
//! in force: each timer-wheel insert and removal takes the runtime's timer lock, while moving a
//! registered timer later is a single atomic update. When the bounds fall due together, the
//! attempt's goes first, as it did when the per-try timer sat inside the request timer. Once
//! the response headers are in, the same timer serves the body's idle timeout.
//!
//! The request body's idle bound ([`BodyIdle`]) runs at the same time as these, polled by the
//! upstream connection's task, so it keeps a timer of its own, from the same pool.

// Deadlines are built from policy durations and upstreams' Retry-After: `Instant + Duration`
// panics on overflow, so none may be written here unchecked.
#![cfg_attr(not(test), deny(clippy::arithmetic_side_effects))]

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use crate::core::errors::ProxyError;

/// An exchange's timer: none until first needed. Boxed so that, registered in the runtime's
/// timer wheel, it can still move on to the response body (for its idle timeout). When it came
/// from a [`TimerPool`] it goes back there when dropped.
#[derive(Debug, Default)]
pub struct Timer {
    sleep: Option<Pin<Box<Sleep>>>,
    pool: Option<Arc<TimerPool>>,
}

impl Timer {
    /// A timer from `pool` (a registered one when the pool has one), given back when dropped;
    /// with no pool, one made when first needed.
    pub fn from_pool(pool: Option<&Arc<TimerPool>>) -> Self {
        match pool {
            None => Self::default(),
            Some(pool) => Self {
                sleep: pool.take(),
                pool: Some(Arc::clone(pool)),
            },
        }
    }

    /// A timer taken from `pool` only when first armed (most request bodies never wait for
    /// their caller, so never need one), given back when dropped.
    pub fn lazy(pool: Arc<TimerPool>) -> Self {
        Self {
            sleep: None,
            pool: Some(pool),
        }
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        if let (Some(sleep), Some(pool)) = (self.sleep.take(), &self.pool) {
            pool.give(sleep);
        }
    }
}

/// Timers kept for reuse by the exchanges of one route target. A timer stays registered in the
/// runtime's timer wheel between exchanges, so the next exchange only moves its deadline: later
/// is one atomic update, where registering a new timer and removing it at the end each take
/// the runtime's timer-driver lock (this pool's lock is per target). A pooled timer whose old
/// deadline passes fires once, waking the task that last waited on it, which finds nothing to
/// do.
#[derive(Debug, Default)]
pub struct TimerPool {
    idle: Mutex<Vec<Pin<Box<Sleep>>>>,
}

/// Timers kept per target at most: about the requests in flight at once on it.
const POOL_MAX: usize = 1024;

impl TimerPool {
    fn take(&self) -> Option<Pin<Box<Sleep>>> {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
    }

    fn give(&self, sleep: Pin<Box<Sleep>>) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < POOL_MAX {
            idle.push(sleep);
        }
    }

    /// Timers waiting for reuse (for tests).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// Which bound ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// The request timeout, with its configured length: the exchange is over.
    Request(Duration),
    /// The per-try timeout, with its configured length: this attempt is over.
    PerTry(Duration),
}

impl From<Expired> for ProxyError {
    fn from(expired: Expired) -> Self {
        match expired {
            Expired::Request(limit) => Self::RequestTimeout(limit),
            Expired::PerTry(limit) => Self::PerTryTimeout(limit),
        }
    }
}

/// The timeouts of one exchange, started when it was.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    /// When the exchange must have its response headers, and the configured length.
    request: Option<(Instant, Duration)>,
    per_try: Option<Duration>,
}

impl Deadlines {
    /// Starts the request timeout at `now` (the caller's clock reading, shared with the other
    /// policies of the request).
    pub fn start(now: Instant, request: Option<Duration>, per_try: Option<Duration>) -> Self {
        Self {
            request: request.map(|limit| (deadline_after(now, limit), limit)),
            per_try,
        }
    }

    /// When the request timeout runs out, if there is one.
    pub fn request_deadline(&self) -> Option<Instant> {
        self.request.map(|(deadline, _)| deadline)
    }

    /// Runs one attempt, started at `now`, until it is done or a bound runs out. `timer` is the
    /// exchange's timer (`None` until first needed). Give a large future pinned by reference
    /// (`Pin<&mut _>`): this future holds `attempt` by value more than once.
    pub async fn attempt<F: Future>(
        &self,
        timer: &mut Timer,
        now: Instant,
        attempt: F,
    ) -> Result<F::Output, Expired> {
        let per_try = self
            .per_try
            .map(|limit| (deadline_after(now, limit), limit));
        let (deadline, expired) = match (self.request, per_try) {
            (None, None) => return Ok(attempt.await),
            (Some((request, limit)), None) => (request, Expired::Request(limit)),
            (None, Some((per_try, limit))) => (per_try, Expired::PerTry(limit)),
            (Some((request, request_limit)), Some((per_try, per_try_limit))) => {
                if per_try <= request {
                    (per_try, Expired::PerTry(per_try_limit))
                } else {
                    (request, Expired::Request(request_limit))
                }
            }
        };
        race(timer, deadline, expired, attempt).await
    }

    /// Waits `delay` before a retry, unless the request timeout runs out first (the only
    /// [`Expired`] it returns).
    pub async fn backoff(&self, timer: &mut Timer, delay: Duration) -> Result<(), Expired> {
        let until = deadline_after(Instant::now(), delay);
        match self.request {
            Some((request, limit)) if request <= until => {
                race(
                    timer,
                    request,
                    Expired::Request(limit),
                    std::future::pending(),
                )
                .await
            }
            // Here the timer firing is the end of the wait, not an expiry.
            _ => race(timer, until, (), std::future::pending::<()>())
                .await
                .or(Ok(())),
        }
    }
}

/// How far ahead a deadline too far to represent is put: about 30 years, as tokio does for a
/// sleep without end.
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

/// `now + after`, or a far-future instant when that is past what an `Instant` can hold (a
/// policy's or an upstream's huge duration): `Instant + Duration` panics on overflow, and a
/// panic aborts the proxy.
pub fn deadline_after(now: Instant, after: Duration) -> Instant {
    now.checked_add(after)
        .or_else(|| now.checked_add(FAR_FUTURE))
        .unwrap_or(now)
}

/// Runs `work` until it is done, or until `deadline`, then `expired`. The work is polled first,
/// so work finished when the deadline passes still counts (as with `tokio::time::timeout`).
async fn race<F: Future, E: Copy>(
    timer: &mut Timer,
    deadline: Instant,
    expired: E,
    work: F,
) -> Result<F::Output, E> {
    let sleep = arm(timer, deadline);
    let mut work = pin!(work);
    poll_fn(|cx| {
        if let Poll::Ready(output) = work.as_mut().poll(cx) {
            return Poll::Ready(Ok(output));
        }
        sleep.as_mut().poll(cx).map(|()| Err(expired))
    })
    .await
}

/// Sets `timer` to fire at `deadline`, taking one from its pool or making one if it has none yet
/// (a new one is registered on its first poll). Moving a registered timer later is an atomic
/// update, without the timer lock.
pub fn arm(timer: &mut Timer, deadline: Instant) -> &mut Pin<Box<Sleep>> {
    let Timer { sleep, pool } = timer;
    let sleep = match sleep {
        Some(sleep) => sleep,
        none => match pool.as_deref().and_then(TimerPool::take) {
            Some(pooled) => none.insert(pooled),
            None => return none.insert(Box::pin(tokio::time::sleep_until(deadline))),
        },
    };
    if sleep.deadline() != deadline {
        sleep.as_mut().reset(deadline);
    }
    sleep
}

/// `timeouts.request_body_idle`, compiled: the longest the caller may stay silent in the middle
/// of its request body, and the timers the bound is kept on (the target's, reused across
/// requests like the exchange's).
#[derive(Debug, Clone)]
pub struct BodyIdle {
    /// The longest silence allowed between two frames of the caller's body.
    pub limit: Duration,
    /// Where a body that has to wait gets its timer.
    pub timers: Arc<TimerPool>,
}

/// Shared by a request body bounded by [`BodyIdle`] and its exchange: says whether the body was
/// cut for the caller's silence. The attempt fails with the body, and the exchange must tell
/// that from an upstream failure (408, not 502): hyper reports the body's error as the cause on
/// an HTTP/1.1 connection, but on HTTP/2 only as a stream it reset.
#[derive(Debug, Clone)]
pub struct BodyStall(Arc<StallState>);

#[derive(Debug)]
struct StallState {
    limit: Duration,
    stalled: AtomicBool,
    /// The bound no longer applies (see [`BodyStall::lift`]).
    lifted: AtomicBool,
}

impl BodyStall {
    /// A signal for a body bounded by `limit`, not set.
    pub fn new(limit: Duration) -> Self {
        Self(Arc::new(StallState {
            limit,
            stalled: AtomicBool::new(false),
            lifted: AtomicBool::new(false),
        }))
    }

    /// The silence allowed.
    pub fn limit(&self) -> Duration {
        self.0.limit
    }

    /// Records that the body was cut.
    pub fn set(&self) {
        // Release/Acquire: read after the attempt's failure, which the cut body caused.
        self.0.stalled.store(true, Ordering::Release);
    }

    /// Lifts the bound: a gRPC stream whose response is flowing. A bidirectional stream's client
    /// may rightly say nothing for minutes while the server streams to it (a watch, a
    /// subscription); its liveness is the HTTP/2 keepalive's to check, not this bound's.
    pub fn lift(&self) {
        self.0.lifted.store(true, Ordering::Relaxed);
    }

    /// Whether [`Self::lift`] was called.
    pub fn lifted(&self) -> bool {
        self.0.lifted.load(Ordering::Relaxed)
    }

    /// The silence allowed, if the body was cut for exceeding it.
    pub fn stalled(&self) -> Option<Duration> {
        self.0
            .stalled
            .load(Ordering::Acquire)
            .then_some(self.0.limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Work that finishes after `after`, on its own timer.
    async fn work(after: Duration) -> &'static str {
        tokio::time::sleep(after).await;
        "done"
    }

    #[tokio::test(start_paused = true)]
    async fn no_bounds_waits_for_the_work() {
        let deadlines = Deadlines::start(Instant::now(), None, None);
        let mut timer = Timer::default();
        let done = deadlines
            .attempt(&mut timer, Instant::now(), work(3600 * 1000 * MS))
            .await;
        assert_eq!(done, Ok("done"));
        assert!(
            timer.sleep.is_none(),
            "no timer is made when nothing bounds the attempt"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn work_done_in_time_is_not_cut() {
        let deadlines = Deadlines::start(Instant::now(), Some(300 * MS), Some(200 * MS));
        let mut timer = Timer::default();
        let done = deadlines
            .attempt(&mut timer, Instant::now(), work(199 * MS))
            .await;
        assert_eq!(done, Ok("done"));
    }

    #[tokio::test(start_paused = true)]
    async fn per_try_cuts_each_attempt_and_request_cuts_the_exchange() {
        let started = Instant::now();
        let deadlines = Deadlines::start(Instant::now(), Some(500 * MS), Some(200 * MS));
        let mut timer = Timer::default();
        // Attempts 1 and 2 each end at their own 200 ms bound.
        for n in 1..=2 {
            let cut = deadlines
                .attempt(&mut timer, Instant::now(), work(1000 * MS))
                .await;
            assert_eq!(cut, Err(Expired::PerTry(200 * MS)));
            assert_eq!(started.elapsed(), n * 200 * MS);
        }
        // Attempt 3 starts at 400 ms: the request's 500 ms comes before its own 600 ms.
        let cut = deadlines
            .attempt(&mut timer, Instant::now(), work(1000 * MS))
            .await;
        assert_eq!(cut, Err(Expired::Request(500 * MS)));
        assert_eq!(started.elapsed(), 500 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn request_timeout_alone_cuts_at_its_deadline() {
        let started = Instant::now();
        let deadlines = Deadlines::start(Instant::now(), Some(300 * MS), None);
        let mut timer = Timer::default();
        let first = deadlines
            .attempt(&mut timer, Instant::now(), work(100 * MS))
            .await;
        assert_eq!(first, Ok("done"));
        let second = deadlines
            .attempt(&mut timer, Instant::now(), work(1000 * MS))
            .await;
        assert_eq!(second, Err(Expired::Request(300 * MS)));
        assert_eq!(started.elapsed(), 300 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn per_try_wins_a_tie_with_the_request_timeout() {
        let deadlines = Deadlines::start(Instant::now(), Some(200 * MS), Some(200 * MS));
        let mut timer = Timer::default();
        let cut = deadlines
            .attempt(&mut timer, Instant::now(), work(1000 * MS))
            .await;
        assert_eq!(cut, Err(Expired::PerTry(200 * MS)));
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_waits_its_delay_within_the_request_timeout() {
        let started = Instant::now();
        let deadlines = Deadlines::start(Instant::now(), Some(300 * MS), Some(100 * MS));
        let mut timer = Timer::default();
        let cut = deadlines
            .attempt(&mut timer, Instant::now(), work(1000 * MS))
            .await;
        assert_eq!(cut, Err(Expired::PerTry(100 * MS)));
        assert_eq!(deadlines.backoff(&mut timer, 50 * MS).await, Ok(()));
        assert_eq!(started.elapsed(), 150 * MS);
        // A backoff reaching past the request deadline ends the exchange at the deadline.
        let cut = deadlines.backoff(&mut timer, 500 * MS).await;
        assert_eq!(cut, Err(Expired::Request(300 * MS)));
        assert_eq!(started.elapsed(), 300 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_without_request_timeout_just_waits() {
        let started = Instant::now();
        let deadlines = Deadlines::start(Instant::now(), None, None);
        let mut timer = Timer::default();
        assert_eq!(deadlines.backoff(&mut timer, 25 * MS).await, Ok(()));
        assert_eq!(started.elapsed(), 25 * MS);
        assert_eq!(deadlines.backoff(&mut timer, 10 * MS).await, Ok(()));
        assert_eq!(started.elapsed(), 35 * MS);
    }

    #[test]
    fn deadlines_past_the_end_of_time_saturate() {
        let now = Instant::now();
        assert_eq!(deadline_after(now, 5 * MS), now + 5 * MS);
        assert_eq!(deadline_after(now, Duration::MAX), now + FAR_FUTURE);
        let huge = Duration::from_secs(i64::MAX as u64);
        assert!(deadline_after(now, huge) > now + 3600 * 1000 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn huge_bounds_and_backoffs_do_not_overflow() {
        let started = Instant::now();
        // Every bound at the largest duration there is: the work decides.
        let deadlines = Deadlines::start(Instant::now(), Some(Duration::MAX), Some(Duration::MAX));
        let mut timer = Timer::default();
        let done = deadlines
            .attempt(&mut timer, Instant::now(), work(10 * MS))
            .await;
        assert_eq!(done, Ok("done"));
        // A huge backoff under a short request timeout ends at the timeout.
        let deadlines = Deadlines::start(Instant::now(), Some(100 * MS), None);
        let cut = deadlines.backoff(&mut timer, Duration::MAX).await;
        assert_eq!(cut, Err(Expired::Request(100 * MS)));
        assert_eq!(started.elapsed(), 110 * MS);
        // Without one it is a (very) long wait, not a panic.
        let deadlines = Deadlines::start(Instant::now(), None, None);
        let wait = tokio::time::timeout(
            3600 * 1000 * MS,
            deadlines.backoff(&mut timer, Duration::MAX),
        )
        .await;
        assert!(wait.is_err(), "still waiting an hour later");
    }

    #[tokio::test(start_paused = true)]
    async fn a_timer_moved_earlier_still_fires_on_time() {
        let started = Instant::now();
        let deadlines = Deadlines::start(Instant::now(), None, Some(1000 * MS));
        let mut timer = Timer::default();
        assert_eq!(
            deadlines
                .attempt(&mut timer, Instant::now(), work(10 * MS))
                .await,
            Ok("done")
        );
        // The timer still waits for 1010 ms; the backoff moves it to 30 ms.
        assert_eq!(deadlines.backoff(&mut timer, 20 * MS).await, Ok(()));
        assert_eq!(started.elapsed(), 30 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pooled_timer_goes_back_and_bounds_the_next_exchange() {
        let pool = Arc::new(TimerPool::default());
        let deadlines = Deadlines::start(Instant::now(), None, Some(100 * MS));
        {
            let mut timer = Timer::from_pool(Some(&pool));
            let done = deadlines
                .attempt(&mut timer, Instant::now(), work(10 * MS))
                .await;
            assert_eq!(done, Ok("done"));
        }
        assert_eq!(pool.len(), 1, "the timer went back to the pool");
        // Taken again right away: its deadline moves later while it stays registered.
        let started = Instant::now();
        let mut timer = Timer::from_pool(Some(&pool));
        assert_eq!(pool.len(), 0);
        let cut = deadlines
            .attempt(&mut timer, Instant::now(), work(1000 * MS))
            .await;
        assert_eq!(cut, Err(Expired::PerTry(100 * MS)));
        assert_eq!(started.elapsed(), 100 * MS);
        drop(timer);
        // Its old deadline passed (it fired) while it waited in the pool: still a good timer.
        tokio::time::sleep(500 * MS).await;
        let started = Instant::now();
        let mut timer = Timer::from_pool(Some(&pool));
        let cut = deadlines
            .attempt(&mut timer, Instant::now(), work(1000 * MS))
            .await;
        assert_eq!(cut, Err(Expired::PerTry(100 * MS)));
        assert_eq!(started.elapsed(), 100 * MS);
        let done = deadlines
            .attempt(&mut timer, Instant::now(), work(50 * MS))
            .await;
        assert_eq!(
            done,
            Ok("done"),
            "a fired timer moved on does not cut early"
        );
    }
}
