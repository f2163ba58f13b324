//! Outlier detection: per-endpoint ejection of endpoints that keep failing.
//!
//! Each endpoint carries an [`EndpointHealth`] (a few atomics, no lock). An endpoint that fails
//! `consecutive_failures` attempts in a row is ejected: the balancer skips it for
//! `base_ejection × n` (its n-th ejection), capped at `max_ejection`. The count of ejections
//! starts over once an endpoint has stayed in the rotation for `max_ejection`. At most
//! `max_ejected_percent` of the endpoints (rounded down) are out at once, so a single-endpoint
//! service at the default 50% is never ejected (that would only turn its errors into 503s).
//! A failure is what the circuit breaker counts as one: read from the attempt's response head,
//! or for a gRPC response without a status there, from its trailers (see `outcome.rs`).
//!
//! Time is [`tokio::time::Instant`], so tests run on paused time.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use outrider_config::OutlierDetection;
use prometheus::IntCounter;
use tokio::time::Instant;

use super::breaker::Outcome;

/// The health record of one endpoint.
#[derive(Debug, Default)]
pub struct EndpointHealth {
    /// Failures in a row.
    consecutive: AtomicU32,
    /// Ejected until this many nanoseconds after the detector's origin; 0: never ejected.
    /// Kept after the ejection ends: it is also when the endpoint came back.
    ejected_until: AtomicU64,
    /// Ejections so far (reset after a long healthy stretch).
    ejections: AtomicU32,
}

/// The outlier detector of one service, built with its upstream and shared by its endpoints.
#[derive(Debug)]
pub struct OutlierDetector {
    config: OutlierDetection,
    /// Origin of the nanosecond clock.
    base: Instant,
    /// Serialises ejection decisions (rare), so concurrent failures cannot together eject
    /// more than `max_ejected_percent`. Never taken on the admit path.
    ejecting: Mutex<()>,
    ejections: Option<IntCounter>,
}

impl OutlierDetector {
    /// A detector for `config`, counting ejections in `ejections` when given.
    pub fn new(config: &OutlierDetection, ejections: Option<IntCounter>) -> Self {
        Self {
            config: config.clone(),
            base: Instant::now(),
            ejecting: Mutex::new(()),
            ejections,
        }
    }

    /// The settings it was built from.
    pub fn config(&self) -> &OutlierDetection {
        &self.config
    }

    /// The current time on the detector's clock, for [`OutlierDetector::available`].
    pub fn now(&self) -> u64 {
        nanos(Instant::now().saturating_duration_since(self.base))
    }

    /// Whether `health`'s endpoint may take traffic at `now`.
    pub fn available(&self, health: &EndpointHealth, now: u64) -> bool {
        health.ejected_until.load(Ordering::Relaxed) <= now
    }

    /// Records an attempt's outcome on the endpoint with `health`, one of `all` (every endpoint
    /// of the service, itself included). Returns how long the endpoint was ejected for, if this
    /// failure ejected it.
    pub fn record<'a>(
        &self,
        health: &EndpointHealth,
        outcome: Outcome,
        all: impl Iterator<Item = &'a EndpointHealth>,
    ) -> Option<Duration> {
        match outcome {
            Outcome::Success => {
                // Read first: a healthy endpoint's counter stays untouched (no cache-line
                // bouncing between cores on every success).
                if health.consecutive.load(Ordering::Relaxed) != 0 {
                    health.consecutive.store(0, Ordering::Relaxed);
                }
                None
            }
            Outcome::Failure => {
                let failures = health.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
                if failures < self.config.consecutive_failures.max(1) {
                    return None;
                }
                self.eject(health, all)
            }
        }
    }

    fn eject<'a>(
        &self,
        health: &EndpointHealth,
        all: impl Iterator<Item = &'a EndpointHealth>,
    ) -> Option<Duration> {
        let _serial = self.ejecting.lock().unwrap_or_else(PoisonError::into_inner);
        let now = self.now();
        let until = health.ejected_until.load(Ordering::Relaxed);
        if until > now {
            // Already out (failures of attempts that started before the ejection).
            return None;
        }
        let (mut total, mut out) = (0u64, 0u64);
        for peer in all {
            total += 1;
            out += u64::from(peer.ejected_until.load(Ordering::Relaxed) > now);
        }
        let allowed = total * u64::from(self.config.max_ejected_percent.min(100)) / 100;
        if out + 1 > allowed {
            // Keep counting: the endpoint is ejected as soon as room frees up.
            return None;
        }
        let max = self.config.max_ejection.get();
        // A long healthy stretch since it last came back forgives earlier ejections.
        if until != 0 && now.saturating_sub(until) >= nanos(max) {
            health.ejections.store(0, Ordering::Relaxed);
        }
        let n = health.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let length = self.config.base_ejection.get().saturating_mul(n).min(max);
        health
            .ejected_until
            .store(now.saturating_add(nanos(length)).max(1), Ordering::Relaxed);
        health.consecutive.store(0, Ordering::Relaxed);
        if let Some(counter) = &self.ejections {
            counter.inc();
        }
        Some(length)
    }
}

/// A duration in nanoseconds, saturating.
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use outrider_config::Duration as ConfigDuration;
    use tokio::time::advance;

    use super::*;

    const BASE: Duration = Duration::from_secs(10);

    fn detector(percent: u32) -> OutlierDetector {
        OutlierDetector::new(
            &OutlierDetection {
                consecutive_failures: 3,
                base_ejection: ConfigDuration(BASE),
                max_ejection: ConfigDuration::from_secs(25),
                max_ejected_percent: percent,
            },
            None,
        )
    }

    fn fail(d: &OutlierDetector, all: &[EndpointHealth], i: usize) -> Option<Duration> {
        d.record(&all[i], Outcome::Failure, all.iter())
    }

    fn fail_n(d: &OutlierDetector, all: &[EndpointHealth], i: usize, n: usize) -> Option<Duration> {
        (0..n).map(|_| fail(d, all, i)).last().flatten()
    }

    fn endpoints(n: usize) -> Vec<EndpointHealth> {
        (0..n).map(|_| EndpointHealth::default()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_eject_until_the_time_is_up() {
        let d = detector(50);
        let all = endpoints(2);
        assert_eq!(fail_n(&d, &all, 0, 2), None);
        assert!(d.available(&all[0], d.now()));
        assert_eq!(fail(&d, &all, 0), Some(BASE));
        assert!(!d.available(&all[0], d.now()));
        assert!(d.available(&all[1], d.now()));
        advance(BASE - Duration::from_millis(1)).await;
        assert!(!d.available(&all[0], d.now()));
        advance(Duration::from_millis(1)).await;
        assert!(d.available(&all[0], d.now()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_resets_the_count() {
        let d = detector(50);
        let all = endpoints(2);
        fail_n(&d, &all, 0, 2);
        assert_eq!(d.record(&all[0], Outcome::Success, all.iter()), None);
        assert_eq!(fail_n(&d, &all, 0, 2), None);
        assert!(d.available(&all[0], d.now()));
        assert_eq!(fail(&d, &all, 0), Some(BASE));
    }

    #[tokio::test(start_paused = true)]
    async fn repeated_ejections_grow_up_to_the_maximum() {
        let d = detector(50);
        let all = endpoints(2);
        // 10s, 20s, then 30s capped at 25s.
        for expected in [10, 20, 25, 25] {
            assert_eq!(fail_n(&d, &all, 0, 3), Some(Duration::from_secs(expected)));
            advance(Duration::from_secs(expected)).await;
            assert!(d.available(&all[0], d.now()));
        }
        // In the rotation for max_ejection without being ejected: the count starts over.
        advance(Duration::from_secs(25)).await;
        assert_eq!(fail_n(&d, &all, 0, 3), Some(BASE));
    }

    #[tokio::test(start_paused = true)]
    async fn max_ejected_percent_rounds_down() {
        // 50% of 3 endpoints is 1.
        let d = detector(50);
        let all = endpoints(3);
        assert_eq!(fail_n(&d, &all, 0, 3), Some(BASE));
        assert_eq!(fail_n(&d, &all, 1, 10), None);
        assert!(d.available(&all[1], d.now()));
        // Once the first is back, the next failure of the second ejects it.
        advance(BASE).await;
        assert_eq!(fail(&d, &all, 1), Some(BASE));

        // A single endpoint at 50%: never ejected.
        let one = endpoints(1);
        assert_eq!(fail_n(&d, &one, 0, 10), None);
        // At 100% every endpoint may go.
        let d = detector(100);
        let all = endpoints(2);
        assert_eq!(fail_n(&d, &all, 0, 3), Some(BASE));
        assert_eq!(fail_n(&d, &all, 1, 3), Some(BASE));
        let now = d.now();
        assert!(all.iter().all(|h| !d.available(h, now)));
    }

    #[tokio::test(start_paused = true)]
    async fn failures_while_ejected_do_not_extend_the_ejection() {
        let d = detector(100);
        let all = endpoints(1);
        assert_eq!(fail_n(&d, &all, 0, 3), Some(BASE));
        // Late failures of attempts that started before the ejection.
        assert_eq!(fail_n(&d, &all, 0, 5), None);
        advance(BASE).await;
        assert!(d.available(&all[0], d.now()));
    }

    #[tokio::test(start_paused = true)]
    async fn ejections_are_counted() {
        let counter = IntCounter::new("t", "t").expect("counter");
        let d = OutlierDetector::new(
            &OutlierDetection {
                consecutive_failures: 1,
                base_ejection: ConfigDuration(BASE),
                max_ejection: ConfigDuration(BASE),
                max_ejected_percent: 100,
            },
            Some(counter.clone()),
        );
        let all = endpoints(1);
        fail(&d, &all, 0);
        advance(BASE).await;
        fail(&d, &all, 0);
        assert_eq!(counter.get(), 2);
    }
}
