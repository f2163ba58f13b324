//! A per-service circuit breaker with a concurrency limit.
//!
//! Closed: requests pass; the breaker opens after `consecutive_failures` failures in a row, or
//! when over the sliding `failure_rate.window` at least `min_requests` outcomes were seen and
//! the failure fraction reached `threshold`. Open: every request is refused for the open time
//! (`open_for` at first). HalfOpen: up to `half_open_requests` real requests go through at
//! once as probes; a probe success closes the breaker, a probe failure reopens it with the open
//! time doubled up to `max_open_for`.
//!
//! Every admitted request holds a [`BreakerPermit`] that reports its [`Outcome`]. Outcomes are
//! tagged with the state period ("generation") the permit was issued in, and only count in that
//! period: a request admitted while Closed that finishes after the breaker opened changes
//! nothing. The state sits behind a per-breaker mutex held for a few instructions (never across
//! an await, never while logging); the concurrency slots are a lone atomic. Time is
//! [`tokio::time::Instant`], so tests run on paused time.

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use outrider_config::CircuitBreaker as BreakerConfig;
use prometheus::{IntCounter, IntGauge};
use tokio::time::Instant;

/// The `state` label values of the breaker metrics, in the order [`BreakerMetrics`] indexes
/// them.
pub const STATE_LABELS: [&str; 3] = ["closed", "open", "half_open"];

/// The exported state of one service's circuit breaker.
#[derive(Debug, Clone)]
pub struct BreakerMetrics {
    /// 1 for the current state, 0 for the others: closed, open, half-open.
    state: [IntGauge; 3],
    /// Transitions into each state.
    transitions: [IntCounter; 3],
    /// What keeps these series registered while the breaker lives (the service's metric
    /// handles); opaque here, where metrics are not known.
    _series: Option<std::sync::Arc<dyn std::any::Any + Send + Sync>>,
}

impl BreakerMetrics {
    /// Handles for one breaker: a gauge and a counter per state, in [`STATE_LABELS`] order.
    /// Built by `Metrics::breaker`, which owns the registry.
    pub fn new(state: [IntGauge; 3], transitions: [IntCounter; 3]) -> Self {
        Self {
            state,
            transitions,
            _series: None,
        }
    }

    /// The same handles, keeping `series` (whatever owns their registration) alive with them.
    pub fn holding(mut self, series: std::sync::Arc<dyn std::any::Any + Send + Sync>) -> Self {
        self._series = Some(series);
        self
    }

    fn index(state: BreakerState) -> usize {
        match state {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }

    /// Sets the state gauge to `state`.
    pub fn show(&self, state: BreakerState) {
        let current = Self::index(state);
        for (i, gauge) in self.state.iter().enumerate() {
            gauge.set(i64::from(i == current));
        }
    }

    /// Counts a transition into `to`.
    pub fn count(&self, to: BreakerState) {
        self.transitions[Self::index(to)].inc();
    }
}

/// Buckets of the failure-rate window: the window slides in steps of `window / BUCKETS`.
const BUCKETS: usize = 10;

/// The state of a breaker as seen from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests pass; outcomes are counted.
    Closed,
    /// Requests are refused until the open time has passed.
    Open,
    /// A limited number of probe requests pass; their outcome decides the next state.
    HalfOpen,
}

impl BreakerState {
    /// `closed`, `open` or `half_open` (as in the metrics), for logs.
    pub fn as_str(self) -> &'static str {
        STATE_LABELS[BreakerMetrics::index(self)]
    }
}

/// How a request admitted by the breaker ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered acceptably.
    Success,
    /// The upstream failed (what counts as a failure is the caller's decision).
    Failure,
}

/// Why the breaker refused a request. Refused requests never reach the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BreakerRejection {
    /// The breaker is open, or half-open with every probe already out.
    #[error("circuit open")]
    Open,
    /// `max_concurrent_requests` permits are outstanding.
    #[error("too many concurrent requests")]
    ConcurrencyLimit,
}

/// The circuit breaker and concurrency limit of one service. Built once per policy reload and
/// shared through an `Arc`.
#[derive(Debug)]
pub struct CircuitBreaker {
    name: Arc<str>,
    config: BreakerConfig,
    /// Origin of the nanosecond clock used for all state below.
    base: Instant,
    /// Width of one failure-rate bucket, in nanoseconds (at least 1).
    bucket_nanos: u64,
    /// Permits outstanding; only maintained when `max_concurrent_requests` is set.
    in_flight: AtomicU32,
    /// State transitions so far, readable without the lock.
    transitions: AtomicU64,
    inner: Mutex<Inner>,
    /// State gauge and transition counters, when exported.
    metrics: Option<BreakerMetrics>,
}

#[derive(Debug)]
struct Inner {
    phase: Phase,
    /// Incremented on every transition; permits carry the generation they were issued in.
    generation: u64,
    /// The open time the next probe failure doubles; back to `open_for` on close.
    open_for: Duration,
    /// Failures in a row while Closed.
    consecutive: u32,
    /// Ring of outcome counts for the failure rate, indexed by `bucket index % BUCKETS`.
    window: [Bucket; BUCKETS],
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    Closed,
    /// Open until this many nanoseconds after `base`.
    Open {
        until: u64,
    },
    /// Probes currently out.
    HalfOpen {
        probes: u32,
    },
}

impl Phase {
    fn state(self) -> BreakerState {
        match self {
            Phase::Closed => BreakerState::Closed,
            Phase::Open { .. } => BreakerState::Open,
            Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Which time slot (`now / bucket_nanos`) these counts belong to.
    index: u64,
    successes: u32,
    failures: u32,
}

/// A state change, logged once the lock is released.
#[derive(Debug, Clone, Copy)]
struct Transition {
    from: BreakerState,
    to: BreakerState,
}

impl CircuitBreaker {
    /// Builds a closed breaker for the service `name` (used in logs) from `config`.
    pub fn new(name: Arc<str>, config: &BreakerConfig) -> Self {
        let bucket_nanos = config
            .failure_rate
            .as_ref()
            .map_or(1, |rate| nanos(rate.window.get()) / BUCKETS as u64)
            .max(1);
        Self {
            name,
            config: config.clone(),
            base: Instant::now(),
            bucket_nanos,
            in_flight: AtomicU32::new(0),
            transitions: AtomicU64::new(0),
            inner: Mutex::new(Inner {
                phase: Phase::Closed,
                generation: 0,
                open_for: config.open_for.get(),
                consecutive: 0,
                window: [Bucket::default(); BUCKETS],
            }),
            metrics: None,
        }
    }

    /// Exports this breaker's state and transitions through `metrics` from now on.
    pub fn with_metrics(mut self, metrics: BreakerMetrics) -> Self {
        metrics.show(BreakerState::Closed);
        self.metrics = Some(metrics);
        self
    }

    /// The service this breaker protects.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// The settings this breaker was built from, so a reload can keep the breaker (and its
    /// state) when they did not change.
    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    /// Admits a request or refuses it. Refusals never reach the upstream.
    ///
    /// The concurrency limit is checked first, without the lock, so a saturated service sheds
    /// load cheaply; a request refused for either reason takes no slot and no probe.
    pub fn try_acquire(self: &Arc<Self>) -> Result<BreakerPermit, BreakerRejection> {
        let holds_slot = self.take_slot()?;
        let (admitted, transition) = {
            let mut inner = self.lock();
            // Only an Open breaker looks at the clock (to half-open).
            let transition = match inner.phase {
                Phase::Closed => None,
                _ => {
                    let now = self.now();
                    self.refresh(&mut inner, now)
                }
            };
            let probe_limit = self.config.half_open_requests.max(1);
            let admitted = match &mut inner.phase {
                Phase::Closed => Ok(false),
                Phase::HalfOpen { probes } if *probes < probe_limit => {
                    *probes += 1;
                    Ok(true)
                }
                Phase::HalfOpen { .. } | Phase::Open { .. } => Err(BreakerRejection::Open),
            };
            (admitted.map(|probe| (probe, inner.generation)), transition)
        };
        self.log(transition);
        match admitted {
            Ok((probe, generation)) => Ok(BreakerPermit {
                breaker: Arc::clone(self),
                generation,
                probe,
                holds_slot,
                settled: false,
            }),
            Err(rejection) => {
                if holds_slot {
                    self.release_slot();
                }
                Err(rejection)
            }
        }
    }

    /// The current state. An Open breaker whose open time has passed reports (and becomes)
    /// HalfOpen.
    pub fn state(&self) -> BreakerState {
        let (state, transition) = {
            let mut inner = self.lock();
            let now = self.now();
            let transition = self.refresh(&mut inner, now);
            (inner.phase.state(), transition)
        };
        self.log(transition);
        state
    }

    /// Total state transitions since the breaker was built, for metrics. Open to HalfOpen is
    /// counted when first observed (by [`CircuitBreaker::try_acquire`] or
    /// [`CircuitBreaker::state`]), not by a timer.
    pub fn transitions(&self) -> u64 {
        self.transitions.load(Ordering::Relaxed)
    }

    fn now(&self) -> u64 {
        nanos(Instant::now().saturating_duration_since(self.base))
    }

    /// The state is plain data with no invariant a panic could break midway, so a poisoned
    /// lock is still usable.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn take_slot(&self) -> Result<bool, BreakerRejection> {
        let Some(max) = self.config.max_concurrent_requests else {
            return Ok(false);
        };
        // Relaxed: the counter guards no other data.
        self.in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .map(|_| true)
            .map_err(|_| BreakerRejection::ConcurrencyLimit)
    }

    fn release_slot(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Moves an Open breaker whose time is up to HalfOpen.
    fn refresh(&self, inner: &mut Inner, now: u64) -> Option<Transition> {
        match inner.phase {
            Phase::Open { until } if now >= until => {
                Some(self.transition(inner, Phase::HalfOpen { probes: 0 }))
            }
            _ => None,
        }
    }

    fn transition(&self, inner: &mut Inner, to: Phase) -> Transition {
        let from = inner.phase.state();
        inner.phase = to;
        // A new generation makes every permit issued before this point stale.
        inner.generation += 1;
        self.transitions.fetch_add(1, Ordering::Relaxed);
        Transition {
            from,
            to: to.state(),
        }
    }

    fn open(&self, inner: &mut Inner, now: u64) -> Transition {
        let until = now.saturating_add(nanos(inner.open_for));
        self.transition(inner, Phase::Open { until })
    }

    fn log(&self, transition: Option<Transition>) {
        if let Some(Transition { from, to }) = transition {
            tracing::info!(service = %self.name, from = from.as_str(), to = to.as_str(), "circuit breaker transition");
            if let Some(metrics) = &self.metrics {
                metrics.show(to);
                metrics.count(to);
            }
        }
    }

    /// Applies the outcome of a permit issued in `generation`.
    fn settle(&self, generation: u64, outcome: Outcome) {
        let transition = {
            let mut inner = self.lock();
            if inner.generation != generation {
                // Issued in an earlier period (e.g. Closed before the breaker opened): the
                // decision it could have influenced was already taken.
                return;
            }
            let now = self.now();
            match (inner.phase, outcome) {
                (Phase::Closed, Outcome::Success) => {
                    inner.consecutive = 0;
                    self.count(&mut inner, now, Outcome::Success);
                    None
                }
                (Phase::Closed, Outcome::Failure) => {
                    inner.consecutive = inner.consecutive.saturating_add(1);
                    self.count(&mut inner, now, Outcome::Failure);
                    if self.tripped(&inner, now) {
                        inner.open_for = self.config.open_for.get();
                        Some(self.open(&mut inner, now))
                    } else {
                        None
                    }
                }
                (Phase::HalfOpen { .. }, Outcome::Success) => {
                    inner.consecutive = 0;
                    inner.window = [Bucket::default(); BUCKETS];
                    inner.open_for = self.config.open_for.get();
                    Some(self.transition(&mut inner, Phase::Closed))
                }
                (Phase::HalfOpen { .. }, Outcome::Failure) => {
                    // Back off: a service that is still failing gets longer to recover.
                    let cap = self
                        .config
                        .max_open_for
                        .get()
                        .max(self.config.open_for.get());
                    inner.open_for = inner.open_for.saturating_mul(2).min(cap);
                    Some(self.open(&mut inner, now))
                }
                // No permit is issued while Open, so none can match its generation.
                (Phase::Open { .. }, _) => None,
            }
        };
        self.log(transition);
    }

    /// Frees the probe of a HalfOpen permit dropped without an outcome, so another request can
    /// probe instead of the breaker staying half-open forever.
    fn release_probe(&self, generation: u64) {
        let mut inner = self.lock();
        if inner.generation != generation {
            return;
        }
        if let Phase::HalfOpen { probes } = &mut inner.phase {
            *probes = probes.saturating_sub(1);
        }
    }

    /// Adds an outcome to the failure-rate window (if one is configured).
    fn count(&self, inner: &mut Inner, now: u64, outcome: Outcome) {
        if self.config.failure_rate.is_none() {
            return;
        }
        let index = now / self.bucket_nanos;
        let bucket = &mut inner.window[(index % BUCKETS as u64) as usize];
        if bucket.index < index {
            // The slot last held a bucket that has slid out of the window.
            *bucket = Bucket {
                index,
                ..Bucket::default()
            };
        }
        match outcome {
            Outcome::Success => bucket.successes = bucket.successes.saturating_add(1),
            Outcome::Failure => bucket.failures = bucket.failures.saturating_add(1),
        }
    }

    /// Whether the Closed breaker must open now.
    fn tripped(&self, inner: &Inner, now: u64) -> bool {
        if let Some(limit) = self.config.consecutive_failures {
            if inner.consecutive >= limit.max(1) {
                return true;
            }
        }
        let Some(rate) = &self.config.failure_rate else {
            return false;
        };
        let index = now / self.bucket_nanos;
        let (mut total, mut failures) = (0u32, 0u32);
        for bucket in &inner.window {
            if index.saturating_sub(bucket.index) < BUCKETS as u64 {
                total = total
                    .saturating_add(bucket.successes)
                    .saturating_add(bucket.failures);
                failures = failures.saturating_add(bucket.failures);
            }
        }
        total >= rate.min_requests.max(1)
            && f64::from(failures) / f64::from(total) >= rate.threshold
    }
}

/// Admission by a [`CircuitBreaker`]: owns one concurrency slot until dropped. Report how the
/// request ended with [`BreakerPermit::record`]; a permit dropped without a record (the client
/// went away, the request was cancelled) counts as neither success nor failure and just
/// releases its slot (and its probe, when half-open).
#[must_use = "dropping a permit releases it without recording an outcome"]
pub struct BreakerPermit {
    breaker: Arc<CircuitBreaker>,
    generation: u64,
    probe: bool,
    holds_slot: bool,
    /// An outcome was recorded; Drop must not release the probe again.
    settled: bool,
}

impl BreakerPermit {
    /// Records how the request ended and releases the permit.
    pub fn record(mut self, outcome: Outcome) {
        self.settled = true;
        self.breaker.settle(self.generation, outcome);
    }
}

impl Drop for BreakerPermit {
    fn drop(&mut self) {
        // Not a second place where an outcome is settled (that is the exchange's completion,
        // `io::completion`): a permit without an outcome to record (the caller left before a
        // verdict, a failure that says nothing of the upstream, an exchange dropped mid-way)
        // must still give back its slot and probe, or the breaker would leak them.
        if self.probe && !self.settled {
            self.breaker.release_probe(self.generation);
        }
        if self.holds_slot {
            self.breaker.release_slot();
        }
    }
}

impl fmt::Debug for BreakerPermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerPermit")
            .field("service", &self.breaker.name)
            .field("generation", &self.generation)
            .field("probe", &self.probe)
            .finish_non_exhaustive()
    }
}

/// A duration in nanoseconds, saturating (u64 nanoseconds is 584 years).
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use outrider_config::{Duration as ConfigDuration, FailureRate};
    use tokio::time::advance;

    use super::*;

    const OPEN_FOR: Duration = Duration::from_secs(10);

    fn config() -> BreakerConfig {
        BreakerConfig {
            consecutive_failures: Some(3),
            failure_rate: None,
            open_for: ConfigDuration(OPEN_FOR),
            half_open_requests: 1,
            max_open_for: ConfigDuration::from_secs(60),
            max_concurrent_requests: None,
            max_pending_requests: None,
        }
    }

    fn breaker(config: BreakerConfig) -> Arc<CircuitBreaker> {
        Arc::new(CircuitBreaker::new("svc".into(), &config))
    }

    fn record(b: &Arc<CircuitBreaker>, outcome: Outcome) {
        match b.try_acquire() {
            Ok(permit) => permit.record(outcome),
            Err(e) => panic!("refused while recording {outcome:?}: {e}"),
        }
    }

    fn record_n(b: &Arc<CircuitBreaker>, n: usize, outcome: Outcome) {
        for _ in 0..n {
            record(b, outcome);
        }
    }

    /// Trips a breaker configured with `consecutive_failures: 3`.
    fn trip(b: &Arc<CircuitBreaker>) {
        record_n(b, 3, Outcome::Failure);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn breaker_and_permit_are_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<CircuitBreaker>();
        assert_send_sync::<BreakerPermit>();
    }

    #[test]
    fn config_is_kept_for_reload_comparison() {
        assert_eq!(breaker(config()).config(), &config());
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_and_rejects() {
        let b = breaker(config());
        record_n(&b, 2, Outcome::Failure);
        assert_eq!(b.state(), BreakerState::Closed);
        record(&b, Outcome::Failure);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.transitions(), 1);
        assert_eq!(b.try_acquire().err(), Some(BreakerRejection::Open));
        advance(OPEN_FOR - Duration::from_millis(1)).await;
        assert_eq!(b.try_acquire().err(), Some(BreakerRejection::Open));
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_resets_the_consecutive_count() {
        let b = breaker(config());
        record_n(&b, 2, Outcome::Failure);
        record(&b, Outcome::Success);
        record_n(&b, 2, Outcome::Failure);
        assert_eq!(b.state(), BreakerState::Closed);
        record(&b, Outcome::Failure);
        assert_eq!(b.state(), BreakerState::Open);
    }

    fn rate_config(threshold: f64, min_requests: u32) -> BreakerConfig {
        BreakerConfig {
            consecutive_failures: None,
            failure_rate: Some(FailureRate {
                threshold,
                min_requests,
                window: ConfigDuration::from_secs(10),
            }),
            ..config()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn failure_rate_trips_only_past_min_requests() {
        let b = breaker(rate_config(0.5, 10));
        // 100% failures, but only 9 outcomes: no decision yet.
        record_n(&b, 9, Outcome::Failure);
        assert_eq!(b.state(), BreakerState::Closed);
        record(&b, Outcome::Failure);
        assert_eq!(b.state(), BreakerState::Open);

        // Exactly at the threshold trips; just below does not.
        let b = breaker(rate_config(0.5, 10));
        record_n(&b, 5, Outcome::Success);
        record_n(&b, 4, Outcome::Failure);
        assert_eq!(b.state(), BreakerState::Closed);
        record(&b, Outcome::Failure);
        assert_eq!(b.state(), BreakerState::Open);

        let b = breaker(rate_config(0.5, 10));
        record_n(&b, 6, Outcome::Success);
        record_n(&b, 4, Outcome::Failure);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn failure_rate_forgets_outcomes_older_than_the_window() {
        let b = breaker(rate_config(0.5, 10));
        record_n(&b, 9, Outcome::Failure);
        advance(Duration::from_secs(10)).await;
        record(&b, Outcome::Failure);
        assert_eq!(b.state(), BreakerState::Closed);

        // Within the window, outcomes add up.
        let b = breaker(rate_config(0.5, 10));
        record_n(&b, 5, Outcome::Failure);
        advance(Duration::from_secs(9)).await;
        record_n(&b, 5, Outcome::Failure);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn only_a_concurrency_limit_never_trips() {
        let b = breaker(BreakerConfig {
            consecutive_failures: None,
            max_concurrent_requests: Some(10),
            ..config()
        });
        record_n(&b, 100, Outcome::Failure);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.transitions(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn after_open_for_admits_exactly_half_open_requests_probes() {
        let b = breaker(BreakerConfig {
            half_open_requests: 2,
            ..config()
        });
        trip(&b);
        advance(OPEN_FOR - Duration::from_millis(1)).await;
        assert_eq!(b.state(), BreakerState::Open);
        advance(Duration::from_millis(1)).await;
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.transitions(), 2);
        let probes: Vec<_> = (0..2).map(|_| b.try_acquire()).collect();
        assert!(probes.iter().all(Result::is_ok));
        assert_eq!(b.try_acquire().err(), Some(BreakerRejection::Open));
        assert_eq!(b.state(), BreakerState::HalfOpen);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_success_closes_and_resets() {
        let b = breaker(config());
        trip(&b);
        advance(OPEN_FOR).await;
        record(&b, Outcome::Success);
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.transitions(), 3);
        // The failures before the trip no longer count.
        record_n(&b, 2, Outcome::Failure);
        assert_eq!(b.state(), BreakerState::Closed);
        record(&b, Outcome::Failure);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_failure_reopens_with_doubled_open_time_capped() {
        let b = breaker(BreakerConfig {
            max_open_for: ConfigDuration::from_secs(35),
            ..config()
        });
        trip(&b);
        advance(OPEN_FOR).await;
        let ms = Duration::from_millis(1);
        // Each failed probe doubles the open time: 20s, then 40s capped at 35s, then 35s.
        for open in [20, 35, 35].map(Duration::from_secs) {
            record(&b, Outcome::Failure);
            assert_eq!(b.state(), BreakerState::Open);
            advance(open - ms).await;
            assert_eq!(b.state(), BreakerState::Open);
            assert_eq!(b.try_acquire().err(), Some(BreakerRejection::Open));
            advance(ms).await;
            assert_eq!(b.state(), BreakerState::HalfOpen);
        }
        // Closing resets the open time: the next trip opens for `open_for` again.
        record(&b, Outcome::Success);
        trip(&b);
        advance(OPEN_FOR - ms).await;
        assert_eq!(b.state(), BreakerState::Open);
        advance(ms).await;
        assert_eq!(b.state(), BreakerState::HalfOpen);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_limit_refuses_the_extra_request_until_a_permit_drops() {
        let b = breaker(BreakerConfig {
            max_concurrent_requests: Some(2),
            ..config()
        });
        let first = b.try_acquire();
        let second = b.try_acquire();
        assert!(first.is_ok() && second.is_ok());
        assert_eq!(
            b.try_acquire().err(),
            Some(BreakerRejection::ConcurrencyLimit)
        );
        drop(first);
        let third = b.try_acquire();
        assert!(third.is_ok());
        assert_eq!(
            b.try_acquire().err(),
            Some(BreakerRejection::ConcurrencyLimit)
        );
        // Recording releases the slot too.
        if let Ok(permit) = second {
            permit.record(Outcome::Success);
        }
        assert!(b.try_acquire().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_take_no_concurrency_slot() {
        let b = breaker(BreakerConfig {
            max_concurrent_requests: Some(1),
            ..config()
        });
        trip(&b);
        for _ in 0..5 {
            assert_eq!(b.try_acquire().err(), Some(BreakerRejection::Open));
        }
        advance(OPEN_FOR).await;
        assert!(b.try_acquire().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_permit_neither_opens_nor_closes() {
        let b = breaker(BreakerConfig {
            consecutive_failures: Some(1),
            ..config()
        });
        for _ in 0..10 {
            drop(b.try_acquire());
        }
        assert_eq!(b.state(), BreakerState::Closed);

        record(&b, Outcome::Failure);
        advance(OPEN_FOR).await;
        // A dropped probe leaves the breaker half-open and frees the probe for another request.
        drop(b.try_acquire());
        assert_eq!(b.state(), BreakerState::HalfOpen);
        let probe = b.try_acquire();
        assert!(probe.is_ok());
        assert_eq!(b.try_acquire().err(), Some(BreakerRejection::Open));
        drop(probe);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.transitions(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn outcomes_from_an_earlier_state_are_ignored() {
        let b = breaker(BreakerConfig {
            consecutive_failures: Some(2),
            half_open_requests: 2,
            ..config()
        });
        let late: Vec<_> = (0..4).filter_map(|_| b.try_acquire().ok()).collect();
        record_n(&b, 2, Outcome::Failure);
        assert_eq!(b.state(), BreakerState::Open);
        let mut late = late.into_iter();
        // Admitted while Closed, finished after the trip: must not close the breaker.
        if let Some(permit) = late.next() {
            permit.record(Outcome::Success);
        }
        assert_eq!(b.state(), BreakerState::Open);

        advance(OPEN_FOR).await;
        let probe = b.try_acquire();
        // Nor may a stale failure reopen a half-open breaker.
        if let Some(permit) = late.next() {
            permit.record(Outcome::Failure);
        }
        assert_eq!(b.state(), BreakerState::HalfOpen);
        if let Ok(probe) = probe {
            probe.record(Outcome::Success);
        }
        assert_eq!(b.state(), BreakerState::Closed);

        // Nor count towards the new Closed period.
        let rest: Vec<_> = late.collect();
        assert_eq!(rest.len(), 2);
        for permit in rest {
            permit.record(Outcome::Failure);
        }
        record(&b, Outcome::Failure);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_probe_outcome_decides() {
        // One failure trips, so a stale probe failure counted after the close would reopen.
        let b = breaker(BreakerConfig {
            consecutive_failures: Some(1),
            half_open_requests: 2,
            ..config()
        });
        record(&b, Outcome::Failure);
        assert_eq!(b.state(), BreakerState::Open);
        advance(OPEN_FOR).await;
        let (first, second) = (b.try_acquire(), b.try_acquire());
        if let (Ok(first), Ok(second)) = (first, second) {
            first.record(Outcome::Success);
            // The second probe belongs to the half-open period that just ended.
            second.record(Outcome::Failure);
        } else {
            panic!("both probes should be admitted");
        }
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
