//! The policy schema: what an operator writes in YAML. Every struct rejects unknown fields so a
//! typo (`endpoint:` for `endpoints:`) is an error, not a silently ignored setting.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{ByteSize, Duration};

/// A whole policy document: upstream services, outbound routes and the inbound side.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// The workloads this document applies to when served by the control plane: a workload
    /// name, a list of names, or `"*"` for defaults shared by every workload. A proxy reading
    /// a local file ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<WorkloadSelector>,
    /// Named upstream services, by name.
    #[serde(default)]
    #[schemars(extend("propertyNames" = { "pattern": crate::json_schema::NAME }))]
    pub services: BTreeMap<String, Service>,
    /// Routes for the shared outbound port. A request that several routes match takes the one
    /// whose matching condition ranks highest in Gateway API's precedence
    /// ([`crate::matching`]); document order breaks ties.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// The inbound listener's settings (the local app it fronts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound: Option<Inbound>,
    /// Trace sampling and span export. Trace context is propagated whether or not it is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<Tracing>,
    /// One line per request on stdout (JSON or text), or nothing; and what it keeps of query
    /// strings.
    #[serde(default)]
    pub access_log: AccessLog,
    /// `strict`: every service is reached over mesh mTLS, as if each had `tls: mesh`.
    #[serde(default, skip_serializing_if = "MeshTls::is_off")]
    pub mesh_tls: MeshTls,
    /// Ports whose captured connections are proxied as opaque TCP at once, without waiting to
    /// detect a protocol: server-speaks-first protocols (SMTP, MySQL, PostgreSQL...) send
    /// nothing until the server greets them. Unset: [`DEFAULT_OPAQUE_PORTS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = crate::limits::MAX_PORT_LIST), inner(range(min = 1)))]
    pub opaque_ports: Option<Vec<u16>>,
    /// Routes translated from Gateway API HTTPRoute and GRPCRoute documents of the same file
    /// ([`crate::gateway`]): the control plane joins them to each workload's policy when it
    /// composes it. Never written out: a proxy receives them as ordinary `routes`.
    #[serde(skip)]
    pub gateway: Vec<crate::gateway::GatewayRoutes>,
}

/// The ports proxied as opaque TCP when a policy names none: Linkerd's default list (SMTP 25 and
/// 587, MySQL 3306 and its X protocol 4444... as Linkerd has it, PostgreSQL 5432, Redis 6379,
/// Elasticsearch transport 9300, memcached 11211).
pub const DEFAULT_OPAQUE_PORTS: &[u16] = &[25, 587, 3306, 4444, 5432, 6379, 9300, 11211];

impl Policy {
    /// The opaque ports in force: the policy's, or [`DEFAULT_OPAQUE_PORTS`].
    pub fn opaque_ports(&self) -> &[u16] {
        self.opaque_ports.as_deref().unwrap_or(DEFAULT_OPAQUE_PORTS)
    }
}

/// The policy-wide mesh TLS setting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
#[schemars(transform = crate::json_schema::off_is_false)]
pub enum MeshTls {
    /// Only services marked `tls: mesh` use mTLS.
    #[default]
    Off,
    /// Every service is reached over mesh mTLS.
    Strict,
}

impl MeshTls {
    /// Whether this is the default (for serialisation).
    pub fn is_off(&self) -> bool {
        *self == MeshTls::Off
    }
}

/// How a service's connections are secured: `tls: mesh`, or `tls: { sni: ..., ca: ... }` for
/// an external HTTPS service. One field, so the two are mutually exclusive by construction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceTls {
    /// mTLS to the upstream's sidecar with this proxy's workload certificate.
    Mesh,
    /// TLS origination: the app speaks plain HTTP, the proxy speaks HTTPS to the endpoints.
    Origination(OriginationTls),
}

/// TLS to an external HTTPS service (no client certificate).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OriginationTls {
    /// The name sent as SNI and that the server certificate must be valid for.
    pub sni: String,
    /// A PEM bundle of the CAs to trust instead of the system roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
}

impl Serialize for ServiceTls {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            ServiceTls::Mesh => serializer.serialize_str("mesh"),
            ServiceTls::Origination(tls) => tls.serialize(serializer),
        }
    }
}

// By hand rather than `untagged`: an untagged enum answers every mistake with "did not match
// any variant"; this names what is accepted and keeps the map's own unknown-field errors.
impl<'de> Deserialize<'de> for ServiceTls {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = ServiceTls;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("`mesh` or a map `{ sni: <name>, ca: <file> }`")
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ServiceTls, E> {
                match v {
                    "mesh" => Ok(ServiceTls::Mesh),
                    other => Err(E::invalid_value(serde::de::Unexpected::Str(other), &self)),
                }
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<ServiceTls, A::Error> {
                OriginationTls::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(ServiceTls::Origination)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl ServiceTls {
    /// Whether this is mesh mTLS.
    pub fn is_mesh(&self) -> bool {
        *self == ServiceTls::Mesh
    }

    /// The origination settings, if that is what this is.
    pub fn origination(&self) -> Option<&OriginationTls> {
        match self {
            ServiceTls::Origination(tls) => Some(tls),
            ServiceTls::Mesh => None,
        }
    }
}

/// Whether the inbound listener also takes plaintext once mesh TLS is on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum InboundMtls {
    /// mTLS and plaintext (callers outside the mesh); the first byte tells them apart.
    #[default]
    Permissive,
    /// mTLS only; plaintext connections are closed.
    Strict,
}

/// Which callers the inbound side lets through, by identity and request: deny rules first (any
/// match denies), then allow rules (any match allows), else `default`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Authorization {
    /// The first form of this section: SPIFFE ids allowed. Read as one more allow rule
    /// (`:allow`, identities exactly these) under `default: deny`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = crate::limits::MAX_AUTHZ_LIST))]
    pub allow: Vec<String>,
    /// What a request no rule matches gets.
    #[serde(default)]
    pub default: AuthzAction,
    /// `audit` lets denied requests through, logging and counting them as `would_deny`.
    #[serde(default)]
    pub mode: AuthzMode,
    /// The rules; their order does not matter (deny rules are tried before allow rules).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = crate::limits::MAX_AUTHZ_RULES))]
    pub rules: Vec<AuthzRule>,
}

/// What an authorization rule, or the default, decides.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AuthzAction {
    /// The request goes on.
    Allow,
    /// The request is answered 403 (gRPC `PERMISSION_DENIED`).
    #[default]
    Deny,
}

/// Whether authorization's denials are applied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AuthzMode {
    /// Denied requests are refused.
    #[default]
    Enforce,
    /// Denied requests go on, logged and counted as `would_deny` (to roll a policy out safely).
    Audit,
}

/// One authorization rule: it matches a request whose caller meets `from` and whose request
/// meets `to` (an absent one meets anything).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthzRule {
    /// Unique among the rules; named in `x-outrider-error` and in metrics.
    #[schemars(regex(pattern = crate::json_schema::NAME))]
    pub name: String,
    /// What a match decides.
    pub action: AuthzAction,
    /// Who the caller is: every condition set must hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<AuthzFrom>,
    /// What the request is: every condition set must hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<AuthzTo>,
}

/// Conditions on the caller: each list holds when any of its entries does, and every field
/// set must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthzFrom {
    /// Verified SPIFFE ids, `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`,
    /// where a whole segment may be `*`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub identities: Vec<String>,
    /// The verified caller's namespace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// The verified caller's service account (in any namespace unless `namespaces` is set).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<String>,
    /// `true`: any caller with a verified mesh identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authenticated: Option<bool>,
    /// `true`: a caller without one (plaintext).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unauthenticated: Option<bool>,
}

impl AuthzFrom {
    /// Whether a condition needs the caller's identity (ids, namespaces, service accounts).
    pub fn names_identities(&self) -> bool {
        !self.identities.is_empty()
            || !self.namespaces.is_empty()
            || !self.service_accounts.is_empty()
    }
}

/// Conditions on the request: each list holds when any of its entries does (`headers`: all of
/// them must), and every field set must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthzTo {
    /// The path: `exact`, `prefix` (whole segments) or `regex`, as in route matches; compared
    /// with the request path normalized (see the README).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<PathMatch>,
    /// Methods, compared case-sensitively.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = crate::limits::MAX_AUTHZ_LIST))]
    #[schemars(inner(regex(pattern = crate::json_schema::TOKEN)))]
    pub methods: Vec<String>,
    /// Header conditions, as in route matches; every one must hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<ValueMatch>,
}

impl AuthzTo {
    /// Whether any condition is set.
    pub fn is_set(&self) -> bool {
        !self.paths.is_empty() || !self.methods.is_empty() || !self.headers.is_empty()
    }
}

/// Tracing: how traces are sampled and where spans go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Tracing {
    /// The sampling rule.
    #[serde(default)]
    pub sampling: Sampling,
    /// Share of new traces sampled, 0..=1 (a caller's decision is always followed).
    #[serde(default = "Tracing::default_ratio")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub ratio: f64,
    /// Where sampled spans are exported; none are recorded without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp: Option<Otlp>,
}

impl Tracing {
    fn default_ratio() -> f64 {
        1.0
    }
}

impl Default for Tracing {
    fn default() -> Self {
        Self {
            sampling: Sampling::default(),
            ratio: Self::default_ratio(),
            otlp: None,
        }
    }
}

/// How a trace is chosen for recording.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Sampling {
    /// Follow the caller's sampled flag; sample new traces at `ratio`.
    #[default]
    ParentBased,
}

/// An OTLP collector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Otlp {
    /// The collector's URL, e.g. `http://otel-collector:4317` (gRPC) or
    /// `http://otel-collector:4318` (HTTP; `/v1/traces` is appended when there is no path).
    #[schemars(regex(pattern = r"^https?://[^/\s]"))]
    pub endpoint: String,
    /// `grpc` or `http` (protobuf over HTTP).
    #[serde(default)]
    pub protocol: OtlpProtocol,
}

/// The OTLP transport.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OtlpProtocol {
    /// OTLP/gRPC.
    #[default]
    Grpc,
    /// OTLP/HTTP with protobuf bodies.
    Http,
}

/// Whether and how requests are logged: `access_log: json` (or `text`, or `off`), or a mapping
/// `{ format: json | text | off, query: redact | keep | drop }` (a mapping without `format`
/// logs JSON). Written back as the short form whenever the query setting is the default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AccessLog {
    /// The line format, or no access log.
    pub format: AccessLogFormat,
    /// What the logged `path` keeps of the query string.
    pub query: QueryLogging,
}

impl AccessLog {
    /// Whether requests are logged at all.
    pub fn is_on(&self) -> bool {
        self.format != AccessLogFormat::Off
    }
}

/// The access log's line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
#[schemars(transform = crate::json_schema::off_is_false)]
pub enum AccessLogFormat {
    /// No access log.
    #[default]
    Off,
    /// One JSON object per request, one per line, on stdout.
    Json,
    /// One line per request for people to read, on stdout.
    Text,
}

/// What the access log keeps of a request's query string.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum QueryLogging {
    /// Parameter names kept, each non-empty value replaced by `REDACTED`.
    #[default]
    Redact,
    /// The query string as received.
    Keep,
    /// No query string at all.
    Drop,
}

/// The mapping form of [`AccessLog`].
#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AccessLogFields {
    /// The line format, or no access log.
    #[serde(default = "json_format")]
    format: AccessLogFormat,
    /// What the logged `path` keeps of the query string.
    #[serde(default)]
    query: QueryLogging,
}

fn json_format() -> AccessLogFormat {
    AccessLogFormat::Json
}

impl Serialize for AccessLog {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // The short form while it says everything: documents stay as written, and proxies
        // that only know `off | json` still read what the control plane sends them.
        if self.query == QueryLogging::default() {
            self.format.serialize(serializer)
        } else {
            AccessLogFields {
                format: self.format,
                query: self.query,
            }
            .serialize(serializer)
        }
    }
}

impl<'de> Deserialize<'de> for AccessLog {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Form;
        impl<'de> serde::de::Visitor<'de> for Form {
            type Value = AccessLog;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("`off`, `json`, `text`, or a mapping `{ format, query }`")
            }

            fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<AccessLog, E> {
                let format = AccessLogFormat::deserialize(
                    serde::de::value::StrDeserializer::<E>::new(value),
                )?;
                Ok(AccessLog {
                    format,
                    query: QueryLogging::default(),
                })
            }

            // YAML 1.1 reads a bare `off` as false.
            fn visit_bool<E: serde::de::Error>(self, value: bool) -> Result<AccessLog, E> {
                if value {
                    return Err(E::invalid_value(serde::de::Unexpected::Bool(true), &self));
                }
                Ok(AccessLog::default())
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<AccessLog, A::Error> {
                let fields = AccessLogFields::deserialize(
                    serde::de::value::MapAccessDeserializer::new(map),
                )?;
                Ok(AccessLog {
                    format: fields.format,
                    query: fields.query,
                })
            }
        }
        deserializer.deserialize_any(Form)
    }
}

/// The `workload:` field of a document: one name (`checkout`, or `"*"` for every workload) or
/// a list of names. Written back as a plain string when it holds one name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum WorkloadSelector {
    /// A single workload name, or `"*"`.
    #[schemars(schema_with = "crate::json_schema::workload_one")]
    One(String),
    /// Several workload names.
    #[schemars(schema_with = "crate::json_schema::workload_many")]
    Many(Vec<String>),
}

impl WorkloadSelector {
    /// The names listed, in order.
    pub fn names(&self) -> &[String] {
        match self {
            Self::One(name) => std::slice::from_ref(name),
            Self::Many(names) => names,
        }
    }

    /// Whether this selects every workload (`"*"`): the document holds defaults.
    pub fn is_all(&self) -> bool {
        self.names().iter().any(|n| n == "*")
    }
}

/// An upstream service and how to reach it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("anyOf" = [
    { "required": ["endpoints"] }, { "required": ["dns"] }, { "required": ["discovery"] }
]))]
pub struct Service {
    /// Static endpoints. Exactly one of `endpoints`, `dns` and `discovery: registry` must be
    /// set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<Vec<crate::json_schema::SocketAddrText>>")]
    pub endpoints: Option<Vec<SocketAddr>>,
    /// A `host:port` re-resolved periodically; every A/AAAA record is an endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<String>,
    /// More addresses that belong to this service, besides its endpoints and what `dns`
    /// resolves to (a Kubernetes ClusterIP and port, `10.96.12.7:8080`): a captured connection
    /// to any of them gets this service's policy and load balancing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(with = "Vec<crate::json_schema::SocketAddrText>")]
    #[schemars(length(max = crate::limits::MAX_PORT_LIST))]
    pub addresses: Vec<SocketAddr>,
    /// A dedicated local port: everything arriving there goes to this service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<crate::json_schema::SocketAddrText>")]
    pub listen: Option<SocketAddr>,
    /// The protocol spoken to the upstream.
    #[serde(default)]
    pub protocol: Protocol,
    /// How an endpoint is picked for each request.
    #[serde(default)]
    pub load_balancing: LoadBalancing,
    /// Timeouts.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Retries of failed attempts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    /// A token-bucket limit on requests to this service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Fail fast when the service is failing or saturated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breaker: Option<CircuitBreaker>,
    /// Take failing endpoints out of the rotation for a while.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    /// `mesh`: the endpoints are sidecars' inbound ports, reached over mTLS;
    /// `{ sni, ca }`: an external HTTPS service (TLS origination), which `mesh_tls: strict`
    /// leaves alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ServiceTls>,
    /// The SPIFFE id the upstream sidecar must present (mesh TLS); without it any workload
    /// certified by the mesh CA is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// Where the endpoints come from when neither `endpoints` nor `dns` gives them:
    /// `registry`, the addresses proxies registered for this service with the control plane
    /// (`outrider-proxy --register`), pushed as they change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery: Option<Discovery>,
}

/// Where a service's endpoints come from, besides `endpoints` and `dns`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Discovery {
    /// The control plane's service registry: the advertised addresses of the proxies
    /// registered under the service's name, each kept while its lease is renewed.
    Registry,
}

/// The protocol spoken to an upstream (or to the local app).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 with keep-alive.
    #[default]
    Http1,
    /// HTTP/2 over cleartext with prior knowledge (h2c); required for gRPC.
    Http2,
}

/// How an endpoint is chosen for a request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LoadBalancing {
    /// Each endpoint in turn.
    #[default]
    RoundRobin,
    /// Power of two choices: the less loaded of two random endpoints.
    LeastRequest,
    /// Consistent hashing (Maglev) on a request header or cookie: `hash: { header: x-user-id }`
    /// or `hash: { cookie: session }`. The same value goes to the same endpoint while the
    /// endpoint set stays; a request without the header or cookie is balanced round robin.
    Hash(HashOn),
}

/// What a hashing balancer hashes: one request header or one cookie, by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum HashOn {
    /// A header's value (the first one when repeated); the name is case-insensitive.
    #[schemars(schema_with = "crate::json_schema::token")]
    Header(String),
    /// A cookie's value, from the `Cookie` header; the name is case-sensitive.
    #[schemars(schema_with = "crate::json_schema::token")]
    Cookie(String),
}

/// Timeouts of a service. Only `connect` and `request_body_idle` have defaults: a request
/// timeout that nobody chose would cut long streams (gRPC watches, downloads), while a bound on
/// the caller's silence mid-body only cuts stalled uploads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// Bound on establishing a TCP connection to an endpoint.
    #[serde(default = "Timeouts::default_connect")]
    pub connect: Duration,
    /// Bound on the whole exchange until response headers, every retry and backoff included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<Duration>,
    /// Bound on one attempt until its response headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try: Option<Duration>,
    /// Bound on silence while a response body streams.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle: Option<Duration>,
    /// Bound on the caller's silence in the middle of its request body (between two of its
    /// frames, not on the whole upload): a stalled upload must not hold a connection to the
    /// caller and one to the upstream forever.
    #[serde(default = "Timeouts::default_request_body_idle")]
    pub request_body_idle: Duration,
}

impl Timeouts {
    fn default_connect() -> Duration {
        Duration::from_secs(1)
    }

    /// haproxy's usual `timeout client`; nghttpx waits 60 s.
    fn default_request_body_idle() -> Duration {
        Duration::from_secs(30)
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Self::default_connect(),
            request: None,
            per_try: None,
            idle: None,
            request_body_idle: Self::default_request_body_idle(),
        }
    }
}

/// A route on the shared outbound port.
///
/// In a document the control plane composes, an entry named after a route translated from a
/// Gateway API document (`httproute.…`, `grpcroute.…`) with no match attaches policy to that
/// route instead ([`crate::gateway`]): the schema takes both forms.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("anyOf" = [
    {
        "anyOf": [{ "required": ["match"] }, { "required": ["matches"] }],
        "oneOf": [{ "required": ["service"] }, { "required": ["split"] }]
    },
    {
        "required": ["name"],
        "properties": { "name": { "pattern": "^(httproute|grpcroute)\\." } },
        "not": { "anyOf": [
            { "required": ["match"] },
            { "required": ["matches"] },
            { "required": ["service"] },
            { "required": ["split"] },
            { "required": ["filters"] }
        ] }
    }
]))]
pub struct Route {
    /// A name for metrics and logs; `route-<index>` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = crate::json_schema::NAME))]
    pub name: Option<String>,
    /// One match, the original way to write a route: `{ authority, path_prefix }` (it takes
    /// every condition of [`RouteMatch`]). ORed with `matches`; a route needs one of the two.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r#match: Option<RouteMatch>,
    /// Matches in Gateway API's HTTPRoute style: the route takes a request that meets every
    /// condition of at least one of them. Which route takes a request that several routes
    /// match is decided by precedence ([`crate::matching::order`]), not by document order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = crate::limits::MAX_ROUTE_MATCHES))]
    pub matches: Vec<RouteMatch>,
    /// The single service this route sends to. Exactly one of `service` and `split`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// A weighted traffic split across services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub split: Option<Vec<WeightedService>>,
    /// Overrides the service's timeouts for this route (each field that is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<RouteTimeouts>,
    /// Overrides the service's retries for this route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<Retries>,
    /// A rate limit with its own bucket for this route; it replaces the service's limit for
    /// requests taking this route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Retry POST/PATCH and other non-idempotent methods after the request was sent. Off by
    /// default: a retried payment is a double payment.
    #[serde(default)]
    pub retry_non_idempotent: bool,
    /// Injected delays and aborts, for testing resilience in staging.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
    /// What the route does to the requests it takes and their responses, in list order
    /// (Gateway API's HTTPRoute `filters`): header changes, a URL rewrite, or a redirect the
    /// proxy answers itself.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = crate::limits::MAX_ROUTE_FILTERS))]
    pub filters: Vec<RouteFilter>,
}

/// One filter of a route, as Gateway API's HTTPRouteFilter: written as a mapping with one key,
/// `- request_header_modifier: { set: { x-env: canary } }`. Each kind at most once per route,
/// and `url_rewrite` and `request_redirect` not together (validated).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RouteFilter {
    /// Changes the request's headers before it is forwarded.
    RequestHeaderModifier(HeaderModifier),
    /// Changes the headers of the upstream's response before the caller gets it.
    ResponseHeaderModifier(HeaderModifier),
    /// Forwards with another Host / :authority or path.
    UrlRewrite(UrlRewrite),
    /// Answers with a redirect instead of forwarding.
    RequestRedirect(RequestRedirect),
    /// Copies a share of the requests to another service, fire and forget.
    RequestMirror(RequestMirror),
}

impl RouteFilter {
    /// The filter's key in the policy (`url_rewrite`), for findings and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::RequestHeaderModifier(_) => "request_header_modifier",
            Self::ResponseHeaderModifier(_) => "response_header_modifier",
            Self::UrlRewrite(_) => "url_rewrite",
            Self::RequestRedirect(_) => "request_redirect",
            Self::RequestMirror(_) => "request_mirror",
        }
    }
}

/// Gateway API's RequestMirror: a share of the route's requests is copied to `service`; the
/// copy's response is discarded and never delays or changes the caller's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestMirror {
    /// The service the copies go to.
    pub service: String,
    /// Share of requests mirrored, 0..=100.
    #[serde(default = "RequestMirror::default_percent")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub percent: f64,
    /// Request bodies up to this size are mirrored with them; a larger body's request is not
    /// mirrored at all (counted as `skipped_body`).
    #[serde(default = "RequestMirror::default_body_limit")]
    pub body_limit: ByteSize,
    /// Bound on one mirrored exchange, response body included.
    #[serde(default = "RequestMirror::default_timeout")]
    pub timeout: Duration,
    /// Mirrored requests of this filter in flight at once; past it copies are not sent
    /// (counted as `overflow`).
    #[serde(default = "RequestMirror::default_max_in_flight")]
    #[schemars(range(min = 1, max = crate::limits::MAX_MIRROR_IN_FLIGHT))]
    pub max_in_flight: u32,
}

impl RequestMirror {
    pub(crate) fn default_percent() -> f64 {
        100.0
    }
    /// As `retries.body_limit`.
    pub(crate) fn default_body_limit() -> ByteSize {
        ByteSize(64 * 1024)
    }
    pub(crate) fn default_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub(crate) fn default_max_in_flight() -> u32 {
        64
    }
}

/// Header changes (Gateway API's HTTPHeaderFilter). Names compare without case; a name may
/// appear in only one of the three lists.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("anyOf" = [
    { "required": ["set"] }, { "required": ["add"] }, { "required": ["remove"] }
]))]
pub struct HeaderModifier {
    /// Headers set to this value, replacing every value they had.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    /// Headers given this value in addition to the values they already had.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub add: BTreeMap<String, String>,
    /// Headers removed, every value of each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

/// How the request is changed before it is forwarded (Gateway API's HTTPURLRewriteFilter).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("anyOf" = [{ "required": ["hostname"] }, { "required": ["path"] }]))]
pub struct UrlRewrite {
    /// The Host / :authority the upstream gets instead of the caller's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The path the upstream gets instead of the caller's (the query is kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
}

/// A new path: the whole of it, or the part the route's prefix match took (Gateway API's
/// HTTPPathModifier).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PathModifier {
    /// The path becomes this.
    ReplaceFullPath(String),
    /// The leading segments the route's `path: { prefix }` matched become this; only on a
    /// route whose every match is such a prefix match.
    ReplacePrefixMatch(String),
}

/// A redirect the proxy answers with (Gateway API's HTTPRequestRedirectFilter): each part of
/// `Location` that is not set is the request's own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestRedirect {
    /// `http` or `https`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<RedirectScheme>,
    /// The host of `Location`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The port of `Location`; unset: the scheme's well-known port when `scheme` is set, else
    /// the port the request was sent to. Left out of `Location` when it is the scheme's
    /// default (80 for http, 443 for https).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub port: Option<u16>,
    /// The path of `Location` (the query is kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
    /// 301, 302 (the default), 303, 307 or 308.
    #[serde(default = "RequestRedirect::default_status_code")]
    #[schemars(extend("enum" = [301, 302, 303, 307, 308]))]
    pub status_code: u16,
}

impl RequestRedirect {
    fn default_status_code() -> u16 {
        302
    }
}

/// The scheme of a redirect's `Location`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RedirectScheme {
    /// `http`, default port 80.
    Http,
    /// `https`, default port 443.
    Https,
}

impl RedirectScheme {
    /// As written in a URL.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
        }
    }

    /// The scheme's well-known port.
    pub fn default_port(self) -> u16 {
        match self {
            Self::Http => 80,
            Self::Https => 443,
        }
    }
}

impl Route {
    /// Every match of the route: `match` first, then `matches` in order.
    pub fn each_match(&self) -> impl Iterator<Item = &RouteMatch> {
        self.r#match.iter().chain(&self.matches)
    }

    /// The path of its `index`-th match (in [`Route::each_match`]'s order) below the route:
    /// `match` or `matches[k]`.
    pub fn match_path(&self, index: usize) -> String {
        match (self.r#match.is_some(), index) {
            (true, 0) => "match".into(),
            (true, k) => format!("matches[{}]", k - 1),
            (false, k) => format!("matches[{k}]"),
        }
    }
}

/// Fault injection on a route: each request independently may be delayed and may be aborted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("anyOf" = [{ "required": ["delay"] }, { "required": ["abort"] }]))]
pub struct Fault {
    /// Hold some requests before forwarding them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    /// Answer some requests with an error instead of forwarding them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

/// An injected delay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FaultDelay {
    /// How long.
    pub duration: Duration,
    /// Share of requests delayed, 0..=100.
    #[schemars(range(min = 0.0, max = 100.0))]
    pub percent: f64,
}

/// An injected error response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FaultAbort {
    /// The status answered (400..=599).
    #[schemars(range(min = 400, max = 599))]
    pub status: u16,
    /// Share of requests aborted, 0..=100.
    #[schemars(range(min = 0.0, max = 100.0))]
    pub percent: f64,
}

/// Route-level timeout overrides; unset fields keep the service's values.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteTimeouts {
    /// See [`Timeouts::request`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<Duration>,
    /// See [`Timeouts::per_try`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try: Option<Duration>,
    /// See [`Timeouts::idle`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle: Option<Duration>,
    /// See [`Timeouts::request_body_idle`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_body_idle: Option<Duration>,
}

/// What makes a failed attempt worth retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RetryOn {
    /// The connection could not be made (nothing was sent: safe for every method).
    ConnectFailure,
    /// The connection was reset or closed before a response.
    Reset,
    /// 502, 503 or 504 from the upstream.
    GatewayError,
    /// Any 5xx from the upstream.
    #[serde(rename = "5xx")]
    FiveXx,
    /// A status listed in `status`.
    RetriableStatus,
}

/// Retry policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Retries {
    /// Retries after the first try.
    #[schemars(range(max = crate::limits::MAX_RETRY_ATTEMPTS))]
    pub attempts: u32,
    /// What counts as retryable.
    #[serde(default = "Retries::default_on")]
    pub on: Vec<RetryOn>,
    /// Statuses retried with `retriable-status`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(range(min = 100, max = 599)))]
    pub status: Vec<u16>,
    /// gRPC status names retried (`unavailable`, `resource-exhausted`, ...), read from response
    /// headers (trailers-only responses).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("items" = { "enum": crate::GRPC_STATUS_NAMES }))]
    pub grpc: Vec<String>,
    /// Backoff between attempts (full jitter).
    #[serde(default)]
    pub backoff: Backoff,
    /// Cap on the extra load retries may add.
    #[serde(default)]
    pub budget: RetryBudget,
    /// Request bodies larger than this are not retried (they are buffered for replay up to it).
    #[serde(default = "Retries::default_body_limit")]
    pub body_limit: ByteSize,
    /// Longest `Retry-After` (of a 429 or 503) waited for before a retry; an upstream asking
    /// for more gets its response passed back to the caller as it is.
    #[serde(default = "Retries::default_max_retry_after")]
    pub max_retry_after: Duration,
}

impl Retries {
    pub(crate) fn default_on() -> Vec<RetryOn> {
        vec![
            RetryOn::ConnectFailure,
            RetryOn::Reset,
            RetryOn::GatewayError,
        ]
    }
    pub(crate) fn default_body_limit() -> ByteSize {
        ByteSize(64 * 1024)
    }
    /// 30 s: a brief overload is waited out, a long outage is not held against the caller.
    pub(crate) fn default_max_retry_after() -> Duration {
        Duration::from_secs(30)
    }
}

/// Full-jitter exponential backoff: attempt N waits U[0, min(max, base * 2^N)).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Backoff {
    /// The first attempt's ceiling.
    pub base: Duration,
    /// The largest ceiling.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(25),
            max: Duration::from_millis(250),
        }
    }
}

/// Retries may add at most `ratio` of the request rate plus `min_per_second`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryBudget {
    /// Extra load as a fraction of requests, 0..=1.
    #[schemars(range(min = 0.0, max = 1.0))]
    pub ratio: f64,
    /// Retries always allowed per second, whatever the ratio.
    #[schemars(range(max = crate::limits::MAX_RATE))]
    pub min_per_second: u32,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            ratio: 0.2,
            min_per_second: 10,
        }
    }
}

/// A token bucket: `requests_per_second` refill, up to `burst` at once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Sustained rate.
    #[schemars(range(min = 1, max = crate::limits::MAX_RATE))]
    pub requests_per_second: u32,
    /// Bucket size; defaults to one second's worth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = crate::limits::MAX_RATE))]
    pub burst: Option<u32>,
    /// `enforce` rejects over the limit; `shadow` only counts.
    #[serde(default)]
    pub mode: RateLimitMode,
}

/// Whether a rate limit rejects or only counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RateLimitMode {
    /// Over the limit: 429.
    #[default]
    Enforce,
    /// Over the limit: counted, let through.
    Shadow,
}

/// Circuit breaker and concurrency limits of a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("anyOf" = [
    { "required": ["consecutive_failures"] }, { "required": ["failure_rate"] },
    { "required": ["max_concurrent_requests"] }, { "required": ["max_pending_requests"] }
]))]
pub struct CircuitBreaker {
    /// Trip after this many failures in a row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = crate::limits::MAX_FAILURE_COUNT))]
    pub consecutive_failures: Option<u32>,
    /// Trip when the failure rate over a window crosses a threshold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_rate: Option<FailureRate>,
    /// How long the breaker stays open before letting probes through.
    #[serde(default = "CircuitBreaker::default_open_for")]
    pub open_for: Duration,
    /// Real requests let through while half-open.
    #[serde(default = "CircuitBreaker::default_half_open_requests")]
    #[schemars(range(min = 1, max = crate::limits::MAX_FAILURE_COUNT))]
    pub half_open_requests: u32,
    /// Ceiling of the open time, which doubles each time a probe fails.
    #[serde(default = "CircuitBreaker::default_max_open_for")]
    pub max_open_for: Duration,
    /// Requests in flight above this fail fast with 503.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = crate::limits::MAX_RATE))]
    pub max_concurrent_requests: Option<u32>,
    /// Requests waiting for a new connection to the service above this fail fast with 503.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = crate::limits::MAX_RATE))]
    pub max_pending_requests: Option<u32>,
}

impl CircuitBreaker {
    fn default_open_for() -> Duration {
        Duration::from_secs(5)
    }
    fn default_half_open_requests() -> u32 {
        1
    }
    fn default_max_open_for() -> Duration {
        Duration::from_secs(60)
    }
}

/// Per-endpoint ejection: an endpoint that fails `consecutive_failures` times in a row gets no
/// traffic for `base_ejection` times the number of times it has been ejected, up to
/// `max_ejection`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OutlierDetection {
    /// Failures in a row that eject an endpoint.
    #[serde(default = "OutlierDetection::default_consecutive_failures")]
    #[schemars(range(min = 1, max = crate::limits::MAX_FAILURE_COUNT))]
    pub consecutive_failures: u32,
    /// The first ejection's length; the n-th lasts n times as long.
    #[serde(default = "OutlierDetection::default_base_ejection")]
    pub base_ejection: Duration,
    /// The longest ejection.
    #[serde(default = "OutlierDetection::default_max_ejection")]
    pub max_ejection: Duration,
    /// At most this share of the endpoints (rounded down) is ejected at once.
    #[serde(default = "OutlierDetection::default_max_ejected_percent")]
    #[schemars(range(min = 1, max = 100))]
    pub max_ejected_percent: u32,
}

impl OutlierDetection {
    fn default_consecutive_failures() -> u32 {
        5
    }
    fn default_base_ejection() -> Duration {
        Duration::from_secs(30)
    }
    fn default_max_ejection() -> Duration {
        Duration::from_secs(300)
    }
    fn default_max_ejected_percent() -> u32 {
        50
    }
}

/// Failure-rate trip condition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FailureRate {
    /// Fraction of failures, 0..=1, at or above which the breaker opens.
    #[schemars(range(max = 1.0), extend("exclusiveMinimum" = 0))]
    pub threshold: f64,
    /// No decision below this many requests in the window.
    #[schemars(range(min = 1, max = crate::limits::MAX_RATE))]
    pub min_requests: u32,
    /// The sliding window.
    pub window: Duration,
}

/// Conditions a request must meet to take a route; all that are set must hold.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    /// The Host / :authority, without port, compared case-insensitively.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    /// A prefix of the request path as a string (`/v1` also takes `/v1beta`); must start with
    /// `/`. Kept as it always was; `path: { prefix }` matches whole segments instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// The request path: `exact`, `prefix` (whole segments) or `regex` (the whole path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    /// The request method, compared case-sensitively (`GET`, `POST`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = crate::json_schema::TOKEN))]
    pub method: Option<String>,
    /// Request headers, by name (case-insensitive); every one must hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = crate::limits::MAX_MATCH_CONDITIONS))]
    pub headers: Vec<ValueMatch>,
    /// Query parameters, by name (case-sensitive); every one must hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = crate::limits::MAX_MATCH_CONDITIONS))]
    pub query_params: Vec<ValueMatch>,
    /// A gRPC call: the `/service/method` path of a request with a gRPC content type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<GrpcMatch>,
}

/// How the request path is matched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PathMatch {
    /// The whole path, byte for byte.
    Exact(String),
    /// Whole leading segments: `/foo` takes `/foo` and `/foo/bar`, not `/foobar`; a trailing
    /// `/` is ignored.
    Prefix(String),
    /// An RE2-syntax regular expression the whole path must match.
    Regex(String),
}

/// A condition on one request header or query parameter: exactly one of `value`, `regex` and
/// `present`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(transform = crate::json_schema::exact_alias)]
pub struct ValueMatch {
    /// The header's (case-insensitive) or query parameter's (case-sensitive) name.
    pub name: String,
    /// The value, exactly.
    #[serde(default, alias = "exact", skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// An RE2-syntax regular expression the whole value must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    /// `true`: sent, with any value; `false`: not sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,
}

/// A gRPC method, as GRPCRoute's `method` match: `service` is required, `method` narrows it
/// to one method.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GrpcMatch {
    /// The fully qualified service, `package.Service`.
    pub service: String,
    /// The method; every method of the service when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

/// One leg of a traffic split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WeightedService {
    /// The service name.
    pub service: String,
    /// Relative weight; must be > 0.
    #[schemars(range(min = 1))]
    pub weight: u32,
}

/// The inbound listener's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Inbound {
    /// The local app behind the inbound listener.
    #[schemars(with = "crate::json_schema::SocketAddrText")]
    pub app: SocketAddr,
    /// The protocol the local app speaks.
    #[serde(default)]
    pub protocol: Protocol,
    /// Bound on connecting to the local app, and on a caller's silence mid-body
    /// (`request_body_idle`).
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Protects the local app from more than this rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Whether plaintext is still accepted once this proxy holds a mesh certificate.
    #[serde(default)]
    pub mtls: InboundMtls,
    /// Who may reach the app, by caller identity and request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<Authorization>,
}
