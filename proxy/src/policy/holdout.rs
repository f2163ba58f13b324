//! Connect hold-out: an endpoint whose connect fails (refused, timed out, any other connect
//! error; never an HTTP status) is held out of the balancer for a while, on by default without
//! any policy, as Linkerd's balancer and Envoy's passive health checks do. The n-th failure in a
//! row holds it out for an equal-jitter backoff on a ceiling of [`BASE_HOLD_OUT`] × 2^(n-1), at
//! most [`MAX_HOLD_OUT`]; its first successful connect ends the hold-out and the count. When a
//! hold-out ends, one request probes the endpoint: until its connect ends (at most the connect
//! timeout) the endpoint stays out for the others, so a blackholed endpoint costs one caller a
//! connect timeout per hold-out, not every caller that picks it meanwhile.
//!
//! Outlier detection (`outlier.rs`) is the configured, threshold-based judge of responses; this
//! needs no threshold: a refused connect sent nothing, and the next one to a dead endpoint is
//! refused again, so a single failure is evidence enough. What to do when every endpoint is
//! held out is the balancer's choice (`Upstream::pick`).
//!
//! No lock and no allocation: per endpoint, an atomic "held out until" in nanoseconds after the
//! service's origin instant; per service, the latest of those, so that a pick reads the clock
//! only while some endpoint may be held out. Time is [`tokio::time::Instant`], so tests run on
//! paused time.

use std::fmt::Display;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus::IntCounter;
use tokio::time::Instant;

use super::backoff::{self, nanos};

/// The first hold-out's ceiling: with equal jitter it lasts 125 to 250 ms.
pub const BASE_HOLD_OUT: Duration = Duration::from_millis(250);
/// The largest ceiling: an endpoint that stays dead is tried again every 5 to 10 s (each try
/// costs the caller nothing when another endpoint takes the request, see `forward.rs`), and one
/// that comes back gets traffic again within 10 s.
pub const MAX_HOLD_OUT: Duration = Duration::from_secs(10);

/// The hold-outs of one service's endpoints: their shared clock and the latest end of any.
#[derive(Debug)]
pub struct HoldOuts {
    service: Arc<str>,
    /// Origin of the nanosecond clock.
    origin: Instant,
    /// The latest end of any endpoint's hold-out; 0 once a pick saw it pass. While it is 0 no
    /// endpoint is held out, and a pick reads no clock.
    latest: AtomicU64,
    /// Hold-outs begun (`outrider_endpoint_unavailable_total`).
    counter: Option<IntCounter>,
    /// How long a probe keeps its endpoint to itself: the connect timeout.
    probe_window: Duration,
}

impl HoldOuts {
    /// The hold-outs of `service`'s endpoints, whose connects time out after
    /// `connect_timeout`, counted in `counter` when given.
    pub fn new(
        service: Arc<str>,
        connect_timeout: Duration,
        counter: Option<IntCounter>,
    ) -> Arc<Self> {
        Arc::new(Self {
            service,
            origin: Instant::now(),
            latest: AtomicU64::new(0),
            counter,
            probe_window: connect_timeout,
        })
    }

    /// A fresh record for the endpoint at `addr`.
    pub fn endpoint(self: &Arc<Self>, addr: SocketAddr) -> Arc<HoldOut> {
        Arc::new(HoldOut {
            service: Arc::clone(self),
            addr,
            until: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            probing: AtomicBool::new(false),
        })
    }

    /// The current time on this clock while some endpoint may be held out, for
    /// [`HoldOut::is_held_out`]; `None`, without reading the clock, when none is.
    pub fn now_if_any(&self) -> Option<u64> {
        let latest = self.latest.load(Ordering::Acquire);
        if latest == 0 {
            return None;
        }
        let now = self.now();
        if now >= latest {
            // Every hold-out has ended: later picks skip the clock until the next one. A
            // hold-out begun meanwhile moved `latest` on, so this swap fails and it stays.
            let _ = self
                .latest
                .compare_exchange(latest, 0, Ordering::Relaxed, Ordering::Relaxed);
            return None;
        }
        Some(now)
    }

    fn now(&self) -> u64 {
        nanos(Instant::now().saturating_duration_since(self.origin))
    }
}

/// The connect record of one endpoint, shared by its pool's connector (which reports connects)
/// and the balancer (which skips it while held out).
#[derive(Debug)]
pub struct HoldOut {
    service: Arc<HoldOuts>,
    addr: SocketAddr,
    /// Held out until this many nanoseconds after the service's origin; 0: never, or reachable
    /// again since.
    until: AtomicU64,
    /// Connect failures in a row that began a hold-out.
    failures: AtomicU32,
    /// `until` was set by a probe's claim, not by a failure: the probe's failure begins the
    /// next hold-out.
    probing: AtomicBool,
}

impl HoldOut {
    /// Whether the endpoint is held out at `now` (from [`HoldOuts::now_if_any`]).
    pub fn is_held_out(&self, now: u64) -> bool {
        self.until.load(Ordering::Relaxed) > now
    }

    /// When the hold-out ends (or ended), on the service's clock: the balancer's tie-break
    /// when every endpoint is held out.
    pub fn until(&self) -> u64 {
        self.until.load(Ordering::Relaxed)
    }

    /// Records a failed connect (`reason` for the log). Begins a hold-out and returns its
    /// length unless one is under way: failures of connects that started before it, or of the
    /// attempts the balancer lets through while every endpoint is out, do not extend it.
    pub fn connect_failed(&self, reason: &dyn Display) -> Option<Duration> {
        let now = self.service.now();
        let until = self.until.load(Ordering::Relaxed);
        if until > now && !self.probing.load(Ordering::Relaxed) {
            return None;
        }
        let failures = self.failures.load(Ordering::Relaxed).saturating_add(1);
        let length = hold_out_length(failures, |max| fastrand::u64(..=max));
        let next = now.saturating_add(nanos(length)).max(1);
        // Of concurrent failures (every request that was connecting when the endpoint died),
        // one begins the hold-out.
        if self
            .until
            .compare_exchange(until, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return None;
        }
        self.failures.store(failures, Ordering::Relaxed);
        self.probing.store(false, Ordering::Relaxed);
        self.service.latest.fetch_max(next, Ordering::Release);
        if let Some(counter) = &self.service.counter {
            counter.inc();
        }
        // At most once per hold-out: from four a second at first to one per 5-10 s.
        if failures == 1 {
            tracing::info!(service = %self.service.service, endpoint = %self.addr, %reason, held_out_for = %outrider_config::Duration(length), "endpoint unreachable; held out");
        } else {
            tracing::debug!(service = %self.service.service, endpoint = %self.addr, %reason, failures, held_out_for = %outrider_config::Duration(length), "endpoint still unreachable; held out");
        }
        Some(length)
    }

    /// Whether a request the balancer picked this endpoint for may go: always, unless the
    /// endpoint's last connect failed; then only the first request after the hold-out ends
    /// (the probe), which keeps it held out from the others while its connect is under way.
    /// One load when the last connect did not fail.
    pub fn try_probe(&self) -> bool {
        if self.failures.load(Ordering::Relaxed) == 0 {
            return true;
        }
        let now = self.service.now();
        let until = self.until.load(Ordering::Relaxed);
        if until > now {
            return false;
        }
        let claim = now.saturating_add(nanos(self.service.probe_window)).max(1);
        if self
            .until
            .compare_exchange(until, claim, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        self.probing.store(true, Ordering::Relaxed);
        self.service.latest.fetch_max(claim, Ordering::Release);
        true
    }

    /// Records a successful connect: a hold-out and the failure count end. One load when
    /// there was none (every new connection comes here).
    pub fn connected(&self) {
        if self.failures.load(Ordering::Relaxed) == 0 {
            return;
        }
        let failures = self.failures.swap(0, Ordering::Relaxed);
        self.until.store(0, Ordering::Relaxed);
        self.probing.store(false, Ordering::Relaxed);
        if failures > 0 {
            tracing::info!(service = %self.service.service, endpoint = %self.addr, failures, "endpoint reachable again");
        }
    }
}

/// The hold-out after the `failures`-th connect failure in a row (1-based): equal jitter on a
/// ceiling doubling from [`BASE_HOLD_OUT`] up to [`MAX_HOLD_OUT`], i.e. ceiling/2 plus
/// `jitter(ceiling/2)`, which must lie in `0..=ceiling/2` (in nanoseconds). Never under half
/// the ceiling, so a dead endpoint is not tried again at once; jittered, so endpoints that died
/// together are not all tried again at the same moment.
pub fn hold_out_length(failures: u32, jitter: impl FnOnce(u64) -> u64) -> Duration {
    let ceiling = backoff::ceiling(BASE_HOLD_OUT, MAX_HOLD_OUT, failures.saturating_sub(1));
    let half = nanos(ceiling) / 2;
    Duration::from_nanos(half.saturating_add(jitter(half).min(half)))
}

#[cfg(test)]
mod tests {
    use tokio::time::advance;

    use super::*;

    const PROBE: Duration = Duration::from_secs(1);

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn held_out(h: &HoldOut) -> bool {
        h.service.now_if_any().is_some_and(|now| h.is_held_out(now))
    }

    #[test]
    fn the_ceiling_doubles_up_to_the_maximum_with_equal_jitter() {
        let low = |n| hold_out_length(n, |_| 0);
        let high = |n| hold_out_length(n, |max| max);
        assert_eq!(low(1), Duration::from_millis(125));
        assert_eq!(high(1), Duration::from_millis(250));
        assert_eq!(high(2), Duration::from_millis(500));
        assert_eq!(high(3), Duration::from_secs(1));
        assert_eq!(high(6), Duration::from_secs(8));
        assert_eq!(high(7), MAX_HOLD_OUT);
        assert_eq!(low(7), MAX_HOLD_OUT / 2);
        // No overflow however long the streak; a jitter out of range is clamped.
        assert_eq!(high(u32::MAX), MAX_HOLD_OUT);
        assert_eq!(hold_out_length(0, |_| u64::MAX), BASE_HOLD_OUT);
        // The random jitter stays within [ceiling/2, ceiling] and does spread.
        let samples: Vec<Duration> = (0..1000)
            .map(|_| hold_out_length(1, |max| fastrand::u64(..=max)))
            .collect();
        assert!(samples.iter().all(|d| (low(1)..=high(1)).contains(d)));
        let spread = samples.iter().max().copied().unwrap_or_default()
            - samples.iter().min().copied().unwrap_or_default();
        assert!(spread > Duration::from_millis(100), "{spread:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_holds_out_until_its_time_is_up_and_the_next_one_grows() {
        let counter = IntCounter::new("t", "t").expect("counter");
        let service = HoldOuts::new(Arc::from("svc"), PROBE, Some(counter.clone()));
        let h = service.endpoint(addr(1));
        assert_eq!(
            service.now_if_any(),
            None,
            "no clock needed before a failure"
        );
        let first = h.connect_failed(&"refused").expect("held out");
        assert!((BASE_HOLD_OUT / 2..=BASE_HOLD_OUT).contains(&first));
        assert!(held_out(&h));
        // Concurrent and later failures during the hold-out neither extend nor count.
        assert_eq!(h.connect_failed(&"refused"), None);
        advance(first - Duration::from_millis(1)).await;
        assert!(held_out(&h));
        assert_eq!(h.connect_failed(&"refused"), None);
        advance(Duration::from_millis(1)).await;
        assert!(!held_out(&h));
        // Once it has passed, picks read no clock again.
        assert_eq!(service.now_if_any(), None);
        let second = h.connect_failed(&"refused").expect("held out again");
        assert!((BASE_HOLD_OUT..=BASE_HOLD_OUT * 2).contains(&second));
        assert_eq!(counter.get(), 2);
        // Failing on and on: the ceiling stops at the maximum.
        let mut last = second;
        for _ in 0..10 {
            advance(last).await;
            last = h.connect_failed(&"refused").expect("held out again");
        }
        assert!((MAX_HOLD_OUT / 2..=MAX_HOLD_OUT).contains(&last));
    }

    #[tokio::test(start_paused = true)]
    async fn a_successful_connect_ends_the_hold_out_and_the_streak() {
        let service = HoldOuts::new(Arc::from("svc"), PROBE, None);
        let h = service.endpoint(addr(1));
        let mut last = Duration::ZERO;
        for _ in 0..4 {
            advance(last).await;
            last = h.connect_failed(&"refused").expect("held out");
        }
        assert!(last >= BASE_HOLD_OUT * 4);
        h.connected();
        assert!(!held_out(&h));
        // The streak starts over.
        let next = h.connect_failed(&"refused").expect("held out");
        assert!(next <= BASE_HOLD_OUT, "{next:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn endpoints_are_held_out_each_on_its_own() {
        let service = HoldOuts::new(Arc::from("svc"), PROBE, None);
        let (a, b) = (service.endpoint(addr(1)), service.endpoint(addr(2)));
        let length = a.connect_failed(&"refused").expect("held out");
        advance(length / 2).await;
        b.connect_failed(&"refused").expect("held out");
        assert!(held_out(&a) && held_out(&b));
        advance(length - length / 2).await;
        assert!(!held_out(&a));
        assert!(held_out(&b), "b's hold-out keeps the clock read on");
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_hold_out_one_request_probes_and_its_failure_holds_out_longer() {
        let service = HoldOuts::new(Arc::from("svc"), PROBE, None);
        let h = service.endpoint(addr(1));
        assert!(
            h.try_probe(),
            "an endpoint that never failed takes every request"
        );
        assert!(h.try_probe());
        let first = h.connect_failed(&"timeout").expect("held out");
        assert!(!h.try_probe(), "held out");
        advance(first).await;
        assert!(h.try_probe(), "the first request after the hold-out probes");
        assert!(held_out(&h), "the others stay away while it connects");
        assert!(!h.try_probe());
        // The probe's connect fails: the next hold-out begins, longer.
        let second = h.connect_failed(&"timeout").expect("held out again");
        assert!(second >= BASE_HOLD_OUT, "{second:?}");
        advance(second).await;
        // A probe that never reports (its caller left) holds the endpoint for the connect
        // timeout at most; then another request probes.
        assert!(h.try_probe());
        advance(PROBE - Duration::from_millis(1)).await;
        assert!(!h.try_probe());
        advance(Duration::from_millis(1)).await;
        assert!(h.try_probe());
        // A successful connect: every request may go again.
        h.connected();
        assert!(!held_out(&h));
        assert!(h.try_probe() && h.try_probe());
    }
}
