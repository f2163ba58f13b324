//! WebSocket through the real proxy binary: a tokio-tungstenite client upgrades an HTTP/1.1
//! connection to the proxy (routed by `Host: ws` on the outbound port, or on the service's
//! dedicated port) and talks to a tokio-tungstenite echo server. Proves the upgrade handshake
//! is relayed intact (101 with a valid `Sec-WebSocket-Accept`), that text and 64 KiB binary
//! messages cross byte for byte in both directions, that ping/pong works, and that the close
//! handshake completes cleanly on both ends.

#![allow(clippy::unwrap_used, missing_docs)]

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::header::{HeaderValue, HOST};
use outrider_e2e::start_proxy;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{accept_hdr_async, client_async};

/// Bound on every single await of a test.
const STEP: Duration = Duration::from_secs(10);

/// What the echo server saw of one connection.
#[derive(Debug, Default)]
struct Session {
    host: String,
    forwarded_for: String,
    echoed: usize,
    pings: usize,
    /// The client's close frame, if one arrived.
    close: Option<CloseFrame>,
    /// The connection ended without a protocol or I/O error.
    clean: bool,
}

/// A WebSocket echo server on 127.0.0.1:0 that reports each finished connection.
struct EchoServer {
    addr: SocketAddr,
    sessions: mpsc::UnboundedReceiver<Session>,
    task: tokio::task::JoinHandle<()>,
}

impl EchoServer {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (report, sessions) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(serve(stream, report.clone()));
            }
        });
        Self {
            addr,
            sessions,
            task,
        }
    }

    /// The report of the next connection to finish.
    async fn session(&mut self) -> Session {
        timeout(STEP, self.sessions.recv())
            .await
            .expect("the echo server never finished the session")
            .unwrap()
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// tungstenite's handshake callback signature returns a large `Err` (an HTTP response).
#[allow(clippy::result_large_err)]
async fn serve(stream: TcpStream, report: mpsc::UnboundedSender<Session>) {
    let mut session = Session::default();
    let header = |req: &Request, name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let mut seen = None;
    let handshake = accept_hdr_async(stream, |req: &Request, res: Response| {
        seen = Some((header(req, "host"), header(req, "x-forwarded-for")));
        Ok(res)
    })
    .await;
    let Ok(mut ws) = handshake else {
        let _ = report.send(session);
        return;
    };
    (session.host, session.forwarded_for) = seen.unwrap_or_default();
    session.clean = loop {
        match ws.next().await {
            Some(Ok(message @ (Message::Text(_) | Message::Binary(_)))) => {
                if ws.send(message).await.is_err() {
                    break false;
                }
                session.echoed += 1;
            }
            // tungstenite answers pings itself, flushing the pong on the next read.
            Some(Ok(Message::Ping(_))) => session.pings += 1,
            // tungstenite answers the close frame itself; the stream then ends.
            Some(Ok(Message::Close(frame))) => session.close = frame,
            Some(Ok(_)) => {}
            Some(Err(_)) => break false,
            None => break true,
        }
    };
    let _ = report.send(session);
}

/// Deterministic, non-repeating-looking bytes.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| ((i * 31 + i / 251) % 251) as u8).collect()
}

/// Connects to `addr`, upgrades with `host` as the Host header (the URI's authority if `None`),
/// and runs the conversation: text, 64 KiB binary, ping/pong, close.
async fn converse(addr: SocketAddr, host: Option<&'static str>) {
    let stream = timeout(STEP, TcpStream::connect(addr))
        .await
        .unwrap()
        .unwrap();
    let mut request = format!("ws://{addr}/echo").into_client_request().unwrap();
    if let Some(host) = host {
        request
            .headers_mut()
            .insert(HOST, HeaderValue::from_static(host));
    }
    // client_async fails unless the answer is 101 with the Sec-WebSocket-Accept matching our
    // key, so the handshake crossed the proxy intact.
    let (mut ws, response) = timeout(STEP, client_async(request, stream))
        .await
        .expect("handshake timed out")
        .expect("WebSocket handshake through the proxy");
    assert_eq!(response.status(), http::StatusCode::SWITCHING_PROTOCOLS);
    assert!(
        response.headers().get("x-outrider-error").is_none(),
        "{response:?}"
    );

    let mut exchange = async |message: Message| {
        timeout(STEP, ws.send(message)).await.unwrap().unwrap();
        timeout(STEP, ws.next())
            .await
            .expect("no echo")
            .expect("connection ended")
            .expect("read failed")
    };

    let text = "hello, outrider — ünïcödé ✓";
    assert_eq!(exchange(Message::text(text)).await, Message::text(text));

    let binary = pattern(64 * 1024);
    match exchange(Message::binary(binary.clone())).await {
        Message::Binary(echoed) => {
            assert_eq!(echoed.len(), binary.len());
            assert!(echoed == binary, "binary message corrupted on the way");
        }
        other => panic!("expected a binary echo, got {other:?}"),
    }

    assert_eq!(
        exchange(Message::Ping("are you there".into())).await,
        Message::Pong("are you there".into())
    );

    // Close handshake: our close frame, the server's echo of it, then the end of the stream.
    let bye = CloseFrame {
        code: CloseCode::Normal,
        reason: "done".into(),
    };
    timeout(STEP, ws.close(Some(bye.clone())))
        .await
        .unwrap()
        .unwrap();
    match timeout(STEP, ws.next()).await.expect("no close reply") {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Normal),
        other => panic!("expected the server's close frame, got {other:?}"),
    }
    let end = timeout(STEP, ws.next())
        .await
        .expect("connection not closed after the close handshake");
    assert!(end.is_none(), "expected the end of the stream: {end:?}");
}

fn assert_session(session: &Session, host: &str) {
    assert_eq!(session.host, host, "{session:?}");
    // Added by the proxy: the connection really crossed it.
    assert_eq!(session.forwarded_for, "127.0.0.1", "{session:?}");
    assert_eq!(session.echoed, 2, "{session:?}");
    assert_eq!(session.pings, 1, "{session:?}");
    let close = session
        .close
        .as_ref()
        .expect("the server got no close frame");
    assert_eq!(close.code, CloseCode::Normal);
    assert_eq!(close.reason, "done");
    assert!(session.clean, "{session:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_outbound_port() {
    let mut server = EchoServer::start().await;
    let proxy = start_proxy(&format!(
        "services:
  ws:
    endpoints: [{}]
    protocol: http1
routes:
  - match: {{ authority: ws }}
    service: ws
",
        server.addr
    ));
    converse(proxy.outbound, Some("ws")).await;
    assert_session(&server.session().await, "ws");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_dedicated_port() {
    let mut server = EchoServer::start().await;
    let proxy = start_proxy(&format!(
        "services:
  ws:
    endpoints: [{}]
    listen: 127.0.0.1:0
    protocol: http1
",
        server.addr
    ));
    let port = proxy.dedicated("ws");
    converse(port, None).await;
    assert_session(&server.session().await, &port.to_string());
}
