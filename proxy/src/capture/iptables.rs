//! The rules as `iptables-restore --noflush` input for the nat table, once per family
//! (`iptables-restore`, `ip6tables-restore`): our own chains OUTRIDER_INBOUND (jumped to from
//! PREROUTING) and OUTRIDER_OUTPUT (from OUTPUT). A restore is one transaction per table: a
//! failing line applies none of its lines. Declaring a chain flushes it, and the jumps found in
//! the current table are deleted before one is inserted, so applying twice changes nothing.

use super::rules::{CaptureRules, PortRange};
use super::Script;

/// Our chain for inbound TCP, jumped to from PREROUTING.
pub const INBOUND_CHAIN: &str = "OUTRIDER_INBOUND";
/// Our chain for outbound TCP, jumped to from OUTPUT.
pub const OUTBOUND_CHAIN: &str = "OUTRIDER_OUTPUT";
const CHAINS: [&str; 2] = [INBOUND_CHAIN, OUTBOUND_CHAIN];

/// An address family, with its own tools and nat table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// IPv4: `iptables-save`, `iptables-restore`.
    V4,
    /// IPv6: `ip6tables-save`, `ip6tables-restore`.
    V6,
}

impl Family {
    /// The tool that prints the family's current rules.
    pub fn save_tool(self) -> &'static str {
        match self {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
        }
    }

    /// The tool that applies rules to the family's tables.
    pub fn restore_tool(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }
}

/// What of ours the nat table holds now, read from `iptables-save -t nat`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Existing {
    /// Our chains that exist.
    pub chains: Vec<&'static str>,
    /// Rules elsewhere that jump to our chains, as saved (`-A PREROUTING ... -j OUTRIDER_...`).
    pub jumps: Vec<String>,
}

impl Existing {
    /// Nothing of ours is installed.
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.jumps.is_empty()
    }
}

/// Finds our chains and the jumps to them in `iptables-save -t nat` output.
pub fn parse_save(text: &str) -> Existing {
    let mut existing = Existing::default();
    let mut in_nat = false;
    for line in text.lines().map(str::trim) {
        if let Some(table) = line.strip_prefix('*') {
            in_nat = table == "nat";
        } else if !in_nat {
            continue;
        } else if let Some(declared) = line.strip_prefix(':') {
            let name = declared.split_whitespace().next().unwrap_or_default();
            if let Some(chain) = CHAINS.iter().find(|c| **c == name) {
                existing.chains.push(chain);
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let mut words = rule.split_whitespace();
            let in_our_chain = words.next().is_some_and(|chain| CHAINS.contains(&chain));
            let mut words = rule.split_whitespace().peekable();
            let mut targets_ours = false;
            while let Some(word) = words.next() {
                if (word == "-j" || word == "-g")
                    && words.peek().is_some_and(|target| CHAINS.contains(target))
                {
                    targets_ours = true;
                }
            }
            if targets_ours && !in_our_chain {
                existing.jumps.push(line.to_string());
            }
        }
    }
    existing
}

/// The restore input that installs (or reinstalls) the rules for one family, given what of
/// ours the table holds now.
pub fn render(rules: &CaptureRules, family: Family, existing: &Existing) -> Script {
    let mut script = Script::default();
    script.line("*nat", "table nat");
    for chain in CHAINS {
        // Under --noflush, declaring a chain creates it or empties it.
        script.line(format!(":{chain} - [0:0]"), chain_label(chain));
    }
    for jump in &existing.jumps {
        script.line(delete(jump), "remove the previous jump");
    }

    let inbound = |script: &mut Script, matches: String, target: String, label: &'static str| {
        rule(script, INBOUND_CHAIN, &matches, &target, label);
    };
    inbound(
        &mut script,
        format!("-p tcp -m tcp --dport {}", rules.admin_port),
        "RETURN".into(),
        "admin port",
    );
    for ports in &rules.skip_inbound_ports {
        inbound(
            &mut script,
            format!("-p tcp -m tcp --dport {}", PortRange::iptables(ports)),
            "RETURN".into(),
            "skip inbound ports",
        );
    }
    inbound(
        &mut script,
        "-p tcp".into(),
        format!("REDIRECT --to-ports {}", rules.inbound_port),
        "inbound to proxy",
    );

    let outbound = |script: &mut Script, matches: String, target: String, label: &'static str| {
        rule(script, OUTBOUND_CHAIN, &matches, &target, label);
    };
    outbound(
        &mut script,
        format!("-m owner --uid-owner {}", rules.proxy_uid),
        "RETURN".into(),
        "proxy uid",
    );
    outbound(&mut script, "-o lo".into(), "RETURN".into(), "loopback");
    for ports in &rules.skip_outbound_ports {
        outbound(
            &mut script,
            format!("-p tcp -m tcp --dport {}", PortRange::iptables(ports)),
            "RETURN".into(),
            "skip outbound ports",
        );
    }
    for cidr in rules.skip_cidrs(family == Family::V6) {
        outbound(
            &mut script,
            format!("-d {cidr}"),
            "RETURN".into(),
            "skip outbound cidrs",
        );
    }
    outbound(
        &mut script,
        "-p tcp".into(),
        format!("REDIRECT --to-ports {}", rules.outbound_port),
        "outbound to proxy",
    );

    script.line(
        format!(
            "-I PREROUTING 1 -p tcp -m comment --comment \"outrider inbound\" -j {INBOUND_CHAIN}"
        ),
        "jump to OUTRIDER_INBOUND",
    );
    script.line(
        format!(
            "-I OUTPUT 1 -p tcp -m comment --comment \"outrider outbound\" -j {OUTBOUND_CHAIN}"
        ),
        "jump to OUTRIDER_OUTPUT",
    );
    script.line("COMMIT", "table nat");
    script
}

/// The restore input that removes our jumps and chains and nothing else, or `None` when the
/// table holds nothing of ours (then there is nothing to run).
pub fn render_cleanup(existing: &Existing) -> Option<Script> {
    if existing.is_empty() {
        return None;
    }
    let mut script = Script::default();
    script.line("*nat", "table nat");
    // A chain must be empty to be deleted: declaring it under --noflush empties it.
    for chain in &existing.chains {
        script.line(format!(":{chain} - [0:0]"), chain_label(chain));
    }
    for jump in &existing.jumps {
        script.line(delete(jump), "remove a jump to our chains");
    }
    for chain in &existing.chains {
        script.line(format!("-X {chain}"), chain_label(chain));
    }
    script.line("COMMIT", "table nat");
    Some(script)
}

fn rule(script: &mut Script, chain: &str, matches: &str, target: &str, label: &'static str) {
    script.line(
        format!("-A {chain} {matches} -m comment --comment \"{label}\" -j {target}"),
        label,
    );
}

fn chain_label(chain: &str) -> &'static str {
    if chain == INBOUND_CHAIN {
        "chain OUTRIDER_INBOUND"
    } else {
        "chain OUTRIDER_OUTPUT"
    }
}

/// `-A CHAIN spec` as saved becomes `-D CHAIN spec`.
fn delete(saved: &str) -> String {
    format!("-D {}", saved.trim_start_matches("-A "))
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
            skip_inbound_ports: vec!["22".parse().unwrap()],
            skip_outbound_ports: vec!["8000-8100".parse().unwrap()],
            skip_outbound_cidrs: vec![
                "192.0.2.0/24".parse().unwrap(),
                "2001:db8:1::/48".parse().unwrap(),
            ],
        }
    }

    #[test]
    fn renders_our_chains_and_jumps_per_family() {
        assert_eq!(
            render(&rules(), Family::V4, &Existing::default()).text(),
            r#"*nat
:OUTRIDER_INBOUND - [0:0]
:OUTRIDER_OUTPUT - [0:0]
-A OUTRIDER_INBOUND -p tcp -m tcp --dport 15000 -m comment --comment "admin port" -j RETURN
-A OUTRIDER_INBOUND -p tcp -m tcp --dport 22 -m comment --comment "skip inbound ports" -j RETURN
-A OUTRIDER_INBOUND -p tcp -m comment --comment "inbound to proxy" -j REDIRECT --to-ports 15006
-A OUTRIDER_OUTPUT -m owner --uid-owner 65532 -m comment --comment "proxy uid" -j RETURN
-A OUTRIDER_OUTPUT -o lo -m comment --comment "loopback" -j RETURN
-A OUTRIDER_OUTPUT -p tcp -m tcp --dport 8000:8100 -m comment --comment "skip outbound ports" -j RETURN
-A OUTRIDER_OUTPUT -d 192.0.2.0/24 -m comment --comment "skip outbound cidrs" -j RETURN
-A OUTRIDER_OUTPUT -p tcp -m comment --comment "outbound to proxy" -j REDIRECT --to-ports 15001
-I PREROUTING 1 -p tcp -m comment --comment "outrider inbound" -j OUTRIDER_INBOUND
-I OUTPUT 1 -p tcp -m comment --comment "outrider outbound" -j OUTRIDER_OUTPUT
COMMIT
"#
        );
        let v6 = render(&rules(), Family::V6, &Existing::default()).text();
        assert!(v6.contains("-d 2001:db8:1::/48 "));
        assert!(!v6.contains("192.0.2.0"));
    }

    const SAVED: &str = r#"# Generated by iptables-save
*filter
:OUTPUT ACCEPT [0:0]
-A OUTPUT -j OUTRIDER_OUTPUT
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:OUTRIDER_INBOUND - [0:0]
:OUTRIDER_OUTPUT - [0:0]
:OTHER - [0:0]
-A PREROUTING -p tcp -m comment --comment "outrider inbound" -j OUTRIDER_INBOUND
-A OUTPUT -d 192.0.2.99/32 -j RETURN
-A OUTPUT -p tcp -m comment --comment "outrider outbound" -j OUTRIDER_OUTPUT
-A OUTRIDER_OUTPUT -p tcp -j REDIRECT --to-ports 15001
-A OTHER -j OUTRIDER_OUTPUT_NOT_OURS
COMMIT
"#;

    #[test]
    fn finds_our_chains_and_only_the_jumps_to_them() {
        assert_eq!(
            parse_save(SAVED),
            Existing {
                chains: vec![INBOUND_CHAIN, OUTBOUND_CHAIN],
                jumps: vec![
                    r#"-A PREROUTING -p tcp -m comment --comment "outrider inbound" -j OUTRIDER_INBOUND"#
                        .to_string(),
                    r#"-A OUTPUT -p tcp -m comment --comment "outrider outbound" -j OUTRIDER_OUTPUT"#
                        .to_string(),
                ],
            }
        );
        assert!(parse_save("").is_empty());
    }

    #[test]
    fn reinstalling_deletes_the_previous_jumps_first() {
        let text = render(&rules(), Family::V4, &parse_save(SAVED)).text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            &lines[3..5],
            &[
                r#"-D PREROUTING -p tcp -m comment --comment "outrider inbound" -j OUTRIDER_INBOUND"#,
                r#"-D OUTPUT -p tcp -m comment --comment "outrider outbound" -j OUTRIDER_OUTPUT"#,
            ]
        );
    }

    #[test]
    fn cleanup_removes_exactly_ours() {
        assert_eq!(render_cleanup(&Existing::default()), None);
        assert_eq!(
            render_cleanup(&parse_save(SAVED)).unwrap().text(),
            r#"*nat
:OUTRIDER_INBOUND - [0:0]
:OUTRIDER_OUTPUT - [0:0]
-D PREROUTING -p tcp -m comment --comment "outrider inbound" -j OUTRIDER_INBOUND
-D OUTPUT -p tcp -m comment --comment "outrider outbound" -j OUTRIDER_OUTPUT
-X OUTRIDER_INBOUND
-X OUTRIDER_OUTPUT
COMMIT
"#
        );
    }
}
