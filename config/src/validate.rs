//! Semantic checks that the type system cannot express: references between services and
//! routes, mutually exclusive fields, value ranges. Each finding names the offending path.

use std::collections::{HashMap, HashSet};

use crate::limits::{
    MAX_BACKOFF, MAX_FAILURE_COUNT, MAX_MATCH_CONDITIONS, MAX_POLICY_INTERVAL, MAX_PORT_LIST,
    MAX_RATE, MAX_REGEXES, MAX_RETRY_ATTEMPTS, MAX_RETRY_BODY_BYTES, MAX_ROUTE_MATCHES,
    MAX_TIMEOUT,
};
use crate::schema::{
    CircuitBreaker, Fault, OutlierDetection, PathMatch, Policy, RateLimit, Retries, Route,
    RouteMatch, Service, ValueMatch, WorkloadSelector,
};
use crate::Duration;

/// A problem found by validation: the path of the offending value and what is wrong.
pub type Finding = (String, String);

/// Checks a deserialised policy; an empty result means it is valid.
pub fn validate(policy: &Policy) -> Vec<Finding> {
    let mut findings = Vec::new();
    if let Some(selector) = &policy.workload {
        check_workloads(selector, &mut findings);
    }
    let mut listeners: HashMap<std::net::SocketAddr, &str> = HashMap::new();
    for (name, service) in &policy.services {
        check_service(name, service, &mut listeners, &mut findings);
    }
    check_addresses(policy, &mut findings);
    let mut route_names = HashSet::new();
    let mut regexes = 0;
    for (i, route) in policy.routes.iter().enumerate() {
        check_route(
            policy,
            i,
            route,
            &mut route_names,
            &mut regexes,
            &mut findings,
        );
    }
    if let Some(inbound) = &policy.inbound {
        let t = &inbound.timeouts;
        check_duration(
            "inbound.timeouts.connect",
            t.connect,
            MAX_TIMEOUT,
            &mut findings,
        );
        check_optional_timeouts(
            "inbound",
            [t.request, t.per_try, t.idle, Some(t.request_body_idle)],
            &mut findings,
        );
        if let Some(limit) = &inbound.rate_limit {
            check_rate_limit("inbound.rate_limit", limit, &mut findings);
        }
        if let Some(authorization) = &inbound.authorization {
            for (i, id) in authorization.allow.iter().enumerate() {
                check_spiffe(
                    &format!("inbound.authorization.allow[{i}]"),
                    id,
                    &mut findings,
                );
            }
        }
    }
    for (name, service) in &policy.services {
        if let Some(id) = &service.identity {
            let path = format!("services.{name}.identity");
            check_spiffe(&path, id, &mut findings);
            match &service.tls {
                Some(crate::ServiceTls::Origination(_)) => findings.push((
                    path,
                    "only checked over mesh TLS; an external service (`tls: { sni }`) is \
                     verified by name"
                        .into(),
                )),
                None if policy.mesh_tls == crate::MeshTls::Off => findings.push((
                    path,
                    "only checked over mesh TLS: add `tls: mesh` (or `mesh_tls: strict`)".into(),
                )),
                _ => {}
            }
        }
        if let Some(tls) = service
            .tls
            .as_ref()
            .and_then(crate::ServiceTls::origination)
        {
            check_origination(&format!("services.{name}.tls"), tls, &mut findings);
        }
    }
    if let Some(tracing) = &policy.tracing {
        check_tracing(tracing, &mut findings);
    }
    findings
}

/// `opaque_ports` and every service's `addresses`: no port 0, no unspecified address, and an
/// address belongs to one service only (a captured connection to it must get one policy).
fn check_addresses(policy: &Policy, findings: &mut Vec<Finding>) {
    if let Some(ports) = &policy.opaque_ports {
        if ports.len() > MAX_PORT_LIST {
            findings.push((
                "opaque_ports".into(),
                format!("at most {MAX_PORT_LIST} ports"),
            ));
        }
        for (i, port) in ports.iter().enumerate() {
            if *port == 0 {
                findings.push((format!("opaque_ports[{i}]"), "port must not be 0".into()));
            }
        }
    }
    let mut owners: HashMap<std::net::SocketAddr, &str> = HashMap::new();
    for (name, service) in &policy.services {
        let at = format!("services.{name}.addresses");
        if service.addresses.len() > MAX_PORT_LIST {
            findings.push((at.clone(), format!("at most {MAX_PORT_LIST} addresses")));
        }
        for (i, addr) in service.addresses.iter().enumerate() {
            if addr.port() == 0 || addr.ip().is_unspecified() {
                findings.push((
                    format!("{at}[{i}]"),
                    "needs a specific address and a port other than 0".into(),
                ));
            }
            match owners.insert(*addr, name) {
                Some(other) if other == name => {
                    findings.push((format!("{at}[{i}]"), format!("duplicate address {addr}")))
                }
                Some(other) => findings.push((
                    format!("{at}[{i}]"),
                    format!("{addr} is already an address of service `{other}`"),
                )),
                None => {}
            }
        }
    }
}

/// The SNI must be a name a certificate can be valid for: a DNS name (no wildcard: it names
/// one server) or an IP address.
fn check_origination(path: &str, tls: &crate::OriginationTls, findings: &mut Vec<Finding>) {
    if !is_dns_name(&tls.sni) && tls.sni.parse::<std::net::IpAddr>().is_err() {
        findings.push((
            format!("{path}.sni"),
            "must be a DNS name such as api.example.com (or an IP address)".into(),
        ));
    }
    if let Some(ca) = tls.ca.as_deref() {
        if ca.trim().is_empty() {
            findings.push((
                format!("{path}.ca"),
                "must be the path of a PEM CA bundle; leave it out for the system roots".into(),
            ));
        } else {
            check_visible(&format!("{path}.ca"), ca, findings);
        }
    }
}

/// Refuses control characters (Unicode Cc: NUL, ESC, DEL, ...) and invisible format characters
/// (Cf: zero-width space, bidi overrides, BOM, ...): a route that reads `payments` but holds a
/// U+200B matches nothing anyone can see, and a NUL cuts a string short in C-based tooling.
fn check_visible(at: &str, value: &str, findings: &mut Vec<Finding>) {
    if let Some(c) = value.chars().find(|&c| c.is_control() || is_format_char(c)) {
        findings.push((
            at.to_string(),
            format!(
                "must not contain control or invisible characters (found U+{:04X})",
                u32::from(c)
            ),
        ));
    }
}

/// Whether `c` is in Unicode's general category Cf (format), as of Unicode 15.1.
fn is_format_char(c: char) -> bool {
    const CF: &[(u32, u32)] = &[
        (0x00AD, 0x00AD),
        (0x0600, 0x0605),
        (0x061C, 0x061C),
        (0x06DD, 0x06DD),
        (0x070F, 0x070F),
        (0x0890, 0x0891),
        (0x08E2, 0x08E2),
        (0x180E, 0x180E),
        (0x200B, 0x200F),
        (0x202A, 0x202E),
        (0x2060, 0x2064),
        (0x2066, 0x206F),
        (0xFEFF, 0xFEFF),
        (0xFFF9, 0xFFFB),
        (0x110BD, 0x110BD),
        (0x110CD, 0x110CD),
        (0x13430, 0x1343F),
        (0x1BCA0, 0x1BCA3),
        (0x1D173, 0x1D17A),
        (0xE0001, 0xE0001),
        (0xE0020, 0xE007F),
    ];
    let c = u32::from(c);
    CF.iter().any(|&(lo, hi)| (lo..=hi).contains(&c))
}

fn is_dns_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
        // All digits would be a malformed IPv4 address, not a name.
        && !name.bytes().all(|b| b.is_ascii_digit() || b == b'.')
}

fn check_spiffe(path: &str, id: &str, findings: &mut Vec<Finding>) {
    if let Err(e) = crate::spiffe::parse(id) {
        findings.push((path.to_string(), e.to_string()));
    }
}

fn check_tracing(tracing: &crate::Tracing, findings: &mut Vec<Finding>) {
    if !(0.0..=1.0).contains(&tracing.ratio) {
        findings.push(("tracing.ratio".into(), "must be between 0 and 1".into()));
    }
    if let Some(otlp) = &tracing.otlp {
        let endpoint = otlp.endpoint.as_str();
        // http:// or https:// (verified against the system roots or the proxy's
        // --otlp-ca-file).
        let valid = endpoint
            .strip_prefix("http://")
            .or_else(|| endpoint.strip_prefix("https://"))
            .is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'))
            && !endpoint
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || is_format_char(c));
        if !valid {
            findings.push((
                "tracing.otlp.endpoint".into(),
                "must be an http:// or https:// URL such as http://otel-collector:4317".into(),
            ));
        }
    }
}

fn check_workloads(selector: &WorkloadSelector, findings: &mut Vec<Finding>) {
    const WHAT: &str =
        "a workload name (letters, digits, '-', '.', '_') or \"*\" for every workload";
    match selector {
        WorkloadSelector::One(name) => {
            if name != "*" && !is_valid_name(name) {
                findings.push(("workload".into(), WHAT.into()));
            }
        }
        WorkloadSelector::Many(names) => {
            if names.is_empty() {
                findings.push((
                    "workload".into(),
                    "an empty list selects no workload; name at least one".into(),
                ));
            }
            let mut seen = HashSet::new();
            for (i, name) in names.iter().enumerate() {
                let at = format!("workload[{i}]");
                if name == "*" {
                    // A list names specific workloads; mixing in "*" would make the document
                    // both a default and an override, which the merge cannot order.
                    findings.push((at, "\"*\" must stand alone, not in a list".into()));
                } else if !is_valid_name(name) {
                    findings.push((at, WHAT.into()));
                } else if !seen.insert(name) {
                    findings.push((at, format!("duplicate workload `{name}`")));
                }
            }
        }
    }
}

fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

fn check_service<'a>(
    name: &'a str,
    service: &Service,
    listeners: &mut HashMap<std::net::SocketAddr, &'a str>,
    findings: &mut Vec<Finding>,
) {
    let at = format!("services.{name}");
    if !is_valid_name(name) {
        findings.push((
            at.clone(),
            "service names may hold only letters, digits, '-', '.' and '_'".into(),
        ));
    }
    if service.discovery == Some(crate::schema::Discovery::Registry) {
        // The registry gives the endpoints: static ones or a DNS name beside it would be
        // silently replaced.
        if service.endpoints.as_ref().is_some_and(|e| !e.is_empty()) {
            findings.push((
                format!("{at}.endpoints"),
                "`discovery: registry` gives the endpoints: leave `endpoints` out".into(),
            ));
        }
        if service.dns.is_some() {
            findings.push((
                format!("{at}.dns"),
                "`discovery: registry` gives the endpoints: leave `dns` out".into(),
            ));
        }
    } else {
        check_static_or_dns(&at, service, findings);
    }
    if let Some(addr) = service.listen {
        if let Some(other) = listeners.insert(addr, name) {
            findings.push((
                format!("{at}.listen"),
                format!("{addr} is already the listen address of service `{other}`"),
            ));
        }
    }
    let t = &service.timeouts;
    check_duration(
        &format!("{at}.timeouts.connect"),
        t.connect,
        MAX_TIMEOUT,
        findings,
    );
    check_optional_timeouts(
        &at,
        [t.request, t.per_try, t.idle, Some(t.request_body_idle)],
        findings,
    );
    if let Some(retries) = &service.retries {
        check_retries(&format!("{at}.retries"), retries, findings);
    }
    if let Some(limit) = &service.rate_limit {
        check_rate_limit(&format!("{at}.rate_limit"), limit, findings);
    }
    if let Some(breaker) = &service.circuit_breaker {
        check_breaker(&format!("{at}.circuit_breaker"), breaker, findings);
    }
    if let Some(outlier) = &service.outlier_detection {
        check_outlier(&format!("{at}.outlier_detection"), outlier, findings);
    }
}

/// `endpoints` or `dns`, exactly one, each well formed.
fn check_static_or_dns(at: &str, service: &Service, findings: &mut Vec<Finding>) {
    match (&service.endpoints, &service.dns) {
        (Some(_), Some(_)) => findings.push((
            format!("{at}.dns"),
            "set `endpoints` or `dns`, not both".into(),
        )),
        (None, None) => findings.push((
            at.to_string(),
            "needs `endpoints`, `dns` or `discovery: registry`".into(),
        )),
        (Some(endpoints), None) => {
            let mut seen = HashSet::new();
            for (i, ep) in endpoints.iter().enumerate() {
                if !seen.insert(ep) {
                    findings.push((
                        format!("{at}.endpoints[{i}]"),
                        format!("duplicate endpoint {ep}"),
                    ));
                }
                if ep.port() == 0 {
                    findings.push((format!("{at}.endpoints[{i}]"), "port must not be 0".into()));
                }
            }
        }
        (None, Some(dns)) => {
            if let Err(why) = check_dns_target(dns) {
                findings.push((format!("{at}.dns"), why));
            }
        }
    }
}

fn check_fault(at: &str, fault: &Fault, findings: &mut Vec<Finding>) {
    let mut check_percent = |at: String, percent: f64| {
        if !(0.0..=100.0).contains(&percent) {
            findings.push((at, "must be between 0 and 100".into()));
        }
    };
    if let Some(delay) = &fault.delay {
        check_percent(format!("{at}.delay.percent"), delay.percent);
    }
    if let Some(abort) = &fault.abort {
        check_percent(format!("{at}.abort.percent"), abort.percent);
    }
    if let Some(delay) = &fault.delay {
        check_duration(
            &format!("{at}.delay.duration"),
            delay.duration,
            MAX_POLICY_INTERVAL,
            findings,
        );
    }
    if let Some(abort) = &fault.abort {
        if !(400..=599).contains(&abort.status) {
            findings.push((
                format!("{at}.abort.status"),
                "must be an error status (400..=599)".into(),
            ));
        }
    }
    if fault.delay.is_none() && fault.abort.is_none() {
        findings.push((at.to_string(), "needs `delay` or `abort`".into()));
    }
}

fn check_outlier(at: &str, outlier: &OutlierDetection, findings: &mut Vec<Finding>) {
    check_count(
        &format!("{at}.consecutive_failures"),
        outlier.consecutive_failures,
        MAX_FAILURE_COUNT,
        findings,
    );
    check_duration(
        &format!("{at}.base_ejection"),
        outlier.base_ejection,
        MAX_POLICY_INTERVAL,
        findings,
    );
    if outlier.max_ejection < outlier.base_ejection {
        findings.push((
            format!("{at}.max_ejection"),
            "must be at least base_ejection".into(),
        ));
    } else {
        check_at_most(
            &format!("{at}.max_ejection"),
            outlier.max_ejection,
            MAX_POLICY_INTERVAL,
            findings,
        );
    }
    if !(1..=100).contains(&outlier.max_ejected_percent) {
        findings.push((
            format!("{at}.max_ejected_percent"),
            "must be between 1 and 100".into(),
        ));
    }
}

/// Checks `request`, `per_try`, `idle` and `request_body_idle` under `{at}.timeouts`, shared by
/// services and routes.
fn check_optional_timeouts(at: &str, values: [Option<Duration>; 4], findings: &mut Vec<Finding>) {
    let names = ["request", "per_try", "idle", "request_body_idle"];
    for (name, value) in names.into_iter().zip(values) {
        if let Some(value) = value {
            check_duration(
                &format!("{at}.timeouts.{name}"),
                value,
                MAX_TIMEOUT,
                findings,
            );
        }
    }
}

/// A duration must be in `(0, max]`: zero would expire at once, and past `max` deadlines are
/// no longer plausible (and, near 2^64 s, overflow `Instant` arithmetic in the proxy).
fn check_duration(
    at: &str,
    value: Duration,
    max: std::time::Duration,
    findings: &mut Vec<Finding>,
) {
    if value.get().is_zero() {
        findings.push((at.to_string(), "must be greater than 0".into()));
    }
    check_at_most(at, value, max, findings);
}

fn check_at_most(at: &str, value: Duration, max: std::time::Duration, findings: &mut Vec<Finding>) {
    if value.get() > max {
        findings.push((at.to_string(), format!("must be at most {}", Duration(max))));
    }
}

/// A count must be in `1..=max`.
fn check_count(at: &str, value: u32, max: u32, findings: &mut Vec<Finding>) {
    if value == 0 {
        findings.push((at.to_string(), "must be > 0".into()));
    } else if value > max {
        findings.push((at.to_string(), format!("must be at most {max}")));
    }
}

/// gRPC status names accepted in `retries.grpc`, in their kebab-case spelling.
pub const GRPC_STATUS_NAMES: [&str; 16] = [
    "cancelled",
    "unknown",
    "invalid-argument",
    "deadline-exceeded",
    "not-found",
    "already-exists",
    "permission-denied",
    "resource-exhausted",
    "failed-precondition",
    "aborted",
    "out-of-range",
    "unimplemented",
    "internal",
    "unavailable",
    "data-loss",
    "unauthenticated",
];

/// Longest `retries.max_retry_after`: a request held longer than this for one upstream's
/// Retry-After is better answered at once.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

fn check_retries(at: &str, retries: &Retries, findings: &mut Vec<Finding>) {
    if retries.attempts > MAX_RETRY_ATTEMPTS {
        findings.push((
            format!("{at}.attempts"),
            format!("must be at most {MAX_RETRY_ATTEMPTS}"),
        ));
    }
    for (i, status) in retries.status.iter().enumerate() {
        if !(100..=599).contains(status) {
            findings.push((format!("{at}.status[{i}]"), "must be an HTTP status".into()));
        }
    }
    if !retries.status.is_empty() && !retries.on.contains(&crate::RetryOn::RetriableStatus) {
        findings.push((
            format!("{at}.status"),
            "has no effect unless `on` includes retriable-status".into(),
        ));
    }
    for (i, name) in retries.grpc.iter().enumerate() {
        if !GRPC_STATUS_NAMES.contains(&name.as_str()) {
            findings.push((
                format!("{at}.grpc[{i}]"),
                format!("unknown gRPC status `{name}` (e.g. unavailable, resource-exhausted)"),
            ));
        }
    }
    check_duration(
        &format!("{at}.backoff.base"),
        retries.backoff.base,
        MAX_BACKOFF,
        findings,
    );
    if retries.backoff.max < retries.backoff.base {
        findings.push((
            format!("{at}.backoff.max"),
            "must be at least backoff.base".into(),
        ));
    } else {
        check_at_most(
            &format!("{at}.backoff.max"),
            retries.backoff.max,
            MAX_BACKOFF,
            findings,
        );
    }
    if retries.max_retry_after > MAX_RETRY_AFTER {
        findings.push((
            format!("{at}.max_retry_after"),
            format!("must be at most {MAX_RETRY_AFTER}"),
        ));
    }
    let ratio = retries.budget.ratio;
    if !(0.0..=1.0).contains(&ratio) {
        findings.push((
            format!("{at}.budget.ratio"),
            "must be between 0 and 1".into(),
        ));
    }
    if retries.budget.min_per_second > MAX_RATE {
        findings.push((
            format!("{at}.budget.min_per_second"),
            format!("must be at most {MAX_RATE}"),
        ));
    }
    if retries.body_limit.0 > MAX_RETRY_BODY_BYTES {
        findings.push((
            format!("{at}.body_limit"),
            format!("must be at most {}", crate::ByteSize(MAX_RETRY_BODY_BYTES)),
        ));
    }
}

fn check_rate_limit(at: &str, limit: &RateLimit, findings: &mut Vec<Finding>) {
    check_count(
        &format!("{at}.requests_per_second"),
        limit.requests_per_second,
        MAX_RATE,
        findings,
    );
    if let Some(burst) = limit.burst {
        check_count(&format!("{at}.burst"), burst, MAX_RATE, findings);
    }
}

fn check_breaker(at: &str, breaker: &CircuitBreaker, findings: &mut Vec<Finding>) {
    if breaker.consecutive_failures.is_none()
        && breaker.failure_rate.is_none()
        && breaker.max_concurrent_requests.is_none()
        && breaker.max_pending_requests.is_none()
    {
        findings.push((
            at.to_string(),
            "needs consecutive_failures, failure_rate, max_concurrent_requests or \
             max_pending_requests"
                .into(),
        ));
    }
    if let Some(failures) = breaker.consecutive_failures {
        check_count(
            &format!("{at}.consecutive_failures"),
            failures,
            MAX_FAILURE_COUNT,
            findings,
        );
    }
    if let Some(rate) = &breaker.failure_rate {
        if !(rate.threshold > 0.0 && rate.threshold <= 1.0) {
            findings.push((
                format!("{at}.failure_rate.threshold"),
                "must be in (0, 1]".into(),
            ));
        }
        check_count(
            &format!("{at}.failure_rate.min_requests"),
            rate.min_requests,
            MAX_RATE,
            findings,
        );
        check_duration(
            &format!("{at}.failure_rate.window"),
            rate.window,
            MAX_POLICY_INTERVAL,
            findings,
        );
    }
    check_duration(
        &format!("{at}.open_for"),
        breaker.open_for,
        MAX_POLICY_INTERVAL,
        findings,
    );
    check_count(
        &format!("{at}.half_open_requests"),
        breaker.half_open_requests,
        MAX_FAILURE_COUNT,
        findings,
    );
    if breaker.max_open_for < breaker.open_for {
        findings.push((
            format!("{at}.max_open_for"),
            "must be at least open_for".into(),
        ));
    } else {
        check_at_most(
            &format!("{at}.max_open_for"),
            breaker.max_open_for,
            MAX_POLICY_INTERVAL,
            findings,
        );
    }
    for (name, limit) in [
        ("max_concurrent_requests", breaker.max_concurrent_requests),
        ("max_pending_requests", breaker.max_pending_requests),
    ] {
        if let Some(limit) = limit {
            check_count(&format!("{at}.{name}"), limit, MAX_RATE, findings);
        }
    }
}

fn check_dns_target(target: &str) -> Result<(), String> {
    let (host, port) = target
        .rsplit_once(':')
        .ok_or_else(|| format!("`{target}` must be host:port"))?;
    let bare_host = host.trim_start_matches('[').trim_end_matches(']');
    if !is_valid_name(bare_host) && bare_host.parse::<std::net::IpAddr>().is_err() {
        return Err(format!("`{host}` is not a valid host name"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("`{port}` is not a valid port")),
    }
}

fn check_route(
    policy: &Policy,
    i: usize,
    route: &Route,
    names: &mut HashSet<String>,
    regexes: &mut usize,
    findings: &mut Vec<Finding>,
) {
    let at = format!("routes[{i}]");
    if let Some(name) = &route.name {
        if !is_valid_name(name) {
            findings.push((
                format!("{at}.name"),
                "route names may hold only letters, digits, '-', '.' and '_'".into(),
            ));
        }
        if !names.insert(name.clone()) {
            findings.push((
                format!("{at}.name"),
                format!("duplicate route name `{name}`"),
            ));
        }
    }
    if route.r#match.is_none() && route.matches.is_empty() {
        findings.push((at.clone(), "needs `match` or `matches`".into()));
    }
    if route.each_match().count() > MAX_ROUTE_MATCHES {
        findings.push((
            format!("{at}.matches"),
            format!("at most {MAX_ROUTE_MATCHES} matches per route"),
        ));
    }
    for (k, m) in route.each_match().enumerate().take(MAX_ROUTE_MATCHES) {
        check_match(
            &format!("{at}.{}", route.match_path(k)),
            m,
            regexes,
            findings,
        );
    }
    if let Some(t) = &route.timeouts {
        check_optional_timeouts(
            &at,
            [t.request, t.per_try, t.idle, t.request_body_idle],
            findings,
        );
    }
    if let Some(retries) = &route.retries {
        check_retries(&format!("{at}.retries"), retries, findings);
    }
    if let Some(limit) = &route.rate_limit {
        check_rate_limit(&format!("{at}.rate_limit"), limit, findings);
    }
    if let Some(fault) = &route.fault {
        check_fault(&format!("{at}.fault"), fault, findings);
    }
    let known = |service: &str| policy.services.contains_key(service);
    match (&route.service, &route.split) {
        (Some(_), Some(_)) => findings.push((
            format!("{at}.split"),
            "set `service` or `split`, not both".into(),
        )),
        (None, None) => findings.push((at.clone(), "needs `service` or `split`".into())),
        (Some(service), None) => {
            if !known(service) {
                findings.push((format!("{at}.service"), unknown_service(policy, service)));
            }
        }
        (None, Some(split)) => {
            if split.is_empty() {
                findings.push((format!("{at}.split"), "must not be empty".into()));
            }
            let mut total: u64 = 0;
            for (j, leg) in split.iter().enumerate() {
                if !known(&leg.service) {
                    findings.push((
                        format!("{at}.split[{j}].service"),
                        unknown_service(policy, &leg.service),
                    ));
                }
                if leg.weight == 0 {
                    findings.push((format!("{at}.split[{j}].weight"), "must be > 0".into()));
                }
                total += u64::from(leg.weight);
            }
            if total > u64::from(u32::MAX) {
                findings.push((
                    format!("{at}.split"),
                    "weights must sum to at most 4294967295".into(),
                ));
            }
        }
    }
}

/// One match of a route, at `at` (`routes[2].matches[0]`). `regexes` counts the policy's
/// regular expressions so far: past [`MAX_REGEXES`] they are refused, not compiled.
fn check_match(at: &str, m: &RouteMatch, regexes: &mut usize, findings: &mut Vec<Finding>) {
    if let Some(authority) = &m.authority {
        let at = format!("{at}.authority");
        if authority.is_empty() || authority.bytes().any(|b| b.is_ascii_whitespace()) {
            findings.push((at, "must be a host name without spaces".into()));
        } else {
            check_visible(&at, authority, findings);
        }
    }
    let paths = [
        m.path_prefix.is_some().then_some("path_prefix"),
        m.path.is_some().then_some("path"),
        m.grpc.is_some().then_some("grpc"),
    ];
    let mut set = paths.iter().flatten();
    if let (Some(first), Some(second)) = (set.next(), set.next()) {
        findings.push((
            format!("{at}.{second}"),
            format!(
                "set one of `path_prefix`, `path` and `grpc`, not both `{first}` and `{second}`"
            ),
        ));
    }
    if let Some(prefix) = &m.path_prefix {
        check_path(&format!("{at}.path_prefix"), prefix, findings);
    }
    let literal = match &m.path {
        Some(PathMatch::Exact(path)) => Some(("exact", path)),
        Some(PathMatch::Prefix(path)) => Some(("prefix", path)),
        Some(PathMatch::Regex(pattern)) => {
            check_regex(&format!("{at}.path.regex"), pattern, regexes, findings);
            None
        }
        None => None,
    };
    if let Some((kind, path)) = literal {
        let at = format!("{at}.path.{kind}");
        if path.contains(['?', '#']) {
            // A request's path ends before them: such a condition would never match.
            findings.push((
                at,
                "must not contain `?` or `#` (use `query_params`)".into(),
            ));
        } else {
            check_path(&at, path, findings);
        }
    }
    if let Some(method) = &m.method {
        if method.is_empty() || !method.bytes().all(is_tchar) {
            findings.push((
                format!("{at}.method"),
                "must be an HTTP method such as GET or POST".into(),
            ));
        }
    }
    for (what, conditions) in [("headers", &m.headers), ("query_params", &m.query_params)] {
        if conditions.len() > MAX_MATCH_CONDITIONS {
            findings.push((
                format!("{at}.{what}"),
                format!("at most {MAX_MATCH_CONDITIONS} conditions"),
            ));
        }
        let mut seen = HashSet::new();
        for (j, condition) in conditions.iter().enumerate().take(MAX_MATCH_CONDITIONS) {
            let at = format!("{at}.{what}[{j}]");
            // Header names compare without case, query parameter names with it.
            let name = if what == "headers" {
                condition.name.to_ascii_lowercase()
            } else {
                condition.name.clone()
            };
            if !seen.insert(name) {
                findings.push((
                    format!("{at}.name"),
                    format!("`{}` has a condition already in this match", condition.name),
                ));
            }
            check_value_match(&at, what == "headers", condition, regexes, findings);
        }
    }
    if let Some(grpc) = &m.grpc {
        let names = [
            ("service", Some(&grpc.service)),
            ("method", grpc.method.as_ref()),
        ];
        for (field, name) in names {
            let Some(name) = name else { continue };
            if name.is_empty() || name.contains('/') || !name.bytes().all(is_tchar) {
                findings.push((
                    format!("{at}.grpc.{field}"),
                    "must be a gRPC name without `/` or spaces (`package.Service`, `Method`)"
                        .into(),
                ));
            }
        }
    }
}

/// A path condition: starts with `/`, holds nothing invisible.
fn check_path(at: &str, path: &str, findings: &mut Vec<Finding>) {
    if !path.starts_with('/') {
        findings.push((at.to_string(), "must start with `/`".into()));
    } else {
        check_visible(at, path, findings);
    }
}

fn check_value_match(
    at: &str,
    header: bool,
    condition: &ValueMatch,
    regexes: &mut usize,
    findings: &mut Vec<Finding>,
) {
    let name = &condition.name;
    let valid_name = if header {
        !name.is_empty() && name.bytes().all(is_tchar)
    } else {
        !name.is_empty() && !name.contains(['&', '=', '#']) && !name.chars().any(char::is_control)
    };
    if !valid_name {
        let what = if header {
            "must be a header name (letters, digits and !#$%&'*+-.^_`|~)"
        } else {
            "must be a query parameter name without `&`, `=` or `#`"
        };
        findings.push((format!("{at}.name"), what.into()));
    }
    let set = [
        condition.value.is_some(),
        condition.regex.is_some(),
        condition.present.is_some(),
    ];
    if set.iter().filter(|&&s| s).count() != 1 {
        findings.push((
            at.to_string(),
            "needs exactly one of `value`, `regex` and `present`".into(),
        ));
    }
    if let Some(value) = &condition.value {
        check_visible(&format!("{at}.value"), value, findings);
    }
    if let Some(pattern) = &condition.regex {
        check_regex(&format!("{at}.regex"), pattern, regexes, findings);
    }
}

/// Compiles the pattern as the proxy will; past [`MAX_REGEXES`] in the policy, refuses it
/// without compiling (the count, not the compile time, is what a huge policy could abuse).
fn check_regex(at: &str, pattern: &str, regexes: &mut usize, findings: &mut Vec<Finding>) {
    *regexes += 1;
    if *regexes > MAX_REGEXES {
        findings.push((
            at.to_string(),
            format!("at most {MAX_REGEXES} regexes in a policy"),
        ));
    } else if let Err(error) = crate::matching::compile_regex(pattern) {
        findings.push((at.to_string(), error.to_string()));
    }
}

/// A token character of RFC 9110 (method and header names).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// `unknown service `orderz``, with the closest name the document defines if one is close.
fn unknown_service(policy: &Policy, name: &str) -> String {
    let names = policy.services.keys().map(String::as_str);
    match crate::suggest::did_you_mean(name, names) {
        Some(near) => format!("unknown service `{name}`; did you mean `{near}`?"),
        None if policy.services.is_empty() => format!(
            "unknown service `{name}`: this document defines no services (each document is \
             validated alone, so it defines the services its routes use)"
        ),
        None => format!("unknown service `{name}`"),
    }
}
