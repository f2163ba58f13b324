//! What a route match means, shared by validation, the lint and the proxy's route table: the
//! path condition a match sets (whichever way it was written), its rank in Gateway API's
//! HTTPRoute precedence, the order of every match of a policy, and how a match's regular
//! expressions are compiled (RE2 syntax, whole-value, under a size limit).
//!
//! Precedence (HTTPRouteRule `matches`, GRPCRoute for `grpc`), most specific first, each
//! criterion deciding only when the ones before it tie:
//! 1. an `authority` (a hostname, always exact here) over none;
//! 2. the path: `exact` over `regex` over `prefix`, longer prefixes first (a trailing `/` is
//!    not counted; no path condition is prefix `/`). Gateway API leaves regex to the
//!    implementation; like Envoy Gateway we rank it above prefixes, or every route without a
//!    path (prefix `/`) would take its requests;
//! 3. a `method` over none;
//! 4. more header conditions;
//! 5. more query parameter conditions;
//! 6. document order: the earlier route, and within a route `match` before `matches`, in list
//!    order.

use std::borrow::Cow;
use std::cmp::Reverse;

use crate::limits::MAX_REGEX_BYTES;
use crate::schema::{PathMatch, Route, RouteMatch};

/// The path condition of a match, however it was written (`path_prefix`, `path`, `grpc`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathCondition<'a> {
    /// No condition on the path.
    Any,
    /// `path_prefix`: the path starts with this string (`/v1` also takes `/v1beta`).
    StrPrefix(&'a str),
    /// `path.prefix` and `grpc.service` alone: whole segments. Held without its trailing
    /// `/` (`""` for `/`), so the path must equal it or go on with a `/`.
    SegmentPrefix(String),
    /// `path.exact` and `grpc` with a method: the whole path.
    Exact(String),
    /// `path.regex`: the pattern as written (compile it with [`compile_regex`]).
    Regex(&'a str),
}

impl<'a> PathCondition<'a> {
    /// The path condition of `m`. A match sets at most one of `path_prefix`, `path` and
    /// `grpc` (validated); should it set several, the first of them counts.
    pub fn of(m: &'a RouteMatch) -> Self {
        if let Some(prefix) = &m.path_prefix {
            return Self::StrPrefix(prefix);
        }
        match (&m.path, &m.grpc) {
            (Some(PathMatch::Exact(path)), _) => Self::Exact(path.clone()),
            (Some(PathMatch::Prefix(prefix)), _) => Self::segment_prefix(prefix),
            (Some(PathMatch::Regex(pattern)), _) => Self::Regex(pattern),
            (None, Some(grpc)) => match &grpc.method {
                Some(method) => Self::Exact(format!("/{}/{method}", grpc.service)),
                None => Self::segment_prefix(&format!("/{}", grpc.service)),
            },
            (None, None) => Self::Any,
        }
    }

    fn segment_prefix(prefix: &str) -> Self {
        Self::SegmentPrefix(prefix.trim_end_matches('/').to_string())
    }

    /// Whether `path` meets the condition (a regex is not evaluated here: `None`).
    pub fn matches_plain(&self, path: &str) -> Option<bool> {
        Some(match self {
            Self::Any => true,
            Self::StrPrefix(prefix) => path.starts_with(prefix),
            Self::SegmentPrefix(prefix) => segment_prefix_matches(prefix, path),
            Self::Exact(exact) => path == exact,
            Self::Regex(_) => return None,
        })
    }

    /// Where this condition sorts among paths.
    fn rank(&self) -> PathRank {
        match self {
            Self::Any => PathRank::Prefix(0),
            Self::StrPrefix(prefix) => PathRank::Prefix(prefix.trim_end_matches('/').len()),
            Self::SegmentPrefix(prefix) => PathRank::Prefix(prefix.len()),
            Self::Regex(_) => PathRank::Regex,
            Self::Exact(_) => PathRank::Exact,
        }
    }
}

/// Whether `path` is `prefix` or goes on from it with a `/` (`prefix` has no trailing `/`).
pub fn segment_prefix_matches(prefix: &str, path: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The rank of a path condition: variants in increasing precedence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PathRank {
    /// A prefix of this many characters (no condition: 0).
    Prefix(usize),
    /// A regular expression.
    Regex,
    /// The exact path.
    Exact,
}

/// How specific a match is; greater is more specific. Fields compare in declaration order,
/// which is the order of Gateway API's criteria.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rank {
    /// Whether it names an authority.
    pub authority: bool,
    /// The path condition.
    pub path: PathRank,
    /// Whether it names a method.
    pub method: bool,
    /// How many header conditions it sets.
    pub headers: usize,
    /// How many query parameter conditions it sets.
    pub query_params: usize,
}

impl Rank {
    /// The rank of `m`.
    pub fn of(m: &RouteMatch) -> Self {
        Self {
            authority: m.authority.is_some(),
            path: PathCondition::of(m).rank(),
            method: m.method.is_some(),
            headers: m.headers.len(),
            query_params: m.query_params.len(),
        }
    }
}

/// One match of one route: `routes[route]`, its `index`-th match in [`Route::each_match`]'s
/// order (`match` first, then `matches`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatchRef {
    /// The route's index in the policy.
    pub route: usize,
    /// The match's index in the route.
    pub index: usize,
}

/// Every match of `routes`, in the order they are tried: by [`Rank`], most specific first, and
/// in document order among equals. Computed once per policy load.
pub fn order(routes: &[Route]) -> Vec<MatchRef> {
    let mut all: Vec<(Rank, MatchRef)> = routes
        .iter()
        .enumerate()
        .flat_map(|(route, r)| {
            r.each_match()
                .enumerate()
                .map(move |(index, m)| (Rank::of(m), MatchRef { route, index }))
        })
        .collect();
    // Stable: equal ranks keep document order.
    all.sort_by_key(|(rank, _)| Reverse(*rank));
    all.into_iter().map(|(_, at)| at).collect()
}

/// The name a route goes by in metrics, logs and `outriderctl get --routes`: its `name`, or for
/// an unnamed route `:route-<index>` (the `:` keeps it apart from a route named `route-0`).
pub fn route_label(route: &Route, index: usize) -> Cow<'_, str> {
    match &route.name {
        Some(name) => Cow::Borrowed(name),
        None => Cow::Owned(format!(":route-{index}")),
    }
}

/// Why a regular expression was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegexError {
    /// Not RE2 syntax (or a feature RE2 lacks, such as look-around or backreferences).
    #[error("invalid regex: {0}")]
    Syntax(String),
    /// Compiles to more than [`MAX_REGEX_BYTES`].
    #[error("regex too large: it compiles to more than {MAX_REGEX_BYTES} bytes")]
    TooLarge,
}

/// Compiles `pattern` so that it must match a whole value (`^(?:pattern)$`), within
/// [`MAX_REGEX_BYTES`] of program and of lazy-DFA cache: the `regex` crate runs in linear time,
/// and the limits bound what one pattern of a pushed policy can cost each proxy in memory.
pub fn compile_regex(pattern: &str) -> Result<regex::Regex, RegexError> {
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(MAX_REGEX_BYTES)
        .dfa_size_limit(MAX_REGEX_BYTES)
        .build()
        .map_err(|error| match error {
            regex::Error::CompiledTooBig(_) => RegexError::TooLarge,
            // The syntax error's text draws the pattern and a caret over several lines; its
            // last line says what is wrong, which is what a one-line diagnostic can hold.
            other => {
                let text = other.to_string();
                let what = text
                    .lines()
                    .rev()
                    .find_map(|line| line.strip_prefix("error: "))
                    .unwrap_or(text.lines().next().unwrap_or_default());
                RegexError::Syntax(what.to_string())
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(text: &str) -> Vec<Route> {
        crate::load("p.yaml", text).expect("valid").policy.routes
    }

    /// The names of `text`'s routes (one match each) in the order they are tried.
    fn tried(text: &str) -> Vec<String> {
        let routes = routes(text);
        order(&routes)
            .into_iter()
            .map(|at| routes[at.route].name.clone().unwrap_or_default())
            .collect()
    }

    /// Why; the routes as (name, match) in document order; the names in the order tried.
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a [&'a str]);

    #[test]
    fn precedence_follows_gateway_api() {
        let cases: &[Case] = &[
            (
                "exact path over any prefix",
                &[
                    ("prefix", "{ path: { prefix: /a/b/c } }"),
                    ("exact", "{ path: { exact: /a } }"),
                ],
                &["exact", "prefix"],
            ),
            (
                "longer prefix first",
                &[
                    ("short", "{ path: { prefix: /a } }"),
                    ("long", "{ path: { prefix: /a/b } }"),
                    ("none", "{ method: GET, headers: [{ name: x, value: y }] }"),
                ],
                &["long", "short", "none"],
            ),
            (
                "a trailing slash does not count",
                &[
                    ("slash", "{ path: { prefix: /ab/ } }"),
                    ("bare", "{ path: { prefix: /ab } }"),
                ],
                &["slash", "bare"],
            ),
            (
                "regex between exact and prefix",
                &[
                    ("prefix", "{ path: { prefix: /api/v1/users } }"),
                    ("regex", "{ path: { regex: '/api/.*' } }"),
                    ("exact", "{ path: { exact: /api } }"),
                ],
                &["exact", "regex", "prefix"],
            ),
            (
                "the path decides before the method",
                &[
                    ("method", "{ path: { prefix: /a }, method: GET }"),
                    ("longer", "{ path: { prefix: /a/b } }"),
                ],
                &["longer", "method"],
            ),
            (
                "the method decides before headers",
                &[
                    (
                        "headers",
                        "{ headers: [{ name: a, value: '1' }, { name: b, value: '2' }] }",
                    ),
                    ("method", "{ method: POST }"),
                ],
                &["method", "headers"],
            ),
            (
                "more headers first",
                &[
                    ("one", "{ headers: [{ name: a, present: true }] }"),
                    (
                        "two",
                        "{ headers: [{ name: a, present: true }, { name: b, regex: 'x.*' }] }",
                    ),
                    ("zero", "{ path: { prefix: / } }"),
                ],
                &["two", "one", "zero"],
            ),
            (
                "headers decide before query parameters",
                &[
                    (
                        "query",
                        "{ query_params: [{ name: a, value: '1' }, { name: b, value: '2' }] }",
                    ),
                    ("header", "{ headers: [{ name: a, value: '1' }] }"),
                ],
                &["header", "query"],
            ),
            (
                "more query parameters first",
                &[
                    ("none", "{ path_prefix: / }"),
                    ("one", "{ query_params: [{ name: a, present: true }] }"),
                ],
                &["one", "none"],
            ),
            (
                "an authority decides before everything else",
                &[
                    ("exact", "{ path: { exact: /a }, method: GET }"),
                    ("host", "{ authority: svc }"),
                ],
                &["host", "exact"],
            ),
            (
                "document order breaks ties",
                &[
                    (
                        "first",
                        "{ path: { prefix: /a }, headers: [{ name: x, value: '1' }] }",
                    ),
                    (
                        "second",
                        "{ path: { prefix: /a }, headers: [{ name: y, value: '1' }] }",
                    ),
                    ("third", "{ path_prefix: /a/ }"),
                ],
                &["first", "second", "third"],
            ),
            (
                "grpc: service and method is an exact path, a service alone a prefix",
                &[
                    ("service", "{ grpc: { service: pkg.Svc } }"),
                    ("method", "{ grpc: { service: pkg.Svc, method: Get } }"),
                    ("any", "{ headers: [{ name: a, value: b }] }"),
                ],
                &["method", "service", "any"],
            ),
        ];
        for (why, routes, expected) in cases {
            let mut text = String::from("services:\n  s: { endpoints: [127.0.0.1:1] }\nroutes:\n");
            for (name, m) in *routes {
                text.push_str(&format!("  - {{ name: {name}, match: {m}, service: s }}\n"));
            }
            assert_eq!(tried(&text), *expected, "{why}");
        }
    }

    #[test]
    fn every_match_of_a_route_takes_its_own_place() {
        let text = "services:\n  s: { endpoints: [127.0.0.1:1] }\nroutes:
  - name: a
    match: { path_prefix: /a }
    matches: [{ path: { exact: /x } }, { method: GET }]
    service: s
  - name: b
    matches: [{ path: { regex: '/b.*' } }]
    service: s
";
        let routes = routes(text);
        let order: Vec<(usize, usize)> = order(&routes)
            .into_iter()
            .map(|at| (at.route, at.index))
            .collect();
        // exact /x, regex /b.*, prefix /a (1 char), then `method: GET` (prefix `/`, 0 chars).
        assert_eq!(order, [(0, 1), (1, 0), (0, 0), (0, 2)]);
    }

    #[test]
    fn segment_prefixes_match_whole_segments() {
        let cases = [
            ("/foo", "/foo", true),
            ("/foo", "/foo/", true),
            ("/foo", "/foo/bar", true),
            ("/foo", "/foobar", false),
            ("/foo", "/fo", false),
            ("", "/anything", true),
        ];
        for (prefix, path, expected) in cases {
            assert_eq!(
                segment_prefix_matches(prefix, path),
                expected,
                "{prefix} {path}"
            );
        }
    }

    #[test]
    fn regexes_match_whole_values_and_bad_ones_say_why_in_one_line() {
        let re = compile_regex("/v[0-9]+").expect("valid");
        assert!(re.is_match("/v12"));
        assert!(!re.is_match("/v12/x"), "anchored at the end");
        assert!(!re.is_match("x/v1"), "anchored at the start");
        assert!(compile_regex("a|b").expect("valid").is_match("b"));
        assert_eq!(
            compile_regex("(unclosed").err(),
            Some(RegexError::Syntax("unclosed group".into()))
        );
        let lookahead = compile_regex("a(?=b)").expect_err("RE2 has no look-around");
        assert!(!lookahead.to_string().contains('\n'), "{lookahead}");
        assert_eq!(
            compile_regex(r"\w{500}{500}").err(),
            Some(RegexError::TooLarge)
        );
        // What operators write fits well within the limit.
        for common in [
            r"\w+",
            r"/api/v[0-9]+/users/[^/]+",
            r"(?i)bearer .*",
            r"[a-f0-9-]{36}",
        ] {
            compile_regex(common).expect(common);
        }
    }
}
