//! What the proxy answers when it cannot deliver, and what it refuses to forward: each error
//! status carries its reason header; malformed requests get 400/431 and never reach the
//! upstream.

#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::time::Duration;

use outrider_e2e::*;

fn single(addr: impl std::fmt::Display, extra: &str) -> String {
    format!(
        "services:\n  svc: {{ endpoints: [{addr}]{extra} }}\nroutes:\n  - match: {{ authority: svc }}\n    service: svc\n"
    )
}

/// A port on 127.0.0.1 where nothing listens.
fn closed_port() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connection_is_502_with_reason() {
    let addr = closed_port();
    let proxy = start_proxy(&single(addr, ""));
    let reply = get(proxy.outbound, "svc", "/").await;
    assert_eq!(reply.status, 502);
    assert_eq!(
        reply.header("x-outrider-error"),
        Some(format!("connect refused to {addr}").as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_endpoints_is_503_with_reason() {
    let proxy = start_proxy(&single("", ""));
    let reply = get(proxy.outbound, "svc", "/").await;
    assert_eq!(reply.status, 503);
    assert_eq!(
        reply.header("x-outrider-error"),
        Some("no endpoints for svc")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_timeout_is_504_with_reason() {
    // A listener that never accepts, with its backlog full: the kernel drops further SYNs, so
    // a connect hangs exactly as it does to a black-holed host.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    loop {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(s) => fillers.push(s),
            Err(_) => break,
        }
        assert!(fillers.len() < 64, "backlog never filled");
    }
    let proxy = start_proxy(&single(addr, ", timeouts: { connect: 300ms }"));
    let started = std::time::Instant::now();
    let reply = get(proxy.outbound, "svc", "/").await;
    assert_eq!(reply.status, 504);
    assert_eq!(
        reply.header("x-outrider-error"),
        Some(format!("connect timeout to {addr} after 300ms").as_str())
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    drop(socket);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_closing_without_response_is_502() {
    use tokio::io::AsyncReadExt;
    // Reads the request head, then closes the connection without answering.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            drop(s);
        }
    });
    let proxy = start_proxy(&single(addr, ""));
    let reply = get(proxy.outbound, "svc", "/").await;
    assert_eq!(reply.status, 502);
    assert_eq!(
        reply.header("x-outrider-error"),
        Some(format!("upstream {addr} reset the connection").as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_rejected_and_never_forwarded() {
    let server = Upstream::echo(Proto::Http1, "up").await;
    let proxy = start_proxy(&single(server.addr, ""));
    let cases: &[(&str, &[u8], &str)] = &[
        ("garbage request line", b"GARBAGE\r\n\r\n", "HTTP/1.1 400"),
        ("missing host", b"GET / HTTP/1.1\r\n\r\n", "HTTP/1.1 400"),
        (
            "two hosts",
            b"GET / HTTP/1.1\r\nHost: svc\r\nHost: svc\r\n\r\n",
            "HTTP/1.1 400",
        ),
        (
            "space in header name",
            b"GET / HTTP/1.1\r\nHost: svc\r\nBad Header: x\r\n\r\n",
            "HTTP/1.1 400",
        ),
        (
            "non-numeric content-length",
            b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: abc\r\n\r\n",
            "HTTP/1.1 400",
        ),
        (
            "conflicting content-lengths",
            b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
            "HTTP/1.1 400",
        ),
        (
            "bad chunk size",
            b"POST / HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
            "",
        ),
        (
            "CONNECT tunnel",
            b"CONNECT svc:443 HTTP/1.1\r\nHost: svc:443\r\n\r\n",
            "HTTP/1.1 400",
        ),
    ];
    for (name, bytes, expected) in cases {
        let answer = raw_exchange(proxy.outbound, bytes, Duration::from_secs(3)).await;
        if expected.is_empty() {
            // A broken body after a valid head may reach the upstream as a head, but its body
            // never completes: the upstream must not answer 200 to it.
            assert!(!answer.starts_with("HTTP/1.1 200"), "{name}: {answer}");
        } else {
            assert!(answer.starts_with(expected), "{name}: got {answer:?}");
        }
    }
    let oversized = format!(
        "GET / HTTP/1.1\r\nHost: svc\r\nX-Big: {}\r\n\r\n",
        "a".repeat(80 * 1024)
    );
    let answer = raw_exchange(proxy.outbound, oversized.as_bytes(), Duration::from_secs(3)).await;
    assert!(
        answer.starts_with("HTTP/1.1 431"),
        "oversized headers: {answer:?}"
    );
    // Only the bad-chunk case has a valid head; every other request stopped at the proxy.
    assert!(
        server.hits() <= 1,
        "upstream saw {} requests",
        server.hits()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_chunked_cannot_smuggle() {
    let server = Upstream::echo(Proto::Http1, "up").await;
    let proxy = start_proxy(&single(server.addr, ""));
    // RFC 9112 §6.3: chunked framing wins, Content-Length is dropped, and the connection is
    // closed after the response, so the trailing bytes can never become a second request.
    let answer = raw_exchange(
        proxy.outbound,
        b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: svc\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
    assert!(answer.contains("\"body_len\":3"), "{answer}");
    assert!(
        !answer.contains("content-length\":"),
        "content-length forwarded: {answer}"
    );
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer}");
    assert_eq!(server.hits(), 1);
}
