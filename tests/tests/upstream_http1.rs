//! How the proxy reads HTTP/1.1 responses from an upstream, through the real binary: every
//! framing (content-length, chunked with extensions and trailers, read until close, no body),
//! interim responses, keep-alive and `Connection: close`, responses split at awkward places,
//! and malformed or cut responses. The upstream is a scripted raw-TCP server, so each byte the
//! proxy reads is written here; it counts its connections, which shows when one is reused.
//!
//! The proxy has two HTTP/1.1 clients: a request without a body is exchanged by its own code
//! (`proxy/src/pool/direct.rs`), one with a body by hyper's client. Most tests send GETs (and
//! HEADs), so they check the first; those that loop over [`Client`] send the same bytes through
//! both (a GET and a POST) and expect the same.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use outrider_e2e::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// Every test's whole run, proxy start included.
const TEST_LIMIT: Duration = Duration::from_secs(30);
/// Between the parts of an answer written in pieces.
const SPLIT_PAUSE: Duration = Duration::from_millis(20);

fn policy(addr: SocketAddr) -> String {
    format!(
        "services:\n  svc: {{ endpoints: [{addr}], protocol: http1 }}\nroutes:\n  - name: svc\n    match: {{ authority: svc }}\n    service: svc\n"
    )
}

fn opened(addr: SocketAddr) -> String {
    format!("outrider_upstream_connections_opened_total{{endpoint=\"{addr}\",service=\"svc\"}}")
}

async fn bounded<F: std::future::Future>(test: F) -> F::Output {
    tokio::time::timeout(TEST_LIMIT, test)
        .await
        .expect("test ran past its time limit")
}

/// One response as the upstream writes it: `parts` one after the other, `pause` between them;
/// with a `gate`, the parts after the first wait until the test opens it.
#[derive(Clone)]
struct Answer {
    parts: Vec<Bytes>,
    pause: Duration,
    gate: Option<Arc<Notify>>,
}

/// A response written in one piece.
fn whole(bytes: &'static [u8]) -> Answer {
    Answer {
        parts: vec![Bytes::from_static(bytes)],
        pause: Duration::ZERO,
        gate: None,
    }
}

/// A response written in pieces with [`SPLIT_PAUSE`] between them, so the proxy reads each
/// piece on its own.
fn split(parts: &[&'static [u8]]) -> Answer {
    Answer {
        parts: parts.iter().map(|p| Bytes::from_static(p)).collect(),
        pause: SPLIT_PAUSE,
        gate: None,
    }
}

/// No response at all: the connection closes after the request.
fn silence() -> Answer {
    Answer {
        parts: Vec::new(),
        pause: Duration::ZERO,
        gate: None,
    }
}

fn owned(bytes: String) -> Answer {
    Answer {
        parts: vec![Bytes::from(bytes)],
        pause: Duration::ZERO,
        gate: None,
    }
}

/// `first`, then once `gate` is open `rest` (possibly nothing), then the close.
fn gated(first: &'static [u8], rest: &'static [u8], gate: &Arc<Notify>) -> Answer {
    Answer {
        parts: vec![Bytes::from_static(first), Bytes::from_static(rest)],
        pause: Duration::ZERO,
        gate: Some(Arc::clone(gate)),
    }
}

/// `bytes` cut into pieces of sizes cycling through `sizes`, written without pauses.
fn pieces(bytes: &Bytes, sizes: &[usize]) -> Vec<Bytes> {
    let mut parts = Vec::new();
    let mut at = 0;
    for size in sizes.iter().cycle() {
        if at == bytes.len() {
            break;
        }
        let end = (at + size).min(bytes.len());
        parts.push(bytes.slice(at..end));
        at = end;
    }
    parts
}

/// A raw-TCP HTTP/1.1 upstream on 127.0.0.1:0. Its connection number `i` (from 0) follows
/// `scripts[i]` (the last script for every later connection): for each answer, it reads one
/// request head and writes the answer; when the script is done, it closes the connection.
struct Scripted {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    heads: Arc<Mutex<Vec<String>>>,
    /// Connections whose script is done and closed.
    closed: Arc<AtomicUsize>,
}

impl Scripted {
    async fn start(scripts: Vec<Vec<Answer>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let closed = Arc::new(AtomicUsize::new(0));
        let (count, log, done) = (
            Arc::clone(&accepted),
            Arc::clone(&heads),
            Arc::clone(&closed),
        );
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let number = count.fetch_add(1, Ordering::SeqCst);
                let script = scripts[number.min(scripts.len() - 1)].clone();
                let (log, done) = (Arc::clone(&log), Arc::clone(&done));
                tokio::spawn(async move {
                    if serve(stream, script, log).await {
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
        });
        Self {
            addr,
            accepted,
            heads,
            closed,
        }
    }

    /// Connections accepted so far.
    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Connections that went through their whole script and were closed.
    fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }

    /// The request lines received so far (`GET /a HTTP/1.1`), in order.
    fn request_lines(&self) -> Vec<String> {
        let heads = self.heads.lock().expect("heads");
        heads
            .iter()
            .map(|h| h.lines().next().unwrap_or("").to_string())
            .collect()
    }
}

/// One connection's script; true if it went through it all (false: the proxy closed first).
async fn serve(mut stream: TcpStream, script: Vec<Answer>, heads: Arc<Mutex<Vec<String>>>) -> bool {
    // Each write its own segment, so pieces written apart arrive apart.
    let _ = stream.set_nodelay(true);
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    for answer in script {
        let end = loop {
            if let Some(at) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
            }
        };
        let head = String::from_utf8_lossy(&pending[..end]).into_owned();
        // A request body (tests send one with a length only) is read and dropped.
        let length: usize = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, value)| value.trim().parse().ok())
            .unwrap_or(0);
        while pending.len() < end + length {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
            }
        }
        pending.drain(..end + length);
        heads.lock().expect("heads").push(head);
        for (i, part) in answer.parts.iter().enumerate() {
            if i > 0 && !answer.pause.is_zero() {
                tokio::time::sleep(answer.pause).await;
            }
            if let (1, Some(gate)) = (i, &answer.gate) {
                gate.notified().await;
            }
            if stream.write_all(part).await.is_err() {
                return false;
            }
        }
    }
    // Nothing unread is left, so this is a clean FIN, not a reset.
    let _ = stream.shutdown().await;
    true
}

/// How the test reaches the proxy.
#[derive(Clone, Copy, Debug)]
enum Via {
    Http1,
    H2c,
}

/// A response as the caller saw it: the body bytes that arrived, and how the body ended.
struct Fetched {
    status: u16,
    headers: HeaderMap,
    body: Vec<u8>,
    trailers: Option<HeaderMap>,
    /// The error that ended the body early, if one did.
    error: Option<String>,
}

impl Fetched {
    /// A response whose body is still to be read.
    fn new(head: http::response::Parts) -> Self {
        Self {
            status: head.status.as_u16(),
            headers: head.headers,
            body: Vec::new(),
            trailers: None,
            error: None,
        }
    }

    /// Reads `body` to its end or its first error.
    async fn read(&mut self, body: &mut Incoming) {
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => match frame.into_data() {
                    Ok(data) => self.body.extend_from_slice(&data),
                    Err(frame) => self.trailers = frame.into_trailers().ok(),
                },
                Err(error) => {
                    self.error = Some(error.to_string());
                    return;
                }
            }
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Status, body as text, and `x-outrider-error`, for one-line assertions.
    fn summary(&self) -> (u16, String, Option<&str>) {
        (
            self.status,
            String::from_utf8_lossy(&self.body).into_owned(),
            self.header("x-outrider-error"),
        )
    }

    fn complete(self) -> Self {
        assert_eq!(self.error, None, "the body ended with an error");
        self
    }
}

/// `METHOD path` to service `svc` through the outbound listener, on a new downstream
/// connection, with `headers` added; reads the body frame by frame, keeping what arrived
/// before an error.
async fn fetch(
    proxy: &Proxy,
    via: Via,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
) -> Fetched {
    try_fetch(proxy, via, method, path, headers, b"")
        .await
        .expect("response head")
}

/// Like [`fetch`] with a request body (a request with one goes through hyper's client on
/// main, one without through the proxy's own exchange), or the error that came instead of a
/// response head.
async fn try_fetch(
    proxy: &Proxy,
    via: Via,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &'static [u8],
) -> Result<Fetched, hyper::Error> {
    let (head, mut body) = open(proxy, via, method, path, headers, body)
        .await?
        .into_parts();
    let mut fetched = Fetched::new(head);
    fetched.read(&mut body).await;
    Ok(fetched)
}

/// Sends the request of [`try_fetch`] and returns the response with its body unread.
async fn open(
    proxy: &Proxy,
    via: Via,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &'static [u8],
) -> Result<http::Response<Incoming>, hyper::Error> {
    let stream = TcpStream::connect(proxy.outbound)
        .await
        .expect("connect to proxy");
    let io = TokioIo::new(stream);
    let mut req = match via {
        Via::Http1 => Request::builder().uri(path).header("host", "svc"),
        Via::H2c => Request::builder().uri(format!("http://svc{path}")),
    }
    .method(method);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let req = req.body(full(body)).expect("request");
    match via {
        Via::Http1 => {
            // Room for a response with as many fields as the proxy takes from an upstream
            // (100) and those it adds.
            let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
                .max_headers(200)
                .handshake(io)
                .await
                .expect("http1 handshake");
            tokio::spawn(conn);
            sender.send_request(req).await
        }
        Via::H2c => {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .expect("h2c handshake");
            tokio::spawn(conn);
            sender.send_request(req).await
        }
    }
}

async fn get(proxy: &Proxy, path: &str) -> Fetched {
    fetch(proxy, Via::Http1, Method::GET, path, &[]).await
}

fn ok(body: &str) -> (u16, String, Option<&'static str>) {
    (200, body.to_string(), None)
}

/// Which of the proxy's HTTP/1.1 clients an exchange goes through on main: a request without a
/// body is read by the proxy's own exchange, one with a body by hyper's client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Client {
    Direct,
    Hyper,
}

impl Client {
    /// The method and body of a request that takes this client.
    fn request(self) -> (Method, &'static [u8]) {
        match self {
            Client::Direct => (Method::GET, b""),
            Client::Hyper => (Method::POST, b"payload"),
        }
    }

    /// An HTTP/1.1 request to `/` through the proxy that takes this client.
    async fn call(self, proxy: &Proxy) -> Result<Fetched, hyper::Error> {
        let (method, body) = self.request();
        try_fetch(proxy, Via::Http1, method, "/", &[], body).await
    }
}

#[tokio::test]
async fn content_length_responses_share_one_keep_alive_connection() {
    bounded(async {
        let upstream = Scripted::start(vec![vec![
            whole(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nx-n: 1\r\n\r\none"),
            whole(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nx-n: 2\r\n\r\ntwo"),
            whole(b"HTTP/1.1 201 Created\r\ncontent-length: 5\r\nx-n: 3\r\n\r\nthree"),
            whole(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nx-n: 4\r\n\r\n"),
            whole(b"HTTP/1.1 404 Not Found\r\ncontent-length: 4\r\nx-n: 5\r\n\r\nfive"),
        ]])
        .await;
        let proxy = start_proxy(&policy(upstream.addr));
        let expected = [
            (200, "one"),
            (200, "two"),
            (201, "three"),
            (200, ""),
            (404, "five"),
        ];
        for (i, (status, body)) in expected.into_iter().enumerate() {
            let reply = get(&proxy, &format!("/{i}")).await.complete();
            let n = (i + 1).to_string();
            assert_eq!(reply.summary(), (status, body.into(), None), "request {i}");
            assert_eq!(reply.header("x-n"), Some(n.as_str()));
            let length = body.len().to_string();
            assert_eq!(reply.header("content-length"), Some(length.as_str()));
        }
        assert_eq!(
            upstream.request_lines(),
            (0..5)
                .map(|i| format!("GET /{i} HTTP/1.1"))
                .collect::<Vec<_>>()
        );
        assert_eq!(upstream.accepted(), 1, "five requests, one connection");
        assert_eq!(proxy.metric(&opened(upstream.addr)).await, 1.0);
    })
    .await;
}

/// A chunked body with extensions (one after whitespace, one quoted with a space in it), an
/// upper-case size and a chunk of one space.
const CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
    5;ext=1\r\nhello\r\n1;a=b;c=\"d e\"\r\n \r\nA\r\n0123456789\r\n6 ;x\r\nworld!\r\n0\r\n\r\n";
const CHUNKED_BODY: &str = "hello 0123456789world!";

#[tokio::test]
async fn chunked_bodies_are_reassembled_and_the_connection_reused() {
    bounded(async {
        let upstream = Scripted::start(vec![vec![whole(CHUNKED); 4]]).await;
        let proxy = start_proxy(&policy(upstream.addr));
        for (i, via) in [Via::Http1, Via::H2c, Via::Http1, Via::H2c]
            .into_iter()
            .enumerate()
        {
            let reply = fetch(&proxy, via, Method::GET, "/", &[]).await.complete();
            assert_eq!(reply.summary(), ok(CHUNKED_BODY), "request {i} via {via:?}");
            // The upstream's framing is its own hop's: an HTTP/1.1 caller gets the body chunked
            // again by the proxy's side (no length known), an h2c caller in DATA frames.
            let framing = matches!(via, Via::Http1).then_some("chunked");
            assert_eq!(reply.header("transfer-encoding"), framing, "via {via:?}");
            assert_eq!(reply.header("content-length"), None, "via {via:?}");
        }
        assert_eq!(upstream.accepted(), 1, "four requests, one connection");
    })
    .await;
}

#[tokio::test]
async fn a_chunk_size_with_trailing_whitespace_is_accepted() {
    bounded(async {
        let upstream = Scripted::start(vec![vec![whole(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n6 \r\nworld!\r\n0\r\n\r\n",
        )]])
        .await;
        let proxy = start_proxy(&policy(upstream.addr));
        assert_eq!(get(&proxy, "/").await.complete().summary(), ok("world!"));
    })
    .await;
}

const WITH_TRAILERS: &[u8] = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\
    trailer: x-checksum, x-count\r\n\r\n\
    5\r\nhello\r\n6\r\n world\r\n0\r\nx-checksum: abc123\r\nx-count: 2\r\n\r\n";

fn trailer_list(reply: &Fetched) -> Vec<(String, String)> {
    let map = reply.trailers.clone().unwrap_or_default();
    map.iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").to_string()))
        .collect()
}

#[tokio::test]
async fn chunked_trailers_reach_h2c_callers_and_http1_callers_that_accept_them() {
    bounded(async {
        // One response per connection: reuse after trailers is the next tests' subject.
        let upstream = Scripted::start(vec![vec![whole(WITH_TRAILERS)]]).await;
        let proxy = start_proxy(&policy(upstream.addr));
        let expected = vec![
            ("x-checksum".to_string(), "abc123".to_string()),
            ("x-count".to_string(), "2".to_string()),
        ];
        let te: &[(&str, &str)] = &[("te", "trailers")];
        for (via, headers) in [(Via::H2c, te), (Via::H2c, &[]), (Via::Http1, te)] {
            let reply = fetch(&proxy, via, Method::GET, "/", headers)
                .await
                .complete();
            assert_eq!(reply.summary(), ok("hello world"), "{via:?} {headers:?}");
            assert_eq!(reply.header("trailer"), Some("x-checksum, x-count"));
            assert_eq!(trailer_list(&reply), expected, "{via:?} {headers:?}");
        }
        // An HTTP/1.1 caller that did not say `te: trailers` gets the body without them.
        let reply = get(&proxy, "/").await.complete();
        assert_eq!(reply.summary(), ok("hello world"));
        assert_eq!(trailer_list(&reply), vec![]);
        // Trailers cut in two writes still arrive.
        let upstream = Scripted::start(vec![vec![split(&[
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nab",
            b"c\r\n0\r\n",
            b"x-t: 1\r\n",
            b"\r\n",
        ])]])
        .await;
        let proxy = start_proxy(&policy(upstream.addr));
        let reply = fetch(&proxy, Via::H2c, Method::GET, "/", &[])
            .await
            .complete();
        assert_eq!(reply.summary(), ok("abc"));
        assert_eq!(trailer_list(&reply), vec![("x-t".into(), "1".into())]);
    })
    .await;
}

/// Three responses with trailers to `method` requests (with `body`): all on one upstream
/// connection, and each logged as ended cleanly.
async fn trailers_keep_the_connection(method: Method, body: &'static [u8]) {
    let upstream = Scripted::start(vec![vec![whole(WITH_TRAILERS); 3]]).await;
    let proxy = start_proxy(&format!("access_log: json\n{}", policy(upstream.addr)));
    let te: &[(&str, &str)] = &[("te", "trailers")];
    for via in [Via::H2c, Via::Http1, Via::H2c] {
        let reply = try_fetch(&proxy, via, method.clone(), "/", te, body)
            .await
            .expect("response head")
            .complete();
        assert_eq!(reply.summary(), ok("hello world"), "{method} via {via:?}");
        assert_eq!(trailer_list(&reply).len(), 2, "{method} via {via:?}");
    }
    let logged = eventually(Duration::from_secs(5), || proxy.stdout_lines().len() == 3).await;
    assert!(logged, "access log: {:?}", proxy.stdout_lines());
    for line in proxy.stdout_lines() {
        let entry: serde_json::Value = serde_json::from_str(&line).expect("json line");
        assert_eq!(entry["error"], serde_json::Value::Null, "{line}");
    }
    assert_eq!(
        upstream.accepted(),
        1,
        "{method}: three responses with trailers, one connection"
    );
}

#[tokio::test]
async fn a_response_with_trailers_keeps_its_connection_and_ends_cleanly() {
    bounded(trailers_keep_the_connection(Method::GET, b"")).await;
}

#[tokio::test]
async fn a_response_with_trailers_to_a_request_with_a_body_keeps_its_connection() {
    bounded(trailers_keep_the_connection(Method::POST, b"payload")).await;
}

#[tokio::test]
async fn a_body_read_until_close_arrives_whole_and_the_next_request_opens_a_connection() {
    bounded(async {
        // Each connection: one close-delimited response, a different shape for each.
        let upstream = Scripted::start(vec![
            vec![split(&[
                b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nfirst part, ",
                b"second part",
            ])],
            vec![whole(b"HTTP/1.0 200 OK\r\nx-old: yes\r\n\r\nfrom HTTP/1.0")],
            // HTTP/1.1 with no framing and no `connection: close`: still read until close.
            vec![whole(b"HTTP/1.1 200 OK\r\n\r\nunframed")],
        ])
        .await;
        let proxy = start_proxy(&policy(upstream.addr));
        assert_eq!(
            get(&proxy, "/").await.complete().summary(),
            ok("first part, second part")
        );
        let old = get(&proxy, "/").await.complete();
        assert_eq!(old.summary(), ok("from HTTP/1.0"));
        assert_eq!(old.header("x-old"), Some("yes"));
        assert_eq!(get(&proxy, "/").await.complete().summary(), ok("unframed"));
        assert_eq!(
            upstream.accepted(),
            3,
            "one connection per close-delimited body"
        );
        assert_eq!(proxy.metric(&opened(upstream.addr)).await, 3.0);
    })
    .await;
}

#[tokio::test]
async fn an_http10_keep_alive_response_with_a_length_keeps_its_connection() {
    bounded(async {
        let answer =
            whole(b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 4\r\n\r\nkept");
        let upstream = Scripted::start(vec![vec![answer; 3]]).await;
        let proxy = start_proxy(&policy(upstream.addr));
        for i in 0..3 {
            let reply = get(&proxy, "/").await.complete();
            assert_eq!(reply.summary(), ok("kept"), "request {i}");
            // Hop-by-hop: the upstream's connection header stays on its hop.
            assert_eq!(reply.header("connection"), None);
        }
        assert_eq!(upstream.accepted(), 1, "HTTP/1.0 keep-alive is honoured");
    })
    .await;
}

#[tokio::test]
async fn connection_close_on_a_length_framed_response_retires_the_connection() {
    bounded(async {
        let upstream = Scripted::start(vec![vec![
            // Still open after this one; the proxy must not reuse it anyway.
            whole(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 5\r\n\r\nfirst"),
            whole(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nwrong"),
        ]])
        .await;
        let proxy = start_proxy(&policy(upstream.addr));
        for i in 0..3 {
            let reply = get(&proxy, "/").await.complete();
            assert_eq!(reply.summary(), ok("first"), "request {i}");
            assert_eq!(reply.header("connection"), None);
        }
        assert_eq!(upstream.accepted(), 3, "one connection per request");
        assert_eq!(upstream.request_lines().len(), 3);
    })
    .await;
}

#[tokio::test]
async fn an_early_hints_response_is_skipped_and_the_final_one_relayed() {
    bounded(async {
        let hinted = whole(
            b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n\
              HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-final: yes\r\n\r\nfinal",
        );
        // Two interim responses, the second in its own write after a pause.
        let twice = split(&[
            b"HTTP/1.1 103 Early Hints\r\nlink: </a.js>; rel=preload\r\n\r\n",
            b"HTTP/1.1 103 Early Hints\r\nlink: </b.js>; rel=preload\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nfinal2",
        ]);
        let upstream = Scripted::start(vec![vec![hinted.clone(), twice, hinted]]).await;
        let proxy = start_proxy(&policy(upstream.addr));
        let reply = get(&proxy, "/").await.complete();
        assert_eq!(reply.summary(), ok("final"));
        assert_eq!(reply.header("x-final"), Some("yes"));
        assert_eq!(
            reply.header("link"),
            None,
            "the hint's headers are not merged"
        );
        assert_eq!(get(&proxy, "/").await.complete().summary(), ok("final2"));
        // On the wire to the caller: the 200 alone, the 103 is not relayed.
        let raw = raw_exchange(
            proxy.outbound,
            b"GET / HTTP/1.1\r\nhost: svc\r\nconnection: close\r\n\r\n",
            Duration::from_secs(5),
        )
        .await;
        assert!(
            raw.starts_with("HTTP/1.1 200 OK\r\n"),
            "caller read: {raw:?}"
        );
        assert!(!raw.contains("103"), "caller read: {raw:?}");
        assert!(raw.ends_with("\r\n\r\nfinal"), "caller read: {raw:?}");
        assert_eq!(upstream.accepted(), 1);
    })
    .await;
}

#[tokio::test]
async fn a_head_response_with_a_length_has_no_body_and_keeps_the_connection() {
    bounded(async {
        let upstream = Scripted::start(vec![vec![
            whole(b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\nx-head: 1\r\n\r\n"),
            whole(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nnext"),
            whole(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"),
            whole(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nafter"),
        ]])
        .await;
        let proxy = start_proxy(&policy(upstream.addr));
        let head = fetch(&proxy, Via::Http1, Method::HEAD, "/", &[])
            .await
            .complete();
        assert_eq!(head.summary(), ok(""));
        assert_eq!(head.header("content-length"), Some("1234"));
        assert_eq!(head.header("x-head"), Some("1"));
        assert_eq!(get(&proxy, "/").await.complete().summary(), ok("next"));
        // A chunked HEAD response has no body either (not even the last chunk), over h2c too.
        let head = fetch(&proxy, Via::H2c, Method::HEAD, "/", &[])
            .await
            .complete();
        assert_eq!(head.summary(), ok(""));
        assert_eq!(get(&proxy, "/").await.complete().summary(), ok("after"));
        assert_eq!(
            upstream.request_lines(),
            [
                "HEAD / HTTP/1.1",
                "GET / HTTP/1.1",
                "HEAD / HTTP/1.1",
                "GET / HTTP/1.1"
            ]
        );
        assert_eq!(
            upstream.accepted(),
            1,
            "HEAD responses leave no body to read"
        );
    })
    .await;
}

#[tokio::test]
async fn no_content_and_not_modified_responses_have_no_body_and_keep_the_connection() {
    bounded(async {
        let upstream = Scripted::start(vec![vec![
            whole(b"HTTP/1.1 204 No Content\r\nx-n: 1\r\n\r\n"),
            // A 304 may state the length of the representation it stands for: no body follows.
            whole(b"HTTP/1.1 304 Not Modified\r\netag: \"v1\"\r\ncontent-length: 5\r\n\r\n"),
            whole(b"HTTP/1.1 304 Not Modified\r\netag: \"v2\"\r\n\r\n"),
            whole(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nbody"),
        ]])
        .await;
        let proxy = start_proxy(&policy(upstream.addr));
        let none = get(&proxy, "/").await.complete();
        assert_eq!((none.status, none.body.len()), (204, 0));
        assert_eq!(none.header("x-n"), Some("1"));
        let not_modified = get(&proxy, "/").await.complete();
        assert_eq!((not_modified.status, not_modified.body.len()), (304, 0));
        assert_eq!(not_modified.header("etag"), Some("\"v1\""));
        let not_modified = fetch(&proxy, Via::H2c, Method::GET, "/", &[])
            .await
            .complete();
        assert_eq!((not_modified.status, not_modified.body.len()), (304, 0));
        assert_eq!(not_modified.header("etag"), Some("\"v2\""));
        assert_eq!(get(&proxy, "/").await.complete().summary(), ok("body"));
        assert_eq!(
            upstream.accepted(),
            1,
            "bodiless responses keep the connection"
        );
    })
    .await;
}

#[tokio::test]
async fn a_large_body_in_many_writes_arrives_byte_for_byte() {
    bounded(async {
        const SIZE: usize = 8 << 20;
        // Not all zeros, so a lost, repeated or reordered piece shows.
        let body: Bytes = (0..SIZE)
            .map(|i| (i % 251) as u8 ^ (i >> 16) as u8)
            .collect::<Vec<_>>()
            .into();
        let mut parts = vec![Bytes::from(format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {SIZE}\r\n\r\n"
        ))];
        // Pieces of an odd size, so none lines up with a buffer boundary.
        parts.extend((0..SIZE).step_by(65_521).map(|at| {
            let end = (at + 65_521).min(SIZE);
            body.slice(at..end)
        }));
        let answer = Answer {
            parts,
            pause: Duration::ZERO,
            gate: None,
        };
        let upstream = Scripted::start(vec![vec![answer; 2]]).await;
        let proxy = start_proxy(&policy(upstream.addr));
        for via in [Via::Http1, Via::H2c] {
            let reply = fetch(&proxy, via, Method::GET, "/", &[]).await.complete();
            assert_eq!(reply.status, 200, "via {via:?}");
            assert_eq!(reply.body.len(), SIZE, "via {via:?}");
            assert!(reply.body == body, "via {via:?}: the bytes differ");
        }
        assert_eq!(upstream.accepted(), 1);
    })
    .await;
}

#[tokio::test]
async fn a_large_chunked_body_cut_across_writes_arrives_byte_for_byte() {
    bounded(async {
        const SIZE: usize = 4 << 20;
        let body: Bytes = (0..SIZE)
            .map(|i| (i % 253) as u8 ^ (i >> 12) as u8)
            .collect::<Vec<_>>()
            .into();
        // Chunks from 1 byte to 200 KiB, with and without extensions; the writes cut them
        // elsewhere, so sizes, data and CRLFs straddle reads.
        let mut wire = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        let chunk_sizes = [1, 7, 4096, 65_536, 200_000, 13, 8191, 100_003];
        let mut at = 0;
        for (i, size) in chunk_sizes.iter().cycle().enumerate() {
            if at == SIZE {
                break;
            }
            let end = (at + size).min(SIZE);
            let ext = if i % 3 == 0 { ";n=1" } else { "" };
            wire.extend_from_slice(format!("{:x}{ext}\r\n", end - at).as_bytes());
            wire.extend_from_slice(&body[at..end]);
            wire.extend_from_slice(b"\r\n");
            at = end;
        }
        wire.extend_from_slice(b"0\r\n\r\n");
        let answer = Answer {
            parts: pieces(&Bytes::from(wire), &[3, 65_521, 1, 9_999, 131_071, 2]),
            pause: Duration::ZERO,
            gate: None,
        };
        for client in [Client::Direct, Client::Hyper] {
            let upstream = Scripted::start(vec![vec![answer.clone(); 2]]).await;
            let proxy = start_proxy(&policy(upstream.addr));
            for _ in 0..2 {
                let reply = client.call(&proxy).await.expect("response head").complete();
                assert_eq!(reply.status, 200, "{client:?}");
                assert_eq!(reply.body.len(), SIZE, "{client:?}");
                assert!(reply.body == body, "{client:?}: the bytes differ");
            }
            assert_eq!(upstream.accepted(), 1, "{client:?}");
        }
    })
    .await;
}

#[tokio::test]
async fn a_response_written_one_byte_at_a_time_is_relayed_whole() {
    bounded(async {
        let wire: &[u8] = b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n\
            HTTP/1.1 200 OK\r\nx-a: 1\r\ntransfer-encoding: chunked\r\ntrailer: x-t\r\n\r\n\
            5;e=1\r\nhello\r\n6\r\n world\r\n0\r\nx-t: 2\r\n\r\n";
        let answer = Answer {
            parts: pieces(&Bytes::from_static(wire), &[1]),
            pause: Duration::from_millis(1),
            gate: None,
        };
        for client in [Client::Direct, Client::Hyper] {
            let upstream = Scripted::start(vec![vec![
                answer.clone(),
                whole(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nagain"),
            ]])
            .await;
            let proxy = start_proxy(&policy(upstream.addr));
            let reply = client.call(&proxy).await.expect("response head").complete();
            assert_eq!(reply.summary(), ok("hello world"), "{client:?}");
            assert_eq!(reply.header("x-a"), Some("1"), "{client:?}");
            let next = client.call(&proxy).await.expect("response head").complete();
            assert_eq!(next.summary(), ok("again"), "{client:?}");
        }
    })
    .await;
}

/// `answer` on a first connection and a good response on the next: the caller gets 502 with
/// the reason, nothing of the upstream's bytes, and the next request works.
async fn refused(client: Client, what: &str, answer: Answer) {
    let upstream = Scripted::start(vec![
        vec![answer],
        vec![whole(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\ngood")],
    ])
    .await;
    let proxy = start_proxy(&policy(upstream.addr));
    let reply = client.call(&proxy).await.expect("response head").complete();
    let reason = format!("upstream {} failed: invalid response", upstream.addr);
    assert_eq!(
        (reply.status, reply.header("x-outrider-error")),
        (502, Some(reason.as_str())),
        "{what} ({client:?})"
    );
    let text = String::from_utf8_lossy(&reply.body);
    assert!(!text.contains("LEAKED"), "{what}: relayed {text:?}");
    let next = client.call(&proxy).await.expect("response head").complete();
    assert_eq!(
        next.summary(),
        ok("good"),
        "{what} ({client:?}): the next request"
    );
    assert_eq!(
        upstream.accepted(),
        2,
        "{what}: the bad connection is dropped"
    );
}

#[tokio::test]
async fn malformed_responses_get_502_and_are_never_relayed() {
    let many_fields: String = (0..101).map(|i| format!("x-{i}: {i}\r\n")).collect();
    let cases: Vec<(&str, Answer)> = vec![
        ("garbage status line", whole(b"HELLO THERE\r\n\r\nLEAKED")),
        (
            "status code not a number",
            whole(b"HTTP/1.1 2x0 OK\r\ncontent-length: 6\r\n\r\nLEAKED"),
        ),
        (
            "status code of 4 digits",
            whole(b"HTTP/1.1 1000 X\r\ncontent-length: 6\r\n\r\nLEAKED"),
        ),
        (
            "status code below 100",
            whole(b"HTTP/1.1 099 X\r\ncontent-length: 6\r\n\r\nLEAKED"),
        ),
        (
            "HTTP/2.0 status line",
            whole(b"HTTP/2.0 200 OK\r\ncontent-length: 6\r\n\r\nLEAKED"),
        ),
        (
            "HTTP/1.2 status line",
            whole(b"HTTP/1.2 200 OK\r\ncontent-length: 6\r\n\r\nLEAKED"),
        ),
        (
            "header without a colon",
            whole(b"HTTP/1.1 200 OK\r\nno-colon-here\r\ncontent-length: 6\r\n\r\nLEAKED"),
        ),
        (
            "space before a colon",
            whole(b"HTTP/1.1 200 OK\r\nx-a : 1\r\ncontent-length: 6\r\n\r\nLEAKED"),
        ),
        (
            "obsolete line folding",
            whole(b"HTTP/1.1 200 OK\r\nx-a: one\r\n two\r\ncontent-length: 6\r\n\r\nLEAKED"),
        ),
        (
            "content-length not a number",
            whole(b"HTTP/1.1 200 OK\r\ncontent-length: six\r\n\r\nLEAKED"),
        ),
        (
            "content-length with a sign",
            whole(b"HTTP/1.1 200 OK\r\ncontent-length: +6\r\n\r\nLEAKED"),
        ),
        (
            "negative content-length",
            whole(b"HTTP/1.1 200 OK\r\ncontent-length: -6\r\n\r\nLEAKED"),
        ),
        (
            "content-length past 64 bits",
            whole(b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\nLEAKED"),
        ),
        (
            "two different content-lengths",
            whole(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\ncontent-length: 7\r\n\r\nLEAKED"),
        ),
        (
            "a content-length list of two values",
            whole(b"HTTP/1.1 200 OK\r\ncontent-length: 6, 7\r\n\r\nLEAKED"),
        ),
        (
            "101 header fields",
            owned(format!(
                "HTTP/1.1 200 OK\r\n{many_fields}content-length: 6\r\n\r\nLEAKED"
            )),
        ),
        (
            "head of 512 KiB",
            owned(format!(
                "HTTP/1.1 200 OK\r\nx-big: {}\r\ncontent-length: 6\r\n\r\nLEAKED",
                "a".repeat(512 << 10)
            )),
        ),
    ];
    tokio::time::timeout(2 * TEST_LIMIT, async {
        for (what, answer) in cases {
            for client in [Client::Direct, Client::Hyper] {
                refused(client, what, answer.clone()).await;
            }
        }
    })
    .await
    .expect("test ran past its time limit");
}

#[tokio::test]
async fn a_head_of_100_kib_gets_502() {
    // 64 KiB is the most a head may have, as for the proxy's own listeners; hyper's client
    // is held to it too (see the contract tables below).
    let head = format!(
        "HTTP/1.1 200 OK\r\nx-big: {}\r\ncontent-length: 6\r\n\r\nLEAKED",
        "a".repeat(100 << 10)
    );
    bounded(refused(Client::Direct, "head of 100 KiB", owned(head))).await;
}

#[tokio::test]
async fn a_101_to_a_request_that_asked_for_no_upgrade_gets_502() {
    // A protocol switch nobody asked for (refused for a request with a body too: see the
    // contract tables below).
    let answer = whole(
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: foo\r\nconnection: upgrade\r\n\r\nLEAKED",
    );
    bounded(refused(Client::Direct, "101 to a GET", answer)).await;
}

#[tokio::test]
async fn a_head_of_60_kib_is_relayed() {
    bounded(async {
        let head = format!(
            "HTTP/1.1 200 OK\r\nx-big: {}\r\ncontent-length: 2\r\n\r\nok",
            "a".repeat(60 << 10)
        );
        let answer = Answer {
            parts: vec![Bytes::from(head)],
            pause: Duration::ZERO,
            gate: None,
        };
        let upstream = Scripted::start(vec![vec![answer]]).await;
        let proxy = start_proxy(&policy(upstream.addr));
        let reply = get(&proxy, "/").await.complete();
        assert_eq!(reply.summary(), ok("ok"));
        assert_eq!(reply.header("x-big").map(str::len), Some(60 << 10));
    })
    .await;
}

#[tokio::test]
async fn a_body_cut_short_reaches_the_caller_cut_and_the_next_request_works() {
    bounded(async {
        let good = whole(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\ngood");
        // What the upstream sends, what of it the caller gets, and what comes (once the caller
        // has that) before the close.
        let cases: [(&str, &[u8], &str, &[u8]); 3] = [
            (
                "content-length 1000, 10 bytes",
                b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789",
                "0123456789",
                b"",
            ),
            (
                "chunked, no last chunk",
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
                "hello",
                b"",
            ),
            (
                "chunked, a bad chunk size",
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
                "hello",
                b"zz\r\nLEAKED\r\n0\r\n\r\n",
            ),
        ];
        // Per connection: each cut response twice (an HTTP/1.1 and an h2c caller), a good one
        // after each pair.
        let gates: Vec<Arc<Notify>> = (0..6).map(|_| Arc::new(Notify::new())).collect();
        let mut scripts = Vec::new();
        for (i, (_, first, _, rest)) in cases.iter().enumerate() {
            scripts.push(vec![gated(first, rest, &gates[2 * i])]);
            scripts.push(vec![gated(first, rest, &gates[2 * i + 1])]);
            scripts.push(vec![good.clone()]);
        }
        let upstream = Scripted::start(scripts).await;
        let proxy = start_proxy(&policy(upstream.addr));
        let mut gates = gates.iter();
        for (what, _, sent, _) in cases {
            for via in [Via::Http1, Via::H2c] {
                let (head, mut body) = open(&proxy, via, Method::GET, "/", &[], b"")
                    .await
                    .expect("response head")
                    .into_parts();
                let mut reply = Fetched::new(head);
                assert_eq!(reply.status, 200, "{what} via {via:?}");
                while reply.body.len() < sent.len() {
                    let frame = body.frame().await.expect("a frame").expect("a good frame");
                    reply
                        .body
                        .extend_from_slice(&frame.into_data().expect("data"));
                }
                gates.next().expect("a gate").notify_one();
                reply.read(&mut body).await;
                assert_eq!(reply.body, sent.as_bytes(), "{what} via {via:?}");
                assert!(reply.error.is_some(), "{what} via {via:?}: ended cleanly");
                if matches!(via, Via::Http1) && what.starts_with("content-length") {
                    assert_eq!(reply.header("content-length"), Some("1000"));
                }
            }
            assert_eq!(
                get(&proxy, "/").await.complete().summary(),
                ok("good"),
                "{what}"
            );
        }
        assert_eq!(upstream.accepted(), 9, "no cut connection is reused");
    })
    .await;
}

#[tokio::test]
async fn a_bad_first_chunk_size_leaves_the_caller_without_a_response() {
    bounded(async {
        // The head is valid and already on its way to the caller when the body fails: the
        // proxy cannot answer 502 any more, and the caller's side sees the stream fail before
        // the head was written out.
        let bad = whole(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nLEAKED\r\n0\r\n\r\n",
        );
        let upstream = Scripted::start(vec![
            vec![bad.clone()],
            vec![bad],
            vec![whole(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\ngood")],
        ])
        .await;
        let proxy = start_proxy(&policy(upstream.addr));
        let h1 = try_fetch(&proxy, Via::Http1, Method::GET, "/", &[], b"").await;
        let h1 = h1.err().expect("an HTTP/1.1 response to a bad chunk size");
        assert!(h1.is_incomplete_message(), "{h1:?}");
        let h2 = try_fetch(&proxy, Via::H2c, Method::GET, "/", &[], b"").await;
        let h2 = h2.err().expect("an h2c response to a bad chunk size");
        // RST_STREAM(INTERNAL_ERROR) instead of a head.
        assert!(format!("{h2:?}").contains("INTERNAL_ERROR"), "{h2:?}");
        assert_eq!(get(&proxy, "/").await.complete().summary(), ok("good"));
        assert_eq!(upstream.accepted(), 3);
    })
    .await;
}

#[tokio::test]
async fn a_fresh_connection_closed_without_an_answer_gets_502() {
    bounded(async {
        let upstream = Scripted::start(vec![
            vec![silence()],
            // Closed after the status line: a head never finished.
            vec![whole(b"HTTP/1.1 200 OK\r\n")],
            vec![whole(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\ngood")],
        ])
        .await;
        let proxy = start_proxy(&policy(upstream.addr));
        let reason = format!("upstream {} reset the connection", upstream.addr);
        for what in ["no answer", "half a head"] {
            let reply = get(&proxy, "/").await.complete();
            assert_eq!(
                (reply.status, reply.header("x-outrider-error")),
                (502, Some(reason.as_str())),
                "{what}"
            );
        }
        assert_eq!(get(&proxy, "/").await.complete().summary(), ok("good"));
        // A fresh connection is not retried without a retry policy: one request each.
        assert_eq!(upstream.accepted(), 3);
        assert_eq!(upstream.request_lines().len(), 3);
    })
    .await;
}

#[tokio::test]
async fn responses_split_at_awkward_places_are_relayed_whole() {
    bounded(async {
        let upstream = Scripted::start(vec![vec![
            // The status line in two, a header name in two, CR and LF apart.
            split(&[
                b"HTT",
                b"P/1.1 200 O",
                b"K\r\nx-spl",
                b"it: yes\r\ncontent-le",
                b"ngth: 11\r\n\r",
                b"\nhello",
                b" world",
            ]),
            // The chunk-size line apart from its data, the CRLFs cut, the last chunk alone.
            split(&[
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                b"5",
                b";ext=1\r",
                b"\nhel",
                b"lo\r",
                b"\n6\r\n world\r\n",
                b"0\r\n",
                b"\r\n",
            ]),
            // The end of the head and the start of the body in one write, the rest after.
            split(&[
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nab",
                b"c\r\n0\r\n",
                b"\r\n",
            ]),
            // A 103 cut in the middle, then the final head in the same write as its end.
            split(&[
                b"HTTP/1.1 103 Early Hints\r\nlink: </a>",
                b"\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nlast",
            ]),
        ]])
        .await;
        let proxy = start_proxy(&policy(upstream.addr));
        let first = get(&proxy, "/").await.complete();
        assert_eq!(first.summary(), ok("hello world"));
        assert_eq!(first.header("x-split"), Some("yes"));
        assert_eq!(
            get(&proxy, "/").await.complete().summary(),
            ok("hello world")
        );
        let third = fetch(&proxy, Via::H2c, Method::GET, "/", &[])
            .await
            .complete();
        assert_eq!(third.summary(), ok("abc"));
        assert_eq!(get(&proxy, "/").await.complete().summary(), ok("last"));
        assert_eq!(
            upstream.accepted(),
            1,
            "every split response kept the connection"
        );
    })
    .await;
}

/// A response, what the caller gets for it, and whether its connection takes the next request.
struct Case {
    what: &'static str,
    answer: &'static [u8],
    status: u16,
    body: &'static str,
    reused: bool,
}

const fn case(
    what: &'static str,
    answer: &'static [u8],
    status: u16,
    body: &'static str,
    reused: bool,
) -> Case {
    Case {
        what,
        answer,
        status,
        body,
        reused,
    }
}

/// Unusual but valid (or tolerated) responses, read alike by both of the proxy's HTTP/1.1
/// clients. One case a line, so the table reads as one.
#[rustfmt::skip]
const TOLERATED: &[Case] = &[
    case("content-length twice, same value", b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\nhello", 200, "hello", true),
    case("content-length list of one value", b"HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\nhello", 200, "hello", true),
    case("content-length with leading zeros", b"HTTP/1.1 200 OK\r\ncontent-length: 005\r\n\r\nhello", 200, "hello", true),
    case("100 Continue first", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello", 200, "hello", true),
    case("no reason phrase", b"HTTP/1.1 200\r\ncontent-length: 5\r\n\r\nhello", 200, "hello", true),
    case("status 599", b"HTTP/1.1 599 Whatever\r\ncontent-length: 5\r\n\r\nhello", 599, "hello", true),
    case("Connection: Close", b"HTTP/1.1 200 OK\r\nConnection: Close\r\ncontent-length: 5\r\n\r\nhello", 200, "hello", false),
    case("connection: keep-alive, close", b"HTTP/1.1 200 OK\r\nconnection: keep-alive, close\r\ncontent-length: 5\r\n\r\nhello", 200, "hello", false),
    case("connection: x-foo,close", b"HTTP/1.1 200 OK\r\nconnection: x-foo,close\r\nx-foo: 1\r\ncontent-length: 5\r\n\r\nhello", 200, "hello", false),
    case("HTTP/1.0 with a length", b"HTTP/1.0 200 OK\r\ncontent-length: 5\r\n\r\nhello", 200, "hello", false),
    case("HTTP/1.0 Connection: Keep-Alive", b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\ncontent-length: 5\r\n\r\nhello", 200, "hello", true),
    case("Transfer-Encoding: Chunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 200, "hello", true),
    // (`transfer-encoding: chunked` on two lines is `chunked, chunked`, RFC 9110 §5.3: refused
    // with 502 since RFC 9112 §6.1 is applied, as nginx does; see hardening.rs.)
    case("bare LF line ends in the head", b"HTTP/1.1 200 OK\ncontent-length: 5\n\nhello", 200, "hello", true),
    case("an empty line before the status line", b"\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello", 200, "hello", true),
    case("204 with a content-length", b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n", 204, "", true),
    case("204 with transfer-encoding", b"HTTP/1.1 204 No Content\r\ntransfer-encoding: chunked\r\n\r\n", 204, "", true),
    case("an empty header value", b"HTTP/1.1 200 OK\r\nx-empty:\r\ncontent-length: 5\r\n\r\nhello", 200, "hello", true),
    case("non-ASCII in a header value", b"HTTP/1.1 200 OK\r\nx-a: caf\xc3\xa9\r\ncontent-length: 5\r\n\r\nhello", 200, "hello", true),
    // Out of step: what follows the body is not taken for the next response.
    case("bytes after the body", b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhelloHTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nSTALE!", 200, "hello", false),
];

#[tokio::test]
async fn unusual_responses_are_read_alike_by_both_clients() {
    let again = whole(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nagain");
    tokio::time::timeout(2 * TEST_LIMIT, async {
        for case in TOLERATED {
            for client in [Client::Direct, Client::Hyper] {
                let what = format!("{} ({client:?})", case.what);
                let upstream = Scripted::start(vec![vec![whole(case.answer), again.clone()]]).await;
                let proxy = start_proxy(&policy(upstream.addr));
                let reply = client.call(&proxy).await.expect("response head").complete();
                assert_eq!(reply.status, case.status, "{what}");
                assert_eq!(String::from_utf8_lossy(&reply.body), case.body, "{what}");
                assert_eq!(reply.header("x-outrider-error"), None, "{what}");
                assert_eq!(reply.header("x-foo"), None, "{what}: named in connection");
                if case.what.starts_with("non-ASCII") {
                    let value = reply.headers.get("x-a").map(|v| v.as_bytes());
                    assert_eq!(value, Some(&b"caf\xc3\xa9"[..]), "{what}");
                }
                let next = client.call(&proxy).await.expect("response head").complete();
                let (expected, connections) = match case.reused {
                    true => ("again", 1),
                    false => (case.body, 2),
                };
                assert_eq!(
                    String::from_utf8_lossy(&next.body),
                    expected,
                    "{what}: next"
                );
                assert_eq!(upstream.accepted(), connections, "{what}: connections");
            }
        }
    })
    .await
    .expect("test ran past its time limit");
}

#[tokio::test]
async fn chunked_wins_over_content_length_and_the_length_is_not_passed_on() {
    bounded(async {
        for client in [Client::Direct, Client::Hyper] {
            let upstream = Scripted::start(vec![vec![whole(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 100\r\n\r\n\
                  5\r\nhello\r\n0\r\n\r\n",
            )]])
            .await;
            let proxy = start_proxy(&policy(upstream.addr));
            let reply = client.call(&proxy).await.expect("response head").complete();
            assert_eq!(reply.summary(), ok("hello"), "{client:?}");
            assert_eq!(reply.header("content-length"), None, "{client:?}");
        }
    })
    .await;
}

#[tokio::test]
async fn a_reused_connection_closed_after_the_request_is_resent_only_if_safe() {
    bounded(async {
        for client in [Client::Direct, Client::Hyper] {
            // The first connection answers once, then reads the next request and closes.
            let upstream = Scripted::start(vec![
                vec![
                    whole(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst"),
                    silence(),
                ],
                vec![whole(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfresh")],
            ])
            .await;
            let proxy = start_proxy(&policy(upstream.addr));
            let first = client.call(&proxy).await.expect("response head").complete();
            assert_eq!(first.summary(), ok("first"));
            let second = client.call(&proxy).await.expect("response head").complete();
            let reset = format!("upstream {} reset the connection", upstream.addr);
            match client {
                // A GET may have been acted on, but repeating it is harmless: sent again on
                // a new connection.
                Client::Direct => {
                    assert_eq!(second.summary(), ok("fresh"));
                    assert_eq!(upstream.accepted(), 2);
                    assert_eq!(upstream.request_lines().len(), 3);
                }
                // A POST is not repeated: the caller learns it failed.
                Client::Hyper => {
                    assert_eq!(
                        (second.status, second.header("x-outrider-error")),
                        (502, Some(reset.as_str()))
                    );
                    assert_eq!(upstream.accepted(), 1);
                    assert_eq!(upstream.request_lines().len(), 2);
                }
            }
        }
    })
    .await;
}

#[tokio::test]
async fn a_response_sent_to_an_idle_connection_is_never_taken_for_the_next_one() {
    bounded(async {
        for client in [Client::Direct, Client::Hyper] {
            // After its answer the first connection, idle, says 408 unasked and closes, as
            // servers do when their keep-alive timeout ends.
            let upstream = Scripted::start(vec![
                vec![Answer {
                    parts: vec![
                        Bytes::from_static(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst"),
                        Bytes::from_static(
                            b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n\
                              connection: close\r\n\r\n",
                        ),
                    ],
                    pause: SPLIT_PAUSE,
                    gate: None,
                }],
                vec![whole(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfresh")],
            ])
            .await;
            let proxy = start_proxy(&policy(upstream.addr));
            let first = client.call(&proxy).await.expect("response head").complete();
            assert_eq!(first.summary(), ok("first"), "{client:?}");
            let said = eventually(Duration::from_secs(5), || upstream.closed() == 1).await;
            assert!(said, "the upstream never sent its 408");
            let next = client.call(&proxy).await.expect("response head").complete();
            assert_eq!(next.summary(), ok("fresh"), "{client:?}");
            assert_eq!(upstream.accepted(), 2, "{client:?}");
        }
    })
    .await;
}

#[tokio::test]
async fn the_request_head_is_written_as_hyper_writes_it() {
    bounded(async {
        let upstream = Scripted::start(vec![vec![
            whole(
                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
            );
            2
        ]])
        .await;
        let proxy = start_proxy(&policy(upstream.addr));
        let headers: &[(&str, &str)] = &[
            ("x-multi", "a"),
            ("x-multi", "b"),
            ("x-utf8", "caf\u{e9}"),
            ("connection", "x-hop"),
            ("x-hop", "1"),
        ];
        let path = "/p%20q/r?x=1&y=%2F";
        for client in [Client::Direct, Client::Hyper] {
            let (method, body) = client.request();
            let reply = try_fetch(&proxy, Via::Http1, method, path, headers, body)
                .await
                .expect("response head")
                .complete();
            assert_eq!(reply.summary(), ok("ok"), "{client:?}");
        }
        let heads = upstream.heads.lock().expect("heads").clone();
        // The head's fields, sorted, without those that differ by request or by body.
        let fields = |head: &str| -> (String, Vec<String>) {
            let mut lines = head.lines();
            let target = lines
                .next()
                .unwrap_or("")
                .split(' ')
                .nth(1)
                .unwrap_or("")
                .to_string();
            let mut fields: Vec<String> = lines
                .filter(|l| !l.is_empty())
                .filter(|l| {
                    !["content-length:", "x-request-id:", "traceparent:"]
                        .iter()
                        .any(|p| l.starts_with(p))
                })
                .map(str::to_string)
                .collect();
            fields.sort();
            (target, fields)
        };
        let (direct, hyper) = (fields(&heads[0]), fields(&heads[1]));
        assert_eq!(direct, hyper);
        assert_eq!(direct.0, path);
        assert!(heads[0].starts_with("GET /p%20q/r?x=1&y=%2F HTTP/1.1\r\n"));
        assert!(heads[0].contains("\r\nx-multi: a\r\nx-multi: b\r\n"));
        assert!(heads[0].contains("\r\nx-utf8: caf\u{e9}\r\n"));
        assert!(
            !heads[0].contains("x-hop"),
            "hop-by-hop fields are not forwarded"
        );
        assert!(heads[1].contains("\r\ncontent-length: 7\r\n"));
        assert_eq!(
            upstream.accepted(),
            1,
            "the POST took the GET's idle connection"
        );
    })
    .await;
}

#[tokio::test]
async fn a_body_the_caller_abandons_never_leaves_its_rest_for_the_next_request() {
    bounded(async {
        const SIZE: usize = 1 << 20;
        let mut wire = format!("HTTP/1.1 200 OK\r\ncontent-length: {SIZE}\r\n\r\n").into_bytes();
        wire.resize(wire.len() + SIZE, b'x');
        let wire = Bytes::from(wire);
        let next = whole(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nnext");
        for client in [Client::Direct, Client::Hyper] {
            // The rest of the body comes once the caller has hung up.
            let gate = Arc::new(Notify::new());
            let big = Answer {
                parts: vec![wire.slice(..64 << 10), wire.slice(64 << 10..)],
                pause: Duration::ZERO,
                gate: Some(Arc::clone(&gate)),
            };
            // A new connection serves the whole body at once.
            let upstream = Scripted::start(vec![
                vec![big, next.clone()],
                vec![Answer {
                    parts: vec![wire.clone()],
                    pause: Duration::ZERO,
                    gate: None,
                }],
            ])
            .await;
            let proxy = start_proxy(&policy(upstream.addr));
            // Read the head and one frame of the body, then hang up.
            let stream = TcpStream::connect(proxy.outbound).await.expect("connect");
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .expect("handshake");
            let conn = tokio::spawn(conn);
            let (method, body) = client.request();
            let req = Request::builder()
                .method(method)
                .uri("/")
                .header("host", "svc")
                .body(full(body))
                .expect("request");
            let res = sender.send_request(req).await.expect("response head");
            assert_eq!(res.status(), 200);
            let mut body = res.into_body();
            let frame = body.frame().await.expect("a frame").expect("a good frame");
            assert!(frame.is_data(), "{client:?}");
            drop((body, sender));
            conn.abort();
            gate.notify_one();
            // The proxy notices and lets the upstream connection go; one given back to the pool
            // with the rest of the body unread would stay open.
            let active = format!(
                "outrider_upstream_connections_active{{endpoint=\"{}\",service=\"svc\"}}",
                upstream.addr
            );
            let mut closed = false;
            for _ in 0..500 {
                if proxy.metric(&active).await == 0.0 {
                    closed = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(closed, "{client:?}: the abandoned connection is still open");
            let reply = client.call(&proxy).await.expect("response head").complete();
            assert_eq!(reply.status, 200, "{client:?}");
            assert_eq!(reply.body.len(), SIZE, "{client:?}: a whole new response");
            assert!(reply.body.iter().all(|&b| b == b'x'), "{client:?}");
            assert_eq!(
                upstream.accepted(),
                2,
                "{client:?}: the abandoned connection closes"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn a_body_sent_where_none_belongs_is_never_taken_for_the_next_response() {
    bounded(async {
        // Both must have no body; the upstream sends one anyway.
        for (method, status) in [(Method::HEAD, 200), (Method::GET, 304)] {
            let head = match status {
                200 => &b"HTTP/1.1 200 OK\r\ncontent-length: 25\r\n\r\n"[..],
                _ => b"HTTP/1.1 304 Not Modified\r\ncontent-length: 25\r\n\r\n",
            };
            let mut wire = head.to_vec();
            wire.extend_from_slice(b"HTTP/1.1 200 OK\r\n\r\nSTALE");
            let upstream = Scripted::start(vec![
                vec![Answer {
                    parts: vec![Bytes::from(wire)],
                    pause: Duration::ZERO,
                    gate: None,
                }],
                vec![whole(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfresh")],
            ])
            .await;
            let proxy = start_proxy(&policy(upstream.addr));
            let reply = fetch(&proxy, Via::Http1, method.clone(), "/", &[])
                .await
                .complete();
            assert_eq!((reply.status, reply.body.len()), (status, 0), "{method}");
            let next = get(&proxy, "/").await.complete();
            assert_eq!(next.summary(), ok("fresh"), "after {method} {status}");
            assert_eq!(upstream.accepted(), 2, "{method} {status}");
        }
    })
    .await;
}

// The HTTP/1.1 client contract (`proxy/src/pool/contract.rs`): every case of a table goes
// through both clients, each on a proxy and an upstream of its own, and what the caller and
// the upstream saw must be the same. The same method goes through both: without a body it is
// the proxy's own exchange, with one (`payload`) hyper's client.

/// The most a response head may have (`MAX_HEAD_BYTES`).
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// What the upstream's first connection does (`script`, request after request) for requests
/// of `method`; every later connection answers `good` to each request. `status` is what the
/// first caller must get, through both clients (0: no response head, as when the body breaks
/// off before its first byte, the head still unsent).
struct Contract {
    what: &'static str,
    method: Method,
    script: Vec<Answer>,
    status: u16,
}

fn contract(what: &'static str, method: Method, script: Vec<Answer>, status: u16) -> Contract {
    Contract {
        what,
        method,
        script,
        status,
    }
}

/// A request's outcome as the caller saw it: status, `x-outrider-error`, body (in both, the
/// upstream's address written `UPSTREAM`), whether the body broke off, trailers. A caller that
/// got no response head sees status 0 and the error as its body.
type Seen = (u16, Option<String>, String, bool, Vec<(String, String)>);

/// All a case showed through one client: each of its requests as the caller saw it, then how
/// many connections the upstream accepted and how many requests it read.
#[derive(Debug, PartialEq)]
struct Outcome {
    requests: Vec<Seen>,
    connections: usize,
    requests_read: usize,
}

/// Requests each case sends, one after the other: enough for one to find the first
/// connection reused (or not) after the case's answer.
const CONTRACT_REQUESTS: usize = 2;

async fn contract_outcome(case: &Contract, client: Client) -> Outcome {
    let good = whole(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\ngood");
    let upstream = Scripted::start(vec![case.script.clone(), vec![good; CONTRACT_REQUESTS]]).await;
    let proxy = start_proxy(&policy(upstream.addr));
    let body: &'static [u8] = match client {
        Client::Direct => b"",
        Client::Hyper => b"payload",
    };
    let addr = upstream.addr.to_string();
    let mut requests = Vec::new();
    for _ in 0..CONTRACT_REQUESTS {
        let reply = match try_fetch(&proxy, Via::Http1, case.method.clone(), "/", &[], body).await {
            Ok(reply) => reply,
            // The head was on its way when the body failed: the caller gets no response.
            Err(error) => {
                requests.push((0, None, error.to_string(), true, Vec::new()));
                continue;
            }
        };
        requests.push((
            reply.status,
            reply
                .header("x-outrider-error")
                .map(|e| e.replace(&addr, "UPSTREAM")),
            String::from_utf8_lossy(&reply.body).replace(&addr, "UPSTREAM"),
            reply.error.is_some(),
            trailer_list(&reply),
        ));
    }
    Outcome {
        requests,
        connections: upstream.accepted(),
        requests_read: upstream.request_lines().len(),
    }
}

/// Runs every case through both clients; each must give the same outcome, with the status
/// the case names for its first request.
async fn both_clients_alike(cases: Vec<Contract>) {
    for case in &cases {
        bounded(async {
            let direct = contract_outcome(case, Client::Direct).await;
            let hyper = contract_outcome(case, Client::Hyper).await;
            assert_eq!(direct, hyper, "{}: direct, then hyper", case.what);
            assert_eq!(direct.requests[0].0, case.status, "{}", case.what);
        })
        .await;
    }
}

/// A response whose head (status line to the blank line) is `len` bytes long, padded by one
/// header field, with a 2-byte body.
fn head_of(len: usize) -> Answer {
    let start = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-pad: ";
    let end = "\r\n\r\n";
    let pad = "a".repeat(len - start.len() - end.len());
    owned(format!("{start}{pad}{end}ok"))
}

/// A response with `count` header fields in all.
fn fields(count: usize) -> Answer {
    let extra: String = (1..count).map(|i| format!("x-{i}: {i}\r\n")).collect();
    owned(format!(
        "HTTP/1.1 200 OK\r\n{extra}content-length: 2\r\n\r\nok"
    ))
}

/// A chunked response with `count` trailer fields of `size` bytes each.
fn trailers(count: usize, size: usize) -> Answer {
    let value = "t".repeat(size.saturating_sub(8));
    let fields: String = (0..count)
        .map(|i| format!("t-{i:03}: {value}\r\n"))
        .collect();
    // The trailers apart from the data, so that the data reaches the caller whichever client
    // read it before the trailers fail.
    Answer {
        parts: vec![
            Bytes::from_static(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n"),
            Bytes::from(format!("0\r\n{fields}\r\n")),
        ],
        pause: SPLIT_PAUSE,
        gate: None,
    }
}

#[tokio::test]
async fn response_heads_meet_the_same_limits_through_both_clients() {
    both_clients_alike(vec![
        contract("head of exactly the limit", Method::GET, vec![head_of(MAX_HEAD_BYTES)], 200),
        contract("head one byte over the limit", Method::GET, vec![head_of(MAX_HEAD_BYTES + 1)], 502),
        contract("head of 100 KiB", Method::GET, vec![head_of(100 << 10)], 502),
        contract("head of 512 KiB", Method::GET, vec![head_of(512 << 10)], 502),
        contract("100 header fields", Method::GET, vec![fields(100)], 200),
        contract("101 header fields", Method::GET, vec![fields(101)], 502),
        contract(
            "obsolete line folding",
            Method::GET,
            vec![whole(b"HTTP/1.1 200 OK\r\nx-a: one\r\n two\r\ncontent-length: 2\r\n\r\nok")],
            502,
        ),
        contract(
            "100 Continue, then the response",
            Method::GET,
            vec![whole(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")],
            200,
        ),
        contract(
            "103 Early Hints, then the response",
            Method::GET,
            vec![whole(b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")],
            200,
        ),
        contract(
            "101 to a request that asked no upgrade",
            Method::GET,
            vec![whole(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: foo\r\nconnection: upgrade\r\n\r\nLEAKED")],
            502,
        ),
        contract("closed before the head", Method::GET, vec![silence()], 502),
        contract("closed mid-head", Method::GET, vec![whole(b"HTTP/1.1 200 OK\r\ncontent-le")], 502),
    ])
    .await;
}

#[tokio::test]
async fn response_bodies_and_connections_are_handled_alike_through_both_clients() {
    let first = || whole(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfirst");
    both_clients_alike(vec![
        contract(
            "transfer-encoding: gzip, chunked",
            Method::GET,
            vec![whole(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")],
            502,
        ),
        contract(
            "transfer-encoding: chunked, gzip",
            Method::GET,
            vec![whole(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\nLEAKED")],
            502,
        ),
        contract(
            "chunked and a content-length",
            Method::GET,
            vec![whole(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 9\r\n\r\n2\r\nok\r\n0\r\n\r\n")],
            200,
        ),
        contract(
            "a bad chunk size",
            Method::GET,
            vec![whole(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nLEAKED\r\n0\r\n\r\n")],
            0,
        ),
        contract(
            "a chunk size past 64 bits",
            Method::GET,
            vec![whole(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n10000000000000000\r\nLEAKED\r\n0\r\n\r\n")],
            0,
        ),
        contract(
            "a chunk size with an extension and whitespace",
            Method::GET,
            vec![whole(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2 ;a=b\r\nok\r\n0\r\n\r\n")],
            200,
        ),
        contract(
            "chunk data not ended by CRLF",
            Method::GET,
            // Apart: a failure in the same read as the data before it can cut that data from
            // what the caller gets, and with the bodiless exchange it does (the proxy has not
            // written it when the error comes); the table compares parsing, not that timing.
            vec![split(&[b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok", b"XX0\r\n\r\n"])],
            200,
        ),
        contract("trailers", Method::GET, vec![trailers(2, 16)], 200),
        contract("100 trailer fields", Method::GET, vec![trailers(100, 16)], 200),
        contract("101 trailer fields", Method::GET, vec![trailers(101, 16)], 200),
        contract("a trailer section of 80 KiB", Method::GET, vec![trailers(20, 4096)], 200),
        contract(
            "closed after the head",
            Method::GET,
            // The close apart from the head: written together, whether the head reaches the
            // caller before the close is seen is a race (hyper's server writes a head whose
            // body has not failed yet), in both clients.
            vec![split(&[b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n", b""])],
            200,
        ),
        contract(
            "closed mid-body",
            Method::GET,
            // The close apart from the data, as for the chunk cases above.
            vec![split(&[b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n", b"hello", b""])],
            200,
        ),
        contract(
            "a body until the close",
            Method::GET,
            vec![whole(b"HTTP/1.1 200 OK\r\n\r\nuntil close")],
            200,
        ),
        contract(
            "HEAD with a content-length",
            Method::HEAD,
            vec![whole(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"); 2],
            200,
        ),
        contract(
            "204 with a content-length",
            Method::GET,
            vec![whole(b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n"); 2],
            204,
        ),
        contract(
            "304 with a content-length",
            Method::GET,
            vec![whole(b"HTTP/1.1 304 Not Modified\r\ncontent-length: 5\r\n\r\n"); 2],
            304,
        ),
        // Whether the connection is kept, and what a reused one closing does.
        contract("keep-alive", Method::GET, vec![first(), first()], 200),
        contract(
            "connection: close",
            Method::GET,
            vec![
                whole(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 5\r\n\r\nfirst"),
                first(),
            ],
            200,
        ),
        contract(
            "HTTP/1.0 without keep-alive",
            Method::GET,
            vec![
                whole(b"HTTP/1.0 200 OK\r\ncontent-length: 5\r\n\r\nfirst"),
                first(),
            ],
            200,
        ),
        contract(
            "HTTP/1.0 with keep-alive",
            Method::GET,
            vec![
                whole(
                    b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 5\r\n\r\nfirst",
                ),
                first(),
            ],
            200,
        ),
        // A POST that a reused connection took and closed on without an answer may have been
        // acted on: neither client sends it again.
        contract(
            "reused, closed after a POST",
            Method::POST,
            vec![first(), silence()],
            200,
        ),
    ])
    .await;
}
