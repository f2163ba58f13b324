//! Warnings: policies that are valid but very likely not what was meant. The proxy and the
//! control plane accept them; `outriderctl validate` shows them (and `--strict` refuses them).

use std::collections::HashSet;

use crate::matching::{segment_prefix_matches, PathCondition};
use crate::schema::{Authorization, AuthzAction, Policy, RouteFilter, RouteMatch};
use crate::validate::Finding;
use crate::Duration;

/// Likely mistakes in a valid `policy`, each with the path of the value to look at.
pub fn warnings(policy: &Policy) -> Vec<Finding> {
    let mut findings = Vec::new();
    for (name, service) in &policy.services {
        let at = format!("services.{name}");
        // `endpoints: []` beside `discovery: registry` is allowed: the registry fills them.
        let registry = service.discovery == Some(crate::schema::Discovery::Registry);
        if !registry && service.endpoints.as_ref().is_some_and(Vec::is_empty) {
            findings.push((
                format!("{at}.endpoints"),
                "is empty: every request to this service is answered 503 (no endpoints)".into(),
            ));
        }
        let t = &service.timeouts;
        if let Some(message) = per_try_outlasts_request(t.per_try, t.request) {
            findings.push((format!("{at}.timeouts.per_try"), message));
        }
    }
    if let Some(inbound) = &policy.inbound {
        let t = &inbound.timeouts;
        if let Some(message) = per_try_outlasts_request(t.per_try, t.request) {
            findings.push(("inbound.timeouts.per_try".into(), message));
        }
        if let Some(authz) = &inbound.authorization {
            findings.extend(authorization_without_effect(authz));
        }
    }
    let mut used = HashSet::new();
    for (i, route) in policy.routes.iter().enumerate() {
        let targets: Vec<&str> = match (&route.service, &route.split) {
            (Some(service), _) => vec![service.as_str()],
            (None, Some(split)) => split.iter().map(|leg| leg.service.as_str()).collect(),
            (None, None) => Vec::new(),
        };
        used.extend(targets.iter().copied());
        for (j, filter) in route.filters.iter().enumerate() {
            // A mirror's service gets the route's copies.
            if let RouteFilter::RequestMirror(mirror) = filter {
                used.insert(mirror.service.as_str());
            }
            if let RouteFilter::RequestRedirect(redirect) = filter {
                let unchanged = redirect.scheme.is_none()
                    && redirect.hostname.is_none()
                    && redirect.port.is_none()
                    && redirect.path.is_none();
                if unchanged {
                    findings.push((
                        format!("routes[{i}].filters[{j}].request_redirect"),
                        "changes neither scheme, hostname, port nor path: a client following \
                         it asks for the same URL again, and again"
                            .into(),
                    ));
                }
            }
        }
        if let Some(t) = &route.timeouts {
            // What the route sets, over each service's own: reported once per route.
            let worst = targets.iter().find_map(|service| {
                let service = &policy.services.get(*service)?.timeouts;
                per_try_outlasts_request(
                    t.per_try.or(service.per_try),
                    t.request.or(service.request),
                )
            });
            if let Some(message) = worst {
                let field = if t.per_try.is_some() {
                    "per_try"
                } else {
                    "request"
                };
                findings.push((format!("routes[{i}].timeouts.{field}"), message));
            }
        }
    }
    findings.extend(shadowed_routes(policy));
    for (name, service) in &policy.services {
        if service.listen.is_none() && !used.contains(name.as_str()) {
            findings.push((
                format!("services.{name}"),
                "no route sends to this service and it has no `listen` port, so no request \
                 reaches it"
                    .into(),
            ));
        }
    }
    findings
}

/// An authorization that denies every request, or allows every one, is seldom meant.
fn authorization_without_effect(authz: &Authorization) -> Option<Finding> {
    let has = |action| authz.rules.iter().any(|r| r.action == action);
    let message = match authz.default {
        AuthzAction::Deny if authz.allow.is_empty() && !has(AuthzAction::Allow) => {
            "has no allow rule and `default: deny`: every inbound request is denied"
        }
        AuthzAction::Allow if !has(AuthzAction::Deny) => {
            "has no deny rule and `default: allow`: every inbound request is allowed"
        }
        _ => return None,
    };
    Some(("inbound.authorization".into(), message.into()))
}

/// The warning for a per-try timeout at least as long as the request's, if it is one.
fn per_try_outlasts_request(
    per_try: Option<Duration>,
    request: Option<Duration>,
) -> Option<String> {
    let (per_try, request) = (per_try?, request?);
    (per_try > request).then(|| {
        format!(
            "per_try ({per_try}) is longer than request ({request}): the request timeout always \
             ends an attempt first, so per_try never applies and no attempt is retried after a \
             per-try timeout"
        )
    })
}

/// Routes none of whose matches can take a request: each is covered by another route's match
/// that is tried before it (more specific, or as specific and earlier in the document).
fn shadowed_routes(policy: &Policy) -> Vec<Finding> {
    let order = crate::matching::order(&policy.routes);
    let matches: Vec<Vec<&RouteMatch>> = policy
        .routes
        .iter()
        .map(|r| r.each_match().collect())
        .collect();
    let mut tried_at: Vec<Vec<usize>> = matches.iter().map(|m| vec![0; m.len()]).collect();
    for (position, at) in order.iter().enumerate() {
        tried_at[at.route][at.index] = position;
    }
    let mut findings = Vec::new();
    for (i, route) in policy.routes.iter().enumerate() {
        let mut taken_by = None;
        let every_match_shadowed = matches[i].iter().enumerate().all(|(k, m)| {
            let earlier = order[..tried_at[i][k]]
                .iter()
                .find(|e| e.route != i && covers(matches[e.route][e.index], m));
            if let Some(earlier) = earlier {
                taken_by.get_or_insert(earlier.route);
            }
            earlier.is_some()
        });
        if let (true, Some(earlier)) = (every_match_shadowed, taken_by) {
            let field = if route.r#match.is_some() {
                "match"
            } else {
                "matches"
            };
            findings.push((
                format!("routes[{i}].{field}"),
                format!(
                    "never matches: {} takes every request this route would first (it is as \
                     specific and earlier, or more specific; see the precedence of matches)",
                    describe(policy, earlier)
                ),
            ));
        }
    }
    findings
}

/// Whether every request `later` matches is also matched by `earlier` (authorities and
/// header names compare without case, as the proxy matches them). Conservative: `false`
/// when unsure (a regex is compared as text).
fn covers(earlier: &RouteMatch, later: &RouteMatch) -> bool {
    let (e, l) = (earlier, later);
    let authority = match (&e.authority, &l.authority) {
        (None, _) => true,
        (Some(e), Some(l)) => e.eq_ignore_ascii_case(l),
        (Some(_), None) => false,
    };
    let method = e.method.is_none() || e.method == l.method;
    let headers = e.headers.iter().all(|eh| {
        l.headers.iter().any(|lh| {
            eh.name.eq_ignore_ascii_case(&lh.name)
                && (&eh.value, &eh.regex, eh.present) == (&lh.value, &lh.regex, lh.present)
        })
    });
    let query_params = e.query_params.iter().all(|q| l.query_params.contains(q));
    let grpc = e.grpc.is_none() || l.grpc.is_some();
    authority
        && method
        && headers
        && query_params
        && grpc
        && path_covers(&PathCondition::of(e), &PathCondition::of(l))
}

fn path_covers(earlier: &PathCondition, later: &PathCondition) -> bool {
    use PathCondition::{Any, Exact, Regex, SegmentPrefix, StrPrefix};
    match (earlier, later) {
        (Any, _) => true,
        (StrPrefix(e), StrPrefix(l)) => l.starts_with(e),
        (StrPrefix(e), SegmentPrefix(l) | Exact(l)) => l.starts_with(e),
        (SegmentPrefix(e), SegmentPrefix(l) | Exact(l)) => segment_prefix_matches(e, l),
        // A string prefix that ends a segment: `/a/` lies under the segment prefix `/a`.
        (SegmentPrefix(e), StrPrefix(l)) => l
            .strip_prefix(e.as_str())
            .is_some_and(|rest| rest.starts_with('/')),
        (Exact(e), Exact(l)) => e == l,
        (Regex(e), Regex(l)) => e == l,
        _ => false,
    }
}

/// `routes[2]` or `routes[2] (name)`.
fn describe(policy: &Policy, index: usize) -> String {
    match &policy.routes[index].name {
        Some(name) => format!("routes[{index}] ({name})"),
        None => format!("routes[{index}]"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn warned(text: &str) -> Vec<Finding> {
        let policy = crate::load("p.yaml", text).expect("valid").policy;
        warnings(&policy)
    }

    #[test]
    fn a_clean_policy_has_no_warnings() {
        let text = "services:
  a: { endpoints: [127.0.0.1:1], timeouts: { request: 2s, per_try: 1s } }
  b: { endpoints: [127.0.0.1:2], listen: 127.0.0.1:9002 }
  shadow: { endpoints: [127.0.0.1:3] }
  pay: { discovery: registry, endpoints: [] }
routes:
  - match: { authority: a, path_prefix: /v1/ }
    service: a
  - match: { authority: a }
    service: a
    filters: [ { request_mirror: { service: shadow } } ]
  - match: { authority: pay }
    service: pay
";
        assert_eq!(warned(text), []);
    }

    #[test]
    fn a_redirect_to_the_same_url_is_named() {
        let text = "services:
  a: { endpoints: [127.0.0.1:1] }
routes:
  - match: { authority: a }
    service: a
    filters: [{ request_redirect: { status_code: 301 } }]
  - match: { authority: b }
    service: a
    filters: [{ request_redirect: { scheme: https } }]
";
        assert_eq!(
            warned(text),
            [(
                "routes[0].filters[0].request_redirect".to_string(),
                "changes neither scheme, hostname, port nor path: a client following it asks \
                 for the same URL again, and again"
                    .to_string()
            )]
        );
    }

    #[test]
    fn an_authorization_that_decides_nothing_is_named() {
        let inbound = "inbound:\n  app: 127.0.0.1:1\n  authorization: ";
        let denied = "has no allow rule and `default: deny`: every inbound request is denied";
        let allowed = "has no deny rule and `default: allow`: every inbound request is allowed";
        let cases: &[(&str, &[&str])] = &[
            ("{}", &[denied]),
            (
                "{ default: allow, allow: [spiffe://td/ns/a/sa/b] }",
                &[allowed],
            ),
            ("{ allow: [spiffe://td/ns/a/sa/b] }", &[]),
            (
                "{ default: allow, rules: [{ name: x, action: deny }] }",
                &[],
            ),
        ];
        for (authz, expected) in cases {
            let found = warned(&format!("{inbound}{authz}\n"));
            let messages: Vec<&str> = found.iter().map(|(_, m)| m.as_str()).collect();
            assert_eq!(messages, *expected, "{authz}");
        }
    }

    #[test]
    fn each_likely_mistake_is_named() {
        let text = "services:
  a: { endpoints: [], timeouts: { request: 1s, per_try: 2s } }
  b: { endpoints: [127.0.0.1:2] }
  unused: { endpoints: [127.0.0.1:3] }
routes:
  - name: all-of-a
    match: { authority: A }
    service: a
  - match: { authority: a, path_prefix: /v1/ }
    split: [ { service: a, weight: 1 }, { service: b, weight: 1 } ]
    timeouts: { per_try: 5s }
  - matches: [{ authority: A, path_prefix: /v1/ }]
    service: b
";
        let found: Vec<String> = warned(text)
            .into_iter()
            .map(|(path, message)| format!("{path}: {message}"))
            .collect();
        assert_eq!(
            found,
            [
                "services.a.endpoints: is empty: every request to this service is answered 503 \
                 (no endpoints)",
                "services.a.timeouts.per_try: per_try (2s) is longer than request (1s): the \
                 request timeout always ends an attempt first, so per_try never applies and no \
                 attempt is retried after a per-try timeout",
                "routes[1].timeouts.per_try: per_try (5s) is longer than request (1s): the \
                 request timeout always ends an attempt first, so per_try never applies and no \
                 attempt is retried after a per-try timeout",
                "routes[2].matches: never matches: routes[1] takes every request this route \
                 would first (it is as specific and earlier, or more specific; see the \
                 precedence of matches)",
                "services.unused: no route sends to this service and it has no `listen` port, \
                 so no request reaches it",
            ]
        );
    }
}
