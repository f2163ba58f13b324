//! Gateway API routes as policy: `gateway.networking.k8s.io/v1` (or `v1beta1`) HTTPRoute and
//! GRPCRoute documents, read with the policy's parser and budgets and translated into
//! [`Route`]s. Only the mesh (GAMMA) form is taken: every `parentRefs` entry names a Service,
//! and the route applies to requests addressed to it. Whatever this translation cannot honour
//! (a Gateway parent, `sessionPersistence`, an `ExtensionRef` filter, ...) is refused with its
//! path and position, never ignored.
//!
//! The translation, per rule of a route named `NAME` in namespace `NS`:
//! - the route is named `httproute.NS.NAME.RULE` (`grpcroute.` for a GRPCRoute), `RULE` being
//!   the rule's `name` or `rule-<index>`: policy documents attach what Gateway API cannot say
//!   (rate limits, retry budgets, faults) to it with a route entry of that name and no match
//!   ([`compose`]);
//! - each match is taken once per host form of each parent Service `SVC`: `SVC`, `SVC.NS`,
//!   `SVC.NS.svc` and `SVC.NS.svc.cluster.local`, any port (the `authority` condition compares
//!   the host without its port);
//! - `backendRefs` become `service` (one) or `split` (weights; a weight of 0 takes no traffic);
//!   each names a service of the workload's policy;
//! - `timeouts.request` is the route's `timeouts.request`, `timeouts.backendRequest` its
//!   `timeouts.per_try`; `retry` (experimental) becomes `retries`.

use std::collections::{BTreeMap, HashSet};

use serde::de::IgnoredAny;
use serde::Deserialize;

use crate::parse::parse_other;
use crate::position::PositionIndex;
use crate::schema::{
    Backoff, GrpcMatch, HeaderModifier, PathMatch, PathModifier, Policy, RedirectScheme,
    RequestMirror, RequestRedirect, Retries, RetryBudget, RetryOn, Route, RouteFilter, RouteMatch,
    RouteTimeouts, UrlRewrite, ValueMatch, WeightedService,
};
use crate::{Diagnostic, Duration, Position};

/// Gateway API's group.
pub const GROUP: &str = "gateway.networking.k8s.io";
/// The name prefixes of routes translated from Gateway API documents; a policy route entry
/// named with one attaches policy to the route of that name.
pub const ROUTE_PREFIXES: [&str; 2] = ["httproute.", "grpcroute."];
/// The cluster domain of a Service's fully qualified name.
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// Rules of one route document.
const MAX_RULES: usize = 64;

/// Whether `name` is the name of a translated route (or of an attachment to one).
pub fn is_gateway_route_name(name: &str) -> bool {
    ROUTE_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// The kind of a Gateway API route document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// `HTTPRoute`.
    HttpRoute,
    /// `GRPCRoute`.
    GrpcRoute,
}

impl Kind {
    /// As written in `kind:`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HttpRoute => "HTTPRoute",
            Self::GrpcRoute => "GRPCRoute",
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            Self::HttpRoute => "httproute",
            Self::GrpcRoute => "grpcroute",
        }
    }
}

/// A service a translated route refers to, and where the document names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRef {
    /// The service's name (the Service the backendRef names).
    pub service: String,
    /// The path in the document (`spec.rules[0].backendRefs[1]`).
    pub path: String,
    /// Where it is written.
    pub position: Option<Position>,
}

/// One HTTPRoute or GRPCRoute, translated.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayRoutes {
    /// HTTPRoute or GRPCRoute.
    pub kind: Kind,
    /// `metadata.namespace` (`default` when absent).
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// The file it came from, for messages.
    pub file: String,
    /// The parent Services: the routes apply to a workload whose policy has one of them.
    pub parents: Vec<String>,
    /// The translated routes, one per rule, in rule order.
    pub routes: Vec<Route>,
    /// Every service the routes send or mirror to, for the check against a workload's policy.
    pub references: Vec<ServiceRef>,
}

impl GatewayRoutes {
    /// `HTTPRoute default/reviews`.
    pub fn title(&self) -> String {
        format!("{} {}/{}", self.kind.as_str(), self.namespace, self.name)
    }
}

/// `apiVersion` and `kind` of a document, when it has them: a policy has neither.
#[derive(Deserialize)]
struct Probe {
    #[serde(rename = "apiVersion")]
    api_version: Option<IgnoredAny>,
}

/// Whether `text` is a Kubernetes-style document (it has a top-level `apiVersion`), which
/// [`parse`] reads, rather than a policy. A document that does not parse is not one: the
/// policy parser reports its errors.
pub fn is_kubernetes_document(text: &str) -> bool {
    // A policy is not parsed twice: only a text that holds the key at all is probed.
    text.contains("apiVersion")
        && matches!(
            parse_other::<Probe>(text),
            Ok(Some(Probe {
                api_version: Some(_)
            }))
        )
}

/// Anything, refused when present: a field of Gateway API this translation does not honour.
#[derive(Debug)]
struct Present;

impl<'de> Deserialize<'de> for Present {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        IgnoredAny::deserialize(deserializer).map(|_| Present)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Head {
    api_version: String,
    kind: String,
    #[serde(default)]
    metadata: Option<IgnoredAny>,
    #[serde(default)]
    spec: Option<IgnoredAny>,
    #[serde(default)]
    status: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[serde(bound = "R: Deserialize<'de>")]
struct Document<R> {
    #[allow(dead_code)]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    metadata: Metadata,
    spec: Spec<R>,
    #[serde(default)]
    status: Option<Present>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Metadata {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    // Labels and annotations select and describe; they change nothing of the routing.
    #[serde(default)]
    #[allow(dead_code)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    #[allow(dead_code)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[serde(bound = "R: Deserialize<'de>")]
struct Spec<R> {
    #[serde(default)]
    parent_refs: Vec<ParentRef>,
    #[serde(default)]
    hostnames: Option<Present>,
    #[serde(default = "Vec::new")]
    rules: Vec<R>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ParentRef {
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    name: String,
    #[serde(default)]
    section_name: Option<Present>,
    #[serde(default)]
    port: Option<Present>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct BackendRef {
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    // The policy's service says where its endpoints listen; the Service port is not checked.
    #[serde(default)]
    #[allow(dead_code)]
    port: Option<u16>,
    #[serde(default)]
    weight: Option<u32>,
    #[serde(default)]
    filters: Option<Present>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HttpRule {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    matches: Vec<HttpMatch>,
    #[serde(default)]
    filters: Vec<Filter>,
    #[serde(default)]
    backend_refs: Vec<BackendRef>,
    #[serde(default)]
    timeouts: Option<HttpTimeouts>,
    #[serde(default)]
    retry: Option<HttpRetry>,
    #[serde(default)]
    session_persistence: Option<Present>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct GrpcRule {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    matches: Vec<GrpcRouteMatch>,
    #[serde(default)]
    filters: Vec<Filter>,
    #[serde(default)]
    backend_refs: Vec<BackendRef>,
    #[serde(default)]
    session_persistence: Option<Present>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HttpMatch {
    #[serde(default)]
    path: Option<HttpPath>,
    #[serde(default)]
    headers: Vec<NameMatch>,
    #[serde(default)]
    query_params: Vec<NameMatch>,
    #[serde(default)]
    method: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpPath {
    #[serde(default, rename = "type")]
    kind: Option<PathType>,
    #[serde(default)]
    value: Option<String>,
}

#[derive(Deserialize, Clone, Copy)]
enum PathType {
    Exact,
    PathPrefix,
    RegularExpression,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
enum MatchType {
    Exact,
    RegularExpression,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NameMatch {
    #[serde(default, rename = "type")]
    kind: Option<MatchType>,
    name: String,
    value: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrpcRouteMatch {
    #[serde(default)]
    method: Option<GrpcMethod>,
    #[serde(default)]
    headers: Vec<NameMatch>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GrpcMethod {
    #[serde(default, rename = "type")]
    kind: Option<MatchType>,
    #[serde(default)]
    service: Option<String>,
    #[serde(default)]
    method: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Filter {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    request_header_modifier: Option<HeaderFilter>,
    #[serde(default)]
    response_header_modifier: Option<HeaderFilter>,
    #[serde(default)]
    request_redirect: Option<Redirect>,
    #[serde(default, rename = "urlRewrite")]
    url_rewrite: Option<Rewrite>,
    #[serde(default)]
    request_mirror: Option<Mirror>,
    #[serde(default)]
    extension_ref: Option<Present>,
    #[serde(default)]
    cors: Option<Present>,
    #[serde(default)]
    external_auth: Option<Present>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderFilter {
    #[serde(default)]
    set: Vec<Header>,
    #[serde(default)]
    add: Vec<Header>,
    #[serde(default)]
    remove: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    name: String,
    value: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Redirect {
    #[serde(default)]
    scheme: Option<String>,
    #[serde(default)]
    hostname: Option<String>,
    #[serde(default)]
    path: Option<PathRewrite>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    status_code: Option<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rewrite {
    #[serde(default)]
    hostname: Option<String>,
    #[serde(default)]
    path: Option<PathRewrite>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PathRewrite {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    replace_full_path: Option<String>,
    #[serde(default)]
    replace_prefix_match: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Mirror {
    backend_ref: BackendRef,
    #[serde(default)]
    percent: Option<u32>,
    #[serde(default)]
    fraction: Option<Fraction>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Fraction {
    numerator: u32,
    #[serde(default)]
    denominator: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HttpTimeouts {
    #[serde(default)]
    request: Option<String>,
    #[serde(default)]
    backend_request: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpRetry {
    #[serde(default)]
    codes: Vec<u16>,
    #[serde(default)]
    attempts: Option<u32>,
    #[serde(default)]
    backoff: Option<String>,
}

/// A rule of either kind, as the translation reads it.
struct Rule<'a> {
    name: Option<&'a str>,
    matches: Vec<(String, RouteMatch)>,
    filters: &'a [Filter],
    backend_refs: &'a [BackendRef],
    timeouts: Option<&'a HttpTimeouts>,
    retry: Option<&'a HttpRetry>,
    session_persistence: bool,
}

/// Findings of the translation: a path in the document and what is wrong there.
type Findings = Vec<(String, String)>;

/// Reads one Gateway API document (its text alone: one YAML document) and translates it.
/// Every problem has the path and position in `text`.
pub fn parse(file: &str, text: &str) -> Result<GatewayRoutes, Vec<Diagnostic>> {
    let head = match parse_other::<Head>(text) {
        Ok(Some(head)) => head,
        Ok(None) => return Err(vec![at_root("empty document")]),
        Err(diagnostic) => return Err(vec![diagnostic]),
    };
    let _ = (&head.metadata, &head.spec, &head.status);
    let version = head
        .api_version
        .strip_prefix(GROUP)
        .and_then(|v| v.strip_prefix('/'));
    let kind = match head.kind.as_str() {
        "HTTPRoute" => Kind::HttpRoute,
        "GRPCRoute" => Kind::GrpcRoute,
        other => {
            return Err(positioned(
                text,
                vec![(
                    "kind".into(),
                    format!(
                        "kind `{other}` is not taken: the control plane reads policy documents \
                         and Gateway API's HTTPRoute and GRPCRoute"
                    ),
                )],
            ))
        }
    };
    let versions: &[&str] = match kind {
        Kind::HttpRoute => &["v1", "v1beta1"],
        Kind::GrpcRoute => &["v1"],
    };
    if !version.is_some_and(|v| versions.contains(&v)) {
        let accepted: Vec<String> = versions.iter().map(|v| format!("{GROUP}/{v}")).collect();
        return Err(positioned(
            text,
            vec![(
                "apiVersion".into(),
                format!(
                    "apiVersion `{}` is not taken for {}: use {}",
                    head.api_version,
                    kind.as_str(),
                    accepted.join(" or ")
                ),
            )],
        ));
    }
    let translated = match kind {
        Kind::HttpRoute => parse_other::<Document<HttpRule>>(text).map(|d| {
            d.map(|d| {
                let rules = d.spec.rules.iter().enumerate().map(http_rule).collect();
                translate(file, kind, &d, rules)
            })
        }),
        Kind::GrpcRoute => parse_other::<Document<GrpcRule>>(text).map(|d| {
            d.map(|d| {
                let rules = d.spec.rules.iter().enumerate().map(grpc_rule).collect();
                translate(file, kind, &d, rules)
            })
        }),
    };
    match translated {
        Ok(Some(Ok(mut routes))) => {
            locate(&mut routes, text);
            Ok(routes)
        }
        Ok(Some(Err(findings))) => Err(positioned(text, findings)),
        Ok(None) => Err(vec![at_root("empty document")]),
        Err(diagnostic) => Err(vec![diagnostic]),
    }
}

fn at_root(message: &str) -> Diagnostic {
    Diagnostic {
        path: String::new(),
        message: message.into(),
        position: None,
    }
}

fn positioned(text: &str, findings: Findings) -> Vec<Diagnostic> {
    let index = PositionIndex::build(text);
    let mut diagnostics: Vec<Diagnostic> = findings
        .into_iter()
        .map(|(path, message)| Diagnostic {
            position: index.find(&path),
            path,
            message,
        })
        .collect();
    diagnostics.sort_by_key(|d| d.position.map(|p| (p.line, p.column)));
    diagnostics
}

fn value_match(m: &NameMatch) -> ValueMatch {
    let regex = m.kind == Some(MatchType::RegularExpression);
    ValueMatch {
        name: m.name.clone(),
        value: (!regex).then(|| m.value.clone()),
        regex: regex.then(|| m.value.clone()),
        present: None,
    }
}

fn http_rule((i, rule): (usize, &HttpRule)) -> Rule<'_> {
    let at = format!("spec.rules[{i}]");
    let mut matches: Vec<(String, RouteMatch)> = rule
        .matches
        .iter()
        .enumerate()
        .map(|(k, m)| {
            let at = format!("{at}.matches[{k}]");
            let path = m.path.as_ref().map_or_else(
                || PathMatch::Prefix("/".into()),
                |p| {
                    let value = p.value.clone().unwrap_or_else(|| "/".into());
                    match p.kind.unwrap_or(PathType::PathPrefix) {
                        PathType::Exact => PathMatch::Exact(value),
                        PathType::PathPrefix => PathMatch::Prefix(value),
                        PathType::RegularExpression => PathMatch::Regex(value),
                    }
                },
            );
            let route_match = RouteMatch {
                path: Some(path),
                method: m.method.clone(),
                headers: m.headers.iter().map(value_match).collect(),
                query_params: m.query_params.iter().map(value_match).collect(),
                ..RouteMatch::default()
            };
            (at, route_match)
        })
        .collect();
    // No match: every request (a path prefix of `/`).
    if matches.is_empty() {
        matches.push((
            at,
            RouteMatch {
                path: Some(PathMatch::Prefix("/".into())),
                ..RouteMatch::default()
            },
        ));
    }
    Rule {
        name: rule.name.as_deref(),
        matches,
        filters: &rule.filters,
        backend_refs: &rule.backend_refs,
        timeouts: rule.timeouts.as_ref(),
        retry: rule.retry.as_ref(),
        session_persistence: rule.session_persistence.is_some(),
    }
}

/// A GRPCRoute method match: an exact service (and method) is our `grpc` match; a method
/// alone or a regular expression is a regex on the `/service/method` path.
fn grpc_method(method: &GrpcMethod) -> RouteMatch {
    let exact = method.kind.unwrap_or(MatchType::Exact) == MatchType::Exact;
    match (&method.service, &method.method, exact) {
        (Some(service), method, true) => RouteMatch {
            grpc: Some(GrpcMatch {
                service: service.clone(),
                method: method.clone(),
            }),
            ..RouteMatch::default()
        },
        (service, method, exact) => {
            let part = |p: &Option<String>| match p {
                Some(p) if exact => regex_escape(p),
                Some(p) => format!("(?:{p})"),
                None => "[^/]+".into(),
            };
            RouteMatch {
                path: Some(PathMatch::Regex(format!(
                    "/{}/{}",
                    part(service),
                    part(method)
                ))),
                ..RouteMatch::default()
            }
        }
    }
}

fn regex_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn grpc_rule((i, rule): (usize, &GrpcRule)) -> Rule<'_> {
    let at = format!("spec.rules[{i}]");
    let mut matches: Vec<(String, RouteMatch)> = rule
        .matches
        .iter()
        .enumerate()
        .map(|(k, m)| {
            let at = format!("{at}.matches[{k}]");
            let mut route_match = match &m.method {
                Some(method) => grpc_method(method),
                None => RouteMatch {
                    path: Some(PathMatch::Prefix("/".into())),
                    ..RouteMatch::default()
                },
            };
            route_match.headers = m.headers.iter().map(value_match).collect();
            (at, route_match)
        })
        .collect();
    if matches.is_empty() {
        matches.push((
            at,
            RouteMatch {
                path: Some(PathMatch::Prefix("/".into())),
                ..RouteMatch::default()
            },
        ));
    }
    Rule {
        name: rule.name.as_deref(),
        matches,
        filters: &rule.filters,
        backend_refs: &rule.backend_refs,
        timeouts: None,
        retry: None,
        session_persistence: rule.session_persistence.is_some(),
    }
}

/// `group` and `kind` of a reference: whether they name a core Service.
fn is_service(group: Option<&str>, kind: Option<&str>, default_kind: &str) -> bool {
    matches!(group.unwrap_or(""), "" | "core") && kind.unwrap_or(default_kind) == "Service"
}

fn translate<R>(
    file: &str,
    kind: Kind,
    doc: &Document<R>,
    rules: Vec<Rule<'_>>,
) -> Result<GatewayRoutes, Findings> {
    let mut findings = Findings::new();
    let namespace = doc
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    if doc.status.is_some() {
        findings.push((
            "status".into(),
            "`status` is written by controllers, not taken as input: remove it".into(),
        ));
    }
    for (what, value) in [
        ("metadata.name", &doc.metadata.name),
        ("metadata.namespace", &namespace),
    ] {
        if !is_dns_label_ish(value) {
            findings.push((
                what.into(),
                format!("`{value}` is not a Kubernetes name (lowercase letters, digits, '-', '.')"),
            ));
        }
    }
    if doc.spec.hostnames.is_some() {
        findings.push((
            "spec.hostnames".into(),
            "not supported: a mesh route applies to the requests addressed to its parent \
             Services; remove `hostnames`"
                .into(),
        ));
    }
    let mut parents = Vec::new();
    if doc.spec.parent_refs.is_empty() {
        findings.push((
            "spec".into(),
            "needs `parentRefs` naming the Service whose requests it routes".into(),
        ));
    }
    for (i, parent) in doc.spec.parent_refs.iter().enumerate() {
        let at = format!("spec.parentRefs[{i}]");
        if !is_service(parent.group.as_deref(), parent.kind.as_deref(), "Gateway") {
            findings.push((
                at.clone(),
                format!(
                    "a parent of group `{}` and kind `{}` is not supported: Outrider takes mesh \
                     routes (GAMMA), whose parentRefs name a Service (`group: \"\"`, \
                     `kind: Service`)",
                    parent.group.as_deref().unwrap_or(GROUP),
                    parent.kind.as_deref().unwrap_or("Gateway"),
                ),
            ));
            continue;
        }
        if parent.namespace.as_ref().is_some_and(|ns| *ns != namespace) {
            findings.push((
                format!("{at}.namespace"),
                "a route for a Service of another namespace (a consumer route) is not \
                 supported: put the route in the Service's namespace"
                    .into(),
            ));
        }
        if parent.port.is_some() {
            findings.push((
                format!("{at}.port"),
                "not supported: the route applies to every port of the Service; remove `port`"
                    .into(),
            ));
        }
        if parent.section_name.is_some() {
            findings.push((
                format!("{at}.sectionName"),
                "not supported for a Service parent; remove `sectionName`".into(),
            ));
        }
        if !parents.contains(&parent.name) {
            parents.push(parent.name.clone());
        }
    }
    let hosts: Vec<String> = parents
        .iter()
        .flat_map(|p| {
            [
                p.clone(),
                format!("{p}.{namespace}"),
                format!("{p}.{namespace}.svc"),
                format!("{p}.{namespace}.svc.{CLUSTER_DOMAIN}"),
            ]
        })
        .collect();
    if rules.len() > MAX_RULES {
        findings.push((
            "spec.rules".into(),
            format!("at most {MAX_RULES} rules per route"),
        ));
    }
    let mut routes = Vec::new();
    let mut references = Vec::new();
    let mut names = HashSet::new();
    for (i, rule) in rules.iter().enumerate().take(MAX_RULES) {
        let at = format!("spec.rules[{i}]");
        let rule_name = match rule.name {
            Some(name) if !is_dns_label_ish(name) || name.contains('.') => {
                findings.push((
                    format!("{at}.name"),
                    "a rule name holds lowercase letters, digits and '-'".into(),
                ));
                name.to_string()
            }
            Some(name) => name.to_string(),
            None => format!("rule-{i}"),
        };
        let route_name = format!(
            "{}.{namespace}.{}.{rule_name}",
            kind.prefix(),
            doc.metadata.name
        );
        if !names.insert(route_name.clone()) {
            findings.push((
                format!("{at}.name"),
                format!("two rules would both be the route `{route_name}`"),
            ));
        }
        if rule.session_persistence {
            findings.push((
                format!("{at}.sessionPersistence"),
                "not supported: for sticky endpoints use the service's `load_balancing: \
                 { hash: { cookie: NAME } }` in the policy"
                    .into(),
            ));
        }
        let mut route = Route {
            name: Some(route_name),
            r#match: None,
            matches: Vec::new(),
            service: None,
            split: None,
            timeouts: None,
            retries: None,
            rate_limit: None,
            retry_non_idempotent: false,
            fault: None,
            filters: Vec::new(),
        };
        for (_, m) in &rule.matches {
            for host in &hosts {
                let mut m = m.clone();
                m.authority = Some(host.clone());
                route.matches.push(m);
            }
        }
        let mut redirects = false;
        for (f, filter) in rule.filters.iter().enumerate() {
            let at = format!("{at}.filters[{f}]");
            match translate_filter(kind, &at, filter, &namespace, &mut references) {
                Ok(filter) => {
                    redirects |= matches!(filter, RouteFilter::RequestRedirect(_));
                    route.filters.push(filter);
                }
                Err(finding) => findings.push(finding),
            }
        }
        let mut legs = Vec::new();
        for (b, backend) in rule.backend_refs.iter().enumerate() {
            let at = format!("{at}.backendRefs[{b}]");
            if let Err(finding) = check_backend(&at, backend, &namespace) {
                findings.push(finding);
                continue;
            }
            if backend.filters.is_some() {
                findings.push((
                    format!("{at}.filters"),
                    "filters on a backendRef are not supported: put them on the rule".into(),
                ));
            }
            let weight = backend.weight.unwrap_or(1);
            references.push(ServiceRef {
                service: backend.name.clone(),
                path: at,
                position: None,
            });
            if weight > 0 {
                legs.push(WeightedService {
                    service: backend.name.clone(),
                    weight,
                });
            }
        }
        match (legs.len(), redirects) {
            // A redirect answers before any backend: the route goes nowhere, and the parent
            // Service (there when the route applies) fills the place of one.
            (0, true) if rule.backend_refs.is_empty() => route.service = parents.first().cloned(),
            (0, _) if rule.backend_refs.is_empty() => findings.push((
                at.clone(),
                "needs `backendRefs` (Gateway API answers 500 to a rule without any; Outrider \
                 takes no such rule)"
                    .into(),
            )),
            (0, _) => findings.push((
                format!("{at}.backendRefs"),
                "every backendRef has weight 0: the rule would take its requests and send \
                 them nowhere"
                    .into(),
            )),
            (1, _) if rule.backend_refs.len() == 1 => {
                route.service = legs.pop().map(|l| l.service);
            }
            _ => route.split = Some(legs),
        }
        if let Some(timeouts) = rule.timeouts {
            let mut t = RouteTimeouts::default();
            for (field, value, slot) in [
                ("request", &timeouts.request, &mut t.request),
                ("backendRequest", &timeouts.backend_request, &mut t.per_try),
            ] {
                if let Some(value) = value {
                    match gateway_duration(value) {
                        Ok(d) => *slot = Some(d),
                        Err(why) => findings.push((format!("{at}.timeouts.{field}"), why)),
                    }
                }
            }
            route.timeouts = Some(t);
        }
        if let Some(retry) = rule.retry {
            match translate_retry(&at, retry) {
                Ok(retries) => route.retries = Some(retries),
                Err(finding) => findings.push(finding),
            }
        }
        routes.push(route);
    }
    if findings.is_empty() {
        findings.extend(check_routes(&routes, &rules, &references, hosts.len()));
    }
    if !findings.is_empty() {
        return Err(findings);
    }
    Ok(GatewayRoutes {
        kind,
        namespace,
        name: doc.metadata.name.clone(),
        file: file.to_string(),
        parents,
        routes,
        references,
    })
}

/// Kubernetes object names: lowercase letters, digits, '-' and '.', at most 253.
fn is_dns_label_ish(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.'))
        && !name.starts_with(['-', '.'])
}

fn check_backend(at: &str, backend: &BackendRef, namespace: &str) -> Result<(), (String, String)> {
    if !is_service(backend.group.as_deref(), backend.kind.as_deref(), "Service") {
        return Err((
            at.to_string(),
            "only a Service can be a backend (`kind: Service`)".into(),
        ));
    }
    if backend
        .namespace
        .as_deref()
        .is_some_and(|ns| ns != namespace)
    {
        return Err((
            format!("{at}.namespace"),
            "a backend in another namespace is not supported (no ReferenceGrant): use the \
             route's namespace"
                .into(),
        ));
    }
    Ok(())
}

/// A Gateway API duration (GEP-2257: `1h`, `500ms`, `1m30s`). Zero means "no timeout",
/// which a route cannot say over its service's timeout: refused.
fn gateway_duration(value: &str) -> Result<Duration, String> {
    let duration: Duration = value.parse().map_err(|e| format!("{e}"))?;
    if duration.get().is_zero() {
        return Err(
            "a zero duration (no timeout) is not supported: leave the field out to keep the \
             service's timeout"
                .into(),
        );
    }
    Ok(duration)
}

fn translate_retry(at: &str, retry: &HttpRetry) -> Result<Retries, (String, String)> {
    let base = match &retry.backoff {
        Some(value) => {
            gateway_duration(value).map_err(|why| (format!("{at}.retry.backoff"), why))?
        }
        None => Backoff::default().base,
    };
    // Gateway API's backoff is the least wait before a retry; ours is full-jitter exponential
    // from that base, capped at eight times it, so a retry may come sooner (README).
    let max = Duration(base.get().saturating_mul(8));
    let (on, status) = if retry.codes.is_empty() {
        (Retries::default_on(), Vec::new())
    } else {
        (
            vec![
                RetryOn::ConnectFailure,
                RetryOn::Reset,
                RetryOn::RetriableStatus,
            ],
            retry.codes.clone(),
        )
    };
    Ok(Retries {
        attempts: retry.attempts.unwrap_or(1),
        on,
        status,
        grpc: Vec::new(),
        backoff: Backoff { base, max },
        budget: RetryBudget::default(),
        body_limit: Retries::default_body_limit(),
        max_retry_after: Retries::default_max_retry_after(),
    })
}

fn translate_filter(
    kind: Kind,
    at: &str,
    filter: &Filter,
    namespace: &str,
    references: &mut Vec<ServiceRef>,
) -> Result<RouteFilter, (String, String)> {
    let missing = |field: &str| {
        (
            format!("{at}.type"),
            format!("type `{}` needs `{field}`", filter.kind),
        )
    };
    let http_only = |what: &str| {
        (
            format!("{at}.type"),
            format!("GRPCRoute has no `{what}` filter"),
        )
    };
    let translated = match filter.kind.as_str() {
        "RequestHeaderModifier" => RouteFilter::RequestHeaderModifier(header_modifier(
            filter
                .request_header_modifier
                .as_ref()
                .ok_or_else(|| missing("requestHeaderModifier"))?,
        )),
        "ResponseHeaderModifier" => RouteFilter::ResponseHeaderModifier(header_modifier(
            filter
                .response_header_modifier
                .as_ref()
                .ok_or_else(|| missing("responseHeaderModifier"))?,
        )),
        "RequestRedirect" if kind == Kind::GrpcRoute => return Err(http_only("RequestRedirect")),
        "URLRewrite" if kind == Kind::GrpcRoute => return Err(http_only("URLRewrite")),
        "RequestRedirect" => {
            let r = filter
                .request_redirect
                .as_ref()
                .ok_or_else(|| missing("requestRedirect"))?;
            let at = format!("{at}.requestRedirect");
            let scheme = match r.scheme.as_deref() {
                None => None,
                Some("http") => Some(RedirectScheme::Http),
                Some("https") => Some(RedirectScheme::Https),
                Some(other) => {
                    return Err((
                        format!("{at}.scheme"),
                        format!("scheme `{other}`: `http` or `https`"),
                    ))
                }
            };
            RouteFilter::RequestRedirect(RequestRedirect {
                scheme,
                hostname: r.hostname.clone(),
                port: r.port,
                path: r
                    .path
                    .as_ref()
                    .map(|p| path_modifier(&format!("{at}.path"), p))
                    .transpose()?,
                status_code: r.status_code.unwrap_or(302),
            })
        }
        "URLRewrite" => {
            let r = filter
                .url_rewrite
                .as_ref()
                .ok_or_else(|| missing("urlRewrite"))?;
            RouteFilter::UrlRewrite(UrlRewrite {
                hostname: r.hostname.clone(),
                path: r
                    .path
                    .as_ref()
                    .map(|p| path_modifier(&format!("{at}.urlRewrite.path"), p))
                    .transpose()?,
            })
        }
        "RequestMirror" => {
            let m = filter
                .request_mirror
                .as_ref()
                .ok_or_else(|| missing("requestMirror"))?;
            let backend_at = format!("{at}.requestMirror.backendRef");
            check_backend(&backend_at, &m.backend_ref, namespace)?;
            let percent = match (m.percent, &m.fraction) {
                (Some(_), Some(_)) => {
                    return Err((
                        format!("{at}.requestMirror"),
                        "set `percent` or `fraction`, not both".into(),
                    ))
                }
                (Some(p), None) => f64::from(p),
                (None, Some(f)) => {
                    let denominator = f.denominator.unwrap_or(100);
                    if denominator == 0 || f.numerator > denominator {
                        return Err((
                            format!("{at}.requestMirror.fraction"),
                            "needs 0 <= numerator <= denominator and denominator > 0".into(),
                        ));
                    }
                    100.0 * f64::from(f.numerator) / f64::from(denominator)
                }
                (None, None) => RequestMirror::default_percent(),
            };
            references.push(ServiceRef {
                service: m.backend_ref.name.clone(),
                path: backend_at,
                position: None,
            });
            RouteFilter::RequestMirror(RequestMirror {
                service: m.backend_ref.name.clone(),
                percent,
                body_limit: RequestMirror::default_body_limit(),
                timeout: RequestMirror::default_timeout(),
                max_in_flight: RequestMirror::default_max_in_flight(),
            })
        }
        other => {
            return Err((
                format!("{at}.type"),
                format!(
                    "filter type `{other}` is not supported: RequestHeaderModifier, \
                     ResponseHeaderModifier, RequestMirror{} are",
                    if kind == Kind::HttpRoute {
                        ", RequestRedirect, URLRewrite"
                    } else {
                        ""
                    }
                ),
            ))
        }
    };
    // A field for another type beside `type`'s own is a mistake Gateway API's CRD refuses.
    let set = [
        (
            "requestHeaderModifier",
            filter.request_header_modifier.is_some(),
        ),
        (
            "responseHeaderModifier",
            filter.response_header_modifier.is_some(),
        ),
        ("requestRedirect", filter.request_redirect.is_some()),
        ("urlRewrite", filter.url_rewrite.is_some()),
        ("requestMirror", filter.request_mirror.is_some()),
        ("extensionRef", filter.extension_ref.is_some()),
        ("cors", filter.cors.is_some()),
        ("externalAuth", filter.external_auth.is_some()),
    ];
    let own = match &translated {
        RouteFilter::RequestHeaderModifier(_) => "requestHeaderModifier",
        RouteFilter::ResponseHeaderModifier(_) => "responseHeaderModifier",
        RouteFilter::RequestRedirect(_) => "requestRedirect",
        RouteFilter::UrlRewrite(_) => "urlRewrite",
        RouteFilter::RequestMirror(_) => "requestMirror",
    };
    if let Some((field, _)) = set.iter().find(|(field, set)| *set && *field != own) {
        return Err((
            format!("{at}.{field}"),
            format!("`{field}` does not go with type `{}`", filter.kind),
        ));
    }
    Ok(translated)
}

fn header_modifier(filter: &HeaderFilter) -> HeaderModifier {
    let map = |headers: &[Header]| {
        headers
            .iter()
            .map(|h| (h.name.clone(), h.value.clone()))
            .collect()
    };
    HeaderModifier {
        set: map(&filter.set),
        add: map(&filter.add),
        remove: filter.remove.clone(),
    }
}

fn path_modifier(at: &str, p: &PathRewrite) -> Result<PathModifier, (String, String)> {
    match (
        p.kind.as_str(),
        &p.replace_full_path,
        &p.replace_prefix_match,
    ) {
        ("ReplaceFullPath", Some(path), None) => Ok(PathModifier::ReplaceFullPath(path.clone())),
        ("ReplacePrefixMatch", None, Some(path)) => {
            Ok(PathModifier::ReplacePrefixMatch(path.clone()))
        }
        ("ReplaceFullPath" | "ReplacePrefixMatch", _, _) => Err((
            at.to_string(),
            format!(
                "type `{}` needs its own field (`replaceFullPath` or `replacePrefixMatch`) \
                 and no other",
                p.kind
            ),
        )),
        (other, _, _) => Err((
            format!("{at}.type"),
            format!("path modifier type `{other}`: `ReplaceFullPath` or `ReplacePrefixMatch`"),
        )),
    }
}

/// The translated routes through the policy's own validation (services stood in for), each
/// finding taken back to the rule, match or filter it came from.
fn check_routes(
    routes: &[Route],
    rules: &[Rule<'_>],
    references: &[ServiceRef],
    hosts: usize,
) -> Findings {
    let mut policy = Policy::default();
    for service in references
        .iter()
        .map(|r| r.service.clone())
        .chain(routes.iter().filter_map(|r| r.service.clone()))
    {
        policy.services.insert(service, crate::Service::default());
    }
    policy.routes = routes.to_vec();
    let mut findings = Findings::new();
    for (path, message) in crate::validate::validate(&policy) {
        let Some(rest) = path.strip_prefix("routes[") else {
            continue;
        };
        let Some((index, after)) = rest.split_once(']') else {
            continue;
        };
        let Some(rule) = index.parse::<usize>().ok().and_then(|i| rules.get(i)) else {
            continue;
        };
        let rule_at = format!("spec.rules[{index}]");
        let back = if let Some(m) = after.strip_prefix(".matches[") {
            let k = m
                .split_once(']')
                .and_then(|(k, _)| k.parse::<usize>().ok())
                .unwrap_or(0);
            rule.matches
                .get(k / hosts.max(1))
                .map_or(rule_at.clone(), |(at, _)| at.clone())
        } else if let Some(f) = after.strip_prefix(".filters[") {
            let f = f.split_once(']').map_or("0", |(f, _)| f);
            format!("{rule_at}.filters[{f}]")
        } else if after.starts_with(".split") || after.starts_with(".service") {
            format!("{rule_at}.backendRefs")
        } else if after.starts_with(".retries") {
            format!("{rule_at}.retry")
        } else if after.starts_with(".timeouts") {
            format!("{rule_at}.timeouts")
        } else {
            rule_at
        };
        findings.push((back, message));
    }
    findings
}

/// A policy route entry that attaches policy to a translated route: named like one, with no
/// match of its own.
pub fn is_attachment(route: &Route) -> bool {
    route.name.as_deref().is_some_and(is_gateway_route_name)
        && route.r#match.is_none()
        && route.matches.is_empty()
}

/// Why a workload's policy and its Gateway API routes do not compose.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ComposeError(pub String);

fn at_file(file: &str, position: Option<Position>) -> String {
    match position {
        Some(p) => format!("{file}:{}:{}", p.line, p.column),
        None => file.to_string(),
    }
}

/// Joins Gateway API routes to a workload's policy (the documents already merged): the routes
/// of every document one of whose parent Services is a service of `policy` come after the
/// policy's own routes (which so win ties of match precedence), documents in namespace and
/// name order; each service they name must be one of the policy's. Then each attachment of
/// the policy (a route entry named like a translated route, without a match) adds its
/// `retries`, `timeouts`, `rate_limit`, `fault` and `retry_non_idempotent` to that route, a
/// field that both set being a conflict. An attachment to a route of a document that does not
/// apply here is dropped; one to a route no document has is an error.
pub fn compose(policy: &mut Policy, gateway: &[&GatewayRoutes]) -> Result<(), ComposeError> {
    let mut documents: Vec<&GatewayRoutes> = gateway.to_vec();
    documents.sort_by(|a, b| (&a.namespace, &a.name, a.kind).cmp(&(&b.namespace, &b.name, b.kind)));
    for pair in documents.windows(2) {
        if let [a, b] = pair {
            if (&a.namespace, &a.name, a.kind) == (&b.namespace, &b.name, b.kind) {
                return Err(ComposeError(format!(
                    "{} is defined by both {} and {}",
                    a.title(),
                    a.file,
                    b.file
                )));
            }
        }
    }
    let (attachments, own): (Vec<Route>, Vec<Route>) = std::mem::take(&mut policy.routes)
        .into_iter()
        .partition(is_attachment);
    policy.routes = own;
    let known: HashSet<&str> = documents
        .iter()
        .flat_map(|d| d.routes.iter().filter_map(|r| r.name.as_deref()))
        .collect();
    if let Some(clash) = policy
        .routes
        .iter()
        .filter_map(|r| r.name.as_deref())
        .find(|n| known.contains(n))
    {
        return Err(ComposeError(format!(
            "route `{clash}` of the policy has a match of its own and the name of a route \
             translated from a Gateway API document; an entry of that name attaches policy \
             to it and has no match"
        )));
    }
    let first_translated = policy.routes.len();
    for doc in documents {
        if !doc.parents.iter().any(|p| policy.services.contains_key(p)) {
            continue;
        }
        for reference in &doc.references {
            if !policy.services.contains_key(&reference.service) {
                return Err(ComposeError(format!(
                    "{}: `{}` names the Service `{}`, which is no service of the policy here \
                     (a backend must be a service of the policy) at {}",
                    doc.title(),
                    reference.path,
                    reference.service,
                    at_file(&doc.file, reference.position)
                )));
            }
        }
        // A redirect-only rule stands one parent in for its backend: one that is here.
        let here = doc
            .parents
            .iter()
            .find(|p| policy.services.contains_key(*p));
        for route in &doc.routes {
            let mut route = route.clone();
            if route
                .service
                .as_ref()
                .is_some_and(|s| !policy.services.contains_key(s) && doc.parents.contains(s))
            {
                route.service = here.cloned();
            }
            policy.routes.push(route);
        }
    }
    for attachment in attachments {
        let name = attachment.name.clone().unwrap_or_default();
        let target = policy.routes[first_translated..]
            .iter_mut()
            .find(|r| r.name.as_deref() == Some(name.as_str()));
        let Some(target) = target else {
            if known.contains(name.as_str()) {
                continue;
            }
            return Err(ComposeError(format!(
                "route `{name}` attaches policy to a route translated from a Gateway API \
                 document, and there is none of that name (they are \
                 `httproute.NAMESPACE.NAME.RULE`, RULE being the rule's name or `rule-INDEX`)"
            )));
        };
        attach(target, attachment, &name)?;
    }
    Ok(())
}

fn attach(target: &mut Route, attachment: Route, name: &str) -> Result<(), ComposeError> {
    let both = |field: &str| {
        ComposeError(format!(
            "route `{name}`: `{field}` is set both by its Gateway API document and by the \
             policy entry attached to it; set it in one place"
        ))
    };
    fn fill<T>(slot: &mut Option<T>, value: Option<T>) -> Result<(), ()> {
        match (slot.is_some(), value) {
            (true, Some(_)) => Err(()),
            (false, Some(v)) => {
                *slot = Some(v);
                Ok(())
            }
            (_, None) => Ok(()),
        }
    }
    fill(&mut target.retries, attachment.retries).map_err(|()| both("retries"))?;
    fill(&mut target.rate_limit, attachment.rate_limit).map_err(|()| both("rate_limit"))?;
    fill(&mut target.fault, attachment.fault).map_err(|()| both("fault"))?;
    match (&mut target.timeouts, attachment.timeouts) {
        (Some(mine), Some(theirs)) => {
            // Field by field: the HTTPRoute says `request`/`per_try`, the policy may add
            // `idle` and `request_body_idle`.
            fill(&mut mine.request, theirs.request).map_err(|()| both("timeouts.request"))?;
            fill(&mut mine.per_try, theirs.per_try).map_err(|()| both("timeouts.per_try"))?;
            fill(&mut mine.idle, theirs.idle).map_err(|()| both("timeouts.idle"))?;
            fill(&mut mine.request_body_idle, theirs.request_body_idle)
                .map_err(|()| both("timeouts.request_body_idle"))?;
        }
        (slot @ None, theirs) => *slot = theirs,
        (Some(_), None) => {}
    }
    target.retry_non_idempotent |= attachment.retry_non_idempotent;
    Ok(())
}

/// Positions of the references, filled in once the document's text is indexed.
fn locate(routes: &mut GatewayRoutes, text: &str) {
    let index = PositionIndex::build(text);
    for reference in &mut routes.references {
        reference.position = index.find(&reference.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CANARY: &str = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: reviews
  namespace: shop
spec:
  parentRefs:
    - { group: \"\", kind: Service, name: reviews }
  rules:
    - name: canary
      matches:
        - headers: [{ name: x-canary, value: \"true\" }]
      backendRefs: [{ name: reviews-v2, port: 80 }]
    - backendRefs:
        - { name: reviews-v1, port: 80, weight: 90 }
        - { name: reviews-v2, port: 80, weight: 10 }
        - { name: reviews-v3, port: 80, weight: 0 }
      timeouts: { request: 10s, backendRequest: 2s }
      retry: { attempts: 3, backoff: 100ms, codes: [503] }
";

    fn errors(text: &str) -> String {
        match crate::load_document("route.yaml", text) {
            Ok(loaded) => panic!("expected errors, got {loaded:?}"),
            Err(error) => error.to_string(),
        }
    }

    fn routes(text: &str) -> GatewayRoutes {
        let mut loaded = crate::load_document("route.yaml", text).expect("valid");
        assert_eq!(loaded.policy.gateway.len(), 1);
        loaded.policy.gateway.remove(0)
    }

    #[test]
    fn an_httproute_becomes_one_named_route_per_rule_on_every_host_form() {
        let translated = routes(CANARY);
        assert_eq!(translated.title(), "HTTPRoute shop/reviews");
        assert_eq!(translated.parents, ["reviews"]);
        let names: Vec<_> = translated.routes.iter().map(|r| r.name.clone()).collect();
        assert_eq!(
            names,
            [
                Some("httproute.shop.reviews.canary".to_string()),
                Some("httproute.shop.reviews.rule-1".to_string())
            ]
        );
        let canary = &translated.routes[0];
        let hosts: Vec<_> = canary
            .matches
            .iter()
            .map(|m| m.authority.clone().unwrap_or_default())
            .collect();
        assert_eq!(
            hosts,
            [
                "reviews",
                "reviews.shop",
                "reviews.shop.svc",
                "reviews.shop.svc.cluster.local"
            ]
        );
        assert!(canary.matches.iter().all(|m| m.headers
            == [ValueMatch {
                name: "x-canary".into(),
                value: Some("true".into()),
                regex: None,
                present: None
            }]
            && m.path == Some(PathMatch::Prefix("/".into()))));
        assert_eq!(canary.service.as_deref(), Some("reviews-v2"));
        let weighted = &translated.routes[1];
        assert_eq!(
            weighted.split,
            Some(vec![
                WeightedService {
                    service: "reviews-v1".into(),
                    weight: 90
                },
                WeightedService {
                    service: "reviews-v2".into(),
                    weight: 10
                }
            ]),
            "weight 0 takes no traffic"
        );
        let timeouts = weighted.timeouts.clone().expect("timeouts");
        assert_eq!(timeouts.request, Some(Duration::from_secs(10)));
        assert_eq!(timeouts.per_try, Some(Duration::from_secs(2)));
        let retries = weighted.retries.clone().expect("retries");
        assert_eq!(retries.attempts, 3);
        assert_eq!(retries.status, [503]);
        assert!(retries.on.contains(&RetryOn::RetriableStatus));
        assert_eq!(retries.backoff.base, Duration::from_millis(100));
        // Every backend is a reference with its place in the file, weight 0 included.
        let places: Vec<_> = translated
            .references
            .iter()
            .map(|r| (r.service.as_str(), r.position.map(|p| p.line)))
            .collect();
        assert_eq!(
            places,
            [
                ("reviews-v2", Some(13)),
                ("reviews-v1", Some(15)),
                ("reviews-v2", Some(16)),
                ("reviews-v3", Some(17))
            ]
        );
    }

    #[test]
    fn what_the_translation_cannot_honour_is_refused_with_its_place() {
        let gateway_parent = CANARY.replace(
            "{ group: \"\", kind: Service, name: reviews }",
            "{ name: mesh-gateway }",
        );
        let error = errors(&gateway_parent);
        assert!(
            error.contains("spec.parentRefs[0]: a parent of group `gateway.networking.k8s.io` and kind `Gateway` is not supported")
                && error.ends_with("at route.yaml:8:7"),
            "{error}"
        );
        let sticky = CANARY.replace(
            "      timeouts:",
            "      sessionPersistence: { type: Cookie }\n      timeouts:",
        );
        let error = errors(&sticky);
        assert!(
            error.starts_with("spec.rules[1].sessionPersistence: not supported")
                && error.ends_with("at route.yaml:18:7"),
            "{error}"
        );
        let extension = CANARY.replace(
            "      backendRefs: [{ name: reviews-v2, port: 80 }]",
            "      filters:\n        - type: ExtensionRef\n          extensionRef: { group: x, kind: y, name: z }\n      backendRefs: [{ name: reviews-v2, port: 80 }]",
        );
        let error = errors(&extension);
        assert!(
            error.starts_with(
                "spec.rules[0].filters[0].type: filter type `ExtensionRef` is not supported"
            ) && error.ends_with("at route.yaml:14:17"),
            "{error}"
        );
        // A field this schema does not have at all: serde's own error, positioned.
        let unknown = CANARY.replace("      timeouts:", "      cors: {}\n      timeouts:");
        let error = errors(&unknown);
        assert!(
            error.contains("unknown field `cors`") && error.contains("route.yaml:18:7"),
            "{error}"
        );
        for (from, to, expected) in [
            (
                "  rules:",
                "  hostnames: [a.example]\n  rules:",
                "spec.hostnames: not supported",
            ),
            (
                "name: reviews }",
                "name: reviews, port: 80 }",
                "spec.parentRefs[0].port: not supported",
            ),
            (
                "request: 10s",
                "request: 0s",
                "spec.rules[1].timeouts.request: a zero duration",
            ),
            (
                "weight: 90 }",
                "weight: 90, namespace: other }",
                "spec.rules[1].backendRefs[0].namespace: a backend in another namespace",
            ),
            (
                "kind: HTTPRoute",
                "kind: TCPRoute",
                "kind: kind `TCPRoute` is not taken",
            ),
            (
                "/v1\n",
                "/v1alpha2\n",
                "apiVersion: apiVersion `gateway.networking.k8s.io/v1alpha2` is not taken",
            ),
        ] {
            let error = errors(&CANARY.replace(from, to));
            assert!(
                error.starts_with(expected) && error.contains(" at route.yaml:"),
                "{to}: {error}"
            );
        }
        // The policy's own checks, taken back to the rule: a regex that does not compile.
        let regex = CANARY.replace(
            "{ name: x-canary, value: \"true\" }",
            "{ type: RegularExpression, name: x-canary, value: \"(\" }",
        );
        let error = errors(&regex);
        assert!(
            error.starts_with("spec.rules[0].matches[0]:")
                && error.ends_with("at route.yaml:12:11"),
            "{error}"
        );
    }

    #[test]
    fn grpcroute_methods_are_grpc_matches_or_path_regexes() {
        let text = "apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: { name: echo }
spec:
  parentRefs: [{ kind: Service, name: echo }]
  rules:
    - matches:
        - method: { service: echo.Echo, method: Unary }
          headers: [{ name: x-v, value: \"2\" }]
        - method: { type: RegularExpression, method: \"Str.*\" }
      backendRefs: [{ name: echo-v2 }]
";
        let translated = routes(text);
        let route = &translated.routes[0];
        assert_eq!(route.name.as_deref(), Some("grpcroute.default.echo.rule-0"));
        assert_eq!(route.matches.len(), 8);
        assert_eq!(
            route.matches[0].grpc,
            Some(GrpcMatch {
                service: "echo.Echo".into(),
                method: Some("Unary".into())
            })
        );
        assert_eq!(route.matches[0].headers.len(), 1);
        assert_eq!(
            route.matches[4].path,
            Some(PathMatch::Regex("/[^/]+/(?:Str.*)".into()))
        );
        let error = errors(&text.replace(
            "      backendRefs",
            "      filters: [{ type: URLRewrite, urlRewrite: { hostname: x } }]\n      backendRefs",
        ));
        assert!(
            error.contains("GRPCRoute has no `URLRewrite` filter"),
            "{error}"
        );
        let error = errors(&text.replace(
            "    - matches:",
            "    - timeouts: { request: 1s }\n      matches:",
        ));
        assert!(error.contains("unknown field `timeouts`"), "{error}");
    }

    fn policy(text: &str) -> Policy {
        crate::load_document("policy.yaml", text)
            .expect("valid")
            .policy
    }

    #[test]
    fn compose_joins_routes_where_the_parent_is_a_service_and_attaches_by_name() {
        let translated = routes(CANARY);
        let services = "services:
  reviews: { endpoints: [127.0.0.1:1] }
  reviews-v1: { endpoints: [127.0.0.1:2] }
  reviews-v2: { endpoints: [127.0.0.1:3] }
  reviews-v3: { endpoints: [127.0.0.1:4] }
";
        let own = "routes:
  - { name: mine, match: { authority: reviews }, service: reviews }
  - name: httproute.shop.reviews.canary
    rate_limit: { requests_per_second: 5 }
    timeouts: { idle: 3s }
";
        let mut composed = policy(&format!("{services}{own}"));
        compose(&mut composed, &[&translated]).expect("composes");
        let names: Vec<_> = composed
            .routes
            .iter()
            .filter_map(|r| r.name.as_deref())
            .collect();
        assert_eq!(
            names,
            [
                "mine",
                "httproute.shop.reviews.canary",
                "httproute.shop.reviews.rule-1"
            ],
            "the policy's own routes first; the attachment is consumed"
        );
        assert_eq!(
            composed.routes[1]
                .rate_limit
                .as_ref()
                .map(|l| l.requests_per_second),
            Some(5)
        );
        // The composed policy is what a proxy runs.
        let yaml = crate::to_yaml(&composed).expect("yaml");
        crate::load("composed", &yaml).expect("a proxy takes it");

        // Where the parent is no service, nothing applies, and the attachment is dropped.
        let mut elsewhere = policy(
            &format!("services: {{ other: {{ endpoints: [127.0.0.1:1] }} }}\n{own}")
                .replace("service: reviews }", "service: other }"),
        );
        compose(&mut elsewhere, &[&translated]).expect("composes");
        assert_eq!(elsewhere.routes.len(), 1);

        // A backend the policy lacks: the document's file, line and column.
        let mut missing =
            policy(&services.replace("  reviews-v3: { endpoints: [127.0.0.1:4] }\n", ""));
        let error = compose(&mut missing, &[&translated]).expect_err("reviews-v3 is missing");
        assert!(
            error
                .0
                .contains("`spec.rules[1].backendRefs[2]` names the Service `reviews-v3`")
                && error.0.ends_with("at route.yaml:17:11"),
            "{error}"
        );

        // Set on both sides: a conflict, not a silent winner.
        let both = own
            .replace("timeouts: { idle: 3s }", "retries: { attempts: 1 }")
            .replace(
                "httproute.shop.reviews.canary",
                "httproute.shop.reviews.rule-1",
            );
        let mut conflicting = policy(&format!("{services}{both}"));
        let error = compose(&mut conflicting, &[&translated]).expect_err("retries twice");
        assert!(error.0.contains("`retries` is set both"), "{error}");

        let typo = own.replace("reviews.canary", "reviews.canery");
        let mut unknown = policy(&format!("{services}{typo}"));
        let error = compose(&mut unknown, &[&translated]).expect_err("no such route");
        assert!(
            error
                .0
                .contains("route `httproute.shop.reviews.canery` attaches"),
            "{error}"
        );
        assert!(compose(&mut policy(services), &[&translated, &translated]).is_err());
    }

    #[test]
    fn the_example_composes_with_its_attachment() {
        let text = include_str!("../../deploy/examples/gateway-canary.yaml");
        let mut policy = crate::load_document("gateway-canary.yaml", text)
            .expect("valid")
            .policy;
        let gateway = std::mem::take(&mut policy.gateway);
        compose(&mut policy, &gateway.iter().collect::<Vec<_>>()).expect("composes");
        let canary = &policy.routes[0];
        assert_eq!(
            canary.name.as_deref(),
            Some("httproute.default.reviews.canary")
        );
        assert!(canary.rate_limit.is_some() && canary.retries.is_some());
        assert_eq!(
            policy.routes[1].timeouts.as_ref().and_then(|t| t.per_try),
            Some(Duration::from_secs(1))
        );
        crate::load("composed", &crate::to_yaml(&policy).expect("yaml")).expect("a proxy takes it");
    }

    #[test]
    fn offline_checks_compose_a_file_of_routes_and_services() {
        let text = include_str!("../../deploy/examples/gateway-canary.yaml");
        assert!(crate::check_document("x.yaml", text).result.is_ok());
        let missing = text.replace(
            "- { name: reviews-v1, port: 9080, weight: 90 }",
            "- { name: reviews-v0, port: 9080, weight: 90 }",
        );
        let error = crate::check_document("x.yaml", &missing)
            .result
            .expect_err("no reviews-v0");
        assert!(
            error.to_string().contains("names the Service `reviews-v0`"),
            "{error}"
        );
    }

    #[test]
    fn attachments_are_for_the_control_plane_only() {
        let text = "services: { a: { endpoints: [127.0.0.1:1] } }
routes:
  - { name: httproute.default.x.rule-0, rate_limit: { requests_per_second: 1 } }
";
        crate::load_document("p.yaml", text).expect("a document may attach");
        let error = crate::load("p.yaml", text).expect_err("a proxy's policy may not");
        assert!(
            error.to_string().contains("needs `match` or `matches`"),
            "{error}"
        );
        let error = crate::load_document(
            "p.yaml",
            &text.replace("rate_limit: { requests_per_second: 1 }", "service: a"),
        )
        .expect_err("an attachment does not route");
        assert!(
            error
                .to_string()
                .contains("routes[0].service: an entry attaching policy"),
            "{error}"
        );
    }

    #[test]
    fn a_file_of_several_documents_keeps_the_file_positions() {
        let text = format!(
            "# routes and the services they need\nservices:\n  reviews: {{ endpoints: [127.0.0.1:1] }}\n---\n{CANARY}---\n{}",
            CANARY.replace("name: reviews\n  namespace", "name: ratings\n  namespace").replace("name: canary", "name: Canary")
        );
        let error = crate::load_document("all.yaml", &text).expect_err("a bad rule name");
        // The second route starts on line 25: its rule name is on its line 10.
        assert_eq!(
            error.to_string(),
            "spec.rules[0].name: a rule name holds lowercase letters, digits and '-' at all.yaml:34:13"
        );
        let good = text.replace("name: Canary", "name: canary");
        let loaded = crate::load_document("all.yaml", &good).expect("valid");
        assert_eq!(loaded.policy.gateway.len(), 2);
        assert!(loaded.policy.services.contains_key("reviews"));
        assert_eq!(
            loaded.policy.gateway[1].references[0]
                .position
                .map(|p| p.line),
            Some(37)
        );
        let two = format!("{good}---\nservices: {{}}\n");
        assert!(crate::load_document("all.yaml", &two)
            .expect_err("two policies")
            .to_string()
            .contains("a second policy document"));
    }
}
