//! The capture rules as data: which ports and addresses are redirected to the proxy, and the
//! flag values they come from, validated before anything is rendered or applied.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use super::CaptureError;

/// Most entries a skip list takes: each becomes a rule (iptables) or set element (nft), and an
/// init container's flags are written by hand, so more is a mistake.
pub const MAX_SKIP_ENTRIES: usize = 64;

/// A TCP port or an inclusive range of them, as `8080` or `8000-8100` (never port 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    /// First port of the range.
    pub first: u16,
    /// Last port of the range (equal to `first` for a single port).
    pub last: u16,
}

impl FromStr for PortRange {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let port = |part: &str| -> Result<u16, String> {
            match part.trim().parse::<u16>() {
                Ok(0) => Err("port 0 cannot be captured".to_string()),
                Ok(port) => Ok(port),
                Err(_) => Err(format!("`{part}` is not a port (1-65535)")),
            }
        };
        let (first, last) = match text.split_once('-') {
            Some((first, last)) => (port(first)?, port(last)?),
            None => {
                let single = port(text)?;
                (single, single)
            }
        };
        if first > last {
            return Err(format!("range `{text}` ends before it starts"));
        }
        Ok(Self { first, last })
    }
}

impl PortRange {
    /// The range in nft's syntax (`8000-8100`).
    pub fn nft(&self) -> String {
        if self.first == self.last {
            self.first.to_string()
        } else {
            format!("{}-{}", self.first, self.last)
        }
    }

    /// The range in iptables' syntax (`8000:8100`).
    pub fn iptables(&self) -> String {
        if self.first == self.last {
            self.first.to_string()
        } else {
            format!("{}:{}", self.first, self.last)
        }
    }
}

/// An IPv4 or IPv6 network, as `192.0.2.0/24`, `2001:db8::/32`, or one address (a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The network address (no host bits set).
    pub network: IpAddr,
    /// The prefix length: at most 32 for IPv4, 128 for IPv6.
    pub prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = address
            .trim()
            .parse()
            .map_err(|_| format!("`{address}` is not an IPv4 or IPv6 address"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(prefix) => match prefix.trim().parse::<u8>() {
                Ok(prefix) if prefix <= max => prefix,
                _ => return Err(format!("`/{prefix}` is not a prefix length (0-{max})")),
            },
        };
        // Host bits set usually mean a typo (10.1.2.3/8 for 10.0.0.0/8): refuse rather than
        // silently widen or narrow what is exempted.
        let host_bits = match network {
            IpAddr::V4(v4) => u128::from(u32::from(v4)) & host_mask(prefix, 32),
            IpAddr::V6(v6) => u128::from(v6) & host_mask(prefix, 128),
        };
        if host_bits != 0 {
            return Err(format!("`{text}` has host bits set after /{prefix}"));
        }
        Ok(Self { network, prefix })
    }
}

/// The bits of a `width`-bit address below a `/prefix` (prefix <= width <= 128).
fn host_mask(prefix: u8, width: u32) -> u128 {
    let host_len = width.saturating_sub(u32::from(prefix));
    1u128.checked_shl(host_len).map_or(u128::MAX, |bit| bit - 1)
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// Which traffic goes to the proxy: everything TCP, minus these exceptions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureRules {
    /// Inbound TCP is redirected here.
    pub inbound_port: u16,
    /// Outbound TCP is redirected here.
    pub outbound_port: u16,
    /// Never redirected inbound (probes and scrapes reach the admin listener itself).
    pub admin_port: u16,
    /// The proxy's own connections (from this UID) are never redirected.
    pub proxy_uid: u32,
    /// Inbound destination ports that reach the app directly.
    pub skip_inbound_ports: Vec<PortRange>,
    /// Outbound destination ports that leave directly.
    pub skip_outbound_ports: Vec<PortRange>,
    /// Outbound destination networks that are reached directly.
    pub skip_outbound_cidrs: Vec<Cidr>,
}

impl CaptureRules {
    /// Checks what each flag alone cannot: ports that collide and skip lists that are too long.
    pub fn validate(&self) -> Result<(), CaptureError> {
        let ports = [
            ("--inbound-port", self.inbound_port),
            ("--outbound-port", self.outbound_port),
            ("--admin-port", self.admin_port),
        ];
        for (i, (flag, port)) in ports.iter().enumerate() {
            if *port == 0 {
                return Err(CaptureError::invalid(flag, "port 0 cannot be captured"));
            }
            if let Some((other, _)) = ports[..i].iter().find(|(_, p)| p == port) {
                return Err(CaptureError::invalid(
                    flag,
                    format!("{port} is also {other}: each listener needs its own port"),
                ));
            }
        }
        let lists = [
            ("--skip-inbound-ports", self.skip_inbound_ports.len()),
            ("--skip-outbound-ports", self.skip_outbound_ports.len()),
            ("--skip-outbound-cidrs", self.skip_outbound_cidrs.len()),
        ];
        if let Some((flag, len)) = lists.iter().find(|(_, len)| *len > MAX_SKIP_ENTRIES) {
            return Err(CaptureError::invalid(
                flag,
                format!("{len} entries; at most {MAX_SKIP_ENTRIES}"),
            ));
        }
        let inbound_skipped = |port: u16| {
            self.skip_inbound_ports
                .iter()
                .find(|r| r.first <= port && port <= r.last)
        };
        if let Some(range) = inbound_skipped(self.inbound_port) {
            return Err(CaptureError::invalid(
                "--skip-inbound-ports",
                format!(
                    "{} includes the inbound port {}",
                    range.nft(),
                    self.inbound_port
                ),
            ));
        }
        Ok(())
    }

    /// The skip networks of one family.
    pub fn skip_cidrs(&self, ipv6: bool) -> Vec<Cidr> {
        self.skip_outbound_cidrs
            .iter()
            .filter(|c| c.network.is_ipv6() == ipv6)
            .copied()
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ports_and_ranges_parse_and_bad_ones_say_why() {
        assert_eq!(
            "8080".parse::<PortRange>(),
            Ok(PortRange {
                first: 8080,
                last: 8080
            })
        );
        assert_eq!(
            "8000-8100".parse::<PortRange>(),
            Ok(PortRange {
                first: 8000,
                last: 8100
            })
        );
        let err = |text: &str| text.parse::<PortRange>().unwrap_err();
        assert_eq!(err("0"), "port 0 cannot be captured");
        assert_eq!(err("65536"), "`65536` is not a port (1-65535)");
        assert_eq!(err("http"), "`http` is not a port (1-65535)");
        assert_eq!(err("90-80"), "range `90-80` ends before it starts");
        assert_eq!(err(""), "`` is not a port (1-65535)");
    }

    #[test]
    fn cidrs_of_both_families_parse_and_bad_ones_say_why() {
        let ok = |text: &str| text.parse::<Cidr>().unwrap().to_string();
        assert_eq!(ok("192.0.2.0/24"), "192.0.2.0/24");
        assert_eq!(ok("198.51.100.7"), "198.51.100.7/32");
        assert_eq!(ok("2001:db8::/32"), "2001:db8::/32");
        assert_eq!(ok("2001:db8::1"), "2001:db8::1/128");
        assert_eq!(ok("0.0.0.0/0"), "0.0.0.0/0");
        assert_eq!(ok("::/0"), "::/0");
        let err = |text: &str| text.parse::<Cidr>().unwrap_err();
        assert_eq!(err("192.0.2.0/33"), "`/33` is not a prefix length (0-32)");
        assert_eq!(
            err("2001:db8::/129"),
            "`/129` is not a prefix length (0-128)"
        );
        assert_eq!(
            err("192.0.2.1/24"),
            "`192.0.2.1/24` has host bits set after /24"
        );
        assert_eq!(
            err("2001:db8::1/32"),
            "`2001:db8::1/32` has host bits set after /32"
        );
        assert_eq!(
            err("example.com/8"),
            "`example.com` is not an IPv4 or IPv6 address"
        );
        assert_eq!(err("192.0.2.0/x"), "`/x` is not a prefix length (0-32)");
    }

    fn rules() -> CaptureRules {
        CaptureRules {
            inbound_port: 15006,
            outbound_port: 15001,
            admin_port: 15000,
            proxy_uid: 65532,
            skip_inbound_ports: vec![],
            skip_outbound_ports: vec![],
            skip_outbound_cidrs: vec![],
        }
    }

    #[test]
    fn colliding_ports_and_long_lists_are_refused_naming_the_flag() {
        assert!(rules().validate().is_ok());
        let same = CaptureRules {
            admin_port: 15001,
            ..rules()
        };
        assert_eq!(
            same.validate().unwrap_err().to_string(),
            "--admin-port: 15001 is also --outbound-port: each listener needs its own port"
        );
        let skipped = CaptureRules {
            skip_inbound_ports: vec!["15000-15010".parse().unwrap()],
            ..rules()
        };
        assert_eq!(
            skipped.validate().unwrap_err().to_string(),
            "--skip-inbound-ports: 15000-15010 includes the inbound port 15006"
        );
        let long = CaptureRules {
            skip_outbound_ports: vec!["1".parse().unwrap(); MAX_SKIP_ENTRIES + 1],
            ..rules()
        };
        assert_eq!(
            long.validate().unwrap_err().to_string(),
            "--skip-outbound-ports: 65 entries; at most 64"
        );
    }

    #[test]
    fn skip_cidrs_split_by_family() {
        let mixed = CaptureRules {
            skip_outbound_cidrs: vec![
                "192.0.2.0/24".parse().unwrap(),
                "2001:db8::/32".parse().unwrap(),
            ],
            ..rules()
        };
        assert_eq!(mixed.skip_cidrs(false), vec![mixed.skip_outbound_cidrs[0]]);
        assert_eq!(mixed.skip_cidrs(true), vec![mixed.skip_outbound_cidrs[1]]);
    }
}
