//! The `request_mirror` route filter through the real proxy binary against real upstreams on
//! 127.0.0.1: the mirror gets every request at 100% (and about half at 50%) with the same
//! headers and body under its own Host, while the primary fails with 503 or answers slowly; the
//! caller's responses are the primary's, and a mirror that stalls or is unreachable adds no
//! latency; bodies over the bound are not mirrored, and each outcome is counted.

#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use outrider_e2e::*;
use tokio::time::timeout;

/// Bound on every single await of a test.
const STEP: Duration = Duration::from_secs(10);

/// What the mirror upstream saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    host: String,
    tag: String,
    body: usize,
}

/// A mirror upstream that records each request it gets, then answers after `delay`.
async fn recording_mirror(delay: Duration) -> (Upstream, Arc<Mutex<Vec<Seen>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    let server = Upstream::start(Proto::Http1, move |req: Request<hyper::body::Incoming>| {
        let log = Arc::clone(&log);
        async move {
            let header = |name: &str| {
                req.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string()
            };
            let (host, tag) = (header("host"), header("x-tag"));
            let body = req.into_body().collect().await.map(|b| b.to_bytes().len());
            log.lock().unwrap().push(Seen {
                host,
                tag,
                body: body.unwrap_or(0),
            });
            tokio::time::sleep(delay).await;
            Response::new(full("mirror's answer"))
        }
    })
    .await;
    (server, seen)
}

/// A primary answering `status` after `delay`, reading the whole body first.
async fn primary(status: u16, delay: Duration) -> Upstream {
    Upstream::start(
        Proto::Http1,
        move |req: Request<hyper::body::Incoming>| async move {
            let len = req.into_body().collect().await.map(|b| b.to_bytes().len());
            tokio::time::sleep(delay).await;
            let mut response = Response::new(full(format!("primary read {}", len.unwrap_or(0))));
            *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
            response
        },
    )
    .await
}

fn policy(primary: &Upstream, mirror: &str, filter: &str) -> String {
    format!(
        "services:
  app: {{ endpoints: [{}] }}
  shadow: {{ endpoints: [{mirror}] }}
routes:
  - name: shop
    match: {{ authority: shop }}
    service: app
    filters:
      - request_mirror: {{ service: shadow, {filter} }}
",
        primary.addr
    )
}

async fn post(proxy: &Proxy, tag: &str, body: TestBody) -> Reply {
    let req = Request::post(format!("http://{}/orders", proxy.outbound))
        .header("host", "shop")
        .header("x-tag", tag)
        .body(body)
        .unwrap();
    timeout(STEP, send(&http1_client(), req)).await.unwrap()
}

fn mirror_metric(result: &str) -> String {
    format!(
        "outrider_mirror_requests_total{{result=\"{result}\",route=\"shop\",service=\"shadow\"}}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_copied_while_the_primary_fails_and_the_caller_gets_the_primarys_answer() {
    const N: usize = 20;
    let app = primary(503, Duration::from_millis(20)).await;
    let (mirror, seen) = recording_mirror(Duration::ZERO).await;
    let proxy = start_proxy(&policy(&app, &mirror.addr.to_string(), "percent: 100"));
    for i in 0..N {
        let reply = post(&proxy, &format!("r{i}"), full(vec![b'x'; 100])).await;
        assert_eq!(reply.status, 503);
        assert_eq!(&reply.body[..], b"primary read 100");
    }
    assert!(eventually(STEP, || seen.lock().unwrap().len() == N).await);
    let seen = seen.lock().unwrap().clone();
    for (i, copy) in seen.iter().enumerate() {
        // The mirror service's name as Host; the caller's headers and body as they were.
        assert_eq!(copy.host, "shadow", "{copy:?}");
        assert_eq!(copy.body, 100, "{copy:?}");
        assert!(seen.iter().any(|c| c.tag == format!("r{i}")), "r{i} copied");
    }
    assert!(eventually(STEP, || mirror.hits() == N).await);
    assert_eq!(proxy.metric(&mirror_metric("sent")).await, N as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_the_requests_are_copied_at_fifty_percent_and_none_at_zero() {
    const N: usize = 400;
    let app = primary(200, Duration::ZERO).await;
    let (mirror, _) = recording_mirror(Duration::ZERO).await;
    let proxy = start_proxy(&policy(&app, &mirror.addr.to_string(), "percent: 50"));
    for i in 0..N {
        let reply = post(&proxy, &format!("r{i}"), empty()).await;
        assert_eq!(reply.status, 200);
    }
    // Every copy was started before its primary answered; wait for them to be answered.
    let deadline = Instant::now() + STEP;
    while proxy.metric(&mirror_metric("sent")).await != mirror.hits() as f64 {
        assert!(Instant::now() < deadline, "mirror hits never settled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // 200 expected, binomial sd 10: 140..=260 is 6 sd.
    let copied = mirror.hits();
    assert!((140..=260).contains(&copied), "{copied} of {N} copied");

    let (none, _) = recording_mirror(Duration::ZERO).await;
    let proxy = start_proxy(&policy(&app, &none.addr.to_string(), "percent: 0"));
    for i in 0..50 {
        assert_eq!(post(&proxy, &format!("z{i}"), empty()).await.status, 200);
    }
    assert_eq!(none.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_or_unreachable_mirror_adds_no_latency_and_its_copies_are_bounded() {
    const N: usize = 20;
    let app = primary(200, Duration::ZERO).await;
    // The mirror holds every copy 5 s before answering; at most 4 copies in flight, each
    // given 1 s.
    let (stalled, _) = recording_mirror(Duration::from_secs(5)).await;
    let filter = "percent: 100, timeout: 1s, max_in_flight: 4";
    let proxy = start_proxy(&policy(&app, &stalled.addr.to_string(), filter));
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for i in 0..N {
        let one = Instant::now();
        let reply = post(&proxy, &format!("s{i}"), full(vec![b'y'; 10])).await;
        slowest = slowest.max(one.elapsed());
        assert_eq!(reply.status, 200);
    }
    let all = started.elapsed();
    eprintln!("{N} requests beside a stalled mirror: {all:?}, slowest {slowest:?}");
    // Each request would take 5 s if it waited for its copy; all of them take well under 1.
    assert!(slowest < Duration::from_millis(500), "{slowest:?}");
    assert!(all < Duration::from_secs(2), "{all:?}");
    // The first 4 copies are in flight until their 1 s timeout, the next ones overflow.
    let overflow = proxy.metric(&mirror_metric("overflow")).await;
    assert!(overflow >= (N - 8) as f64, "{overflow} overflowed");
    let deadline = Instant::now() + STEP;
    loop {
        let timed_out = proxy.metric(&mirror_metric("timeout")).await;
        if timed_out + overflow == N as f64 {
            assert!(timed_out >= 4.0, "{timed_out}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{timed_out} timed out, {overflow} overflowed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A mirror nobody listens on: its copies fail, the caller never notices.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let proxy = start_proxy(&policy(&app, &dead_addr.to_string(), "percent: 100"));
    let started = Instant::now();
    for i in 0..N {
        assert_eq!(post(&proxy, &format!("d{i}"), empty()).await.status, 200);
    }
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(wait_metric(&proxy, &mirror_metric("failed"), N as f64).await);
}

/// Waits until `series` reads `value`.
async fn wait_metric(proxy: &Proxy, series: &str, value: f64) -> bool {
    let deadline = Instant::now() + STEP;
    loop {
        if proxy.metric(series).await == value {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_bound_are_not_mirrored_and_are_counted() {
    let app = primary(200, Duration::ZERO).await;
    let (mirror, seen) = recording_mirror(Duration::ZERO).await;
    let filter = "percent: 100, body_limit: 1KiB";
    let proxy = start_proxy(&policy(&app, &mirror.addr.to_string(), filter));
    // Within the bound: copied whole, declared (Content-Length) or streamed (chunked).
    let reply = post(&proxy, "small", full(vec![b'a'; 1024])).await;
    assert_eq!(&reply.body[..], b"primary read 1024");
    let (tx, body) = channel_body();
    let sending = tokio::spawn(async move {
        for _ in 0..4 {
            tx.send(Bytes::from(vec![b'b'; 200])).await.unwrap();
        }
    });
    let reply = post(&proxy, "small-chunked", body).await;
    sending.await.unwrap();
    assert_eq!(&reply.body[..], b"primary read 800");
    // Over it: the primary gets the whole body, the mirror nothing.
    let reply = post(&proxy, "large", full(vec![b'c'; 4096])).await;
    assert_eq!(&reply.body[..], b"primary read 4096");
    let (tx, body) = channel_body();
    let sending = tokio::spawn(async move {
        for _ in 0..8 {
            tx.send(Bytes::from(vec![b'd'; 512])).await.unwrap();
        }
    });
    let reply = post(&proxy, "large-chunked", body).await;
    sending.await.unwrap();
    assert_eq!(&reply.body[..], b"primary read 4096");

    assert!(wait_metric(&proxy, &mirror_metric("skipped_body"), 2.0).await);
    assert!(wait_metric(&proxy, &mirror_metric("sent"), 2.0).await);
    let seen = seen.lock().unwrap().clone();
    let mut copies: Vec<(String, usize)> = seen.into_iter().map(|s| (s.tag, s.body)).collect();
    copies.sort();
    assert_eq!(
        copies,
        [
            ("small".to_string(), 1024),
            ("small-chunked".to_string(), 800)
        ]
    );
}
