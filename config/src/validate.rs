//! Semantic checks that the type system cannot express: references between services and
//! routes, mutually exclusive fields, value ranges. Each finding names the offending path.

use std::collections::{HashMap, HashSet};

use crate::limits::{
    MAX_AUTHZ_LIST, MAX_AUTHZ_RULES, MAX_BACKOFF, MAX_FAILURE_COUNT, MAX_HEADER_CHANGES,
    MAX_HEADER_VALUE_BYTES, MAX_MATCH_CONDITIONS, MAX_MIRROR_BODY_BYTES, MAX_MIRROR_IN_FLIGHT,
    MAX_POLICY_INTERVAL, MAX_PORT_LIST, MAX_RATE, MAX_REGEXES, MAX_RETRY_ATTEMPTS,
    MAX_RETRY_BODY_BYTES, MAX_ROUTE_FILTERS, MAX_ROUTE_MATCHES, MAX_TIMEOUT,
};
use crate::schema::{
    Authorization, AuthzFrom, AuthzTo, CircuitBreaker, Fault, HashOn, HeaderModifier,
    LoadBalancing, OutlierDetection, PathMatch, PathModifier, Policy, RateLimit, RequestMirror,
    Retries, Route, RouteFilter, RouteMatch, Service, ValueMatch, WorkloadSelector,
};
use crate::Duration;

/// A problem found by validation: the path of the offending value and what is wrong.
pub type Finding = (String, String);

/// Checks a deserialised policy; an empty result means it is valid.
pub fn validate(policy: &Policy) -> Vec<Finding> {
    validate_as(policy, false)
}

/// [`validate`], for a document the control plane composes: with `attachments`, a route
/// entry named like a route translated from a Gateway API document and without a match
/// attaches policy to that route ([`crate::gateway::compose`]) and is checked as such.
pub fn validate_as(policy: &Policy, attachments: bool) -> Vec<Finding> {
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
        if attachments && crate::gateway::is_attachment(route) {
            check_attachment(i, route, &mut route_names, &mut findings);
            continue;
        }
        if attachments
            && route
                .name
                .as_deref()
                .is_some_and(crate::gateway::is_gateway_route_name)
        {
            findings.push((
                format!("routes[{i}].name"),
                "names starting with `httproute.` or `grpcroute.` are those of routes \
                 translated from Gateway API documents: an entry of such a name attaches policy \
                 to one and has no match"
                    .into(),
            ));
        }
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
            check_authorization(authorization, &mut regexes, &mut findings);
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

/// `inbound.authorization`: the first form's `allow` list, and each rule.
fn check_authorization(
    authorization: &Authorization,
    regexes: &mut usize,
    findings: &mut Vec<Finding>,
) {
    const AT: &str = "inbound.authorization";
    check_list_len(&format!("{AT}.allow"), authorization.allow.len(), findings);
    for (i, id) in authorization.allow.iter().enumerate() {
        check_spiffe(&format!("{AT}.allow[{i}]"), id, findings);
    }
    if authorization.rules.len() > MAX_AUTHZ_RULES {
        findings.push((
            format!("{AT}.rules"),
            format!("at most {MAX_AUTHZ_RULES} rules"),
        ));
    }
    let mut names: HashMap<&str, usize> = HashMap::new();
    for (i, rule) in authorization.rules.iter().enumerate().take(MAX_AUTHZ_RULES) {
        let at = format!("{AT}.rules[{i}]");
        if !is_valid_name(&rule.name) {
            findings.push((
                format!("{at}.name"),
                "must be 1 to 253 letters, digits, '-', '.' and '_'".into(),
            ));
        } else if let Some(first) = names.insert(&rule.name, i) {
            names.insert(&rule.name, first);
            findings.push((
                format!("{at}.name"),
                format!(
                    "duplicate rule name `{}` (first at rules[{first}])",
                    rule.name
                ),
            ));
        }
        if let Some(from) = &rule.from {
            check_authz_from(&format!("{at}.from"), from, findings);
        }
        if let Some(to) = &rule.to {
            check_authz_to(&format!("{at}.to"), to, regexes, findings);
        }
    }
}

/// A rule's `from`: identity patterns, Kubernetes names, and `authenticated` /
/// `unauthenticated`, which only `true` and only one of them make sense for.
fn check_authz_from(at: &str, from: &AuthzFrom, findings: &mut Vec<Finding>) {
    let lists = [
        ("identities", &from.identities),
        ("namespaces", &from.namespaces),
        ("service_accounts", &from.service_accounts),
    ];
    for (field, list) in lists {
        check_list_len(&format!("{at}.{field}"), list.len(), findings);
        for (j, value) in list.iter().enumerate().take(MAX_AUTHZ_LIST) {
            let at = format!("{at}.{field}[{j}]");
            let checked = match field {
                _ if value == "*" => Err(format!(
                    "`*` here is any caller with a mesh identity: write `authenticated: true` \
                     instead of `{field}: [\"*\"]`"
                )),
                "identities" => crate::spiffe::parse_pattern(value)
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                _ if crate::spiffe::is_dns1123_label(value) => Ok(()),
                _ => Err(
                    "must be a Kubernetes name (DNS-1123 label): 1 to 63 lowercase \
                          letters, digits and '-', starting and ending with a letter or digit"
                        .into(),
                ),
            };
            if let Err(message) = checked {
                findings.push((at, message));
            }
        }
    }
    for (field, value) in [
        ("authenticated", from.authenticated),
        ("unauthenticated", from.unauthenticated),
    ] {
        if value == Some(false) {
            let other = if field == "authenticated" {
                "unauthenticated"
            } else {
                "authenticated"
            };
            findings.push((
                format!("{at}.{field}"),
                format!("only `true` is meaningful; write `{other}: true` for the other callers"),
            ));
        }
    }
    if from.authenticated.is_some() && from.unauthenticated.is_some() {
        findings.push((
            format!("{at}.unauthenticated"),
            "set one of `authenticated` and `unauthenticated`, not both (leave `from` out for \
             every caller)"
                .into(),
        ));
    } else if from.unauthenticated == Some(true) && from.names_identities() {
        findings.push((
            format!("{at}.unauthenticated"),
            "a caller without a mesh identity has no identity, namespace or service account: \
             this `from` would never match (write two rules)"
                .into(),
        ));
    }
}

/// A rule's `to`: paths as route matches' `path`, methods, header conditions.
fn check_authz_to(at: &str, to: &AuthzTo, regexes: &mut usize, findings: &mut Vec<Finding>) {
    check_list_len(&format!("{at}.paths"), to.paths.len(), findings);
    for (j, path) in to.paths.iter().enumerate().take(MAX_AUTHZ_LIST) {
        check_path_match(&format!("{at}.paths[{j}]"), path, regexes, findings);
    }
    check_list_len(&format!("{at}.methods"), to.methods.len(), findings);
    for (j, method) in to.methods.iter().enumerate().take(MAX_AUTHZ_LIST) {
        if method.is_empty() || !method.bytes().all(is_tchar) {
            findings.push((
                format!("{at}.methods[{j}]"),
                "must be an HTTP method such as GET or POST".into(),
            ));
        }
    }
    if to.headers.len() > MAX_MATCH_CONDITIONS {
        findings.push((
            format!("{at}.headers"),
            format!("at most {MAX_MATCH_CONDITIONS} conditions"),
        ));
    }
    let mut seen = HashSet::new();
    for (j, condition) in to.headers.iter().enumerate().take(MAX_MATCH_CONDITIONS) {
        let at = format!("{at}.headers[{j}]");
        if !seen.insert(condition.name.to_ascii_lowercase()) {
            findings.push((
                format!("{at}.name"),
                format!("`{}` has a condition already in this rule", condition.name),
            ));
        }
        check_value_match(&at, true, condition, regexes, findings);
    }
}

fn check_list_len(at: &str, len: usize, findings: &mut Vec<Finding>) {
    if len > MAX_AUTHZ_LIST {
        findings.push((at.to_string(), format!("at most {MAX_AUTHZ_LIST} entries")));
    }
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
    if let LoadBalancing::Hash(on) = &service.load_balancing {
        let (at, name) = match on {
            HashOn::Header(name) => (format!("{at}.load_balancing.hash.header"), name),
            HashOn::Cookie(name) => (format!("{at}.load_balancing.hash.cookie"), name),
        };
        if name.is_empty() || !name.bytes().all(is_tchar) {
            findings.push((
                at,
                "must be a header or cookie name (letters, digits and !#$%&'*+-.^_`|~)".into(),
            ));
        }
    }
}

fn check_mirror(policy: &Policy, at: &str, mirror: &RequestMirror, findings: &mut Vec<Finding>) {
    if !policy.services.contains_key(&mirror.service) {
        findings.push((
            format!("{at}.service"),
            unknown_service(policy, &mirror.service),
        ));
    }
    if !(0.0..=100.0).contains(&mirror.percent) {
        findings.push((format!("{at}.percent"), "must be between 0 and 100".into()));
    }
    if mirror.body_limit.0 > MAX_MIRROR_BODY_BYTES {
        findings.push((
            format!("{at}.body_limit"),
            format!("must be at most {MAX_MIRROR_BODY_BYTES} bytes"),
        ));
    }
    check_duration(
        &format!("{at}.timeout"),
        mirror.timeout,
        MAX_TIMEOUT,
        findings,
    );
    if mirror.max_in_flight == 0 || mirror.max_in_flight > MAX_MIRROR_IN_FLIGHT {
        findings.push((
            format!("{at}.max_in_flight"),
            format!("must be between 1 and {MAX_MIRROR_IN_FLIGHT}"),
        ));
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

/// A route entry attaching policy to a translated route: it only adds policy.
fn check_attachment(
    i: usize,
    route: &Route,
    names: &mut HashSet<String>,
    findings: &mut Vec<Finding>,
) {
    let at = format!("routes[{i}]");
    if let Some(name) = &route.name {
        if !names.insert(name.clone()) {
            findings.push((
                format!("{at}.name"),
                format!("duplicate route name `{name}`"),
            ));
        }
    }
    for (field, set) in [
        ("service", route.service.is_some()),
        ("split", route.split.is_some()),
        ("filters", !route.filters.is_empty()),
    ] {
        if set {
            findings.push((
                format!("{at}.{field}"),
                "an entry attaching policy to a route of a Gateway API document takes only \
                 `retries`, `timeouts`, `rate_limit`, `fault` and `retry_non_idempotent`: the \
                 document says where the route goes"
                    .into(),
            ));
        }
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
    check_filters(policy, &at, route, findings);
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
    if let Some(path) = &m.path {
        check_path_match(&format!("{at}.path"), path, regexes, findings);
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

/// Headers no filter may change: the connection's own (hop-by-hop, RFC 9110 §7.6.1), and
/// those that carry the message's target and framing, which the proxy sets itself.
const UNMODIFIABLE_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "host",
    "content-length",
];

/// A route's `filters` (Gateway API's rules): each kind once, not a rewrite and a redirect
/// together, `replace_prefix_match` only where every match of the route is a prefix match.
fn check_filters(policy: &Policy, at: &str, route: &Route, findings: &mut Vec<Finding>) {
    if route.filters.len() > MAX_ROUTE_FILTERS {
        findings.push((
            format!("{at}.filters"),
            format!("at most {MAX_ROUTE_FILTERS} filters per route"),
        ));
    }
    let mut kinds: Vec<&str> = Vec::new();
    for (i, filter) in route.filters.iter().enumerate().take(MAX_ROUTE_FILTERS) {
        let kind = filter.kind();
        let at = format!("{at}.filters[{i}]");
        if let Some(j) = kinds.iter().position(|k| *k == kind) {
            findings.push((
                format!("{at}.{kind}"),
                format!("a route takes one `{kind}`; filters[{j}] is one already"),
            ));
        }
        let (rewrite, redirect) = ("url_rewrite", "request_redirect");
        let other = match kind {
            "url_rewrite" => Some(redirect),
            "request_redirect" => Some(rewrite),
            _ => None,
        };
        if let Some(j) = other.and_then(|other| kinds.iter().position(|k| *k == other)) {
            findings.push((
                format!("{at}.{kind}"),
                format!(
                    "a route either rewrites or redirects: `{kind}` and filters[{j}]'s `{}` \
                     cannot go together",
                    kinds[j]
                ),
            ));
        }
        kinds.push(kind);
        let at = format!("{at}.{kind}");
        match filter {
            RouteFilter::RequestHeaderModifier(modifier)
            | RouteFilter::ResponseHeaderModifier(modifier) => {
                check_header_modifier(&at, modifier, findings)
            }
            RouteFilter::UrlRewrite(rewrite) => {
                if rewrite.hostname.is_none() && rewrite.path.is_none() {
                    findings.push((at.clone(), "needs `hostname` or `path`".into()));
                }
                if let Some(hostname) = &rewrite.hostname {
                    check_hostname(&format!("{at}.hostname"), hostname, findings);
                }
                if let Some(path) = &rewrite.path {
                    check_path_modifier(&format!("{at}.path"), path, route, findings);
                }
            }
            RouteFilter::RequestRedirect(redirect) => {
                if let Some(hostname) = &redirect.hostname {
                    check_hostname(&format!("{at}.hostname"), hostname, findings);
                }
                if redirect.port == Some(0) {
                    findings.push((format!("{at}.port"), "port must not be 0".into()));
                }
                if let Some(path) = &redirect.path {
                    check_path_modifier(&format!("{at}.path"), path, route, findings);
                }
                if ![301, 302, 303, 307, 308].contains(&redirect.status_code) {
                    findings.push((
                        format!("{at}.status_code"),
                        "must be a redirect status: 301, 302, 303, 307 or 308".into(),
                    ));
                }
            }
            RouteFilter::RequestMirror(mirror) => check_mirror(policy, &at, mirror, findings),
        }
    }
}

fn check_header_modifier(at: &str, modifier: &HeaderModifier, findings: &mut Vec<Finding>) {
    if modifier.set.is_empty() && modifier.add.is_empty() && modifier.remove.is_empty() {
        findings.push((at.to_string(), "needs `set`, `add` or `remove`".into()));
    }
    // Lowercased name -> the list that has it: a name in two lists would depend on an order
    // of operations the policy does not show.
    let mut seen: HashMap<String, &str> = HashMap::new();
    let lists = [
        ("set", modifier.set.keys().collect::<Vec<_>>()),
        ("add", modifier.add.keys().collect()),
        ("remove", modifier.remove.iter().collect()),
    ];
    for (list, names) in &lists {
        if names.len() > MAX_HEADER_CHANGES {
            findings.push((
                format!("{at}.{list}"),
                format!("at most {MAX_HEADER_CHANGES} headers"),
            ));
        }
        for (j, name) in names.iter().enumerate().take(MAX_HEADER_CHANGES) {
            // A mapping's values are found by key, a list's by index.
            let name_at = match *list {
                "remove" => format!("{at}.remove[{j}]"),
                _ => format!("{at}.{list}.{name}"),
            };
            let lower = name.to_ascii_lowercase();
            if name.is_empty() || !name.bytes().all(is_tchar) {
                findings.push((
                    name_at,
                    "must be a header name (letters, digits and !#$%&'*+-.^_`|~)".into(),
                ));
                continue;
            }
            if UNMODIFIABLE_HEADERS.contains(&lower.as_str()) {
                findings.push((
                    name_at,
                    format!(
                        "`{name}` belongs to the connection or the message framing; the proxy \
                         sets it, a filter cannot"
                    ),
                ));
                continue;
            }
            if let Some(first) = seen.insert(lower, list) {
                let what = if first == *list {
                    "twice".to_string()
                } else {
                    format!("in `{first}` already")
                };
                findings.push((name_at, format!("header `{name}` is {what}")));
            }
        }
    }
    for (list, values) in [("set", &modifier.set), ("add", &modifier.add)] {
        for (name, value) in values.iter().take(MAX_HEADER_CHANGES) {
            let at = format!("{at}.{list}.{name}");
            if value.len() > MAX_HEADER_VALUE_BYTES {
                findings.push((at, format!("at most {MAX_HEADER_VALUE_BYTES} bytes")));
            } else if !value.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
                findings.push((
                    at,
                    "a header value holds visible ASCII and spaces only (no control \
                     characters, no line breaks)"
                        .into(),
                ));
            }
        }
    }
}

/// A host name a rewrite or redirect puts in Host or `Location`: a DNS name, no port.
fn check_hostname(at: &str, hostname: &str, findings: &mut Vec<Finding>) {
    if !is_dns_name(hostname) {
        findings.push((
            at.to_string(),
            "must be a DNS name such as api.example.com (no port, no wildcard)".into(),
        ));
    }
}

/// A rewritten path: characters a request path may hold; a prefix replacement only on a route
/// whose every match is `path: { prefix }` (Gateway API sets such a route not Accepted).
fn check_path_modifier(at: &str, path: &PathModifier, route: &Route, findings: &mut Vec<Finding>) {
    let (at, value) = match path {
        PathModifier::ReplaceFullPath(value) => (format!("{at}.replace_full_path"), value),
        PathModifier::ReplacePrefixMatch(value) => (format!("{at}.replace_prefix_match"), value),
    };
    let full = matches!(path, PathModifier::ReplaceFullPath(_));
    // A prefix may be replaced by nothing: `/foo/bar` becomes `/bar`.
    if (full || !value.is_empty()) && !value.starts_with('/') {
        findings.push((at, "must start with `/`".into()));
        return;
    }
    if let Some(c) = value.chars().find(|&c| !is_path_char(c)) {
        findings.push((
            at,
            format!("`{c}` cannot be in a path (no `?`, `#`, spaces or control characters; percent-encode it)"),
        ));
        return;
    }
    if !full {
        let prefix_only = route.each_match().all(|m| {
            matches!(m.path, Some(PathMatch::Prefix(_)))
                && m.path_prefix.is_none()
                && m.grpc.is_none()
        });
        if !prefix_only {
            findings.push((
                at,
                "needs every match of the route to be a `path: { prefix }` match (the prefix it \
                 replaces)"
                    .into(),
            ));
        }
    }
}

/// RFC 3986 `pchar` and `/`: what a path holds unencoded (`%` for its escapes).
fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~!$&'()*+,;=:@/%".contains(c)
}

/// A `path` condition (`exact`, `prefix` or `regex`) at `at`.
fn check_path_match(at: &str, path: &PathMatch, regexes: &mut usize, findings: &mut Vec<Finding>) {
    let (kind, path) = match path {
        PathMatch::Exact(path) => ("exact", path),
        PathMatch::Prefix(path) => ("prefix", path),
        PathMatch::Regex(pattern) => {
            check_regex(&format!("{at}.regex"), pattern, regexes, findings);
            return;
        }
    };
    let at = format!("{at}.{kind}");
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
