//! Human-friendly durations in policy files: `250ms`, `2s`, `1m`, `1h`, and sums such as `1m30s`.

use std::fmt;
use std::str::FromStr;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// A duration written in a policy file as a string such as `250ms`, `2s` or `1m30s`.
///
/// A bare number without unit is rejected: `timeout: 5` is ambiguous and a common cause of
/// outages (5 ms or 5 s?).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(pub std::time::Duration);

/// Why a duration string could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// The string was empty.
    #[error("empty duration")]
    Empty,
    /// A number had no unit after it.
    #[error("duration `{0}` needs a unit (ms, s, m, h)")]
    MissingUnit(String),
    /// The unit is not one of ms, s, m, h (or us).
    #[error("duration `{0}` has an unknown unit (use us, ms, s, m, h)")]
    UnknownUnit(String),
    /// The number does not fit.
    #[error("duration `{0}` is too large")]
    Overflow(String),
    /// Something other than digits and units.
    #[error("`{0}` is not a duration (examples: 250ms, 2s, 1m30s)")]
    Invalid(String),
}

impl Duration {
    /// The standard-library value.
    pub fn get(self) -> std::time::Duration {
        self.0
    }

    /// Builds a duration from milliseconds.
    pub const fn from_millis(ms: u64) -> Self {
        Self(std::time::Duration::from_millis(ms))
    }

    /// Builds a duration from seconds.
    pub const fn from_secs(s: u64) -> Self {
        Self(std::time::Duration::from_secs(s))
    }
}

impl FromStr for Duration {
    type Err = DurationError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let s = text.trim();
        if s.is_empty() {
            return Err(DurationError::Empty);
        }
        let mut total_nanos: u128 = 0;
        let mut rest = s;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return Err(DurationError::Invalid(text.to_string()));
            }
            let value: u128 = rest[..digits]
                .parse()
                .map_err(|_| DurationError::Overflow(text.to_string()))?;
            rest = &rest[digits..];
            let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
            if unit_len == 0 {
                return Err(DurationError::MissingUnit(text.to_string()));
            }
            let nanos_per_unit: u128 = match &rest[..unit_len] {
                "us" => 1_000,
                "ms" => 1_000_000,
                "s" => 1_000_000_000,
                "m" => 60 * 1_000_000_000,
                "h" => 3600 * 1_000_000_000,
                _ => return Err(DurationError::UnknownUnit(text.to_string())),
            };
            rest = &rest[unit_len..];
            total_nanos = value
                .checked_mul(nanos_per_unit)
                .and_then(|n| total_nanos.checked_add(n))
                .ok_or_else(|| DurationError::Overflow(text.to_string()))?;
        }
        let secs = u64::try_from(total_nanos / 1_000_000_000)
            .map_err(|_| DurationError::Overflow(text.to_string()))?;
        // The remainder is below 1e9 and so always fits in u32.
        let nanos = (total_nanos % 1_000_000_000) as u32;
        Ok(Duration(std::time::Duration::new(secs, nanos)))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        let nanos = d.as_nanos();
        if nanos == 0 {
            return f.write_str("0s");
        }
        if nanos.is_multiple_of(3_600_000_000_000) {
            write!(f, "{}h", nanos / 3_600_000_000_000)
        } else if nanos.is_multiple_of(60_000_000_000) {
            write!(f, "{}m", nanos / 60_000_000_000)
        } else if nanos.is_multiple_of(1_000_000_000) {
            write!(f, "{}s", nanos / 1_000_000_000)
        } else if nanos.is_multiple_of(1_000_000) {
            write!(f, "{}ms", nanos / 1_000_000)
        } else {
            write!(f, "{}us", nanos / 1_000)
        }
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string such as 250ms, 2s or 1m")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
                Err(E::custom(DurationError::MissingUnit(v.to_string())))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
                Err(E::custom(DurationError::MissingUnit(v.to_string())))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<std::time::Duration, DurationError> {
        s.parse::<Duration>().map(Duration::get)
    }

    #[test]
    fn parses_units_and_sums() {
        assert_eq!(parse("250ms"), Ok(std::time::Duration::from_millis(250)));
        assert_eq!(parse("2s"), Ok(std::time::Duration::from_secs(2)));
        assert_eq!(parse("1m"), Ok(std::time::Duration::from_secs(60)));
        assert_eq!(parse("1h"), Ok(std::time::Duration::from_secs(3600)));
        assert_eq!(parse("1m30s"), Ok(std::time::Duration::from_secs(90)));
        assert_eq!(parse("500us"), Ok(std::time::Duration::from_micros(500)));
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(parse(""), Err(DurationError::Empty));
        assert_eq!(parse("5"), Err(DurationError::MissingUnit("5".into())));
        assert_eq!(parse("5d"), Err(DurationError::UnknownUnit("5d".into())));
        assert_eq!(parse("s"), Err(DurationError::Invalid("s".into())));
        assert!(matches!(
            parse("99999999999999999999999h"),
            Err(DurationError::Overflow(_))
        ));
    }

    #[test]
    fn displays_in_the_largest_exact_unit() {
        for s in ["250ms", "2s", "1m", "1h", "90s", "500us", "0s"] {
            let d: Duration = s.parse().expect("valid");
            assert_eq!(d.to_string(), s);
        }
    }
}
