//! `outriderctl get WORKLOAD --routes`: the route table a proxy compiles from a workload's
//! policy, one entry per match in the order the proxy tries them
//! ([`outrider_config::matching::order`], the proxy's own ordering): the first entry a request
//! meets takes it. Each entry names its route (as the metrics label it: `:route-N` when
//! unnamed) and the index of its match (`outrider_route_decisions_total{route,match}`), its
//! conditions, backends with weights and the timeouts and retries each gets, and its filters.

use std::fmt::Write as _;

use outrider_config::matching::{order, route_label, PathCondition};
use outrider_config::{Policy, Retries, Route, RouteFilter, RouteMatch, ValueMatch};
use serde::Serialize;

/// The route table, in the order matches are tried.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RouteTable {
    /// One entry per match.
    pub entries: Vec<Entry>,
}

/// One match of one route, at its place in the table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entry {
    /// The route's metric label.
    pub route: String,
    /// The match's index in the route (`match` first, then `matches`).
    pub r#match: usize,
    /// The conditions, as `authority shop, path prefix /api, header x-canary = true`
    /// (`any request` for none).
    pub when: String,
    /// Where its requests go.
    pub backends: Vec<Backend>,
    /// The route's filters, each as its kind and settings.
    pub filters: Vec<String>,
}

/// One backend of a route, with the policy its requests get there.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Backend {
    /// The service.
    pub service: String,
    /// Its weight (1 for a route's only service).
    pub weight: u32,
    /// Its share of the route's requests, in percent.
    pub percent: f64,
    /// The request timeout in force (the route's, else the service's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_timeout: Option<String>,
    /// The per-try timeout in force.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<String>,
    /// The idle timeout in force.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Option<String>,
    /// The retries in force, as `2 on connect-failure, reset`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retries: Option<String>,
}

/// The route table of `policy`.
pub fn table(policy: &Policy) -> RouteTable {
    let entries = order(&policy.routes)
        .into_iter()
        .filter_map(|at| {
            let route = policy.routes.get(at.route)?;
            let m = route.each_match().nth(at.index)?;
            Some(Entry {
                route: route_label(route, at.route).into_owned(),
                r#match: at.index,
                when: conditions(m),
                backends: backends(policy, route),
                filters: route.filters.iter().map(filter).collect(),
            })
        })
        .collect();
    RouteTable { entries }
}

/// The table as text: a numbered block per entry.
pub fn render(table: &RouteTable) -> String {
    let mut out = String::new();
    if table.entries.is_empty() {
        out.push_str("no routes: the outbound port answers every request 404\n");
    }
    for (i, entry) in table.entries.iter().enumerate() {
        let _ = writeln!(
            out,
            "{:>3}  {} match {}: {}",
            i + 1,
            entry.route,
            entry.r#match,
            entry.when
        );
        let legs: Vec<String> = entry.backends.iter().map(backend).collect();
        let _ = writeln!(out, "     -> {}", legs.join("; "));
        if !entry.filters.is_empty() {
            let _ = writeln!(out, "     filters: {}", entry.filters.join("; "));
        }
    }
    out
}

fn backend(b: &Backend) -> String {
    let mut policy = Vec::new();
    for (what, value) in [
        ("request", &b.request_timeout),
        ("per_try", &b.per_try_timeout),
        ("idle", &b.idle_timeout),
    ] {
        if let Some(value) = value {
            policy.push(format!("{what} {value}"));
        }
    }
    policy.push(match &b.retries {
        Some(retries) => format!("retries {retries}"),
        None => "no retries".to_string(),
    });
    format!(
        "{} {}% ({})",
        b.service,
        round(b.percent),
        policy.join(", ")
    )
}

/// `percent` with at most one decimal, without a trailing `.0`.
fn round(percent: f64) -> String {
    let text = format!("{percent:.1}");
    text.strip_suffix(".0").map(str::to_string).unwrap_or(text)
}

/// A match's conditions in words, in precedence order.
fn conditions(m: &RouteMatch) -> String {
    let mut parts = Vec::new();
    if let Some(authority) = &m.authority {
        parts.push(format!("authority {authority}"));
    }
    match (PathCondition::of(m), &m.grpc) {
        (_, Some(grpc)) => parts.push(match &grpc.method {
            Some(method) => format!("grpc {}/{method}", grpc.service),
            None => format!("grpc {}", grpc.service),
        }),
        (PathCondition::Any, None) => {}
        (PathCondition::StrPrefix(prefix), None) => parts.push(format!("path_prefix {prefix}")),
        (PathCondition::SegmentPrefix(prefix), None) => {
            let prefix = if prefix.is_empty() { "/" } else { &prefix };
            parts.push(format!("path prefix {prefix}"));
        }
        (PathCondition::Exact(path), None) => parts.push(format!("path exact {path}")),
        (PathCondition::Regex(pattern), None) => parts.push(format!("path regex '{pattern}'")),
    }
    if let Some(method) = &m.method {
        parts.push(format!("method {method}"));
    }
    parts.extend(m.headers.iter().map(|h| value_match("header", h)));
    parts.extend(m.query_params.iter().map(|q| value_match("query", q)));
    if parts.is_empty() {
        return "any request".to_string();
    }
    parts.join(", ")
}

fn value_match(what: &str, condition: &ValueMatch) -> String {
    let name = &condition.name;
    match (&condition.value, &condition.regex, condition.present) {
        (Some(value), _, _) => format!("{what} {name} = {value}"),
        (None, Some(pattern), _) => format!("{what} {name} ~ '{pattern}'"),
        (None, None, Some(false)) => format!("{what} {name} absent"),
        (None, None, _) => format!("{what} {name} present"),
    }
}

/// The route's backends with their shares and the policy each gets (the route's timeouts and
/// retries over the service's, as the proxy composes them).
fn backends(policy: &Policy, route: &Route) -> Vec<Backend> {
    let legs: Vec<(&str, u32)> = match (&route.service, &route.split) {
        (Some(service), _) => vec![(service.as_str(), 1)],
        (None, Some(split)) => split
            .iter()
            .map(|leg| (leg.service.as_str(), leg.weight))
            .collect(),
        (None, None) => Vec::new(),
    };
    let total: u64 = legs.iter().map(|(_, w)| u64::from(*w)).sum();
    legs.into_iter()
        .map(|(service, weight)| {
            let config = policy.services.get(service);
            let base = config.map(|s| &s.timeouts);
            let over = route.timeouts.as_ref();
            let pick = |o: Option<outrider_config::Duration>,
                        b: Option<outrider_config::Duration>| {
                o.or(b).map(|d| d.to_string())
            };
            let retries = route
                .retries
                .as_ref()
                .or_else(|| config.and_then(|s| s.retries.as_ref()))
                .filter(|r| r.attempts > 0);
            Backend {
                service: service.to_string(),
                weight,
                // Weights are validated > 0, so `total` is too; 100 for an empty split.
                percent: if total == 0 {
                    100.0
                } else {
                    f64::from(weight) * 100.0 / total as f64
                },
                request_timeout: pick(over.and_then(|o| o.request), base.and_then(|b| b.request)),
                per_try_timeout: pick(over.and_then(|o| o.per_try), base.and_then(|b| b.per_try)),
                idle_timeout: pick(over.and_then(|o| o.idle), base.and_then(|b| b.idle)),
                retries: retries.map(retries_text),
            }
        })
        .collect()
}

fn retries_text(retries: &Retries) -> String {
    let on: Vec<String> = retries
        .on
        .iter()
        .filter_map(|on| serde_json::to_value(on).ok()?.as_str().map(str::to_string))
        .collect();
    format!("{} on {}", retries.attempts, on.join(", "))
}

/// A filter as its kind and settings (`request_mirror {"service":"shadow",...}`).
fn filter(filter: &RouteFilter) -> String {
    let settings = serde_json::to_value(filter)
        .ok()
        .and_then(|v| v.get(filter.kind()).map(ToString::to_string))
        .unwrap_or_default();
    format!("{} {settings}", filter.kind())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_follow_the_proxys_precedence_with_effective_policy() {
        let text = "services:
  v1: { endpoints: [127.0.0.1:1], timeouts: { request: 5s }, retries: { attempts: 2 } }
  v2: { endpoints: [127.0.0.1:2] }
routes:
  - name: catch-all
    match: { authority: shop }
    split: [{ service: v1, weight: 90 }, { service: v2, weight: 10 }]
  - name: canary
    matches:
      - { authority: shop, headers: [{ name: x-canary, value: 'true' }] }
      - { authority: shop, path: { exact: /v2 } }
    service: v2
    timeouts: { request: 1s }
    filters:
      - request_header_modifier: { set: { x-env: canary } }
  - match: { path: { regex: '/u/[0-9]+' }, method: GET }
    service: v1
";
        let policy = outrider_config::load("p.yaml", text).expect("valid").policy;
        let shown = render(&table(&policy));
        assert_eq!(
            shown,
            r#"  1  canary match 1: authority shop, path exact /v2
     -> v2 100% (request 1s, no retries)
     filters: request_header_modifier {"set":{"x-env":"canary"}}
  2  canary match 0: authority shop, header x-canary = true
     -> v2 100% (request 1s, no retries)
     filters: request_header_modifier {"set":{"x-env":"canary"}}
  3  catch-all match 0: authority shop
     -> v1 90% (request 5s, retries 2 on connect-failure, reset, gateway-error); v2 10% (no retries)
  4  :route-2 match 0: path regex '/u/[0-9]+', method GET
     -> v1 100% (request 5s, retries 2 on connect-failure, reset, gateway-error)
"#
        );
    }
}
