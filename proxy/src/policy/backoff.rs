//! The one capped exponential ceiling every backoff grows along: retries (full jitter under
//! it), connect hold-outs (equal jitter on it) and control-plane reconnects (full jitter).
//! Each keeps its own jitter, which is what tells them apart; the growth is shared.

use std::time::Duration;

/// `base · 2^step`, at most `max`, saturating (any `step` is safe).
pub fn ceiling(base: Duration, max: Duration, step: u32) -> Duration {
    let factor = 1u32.checked_shl(step.min(31)).unwrap_or(u32::MAX);
    base.saturating_mul(factor).min(max)
}

/// A duration in nanoseconds, saturating at `u64::MAX` (about 584 years).
pub fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ceiling_doubles_to_its_maximum_and_never_overflows() {
        let ms = Duration::from_millis;
        let steps: Vec<_> = (0..5).map(|s| ceiling(ms(100), ms(1000), s)).collect();
        assert_eq!(steps, [ms(100), ms(200), ms(400), ms(800), ms(1000)]);
        assert_eq!(
            ceiling(ms(100), Duration::MAX, u32::MAX),
            ms(100) * (1 << 31)
        );
        assert_eq!(ceiling(Duration::MAX, Duration::MAX, 40), Duration::MAX);
        assert_eq!(nanos(Duration::MAX), u64::MAX);
    }
}
