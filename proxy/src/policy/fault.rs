//! Fault injection on a route, for testing resilience in staging: each request independently
//! may be held for `delay.duration` (with probability `delay.percent`) and may be answered with
//! `abort.status` instead of being forwarded (with probability `abort.percent`). An aborted
//! request never reaches the upstream; a delay happens before the circuit breaker and the
//! attempt loop, so it is not bounded by the request timeout (as if the network were slow
//! before the proxy).

use std::time::Duration;

use http::StatusCode;
use outrider_config::Fault;

/// The faults of a route, compiled once per policy load.
#[derive(Debug, Clone)]
pub struct FaultPolicy {
    delay: Option<(Duration, f64)>,
    abort: Option<(StatusCode, f64)>,
}

/// What to do to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Faults {
    /// Hold the request this long first.
    pub delay: Option<Duration>,
    /// Answer with this status instead of forwarding.
    pub abort: Option<StatusCode>,
}

impl FaultPolicy {
    /// Compiles `config`. A status validation would reject falls back to 503.
    pub fn new(config: &Fault) -> Self {
        Self {
            delay: config
                .delay
                .as_ref()
                .map(|d| (d.duration.get(), d.percent.clamp(0.0, 100.0))),
            abort: config.abort.as_ref().map(|a| {
                let status =
                    StatusCode::from_u16(a.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                (status, a.percent.clamp(0.0, 100.0))
            }),
        }
    }

    /// Rolls the dice for one request.
    pub fn decide(&self) -> Faults {
        self.decide_with(|| fastrand::f64() * 100.0)
    }

    /// [`FaultPolicy::decide`] with the rolls (uniform in [0, 100)) drawn from `roll`.
    fn decide_with(&self, mut roll: impl FnMut() -> f64) -> Faults {
        let mut hit = |percent: f64| percent >= 100.0 || (percent > 0.0 && roll() < percent);
        Faults {
            delay: self.delay.filter(|(_, p)| hit(*p)).map(|(d, _)| d),
            abort: self.abort.filter(|(_, p)| hit(*p)).map(|(s, _)| s),
        }
    }
}

#[cfg(test)]
mod tests {
    use outrider_config::{Duration as ConfigDuration, FaultAbort, FaultDelay};

    use super::*;

    fn policy(delay_percent: f64, abort_percent: f64) -> FaultPolicy {
        FaultPolicy::new(&Fault {
            delay: Some(FaultDelay {
                duration: ConfigDuration::from_secs(2),
                percent: delay_percent,
            }),
            abort: Some(FaultAbort {
                status: 502,
                percent: abort_percent,
            }),
        })
    }

    #[test]
    fn hundred_percent_always_and_zero_never() {
        let always = policy(100.0, 100.0);
        let never = policy(0.0, 0.0);
        for _ in 0..1000 {
            assert_eq!(
                always.decide(),
                Faults {
                    delay: Some(Duration::from_secs(2)),
                    abort: Some(StatusCode::BAD_GATEWAY),
                }
            );
            assert_eq!(never.decide(), Faults::default());
        }
    }

    #[test]
    fn percent_is_the_share_of_requests() {
        // Rolls spread evenly over [0, 100): exactly `percent` of them hit.
        let p = policy(10.0, 1.0);
        let mut step = 0u32;
        let mut roll = || {
            step += 1;
            f64::from((step - 1) % 1000) / 10.0
        };
        let (mut delayed, mut aborted) = (0, 0);
        for _ in 0..500 {
            let f = p.decide_with(&mut roll);
            delayed += usize::from(f.delay.is_some());
            aborted += usize::from(f.abort.is_some());
        }
        // 1000 rolls, alternating delay/abort: each saw every other tenth of a percent.
        assert_eq!((delayed, aborted), (50, 5));
    }

    #[test]
    fn random_rolls_land_near_the_percent() {
        let p = policy(10.0, 50.0);
        let n = 20_000;
        let (mut delayed, mut aborted) = (0, 0);
        for _ in 0..n {
            let f = p.decide();
            delayed += usize::from(f.delay.is_some());
            aborted += usize::from(f.abort.is_some());
        }
        // Binomial: 6 standard deviations either side (fails about once in 10^9 runs).
        assert!((1_750..=2_250).contains(&delayed), "{delayed}");
        assert!((9_580..=10_420).contains(&aborted), "{aborted}");
    }
}
