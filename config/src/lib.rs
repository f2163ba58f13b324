//! Outrider's policy: the YAML schema shared by the proxy and the control plane, its parsing
//! and its validation. Pure data: no I/O runtime, no HTTP.
//!
//! [`load`] turns policy text into a [`LoadedPolicy`] or a [`PolicyError`] whose every
//! diagnostic names the path, file, line and column of the problem.

pub mod app_probe;
mod duration;
mod error;
pub mod gateway;
mod json_schema;
pub mod limits;
mod lint;
pub mod matching;
mod parse;
mod plain;
mod position;
mod schema;
mod size;
pub mod spiffe;
mod suggest;
mod validate;
pub mod wire;

pub use duration::{Duration, DurationError};
pub use error::{Diagnostic, PolicyError};
pub use json_schema::{policy_schema, policy_schema_text};
pub use position::Position;
pub use schema::{
    AccessLog, AccessLogFormat, Authorization, AuthzAction, AuthzFrom, AuthzMode, AuthzRule,
    AuthzTo, Backoff, CircuitBreaker, Discovery, FailureRate, Fault, FaultAbort, FaultDelay,
    GrpcMatch, HashOn, HeaderModifier, Inbound, InboundMtls, LoadBalancing, MeshTls,
    OriginationTls, Otlp, OtlpProtocol, OutlierDetection, PathMatch, PathModifier, Policy,
    Protocol, QueryLogging, RateLimit, RateLimitMode, RedirectScheme, RequestMirror,
    RequestRedirect, Retries, RetryBudget, RetryOn, Route, RouteFilter, RouteMatch, RouteTimeouts,
    Sampling, Service, ServiceTls, Timeouts, Tracing, UrlRewrite, ValueMatch, WeightedService,
    WorkloadSelector, DEFAULT_OPAQUE_PORTS,
};
pub use size::{ByteSize, ByteSizeError};
pub use validate::GRPC_STATUS_NAMES;

use sha2::{Digest, Sha256};

/// A policy that parsed and validated, with the hash of the text it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedPolicy {
    /// The policy itself.
    pub policy: Policy,
    /// Hex SHA-256 of the source text: identifies a policy across proxies and reloads.
    pub content_hash: String,
}

/// Parses and validates policy `text`; `file` names it in error messages. The parse is
/// budgeted (see [`limits`]): size, nesting depth, node count and alias expansion. Structural
/// errors (unknown fields, wrong types) and semantic ones (unknown services, values out of
/// range) are reported together, the semantic checks running on what could be read around the
/// structural errors when those are confined to a section.
pub fn load(file: &str, text: &str) -> Result<LoadedPolicy, PolicyError> {
    let policy = parse_and_validate(text).map_err(|diagnostics| PolicyError {
        file: file.to_string(),
        diagnostics,
    })?;
    Ok(LoadedPolicy {
        policy,
        content_hash: content_hash(text),
    })
}

/// A policy checked for an operator (`outriderctl validate`): [`load`]'s answer and, for a
/// valid policy, the warnings about likely mistakes.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    /// What [`load`] answers.
    pub result: Result<LoadedPolicy, PolicyError>,
    /// Valid but very likely not what was meant (`endpoints: []`, a route that never matches,
    /// a service nothing reaches, ...); empty when `result` is an error.
    pub warnings: Vec<Diagnostic>,
}

/// [`load`], plus the warnings about likely mistakes in a valid policy. The proxy and the
/// control plane accept a policy with warnings.
pub fn check(file: &str, text: &str) -> Checked {
    let result = load(file, text);
    let warnings = match &result {
        Ok(loaded) => positioned(text, lint::warnings(&loaded.policy)),
        Err(_) => Vec::new(),
    };
    Checked { result, warnings }
}

/// Most YAML documents (`---`) of one file [`load_document`] reads.
pub const MAX_DOCUMENTS_PER_FILE: usize = 64;

/// Reads a document as the control plane takes it: a policy, a Gateway API HTTPRoute or
/// GRPCRoute ([`gateway`]), or a file of several YAML documents (`---`) of which at most one
/// is a policy. Gateway API documents land in [`Policy::gateway`], for [`gateway::compose`];
/// a policy's route entries may attach policy to their routes by name. Positions are the
/// file's own, whichever document they fall in.
pub fn load_document(file: &str, text: &str) -> Result<LoadedPolicy, PolicyError> {
    let error = |diagnostics| PolicyError {
        file: file.to_string(),
        diagnostics,
    };
    let chunks = split_documents(text);
    if chunks.len() > MAX_DOCUMENTS_PER_FILE {
        return Err(error(vec![Diagnostic {
            path: String::new(),
            message: format!(
                "budget exceeded: more than {MAX_DOCUMENTS_PER_FILE} documents in one file"
            ),
            position: None,
        }]));
    }
    // One document: read as a whole, so a policy's errors are exactly as before.
    let chunks = if chunks.len() <= 1 {
        vec![(0, text)]
    } else {
        chunks
    };
    let mut policy: Option<(Policy, usize)> = None;
    let mut gateway = Vec::new();
    let mut diagnostics = Vec::new();
    for (offset, chunk) in chunks {
        let shift = |mut found: Vec<Diagnostic>| {
            for d in &mut found {
                if let Some(p) = &mut d.position {
                    p.line = p.line.saturating_add(offset);
                }
            }
            found
        };
        if gateway::is_kubernetes_document(chunk) {
            match gateway::parse(file, chunk) {
                Ok(mut routes) => {
                    for r in &mut routes.references {
                        if let Some(p) = &mut r.position {
                            p.line = p.line.saturating_add(offset);
                        }
                    }
                    gateway.push(routes);
                }
                Err(found) => diagnostics.extend(shift(found)),
            }
            continue;
        }
        if let Some((_, first)) = &policy {
            diagnostics.push(Diagnostic {
                path: String::new(),
                message: format!(
                    "a second policy document in one file (the first starts on line {}): put \
                     its fields in the first, or in a file of its own",
                    first + 1
                ),
                position: Some(Position {
                    line: offset + 1,
                    column: 1,
                }),
            });
            continue;
        }
        match parse_and_validate_as(chunk, true) {
            Ok(p) => policy = Some((p, offset)),
            Err(found) => {
                diagnostics.extend(shift(found));
                policy = Some((Policy::default(), offset));
            }
        }
    }
    if !diagnostics.is_empty() {
        return Err(error(diagnostics));
    }
    let mut policy = policy.map(|(p, _)| p).unwrap_or_default();
    policy.gateway = gateway;
    Ok(LoadedPolicy {
        policy,
        content_hash: content_hash(text),
    })
}

/// The YAML documents of `text` that hold something: each with the number of lines before
/// it. A line that starts with `---` (alone or before a space) starts a document, wherever it
/// is (YAML forbids such a line inside a scalar); a chunk of blank lines and comments is no
/// document.
fn split_documents(text: &str) -> Vec<(usize, &str)> {
    let mut starts = vec![(0usize, 0usize)];
    let mut offset = 0;
    for (line, content) in text.split_inclusive('\n').enumerate() {
        let bare = content.trim_end_matches(['\n', '\r']);
        if line > 0 && (bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t")) {
            starts.push((line, offset));
        }
        offset += content.len();
    }
    let mut chunks = Vec::new();
    for (i, &(line, start)) in starts.iter().enumerate() {
        let end = starts.get(i + 1).map_or(text.len(), |&(_, end)| end);
        let chunk = &text[start..end];
        let empty = chunk.lines().all(|l| {
            let l = l.trim();
            l.is_empty() || l.starts_with('#') || l == "---" || l == "..."
        });
        if !empty {
            chunks.push((line, chunk));
        }
    }
    chunks
}

/// [`check`] for a document as the control plane takes it ([`load_document`]); warnings for a
/// file that is one policy document only.
pub fn check_document(file: &str, text: &str) -> Checked {
    let result = load_document(file, text).and_then(|loaded| {
        // A file holding routes and the services they need: composed as the control plane
        // would (attachments aside, whose routes may be in other files).
        let mut policy = loaded.policy.clone();
        policy.routes.retain(|r| !gateway::is_attachment(r));
        let routes = std::mem::take(&mut policy.gateway);
        match gateway::compose(&mut policy, &routes.iter().collect::<Vec<_>>()) {
            Ok(()) => Ok(loaded),
            Err(error) => Err(PolicyError {
                file: file.to_string(),
                diagnostics: vec![Diagnostic {
                    path: String::new(),
                    message: error.0,
                    position: None,
                }],
            }),
        }
    });
    let warnings = match &result {
        Ok(loaded) if split_documents(text).len() <= 1 && loaded.policy.gateway.is_empty() => {
            positioned(text, lint::warnings(&loaded.policy))
        }
        _ => Vec::new(),
    };
    Checked { result, warnings }
}

fn parse_and_validate(text: &str) -> Result<Policy, Vec<Diagnostic>> {
    parse_and_validate_as(text, false)
}

fn parse_and_validate_as(text: &str, attachments: bool) -> Result<Policy, Vec<Diagnostic>> {
    match parse::parse(text) {
        Ok(policy) => {
            let findings = validate::validate_as(&policy, attachments);
            if findings.is_empty() {
                Ok(policy)
            } else {
                Err(positioned(text, findings))
            }
        }
        Err(broken) => {
            let mut diagnostics = broken.diagnostics;
            if let Some(partial) = broken.partial {
                let findings = validate::validate_as(&partial.policy, attachments)
                    .into_iter()
                    .filter_map(|(path, message)| Some((partial.document_path(&path)?, message)))
                    .collect();
                diagnostics.extend(positioned(text, findings));
                diagnostics.sort_by_key(|d| d.position.map(|p| (p.line, p.column)));
            }
            Err(diagnostics)
        }
    }
}

/// Findings with their positions in `text`, in file order.
fn positioned(text: &str, findings: Vec<validate::Finding>) -> Vec<Diagnostic> {
    if findings.is_empty() {
        return Vec::new();
    }
    let index = position::PositionIndex::build(text);
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

/// Writes `policy` as YAML that [`load`] reads back to the same policy.
pub fn to_yaml(policy: &Policy) -> Result<String, EncodeError> {
    serde_saphyr::to_string(policy).map_err(|e| EncodeError(e.to_string()))
}

/// A policy could not be written as YAML.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot encode the policy as YAML: {0}")]
pub struct EncodeError(String);

/// Hex SHA-256 of `text`.
pub fn content_hash(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    let mut hex = String::with_capacity(64);
    for byte in digest {
        use std::fmt::Write;
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_text(text: &str) -> String {
        match load("policy.yaml", text) {
            Ok(p) => panic!("expected an error, got {p:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn loads_the_example_shape() {
        let text = r#"
services:
  payments:
    endpoints: [127.0.0.1:9101, 127.0.0.1:9102]
    listen: 127.0.0.1:9001
    protocol: http1
    load_balancing: round_robin
    timeouts: { connect: 1s }
  reviews-v1: { endpoints: [127.0.0.1:9201] }
  reviews-v2: { dns: "reviews.default.svc.cluster.local:8080", protocol: http2 }
routes:
  - match: { authority: payments, path_prefix: /v1/ }
    service: payments
  - match: { authority: reviews }
    split: [ { service: reviews-v1, weight: 90 }, { service: reviews-v2, weight: 10 } ]
inbound:
  app: 127.0.0.1:8080
"#;
        let loaded = load("policy.yaml", text).expect("valid");
        assert_eq!(loaded.policy.services.len(), 3);
        assert_eq!(loaded.policy.routes.len(), 2);
        assert_eq!(loaded.content_hash.len(), 64);
        assert_eq!(
            loaded.policy.services["reviews-v2"].protocol,
            Protocol::Http2
        );
    }

    #[test]
    fn semantic_error_names_path_line_and_column() {
        let text = "services:
  reviews-v1: { endpoints: [127.0.0.1:9201] }
  payments: { endpoints: [127.0.0.1:9101] }
routes:
  - match: { authority: payments }
    service: payments
  - match: { authority: reviews }
    split:
      - service: reviews-v1
        weight: 0
";
        assert_eq!(
            error_text(text),
            "routes[1].split[0].weight: must be > 0 at policy.yaml:10:17"
        );
    }

    #[test]
    fn capture_fields_load_with_their_defaults_and_bad_values_are_named() {
        let loaded = load(
            "p.yaml",
            "services:\n  a: { endpoints: [127.0.0.1:1], addresses: [192.0.2.7:8080] }\n",
        )
        .expect("valid");
        assert_eq!(loaded.policy.opaque_ports(), DEFAULT_OPAQUE_PORTS);
        assert_eq!(
            loaded.policy.services["a"].addresses,
            ["192.0.2.7:8080"
                .parse::<std::net::SocketAddr>()
                .expect("addr")]
        );
        let loaded = load("p.yaml", "opaque_ports: [5433]\n").expect("valid");
        assert_eq!(loaded.policy.opaque_ports(), [5433]);
        let text = "opaque_ports: [0]\nservices:\n  a: { endpoints: [127.0.0.1:1], addresses: [192.0.2.7:8080, 0.0.0.0:80] }\n  b: { endpoints: [127.0.0.1:2], addresses: [192.0.2.7:8080] }\n";
        let all = load("p.yaml", text).expect_err("invalid").to_string();
        assert!(all.contains("opaque_ports[0]: port must not be 0"), "{all}");
        assert!(
            all.contains("services.a.addresses[1]: needs a specific address"),
            "{all}"
        );
        assert!(
            all.contains(
                "services.b.addresses[0]: 192.0.2.7:8080 is already an address of service `a`"
            ),
            "{all}"
        );
    }

    #[test]
    fn mesh_tls_settings_load_and_bad_identities_are_named() {
        let text = "mesh_tls: strict
services:
  payments:
    endpoints: [127.0.0.1:9101]
    tls: mesh
    identity: spiffe://cluster.local/ns/shop/sa/payments
inbound:
  app: 127.0.0.1:8080
  mtls: strict
  authorization: { allow: [spiffe://cluster.local/ns/shop/sa/checkout] }
";
        let loaded = load("p.yaml", text).expect("valid");
        assert_eq!(loaded.policy.mesh_tls, MeshTls::Strict);
        assert_eq!(
            loaded.policy.services["payments"].tls,
            Some(ServiceTls::Mesh)
        );
        let inbound = loaded.policy.inbound.expect("inbound");
        assert_eq!(inbound.mtls, InboundMtls::Strict);
        assert_eq!(inbound.authorization.expect("authz").allow.len(), 1);

        let msg = error_text(
            "services:\n  p:\n    endpoints: [127.0.0.1:1]\n    identity: spiffe://x/ns/a/sa/b\n",
        );
        assert!(
            msg.contains("services.p.identity: only checked over mesh TLS"),
            "{msg}"
        );
        let msg =
            error_text("inbound:\n  app: 127.0.0.1:1\n  authorization: { allow: [checkout] }\n");
        assert!(
            msg.starts_with("inbound.authorization.allow[0]: must be a SPIFFE id"),
            "{msg}"
        );
    }

    #[test]
    fn hash_balancing_and_mirror_filters_load_round_trip_and_their_mistakes_are_named() {
        let text = "services:
  a:
    endpoints: [127.0.0.1:1]
    load_balancing: { hash: { header: x-user-id } }
  b:
    endpoints: [127.0.0.1:2]
    load_balancing:
      hash: { cookie: session }
  shadow: { endpoints: [127.0.0.1:3], load_balancing: least_request }
routes:
  - match: { path_prefix: / }
    service: a
    filters:
      - request_mirror: { service: shadow, percent: 10 }
";
        let loaded = load("p.yaml", text).expect("valid");
        let services = &loaded.policy.services;
        assert_eq!(
            services["a"].load_balancing,
            LoadBalancing::Hash(HashOn::Header("x-user-id".into()))
        );
        assert_eq!(
            services["b"].load_balancing,
            LoadBalancing::Hash(HashOn::Cookie("session".into()))
        );
        assert_eq!(
            services["shadow"].load_balancing,
            LoadBalancing::LeastRequest
        );
        let RouteFilter::RequestMirror(mirror) = &loaded.policy.routes[0].filters[0] else {
            panic!("not a mirror: {:?}", loaded.policy.routes[0].filters[0]);
        };
        assert_eq!(mirror.service, "shadow");
        assert_eq!(mirror.percent, 10.0);
        assert_eq!(mirror.body_limit, ByteSize(64 * 1024));
        assert_eq!(mirror.max_in_flight, 64);
        let yaml = to_yaml(&loaded.policy).expect("serialise");
        assert_eq!(
            load("again.yaml", &yaml).expect("valid").policy,
            loaded.policy
        );

        let msg = error_text(
            "services:\n  a:\n    endpoints: [127.0.0.1:1]\n    load_balancing: { hash: { header: \"x user\" } }\n",
        );
        assert!(
            msg.starts_with(
                "services.a.load_balancing.hash.header: must be a header or cookie name"
            ),
            "{msg}"
        );
        let msg = error_text(
            "services:\n  a:\n    endpoints: [127.0.0.1:1]\n    load_balancing: { hash: { query: u } }\n",
        );
        assert!(msg.contains("unknown variant `query`"), "{msg}");
        let msg = error_text(
            "services:\n  a: { endpoints: [127.0.0.1:1] }\nroutes:\n  - match: { path_prefix: / }\n    service: a\n    filters:\n      - request_mirror: { service: shadw, percent: 101, max_in_flight: 0 }\n",
        );
        for expected in [
            "routes[0].filters[0].request_mirror.service: unknown service `shadw`",
            "routes[0].filters[0].request_mirror.percent: must be between 0 and 100",
            "routes[0].filters[0].request_mirror.max_in_flight: must be between 1 and 10000",
        ] {
            assert!(msg.contains(expected), "{expected} in {msg}");
        }
    }

    #[test]
    fn tls_origination_loads_and_its_mistakes_are_positioned() {
        let text = "services:
  api:
    endpoints: [127.0.0.1:443]
    tls: { sni: api.example.com, ca: /etc/outrider/api-ca.pem }
  open:
    endpoints: [127.0.0.1:444]
    tls:
      sni: open.example.com
";
        let loaded = load("p.yaml", text).expect("valid");
        assert_eq!(
            loaded.policy.services["api"].tls,
            Some(ServiceTls::Origination(OriginationTls {
                sni: "api.example.com".into(),
                ca: Some("/etc/outrider/api-ca.pem".into()),
            }))
        );
        let open = loaded.policy.services["open"].tls.clone().expect("tls");
        assert_eq!(open.origination().and_then(|t| t.ca.as_deref()), None);
        // It round-trips: the control plane serialises policies it serves.
        let yaml = to_yaml(&loaded.policy).expect("serialise");
        assert_eq!(
            load("again.yaml", &yaml).expect("valid").policy,
            loaded.policy
        );

        assert_eq!(
            error_text("services:\n  a:\n    endpoints: [127.0.0.1:1]\n    tls: { sni: \"bad name\" }\n"),
            "services.a.tls.sni: must be a DNS name such as api.example.com (or an IP address) at policy.yaml:4:17"
        );
        let msg = error_text(
            "services:\n  a:\n    endpoints: [127.0.0.1:1]\n    tls: { sni: a.example, identity: x }\n",
        );
        assert!(msg.contains("unknown field `identity`"), "{msg}");
        let msg = error_text("services:\n  a:\n    endpoints: [127.0.0.1:1]\n    tls: https\n");
        assert!(
            msg.contains("expected `mesh` or a map `{ sni: <name>, ca: <file> }`"),
            "{msg}"
        );
        let msg = error_text(
            "services:\n  a:\n    endpoints: [127.0.0.1:1]\n    tls: { sni: a.example }\n    identity: spiffe://x/ns/a/sa/b\n",
        );
        assert!(
            msg.contains("services.a.identity: only checked over mesh TLS; an external service"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_field_is_an_error_with_position() {
        let text = "services:\n  payments:\n    endpoint: [127.0.0.1:1]\n";
        let msg = error_text(text);
        assert!(msg.contains("unknown field `endpoint`"), "{msg}");
        assert!(msg.ends_with("at policy.yaml:3:5"), "{msg}");
    }

    #[test]
    fn workload_is_a_name_or_star() {
        let ok = load("p.yaml", "workload: checkout\n").expect("valid");
        let selector = ok.policy.workload.expect("workload");
        assert_eq!(selector.names(), ["checkout"]);
        assert!(!selector.is_all());
        let list = load("p.yaml", "workload: [checkout, cart]\n").expect("valid");
        assert_eq!(
            list.policy.workload.expect("workload").names(),
            ["checkout", "cart"]
        );
        load("p.yaml", "workload: \"*\"\n").expect("star is valid");
        let msg = error_text("services: {}\nworkload: \"check out\"\n");
        assert!(msg.starts_with("workload: "), "{msg}");
        assert!(msg.ends_with("at policy.yaml:2:11"), "{msg}");
        let msg = error_text("workload: [a, \"*\", a]\n");
        assert!(
            msg.starts_with("workload[1]: \"*\" must stand alone"),
            "{msg}"
        );
        assert!(msg.contains("workload[2]: duplicate workload `a`"), "{msg}");
    }

    #[test]
    fn syntax_error_has_position() {
        let msg = error_text("services:\n  a: [unclosed\n");
        assert!(msg.contains("at policy.yaml:"), "{msg}");
    }

    #[test]
    fn reports_every_problem() {
        let text = "services:
  a: {}
  b: { endpoints: [127.0.0.1:1], dns: 'x:1' }
routes:
  - match: { path_prefix: v1 }
    service: nope
";
        let e = load("p.yaml", text).expect_err("invalid");
        let paths: Vec<&str> = e.diagnostics.iter().map(|d| d.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "services.a",
                "services.b.dns",
                "routes[0].match.path_prefix",
                "routes[0].service"
            ]
        );
    }

    #[test]
    fn bare_number_duration_is_rejected() {
        let msg = error_text("services:\n  a:\n    endpoints: []\n    timeouts: { connect: 5 }\n");
        assert!(msg.contains("needs a unit"), "{msg}");
    }

    #[test]
    fn loads_resilience_policies() {
        let text = r#"
services:
  payments:
    endpoints: [127.0.0.1:9101]
    timeouts: { connect: 500ms, request: 2s, per_try: 500ms, idle: 30s }
    retries:
      attempts: 2
      on: [connect-failure, reset, gateway-error, 5xx, retriable-status]
      status: [409, 429]
      grpc: [unavailable, resource-exhausted]
      backoff: { base: 25ms, max: 250ms }
      budget: { ratio: 0.2, min_per_second: 10 }
      body_limit: 64KiB
    rate_limit: { requests_per_second: 100, burst: 200, mode: shadow }
    circuit_breaker:
      consecutive_failures: 5
      failure_rate: { threshold: 0.5, min_requests: 20, window: 10s }
      open_for: 5s
      half_open_requests: 1
      max_open_for: 1m
      max_concurrent_requests: 1000
      max_pending_requests: 100
routes:
  - match: { authority: payments }
    service: payments
    retry_non_idempotent: true
    timeouts: { request: 1s }
    rate_limit: { requests_per_second: 10 }
"#;
        let p = load("policy.yaml", text).expect("valid").policy;
        let s = &p.services["payments"];
        let retries = s.retries.as_ref().expect("retries");
        assert_eq!(retries.body_limit, ByteSize(65536));
        assert_eq!(retries.max_retry_after, Duration::from_secs(30), "default");
        assert_eq!(retries.on.len(), 5);
        assert_eq!(
            s.rate_limit.as_ref().map(|r| r.mode),
            Some(RateLimitMode::Shadow)
        );
        assert!(p.routes[0].retry_non_idempotent);
    }

    #[test]
    fn rejects_bad_resilience_values() {
        let text = "services:
  a:
    endpoints: []
    retries: { attempts: 2, grpc: [unavaliable], backoff: { base: 100ms, max: 10ms }, max_retry_after: 2h }
    circuit_breaker: { open_for: 5s }
";
        let e = load("p.yaml", text).expect_err("invalid");
        let paths: Vec<&str> = e.diagnostics.iter().map(|d| d.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "services.a.retries.grpc[0]",
                "services.a.retries.backoff.max",
                "services.a.retries.max_retry_after",
                "services.a.circuit_breaker"
            ]
        );
    }

    #[test]
    fn request_body_idle_defaults_to_30s_and_is_set_per_service_route_and_inbound() {
        let p = load(
            "p.yaml",
            "services:\n  a: { endpoints: [127.0.0.1:1] }\n  b: { endpoints: [127.0.0.1:1], timeouts: { request_body_idle: 5s } }\nroutes:\n  - match: { authority: a }\n    service: a\n    timeouts: { request_body_idle: 2s }\ninbound: { app: 127.0.0.1:8080, timeouts: { request_body_idle: 1m } }\n",
        )
        .expect("valid")
        .policy;
        assert_eq!(
            p.services["a"].timeouts.request_body_idle,
            Duration::from_secs(30)
        );
        assert_eq!(
            p.services["b"].timeouts.request_body_idle,
            Duration::from_secs(5)
        );
        let route = p.routes[0].timeouts.as_ref().expect("route timeouts");
        assert_eq!(route.request_body_idle, Some(Duration::from_secs(2)));
        let inbound = p.inbound.expect("inbound");
        assert_eq!(inbound.timeouts.request_body_idle, Duration::from_secs(60));

        let text = "services:\n  a: { endpoints: [], timeouts: { request_body_idle: 0s } }\nroutes:\n  - match: { authority: a }\n    service: a\n    timeouts: { request_body_idle: 0ms }\ninbound: { app: 127.0.0.1:8080, timeouts: { request_body_idle: 0s } }\n";
        let e = load("p.yaml", text).expect_err("invalid");
        let paths: Vec<&str> = e.diagnostics.iter().map(|d| d.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "services.a.timeouts.request_body_idle",
                "routes[0].timeouts.request_body_idle",
                "inbound.timeouts.request_body_idle",
            ]
        );
    }

    #[test]
    fn outlier_detection_defaults_and_bad_values_with_positions() {
        let ok = load(
            "p.yaml",
            "services:\n  a:\n    endpoints: [127.0.0.1:1]\n    outlier_detection: { consecutive_failures: 3 }\n",
        )
        .expect("valid");
        let outlier = ok.policy.services["a"]
            .outlier_detection
            .clone()
            .expect("outlier");
        assert_eq!(outlier.consecutive_failures, 3);
        assert_eq!(outlier.base_ejection, Duration::from_secs(30));
        assert_eq!(outlier.max_ejection, Duration::from_secs(300));
        assert_eq!(outlier.max_ejected_percent, 50);
        let text = "services:
  a:
    endpoints: [127.0.0.1:1]
    outlier_detection:
      consecutive_failures: 0
      base_ejection: 1m
      max_ejection: 30s
      max_ejected_percent: 101
";
        let e = load("p.yaml", text).expect_err("invalid");
        let found: Vec<String> = e
            .diagnostics
            .iter()
            .map(|d| format!("{} {:?}", d.path, d.position.map(|p| (p.line, p.column))))
            .collect();
        assert_eq!(
            found,
            [
                "services.a.outlier_detection.consecutive_failures Some((5, 29))",
                "services.a.outlier_detection.max_ejection Some((7, 21))",
                "services.a.outlier_detection.max_ejected_percent Some((8, 28))",
            ]
        );
    }

    #[test]
    fn fault_values_are_checked_with_positions() {
        let route = |fault: &str| {
            format!("services:\n  a: {{ endpoints: [127.0.0.1:1] }}\nroutes:\n  - match: {{ authority: a }}\n    service: a\n    fault: {fault}\n")
        };
        let ok = load(
            "p.yaml",
            &route(
                "{ delay: { duration: 2s, percent: 10 }, abort: { status: 503, percent: 0.5 } }",
            ),
        )
        .expect("valid");
        let fault = ok.policy.routes[0].fault.clone().expect("fault");
        assert_eq!(fault.abort.map(|a| (a.status, a.percent)), Some((503, 0.5)));
        let e = load(
            "p.yaml",
            &route("{ delay: { duration: 2s, percent: 110 }, abort: { status: 200, percent: 1 } }"),
        )
        .expect_err("invalid");
        let found: Vec<String> = e
            .diagnostics
            .iter()
            .map(|d| format!("{} {:?}", d.path, d.position.map(|p| (p.line, p.column))))
            .collect();
        assert_eq!(
            found,
            [
                "routes[0].fault.delay.percent Some((6, 46))",
                "routes[0].fault.abort.status Some((6, 70))",
            ]
        );
        let e = load("p.yaml", &route("{}")).expect_err("empty fault");
        assert_eq!(e.diagnostics[0].path, "routes[0].fault");
    }

    #[test]
    fn duplicate_listen_names_both_services() {
        let text = "services:
  a: { endpoints: [127.0.0.1:1], listen: 127.0.0.1:9001 }
  b: { endpoints: [127.0.0.1:2], listen: 127.0.0.1:9001 }
";
        assert_eq!(
            error_text(text),
            "services.b.listen: 127.0.0.1:9001 is already the listen address of service `a` at policy.yaml:3:42"
        );
    }

    #[test]
    fn loads_tracing_and_access_log() {
        let text = "tracing: { sampling: parent_based, ratio: 0.1, otlp: { endpoint: 'http://otel-collector:4317', protocol: grpc } }
access_log: json
";
        let p = load("p.yaml", text).expect("valid").policy;
        let tracing = p.tracing.expect("tracing");
        assert_eq!(tracing.sampling, Sampling::ParentBased);
        assert_eq!(tracing.ratio, 0.1);
        let otlp = tracing.otlp.expect("otlp");
        assert_eq!(otlp.endpoint, "http://otel-collector:4317");
        assert_eq!(otlp.protocol, OtlpProtocol::Grpc);
        assert_eq!(p.access_log.format, AccessLogFormat::Json);
        assert_eq!(p.access_log.query, QueryLogging::Redact);
        let p = load(
            "p.yaml",
            "tracing: { otlp: { endpoint: 'http://c:4318', protocol: http } }",
        )
        .expect("valid")
        .policy;
        let tracing = p.tracing.expect("tracing");
        assert_eq!(tracing.ratio, 1.0);
        assert_eq!(tracing.otlp.expect("otlp").protocol, OtlpProtocol::Http);
        assert_eq!(p.access_log, AccessLog::default());
        assert!(!p.access_log.is_on());
    }

    #[test]
    fn access_log_takes_a_format_or_a_mapping() {
        let read = |text: &str| load("p.yaml", text).expect("valid").policy.access_log;
        let on = |format, query| AccessLog { format, query };
        assert_eq!(
            read("access_log: off"),
            on(AccessLogFormat::Off, QueryLogging::Redact)
        );
        assert_eq!(
            read("access_log: text"),
            on(AccessLogFormat::Text, QueryLogging::Redact)
        );
        assert_eq!(
            read("access_log: { format: text, query: keep }"),
            on(AccessLogFormat::Text, QueryLogging::Keep)
        );
        assert_eq!(
            read("access_log:\n  query: drop\n"),
            on(AccessLogFormat::Json, QueryLogging::Drop)
        );
        // The short form is written back while it says everything (older proxies read it).
        for text in [
            "access_log: json\n",
            "access_log:\n  format: text\n  query: keep\n",
        ] {
            let policy = load("p.yaml", text).expect("valid").policy;
            let json = serde_json::to_string(&policy.access_log).expect("serialises");
            let back: AccessLog = serde_json::from_str(&json).expect("reads back");
            assert_eq!(back, policy.access_log, "{json}");
        }
        assert_eq!(
            serde_json::to_string(&on(AccessLogFormat::Json, QueryLogging::Redact))
                .expect("serialises"),
            "\"json\""
        );
    }

    #[test]
    fn access_log_errors_say_where() {
        let text = "services: {}\naccess_log: { format: json, query: hide }\n";
        let error = error_text(text);
        assert!(
            error.contains("unknown variant `hide`") && error.contains("policy.yaml:2:36"),
            "{error}"
        );
        let text = "access_log:\n  format: json\n  queries: keep\n";
        let error = error_text(text);
        assert!(
            error.contains("unknown field `queries`") && error.contains("policy.yaml:3:3"),
            "{error}"
        );
        for (text, expected, at) in [
            (
                "services: {}\naccess_log: 5\n",
                "invalid type: integer `5`",
                ":2:1",
            ),
            ("access_log: yaml\n", "unknown variant `yaml`", ":1:13"),
            ("access_log: [json]\n", "invalid type: sequence", ":1:1"),
        ] {
            let error = error_text(text);
            assert!(error.contains(expected) && error.contains(at), "{error}");
        }
    }

    #[test]
    fn rejects_bad_tracing_values() {
        let text = "tracing: { sampling: always, ratio: 0.5 }";
        assert!(
            error_text(text).contains("unknown variant `always`"),
            "{}",
            error_text(text)
        );
        let text = "tracing: { ratio: 1.5, otlp: { endpoint: 'otel:4317' } }\naccess_log: yaml\n";
        let e = load("p.yaml", text).expect_err("invalid");
        assert!(e.to_string().contains("access_log"), "{e}");
        let text = "tracing: { ratio: 1.5, otlp: { endpoint: 'otel:4317' } }";
        let e = load("p.yaml", text).expect_err("invalid");
        let paths: Vec<&str> = e.diagnostics.iter().map(|d| d.path.as_str()).collect();
        assert_eq!(paths, ["tracing.ratio", "tracing.otlp.endpoint"]);
    }

    /// A billion-laughs document (10^9 leaves from 1 KB) whose bomb sits in a real field:
    /// `workload` takes a name or a list, so the deserialiser must look inside the value.
    pub(crate) fn alias_bomb() -> String {
        let mut bomb = String::from("services: {}\nworkload: [&a0 [x, x, x, x, x, x, x, x, x, x]");
        for i in 1..=9 {
            let prev = i - 1;
            let uses = vec![format!("*a{prev}"); 10].join(", ");
            bomb.push_str(&format!(", &a{i} [{uses}]"));
        }
        bomb.push_str("]\n");
        bomb
    }

    fn load_err(text: &str) -> PolicyError {
        load("p.yaml", text).expect_err("must be rejected")
    }

    /// Where in `p.yaml` (line, column) the error message says reading stopped.
    fn stopped_at(msg: &str) -> (usize, usize) {
        let at = msg.rsplit(" at p.yaml:").next().unwrap_or_default();
        let mut numbers = at
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse().ok());
        let line = numbers.next().expect("a line");
        let column = numbers.next().expect("a column");
        (line, column)
    }

    #[test]
    fn registry_discovery_stands_alone() {
        let loaded = load(
            "p.yaml",
            "services:\n  pay: { discovery: registry }\n  b: { discovery: registry, endpoints: [] }\n",
        )
        .expect("registry services need no endpoints");
        assert_eq!(
            loaded.policy.services["pay"].discovery,
            Some(crate::Discovery::Registry)
        );
        assert_eq!(
            error_text("services:\n  pay: { discovery: registry, endpoints: [127.0.0.1:1], dns: a.example:80 }\n"),
            "services.pay.endpoints: `discovery: registry` gives the endpoints: leave `endpoints` out at policy.yaml:2:31\n\
             services.pay.dns: `discovery: registry` gives the endpoints: leave `dns` out at policy.yaml:2:62"
        );
        assert!(error_text("services:\n  pay: { discovery: consul }\n").contains("unknown variant"));
        assert!(error_text("services:\n  pay: {}\n")
            .contains("needs `endpoints`, `dns` or `discovery: registry`"));
    }

    #[test]
    fn overflowing_durations_are_rejected_with_position() {
        let text = "services:
  a:
    endpoints: [127.0.0.1:1]
    timeouts: { request: 9223372036854775807s, per_try: 9223372036854775807s }
routes:
  - match: { authority: a }
    service: a
    timeouts:
      idle: 25h
";
        assert_eq!(
            error_text(text),
            "services.a.timeouts.request: must be at most 24h at policy.yaml:4:26\n\
             services.a.timeouts.per_try: must be at most 24h at policy.yaml:4:57\n\
             routes[0].timeouts.idle: must be at most 24h at policy.yaml:9:13"
        );
        // 24 h itself is the documented maximum and is accepted.
        load(
            "p.yaml",
            "services:\n  a: { endpoints: [127.0.0.1:1], timeouts: { request: 24h } }\n",
        )
        .expect("24h is allowed");
    }

    #[test]
    fn every_number_in_the_schema_has_an_upper_bound() {
        let text = "services:
  a:
    endpoints: [127.0.0.1:1]
    timeouts: { connect: 25h, request: 25h, per_try: 25h, idle: 25h }
    retries:
      attempts: 11
      backoff: { base: 2h, max: 2h }
      budget: { ratio: 1.5, min_per_second: 1000001 }
      body_limit: 65MiB
    rate_limit: { requests_per_second: 1000001, burst: 1000001 }
    circuit_breaker:
      consecutive_failures: 100001
      failure_rate: { threshold: 2, min_requests: 1000001, window: 25h }
      open_for: 25h
      half_open_requests: 100001
      max_open_for: 25h
      max_concurrent_requests: 1000001
      max_pending_requests: 1000001
    outlier_detection:
      consecutive_failures: 100001
      base_ejection: 25h
      max_ejection: 25h
      max_ejected_percent: 101
routes:
  - match: { authority: a }
    service: a
    fault: { delay: { duration: 25h, percent: 101 }, abort: { status: 600, percent: -1 } }
inbound:
  app: 127.0.0.1:8080
  timeouts: { connect: 25h, request: 25h }
  rate_limit: { requests_per_second: 1000001 }
tracing: { ratio: 1.01 }
";
        let e = load("p.yaml", text).expect_err("invalid");
        let paths: Vec<&str> = e.diagnostics.iter().map(|d| d.path.as_str()).collect();
        let expected = [
            "services.a.timeouts.connect",
            "services.a.timeouts.request",
            "services.a.timeouts.per_try",
            "services.a.timeouts.idle",
            "services.a.retries.attempts",
            "services.a.retries.backoff.base",
            "services.a.retries.backoff.max",
            "services.a.retries.budget.ratio",
            "services.a.retries.budget.min_per_second",
            "services.a.retries.body_limit",
            "services.a.rate_limit.requests_per_second",
            "services.a.rate_limit.burst",
            "services.a.circuit_breaker.consecutive_failures",
            "services.a.circuit_breaker.failure_rate.threshold",
            "services.a.circuit_breaker.failure_rate.min_requests",
            "services.a.circuit_breaker.failure_rate.window",
            "services.a.circuit_breaker.open_for",
            "services.a.circuit_breaker.half_open_requests",
            "services.a.circuit_breaker.max_open_for",
            "services.a.circuit_breaker.max_concurrent_requests",
            "services.a.circuit_breaker.max_pending_requests",
            "services.a.outlier_detection.consecutive_failures",
            "services.a.outlier_detection.base_ejection",
            "services.a.outlier_detection.max_ejection",
            "services.a.outlier_detection.max_ejected_percent",
            "routes[0].fault.delay.duration",
            "routes[0].fault.delay.percent",
            "routes[0].fault.abort.status",
            "routes[0].fault.abort.percent",
            "inbound.timeouts.connect",
            "inbound.timeouts.request",
            "inbound.rate_limit.requests_per_second",
            "tracing.ratio",
        ];
        let mut sorted_paths = paths.clone();
        sorted_paths.sort_unstable();
        let mut sorted_expected = expected.to_vec();
        sorted_expected.sort_unstable();
        assert_eq!(sorted_paths, sorted_expected, "{e}");
        assert!(e.diagnostics.iter().all(|d| d.position.is_some()), "{e}");
    }

    #[test]
    fn an_alias_bomb_is_refused_quickly_naming_the_budget() {
        // The budget named is the bound on the work: the expansion stopped at its budget, far
        // short of 10^9 nodes (no wall-clock bound: that flakes on a loaded machine).
        let msg = load_err(&alias_bomb()).to_string();
        assert!(msg.contains("budget exceeded: alias expansion"), "{msg}");
        assert!(msg.contains(" at p.yaml:"), "{msg}");
        // Anchors and aliases within the budget are fine: a shared retries block.
        let shared = "services:
  a: { endpoints: [127.0.0.1:1], retries: &r { attempts: 2 } }
  b: { endpoints: [127.0.0.1:2], retries: *r }
";
        let p = load("p.yaml", shared).expect("valid").policy;
        assert_eq!(p.services["b"].retries, p.services["a"].retries);
    }

    #[test]
    fn deep_nesting_is_refused_quickly_naming_the_budget() {
        // 100,000 levels, refused where level 65 opens: the position the error names is how
        // far the parser read, so the work is bounded by the budget rather than the document
        // (a wall-clock bound would flake on a loaded machine).
        let levels = 100_000;
        let depth = limits::MAX_DEPTH;
        let budget =
            format!("budget exceeded: nesting depth is more than {depth} levels at p.yaml:");
        let flow = format!("workload: {}x{}\n", "[".repeat(levels), "]".repeat(levels));
        let msg = load_err(&flow).to_string();
        assert!(msg.contains(&budget), "{msg}");
        let (line, column) = stopped_at(&msg);
        assert!(
            line == 1 && column <= "workload: ".len() + depth + 2,
            "{msg}"
        );
        let block = format!("workload:\n{}x\n", "- ".repeat(levels));
        let msg = load_err(&block).to_string();
        assert!(msg.contains(&budget), "{msg}");
        let (line, column) = stopped_at(&msg);
        assert!(line == 2 && column <= 2 * (depth + 2), "{msg}");
        // Where the schema wants a mapping, the first bracket is already wrong; the pass that
        // reads on past it meets the budget.
        let text = format!("services: {}{}", "[".repeat(levels), "]".repeat(levels));
        assert_eq!(
            load_err(&text).to_string(),
            "services: expected mapping start at p.yaml:1:11\nbudget exceeded: nesting depth is \
             more than 64 levels at p.yaml:1:75"
        );
    }

    #[test]
    fn size_and_node_budgets_are_named() {
        let big = format!(
            "# {}\nservices: {{}}\n",
            "x".repeat(limits::MAX_DOCUMENT_BYTES)
        );
        let msg = load("p.yaml", &big).expect_err("too big").to_string();
        assert!(
            msg.starts_with(
                "budget exceeded: document size is 1048592 bytes, more than 1MiB at p.yaml:1:"
            ),
            "{msg}"
        );
        let many = format!("workload: [{}]\n", "a,".repeat(limits::MAX_NODES));
        let msg = load("p.yaml", &many)
            .expect_err("too many nodes")
            .to_string();
        assert!(
            msg.contains("budget exceeded: node count is more than 100000 at p.yaml:1:"),
            "{msg}"
        );
    }

    #[test]
    fn duplicate_keys_name_both_positions() {
        let text = "services:
  payments: { endpoints: [127.0.0.1:1] }
  payments: { endpoints: [127.0.0.1:9] }
";
        assert_eq!(
            error_text(text),
            "services.payments: duplicate key (first at line 2, column 3; a key may appear once) at policy.yaml:3:3"
        );
        let text = "services: {}\nroutes: []\nservices: { a: { endpoints: [127.0.0.1:1] } }\n";
        assert_eq!(
            error_text(text),
            "services: duplicate key (first at line 1, column 1; a key may appear once) at policy.yaml:3:1"
        );
        let text =
            "services:\n  a: { endpoints: [127.0.0.1:1], protocol: http1, protocol: http2 }\n";
        assert_eq!(
            error_text(text),
            "services.a.protocol: duplicate key (first at line 2, column 34; a key may appear once) at policy.yaml:2:51"
        );
    }

    #[test]
    fn an_empty_document_is_not_a_policy() {
        for text in ["", "   \n\n", "# only a comment\n", "---\n", "~\n"] {
            assert_eq!(
                error_text(text),
                "empty document: a policy needs at least one field (to remove a policy, delete \
                 the file or use `outriderctl delete`) in policy.yaml",
                "{text:?}"
            );
        }
        // An explicit empty mapping is a policy (it routes nothing), written on purpose.
        load("p.yaml", "services: {}\n").expect("valid");
        load("p.yaml", "{}\n").expect("valid");
    }

    #[test]
    fn control_and_invisible_characters_are_refused_in_names_and_matches() {
        let route = |m: &str| {
            format!("services:\n  a: {{ endpoints: [127.0.0.1:1] }}\nroutes:\n  - match: {m}\n    service: a\n")
        };
        for (matcher, path, found) in [
            (
                r#"{ authority: "pay\u200bments" }"#,
                "routes[0].match.authority",
                "U+200B",
            ),
            (
                r#"{ authority: "payments\u0000" }"#,
                "routes[0].match.authority",
                "U+0000",
            ),
            (
                r#"{ authority: "\ufeffpayments" }"#,
                "routes[0].match.authority",
                "U+FEFF",
            ),
            (
                r#"{ path_prefix: "/v1\u2060/" }"#,
                "routes[0].match.path_prefix",
                "U+2060",
            ),
            (
                r#"{ path_prefix: "/v1/\u200f" }"#,
                "routes[0].match.path_prefix",
                "U+200F",
            ),
            (
                r#"{ path_prefix: "/v1\u001b[2J" }"#,
                "routes[0].match.path_prefix",
                "U+001B",
            ),
        ] {
            let e = load("p.yaml", &route(matcher)).expect_err(matcher);
            assert_eq!(e.diagnostics.len(), 1, "{e}");
            assert_eq!(e.diagnostics[0].path, path);
            assert_eq!(
                e.diagnostics[0].message,
                format!("must not contain control or invisible characters (found {found})")
            );
            assert_eq!(e.diagnostics[0].position.map(|p| p.line), Some(4), "{e}");
        }
        let e = load(
            "p.yaml",
            "services:\n  \"pay\\u200bments\": { endpoints: [127.0.0.1:1] }\n",
        )
        .expect_err("invisible service name");
        assert_eq!(e.diagnostics[0].path, "services.pay\u{200b}ments");
        assert!(
            e.diagnostics[0]
                .message
                .starts_with("service names may hold only"),
            "{e}"
        );
        // Ordinary non-ASCII text in a path is fine.
        load("p.yaml", &route(r#"{ path_prefix: "/café/" }"#)).expect("valid");
    }

    #[test]
    fn gateway_matches_load_and_round_trip() {
        let text = r#"
services:
  v1: { endpoints: [127.0.0.1:1] }
  v2: { endpoints: [127.0.0.1:2] }
routes:
  - name: canary
    matches:
      - headers: [{ name: X-Canary, value: "true" }]
      - path: { regex: "/beta/[a-z]+" }
        method: POST
        query_params: [{ name: debug, present: true }, { name: user, exact: alice }]
      - grpc: { service: outrider.test.Echo, method: Unary }
    service: v2
  - match: { authority: shop, path: { prefix: /v1 }, headers: [{ name: x-old, present: false }] }
    service: v1
"#;
        let policy = load("p.yaml", text).expect("valid").policy;
        let canary = &policy.routes[0];
        assert_eq!(canary.r#match, None);
        assert_eq!(canary.matches.len(), 3);
        assert_eq!(
            canary.matches[0].headers,
            [ValueMatch {
                name: "X-Canary".into(),
                value: Some("true".into()),
                regex: None,
                present: None,
            }]
        );
        assert_eq!(
            canary.matches[1].path,
            Some(PathMatch::Regex("/beta/[a-z]+".into()))
        );
        // `exact` is another spelling of `value`.
        assert_eq!(
            canary.matches[1].query_params[1].value.as_deref(),
            Some("alice")
        );
        assert_eq!(
            canary.matches[2].grpc,
            Some(GrpcMatch {
                service: "outrider.test.Echo".into(),
                method: Some("Unary".into()),
            })
        );
        let legacy = policy.routes[1].r#match.as_ref().expect("match");
        assert_eq!(legacy.path, Some(PathMatch::Prefix("/v1".into())));
        assert_eq!(policy.routes[1].match_path(0), "match");
        assert_eq!(canary.match_path(2), "matches[2]");
        // The control plane serialises the policies it serves.
        let yaml = to_yaml(&policy).expect("serialise");
        assert_eq!(load("again.yaml", &yaml).expect("valid").policy, policy);
    }

    #[test]
    fn match_mistakes_are_named_with_path_and_position() {
        let route = |m: &str| {
            format!(
                "services:\n  a: {{ endpoints: [127.0.0.1:1] }}\nroutes:\n  - service: a\n    matches:\n      - {m}\n"
            )
        };
        // (match, message, the text the position must point at)
        let cases = [
            (
                "{ path: { regex: '/v[0-9+' } }",
                "routes[0].matches[0].path.regex: invalid regex: unclosed character class",
                "'/v",
            ),
            (
                r#"{ path: { regex: '\w{500}{500}' } }"#,
                "routes[0].matches[0].path.regex: regex too large: it compiles to more than 65536 bytes",
                "'\\w",
            ),
            (
                "{ headers: [{ name: x, regex: 'a(?=b)' }] }",
                "routes[0].matches[0].headers[0].regex: invalid regex: look-around, including look-ahead and look-behind, is not supported",
                "'a(",
            ),
            (
                "{ query_params: [{ name: q, regex: '(' }] }",
                "routes[0].matches[0].query_params[0].regex: invalid regex: unclosed group",
                "'('",
            ),
            (
                "{ path: { exact: v1 } }",
                "routes[0].matches[0].path.exact: must start with `/`",
                "v1",
            ),
            (
                "{ path: { prefix: '/v1?x=1' } }",
                "routes[0].matches[0].path.prefix: must not contain `?` or `#` (use `query_params`)",
                "'/v1",
            ),
            (
                "{ path: { prefix: /v1 }, path_prefix: /v1 }",
                "routes[0].matches[0].path: set one of `path_prefix`, `path` and `grpc`, not both `path_prefix` and `path`",
                "path:",
            ),
            (
                "{ grpc: { service: a.B }, path: { exact: /a.B/C } }",
                "routes[0].matches[0].grpc: set one of `path_prefix`, `path` and `grpc`, not both `path` and `grpc`",
                "grpc",
            ),
            (
                "{ method: 'G T' }",
                "routes[0].matches[0].method: must be an HTTP method such as GET or POST",
                "'G T'",
            ),
            (
                "{ headers: [{ name: x, value: a, present: true }] }",
                "routes[0].matches[0].headers[0]: needs exactly one of `value`, `regex` and `present`",
                "{ name",
            ),
            (
                "{ headers: [{ name: x }] }",
                "routes[0].matches[0].headers[0]: needs exactly one of `value`, `regex` and `present`",
                "{ name",
            ),
            (
                "{ headers: [{ name: 'x y', present: true }] }",
                "routes[0].matches[0].headers[0].name: must be a header name (letters, digits and !#$%&'*+-.^_`|~)",
                "'x y'",
            ),
            (
                "{ headers: [{ name: X-A, present: true }, { name: x-a, value: b }] }",
                "routes[0].matches[0].headers[1].name: `x-a` has a condition already in this match",
                "x-a",
            ),
            (
                "{ query_params: [{ name: 'a=b', present: true }] }",
                "routes[0].matches[0].query_params[0].name: must be a query parameter name without `&`, `=` or `#`",
                "'a=b'",
            ),
            (
                "{ grpc: { service: a/B } }",
                "routes[0].matches[0].grpc.service: must be a gRPC name without `/` or spaces (`package.Service`, `Method`)",
                "a/B",
            ),
            (
                "{ grpc: { method: Get } }",
                "routes[0].matches[0].grpc.method: missing field `service`",
                "method",
            ),
            (
                "{ headers: [{ name: x, valeu: a }] }",
                "routes[0].matches[0].headers[0].valeu: unknown field `valeu`; did you mean `value`?",
                "valeu",
            ),
        ];
        for (m, message, at) in cases {
            let text = route(m);
            let line = text.lines().nth(5).expect("line 6");
            let column = line.find(at).expect("marker") + 1;
            assert_eq!(
                error_text(&text),
                format!("{message} at policy.yaml:6:{column}"),
                "{m}"
            );
        }
        let none = "services:\n  a: { endpoints: [127.0.0.1:1] }\nroutes:\n  - service: a\n";
        assert_eq!(
            error_text(none),
            "routes[0]: needs `match` or `matches` at policy.yaml:4:5"
        );
        let empty = "services:\n  a: { endpoints: [127.0.0.1:1] }\nroutes:\n  - { service: a, matches: [] }\n";
        assert_eq!(
            error_text(empty),
            "routes[0]: needs `match` or `matches` at policy.yaml:4:5"
        );
    }

    #[test]
    fn route_filters_load_in_order_and_serialise_back() {
        let text = r#"services:
  a: { endpoints: [127.0.0.1:1] }
routes:
  - service: a
    matches: [{ path: { prefix: /v1 } }]
    filters:
      - request_header_modifier: { set: { X-Env: canary, x-count: 5 }, add: { x-tag: a }, remove: [x-debug] }
      - response_header_modifier: { remove: [server] }
      - url_rewrite: { hostname: internal.example, path: { replace_prefix_match: /v2 } }
  - service: a
    match: { authority: old.example }
    filters:
      - request_redirect: { scheme: https, port: 8443, path: { replace_full_path: /new } }
"#;
        let policy = load("policy.yaml", text).expect("valid").policy;
        let filters = &policy.routes[0].filters;
        let kinds: Vec<&str> = filters.iter().map(RouteFilter::kind).collect();
        assert_eq!(
            kinds,
            [
                "request_header_modifier",
                "response_header_modifier",
                "url_rewrite"
            ]
        );
        let RouteFilter::RequestHeaderModifier(request) = &filters[0] else {
            panic!("{filters:?}")
        };
        assert_eq!(
            request.set["x-count"], "5",
            "a number is a header value as written"
        );
        let RouteFilter::RequestRedirect(redirect) = &policy.routes[1].filters[0] else {
            panic!("{:?}", policy.routes[1].filters)
        };
        assert_eq!(redirect.status_code, 302, "the default");
        assert_eq!(redirect.scheme, Some(RedirectScheme::Https));
        let yaml = to_yaml(&policy).expect("serialise");
        assert_eq!(load("again.yaml", &yaml).expect("valid").policy, policy);
    }

    #[test]
    fn filter_mistakes_are_named_with_path_and_position() {
        let route = |matches: &str, filter: &str| {
            format!(
                "services:\n  a: {{ endpoints: [127.0.0.1:1] }}\nroutes:\n  - service: a\n    matches: [{matches}]\n    filters:\n      - {{ request_header_modifier: {{ set: {{ x-a: b }} }} }}\n      - {filter}\n"
            )
        };
        let prefix = "{ path: { prefix: /v1 } }";
        // (matches, filter, message, the text on line 8 the position must point at)
        let cases = [
            (
                prefix,
                "{ response_header_modifier: { set: { 'x y': b } } }",
                "routes[0].filters[1].response_header_modifier.set.x y: must be a header name (letters, digits and !#$%&'*+-.^_`|~)",
                "b }",
            ),
            (
                prefix,
                "{ response_header_modifier: { add: { x-b: \"a\\r\\nb\" } } }",
                "routes[0].filters[1].response_header_modifier.add.x-b: a header value holds visible ASCII and spaces only (no control characters, no line breaks)",
                "\"a",
            ),
            (
                prefix,
                "{ response_header_modifier: { remove: [x-b, Transfer-Encoding] } }",
                "routes[0].filters[1].response_header_modifier.remove[1]: `Transfer-Encoding` belongs to the connection or the message framing; the proxy sets it, a filter cannot",
                "Transfer",
            ),
            (
                prefix,
                "{ response_header_modifier: { set: { x-b: c }, remove: [X-B] } }",
                "routes[0].filters[1].response_header_modifier.remove[0]: header `X-B` is in `set` already",
                "X-B",
            ),
            (
                prefix,
                "{ response_header_modifier: {} }",
                "routes[0].filters[1].response_header_modifier: needs `set`, `add` or `remove`",
                "response",
            ),
            (
                prefix,
                "{ response_header_modifier: { set: { Host: b } } }",
                "routes[0].filters[1].response_header_modifier.set.Host: `Host` belongs to the connection or the message framing; the proxy sets it, a filter cannot",
                "b }",
            ),
            (
                prefix,
                "{ request_redirect: { status_code: 200 } }",
                "routes[0].filters[1].request_redirect.status_code: must be a redirect status: 301, 302, 303, 307 or 308",
                "200",
            ),
            (
                prefix,
                "{ request_redirect: { port: 0 } }",
                "routes[0].filters[1].request_redirect.port: port must not be 0",
                "0 }",
            ),
            (
                prefix,
                "{ request_redirect: { hostname: '*.example' } }",
                "routes[0].filters[1].request_redirect.hostname: must be a DNS name such as api.example.com (no port, no wildcard)",
                "'*",
            ),
            (
                "{ path: { exact: /v1 } }",
                "{ url_rewrite: { path: { replace_prefix_match: /v2 } } }",
                "routes[0].filters[1].url_rewrite.path.replace_prefix_match: needs every match of the route to be a `path: { prefix }` match (the prefix it replaces)",
                "/v2",
            ),
            (
                "{ path_prefix: /v1 }",
                "{ request_redirect: { path: { replace_prefix_match: /v2 } } }",
                "routes[0].filters[1].request_redirect.path.replace_prefix_match: needs every match of the route to be a `path: { prefix }` match (the prefix it replaces)",
                "/v2",
            ),
            (
                prefix,
                "{ url_rewrite: { path: { replace_full_path: 'v2' } } }",
                "routes[0].filters[1].url_rewrite.path.replace_full_path: must start with `/`",
                "'v2'",
            ),
            (
                prefix,
                "{ url_rewrite: { path: { replace_full_path: '/a?b' } } }",
                "routes[0].filters[1].url_rewrite.path.replace_full_path: `?` cannot be in a path (no `?`, `#`, spaces or control characters; percent-encode it)",
                "'/a",
            ),
            (
                prefix,
                "{ url_rewrite: {} }",
                "routes[0].filters[1].url_rewrite: needs `hostname` or `path`",
                "url_rewrite",
            ),
            (
                prefix,
                "{ request_header_modifier: { remove: [x-c] } }",
                "routes[0].filters[1].request_header_modifier: a route takes one `request_header_modifier`; filters[0] is one already",
                "request_header",
            ),
            (
                prefix,
                "{ request_redirect: { status_code: 301 }, url_rewrite: { hostname: a } }",
                "routes[0].filters[1].url_rewrite: expected end of mapping after enum variant value",
                "url_rewrite",
            ),
            (
                prefix,
                "{ url_rewrte: { hostname: a } }",
                "routes[0].filters[1].url_rewrte: unknown variant `url_rewrte`, expected one of request_header_modifier, response_header_modifier, url_rewrite, request_redirect, request_mirror; did you mean `url_rewrite`?",
                "url_rewrte",
            ),
        ];
        for (matches, filter, message, at) in cases {
            let text = route(matches, filter);
            let line = text.lines().nth(7).expect("line 8");
            let column = line.find(at).expect("marker") + 1;
            assert_eq!(
                error_text(&text),
                format!("{message} at policy.yaml:8:{column}"),
                "{filter}"
            );
        }
        let both = "services:\n  a: { endpoints: [127.0.0.1:1] }\nroutes:\n  - service: a\n    matches: [{ path: { prefix: /v1 } }]\n    filters:\n      - url_rewrite: { hostname: b.example }\n      - request_redirect: { status_code: 301 }\n";
        assert_eq!(
            error_text(both),
            "routes[0].filters[1].request_redirect: a route either rewrites or redirects: \
             `request_redirect` and filters[0]'s `url_rewrite` cannot go together at \
             policy.yaml:8:9"
        );
    }

    #[test]
    fn regexes_are_counted_across_the_policy() {
        let mut text = String::from("services:\n  a: { endpoints: [127.0.0.1:1] }\nroutes:\n");
        for i in 0..=limits::MAX_REGEXES {
            text.push_str(&format!(
                "  - {{ service: a, matches: [{{ path: {{ regex: '/r{i}' }} }}] }}\n"
            ));
        }
        let e = load("p.yaml", &text).expect_err("one regex too many");
        assert_eq!(e.diagnostics.len(), 1, "{e}");
        assert_eq!(
            e.to_string(),
            format!(
                "routes[{n}].matches[0].path.regex: at most {n} regexes in a policy at p.yaml:{line}:46",
                n = limits::MAX_REGEXES,
                line = limits::MAX_REGEXES + 4
            )
        );
    }

    #[test]
    fn authorization_rules_load_and_their_mistakes_are_positioned() {
        let text = "inbound:
  app: 127.0.0.1:8080
  authorization:
    default: allow
    mode: audit
    rules:
      - name: no-admin
        action: deny
        from: { namespaces: [web] }
        to: { paths: [{ prefix: /admin }, { regex: '/v[0-9]+/debug' }], methods: [POST] }
      - name: probes
        action: allow
        from: { unauthenticated: true }
        to: { paths: [{ exact: /healthz }], headers: [{ name: x-probe, present: true }] }
      - name: shop
        action: allow
        from: { identities: ['spiffe://*/ns/shop/sa/*'], service_accounts: [checkout] }
";
        let authz = load("p.yaml", text)
            .expect("valid")
            .policy
            .inbound
            .expect("inbound")
            .authorization
            .expect("authorization");
        assert_eq!(authz.default, AuthzAction::Allow);
        assert_eq!(authz.mode, AuthzMode::Audit);
        assert_eq!(authz.rules.len(), 3);
        assert_eq!(authz.rules[0].action, AuthzAction::Deny);
        assert_eq!(
            authz.rules[0].to.as_ref().expect("to").paths[0],
            PathMatch::Prefix("/admin".into())
        );
        // Defaults: deny, enforce; the first form still reads.
        let first = load(
            "p.yaml",
            "inbound:\n  app: 127.0.0.1:1\n  authorization: { allow: [spiffe://td/ns/a/sa/b] }\n",
        )
        .expect("valid")
        .policy
        .inbound
        .expect("inbound")
        .authorization
        .expect("authorization");
        assert_eq!(first.default, AuthzAction::Deny);
        assert_eq!(first.mode, AuthzMode::Enforce);
        assert_eq!(first.allow, ["spiffe://td/ns/a/sa/b"]);

        let text = "inbound:
  app: 127.0.0.1:8080
  authorization:
    rules:
      - name: a
        action: allow
        from: { identities: ['spiffe://cluster.local/ns/shop/sa/check*', '*'], namespaces: [Shop] }
      - name: a
        action: deny
        from: { authenticated: false }
        to: { paths: [{ prefix: admin }, { regex: '(' }], methods: ['GET POST'] }
      - name: b c
        action: allow
        from: { unauthenticated: true, service_accounts: [x] }
";
        let e = load("p.yaml", text).expect_err("invalid");
        let found: Vec<String> = e
            .diagnostics
            .iter()
            .map(|d| format!("{} {:?}", d.path, d.position.map(|p| (p.line, p.column))))
            .collect();
        let rules = "inbound.authorization.rules";
        assert_eq!(
            found,
            [
                format!("{rules}[0].from.identities[0] Some((7, 30))"),
                format!("{rules}[0].from.identities[1] Some((7, 74))"),
                format!("{rules}[0].from.namespaces[0] Some((7, 93))"),
                format!("{rules}[1].name Some((8, 15))"),
                format!("{rules}[1].from.authenticated Some((10, 32))"),
                format!("{rules}[1].to.paths[0].prefix Some((11, 33))"),
                format!("{rules}[1].to.paths[1].regex Some((11, 51))"),
                format!("{rules}[1].to.methods[0] Some((11, 69))"),
                format!("{rules}[2].name Some((12, 15))"),
                format!("{rules}[2].from.unauthenticated Some((14, 34))"),
            ]
        );
        let text = e.to_string();
        for expected in [
            "`*` stands for a whole part (`ns/*`), not for part of one as in `check*`",
            "write `authenticated: true` instead of `identities: [\"*\"]`",
            "duplicate rule name `a` (first at rules[0])",
            "only `true` is meaningful; write `unauthenticated: true`",
            "invalid regex",
            "would never match",
        ] {
            assert!(text.contains(expected), "{expected} not in {text}");
        }
    }

    #[test]
    fn spiffe_identities_in_policy_are_kubernetes_names() {
        let text = "mesh_tls: strict
services:
  a: { endpoints: [127.0.0.1:1], identity: \"spiffe://cluster.local/ns/../sa/x\" }
inbound:
  app: 127.0.0.1:8080
  authorization:
    allow:
      - spiffe://cluster.local/ns/shop/sa/checkout
      - spiffe://cluster.local/ns/shop/sa/%2e%2e
      - spiffe://cluster.local/ns//sa/x
";
        let e = load("p.yaml", text).expect_err("invalid");
        let found: Vec<String> = e
            .diagnostics
            .iter()
            .map(|d| format!("{} {:?}", d.path, d.position.map(|p| (p.line, p.column))))
            .collect();
        assert_eq!(
            found,
            [
                "services.a.identity Some((3, 44))",
                "inbound.authorization.allow[1] Some((9, 9))",
                "inbound.authorization.allow[2] Some((10, 9))",
            ]
        );
        assert!(
            e.diagnostics[0]
                .message
                .starts_with("namespace `..` must be a DNS-1123 label"),
            "{e}"
        );
    }
}
