//! The proxy's connection pools to upstream endpoints: HTTP/1.1 connections are reused one
//! exchange at a time and never grow past the concurrency, a connection the upstream closed
//! while idle costs no request, a burst to an HTTP/2 endpoint opens one connection, and an
//! HTTP/2 connection going away (GOAWAY) costs no request either.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use outrider_e2e::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn policy(addr: SocketAddr, protocol: &str) -> String {
    format!(
        "services:\n  svc: {{ endpoints: [{addr}], protocol: {protocol} }}\nroutes:\n  - name: svc\n    match: {{ authority: svc }}\n    service: svc\n"
    )
}

fn opened(addr: SocketAddr) -> String {
    format!("outrider_upstream_connections_opened_total{{endpoint=\"{addr}\",service=\"svc\"}}")
}

/// An HTTP/1.1 upstream that answers one request per connection and then closes it, without
/// saying `Connection: close`: each pooled connection is dead by the time it is reused.
async fn one_shot_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                // Closed without a word, as an upstream's idle timeout does.
            });
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn a_connection_the_upstream_closed_while_idle_costs_no_request() {
    let (addr, accepted) = one_shot_upstream().await;
    let proxy = start_proxy(&policy(addr, "http1"));
    for i in 0..40 {
        let reply = get(proxy.outbound, "svc", "/").await;
        assert_eq!(
            (reply.status, reply.header("x-outrider-error")),
            (200, None),
            "request {i}"
        );
        // Right after a response and after a pause: the closed connection is either still
        // being noticed or long known dead.
        if i % 2 == 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        40,
        "one connection per request"
    );
    assert_eq!(proxy.metric(&opened(addr)).await, 40.0);
}

#[tokio::test]
async fn http1_connections_are_reused_and_never_exceed_the_concurrency() {
    let upstream = Upstream::start(Proto::Http1, |_req| async {
        tokio::time::sleep(Duration::from_millis(5)).await;
        Response::new(full("ok"))
    })
    .await;
    let proxy = start_proxy(&policy(upstream.addr, "http1"));
    let outbound = proxy.outbound;
    let clients: Vec<_> = (0..8)
        .map(|_| {
            tokio::spawn(async move {
                for _ in 0..25 {
                    assert_eq!(get(outbound, "svc", "/").await.status, 200);
                }
            })
        })
        .collect();
    for client in clients {
        client.await.expect("client task");
    }
    assert_eq!(upstream.hits(), 200);
    let opened = proxy.metric(&opened(upstream.addr)).await;
    assert!(
        (1.0..=8.0).contains(&opened),
        "8 concurrent callers, 200 requests: {opened} connections opened"
    );
    // Kept for the next requests, not closed after each.
    let active = proxy
        .metric(&format!(
            "outrider_upstream_connections_active{{endpoint=\"{}\",service=\"svc\"}}",
            upstream.addr
        ))
        .await;
    assert_eq!(active, opened);
}

#[tokio::test]
async fn a_burst_to_an_http2_endpoint_opens_one_connection() {
    let upstream = Upstream::start(Proto::Http2, |_req| async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        Response::new(full("ok"))
    })
    .await;
    let proxy = start_proxy(&policy(upstream.addr, "http2"));
    let outbound = proxy.outbound;
    // All at once on a cold pool: one opens the connection, the others wait for it.
    let burst: Vec<_> = (0..32)
        .map(|_| tokio::spawn(async move { get(outbound, "svc", "/").await.status }))
        .collect();
    for request in burst {
        assert_eq!(request.await.expect("request task"), 200);
    }
    assert_eq!(upstream.hits(), 32);
    assert_eq!(proxy.metric(&opened(upstream.addr)).await, 1.0);
}

#[tokio::test]
async fn an_answer_before_the_whole_upload_leaves_the_pool_working() {
    // The upstream answers at once, without reading the body, and keeps the connection.
    let upstream = Upstream::start(Proto::Http1, |req: Request<_>| async move {
        drop(req);
        Response::new(full("early"))
    })
    .await;
    let proxy = start_proxy(&policy(upstream.addr, "http1"));
    let client = http1_client();
    let (sender, body) = channel_body();
    let upload = Request::post(format!("http://{}/upload", proxy.outbound))
        .header("host", "svc")
        .body(body)
        .expect("request");
    sender
        .send(bytes::Bytes::from_static(b"part of a body that never ends"))
        .await
        .expect("first chunk");
    let early = tokio::time::timeout(Duration::from_secs(5), send(&client, upload))
        .await
        .expect("the early answer arrives while the upload is open");
    assert_eq!(early.status, 200);
    // The next requests do not wait behind the unfinished upload.
    for _ in 0..5 {
        let reply = tokio::time::timeout(Duration::from_secs(5), get(proxy.outbound, "svc", "/"))
            .await
            .expect("not stuck behind the open upload");
        assert_eq!(reply.status, 200);
    }
    drop(sender);
}

/// The rounds of the requests each connection served, in the order connections were accepted.
type ServedRounds = Arc<std::sync::Mutex<Vec<Vec<usize>>>>;

/// An h2c upstream that sends GOAWAY on each connection after its first request: every
/// request after the first finds the proxy's shared connection going away. A request's path
/// is its round number (`/3`), recorded against the connection that served it.
async fn goaway_after_one_upstream() -> (SocketAddr, ServedRounds) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let served_rounds = ServedRounds::default();
    let record = Arc::clone(&served_rounds);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let connection_index = {
                let mut rounds = record.lock().expect("served rounds");
                rounds.push(Vec::new());
                rounds.len() - 1
            };
            let record = Arc::clone(&record);
            tokio::spawn(async move {
                let (served_tx, mut served_rx) = tokio::sync::mpsc::channel::<()>(1);
                let service = hyper::service::service_fn(move |req: Request<_>| {
                    let round = req.uri().path()[1..].parse().expect("a round number");
                    record.lock().expect("served rounds")[connection_index].push(round);
                    let served = served_tx.clone();
                    async move {
                        let _ = served.try_send(());
                        Ok::<_, std::convert::Infallible>(Response::new(full("ok")))
                    }
                });
                let connection =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                let mut connection = std::pin::pin!(connection);
                tokio::select! {
                    _ = connection.as_mut() => return,
                    _ = served_rx.recv() => connection.as_mut().graceful_shutdown(),
                }
                let _ = connection.await;
            });
        }
    });
    (addr, served_rounds)
}

#[tokio::test]
async fn an_http2_connection_going_away_costs_no_request() {
    let (addr, served_rounds) = goaway_after_one_upstream().await;
    let proxy = start_proxy(&policy(addr, "http2"));
    // Bursts, so requests also arrive while a connection's GOAWAY is on its way.
    let outbound = proxy.outbound;
    for round in 0..5 {
        let burst: Vec<_> = (0..4)
            .map(|_| {
                tokio::spawn(async move {
                    let reply = get(outbound, "svc", &format!("/{round}")).await;
                    (
                        reply.status,
                        reply.header("x-outrider-error").map(str::to_string),
                    )
                })
            })
            .collect();
        for request in burst {
            let answer = request.await.expect("request task");
            assert_eq!(answer, (200, None), "round {round}");
        }
    }
    // Connections were retired and replaced along the way, though not one per round: a
    // connection's GOAWAY leaves with its first answer, so requests of the next round may still
    // reach it before the GOAWAY reaches the proxy, but it arrives ahead of their answers, and
    // no request of a later round goes there. Five rounds thus take at least three connections.
    let served_rounds = served_rounds.lock().expect("served rounds").clone();
    for rounds in &served_rounds {
        let (first, last) = (rounds.iter().min(), rounds.iter().max());
        assert!(
            matches!((first, last), (Some(first), Some(last)) if last - first <= 1),
            "a connection served rounds {rounds:?}; all: {served_rounds:?}"
        );
    }
    let accepted = served_rounds.len();
    assert!(
        accepted >= 3,
        "only {accepted} connections for 20 requests: {served_rounds:?}"
    );
    assert_eq!(proxy.metric(&opened(addr)).await, accepted as f64);
}
