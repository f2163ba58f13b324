//! Criterion benchmark of route selection, the proxy's own code (`Snapshot::route` over a
//! compiled policy), with 10 and 1,000 routes of every match kind (exact, segment prefix,
//! regex paths, methods, header values and regexes, query parameters). The goal (issue 21):
//! under 1 µs per request at 1,000 routes. Run:
//! `cargo bench -p outrider-benches --bench route_select`.

use std::hint::black_box;
use std::time::Duration;

use criterion::Criterion;
use outrider_proxy::http::route_match::RouteRequest;
use outrider_proxy::http::snapshot::Snapshot;
use outrider_proxy::telemetry::metrics::Metrics;

/// Routes per host: a 1,000-route policy spans 100 hosts, as a mesh's outbound table does
/// (each called service brings its few routes).
const PER_HOST: usize = 10;

/// `routes` routes, [`PER_HOST`] per host `hN.svc`, each of one kind in turn: an exact path,
/// a segment prefix, a path regex, a method with a prefix, a header value, a header regex, a
/// query parameter; then each host's last route takes the rest of its requests.
fn policy(routes: usize) -> String {
    let mut yaml = String::from(
        "services:\n  v1: { endpoints: [127.0.0.1:20001] }\n  v2: { endpoints: [127.0.0.1:20002] }\nroutes:\n",
    );
    for i in 0..routes {
        let host = i / PER_HOST;
        let m = if i % PER_HOST == PER_HOST - 1 {
            String::new()
        } else {
            match i % 7 {
                0 => format!(", path: {{ exact: /api/v{i}/health }}"),
                1 => format!(", path: {{ prefix: /api/v{i} }}"),
                2 => format!(", path: {{ regex: '/api/v{i}/users/[0-9]+' }}"),
                3 => format!(", path: {{ prefix: /api/v{i}/orders }}, method: POST"),
                4 => format!(", headers: [{{ name: x-canary-{i}, value: 'true' }}]"),
                5 => format!(", headers: [{{ name: x-user, regex: 'u-{i}-[0-9]+' }}]"),
                _ => format!(", query_params: [{{ name: variant{i}, value: b }}]"),
            }
        };
        let service = if m.is_empty() { "v1" } else { "v2" };
        yaml.push_str(&format!(
            "  - {{ name: r{i}, service: {service}, match: {{ authority: h{host}.svc{m} }} }}\n"
        ));
    }
    yaml
}

/// A GET of `path` to `host` with a browser-like set of headers and `extra`.
fn request(path: &str, extra: Option<(&str, &str)>) -> http::Request<()> {
    let mut req = http::Request::get(path);
    for (name, value) in [
        ("user-agent", "app/1.0"),
        ("accept", "application/json"),
        ("x-request-id", "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"),
    ] {
        req = req.header(name, value);
    }
    if let Some((name, value)) = extra {
        req = req.header(name, value);
    }
    req.body(()).expect("a valid request")
}

fn bench_routes(c: &mut Criterion, routes: usize) {
    // Snapshot::build creates connection pools with Tokio timers: give it a runtime context.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a Tokio runtime for building the snapshot");
    let _guard = rt.enter();
    let loaded =
        outrider_config::load("routes.yaml", &policy(routes)).expect("the policy is valid");
    let metrics = Metrics::new("bench").expect("metrics register in a fresh registry");
    let snapshot = Snapshot::build(loaded, 1, &metrics, None);
    // The last host's routes: i from `base` to `base + 9`.
    let base = routes - PER_HOST;
    let host = format!("h{}.svc", base / PER_HOST);
    // The last host's route of `kind` (see [`policy`]).
    let of_kind = |kind: usize| {
        (base..routes - 1)
            .find(|i| i % 7 == kind)
            .expect("each kind on every host")
    };
    let user = format!("u-{}-7", of_kind(5));
    let cases: Vec<(&str, String, http::Request<()>)> = vec![
        // A regex path on the last host (tried after every exact path of its host).
        (
            "regex_path",
            host.clone(),
            request(&format!("/api/v{}/users/42", of_kind(2)), None),
        ),
        // A header regex: no path, so among the last of its host's matches.
        (
            "header_regex",
            host.clone(),
            request("/other", Some(("x-user", &user))),
        ),
        // No route of its host takes it: the host's catch-all.
        ("catch_all", host.clone(), request("/nothing/here", None)),
        // A host no route names: every route is passed over.
        ("no_route", "unknown.svc".to_string(), request("/", None)),
    ];
    let mut group = c.benchmark_group(format!("route_select/{routes}"));
    for (name, host, req) in &cases {
        let view = RouteRequest::of(host, req);
        assert!(
            snapshot.route(&view).is_some() == (*name != "no_route"),
            "{name}: the policy routes it as intended"
        );
        group.bench_function(*name, |b| {
            b.iter(|| snapshot.route(black_box(&view)).is_some())
        });
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

fn main() {
    // What `criterion_group!`/`criterion_main!` expand to, written out so every item is
    // private and documented.
    let mut c = config().configure_from_args();
    for routes in [10, 1000] {
        bench_routes(&mut c, routes);
    }
    c.final_summary();
}
