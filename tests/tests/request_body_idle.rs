//! A caller that goes silent in the middle of its request body is not held forever: after
//! `timeouts.request_body_idle` it gets 408 (or, once the response has started, its exchange is
//! cut), and the upstream's request is reset, never completed with a truncated body. A caller
//! that is slow but never silent that long is not cut.

#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use outrider_e2e::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// The declared body: far more than will ever be sent.
const DECLARED: &str = "100000000";
/// What the caller sends of it before going silent.
const SENT: usize = 1024;
/// How long after the silence began the caller must have its answer: the limit is 1 s.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

fn policy(addr: SocketAddr, protocol: &str) -> String {
    format!(
        "services:\n  up: {{ endpoints: [{addr}], protocol: {protocol}, timeouts: {{ request_body_idle: 1s }} }}\nroutes:\n  - match: {{ authority: up }}\n    service: up\n"
    )
}

/// What one connection to a [`RawUpstream`] carried, and how it ended.
#[derive(Debug)]
struct Received {
    bytes: Vec<u8>,
    /// `None`: closed (EOF); else the error that ended it (a reset).
    error: Option<std::io::ErrorKind>,
}

impl Received {
    /// The request head and the number of body bytes after it.
    fn head_and_body(&self) -> (String, usize) {
        let end = self
            .bytes
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a complete request head")
            + 4;
        (
            String::from_utf8_lossy(&self.bytes[..end]).to_ascii_lowercase(),
            self.bytes.len() - end,
        )
    }
}

/// An upstream that is a bare TCP listener, so the test sees exactly what arrived: it reads
/// each connection to its end and reports it. With `reply`, it writes those bytes as soon as
/// a request head is in (an upstream that answers before reading the body).
struct RawUpstream {
    addr: SocketAddr,
    ended: mpsc::UnboundedReceiver<Received>,
}

impl RawUpstream {
    async fn start(reply: Option<&'static [u8]>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, ended) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut bytes = Vec::new();
                    let mut buf = [0u8; 16 * 1024];
                    let mut replied = false;
                    let error = loop {
                        match stream.read(&mut buf).await {
                            Ok(0) => break None,
                            Ok(n) => bytes.extend_from_slice(&buf[..n]),
                            Err(e) => break Some(e.kind()),
                        }
                        if let Some(reply) = reply.filter(|_| !replied) {
                            if bytes.windows(4).any(|w| w == b"\r\n\r\n") {
                                replied = true;
                                stream.write_all(reply).await.unwrap();
                            }
                        }
                    };
                    let _ = tx.send(Received { bytes, error });
                });
            }
        });
        Self { addr, ended }
    }

    /// The next connection to end, waited for at most `within`.
    async fn next_ended(&mut self, within: Duration) -> Received {
        tokio::time::timeout(within, self.ended.recv())
            .await
            .expect("the upstream connection was still open")
            .unwrap()
    }
}

/// Sends a head declaring `declared` bytes and `SENT` of them to `addr`, then nothing; returns
/// everything read until the proxy closes the connection (or 10 s pass) and when that was.
async fn stalled_upload(addr: SocketAddr, host: &str, declared: &str) -> (String, Duration) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head =
        format!("POST /upload HTTP/1.1\r\nhost: {host}\r\ncontent-length: {declared}\r\n\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&[b'x'; SENT]).await.unwrap();
    let silent_since = Instant::now();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    (
        String::from_utf8_lossy(&out).into_owned(),
        silent_since.elapsed(),
    )
}

/// The upstream got the head declaring `declared` bytes and exactly what the caller sent of
/// the body, then its connection ended: the request was never completed.
fn assert_cut_short(received: &Received, declared: &str) {
    let (head, body) = received.head_and_body();
    eprintln!(
        "upstream connection ended by {:?}",
        received.error.unwrap_or(std::io::ErrorKind::UnexpectedEof)
    );
    assert!(head.starts_with("post /upload http/1.1\r\n"), "{head}");
    assert!(
        head.contains(&format!("content-length: {declared}\r\n")),
        "{head}"
    );
    assert_eq!(body, SENT, "body bytes the upstream received");
}

async fn assert_stalled_upload_is_408(
    proxy_addr: SocketAddr,
    upstream: &mut RawUpstream,
    declared: &str,
) {
    let (answer, after) = stalled_upload(proxy_addr, "up", declared).await;
    assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
    let lower = answer.to_ascii_lowercase();
    assert!(
        lower.contains("\r\nx-outrider-error: request body idle timeout after 1s\r\n"),
        "{answer}"
    );
    assert!(lower.contains("\r\nconnection: close\r\n"), "{answer}");
    assert!(
        after >= Duration::from_secs(1) && after < ANSWER_WITHIN,
        "answered and closed {after:?} into the silence"
    );
    // By the time the caller has its answer the upstream request has been reset.
    let received = upstream.next_ended(Duration::from_secs(2)).await;
    assert_cut_short(&received, declared);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_upload_is_answered_408_and_the_upstream_request_reset() {
    let mut upstream = RawUpstream::start(None).await;
    let proxy = start_proxy(&policy(upstream.addr, "http1"));
    assert_stalled_upload_is_408(proxy.outbound, &mut upstream, DECLARED).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_upload_is_not_retried() {
    // Retries on resets, POST allowed, and a body small enough to replay: only knowing that
    // the caller stalled keeps the proxy from sending it again.
    let mut upstream = RawUpstream::start(None).await;
    let proxy = start_proxy(&format!(
        "services:\n  up:\n    endpoints: [{}]\n    timeouts: {{ request_body_idle: 1s }}\n    retries: {{ attempts: 2, on: [reset] }}\nroutes:\n  - match: {{ authority: up }}\n    service: up\n    retry_non_idempotent: true\n",
        upstream.addr
    ));
    // A retry would have ended the exchange with the retry's failure (502), not 408.
    assert_stalled_upload_is_408(proxy.outbound, &mut upstream, "4096").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_upload_on_inbound_is_answered_408() {
    let mut upstream = RawUpstream::start(None).await;
    let proxy = start_proxy(&format!(
        "inbound: {{ app: {}, timeouts: {{ request_body_idle: 1s }} }}\n",
        upstream.addr
    ));
    assert_stalled_upload_is_408(proxy.inbound, &mut upstream, DECLARED).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stall_after_the_response_started_cuts_the_exchange() {
    // The upstream answers at once and streams its response while the upload goes on.
    let mut upstream = RawUpstream::start(Some(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
    ))
    .await;
    let proxy = start_proxy(&policy(upstream.addr, "http1"));
    let (answer, after) = stalled_upload(proxy.outbound, "up", DECLARED).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.contains("hello"), "{answer}");
    assert!(
        !answer.ends_with("0\r\n\r\n"),
        "the cut response must not look complete: {answer:?}"
    );
    assert!(
        after >= Duration::from_secs(1) && after < ANSWER_WITHIN,
        "cut {after:?} into the silence"
    );
    let received = upstream.next_ended(Duration::from_secs(2)).await;
    assert_cut_short(&received, DECLARED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_but_steady_upload_passes_whole() {
    let mut upstream = RawUpstream::start(Some(
        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    ))
    .await;
    let proxy = start_proxy(&policy(upstream.addr, "http1"));
    // Ten chunks 300 ms apart: three seconds in all, never a whole second of silence.
    let (chunks, body) = channel_body();
    let feeder = tokio::spawn(async move {
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            chunks.send(Bytes::from(vec![b'x'; 1000])).await.unwrap();
        }
    });
    let req = Request::post(format!("http://{}/upload", proxy.outbound))
        .header("host", "up")
        .header("content-length", "10000")
        .body(body)
        .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(10), send(&http1_client(), req))
        .await
        .expect("the upload took too long");
    assert_eq!(reply.status, 200, "{:?}", reply.header("x-outrider-error"));
    feeder.await.unwrap();
    let received = upstream.next_ended(Duration::from_secs(5)).await;
    let (_, body) = received.head_and_body();
    assert_eq!(body, 10_000, "the whole body reached the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_http2_stream_is_answered_408_and_the_upstream_stream_reset() {
    // An HTTP/2 upstream reports how each request body ended.
    let (tx, mut outcomes) = mpsc::unbounded_channel::<(usize, Result<(), String>)>();
    let upstream = Upstream::start(Proto::Http2, move |req: Request<hyper::body::Incoming>| {
        let tx = tx.clone();
        async move {
            let mut body = req.into_body();
            let mut bytes = 0;
            let end = loop {
                match body.frame().await {
                    None => break Ok(()),
                    Some(Ok(frame)) => bytes += frame.data_ref().map_or(0, Bytes::len),
                    Some(Err(error)) => break Err(error.to_string()),
                }
            };
            let _ = tx.send((bytes, end));
            Response::new(empty())
        }
    })
    .await;
    let proxy = start_proxy(&policy(upstream.addr, "http2"));
    // An HTTP/2 caller sends one DATA frame, then nothing, keeping its stream open.
    let stream = TcpStream::connect(proxy.outbound).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let (chunks, body) = channel_body();
    chunks.send(Bytes::from(vec![b'x'; SENT])).await.unwrap();
    let silent_since = Instant::now();
    let req = Request::post("http://up/upload").body(body).unwrap();
    let res = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .expect("no answer")
        .unwrap();
    let after = silent_since.elapsed();
    assert_eq!(res.status(), 408);
    assert_eq!(
        res.headers()["x-outrider-error"],
        "request body idle timeout after 1s"
    );
    assert!(
        after >= Duration::from_secs(1) && after < ANSWER_WITHIN,
        "answered {after:?} into the silence"
    );
    let (bytes, end) = tokio::time::timeout(Duration::from_secs(2), outcomes.recv())
        .await
        .expect("the upstream stream was still open")
        .unwrap();
    assert_eq!(bytes, SENT);
    assert!(end.is_err(), "the upstream saw a complete body");
    drop(chunks);
}
