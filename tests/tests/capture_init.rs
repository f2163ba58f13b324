//! `outrider-proxy init`: the capture rules installed by the real binary (over netlink in nft
//! mode, with no tool on its PATH, as in the distroless image; with the real iptables tools in
//! iptables mode) in real network namespaces, shown to redirect (and exempt) real TCP
//! connections, in both modes and both families. A "pod" namespace holds the rules and the
//! listeners standing in for the proxy and the app; a "remote" namespace, over a veth pair,
//! stands in for the rest of the network. Addresses are documentation ranges only. The real
//! nft lists what the binary installed, and installs the dry-run text for comparison.
//!
//! Needs root, `ip netns`, nft, iptables and setpriv: CI (.ci/run) has them and sets
//! OUTRIDER_REQUIRE_NETNS=1, so there a missing piece fails the tests; elsewhere each test
//! prints why it is skipped.

#![allow(clippy::unwrap_used, missing_docs)]

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use outrider_e2e::proxy_binary;

const POD_V4: &str = "198.51.100.1";
const REMOTE_V4: &str = "198.51.100.2";
/// On the remote side, routed through it; in the skipped CIDR 192.0.2.0/24.
const SKIPPED_V4: &str = "192.0.2.2";
const POD_V6: &str = "2001:db8::1";
const REMOTE_V6: &str = "2001:db8::2";
/// On the remote side, routed through it; in the skipped CIDR 2001:db8:1::/64.
const SKIPPED_V6: &str = "2001:db8:1::2";
const PROXY_UID: &str = "65532";

/// The skip flags every installation in these tests uses.
const SKIPS: [&str; 6] = [
    "--skip-inbound-ports",
    "9090",
    "--skip-outbound-ports",
    "443",
    "--skip-outbound-cidrs",
    "192.0.2.0/24,2001:db8:1::/64",
];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Nft,
    Iptables,
}

impl Mode {
    fn flag(self) -> &'static str {
        match self {
            Mode::Nft => "nft",
            Mode::Iptables => "iptables",
        }
    }
}

/// Besides ip, nft and setpriv: the iptables backend's tools.
const IPTABLES_TOOLS: [(&str, &str); 3] = [
    ("iptables-restore", "--version"),
    ("ip6tables-restore", "--version"),
    ("iptables-save", "--version"),
];

/// A pod namespace and a remote one joined by a veth pair, with their probe processes; all
/// removed on drop, whatever the test did.
struct Net {
    pod: String,
    remote: String,
    dir: PathBuf,
    probe: PathBuf,
    children: Vec<Child>,
}

impl Drop for Net {
    fn drop(&mut self) {
        let namespaces = [&self.pod, &self.remote];
        outrider_e2e::netns::tear_down(&mut self.children, namespaces, &self.dir);
    }
}

fn sh(args: &[&str]) -> Output {
    let output = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

impl Net {
    /// The namespaces, or `None` (with the reason printed) where they cannot be made.
    fn setup() -> Option<Net> {
        if !outrider_e2e::netns::can_run(&IPTABLES_TOOLS) {
            return None;
        }
        // setpriv runs the probe as the proxy's UID: it needs a copy it can reach.
        let (id, dir) = outrider_e2e::netns::shared_dir(
            "orcap",
            &[(env!("CARGO_BIN_EXE_netns-probe").as_ref(), "netns-probe")],
        );
        let probe = dir.join("netns-probe");
        let net = Net {
            pod: format!("{id}-pod"),
            remote: format!("{id}-remote"),
            dir,
            probe,
            children: Vec::new(),
        };
        let (pod, remote) = (net.pod.as_str(), net.remote.as_str());
        sh(&["ip", "netns", "add", pod]);
        sh(&["ip", "netns", "add", remote]);
        sh(&[
            "ip", "-n", pod, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
            "netns", remote,
        ]);
        for (ns, addrs) in [
            (pod, vec![format!("{POD_V4}/24"), format!("{POD_V6}/64")]),
            (
                remote,
                vec![
                    format!("{REMOTE_V4}/24"),
                    format!("{SKIPPED_V4}/32"),
                    format!("{REMOTE_V6}/64"),
                    format!("{SKIPPED_V6}/128"),
                ],
            ),
        ] {
            for addr in &addrs {
                sh(&["ip", "-n", ns, "addr", "add", addr, "dev", "eth0", "nodad"]);
            }
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
            sh(&["ip", "-n", ns, "link", "set", "eth0", "up"]);
        }
        sh(&[
            "ip",
            "-n",
            pod,
            "route",
            "add",
            "192.0.2.0/24",
            "via",
            REMOTE_V4,
        ]);
        sh(&[
            "ip",
            "-n",
            pod,
            "-6",
            "route",
            "add",
            "2001:db8:1::/64",
            "via",
            REMOTE_V6,
        ]);
        Some(net)
    }

    /// Starts a probe listening on `addrs` in `ns`, answering with `tag`.
    fn listen(&mut self, ns: &str, tag: &str, addrs: &[&str]) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(&self.probe)
            .args(["listen", tag])
            .args(addrs)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        self.children.push(child);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(10)).unwrap_or_default();
        assert_eq!(
            line.trim(),
            "ready",
            "probe in {ns} on {addrs:?} did not start"
        );
    }

    /// Connects from `ns` (as the proxy's UID if `as_proxy`), returning the listener's answer.
    fn connect(&self, ns: &str, addr: &str, as_proxy: bool) -> String {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", ns]);
        if as_proxy {
            command.args([
                "setpriv",
                "--reuid",
                PROXY_UID,
                "--regid",
                PROXY_UID,
                "--clear-groups",
            ]);
        }
        // The probe bounds its own connect and read (3 s each).
        let output = command
            .arg(&self.probe)
            .args(["connect", addr])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "connect from {ns} to {addr}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap().trim().to_string()
    }

    /// Runs `outrider-proxy init --mode MODE args` in the pod namespace; in nft mode with an
    /// empty environment and a PATH holding nothing, so no tool could be run.
    fn init(&self, mode: Mode, args: &[&str]) -> Output {
        self.init_command(mode)
            .args(["init", "--mode", mode.flag()])
            .args(args)
            .output()
            .unwrap()
    }

    /// `outrider-proxy` in the pod namespace (see [`Net::init`]), its arguments to be added.
    fn init_command(&self, mode: Mode) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.pod]);
        if mode == Mode::Nft {
            let empty = self.dir.join("empty-path");
            std::fs::create_dir_all(&empty).unwrap();
            command
                .arg("env")
                .arg("-i")
                .arg(format!("PATH={}", empty.display()));
        }
        command.arg(proxy_binary());
        command
    }

    fn init_ok(&self, mode: Mode, args: &[&str]) -> String {
        let output = self.init(mode, args);
        assert!(
            output.status.success(),
            "init {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    fn pod_sh(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.pod];
        full.extend_from_slice(args);
        String::from_utf8(sh(&full).stdout).unwrap()
    }

    /// The pod's whole ruleset as the mode's tools show it (iptables: without the
    /// timestamped comments and the counters, which traffic changes).
    fn ruleset(&self, mode: Mode) -> String {
        match mode {
            Mode::Nft => self.pod_sh(&["nft", "list", "ruleset"]),
            Mode::Iptables => {
                let mut text = String::new();
                for tool in ["iptables-save", "ip6tables-save"] {
                    for line in self.pod_sh(&[tool]).lines() {
                        if line.starts_with('#') {
                            continue;
                        }
                        let line = match line.split_once(" [") {
                            Some((chain, _)) if line.starts_with(':') => chain,
                            _ => line,
                        };
                        text.push_str(line);
                        text.push('\n');
                    }
                }
                text
            }
        }
    }

    /// Rules of someone else's, which init and cleanup must leave alone.
    fn add_bystander_rules(&self, mode: Mode) {
        match mode {
            Mode::Nft => {
                self.pod_sh(&["nft", "add", "table", "inet", "bystander"]);
                self.pod_sh(&[
                    "nft",
                    "add",
                    "chain",
                    "inet",
                    "bystander",
                    "out",
                    "{ type filter hook output priority 0; policy accept; }",
                ]);
                self.pod_sh(&[
                    "nft",
                    "add",
                    "rule",
                    "inet",
                    "bystander",
                    "out",
                    "tcp",
                    "dport",
                    "7",
                    "accept",
                ]);
            }
            Mode::Iptables => {
                self.pod_sh(&[
                    "iptables",
                    "-t",
                    "nat",
                    "-A",
                    "OUTPUT",
                    "-d",
                    "192.0.2.99/32",
                    "-j",
                    "RETURN",
                ]);
                self.pod_sh(&[
                    "ip6tables",
                    "-t",
                    "nat",
                    "-A",
                    "OUTPUT",
                    "-d",
                    "2001:db8:2::99/128",
                    "-j",
                    "RETURN",
                ]);
            }
        }
    }
}

fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn assert_direct(answer: &str, tag: &str, local: &str) {
    assert!(
        answer.starts_with(&format!("{tag} local={local} ")),
        "expected {tag} at {local} directly, got {answer:?}"
    );
}

/// Installs, reinstalls, dry-runs and removes the rules, and checks real connections
/// in between: what is captured lands on the proxy's ports with its original destination,
/// what is exempt reaches its destination.
fn capture_round_trip(mode: Mode) {
    let Some(mut net) = Net::setup() else { return };
    net.add_bystander_rules(mode);
    let before = net.ruleset(mode);

    let dry = net.init_ok(mode, &[&["--dry-run"][..], &SKIPS].concat());
    let redirect = match mode {
        Mode::Nft => "redirect to :15006",
        Mode::Iptables => "REDIRECT --to-ports 15006",
    };
    assert!(dry.contains(redirect), "dry run printed:\n{dry}");
    assert_eq!(net.ruleset(mode), before, "--dry-run changed the ruleset");

    net.init_ok(mode, &SKIPS);
    let installed = net.ruleset(mode);
    assert_ne!(installed, before);
    net.init_ok(mode, &SKIPS);
    assert_eq!(
        net.ruleset(mode),
        installed,
        "init twice changed the ruleset"
    );
    if mode == Mode::Nft {
        // The default mode is nft: the same table again, nothing else.
        let output = net
            .init_command(mode)
            .arg("init")
            .args(SKIPS)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(net.ruleset(mode), installed, "--mode auto differs from nft");
    }

    let (pod, remote) = (net.pod.clone(), net.remote.clone());
    net.listen(
        &pod,
        "pod",
        &[
            "0.0.0.0:15001",
            "[::]:15001",
            "0.0.0.0:15006",
            "[::]:15006",
            "0.0.0.0:15000",
            "[::]:15000",
            "0.0.0.0:8080",
            "[::]:8080",
            "0.0.0.0:9090",
            "[::]:9090",
            "127.0.0.1:9999",
            "[::1]:9999",
        ],
    );
    net.listen(
        &remote,
        "remote",
        &["0.0.0.0:80", "[::]:80", "0.0.0.0:443", "[::]:443"],
    );

    for (remote_ip, skipped_ip, pod_ip, proxy_ip, loopback) in [
        (
            REMOTE_V4.to_string(),
            SKIPPED_V4.to_string(),
            POD_V4.to_string(),
            "127.0.0.1",
            "127.0.0.1",
        ),
        (
            format!("[{REMOTE_V6}]"),
            format!("[{SKIPPED_V6}]"),
            format!("[{POD_V6}]"),
            "[::1]",
            "[::1]",
        ),
    ] {
        // Outbound: the app's connection lands on the outbound port, destination intact.
        assert_eq!(
            net.connect(&pod, &format!("{remote_ip}:80"), false),
            format!("pod local={proxy_ip}:15001 orig={remote_ip}:80")
        );
        // The proxy's own connections, loopback, skipped ports and networks go direct.
        assert_direct(
            &net.connect(&pod, &format!("{remote_ip}:80"), true),
            "remote",
            &format!("{remote_ip}:80"),
        );
        assert_direct(
            &net.connect(&pod, &format!("{loopback}:9999"), false),
            "pod",
            &format!("{loopback}:9999"),
        );
        assert_direct(
            &net.connect(&pod, &format!("{remote_ip}:443"), false),
            "remote",
            &format!("{remote_ip}:443"),
        );
        assert_direct(
            &net.connect(&pod, &format!("{skipped_ip}:80"), false),
            "remote",
            &format!("{skipped_ip}:80"),
        );
        // Inbound: to the app's port lands on the inbound port; admin and skipped ports don't.
        assert_eq!(
            net.connect(&remote, &format!("{pod_ip}:8080"), false),
            format!("pod local={pod_ip}:15006 orig={pod_ip}:8080")
        );
        assert_direct(
            &net.connect(&remote, &format!("{pod_ip}:15000"), false),
            "pod",
            &format!("{pod_ip}:15000"),
        );
        assert_direct(
            &net.connect(&remote, &format!("{pod_ip}:9090"), false),
            "pod",
            &format!("{pod_ip}:9090"),
        );
    }

    net.init_ok(mode, &["--cleanup"]);
    assert_eq!(
        net.ruleset(mode),
        before,
        "--cleanup left a different ruleset"
    );
    assert_direct(
        &net.connect(&pod, &format!("{REMOTE_V4}:80"), false),
        "remote",
        &format!("{REMOTE_V4}:80"),
    );
    assert_direct(
        &net.connect(&remote, &format!("{POD_V4}:8080"), false),
        "pod",
        &format!("{POD_V4}:8080"),
    );
    // Cleaning up what is not there is fine and changes nothing.
    net.init_ok(mode, &["--cleanup"]);
    assert_eq!(net.ruleset(mode), before);
}

#[test]
fn nft_rules_capture_and_exempt_and_clean_up() {
    capture_round_trip(Mode::Nft);
}

#[test]
fn iptables_rules_capture_and_exempt_and_clean_up() {
    capture_round_trip(Mode::Iptables);
}

/// Bad flags: exit 64 naming the flag, before any rule is touched.
fn bad_flags_change_nothing(mode: Mode) {
    let Some(net) = Net::setup() else { return };
    net.add_bystander_rules(mode);
    let before = net.ruleset(mode);
    for (args, names) in [
        (
            &["--skip-outbound-cidrs", "192.0.2.1/24"][..],
            "--skip-outbound-cidrs",
        ),
        (
            &["--skip-outbound-cidrs", "2001:db8::/129"][..],
            "--skip-outbound-cidrs",
        ),
        (
            &["--skip-inbound-ports", "70000"][..],
            "--skip-inbound-ports",
        ),
        (&["--admin-port", "15001"][..], "--admin-port"),
        (&["--inbound-port", "0"][..], "--inbound-port"),
    ] {
        let output = net.init(mode, args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains(names), "{args:?}: {stderr}");
        assert_eq!(net.ruleset(mode), before, "{args:?} changed the ruleset");
    }
}

#[test]
fn nft_bad_flags_change_nothing() {
    bad_flags_change_nothing(Mode::Nft);
}

#[test]
fn iptables_bad_flags_change_nothing() {
    bad_flags_change_nothing(Mode::Iptables);
}

/// nft: our table is owned by another process (an `nft -i` holding it with `flags owner`),
/// so the kernel refuses the netlink transaction: init exits 71 naming the rule, ruleset untouched.
#[test]
fn nft_refused_rule_is_named_and_nothing_is_installed() {
    let Some(mut net) = Net::setup() else { return };
    net.add_bystander_rules(Mode::Nft);
    let mut owner = Command::new("ip")
        .args(["netns", "exec", &net.pod, "nft", "-i"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = owner.stdin.take().unwrap();
    net.children.push(owner);
    stdin
        .write_all(b"add table inet outrider { flags owner; }\n")
        .unwrap();
    eventually("the owned table", || {
        net.ruleset(Mode::Nft).contains("flags owner")
    });
    let before = net.ruleset(Mode::Nft);

    let output = net.init(Mode::Nft, &SKIPS);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(71), "{stderr}");
    assert!(
        stderr.contains("nf_tables refused rule \"table inet outrider\""),
        "{stderr}"
    );
    assert_eq!(net.ruleset(Mode::Nft), before);
    drop(stdin);
}

/// iptables: the IPv4 rules apply, then ip6tables-restore fails (a base chain named
/// OUTRIDER_OUTPUT already exists in the ip6 nat table): init exits 71 naming that rule and
/// puts the IPv4 nat table back as it was.
#[test]
fn iptables_refused_ipv6_rule_rolls_back_ipv4() {
    let Some(net) = Net::setup() else { return };
    net.add_bystander_rules(Mode::Iptables);
    net.pod_sh(&[
        "nft",
        "add",
        "chain",
        "ip6",
        "nat",
        "OUTRIDER_OUTPUT",
        "{ type nat hook output priority 0; }",
    ]);
    let before = net.ruleset(Mode::Iptables);

    let output = net.init(Mode::Iptables, &SKIPS);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(71), "{stderr}");
    assert!(
        stderr.contains("ip6tables-restore refused rule \"chain OUTRIDER_OUTPUT\""),
        "{stderr}"
    );
    // As iptables shows it (iptables-nft may leave an empty builtin chain it created for the
    // jump materialised in nft's view; to iptables builtin chains always exist).
    assert_eq!(net.ruleset(Mode::Iptables), before);
}

#[test]
fn dry_run_prints_the_rules_without_root_tools() {
    // The nft rendering needs no kernel: it works anywhere, as root or not.
    let output = Command::new(proxy_binary())
        .args([
            "init",
            "--mode",
            "nft",
            "--dry-run",
            "--skip-outbound-cidrs",
            "2001:db8::/32",
        ])
        .output()
        .unwrap();
    assert!(output.status.success());
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        stdout.contains("ip6 daddr 2001:db8::/32 return"),
        "{stdout}"
    );
    assert!(stdout.contains("meta skuid 65532 return"), "{stdout}");
}

/// What `init` sends over netlink is what `nft -f` makes of the dry-run text: the same
/// listing and the same expressions (nft's bytecode view, handles aside), for byte-aligned
/// and masked prefixes of both families, single ports and ranges.
#[test]
fn nft_netlink_table_equals_nft_f_of_the_dry_run() {
    let Some(net) = Net::setup() else { return };
    let skips = [
        "--skip-inbound-ports",
        "22,9000-9100",
        "--skip-outbound-ports",
        "443,5432-5440",
        "--skip-outbound-cidrs",
        "192.0.2.0/24,198.51.100.7,10.16.0.0/12,0.0.0.0/0,2001:db8:1::/48,2001:db8::/29,::1",
    ];
    let listings = |net: &Net| {
        let listing = net.pod_sh(&["nft", "list", "table", "inet", "outrider"]);
        let bytecode = net.pod_sh(&[
            "nft",
            "--debug=netlink",
            "list",
            "table",
            "inet",
            "outrider",
        ]);
        // `inet outrider inbound 4 3`: the rule's handle and its predecessor's.
        let bytecode: Vec<String> = bytecode
            .lines()
            .map(|line| match line.strip_prefix("inet outrider ") {
                Some(rest) => format!("inet outrider {}", rest.split(' ').next().unwrap()),
                None => line.to_string(),
            })
            .collect();
        (listing, bytecode)
    };

    net.init_ok(Mode::Nft, &skips);
    let ours = listings(&net);
    assert!(
        ours.0.contains("ip daddr 10.16.0.0/12 return"),
        "{}",
        ours.0
    );
    net.init_ok(Mode::Nft, &["--cleanup"]);
    assert_eq!(net.ruleset(Mode::Nft), "");

    let dry = net.init_ok(Mode::Nft, &[&["--dry-run"][..], &skips].concat());
    let script = net.dir.join("dry-run.nft");
    std::fs::write(&script, &dry).unwrap();
    net.pod_sh(&["nft", "-f", script.to_str().unwrap()]);
    let nfts = listings(&net);
    assert_eq!(ours.0, nfts.0);
    assert_eq!(ours.1, nfts.1);
    // Our cleanup removes what nft installed, too.
    net.init_ok(Mode::Nft, &["--cleanup"]);
    assert_eq!(net.ruleset(Mode::Nft), "");
}
