//! `inbound.authorization` compiled for the request path: who the caller is (its verified
//! SPIFFE id, or none over plaintext) and what it asks (path, method, headers) decide, by the
//! semantics of Istio's AuthorizationPolicy and Linkerd's: any matching deny rule denies, then
//! any matching allow rule allows, else the default. Built once per policy load with its
//! metric handles; a decision reads the request head in place and allocates nothing unless
//! the path needs normalizing or the request is denied.
//!
//! A connection relayed as opaque TCP has no request: there a deny rule matches on `from`
//! alone (a rule meant for some paths denies the whole connection, failing closed) and an
//! allow rule with `to` conditions does not match.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};

use http::{HeaderMap, HeaderValue, Method, Request};
use outrider_config::spiffe::{self, WorkloadId};
use outrider_config::{Authorization, AuthzAction, AuthzFrom, AuthzMode, AuthzRule, AuthzTo};

use crate::core::errors::ProxyError;
use crate::http::route_match::{CompileError, HeaderCondition, PathMatcher};
use crate::io::connection::LogLimiter;
use crate::telemetry::metrics::{AuthzMetrics, AuthzSeries};

/// The `rule` label of decisions no rule made.
pub const DEFAULT_RULE: &str = ":default";
/// The name of the allow rule the first form's `allow` list is read as.
pub const ALLOW_LIST_RULE: &str = ":allow";

/// What a request offers authorization: borrowed from its head.
#[derive(Debug, Clone, Copy)]
pub struct AuthzRequest<'a> {
    /// The method.
    pub method: &'a Method,
    /// The path, as sent (normalized before it is compared).
    pub path: &'a str,
    /// The header fields.
    pub headers: &'a HeaderMap,
}

impl<'a> AuthzRequest<'a> {
    /// The view of `req`.
    pub fn of<B>(req: &'a Request<B>) -> Self {
        Self {
            method: req.method(),
            path: req.uri().path(),
            headers: req.headers(),
        }
    }
}

/// `inbound.authorization`, compiled.
#[derive(Debug)]
pub struct Authorizer {
    /// Deny rules, in document order.
    deny: Box<[Rule]>,
    /// Allow rules, in document order (the `allow` list's rule last).
    allow: Box<[Rule]>,
    /// What no rule matching decides, and its counter.
    default: AuthzAction,
    default_count: AuthzSeries,
    mode: AuthzMode,
    /// Some rule names namespaces, service accounts or id patterns: the caller's id is parsed.
    parses_ids: bool,
    /// Audit-mode denials are logged at most once a second.
    audit_log: Mutex<LogLimiter>,
}

#[derive(Debug)]
struct Rule {
    name: Arc<str>,
    from: CallerConditions,
    to: Option<RequestConditions>,
    count: AuthzSeries,
}

/// Conditions on the caller; every one set must hold.
#[derive(Debug, Default)]
struct CallerConditions {
    who: Who,
    identities: Box<[IdPattern]>,
    namespaces: Box<[Box<str>]>,
    service_accounts: Box<[Box<str>]>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Who {
    #[default]
    Anyone,
    Authenticated,
    Unauthenticated,
}

/// An id pattern's parts; `None` is `*`.
#[derive(Debug)]
struct IdPattern {
    trust_domain: Option<Box<str>>,
    namespace: Option<Box<str>>,
    service_account: Option<Box<str>>,
}

/// Conditions on the request; every one set must hold.
#[derive(Debug)]
struct RequestConditions {
    paths: Box<[PathMatcher]>,
    methods: Box<[Method]>,
    headers: Box<[HeaderCondition]>,
}

/// Why a validated authorization could not be compiled (validation checks the same things,
/// so only a policy that skipped it gets here).
#[derive(Debug, thiserror::Error)]
pub enum AuthzCompileError {
    /// A path or header condition.
    #[error(transparent)]
    Match(#[from] CompileError),
    /// An identity pattern.
    #[error(transparent)]
    Identity(#[from] spiffe::SpiffeIdError),
    /// A method is not a token.
    #[error("invalid method")]
    Method,
}

/// What authorization decided, before the mode applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict<'a> {
    /// Allowed, by this rule (`None`: the default).
    Allow(Option<&'a str>),
    /// Denied, by this rule (`None`: the default).
    Deny(Option<&'a str>),
}

impl Authorizer {
    /// Compiles `config`, with a counter per rule (the `allow` list is rule `:allow`) and one
    /// for the default.
    pub fn compile(
        config: &Authorization,
        metrics: &AuthzMetrics,
    ) -> Result<Self, AuthzCompileError> {
        let mode_label = match config.mode {
            AuthzMode::Enforce => "enforce",
            AuthzMode::Audit => "audit",
        };
        let action_label = |action| match (action, config.mode) {
            (AuthzAction::Allow, _) => "allow",
            (AuthzAction::Deny, AuthzMode::Enforce) => "deny",
            (AuthzAction::Deny, AuthzMode::Audit) => "would_deny",
        };
        let counter =
            |name: &str, action| metrics.decisions(name, action_label(action), mode_label);
        let mut deny = Vec::new();
        let mut allow = Vec::new();
        for rule in &config.rules {
            let name: Arc<str> = Arc::from(rule.name.as_str());
            let compiled = Rule::compile(rule, counter(&name, rule.action), name)?;
            match rule.action {
                AuthzAction::Deny => deny.push(compiled),
                AuthzAction::Allow => allow.push(compiled),
            }
        }
        if !config.allow.is_empty() {
            let name: Arc<str> = Arc::from(ALLOW_LIST_RULE);
            let rule = AuthzRule {
                name: ALLOW_LIST_RULE.into(),
                action: AuthzAction::Allow,
                from: Some(AuthzFrom {
                    identities: config.allow.clone(),
                    ..AuthzFrom::default()
                }),
                to: None,
            };
            allow.push(Rule::compile(
                &rule,
                counter(&name, AuthzAction::Allow),
                name,
            )?);
        }
        let default_count = counter(DEFAULT_RULE, config.default);
        let parses_ids = deny.iter().chain(&allow).any(|r| r.from.parses_ids());
        Ok(Self {
            deny: deny.into(),
            allow: allow.into(),
            default: config.default,
            default_count,
            mode: config.mode,
            parses_ids,
            audit_log: Mutex::new(LogLimiter::new()),
        })
    }

    /// An authorizer that denies everything, for an authorization that did not compile (fail
    /// closed); its decisions are counted under `:default`.
    pub fn deny_all(metrics: &AuthzMetrics) -> Self {
        Self {
            deny: Box::default(),
            allow: Box::default(),
            default: AuthzAction::Deny,
            default_count: metrics.decisions(DEFAULT_RULE, "deny", "enforce"),
            mode: AuthzMode::Enforce,
            parses_ids: false,
            audit_log: Mutex::new(LogLimiter::new()),
        }
    }

    /// Decides for `caller` (a verified SPIFFE id; `None` over plaintext) asking `request`
    /// (`None`: an opaque connection), without counting or applying the mode.
    pub fn decide(&self, caller: Option<&str>, request: Option<&AuthzRequest<'_>>) -> Verdict<'_> {
        self.deciding_rule(caller, request).0
    }

    /// The verdict and the counter of the rule (or default) that made it.
    fn deciding_rule(
        &self,
        caller: Option<&str>,
        request: Option<&AuthzRequest<'_>>,
    ) -> (Verdict<'_>, &AuthzSeries) {
        let parsed = match caller {
            Some(id) if self.parses_ids => spiffe::parse(id).ok(),
            _ => None,
        };
        let caller = Caller {
            authenticated: caller.is_some(),
            id: parsed,
        };
        // Normalized once, and only when a path condition is to be looked at.
        let mut path: Option<Cow<'_, str>> = None;
        let mut matches = |rule: &Rule, connection_fails_closed: bool| {
            if !rule.from.matches(&caller) {
                return false;
            }
            let Some(to) = &rule.to else {
                return true;
            };
            match request {
                Some(request) => to.matches(request, &mut path),
                None => connection_fails_closed,
            }
        };
        if let Some(rule) = self.deny.iter().find(|r| matches(r, true)) {
            return (Verdict::Deny(Some(&rule.name)), &rule.count);
        }
        if let Some(rule) = self.allow.iter().find(|r| matches(r, false)) {
            return (Verdict::Allow(Some(&rule.name)), &rule.count);
        }
        let verdict = match self.default {
            AuthzAction::Allow => Verdict::Allow(None),
            AuthzAction::Deny => Verdict::Deny(None),
        };
        (verdict, &self.default_count)
    }

    /// Authorizes `caller` asking `request`: counted, and a denial refused under `enforce`;
    /// under `audit` it goes on, logged at most once a second.
    pub fn check_request<B>(
        &self,
        caller: Option<&HeaderValue>,
        request: &Request<B>,
    ) -> Result<(), ProxyError> {
        let view = AuthzRequest::of(request);
        self.check(caller, Some(&view))
    }

    /// Authorizes an opaque TCP connection from `caller`: whether it may go on.
    pub fn check_connection(&self, caller: Option<&HeaderValue>) -> bool {
        self.check(caller, None).is_ok()
    }

    fn check(
        &self,
        caller: Option<&HeaderValue>,
        request: Option<&AuthzRequest<'_>>,
    ) -> Result<(), ProxyError> {
        // A verified id is the certificate's URI SAN, visible ASCII; anything else is no id
        // a rule could name, but still a verified caller.
        let id = caller.map(|c| c.to_str().unwrap_or("?"));
        let (verdict, count) = self.deciding_rule(id, request);
        count.count.inc();
        let Verdict::Deny(rule) = verdict else {
            return Ok(());
        };
        if self.mode == AuthzMode::Audit {
            self.log_audit(rule, id, request);
            return Ok(());
        }
        tracing::debug!(
            rule = rule.unwrap_or(DEFAULT_RULE),
            caller = id.unwrap_or("plaintext"),
            "inbound request refused by authorization"
        );
        Err(ProxyError::Forbidden {
            rule: rule.map(Arc::from),
            caller: id.map(str::to_string),
        })
    }

    /// A denial let through by `mode: audit`: a WARN at most once a second (a busy proxy would
    /// otherwise log every request); the counter has them all.
    fn log_audit(&self, rule: Option<&str>, caller: Option<&str>, request: Option<&AuthzRequest>) {
        // Never waits: a request that finds the limiter busy is not the one to log.
        let Ok(mut limiter) = self.audit_log.try_lock() else {
            return;
        };
        let Some(denials) = limiter.hit(tokio::time::Instant::now()) else {
            return;
        };
        drop(limiter);
        tracing::warn!(
            rule = rule.unwrap_or(DEFAULT_RULE),
            caller = caller.unwrap_or("plaintext"),
            method = request.map(|r| r.method.as_str()),
            path = request.map(|r| r.path),
            denials,
            "authorization would deny (mode: audit; let through)"
        );
    }
}

/// The caller as rules see it.
struct Caller<'a> {
    authenticated: bool,
    /// The parsed id, when it is a workload id and some rule needs its parts.
    id: Option<WorkloadId<'a>>,
}

impl Rule {
    fn compile(
        rule: &AuthzRule,
        count: AuthzSeries,
        name: Arc<str>,
    ) -> Result<Self, AuthzCompileError> {
        let from = rule
            .from
            .as_ref()
            .map(CallerConditions::compile)
            .transpose()?;
        let to = rule
            .to
            .as_ref()
            .filter(|to| to.is_set())
            .map(RequestConditions::compile)
            .transpose()?;
        Ok(Self {
            name,
            from: from.unwrap_or_default(),
            to,
            count,
        })
    }
}

impl CallerConditions {
    fn compile(from: &AuthzFrom) -> Result<Self, AuthzCompileError> {
        let who = match (from.authenticated, from.unauthenticated) {
            (Some(true), _) => Who::Authenticated,
            (_, Some(true)) => Who::Unauthenticated,
            _ => Who::Anyone,
        };
        let boxed = |list: &[String]| list.iter().map(|v| v.as_str().into()).collect();
        let identities = from
            .identities
            .iter()
            .map(|pattern| {
                let p = spiffe::parse_pattern(pattern)?;
                Ok(IdPattern {
                    trust_domain: p.trust_domain.map(Box::from),
                    namespace: p.namespace.map(Box::from),
                    service_account: p.service_account.map(Box::from),
                })
            })
            .collect::<Result<_, spiffe::SpiffeIdError>>()?;
        Ok(Self {
            who,
            identities,
            namespaces: boxed(&from.namespaces),
            service_accounts: boxed(&from.service_accounts),
        })
    }

    fn parses_ids(&self) -> bool {
        !self.identities.is_empty()
            || !self.namespaces.is_empty()
            || !self.service_accounts.is_empty()
    }

    fn matches(&self, caller: &Caller<'_>) -> bool {
        let who = match self.who {
            Who::Anyone => true,
            Who::Authenticated => caller.authenticated,
            Who::Unauthenticated => !caller.authenticated,
        };
        if !who {
            return false;
        }
        if !self.parses_ids() {
            return true;
        }
        // Conditions on names: a caller without a workload id meets none of them.
        let Some(id) = &caller.id else {
            return false;
        };
        let any_or_empty =
            |list: &[Box<str>], value: &str| list.is_empty() || list.iter().any(|v| **v == *value);
        any_or_empty(&self.namespaces, id.namespace)
            && any_or_empty(&self.service_accounts, id.service_account)
            && (self.identities.is_empty() || self.identities.iter().any(|p| p.matches(id)))
    }
}

impl IdPattern {
    fn matches(&self, id: &WorkloadId<'_>) -> bool {
        let part =
            |pattern: &Option<Box<str>>, value: &str| pattern.as_deref().is_none_or(|p| p == value);
        part(&self.trust_domain, id.trust_domain)
            && part(&self.namespace, id.namespace)
            && part(&self.service_account, id.service_account)
    }
}

impl RequestConditions {
    fn compile(to: &AuthzTo) -> Result<Self, AuthzCompileError> {
        Ok(Self {
            paths: to
                .paths
                .iter()
                .map(PathMatcher::compile)
                .collect::<Result<_, _>>()?,
            methods: to
                .methods
                .iter()
                .map(|m| Method::from_bytes(m.as_bytes()).map_err(|_| AuthzCompileError::Method))
                .collect::<Result<_, _>>()?,
            headers: to
                .headers
                .iter()
                .map(HeaderCondition::compile)
                .collect::<Result<_, _>>()?,
        })
    }

    /// Cheapest first; the path is normalized into `path` the first time a rule needs it.
    fn matches<'r>(&self, request: &AuthzRequest<'r>, path: &mut Option<Cow<'r, str>>) -> bool {
        if !self.methods.is_empty() && !self.methods.iter().any(|m| m == request.method) {
            return false;
        }
        if !self.paths.is_empty() {
            let path = path.get_or_insert_with(|| normalize_path(request.path));
            if !self.paths.iter().any(|p| p.matches(path)) {
                return false;
            }
        }
        self.headers.iter().all(|h| h.matches(request.headers))
    }
}

/// The path authorization compares: `.` and `..` segments resolved, repeated `/` merged, and
/// percent-encoded unreserved characters (letters, digits, `-._~`) decoded (RFC 3986 §6.2.2),
/// so `/./admin`, `//admin` and `/%61dmin` meet a rule on `/admin`. Other escapes (`%2F`) stay
/// as sent. Borrowed when there is nothing to do (the usual case).
pub fn normalize_path(path: &str) -> Cow<'_, str> {
    if !path.starts_with('/') {
        // `*` (OPTIONS) and authority-form targets: not a path to resolve.
        return Cow::Borrowed(path);
    }
    let decoded = decode_unreserved(path);
    let needs_segments = decoded.contains("//") || decoded.contains("/.");
    if !needs_segments {
        return decoded;
    }
    let mut segments: Vec<&str> = Vec::new();
    let mut last = "";
    for segment in decoded.split('/').skip(1) {
        last = segment;
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            other => segments.push(other),
        }
    }
    // `/a/`, `/a/.` and `/a/b/..` name a directory: the trailing `/` stays.
    let trailing = matches!(last, "" | "." | "..") && !segments.is_empty();
    let mut out = String::with_capacity(decoded.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if trailing || segments.is_empty() {
        out.push('/');
    }
    Cow::Owned(out)
}

/// `path` with `%XX` escapes of unreserved characters decoded.
fn decode_unreserved(path: &str) -> Cow<'_, str> {
    if !path.contains('%') {
        return Cow::Borrowed(path);
    }
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok())
            .filter(|b| b.is_ascii_alphanumeric() || b"-._~".contains(b));
        match escaped {
            Some(b) => {
                out.push(char::from(b));
                i += 3;
            }
            None => {
                // `path` is a str and only ASCII escapes are replaced: copy up to the next `%`.
                let next = path[i + 1..].find('%').map_or(path.len(), |n| i + 1 + n);
                out.push_str(&path[i..next]);
                i = next;
            }
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHECKOUT: &str = "spiffe://cluster.local/ns/shop/sa/checkout";
    const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";
    const WEB: &str = "spiffe://cluster.local/ns/web/sa/frontend";

    fn authorizer(yaml: &str) -> Authorizer {
        let text = format!("inbound:\n  app: 127.0.0.1:1\n  authorization:\n{yaml}");
        let policy = outrider_config::load("p.yaml", &text)
            .unwrap_or_else(|e| panic!("{e}"))
            .policy;
        let metrics = crate::telemetry::metrics::Metrics::new("test").expect("metrics");
        let config = policy
            .inbound
            .and_then(|i| i.authorization)
            .expect("authorization");
        Authorizer::compile(&config, &metrics.authz).expect("compiles")
    }

    fn request(method: &str, path: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut req = Request::builder().method(method).uri(path);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        req.body(()).expect("request")
    }

    fn decide<'a>(
        authz: &'a Authorizer,
        caller: Option<&str>,
        method: &str,
        path: &str,
    ) -> Verdict<'a> {
        let req = request(method, path, &[]);
        authz.decide(caller, Some(&AuthzRequest::of(&req)))
    }

    const RULES: &str = "    rules:
      - name: no-admin
        action: deny
        from: { namespaces: [web] }
        to: { paths: [{ prefix: /admin }] }
      - name: no-deletes
        action: deny
        to: { methods: [DELETE] }
      - name: shop-reads
        action: allow
        from: { identities: ['spiffe://cluster.local/ns/shop/sa/*'] }
        to: { methods: [GET, HEAD] }
      - name: checkout-writes
        action: allow
        from: { service_accounts: [checkout], namespaces: [shop] }
        to: { paths: [{ exact: /charge }, { regex: '/refund/[0-9]+' }] }
      - name: web
        action: allow
        from: { namespaces: [web] }
      - name: probes
        action: allow
        from: { unauthenticated: true }
        to: { paths: [{ exact: /healthz }] }
";

    #[test]
    fn deny_rules_come_first_then_allow_rules_then_the_default() {
        let authz = authorizer(RULES);
        let cases: &[(Option<&str>, &str, &str, Verdict)] = &[
            (
                Some(CHECKOUT),
                "GET",
                "/x",
                Verdict::Allow(Some("shop-reads")),
            ),
            (
                Some(ORDERS),
                "GET",
                "/x",
                Verdict::Allow(Some("shop-reads")),
            ),
            (
                Some(CHECKOUT),
                "POST",
                "/charge",
                Verdict::Allow(Some("checkout-writes")),
            ),
            (
                Some(CHECKOUT),
                "POST",
                "/refund/42",
                Verdict::Allow(Some("checkout-writes")),
            ),
            (Some(CHECKOUT), "POST", "/refund/x", Verdict::Deny(None)),
            (Some(ORDERS), "POST", "/charge", Verdict::Deny(None)),
            // Deny rules win over allow rules that also match.
            (
                Some(CHECKOUT),
                "DELETE",
                "/x",
                Verdict::Deny(Some("no-deletes")),
            ),
            (Some(WEB), "GET", "/page", Verdict::Allow(Some("web"))),
            (
                Some(WEB),
                "GET",
                "/admin/users",
                Verdict::Deny(Some("no-admin")),
            ),
            (
                Some(WEB),
                "GET",
                "/administrator",
                Verdict::Allow(Some("web")),
            ),
            (None, "GET", "/healthz", Verdict::Allow(Some("probes"))),
            (None, "GET", "/x", Verdict::Deny(None)),
            // A verified id that is no workload id: authenticated, in no namespace.
            (Some("spiffe://other/x"), "GET", "/x", Verdict::Deny(None)),
        ];
        for (caller, method, path, expected) in cases {
            assert_eq!(
                decide(&authz, *caller, method, path),
                *expected,
                "{caller:?} {method} {path}"
            );
        }
    }

    #[test]
    fn the_path_is_normalized_before_it_is_compared() {
        let authz = authorizer(RULES);
        for path in [
            "/admin",
            "//admin",
            "/./admin/x",
            "/x/../admin",
            "/%61dmin",
            "/%2E/admin",
            "/admin/",
        ] {
            assert_eq!(
                decide(&authz, Some(WEB), "GET", path),
                Verdict::Deny(Some("no-admin")),
                "{path}"
            );
        }
        for (path, normal) in [
            ("/a/b", "/a/b"),
            ("/a//b/", "/a/b/"),
            ("/a/./b/../c", "/a/c"),
            ("/../..", "/"),
            ("/a/b/..", "/a/"),
            ("/a%2Fb", "/a%2Fb"),
            ("/caf%C3%A9/%7Euser", "/caf%C3%A9/~user"),
            ("/%zz%4", "/%zz%4"),
            ("*", "*"),
        ] {
            assert_eq!(normalize_path(path), normal, "{path}");
        }
        assert!(matches!(normalize_path("/a/b.c/d"), Cow::Borrowed(_)));
    }

    #[test]
    fn headers_and_the_first_form_decide_too() {
        let authz = authorizer(
            "    allow: [spiffe://cluster.local/ns/shop/sa/orders]
    rules:
      - name: canary
        action: allow
        to: { headers: [{ name: x-canary, value: 'yes' }] }
",
        );
        let req = request("GET", "/", &[("x-canary", "yes")]);
        let view = AuthzRequest::of(&req);
        assert_eq!(
            authz.decide(None, Some(&view)),
            Verdict::Allow(Some("canary"))
        );
        assert_eq!(
            decide(&authz, Some(ORDERS), "GET", "/"),
            Verdict::Allow(Some(ALLOW_LIST_RULE))
        );
        assert_eq!(
            decide(&authz, Some(CHECKOUT), "GET", "/"),
            Verdict::Deny(None)
        );
    }

    #[test]
    fn a_connection_meets_deny_rules_by_caller_and_allow_rules_without_request_conditions() {
        let authz = authorizer(RULES);
        // `no-admin` names paths, but a connection has none: denied, failing closed.
        assert_eq!(
            authz.decide(Some(WEB), None),
            Verdict::Deny(Some("no-admin"))
        );
        // `no-deletes` is about a method: every connection is denied (the first deny rule
        // with no caller condition), whatever `probes` allows on one path.
        assert_eq!(authz.decide(None, None), Verdict::Deny(Some("no-deletes")));
        let plain = authorizer(
            "    default: deny
    rules:
      - { name: tcp, action: allow, from: { unauthenticated: true } }
",
        );
        assert_eq!(plain.decide(None, None), Verdict::Allow(Some("tcp")));
        // An allow rule with request conditions does not match a connection.
        let http_only = authorizer(
            "    rules:
      - { name: probes, action: allow, from: { unauthenticated: true }, to: { methods: [GET] } }
",
        );
        assert_eq!(http_only.decide(None, None), Verdict::Deny(None));
        assert_eq!(plain.decide(Some(CHECKOUT), None), Verdict::Deny(None));
    }

    #[test]
    fn audit_mode_lets_denials_through_and_counts_them() {
        let metrics = crate::telemetry::metrics::Metrics::new("test").expect("metrics");
        let text = "inbound:
  app: 127.0.0.1:1
  authorization:
    mode: audit
    rules: [{ name: no-admin, action: deny, to: { paths: [{ prefix: /admin }] } }]
    default: allow
";
        let config = outrider_config::load("p.yaml", text)
            .expect("valid")
            .policy
            .inbound
            .and_then(|i| i.authorization)
            .expect("authorization");
        let audit = Authorizer::compile(&config, &metrics.authz).expect("compiles");
        let admin = request("GET", "/admin", &[]);
        assert!(audit.check_request(None, &admin).is_ok());
        assert!(audit.check_request(None, &admin).is_ok());
        assert!(audit.check_request(None, &request("GET", "/", &[])).is_ok());
        let would_deny = metrics.authz.decisions("no-admin", "would_deny", "audit");
        assert_eq!(would_deny.count.get(), 2);
        assert_eq!(
            metrics
                .authz
                .decisions(DEFAULT_RULE, "allow", "audit")
                .count
                .get(),
            1
        );

        let enforce_config = Authorization {
            mode: AuthzMode::Enforce,
            ..config
        };
        let enforce = Authorizer::compile(&enforce_config, &metrics.authz).expect("compiles");
        let refused = enforce
            .check_request(Some(&HeaderValue::from_static(CHECKOUT)), &admin)
            .expect_err("enforced");
        assert_eq!(
            refused.to_string(),
            format!("denied by rule no-admin (caller {CHECKOUT})")
        );
        assert_eq!(
            metrics
                .authz
                .decisions("no-admin", "deny", "enforce")
                .count
                .get(),
            1
        );
        // The audit series go with the last authorizer that counts in them; the enforcing
        // one's stay.
        drop((audit, would_deny));
        let text = String::from_utf8(metrics.encode()).expect("utf-8");
        assert!(!text.contains("action=\"would_deny\""), "{text}");
        assert!(text.contains("rule=\"no-admin\""), "{text}");
    }
}
