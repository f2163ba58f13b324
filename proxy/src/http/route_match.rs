//! A route match compiled for the request path: header names parsed, methods parsed, regexes
//! compiled, built once per policy load. Matching a request reads its head in place and
//! allocates nothing (a query parameter is decoded into a new string only when it holds a
//! `%` escape).

use std::borrow::Cow;

use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderName, Method, Request};
use outrider_config::matching::{compile_regex, segment_prefix_matches, PathCondition};
use outrider_config::{PathMatch, RouteMatch, ValueMatch};
use regex::Regex;

/// What routing looks at in a request: its host (without port), method, path, query and
/// headers, borrowed from the request head.
#[derive(Debug, Clone, Copy)]
pub struct RouteRequest<'a> {
    /// The Host / :authority without port.
    pub host: &'a str,
    /// The method.
    pub method: &'a Method,
    /// The path, as sent (not decoded).
    pub path: &'a str,
    /// The query, without `?`.
    pub query: Option<&'a str>,
    /// The header fields.
    pub headers: &'a HeaderMap,
}

impl<'a> RouteRequest<'a> {
    /// The routing view of `req`, sent to `host`.
    pub fn of<B>(host: &'a str, req: &'a Request<B>) -> Self {
        Self {
            host,
            method: req.method(),
            path: req.uri().path(),
            query: req.uri().query(),
            headers: req.headers(),
        }
    }
}

/// One compiled match: every condition that is set must hold.
#[derive(Debug)]
pub(crate) struct CompiledMatch {
    /// Lowercase.
    authority: Option<Box<str>>,
    path: PathMatcher,
    method: Option<Method>,
    headers: Box<[HeaderCondition]>,
    query_params: Box<[QueryCondition]>,
    /// A `grpc` match also needs a gRPC content type.
    grpc: bool,
}

/// A path condition, compiled (route matches and authorization rules).
#[derive(Debug)]
pub(crate) enum PathMatcher {
    Any,
    StrPrefix(Box<str>),
    SegmentPrefix(Box<str>),
    Exact(Box<str>),
    Regex(Regex),
}

#[derive(Debug)]
enum ValueTest {
    Exact(Box<str>),
    Regex(Regex),
    Present,
    Absent,
}

/// A condition on one request header, compiled (route matches and authorization rules).
#[derive(Debug)]
pub(crate) struct HeaderCondition {
    name: HeaderName,
    test: ValueTest,
}

#[derive(Debug)]
struct QueryCondition {
    name: Box<str>,
    test: ValueTest,
}

/// Why a validated match could not be compiled (validation compiles the same way, so only a
/// policy that skipped it gets here).
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// A regex was refused.
    #[error(transparent)]
    Regex(#[from] outrider_config::matching::RegexError),
    /// A header name or method is not a token.
    #[error("invalid {0}")]
    Name(&'static str),
}

impl CompiledMatch {
    /// Compiles `m`.
    pub(crate) fn compile(m: &RouteMatch) -> Result<Self, CompileError> {
        let path = match PathCondition::of(m) {
            PathCondition::Any => PathMatcher::Any,
            PathCondition::StrPrefix(prefix) => PathMatcher::StrPrefix(prefix.into()),
            PathCondition::SegmentPrefix(prefix) => PathMatcher::SegmentPrefix(prefix.into()),
            PathCondition::Exact(path) => PathMatcher::Exact(path.into()),
            PathCondition::Regex(pattern) => PathMatcher::Regex(compile_regex(pattern)?),
        };
        let method = m
            .method
            .as_deref()
            .map(|method| Method::from_bytes(method.as_bytes()))
            .transpose()
            .map_err(|_| CompileError::Name("method"))?;
        let headers = m
            .headers
            .iter()
            .map(HeaderCondition::compile)
            .collect::<Result<_, CompileError>>()?;
        let query_params = m
            .query_params
            .iter()
            .map(|q| {
                Ok(QueryCondition {
                    name: q.name.as_str().into(),
                    test: ValueTest::compile(q)?,
                })
            })
            .collect::<Result<_, CompileError>>()?;
        Ok(Self {
            authority: m
                .authority
                .as_deref()
                .map(|a| a.to_ascii_lowercase().into_boxed_str()),
            path,
            method,
            headers,
            query_params,
            grpc: m.grpc.is_some(),
        })
    }

    /// The authority the match names, lowercase (captured traffic takes only routes that
    /// name one).
    pub(crate) fn authority(&self) -> Option<&str> {
        self.authority.as_deref()
    }

    /// Whether `req` meets every condition; cheapest first. (Selection goes through the route
    /// index, so only the tests that check the index against a walk of the table use this.)
    #[cfg(test)]
    pub(crate) fn matches(&self, req: &RouteRequest<'_>) -> bool {
        self.authority
            .as_deref()
            .is_none_or(|a| a.eq_ignore_ascii_case(req.host))
            && self.matches_beside_authority(req)
    }

    /// Whether `req` meets every condition but the authority: for a match the route index
    /// found by the request's host, whose authority is that host or none. The host compare
    /// was a third of what ten failing matches cost a request. Inlined into the selection loop:
    /// a call per match tried cost about 17 instructions of register saving.
    #[inline(always)]
    pub(crate) fn matches_beside_authority(&self, req: &RouteRequest<'_>) -> bool {
        self.method.as_ref().is_none_or(|m| m == req.method)
            && self.path.matches(req.path)
            && (!self.grpc || is_grpc(req.headers))
            && self.headers.iter().all(|h| h.matches(req.headers))
            && (self.query_params.is_empty() || self.query_matches(req.query))
    }

    /// Without a query, only `present: false` conditions hold.
    fn query_matches(&self, query: Option<&str>) -> bool {
        match query {
            Some(query) => self.query_params.iter().all(|q| q.matches(query)),
            None => self
                .query_params
                .iter()
                .all(|q| matches!(q.test, ValueTest::Absent)),
        }
    }
}

impl PathMatcher {
    /// The matcher of a `path` condition (`exact`, `prefix` or `regex`) alone.
    pub(crate) fn compile(path: &PathMatch) -> Result<Self, CompileError> {
        Ok(match path {
            PathMatch::Exact(exact) => Self::Exact(exact.as_str().into()),
            PathMatch::Prefix(prefix) => Self::SegmentPrefix(prefix.trim_end_matches('/').into()),
            PathMatch::Regex(pattern) => Self::Regex(compile_regex(pattern)?),
        })
    }

    /// Whether `path` meets the condition.
    #[inline]
    pub(crate) fn matches(&self, path: &str) -> bool {
        match self {
            Self::Any => true,
            Self::StrPrefix(prefix) => path.starts_with(&**prefix),
            Self::SegmentPrefix(prefix) => segment_prefix_matches(prefix, path),
            Self::Exact(exact) => path == &**exact,
            Self::Regex(regex) => regex.is_match(path),
        }
    }
}

impl ValueTest {
    fn compile(condition: &ValueMatch) -> Result<Self, CompileError> {
        Ok(
            match (&condition.value, &condition.regex, condition.present) {
                (Some(value), _, _) => Self::Exact(value.as_str().into()),
                (None, Some(pattern), _) => Self::Regex(compile_regex(pattern)?),
                (None, None, Some(false)) => Self::Absent,
                (None, None, _) => Self::Present,
            },
        )
    }

    fn accepts(&self, value: &str) -> bool {
        match self {
            Self::Exact(exact) => value == &**exact,
            Self::Regex(regex) => regex.is_match(value),
            Self::Present => true,
            Self::Absent => false,
        }
    }
}

impl HeaderCondition {
    /// Compiles `condition` on a header.
    pub(crate) fn compile(condition: &ValueMatch) -> Result<Self, CompileError> {
        Ok(Self {
            // Lowercases: header names compare without case.
            name: HeaderName::from_bytes(condition.name.as_bytes())
                .map_err(|_| CompileError::Name("header name"))?,
            test: ValueTest::compile(condition)?,
        })
    }

    /// A header sent several times matches when one of its values does.
    #[inline]
    pub(crate) fn matches(&self, headers: &HeaderMap) -> bool {
        let present = has_header(headers, &self.name);
        match &self.test {
            ValueTest::Present => present,
            ValueTest::Absent => !present,
            test => {
                present
                    && headers
                        .get_all(&self.name)
                        .iter()
                        .any(|v| std::str::from_utf8(v.as_bytes()).is_ok_and(|v| test.accepts(v)))
            }
        }
    }
}

impl QueryCondition {
    /// The first parameter of that name decides (as Envoy does); names and values are
    /// percent-decoded.
    fn matches(&self, query: &str) -> bool {
        let first = query
            .split('&')
            .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
            .find(|(name, _)| decode(name).is_some_and(|name| *name == *self.name));
        match (first, &self.test) {
            (None, ValueTest::Absent) => true,
            (None, _) | (Some(_), ValueTest::Absent) => false,
            (Some((_, value)), test) => decode(value).is_some_and(|value| test.accepts(&value)),
        }
    }
}

/// `text` percent-decoded: borrowed when it has no escape, `None` when it decodes to invalid
/// UTF-8 (which no condition matches).
fn decode(text: &str) -> Option<Cow<'_, str>> {
    if !text.contains('%') {
        return Some(Cow::Borrowed(text));
    }
    percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .ok()
}

/// Up to this many distinct names, a request's headers are searched in order rather than
/// through the map's hash: hashing a custom name costs more than comparing a few names
/// (most comparisons stop at the length), and most conditions look for a header the request
/// does not carry.
const SCAN_HEADERS_UP_TO: usize = 12;

/// Whether `headers` holds `name`.
#[inline]
fn has_header(headers: &HeaderMap, name: &HeaderName) -> bool {
    if headers.keys_len() <= SCAN_HEADERS_UP_TO {
        headers.keys().any(|key| key == name)
    } else {
        headers.contains_key(name)
    }
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compiled(m: &str) -> CompiledMatch {
        let text = format!(
            "services:\n  a: {{ endpoints: [127.0.0.1:1] }}\nroutes:\n  - {{ service: a, match: {m} }}\n"
        );
        let policy = outrider_config::load("p.yaml", &text)
            .expect("valid")
            .policy;
        CompiledMatch::compile(policy.routes[0].r#match.as_ref().expect("match")).expect("compiles")
    }

    fn request(method: &str, uri: &str, headers: &[(&str, &str)]) -> Request<()> {
        let mut req = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        req.body(()).expect("request")
    }

    /// A case: the match, the request's method, URI and headers, and whether it matches.
    type Case<'a> = (&'a str, &'a str, &'a str, &'a [(&'a str, &'a str)], bool);

    #[test]
    fn each_condition_kind_decides() {
        let cases: &[Case] = &[
            ("{ path: { exact: /a } }", "GET", "/a", &[], true),
            ("{ path: { exact: /a } }", "GET", "/a/", &[], false),
            ("{ path: { prefix: /foo } }", "GET", "/foo/bar", &[], true),
            ("{ path: { prefix: /foo/ } }", "GET", "/foo", &[], true),
            ("{ path: { prefix: /foo } }", "GET", "/foobar", &[], false),
            ("{ path_prefix: /foo }", "GET", "/foobar", &[], true),
            (
                "{ path: { regex: '/u/[0-9]+' } }",
                "GET",
                "/u/42",
                &[],
                true,
            ),
            (
                "{ path: { regex: '/u/[0-9]+' } }",
                "GET",
                "/u/42/x",
                &[],
                false,
            ),
            ("{ method: POST }", "POST", "/", &[], true),
            ("{ method: POST }", "GET", "/", &[], false),
            (
                "{ headers: [{ name: X-Canary, value: 'true' }] }",
                "GET",
                "/",
                &[("x-canary", "true")],
                true,
            ),
            (
                "{ headers: [{ name: x-canary, value: 'true' }] }",
                "GET",
                "/",
                &[("X-CANARY", "TRUE")],
                false,
            ),
            (
                "{ headers: [{ name: x-v, value: b }] }",
                "GET",
                "/",
                &[("x-v", "a"), ("x-v", "b")],
                true,
            ),
            (
                "{ headers: [{ name: x-user, regex: 'u-[0-9]+' }] }",
                "GET",
                "/",
                &[("x-user", "u-7")],
                true,
            ),
            (
                "{ headers: [{ name: x-user, regex: 'u-[0-9]+' }] }",
                "GET",
                "/",
                &[("x-user", "u-7x")],
                false,
            ),
            (
                "{ headers: [{ name: x-debug, present: true }] }",
                "GET",
                "/",
                &[("x-debug", "")],
                true,
            ),
            (
                "{ headers: [{ name: x-debug, present: true }] }",
                "GET",
                "/",
                &[],
                false,
            ),
            (
                "{ headers: [{ name: x-debug, present: false }] }",
                "GET",
                "/",
                &[],
                true,
            ),
            (
                "{ headers: [{ name: x-debug, present: false }] }",
                "GET",
                "/",
                &[("x-debug", "1")],
                false,
            ),
            (
                "{ query_params: [{ name: q, value: 'a b' }] }",
                "GET",
                "/?x=1&q=a%20b",
                &[],
                true,
            ),
            (
                "{ query_params: [{ name: q, value: a }] }",
                "GET",
                "/?q=b&q=a",
                &[],
                false,
            ),
            (
                "{ query_params: [{ name: q, regex: '[0-9]+' }] }",
                "GET",
                "/?q=12",
                &[],
                true,
            ),
            (
                "{ query_params: [{ name: q, present: true }] }",
                "GET",
                "/?q",
                &[],
                true,
            ),
            (
                "{ query_params: [{ name: q, present: true }] }",
                "GET",
                "/?qq=1",
                &[],
                false,
            ),
            (
                "{ query_params: [{ name: q, present: false }] }",
                "GET",
                "/",
                &[],
                true,
            ),
            (
                "{ query_params: [{ name: Q, present: true }] }",
                "GET",
                "/?q=1",
                &[],
                false,
            ),
            (
                "{ grpc: { service: pkg.Svc, method: Get } }",
                "POST",
                "/pkg.Svc/Get",
                &[("content-type", "application/grpc")],
                true,
            ),
            (
                "{ grpc: { service: pkg.Svc } }",
                "POST",
                "/pkg.Svc/Other",
                &[("content-type", "application/grpc+proto")],
                true,
            ),
            (
                "{ grpc: { service: pkg.Svc } }",
                "POST",
                "/pkg.Svc/Get",
                &[],
                false,
            ),
            (
                "{ grpc: { service: pkg.Svc, method: Get } }",
                "POST",
                "/pkg.Svc/GetAll",
                &[("content-type", "application/grpc")],
                false,
            ),
            ("{ authority: Shop }", "GET", "/", &[], true),
            ("{ authority: other }", "GET", "/", &[], false),
        ];
        for (m, method, uri, headers, expected) in cases {
            let req = request(method, uri, headers);
            let view = RouteRequest::of("shop", &req);
            assert_eq!(
                compiled(m).matches(&view),
                *expected,
                "{m} {method} {uri} {headers:?}"
            );
        }
    }

    /// Header conditions decide the same whether the request's headers are few (searched in
    /// order) or many (looked up by hash).
    #[test]
    fn header_conditions_decide_alike_for_few_and_many_headers() {
        let names: Vec<String> = (0..2 * SCAN_HEADERS_UP_TO)
            .map(|i| format!("x-filler-{i}"))
            .collect();
        for count in [
            0,
            1,
            SCAN_HEADERS_UP_TO - 1,
            SCAN_HEADERS_UP_TO + 1,
            names.len(),
        ] {
            let mut headers: Vec<(&str, &str)> =
                names[..count].iter().map(|n| (n.as_str(), "v")).collect();
            headers.push(("X-Canary", "true"));
            let req = request("GET", "/", &headers);
            let view = RouteRequest::of("shop", &req);
            let decide = |m: &str| compiled(m).matches(&view);
            assert!(
                decide("{ headers: [{ name: x-canary, value: 'true' }] }"),
                "{count}"
            );
            assert!(
                decide("{ headers: [{ name: x-canary, present: true }] }"),
                "{count}"
            );
            assert!(
                !decide("{ headers: [{ name: x-canary, present: false }] }"),
                "{count}"
            );
            assert!(
                !decide("{ headers: [{ name: x-other, present: true }] }"),
                "{count}"
            );
            assert!(
                decide("{ headers: [{ name: x-other, present: false }] }"),
                "{count}"
            );
            assert!(
                !decide("{ headers: [{ name: x-other, regex: '.*' }] }"),
                "{count}"
            );
        }
    }
}
