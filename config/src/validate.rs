//! Semantic checks that the type system cannot express: references between services and
//! routes, mutually exclusive fields, value ranges. Each finding names the offending path.

use std::collections::{HashMap, HashSet};

use crate::schema::{Policy, Route, Service};

/// A problem found by validation: the path of the offending value and what is wrong.
pub type Finding = (String, String);

/// Checks a deserialised policy; an empty result means it is valid.
pub fn validate(policy: &Policy) -> Vec<Finding> {
    let mut findings = Vec::new();
    let mut listeners: HashMap<std::net::SocketAddr, &str> = HashMap::new();
    for (name, service) in &policy.services {
        check_service(name, service, &mut listeners, &mut findings);
    }
    let mut route_names = HashSet::new();
    for (i, route) in policy.routes.iter().enumerate() {
        check_route(policy, i, route, &mut route_names, &mut findings);
    }
    if let Some(inbound) = &policy.inbound {
        if inbound.timeouts.connect.get().is_zero() {
            findings.push((
                "inbound.timeouts.connect".into(),
                "must be greater than 0".into(),
            ));
        }
    }
    findings
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
    match (&service.endpoints, &service.dns) {
        (Some(_), Some(_)) => findings.push((
            format!("{at}.dns"),
            "set `endpoints` or `dns`, not both".into(),
        )),
        (None, None) => findings.push((at.clone(), "needs `endpoints` or `dns`".into())),
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
    if let Some(addr) = service.listen {
        if let Some(other) = listeners.insert(addr, name) {
            findings.push((
                format!("{at}.listen"),
                format!("{addr} is already the listen address of service `{other}`"),
            ));
        }
    }
    if service.timeouts.connect.get().is_zero() {
        findings.push((
            format!("{at}.timeouts.connect"),
            "must be greater than 0".into(),
        ));
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
    if let Some(authority) = &route.matches.authority {
        if authority.is_empty() || authority.bytes().any(|b| b.is_ascii_whitespace()) {
            findings.push((
                format!("{at}.match.authority"),
                "must be a host name without spaces".into(),
            ));
        }
    }
    if let Some(prefix) = &route.matches.path_prefix {
        if !prefix.starts_with('/') {
            findings.push((
                format!("{at}.match.path_prefix"),
                "must start with `/`".into(),
            ));
        }
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
                findings.push((
                    format!("{at}.service"),
                    format!("unknown service `{service}`"),
                ));
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
                        format!("unknown service `{}`", leg.service),
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
