//! Criterion micro-benchmarks of Outrider's per-request CPU work, without any I/O: policy
//! loading, route matching in a compiled [`Snapshot`], the header rewrites every forwarded
//! request gets, and the per-request work of the resilience policies when none triggers. Run: `cargo bench -p outrider-benches --bench request_path`.

use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use criterion::{BatchSize, Criterion};
use http::header::{self, HeaderMap, HeaderValue};
use outrider_proxy::core::headers;
use outrider_proxy::http::route_match::RouteRequest;
use outrider_proxy::http::snapshot::Snapshot;
use outrider_proxy::telemetry::metrics::Metrics;

/// The example policy shipped with the repository.
const DEMO_POLICY: &str = include_str!("../../deploy/examples/demo.yaml");
/// How many routes (and services) the route-matching policy has.
const ROUTES: usize = 20;

/// A policy with [`ROUTES`] services and one route each, `svc-NN` + `/api/vNN/`, in order.
fn many_routes_policy() -> String {
    let mut yaml = String::from("services:\n");
    for i in 0..ROUTES {
        yaml.push_str(&format!(
            "  svc-{i:02}:\n    endpoints: [127.0.0.1:{}]\n",
            20000 + i
        ));
    }
    yaml.push_str("routes:\n");
    for i in 0..ROUTES {
        yaml.push_str(&format!(
            "  - name: r{i:02}\n    match: {{ authority: svc-{i:02}.default.svc, path_prefix: /api/v{i}/ }}\n    service: svc-{i:02}\n"
        ));
    }
    yaml
}

fn bench_config_load(c: &mut Criterion) {
    c.bench_function("config/load_demo_yaml", |b| {
        b.iter(|| outrider_config::load(black_box("demo.yaml"), black_box(DEMO_POLICY)))
    });
}

fn bench_route(c: &mut Criterion) {
    // Snapshot::build creates connection pools with Tokio timers: give it a runtime context.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a Tokio runtime for building the snapshot");
    let _guard = rt.enter();
    let loaded = outrider_config::load("routes.yaml", &many_routes_policy())
        .expect("the generated 20-route policy is valid");
    let metrics = Metrics::new("bench").expect("metrics register in a fresh registry");
    let snapshot = Snapshot::build(loaded, 1, &metrics, None);
    let last = ROUTES - 1;
    let last_host = format!("svc-{last:02}.default.svc");
    let last_path = format!("/api/v{last}/items/42");

    let get = |host: &'static str, path: &str| {
        let req = http::Request::get(path.to_string())
            .body(())
            .expect("a valid request");
        (host, req)
    };
    let first = get("svc-00.default.svc", "/api/v0/items/42");
    let last_req = http::Request::get(last_path).body(()).expect("request");
    let none = get("svc-99.default.svc", "/api/v0/");
    let mut group = c.benchmark_group("route");
    group.bench_function("first_match", |b| {
        b.iter(|| {
            snapshot
                .route(black_box(&RouteRequest::of(first.0, &first.1)))
                .is_some()
        })
    });
    group.bench_function("last_match_of_20", |b| {
        b.iter(|| {
            snapshot
                .route(black_box(&RouteRequest::of(&last_host, &last_req)))
                .is_some()
        })
    });
    group.bench_function("no_match_of_20", |b| {
        b.iter(|| {
            snapshot
                .route(black_box(&RouteRequest::of(none.0, &none.1)))
                .is_some()
        })
    });
    group.finish();
}

/// How many routes the Gateway-style table has.
const MATCH_ROUTES: usize = 50;

/// [`MATCH_ROUTES`] routes on one authority, one of each kind in turn: an exact path, a
/// segment prefix, a regex, a method with a prefix, a header canary and a query parameter,
/// then a catch-all, the way a service's routes look once it splits traffic by request.
fn gateway_routes_policy() -> String {
    let mut yaml = String::from(
        "services:\n  v1: { endpoints: [127.0.0.1:20001] }\n  v2: { endpoints: [127.0.0.1:20002] }\nroutes:\n",
    );
    for i in 0..MATCH_ROUTES - 1 {
        let m = match i % 6 {
            0 => format!("path: {{ exact: /api/v{i}/health }}"),
            1 => format!("path: {{ prefix: /api/v{i} }}"),
            2 => format!("path: {{ regex: '/api/v{i}/users/[0-9]+' }}"),
            3 => format!("path: {{ prefix: /api/v{i}/orders }}, method: POST"),
            4 => format!("headers: [{{ name: x-canary-{i}, value: 'true' }}]"),
            _ => format!("query_params: [{{ name: variant{i}, value: b }}]"),
        };
        yaml.push_str(&format!(
            "  - {{ name: r{i:02}, service: v2, matches: [{{ authority: shop, {m} }}] }}\n"
        ));
    }
    yaml.push_str("  - { name: default, service: v1, match: { authority: shop } }\n");
    yaml
}

fn bench_route_matches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a Tokio runtime for building the snapshot");
    let _guard = rt.enter();
    let loaded = outrider_config::load("matches.yaml", &gateway_routes_policy())
        .expect("the generated 50-route policy is valid");
    let metrics = Metrics::new("bench").expect("metrics register in a fresh registry");
    let snapshot = Snapshot::build(loaded, 1, &metrics, None);
    let with_headers = |path: &str, extra: Option<(&'static str, &'static str)>| {
        let mut req = http::Request::get(path.to_string());
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
    };
    let cases = [
        ("exact", with_headers("/api/v0/health", None)),
        ("regex", with_headers("/api/v2/users/42", None)),
        (
            "header_canary",
            with_headers("/", Some(("x-canary-46", "true"))),
        ),
        ("query_param", with_headers("/search?q=1&variant47=b", None)),
        ("fall_through_to_default", with_headers("/other", None)),
    ];
    let mut group = c.benchmark_group("route_matches_of_50");
    for (name, req) in &cases {
        let expected = if *name == "fall_through_to_default" {
            "v1"
        } else {
            "v2"
        };
        let target = snapshot
            .route(&RouteRequest::of("shop", req))
            .expect("routed");
        assert_eq!(&*target.upstream.spec.name, expected, "{name}");
        group.bench_function(*name, |b| {
            b.iter(|| {
                snapshot
                    .route(black_box(&RouteRequest::of("shop", req)))
                    .is_some()
            })
        });
    }
    group.finish();
}

/// A typical 10-header HTTP/1.1 request from an app to a service.
fn typical_request_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    let mut set = |name: header::HeaderName, value: &'static str| {
        h.insert(name, HeaderValue::from_static(value));
    };
    set(header::HOST, "payments.default.svc");
    set(header::USER_AGENT, "checkout/2.3.1 (okhttp)");
    set(header::ACCEPT, "application/json");
    set(header::ACCEPT_ENCODING, "gzip, deflate, br");
    set(header::ACCEPT_LANGUAGE, "en-US,en;q=0.9");
    set(header::CONTENT_TYPE, "application/json");
    set(header::CONTENT_LENGTH, "128");
    set(header::AUTHORIZATION, "Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig");
    set(header::CONNECTION, "keep-alive");
    set(
        header::HeaderName::from_static("traceparent"),
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    );
    h
}

fn bench_headers(c: &mut Criterion) {
    let template = typical_request_headers();
    // Made once per caller connection in the proxy; each request appends it.
    let caller = headers::Caller::new(SocketAddr::from((Ipv4Addr::new(10, 1, 2, 3), 40000)));
    let mut group = c.benchmark_group("headers");
    group.bench_function("clone_10_headers_baseline", |b| {
        b.iter(|| black_box(&template).clone())
    });
    group.bench_function("strip_forwarded_request_id_10_headers", |b| {
        b.iter_batched_ref(
            || template.clone(),
            |h| {
                headers::strip_hop_by_hop(h, false);
                headers::append_forwarded(h, &caller);
                headers::ensure_request_id(h);
            },
            BatchSize::SmallInput,
        )
    });
    group.bench_function("strip_hop_by_hop", |b| {
        b.iter_batched_ref(
            || template.clone(),
            |h| headers::strip_hop_by_hop(h, false),
            BatchSize::SmallInput,
        )
    });
    group.bench_function("append_forwarded", |b| {
        b.iter_batched_ref(
            || template.clone(),
            |h| headers::append_forwarded(h, &caller),
            BatchSize::SmallInput,
        )
    });
    group.bench_function("ensure_request_id", |b| {
        b.iter_batched_ref(
            || template.clone(),
            headers::ensure_request_id,
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

/// One service with every resilience policy on and limits nothing here reaches.
const ALL_POLICIES: &str = "services:
  bench:
    endpoints: [127.0.0.1:20001, 127.0.0.1:20002, 127.0.0.1:20003]
    rate_limit: { requests_per_second: 1000000, burst: 1000000 }
    circuit_breaker: { consecutive_failures: 1000, failure_rate: { threshold: 0.9, min_requests: 1000, window: 10s }, max_concurrent_requests: 100000 }
    outlier_detection: { consecutive_failures: 1000 }
  plain:
    endpoints: [127.0.0.1:20001, 127.0.0.1:20002, 127.0.0.1:20003]
routes:
  - match: { authority: bench }
    service: bench
    fault: { delay: { duration: 1s, percent: 0 }, abort: { status: 503, percent: 0 } }
  - match: { authority: plain }
    service: plain
";

fn bench_policies(c: &mut Criterion) {
    use outrider_proxy::policy::breaker::Outcome;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a Tokio runtime for building the snapshot");
    let _guard = rt.enter();
    let loaded = outrider_config::load("policies.yaml", ALL_POLICIES).expect("valid policy");
    let metrics = Metrics::new("bench").expect("metrics register in a fresh registry");
    let snapshot = Snapshot::build(loaded, 1, &metrics, None);
    let root = http::Request::get("/").body(()).expect("request");
    let target = snapshot
        .route(&RouteRequest::of("bench", &root))
        .expect("bench route");
    let plain = snapshot
        .route(&RouteRequest::of("plain", &root))
        .expect("plain route");
    let limit = target.policy.limit.as_ref().expect("rate limit");
    let breaker = target.policy.breaker.as_ref().expect("breaker");
    let fault = target.policy.fault.as_ref().expect("fault");

    let mut group = c.benchmark_group("policies");
    group.bench_function("rate_limit_check", |b| b.iter(|| limit.limiter.check()));
    group.bench_function("breaker_acquire_record_success", |b| {
        b.iter(|| {
            if let Ok(permit) = breaker.try_acquire() {
                permit.record(Outcome::Success);
            }
        })
    });
    group.bench_function("fault_decide_at_0_percent", |b| b.iter(|| fault.decide()));
    group.bench_function("pick_round_robin_baseline", |b| {
        b.iter(|| plain.upstream.pick(None).is_ok())
    });
    group.bench_function("pick_with_outlier_detection_and_report", |b| {
        b.iter(|| {
            if let Ok(endpoint) = target.upstream.pick(None) {
                target.upstream.report(&endpoint, Outcome::Success);
            }
        })
    });
    group.bench_function("all_policies_per_request", |b| {
        b.iter(|| {
            let _ = limit.limiter.check();
            let _ = fault.decide();
            if let Ok(permit) = breaker.try_acquire() {
                if let Ok(endpoint) = target.upstream.pick(None) {
                    target.upstream.report(&endpoint, Outcome::Success);
                }
                permit.record(Outcome::Success);
            }
        })
    });
    group.finish();
}

fn config() -> Criterion {
    // Short defaults keep a full run near a minute; `--quick` shortens it further.
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

fn main() {
    // What `criterion_group!`/`criterion_main!` expand to, written out so every item is
    // private and documented.
    let mut c = config().configure_from_args();
    bench_config_load(&mut c);
    bench_route(&mut c);
    bench_route_matches(&mut c);
    bench_headers(&mut c);
    bench_policies(&mut c);
    c.final_summary();
}
