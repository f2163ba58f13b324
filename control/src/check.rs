//! `outriderctl check`: what is wrong with the mesh and how to fix it, from one look at the
//! control plane's status (like `linkerd check` or `istioctl analyze`). [`findings`] is a pure
//! function of that status, the control plane's version and the measured clock skew, so each
//! rule is unit-tested without a server.
//!
//! Exit codes: 0 nothing found, 1 at least one error, 2 warnings only (69, 77... as every
//! command when the control plane cannot be asked).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::api::{format_utc, Status};
use crate::output::{paint, Paint};

/// `check`'s exit code when an error was found.
pub const EX_ERRORS: u8 = 1;
/// `check`'s exit code when only warnings were found.
pub const EX_WARNINGS: u8 = 2;

/// A proxy that has not ACKed a version sent this long ago is stale.
pub const STALE_AFTER_MS: u64 = 30_000;
/// Clock skew between the CLI's machine and the control plane worth a warning, and an error
/// (workload certificates are backdated 60 s; beyond that a fresh one is not yet valid).
pub const SKEW_WARNING_MS: u64 = 5_000;
/// See [`SKEW_WARNING_MS`].
pub const SKEW_ERROR_MS: u64 = 60_000;
/// The CA certificate expiring within this long is a warning; within a week, an error.
pub const CA_WARNING_MS: u64 = 30 * 24 * 3600 * 1000;
/// See [`CA_WARNING_MS`].
pub const CA_ERROR_MS: u64 = 7 * 24 * 3600 * 1000;

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Something does not work as configured (exit 1).
    Error,
    /// Something likely wrong, or about to go wrong (exit 2 when there is no error).
    Warning,
}

/// One problem and its fix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    /// `error` or `warning`.
    pub severity: Severity,
    /// Which rule found it (stable): `state-directory`, `proxy-nack`, `proxy-stale`,
    /// `proxy-disconnected`, `workload-unnamed`, `document-unused`, `document-rejected`,
    /// `document-overrides-file`, `ca-expiry`, `certificate-renewal`, `clock-skew`.
    pub check: String,
    /// What it is about: a proxy id, a workload, a document, an identity, `control-plane`.
    pub subject: String,
    /// What is wrong.
    pub message: String,
    /// One line saying how to fix it.
    pub fix: String,
}

/// The control plane as `check` saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlPlane {
    /// The URL asked.
    pub url: String,
    /// `outrider-control`'s version.
    pub version: String,
    /// The policy version in force.
    pub version_in_force: u64,
    /// The control plane's clock minus this machine's, in ms (measured at the middle of the
    /// request).
    pub clock_skew_ms: i64,
}

/// `check -o json`'s document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The control plane.
    pub control_plane: ControlPlane,
    /// Proxies connected now.
    pub proxies_connected: usize,
    /// Of those, in sync with the version in force for their workload.
    pub proxies_in_sync: usize,
    /// Every problem found, errors first.
    pub findings: Vec<Finding>,
    /// How many findings are errors.
    pub errors: usize,
    /// How many are warnings.
    pub warnings: usize,
}

impl Report {
    /// The exit code: 0, [`EX_ERRORS`] or [`EX_WARNINGS`].
    pub fn exit_code(&self) -> u8 {
        if self.errors > 0 {
            EX_ERRORS
        } else if self.warnings > 0 {
            EX_WARNINGS
        } else {
            0
        }
    }
}

/// Everything `status` says that needs fixing, as of `now_ms` (the control plane's clock).
pub fn findings(status: &Status, now_ms: u64, clock_skew_ms: i64) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut add = |severity, check: &str, subject: &str, message: String, fix: String| {
        out.push(Finding {
            severity,
            check: check.into(),
            subject: subject.into(),
            message,
            fix,
        });
    };
    if let Some(store) = &status.store {
        if let Some(error) = &store.error {
            add(
                Severity::Error,
                "state-directory",
                &store.dir,
                format!("the control plane cannot write its state directory, so no change is made: {error}"),
                "free space or make the directory writable; pending changes then land on their own".into(),
            );
        }
    }
    let skew = clock_skew_ms.unsigned_abs();
    if skew >= SKEW_WARNING_MS {
        add(
            if skew >= SKEW_ERROR_MS { Severity::Error } else { Severity::Warning },
            "clock-skew",
            "control-plane",
            format!("the control plane's clock is {:.1} s {} this machine's", skew as f64 / 1000.0, if clock_skew_ms > 0 { "ahead of" } else { "behind" }),
            "synchronise both clocks (NTP, chrony): certificates and times in status depend on them".into(),
        );
    }
    let named: BTreeSet<&str> = status
        .documents
        .iter()
        .filter(|d| d.source.is_some())
        .flat_map(|d| d.workloads.iter().map(String::as_str))
        .filter(|w| *w != "*")
        .collect();
    let connected: Vec<_> = status.proxies.iter().filter(|p| p.connected).collect();
    for p in &connected {
        match p.state.as_str() {
            "nack" => {
                let (version, reason) = p
                    .last_nack
                    .as_ref()
                    .map_or((0, "-"), |n| (n.version, n.error.as_str()));
                add(
                    Severity::Error,
                    "proxy-nack",
                    &p.proxy,
                    format!("refused version {version} of workload `{}` and keeps an older policy: {reason}", p.workload),
                    format!("change the policy so this proxy can apply it (`outriderctl get {}` shows it; the reason is the proxy's), then apply again", p.workload),
                );
            }
            "pending" => {
                let waited = p
                    .pending_since_ms
                    .map_or(0, |since| now_ms.saturating_sub(since));
                if waited >= STALE_AFTER_MS {
                    add(
                        Severity::Warning,
                        "proxy-stale",
                        &p.proxy,
                        format!("has not answered version {} sent {} s ago", p.version_sent.unwrap_or(0), waited / 1000),
                        "look at the proxy's logs: it may be stuck, overloaded or unable to reach the control plane's ACK endpoint".into(),
                    );
                }
            }
            _ => {}
        }
    }
    for p in status.proxies.iter().filter(|p| !p.connected) {
        let since = p
            .disconnected_at_ms
            .map_or_else(|| "-".to_string(), format_utc);
        add(
            Severity::Warning,
            "proxy-disconnected",
            &p.proxy,
            format!("its stream to the control plane closed at {since}; if it still runs, it serves a policy that may be out of date (workload `{}`, version {})", p.workload, p.version_applied.map_or_else(|| "-".to_string(), |v| v.to_string())),
            "nothing to do if its pod is gone (forgotten after --registry-expiry); otherwise look at its logs and its --control URL".into(),
        );
    }
    let mut unnamed: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for p in connected.iter().filter(|p| !p.workload_named) {
        unnamed.entry(&p.workload).or_default().push(&p.proxy);
    }
    for (workload, proxies) in &unnamed {
        let guess = closest(workload, named.iter().copied());
        let message = format!(
            "{} {} subscribe{} as workload `{workload}`, which no document names: {} only the defaults{}",
            if proxies.len() == 1 { "proxy" } else { "proxies" },
            proxies.join(", "),
            if proxies.len() == 1 { "s" } else { "" },
            if proxies.len() == 1 { "it runs" } else { "they run" },
            guess.map_or_else(String::new, |g| format!(" (did you mean `{g}`?)")),
        );
        let fix = match guess {
            Some(g) => format!("start the proxy with --workload {g}, or name `{workload}` in a document if it needs a policy of its own"),
            None => format!("check the proxy's --workload, or name `{workload}` in a document (`workload: {workload}`)"),
        };
        add(
            Severity::Warning,
            "workload-unnamed",
            workload,
            message,
            fix,
        );
    }
    let running: BTreeSet<&str> = connected.iter().map(|p| p.workload.as_str()).collect();
    for d in status.documents.iter().filter(|d| d.source.is_some()) {
        let specific: Vec<&str> = d
            .workloads
            .iter()
            .map(String::as_str)
            .filter(|w| *w != "*")
            .collect();
        if specific.is_empty() || specific.iter().any(|w| running.contains(w)) {
            continue;
        }
        let guesses: Vec<String> = specific
            .iter()
            .filter_map(|w| closest(w, running.iter().copied()).map(|g| format!("`{g}` for `{w}`")))
            .collect();
        add(
            Severity::Warning,
            "document-unused",
            &d.name,
            format!(
                "names workload{} {} but no connected proxy runs {}{}",
                if specific.len() == 1 { "" } else { "s" },
                specific.iter().map(|w| format!("`{w}`")).collect::<Vec<_>>().join(", "),
                if specific.len() == 1 { "it" } else { "any of them" },
                if guesses.is_empty() { String::new() } else { format!(" (did you mean {}?)", guesses.join(", ")) },
            ),
            "correct the workload name in the document, or ignore this until those workloads are deployed".into(),
        );
    }
    for d in &status.documents {
        if let Some(r) = &d.rejected {
            let first = r.message.lines().next().unwrap_or_default();
            let message = strip_name(first, &d.name);
            let fix = if r.from_file {
                format!("fix the file {} (`outriderctl validate -f {}` lists every problem); the control plane retries it on save", d.name, d.name)
            } else if d.source.is_none() {
                format!("apply a corrected {} (`outriderctl validate` first), or `outriderctl delete {}` to drop it", d.name, d.name)
            } else {
                format!("apply a corrected {} (`outriderctl validate` first); its previous version stays in force meanwhile", d.name)
            };
            add(
                Severity::Error,
                "document-rejected",
                &d.name,
                format!("rejected: {message}"),
                fix,
            );
        }
        if d.overrides_file && d.file_differs {
            add(
                Severity::Warning,
                "document-overrides-file",
                &d.name,
                "an applied document overrides the policy directory's file of the same name, and the file now differs: its text is not in force".into(),
                format!("`outriderctl delete {}` hands the document back to the file; or apply the file's text", d.name),
            );
        }
    }
    if let Some(certs) = &status.certificates {
        if certs.ca_not_after_ms > 0 {
            let left = certs.ca_not_after_ms.saturating_sub(now_ms);
            if left < CA_WARNING_MS {
                add(
                    if left < CA_ERROR_MS { Severity::Error } else { Severity::Warning },
                    "ca-expiry",
                    "mesh-ca",
                    if left == 0 {
                        format!("the mesh CA certificate expired at {}", format_utc(certs.ca_not_after_ms))
                    } else {
                        format!("the mesh CA certificate expires at {} (in {} h)", format_utc(certs.ca_not_after_ms), left / 3_600_000)
                    },
                    "rotate the CA (--ca-cert/--ca-key) before it expires; every workload certificate chains to it".into(),
                );
            }
        }
        for c in &certs.issued {
            let lifetime = c.not_after_ms.saturating_sub(c.issued_at_ms).max(1);
            let left = c.not_after_ms.saturating_sub(now_ms);
            // Proxies renew at about 70% of the lifetime: one with under 20% left was not.
            if left.saturating_mul(5) < lifetime {
                add(
                    Severity::Warning,
                    "certificate-renewal",
                    &c.identity,
                    format!("its certificate expires at {} and was not renewed (proxies renew at about 70% of its lifetime)", format_utc(c.not_after_ms)),
                    "look at the logs of the proxies with this identity for renewal errors; ignore if its pods are gone".into(),
                );
            }
        }
    }
    out.sort_by_key(|f| f.severity);
    out
}

/// The report of [`findings`].
pub fn report(status: &Status, url: &str, version: &str, clock_skew_ms: i64) -> Report {
    let now = if status.now_ms > 0 {
        status.now_ms
    } else {
        crate::api::now_ms()
    };
    let findings = findings(status, now, clock_skew_ms);
    let errors = findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .count();
    let connected = status.proxies.iter().filter(|p| p.connected).count();
    Report {
        control_plane: ControlPlane {
            url: url.to_string(),
            version: version.to_string(),
            version_in_force: status.version,
            clock_skew_ms,
        },
        proxies_connected: connected,
        proxies_in_sync: status
            .proxies
            .iter()
            .filter(|p| p.connected && p.state == "in-sync")
            .count(),
        warnings: findings.len() - errors,
        errors,
        findings,
    }
}

/// The report for a terminal.
pub fn render(report: &Report, colour: bool) -> String {
    let cp = &report.control_plane;
    let mut out = format!(
        "{} control plane {} reachable: outrider-control {}, version in force {}, clock skew {:.1} s\n",
        paint(colour, Paint::Green, "ok"),
        cp.url,
        cp.version,
        cp.version_in_force,
        cp.clock_skew_ms as f64 / 1000.0
    );
    let _ = writeln!(
        out,
        "{} {} prox{} connected, {} in sync",
        paint(colour, Paint::Green, "ok"),
        report.proxies_connected,
        if report.proxies_connected == 1 {
            "y"
        } else {
            "ies"
        },
        report.proxies_in_sync
    );
    for f in &report.findings {
        let label = match f.severity {
            Severity::Error => paint(colour, Paint::Red, "error"),
            Severity::Warning => paint(colour, Paint::Yellow, "warning"),
        };
        let _ = writeln!(
            out,
            "{label} [{}] {}: {}\n    fix: {}",
            f.check, f.subject, f.message, f.fix
        );
    }
    if report.findings.is_empty() {
        out.push_str("no problems found\n");
    } else {
        let _ = writeln!(
            out,
            "{} error{}, {} warning{}",
            report.errors,
            if report.errors == 1 { "" } else { "s" },
            report.warnings,
            if report.warnings == 1 { "" } else { "s" },
        );
    }
    out
}

/// `message` without a leading `name: ` (conflict messages name their document already).
pub fn strip_name<'a>(message: &'a str, name: &str) -> &'a str {
    message
        .strip_prefix(name)
        .and_then(|rest| rest.strip_prefix(": "))
        .unwrap_or(message)
}

/// The candidate nearest to `name` by edit distance, if near enough to be a typo (at most 2
/// edits, and fewer than half its length).
pub fn closest<'a>(name: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .filter(|c| *c != name)
        .map(|c| (edit_distance(name, c), c))
        .filter(|(d, _)| *d <= 2 && d * 2 < name.chars().count().max(1))
        .min()
        .map(|(_, c)| c)
}

/// Levenshtein distance, transpositions counting as one edit (`shpo` is one from `shop`).
pub fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut rows = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in rows[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (rows[i - 1][j] + 1)
                .min(rows[i][j - 1] + 1)
                .min(rows[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = best;
        }
    }
    rows[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{DocumentStatus, Nack, ProxyStatus};

    fn proxy(id: &str, workload: &str, state: &str, named: bool) -> ProxyStatus {
        ProxyStatus {
            proxy: id.into(),
            workload: workload.into(),
            connected: state != "disconnected",
            connected_since_ms: 0,
            version_sent: Some(2),
            version_applied: Some(1),
            applied_at_ms: None,
            last_nack: (state == "nack").then(|| Nack {
                version: 2,
                error: "cannot bind 127.0.0.1:9001: Address in use".into(),
                at_ms: 0,
            }),
            state: state.into(),
            pending_since_ms: Some(0),
            workload_named: named,
            disconnected_at_ms: None,
            replica: None,
        }
    }

    fn document(name: &str, workloads: &[&str]) -> DocumentStatus {
        DocumentStatus {
            name: name.into(),
            source: Some("file".into()),
            changed_at: Some(1),
            rejected: None,
            workloads: workloads.iter().map(|w| w.to_string()).collect(),
            overrides_file: false,
            file_differs: false,
        }
    }

    fn status(documents: Vec<DocumentStatus>, proxies: Vec<ProxyStatus>) -> Status {
        Status {
            version: 2,
            documents,
            proxies,
            store: None,
            certificates: None,
            now_ms: 0,
            replica: None,
        }
    }

    #[test]
    fn a_misspelt_workload_is_named_with_a_suggestion_both_ways() {
        let s = status(
            vec![document("shop.yaml", &["shop"]), document("d.yaml", &["*"])],
            vec![proxy("pod-1", "shpo", "in-sync", false)],
        );
        let found = findings(&s, 0, 0);
        assert_eq!(found.len(), 2, "{found:#?}");
        assert_eq!(found[0].check, "workload-unnamed");
        assert_eq!(
            found[0].message,
            "proxy pod-1 subscribes as workload `shpo`, which no document names: it runs only the defaults (did you mean `shop`?)"
        );
        assert_eq!(found[1].check, "document-unused");
        assert_eq!(
            found[1].message,
            "names workload `shop` but no connected proxy runs it (did you mean `shpo` for `shop`?)"
        );
    }

    #[test]
    fn nacks_are_errors_and_stale_pending_and_disconnected_warnings() {
        let mut stale = proxy("pod-2", "shop", "pending", true);
        stale.pending_since_ms = Some(1_000);
        let mut fresh = proxy("pod-3", "shop", "pending", true);
        fresh.pending_since_ms = Some(1_001);
        let s = status(
            vec![document("shop.yaml", &["shop"])],
            vec![proxy("pod-1", "shop", "nack", true), stale, fresh],
        );
        let mut s = s;
        s.proxies.push(proxy("pod-4", "shop", "disconnected", true));
        let found = findings(&s, 1_000 + STALE_AFTER_MS, 0);
        let checks: Vec<(&str, &str)> = found
            .iter()
            .map(|f| (f.check.as_str(), f.subject.as_str()))
            .collect();
        assert_eq!(
            checks,
            [
                ("proxy-nack", "pod-1"),
                ("proxy-stale", "pod-2"),
                ("proxy-disconnected", "pod-4")
            ]
        );
        assert!(found[0].message.ends_with("Address in use"), "{found:#?}");
        let report = report(&s, "u", "v", 0);
        assert_eq!(report.exit_code(), EX_ERRORS);
    }

    #[test]
    fn clock_skew_and_expiring_ca() {
        let mut s = status(vec![], vec![]);
        assert_eq!(report(&s, "u", "v", 4_999).exit_code(), 0);
        assert_eq!(report(&s, "u", "v", -5_000).exit_code(), EX_WARNINGS);
        assert_eq!(report(&s, "u", "v", 60_000).exit_code(), EX_ERRORS);
        s.certificates = Some(crate::api::CertificatesStatus {
            ca_not_after_ms: CA_WARNING_MS,
            leaf_ttl_ms: 100,
            issued: vec![crate::api::IssuedCertificate {
                identity: "spiffe://td/ns/a/sa/b".into(),
                issued_at_ms: 0,
                not_after_ms: 100,
            }],
        });
        let found = findings(&s, 81, 0);
        let checks: Vec<&str> = found.iter().map(|f| f.check.as_str()).collect();
        assert_eq!(checks, ["ca-expiry", "certificate-renewal"]);
        assert_eq!(found[0].severity, Severity::Warning);
        let within_a_week = findings(&s, CA_WARNING_MS - CA_ERROR_MS + 1, 0);
        assert_eq!(within_a_week[0].severity, Severity::Error);
        assert_eq!(within_a_week[0].check, "ca-expiry");
        assert!(findings(&s, 79, 0)
            .iter()
            .all(|f| f.check != "certificate-renewal"));
    }

    #[test]
    fn edit_distance_counts_a_swap_as_one() {
        assert_eq!(edit_distance("shpo", "shop"), 1);
        assert_eq!(edit_distance("checkout", "chekout"), 1);
        assert_eq!(edit_distance("a", "b"), 1);
        assert_eq!(closest("shpo", ["shop", "cart"].into_iter()), Some("shop"));
        // Too far from anything: no guess.
        assert_eq!(closest("ab", ["cd"].into_iter()), None);
    }
}
