//! The rules as one nftables transaction (`nft -f -`): our own `table inet outrider` (both
//! families) with a prerouting chain for inbound and an output chain for outbound. The table
//! is declared, deleted and recreated in the same transaction, so applying it twice yields the
//! same ruleset, and a failing line leaves the kernel's ruleset as it was.

use super::rules::{CaptureRules, PortRange};
use super::Script;

/// Our table, in both families at once.
pub const TABLE: &str = "inet outrider";

/// The transaction that installs (or reinstalls) the rules.
pub fn render(rules: &CaptureRules) -> Script {
    let mut script = Script::default();
    // Declaring the table first makes the delete valid when it does not exist yet.
    script.line(format!("table {TABLE} {{}}"), "table inet outrider");
    script.line(format!("delete table {TABLE}"), "table inet outrider");
    script.line(format!("table {TABLE} {{"), "table inet outrider");

    script.line("\tchain inbound {", "chain inbound");
    script.line(
        "\t\ttype nat hook prerouting priority -100; policy accept;",
        "chain inbound",
    );
    rule(
        &mut script,
        format!("\t\ttcp dport {} return", rules.admin_port),
        "admin port",
    );
    if let Some(ports) = port_set(&rules.skip_inbound_ports) {
        rule(
            &mut script,
            format!("\t\ttcp dport {ports} return"),
            "skip inbound ports",
        );
    }
    rule(
        &mut script,
        format!("\t\tmeta l4proto tcp redirect to :{}", rules.inbound_port),
        "inbound to proxy",
    );
    script.line("\t}", "chain inbound");

    script.line("\tchain output {", "chain output");
    script.line(
        "\t\ttype nat hook output priority -100; policy accept;",
        "chain output",
    );
    rule(
        &mut script,
        format!("\t\tmeta skuid {} return", rules.proxy_uid),
        "proxy uid",
    );
    rule(&mut script, "\t\toifname \"lo\" return", "loopback");
    if let Some(ports) = port_set(&rules.skip_outbound_ports) {
        rule(
            &mut script,
            format!("\t\ttcp dport {ports} return"),
            "skip outbound ports",
        );
    }
    for (ipv6, selector, label) in [
        (false, "ip", "skip outbound cidrs ipv4"),
        (true, "ip6", "skip outbound cidrs ipv6"),
    ] {
        let cidrs = rules.skip_cidrs(ipv6);
        if !cidrs.is_empty() {
            let list: Vec<String> = cidrs.iter().map(ToString::to_string).collect();
            rule(
                &mut script,
                format!("\t\t{selector} daddr {{ {} }} return", list.join(", ")),
                label,
            );
        }
    }
    rule(
        &mut script,
        format!("\t\tmeta l4proto tcp redirect to :{}", rules.outbound_port),
        "outbound to proxy",
    );
    script.line("\t}", "chain output");
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

/// A rule line, commented with its name so `nft list table` says what each rule is for.
fn rule(script: &mut Script, text: impl Into<String>, label: &'static str) {
    let text = text.into();
    script.line(format!("{text} comment \"{label}\""), label);
}

/// `{ 22, 8000-8100 }`, or `None` for an empty list.
fn port_set(ports: &[PortRange]) -> Option<String> {
    if ports.is_empty() {
        return None;
    }
    let list: Vec<String> = ports.iter().map(PortRange::nft).collect();
    Some(format!("{{ {} }}", list.join(", ")))
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
    fn skip_lists_become_sets_per_family() {
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
        assert!(
            lines.contains(&"tcp dport { 22, 9000-9100 } return comment \"skip inbound ports\"")
        );
        assert!(lines.contains(&"tcp dport { 443 } return comment \"skip outbound ports\""));
        assert!(lines.contains(
            &"ip daddr { 192.0.2.0/24, 198.51.100.7/32 } return comment \"skip outbound cidrs ipv4\""
        ));
        assert!(lines.contains(
            &"ip6 daddr { 2001:db8:1::/48 } return comment \"skip outbound cidrs ipv6\""
        ));
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
