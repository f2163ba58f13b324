//! Checks of flag and annotation values (quantities, durations, port and CIDR lists).

use super::*;

/// A value that is not a Kubernetes quantity (`100m`, `0.5`, `128Mi`, `1G`).
#[derive(Debug)]
pub(super) struct BadValue {
    pub(super) what: &'static str,
    pub(super) value: String,
    pub(super) expected: &'static str,
}

impl fmt::Display for BadValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} `{}` is not {}", self.what, self.value, self.expected)
    }
}

impl From<BadValue> for InjectError {
    fn from(e: BadValue) -> Self {
        InjectError::Invalid {
            object: "flags".to_string(),
            message: e.to_string(),
        }
    }
}

pub(super) fn check_quantity(what: &'static str, value: &str) -> Result<(), BadValue> {
    const SUFFIXES: [&str; 14] = [
        "", "m", "k", "M", "G", "T", "P", "E", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei",
    ];
    let digits = value
        .bytes()
        .take_while(|b| b.is_ascii_digit() || *b == b'.')
        .count();
    let (number, suffix) = value.split_at(digits);
    let ok = !number.is_empty()
        && number.bytes().filter(|b| *b == b'.').count() <= 1
        && number.bytes().any(|b| b.is_ascii_digit())
        && SUFFIXES.contains(&suffix);
    if ok {
        Ok(())
    } else {
        Err(BadValue {
            what,
            value: value.to_string(),
            expected: "a Kubernetes quantity (examples: 100m, 0.5, 128Mi)",
        })
    }
}

pub(super) fn check_duration(
    what: &'static str,
    value: &str,
) -> Result<std::time::Duration, BadValue> {
    value
        .parse::<outrider_config::Duration>()
        .map(outrider_config::Duration::get)
        .map_err(|_| BadValue {
            what,
            value: value.to_string(),
            expected: "a duration (examples: 30s, 1m30s)",
        })
}

/// A skip-ports annotation (`22,9000-9100`), checked as `outrider-proxy init` will check it,
/// so that a typo fails here rather than in a crash-looping init container; returned without
/// spaces. `protected` is a port the list must not include (init refuses to skip its own
/// inbound port).
pub(super) fn check_ports(
    what: &str,
    value: &str,
    protected: Option<u16>,
) -> Result<String, String> {
    let bad = |reason: String| format!("{what} `{value}`: {reason}");
    let port = |text: &str| match text.trim().parse::<u16>() {
        Ok(0) | Err(_) => Err(bad(format!("`{}` is not a port (1-65535)", text.trim()))),
        Ok(port) => Ok(port),
    };
    let mut entries = Vec::new();
    for entry in value.split(',').map(str::trim) {
        let (first, last) = match entry.split_once('-') {
            Some((first, last)) => (port(first)?, port(last)?),
            None => {
                let single = port(entry)?;
                (single, single)
            }
        };
        if first > last {
            return Err(bad(format!("range `{entry}` ends before it starts")));
        }
        if let Some(port) = protected.filter(|p| (first..=last).contains(p)) {
            return Err(bad(format!(
                "`{entry}` includes the proxy's inbound port {port}"
            )));
        }
        entries.push(if first == last {
            first.to_string()
        } else {
            format!("{first}-{last}")
        });
    }
    check_count(what, value, entries.len())?;
    Ok(entries.join(","))
}

/// A skip-CIDRs annotation (`10.0.0.0/8,2001:db8::/32`), checked as `outrider-proxy init`
/// will check it (host bits set after the prefix are refused as a likely typo).
pub(super) fn check_cidrs(what: &str, value: &str) -> Result<String, String> {
    let mut entries = Vec::new();
    for entry in value.split(',').map(str::trim) {
        let bad = |reason: &str| format!("{what} `{value}`: `{entry}` {reason}");
        let (address, prefix) = entry.split_once('/').unwrap_or((entry, ""));
        let network: IpAddr = address
            .trim()
            .parse()
            .map_err(|_| bad("is not an IPv4 or IPv6 network"))?;
        let (bits, width) = match network {
            IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32u32),
            IpAddr::V6(v6) => (u128::from(v6), 128),
        };
        let prefix = match prefix.trim() {
            "" => width,
            text => text
                .parse::<u32>()
                .ok()
                .filter(|p| *p <= width)
                .ok_or_else(|| bad("has a bad prefix length"))?,
        };
        let host_bits = 1u128
            .checked_shl(width - prefix)
            .map_or(u128::MAX, |bit| bit - 1);
        if bits & host_bits != 0 {
            return Err(bad("has host bits set after its prefix"));
        }
        entries.push(format!("{network}/{prefix}"));
    }
    check_count(what, value, entries.len())?;
    Ok(entries.join(","))
}

pub(super) fn check_count(what: &str, value: &str, count: usize) -> Result<(), String> {
    if count > MAX_SKIP_ENTRIES {
        return Err(format!(
            "{what} `{value}`: {count} entries; at most {MAX_SKIP_ENTRIES}"
        ));
    }
    Ok(())
}
