//! A route's `filters` compiled for the request path (Gateway API's HTTPRouteFilter): header
//! names and values parsed, hosts made into authorities, the prefix a rewrite replaces taken
//! from the match, all once per policy load. Per request: a few header inserts, and one new
//! path string when the path is rewritten or a redirect built.

use http::header::{HeaderName, HeaderValue, LOCATION};
use http::uri::{Authority, PathAndQuery};
use http::{HeaderMap, Response, StatusCode};
use outrider_config::matching::PathCondition;
use outrider_config::{
    HeaderModifier, PathModifier, RedirectScheme, RequestRedirect, Route, RouteFilter, RouteMatch,
    UrlRewrite,
};

use crate::io::body::ProxyBody;
use crate::telemetry::routing::FilterCounts;

/// The filters of one match of a route: each kind at most once (validated), so they are held
/// by kind; the order they take effect in is fixed by what each touches (see `forward.rs`).
#[derive(Debug, Default)]
pub struct RouteFilters {
    /// Changes to the request's headers.
    pub request_headers: Option<HeaderChanges>,
    /// Changes to the upstream response's headers.
    pub response_headers: Option<HeaderChanges>,
    /// A new authority or path for the upstream.
    pub rewrite: Option<Rewrite>,
    /// A redirect answered instead of forwarding.
    pub redirect: Option<Redirect>,
    /// What the filters did, counted by route (`outrider_route_filter_decisions_total`).
    pub counts: FilterCounts,
}

/// Why a validated filter could not be compiled (validation checks the same, so only a policy
/// that skipped it gets here).
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// A header name or value the `http` crate refuses.
    #[error("invalid header {0}")]
    Header(&'static str),
    /// A hostname that is not an authority.
    #[error("invalid hostname")]
    Hostname,
    /// A status that is not a redirect.
    #[error("invalid redirect status")]
    Status,
}

impl RouteFilters {
    /// Compiles `route`'s filters for its match `m` (whose prefix a `replace_prefix_match`
    /// replaces); `None` when the route has none.
    pub fn compile(route: &Route, m: &RouteMatch) -> Result<Option<Self>, FilterError> {
        // Mirrors are built with the route's targets (`snapshot::mirrors`), not here.
        let only_mirrors = |filter: &RouteFilter| matches!(filter, RouteFilter::RequestMirror(_));
        if route.filters.iter().all(only_mirrors) {
            return Ok(None);
        }
        let prefix = match PathCondition::of(m) {
            PathCondition::SegmentPrefix(prefix) => Some(prefix),
            _ => None,
        };
        let mut filters = Self::default();
        for filter in &route.filters {
            match filter {
                RouteFilter::RequestHeaderModifier(modifier) => {
                    filters.request_headers = Some(HeaderChanges::compile(modifier)?);
                }
                RouteFilter::ResponseHeaderModifier(modifier) => {
                    filters.response_headers = Some(HeaderChanges::compile(modifier)?);
                }
                RouteFilter::UrlRewrite(rewrite) => {
                    filters.rewrite = Some(Rewrite::compile(rewrite, prefix.as_deref())?);
                }
                RouteFilter::RequestRedirect(redirect) => {
                    filters.redirect = Some(Redirect::compile(redirect, prefix.as_deref())?);
                }
                RouteFilter::RequestMirror(_) => {}
            }
        }
        Ok(Some(filters))
    }
}

/// A header modifier: `set` replaces, `add` appends, `remove` drops. A name is in one list
/// only (validated), so the order of the three does not matter.
#[derive(Debug)]
pub struct HeaderChanges {
    set: Box<[(HeaderName, HeaderValue)]>,
    add: Box<[(HeaderName, HeaderValue)]>,
    remove: Box<[HeaderName]>,
}

impl HeaderChanges {
    fn compile(modifier: &HeaderModifier) -> Result<Self, FilterError> {
        let pairs = |map: &std::collections::BTreeMap<String, String>| {
            map.iter()
                .map(|(name, value)| Ok((header_name(name)?, header_value(value)?)))
                .collect::<Result<Box<[_]>, FilterError>>()
        };
        Ok(Self {
            set: pairs(&modifier.set)?,
            add: pairs(&modifier.add)?,
            remove: modifier
                .remove
                .iter()
                .map(|name| header_name(name))
                .collect::<Result<_, _>>()?,
        })
    }

    /// Applies the changes to `headers`.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
        for name in &self.remove {
            headers.remove(name);
        }
    }
}

/// Lowercased: header names compare without case.
fn header_name(name: &str) -> Result<HeaderName, FilterError> {
    HeaderName::from_bytes(name.as_bytes()).map_err(|_| FilterError::Header("name"))
}

fn header_value(value: &str) -> Result<HeaderValue, FilterError> {
    HeaderValue::from_str(value).map_err(|_| FilterError::Header("value"))
}

/// A new path, from the whole path or from the prefix the match took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathRewrite {
    /// The path becomes this.
    Full(Box<str>),
    /// The matched prefix (held without its trailing `/`, `""` for `/`) becomes `replacement`
    /// (held without its trailing `/`).
    Prefix {
        /// The match's prefix.
        matched: Box<str>,
        /// What replaces it.
        replacement: Box<str>,
    },
}

impl PathRewrite {
    /// `modifier` for a match with segment prefix `prefix` (as [`PathCondition`] holds it).
    /// A prefix replacement on a match without one (validation refuses it) replaces nothing.
    fn compile(modifier: &PathModifier, prefix: Option<&str>) -> Self {
        match modifier {
            PathModifier::ReplaceFullPath(path) => Self::Full(path.as_str().into()),
            PathModifier::ReplacePrefixMatch(replacement) => Self::Prefix {
                matched: prefix.unwrap_or("").into(),
                replacement: replacement.trim_end_matches('/').into(),
            },
        }
    }

    /// The new path for `path`, as Gateway API's HTTPPathModifier: the prefix is replaced on
    /// whole segments, and the result is never empty (`/foo` with prefix `/foo` replaced by
    /// nothing is `/`).
    pub fn apply(&self, path: &str) -> String {
        match self {
            Self::Full(full) => full.to_string(),
            Self::Prefix {
                matched,
                replacement,
            } => {
                // The route matched, so `path` starts with the prefix on a segment boundary;
                // should it not, the whole path is kept after the replacement.
                let rest = path.strip_prefix(&**matched).unwrap_or(path);
                let mut out = String::with_capacity(replacement.len() + rest.len() + 1);
                out.push_str(replacement);
                out.push_str(rest);
                if !out.starts_with('/') {
                    out.insert(0, '/');
                }
                out
            }
        }
    }
}

/// `path` rewritten, with `query` kept.
fn path_and_query(rewrite: &PathRewrite, path: &str, query: Option<&str>) -> String {
    let mut out = rewrite.apply(path);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

/// A URL rewrite: the upstream gets another authority, path, or both.
#[derive(Debug)]
pub struct Rewrite {
    /// The authority (Host / :authority) the upstream gets.
    pub authority: Option<Authority>,
    /// How the path changes.
    pub path: Option<PathRewrite>,
}

impl Rewrite {
    fn compile(rewrite: &UrlRewrite, prefix: Option<&str>) -> Result<Self, FilterError> {
        Ok(Self {
            authority: rewrite
                .hostname
                .as_deref()
                .map(|host| Authority::try_from(host).map_err(|_| FilterError::Hostname))
                .transpose()?,
            path: rewrite
                .path
                .as_ref()
                .map(|path| PathRewrite::compile(path, prefix)),
        })
    }

    /// The path and query the upstream gets, when the path is rewritten; `None` when the
    /// result is not a valid request target (it is built from a valid path and a validated
    /// replacement, so it always is).
    pub fn path_and_query(&self, uri: &http::Uri) -> Option<PathAndQuery> {
        let rewrite = self.path.as_ref()?;
        PathAndQuery::try_from(path_and_query(rewrite, uri.path(), uri.query())).ok()
    }
}

/// A redirect the proxy answers with, its `Location` built from the request's URL and the
/// parts the policy replaces (Gateway API's HTTPRequestRedirectFilter).
#[derive(Debug)]
pub struct Redirect {
    scheme: Option<RedirectScheme>,
    hostname: Option<Box<str>>,
    port: Option<u16>,
    path: Option<PathRewrite>,
    status: StatusCode,
}

/// What a redirect keeps of the request: its URL's parts.
#[derive(Debug, Clone, Copy)]
pub struct RequestUrl<'a> {
    /// `http` or `https`, as the caller sent it (`http` when it did not say).
    pub scheme: &'a str,
    /// The host, without port; empty when the request named none.
    pub host: &'a str,
    /// The port the caller sent the request to, when it named one.
    pub port: Option<u16>,
    /// The path.
    pub path: &'a str,
    /// The query, without `?`.
    pub query: Option<&'a str>,
}

impl Redirect {
    fn compile(redirect: &RequestRedirect, prefix: Option<&str>) -> Result<Self, FilterError> {
        let status = StatusCode::from_u16(redirect.status_code)
            .ok()
            .filter(StatusCode::is_redirection)
            .ok_or(FilterError::Status)?;
        Ok(Self {
            scheme: redirect.scheme,
            hostname: redirect.hostname.as_deref().map(Box::from),
            port: redirect.port,
            path: redirect
                .path
                .as_ref()
                .map(|path| PathRewrite::compile(path, prefix)),
            status,
        })
    }

    /// The `Location` for a request to `url`. The port, unless the policy names one, is the
    /// redirect scheme's well-known one when the policy names a scheme, else the one the
    /// request went to; it is left out when it is its scheme's default (80 for http, 443 for
    /// https), as Gateway API says.
    pub fn location(&self, url: &RequestUrl<'_>) -> String {
        let scheme: &str = match self.scheme {
            Some(scheme) => scheme.as_str(),
            None => url.scheme,
        };
        let port = self
            .port
            .or_else(|| self.scheme.map(RedirectScheme::default_port))
            .or(url.port)
            .filter(|port| !matches!((scheme, port), ("http", 80) | ("https", 443)));
        let host = self.hostname.as_deref().unwrap_or(url.host);
        let mut location = format!("{scheme}://{host}");
        if let Some(port) = port {
            location.push(':');
            location.push_str(&port.to_string());
        }
        match &self.path {
            Some(rewrite) => location.push_str(&path_and_query(rewrite, url.path, url.query)),
            None => {
                location.push_str(url.path);
                if let Some(query) = url.query {
                    location.push('?');
                    location.push_str(query);
                }
            }
        }
        location
    }

    /// The redirect response to a request to `url`; `None` when `Location` cannot be a header
    /// value (the request's path holds bytes a header may not carry).
    pub fn respond(&self, url: &RequestUrl<'_>) -> Option<Response<ProxyBody>> {
        let location = HeaderValue::try_from(self.location(url)).ok()?;
        let mut response = Response::new(ProxyBody::empty());
        *response.status_mut() = self.status;
        response.headers_mut().insert(LOCATION, location);
        Some(response)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix(matched: &str, replacement: &str) -> PathRewrite {
        // As `PathCondition` holds a `path: { prefix }`.
        let matched = matched.trim_end_matches('/');
        PathRewrite::compile(
            &PathModifier::ReplacePrefixMatch(replacement.into()),
            Some(matched),
        )
    }

    /// Gateway API's table for ReplacePrefixMatch (HTTPPathModifier), row by row, and the
    /// prefix `/` (which every path has).
    #[test]
    fn prefix_replacement_follows_the_gateway_api_table() {
        let table = [
            // (request path, prefix match, replace prefix, modified path)
            ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
            ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
            ("/foo", "/foo", "/xyz", "/xyz"),
            ("/foo/", "/foo", "/xyz", "/xyz/"),
            ("/foo/bar", "/foo", "", "/bar"),
            ("/foo/", "/foo", "", "/"),
            ("/foo", "/foo", "", "/"),
            ("/foo/", "/foo", "/", "/"),
            ("/foo", "/foo", "/", "/"),
            ("/foo/bar/baz", "/foo/bar", "/v2", "/v2/baz"),
            ("/anything", "/", "/v2", "/v2/anything"),
            ("/", "/", "/v2", "/v2/"),
            ("/", "/", "", "/"),
        ];
        for (path, matched, replacement, want) in table {
            assert_eq!(
                prefix(matched, replacement).apply(path),
                want,
                "{path} with prefix {matched} replaced by {replacement:?}"
            );
        }
    }

    #[test]
    fn full_path_replacement_keeps_the_query() {
        let full = PathRewrite::compile(&PathModifier::ReplaceFullPath("/new".into()), None);
        assert_eq!(path_and_query(&full, "/old/x", Some("a=1&b")), "/new?a=1&b");
        assert_eq!(path_and_query(&full, "/old/x", None), "/new");
        let rewrite = Rewrite {
            authority: None,
            path: Some(prefix("/v1", "/v2")),
        };
        let uri: http::Uri = "/v1/items?page=2".parse().expect("uri");
        assert_eq!(
            rewrite.path_and_query(&uri).expect("valid").as_str(),
            "/v2/items?page=2"
        );
    }

    fn redirect(yaml: &str) -> Redirect {
        let text = format!(
            "services:\n  a: {{ endpoints: [127.0.0.1:1] }}\nroutes:\n  - service: a\n    matches: [{{ path: {{ prefix: /foo }} }}]\n    filters: [{{ request_redirect: {yaml} }}]\n"
        );
        let policy = outrider_config::load("p.yaml", &text)
            .expect("valid")
            .policy;
        let route = &policy.routes[0];
        let m = route.each_match().next().expect("a match");
        let filters = RouteFilters::compile(route, m).expect("compiles");
        filters.and_then(|f| f.redirect).expect("a redirect")
    }

    /// `Location` per Gateway API: each part not set is the request's; the port is the
    /// scheme's well-known one when the scheme is set, else the request's; a default port is
    /// left out.
    #[test]
    fn location_follows_the_gateway_api_port_and_scheme_rules() {
        let url = |host, port| RequestUrl {
            scheme: "http",
            host,
            port,
            path: "/foo/bar",
            query: Some("q=1"),
        };
        let cases = [
            // (filter, request host and port, Location)
            ("{}", ("a.example", None), "http://a.example/foo/bar?q=1"),
            (
                "{}",
                ("a.example", Some(8080)),
                "http://a.example:8080/foo/bar?q=1",
            ),
            (
                "{}",
                ("a.example", Some(80)),
                "http://a.example/foo/bar?q=1",
            ),
            (
                "{ scheme: https }",
                ("a.example", Some(8080)),
                "https://a.example/foo/bar?q=1",
            ),
            (
                "{ scheme: https, port: 443 }",
                ("a.example", None),
                "https://a.example/foo/bar?q=1",
            ),
            (
                "{ scheme: https, port: 8443 }",
                ("a.example", None),
                "https://a.example:8443/foo/bar?q=1",
            ),
            (
                "{ scheme: http }",
                ("a.example", Some(8443)),
                "http://a.example/foo/bar?q=1",
            ),
            (
                "{ port: 443 }",
                ("a.example", None),
                "http://a.example:443/foo/bar?q=1",
            ),
            (
                "{ hostname: b.example }",
                ("a.example", Some(8080)),
                "http://b.example:8080/foo/bar?q=1",
            ),
            (
                "{ path: { replace_full_path: /new } }",
                ("a.example", None),
                "http://a.example/new?q=1",
            ),
            (
                "{ path: { replace_prefix_match: /xyz } }",
                ("a.example", None),
                "http://a.example/xyz/bar?q=1",
            ),
            (
                "{ path: { replace_prefix_match: '' } }",
                ("[::1]", Some(8080)),
                "http://[::1]:8080/bar?q=1",
            ),
        ];
        for (filter, (host, port), want) in cases {
            assert_eq!(
                redirect(filter).location(&url(host, port)),
                want,
                "{filter}"
            );
        }
    }

    #[test]
    fn redirect_answers_with_its_status_and_location() {
        let url = RequestUrl {
            scheme: "http",
            host: "a.example",
            port: None,
            path: "/foo",
            query: None,
        };
        let response = redirect("{ status_code: 308, scheme: https }")
            .respond(&url)
            .expect("a response");
        assert_eq!(response.status(), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(response.headers()[LOCATION], "https://a.example/foo");
        assert_eq!(redirect("{}").status, StatusCode::FOUND, "302 by default");
    }

    #[test]
    fn header_changes_set_add_and_remove_without_case() {
        let modifier = HeaderModifier {
            set: [("X-Env".to_string(), "canary".to_string())].into(),
            add: [("x-tag".to_string(), "b".to_string())].into(),
            remove: vec!["X-Debug".into()],
        };
        let changes = HeaderChanges::compile(&modifier).expect("compiles");
        let mut headers = HeaderMap::new();
        headers.append("x-env", HeaderValue::from_static("prod"));
        headers.append("x-env", HeaderValue::from_static("other"));
        headers.append("x-tag", HeaderValue::from_static("a"));
        headers.append("x-debug", HeaderValue::from_static("1"));
        changes.apply(&mut headers);
        let all = |name: &str| -> Vec<&str> {
            headers
                .get_all(name)
                .iter()
                .map(|v| v.to_str().expect("ascii"))
                .collect()
        };
        assert_eq!(all("x-env"), ["canary"]);
        assert_eq!(all("x-tag"), ["a", "b"]);
        assert!(all("x-debug").is_empty());
    }
}
