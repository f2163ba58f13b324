//! The rules as nftables sees them: our own `table inet outrider` (both families) with a
//! prerouting chain for inbound and an output chain for outbound, described once as data
//! ([`table`]) and rendered two ways: as `nft -f` text for `--dry-run` ([`render`]), and as
//! nf_tables netlink messages for the kernel (`super::netlink`). The table is declared,
//! deleted and recreated in the same transaction, so applying it twice yields the same
//! ruleset, and a failing rule leaves the kernel's ruleset as it was.
//!
//! Each skip entry is a rule of its own rather than an element of an anonymous set: a rule is
//! a few expressions the netlink encoder writes directly, where a set would need its own
//! messages (interval elements and their end markers); at most 64 entries per list keep the
//! chain short.

use std::fmt;
use std::net::IpAddr;

use super::rules::{CaptureRules, Cidr, PortRange};
use super::Script;

/// Our table, in both families at once.
pub const TABLE: &str = "inet outrider";
/// The table's name within the `inet` family.
pub const TABLE_NAME: &str = "outrider";
/// Priority of both base chains: that of `dstnat` (and of iptables' nat table).
pub const NAT_PRIORITY: i32 = -100;

/// Where a base chain hooks into the stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// Packets arriving from the network (inbound).
    Prerouting,
    /// Packets this host's sockets send (outbound).
    Output,
}

impl Hook {
    /// The name nft uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::Prerouting => "prerouting",
            Self::Output => "output",
        }
    }
}

/// A condition of a rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Match {
    /// The transport protocol is TCP.
    Tcp,
    /// TCP with a destination port in this range.
    TcpDport(PortRange),
    /// Sent by a socket of this UID.
    SkUid(u32),
    /// Leaving through this interface.
    OifName(&'static str),
    /// To an address in this network (implies its family).
    Daddr(Cidr),
}

impl fmt::Display for Match {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp => f.write_str("meta l4proto tcp"),
            Self::TcpDport(ports) => write!(f, "tcp dport {}", ports.nft()),
            Self::SkUid(uid) => write!(f, "meta skuid {uid}"),
            Self::OifName(name) => write!(f, "oifname \"{name}\""),
            Self::Daddr(cidr) => {
                let selector = match cidr.network {
                    IpAddr::V4(_) => "ip",
                    IpAddr::V6(_) => "ip6",
                };
                write!(f, "{selector} daddr {cidr}")
            }
        }
    }
}

/// What a rule does with a packet that matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Leave the chain: the packet is not redirected.
    Return,
    /// Redirect to this local port (destination NAT to the receiving address).
    RedirectTo(u16),
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Return => f.write_str("return"),
            Self::RedirectTo(port) => write!(f, "redirect to :{port}"),
        }
    }
}

/// One rule: all matches, then the action; `label` becomes its comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Conditions, all of which must hold.
    pub matches: Vec<Match>,
    /// What happens then.
    pub action: Action,
    /// What the rule is for (its comment, and its name in errors).
    pub label: &'static str,
}

impl fmt::Display for Rule {
    /// The rule as nft writes it, without the comment.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for m in &self.matches {
            write!(f, "{m} ")?;
        }
        write!(f, "{}", self.action)
    }
}

/// A nat base chain of our table with its rules, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// Its name in the table.
    pub name: &'static str,
    /// Its name in errors (`chain inbound`).
    pub label: &'static str,
    /// Where it hooks.
    pub hook: Hook,
    /// Its priority at that hook.
    pub priority: i32,
    /// Its rules.
    pub rules: Vec<Rule>,
}

/// The chains our table holds for `rules`.
pub fn table(rules: &CaptureRules) -> Vec<Chain> {
    let rule = |matches: Vec<Match>, action: Action, label: &'static str| Rule {
        matches,
        action,
        label,
    };
    let mut inbound = vec![rule(
        vec![Match::TcpDport(PortRange {
            first: rules.admin_port,
            last: rules.admin_port,
        })],
        Action::Return,
        "admin port",
    )];
    for ports in &rules.skip_inbound_ports {
        inbound.push(rule(
            vec![Match::TcpDport(*ports)],
            Action::Return,
            "skip inbound ports",
        ));
    }
    inbound.push(rule(
        vec![Match::Tcp],
        Action::RedirectTo(rules.inbound_port),
        "inbound to proxy",
    ));

    let mut output = vec![
        rule(
            vec![Match::SkUid(rules.proxy_uid)],
            Action::Return,
            "proxy uid",
        ),
        rule(vec![Match::OifName("lo")], Action::Return, "loopback"),
    ];
    for ports in &rules.skip_outbound_ports {
        output.push(rule(
            vec![Match::TcpDport(*ports)],
            Action::Return,
            "skip outbound ports",
        ));
    }
    for (ipv6, label) in [
        (false, "skip outbound cidrs ipv4"),
        (true, "skip outbound cidrs ipv6"),
    ] {
        for cidr in rules.skip_cidrs(ipv6) {
            output.push(rule(vec![Match::Daddr(cidr)], Action::Return, label));
        }
    }
    output.push(rule(
        vec![Match::Tcp],
        Action::RedirectTo(rules.outbound_port),
        "outbound to proxy",
    ));
    vec![
        Chain {
            name: "inbound",
            label: "chain inbound",
            hook: Hook::Prerouting,
            priority: NAT_PRIORITY,
            rules: inbound,
        },
        Chain {
            name: "output",
            label: "chain output",
            hook: Hook::Output,
            priority: NAT_PRIORITY,
            rules: output,
        },
    ]
}

/// The `nft -f` transaction equivalent to what `init` sends the kernel (for `--dry-run`).
pub fn render(rules: &CaptureRules) -> Script {
    let mut script = Script::default();
    // Declaring the table first makes the delete valid when it does not exist yet.
    script.line(format!("table {TABLE} {{}}"), "table inet outrider");
    script.line(format!("delete table {TABLE}"), "table inet outrider");
    script.line(format!("table {TABLE} {{"), "table inet outrider");
    for chain in table(rules) {
        script.line(format!("\tchain {} {{", chain.name), chain.label);
        script.line(
            format!(
                "\t\ttype nat hook {} priority {}; policy accept;",
                chain.hook.name(),
                chain.priority
            ),
            chain.label,
        );
        for rule in &chain.rules {
            script.line(format!("\t\t{rule} comment \"{}\"", rule.label), rule.label);
        }
        script.line("\t}", chain.label);
    }
    script.line("}", "table inet outrider");
    script
}

/// The transaction that removes our table and nothing else (a no-op when it is absent).
pub fn render_cleanup() -> Script {
    let mut script = Script::default();
    script.line(format!("table {TABLE} {{}}"), "table inet outrider");
    script.line(format!("delete table {TABLE}"), "table inet outrider");
    script
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

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
    fn defaults_render_the_whole_table() {
        assert_eq!(
            render(&rules()).text(),
            "table inet outrider {}
delete table inet outrider
table inet outrider {
\tchain inbound {
\t\ttype nat hook prerouting priority -100; policy accept;
\t\ttcp dport 15000 return comment \"admin port\"
\t\tmeta l4proto tcp redirect to :15006 comment \"inbound to proxy\"
\t}
\tchain output {
\t\ttype nat hook output priority -100; policy accept;
\t\tmeta skuid 65532 return comment \"proxy uid\"
\t\toifname \"lo\" return comment \"loopback\"
\t\tmeta l4proto tcp redirect to :15001 comment \"outbound to proxy\"
\t}
}
"
        );
    }

    #[test]
    fn each_skip_entry_is_a_rule_of_its_family() {
        let rules = CaptureRules {
            skip_inbound_ports: vec!["22".parse().unwrap(), "9000-9100".parse().unwrap()],
            skip_outbound_ports: vec!["443".parse().unwrap()],
            skip_outbound_cidrs: vec![
                "192.0.2.0/24".parse().unwrap(),
                "2001:db8:1::/48".parse().unwrap(),
                "198.51.100.7".parse().unwrap(),
            ],
            ..rules()
        };
        let text = render(&rules).text();
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        for line in [
            "tcp dport 22 return comment \"skip inbound ports\"",
            "tcp dport 9000-9100 return comment \"skip inbound ports\"",
            "tcp dport 443 return comment \"skip outbound ports\"",
            "ip daddr 192.0.2.0/24 return comment \"skip outbound cidrs ipv4\"",
            "ip daddr 198.51.100.7/32 return comment \"skip outbound cidrs ipv4\"",
            "ip6 daddr 2001:db8:1::/48 return comment \"skip outbound cidrs ipv6\"",
        ] {
            assert!(lines.contains(&line), "{line} missing from\n{text}");
        }
        // Exceptions come before the redirect they exempt from.
        let position = |needle: &str| lines.iter().position(|l| l.contains(needle)).unwrap();
        assert!(position("skip outbound cidrs ipv6") < position("outbound to proxy"));
        assert!(position("skip inbound ports") < position("inbound to proxy"));
    }

    #[test]
    fn a_failing_line_is_named_by_its_rule() {
        let script = render(&rules());
        assert_eq!(script.label_of_line(6), Some("admin port"));
        assert_eq!(script.label_of_line(1), Some("table inet outrider"));
        assert_eq!(script.label_of_line(99), None);
    }

    #[test]
    fn cleanup_touches_only_our_table() {
        assert_eq!(
            render_cleanup().text(),
            "table inet outrider {}\ndelete table inet outrider\n"
        );
    }
}
