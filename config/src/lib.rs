//! Outrider's policy: the YAML schema shared by the proxy and the control plane, its parsing
//! and its validation. Pure data: no I/O runtime, no HTTP.
//!
//! [`load`] turns policy text into a [`LoadedPolicy`] or a [`PolicyError`] whose every
//! diagnostic names the path, file, line and column of the problem.

mod duration;
mod error;
mod position;
mod schema;
mod size;
mod validate;
pub mod wire;

pub use duration::{Duration, DurationError};
pub use error::{Diagnostic, PolicyError};
pub use position::Position;
pub use schema::{
    AccessLog, Authorization, Backoff, CircuitBreaker, FailureRate, Fault, FaultAbort, FaultDelay,
    Inbound, InboundMtls, LoadBalancing, MeshTls, OriginationTls, Otlp, OtlpProtocol,
    OutlierDetection, Policy, Protocol, RateLimit, RateLimitMode, Retries, RetryBudget, RetryOn,
    Route, RouteMatch, RouteTimeouts, Sampling, Service, ServiceTls, Timeouts, Tracing,
    WeightedService, WorkloadSelector,
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

/// Parses and validates policy `text`; `file` names it in error messages.
pub fn load(file: &str, text: &str) -> Result<LoadedPolicy, PolicyError> {
    let policy: Policy = if text.trim().is_empty() {
        // An empty file is an empty policy, not a syntax error.
        Policy::default()
    } else {
        serde_yaml::from_str(text).map_err(|e| PolicyError {
            file: file.to_string(),
            diagnostics: vec![syntax_diagnostic(&e)],
        })?
    };
    let findings = validate::validate(&policy);
    if !findings.is_empty() {
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
        return Err(PolicyError {
            file: file.to_string(),
            diagnostics,
        });
    }
    Ok(LoadedPolicy {
        policy,
        content_hash: content_hash(text),
    })
}

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

/// serde_yaml appends " at line L column C" to its messages; the position is reported in our
/// own `file:line:column` form instead, so the suffix is cut.
fn syntax_diagnostic(e: &serde_yaml::Error) -> Diagnostic {
    let mut message = e.to_string();
    if let Some(cut) = message.rfind(" at line ") {
        message.truncate(cut);
    }
    Diagnostic {
        path: String::new(),
        message,
        position: e.location().map(|l| Position {
            line: l.line(),
            column: l.column(),
        }),
    }
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
        let yaml = serde_yaml::to_string(&loaded.policy).expect("serialise");
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
        assert_eq!(p.access_log, AccessLog::Json);
        let p = load(
            "p.yaml",
            "tracing: { otlp: { endpoint: 'http://c:4318', protocol: http } }",
        )
        .expect("valid")
        .policy;
        let tracing = p.tracing.expect("tracing");
        assert_eq!(tracing.ratio, 1.0);
        assert_eq!(tracing.otlp.expect("otlp").protocol, OtlpProtocol::Http);
        assert_eq!(p.access_log, AccessLog::Off);
    }

    #[test]
    fn rejects_bad_tracing_values() {
        let text = "tracing: { sampling: always, ratio: 0.5 }";
        assert!(
            error_text(text).contains("unknown variant `always`"),
            "{}",
            error_text(text)
        );
        let text = "tracing: { ratio: 1.5, otlp: { endpoint: 'otel:4317' } }\naccess_log: text\n";
        let e = load("p.yaml", text).expect_err("invalid");
        assert!(e.to_string().contains("access_log"), "{e}");
        let text = "tracing: { ratio: 1.5, otlp: { endpoint: 'otel:4317' } }";
        let e = load("p.yaml", text).expect_err("invalid");
        let paths: Vec<&str> = e.diagnostics.iter().map(|d| d.path.as_str()).collect();
        assert_eq!(paths, ["tracing.ratio", "tracing.otlp.endpoint"]);
    }
}
