//! Bodies stream through the proxy in both directions: a 1 GiB upload and a 1 GiB download
//! pass with the proxy's peak memory staying flat, and a response chunk reaches the client
//! before the upstream has produced the next one.

#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use outrider_e2e::*;

const GIB: u64 = 1 << 30;
/// Peak RSS the proxy may reach while moving a gigabyte: far below the body, so only bounded
/// buffers fit.
const PEAK_RSS_LIMIT_KIB: u64 = 48 * 1024;

fn policy(addr: std::net::SocketAddr, protocol: &str) -> String {
    format!(
        "services:\n  bulk: {{ endpoints: [{addr}], protocol: {protocol} }}\nroutes:\n  - match: {{ authority: bulk }}\n    service: bulk\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_upload_streams_with_flat_memory() {
    // The upstream counts what it receives without keeping it.
    let server = Upstream::start(
        Proto::Http1,
        |req: Request<hyper::body::Incoming>| async move {
            let n = drain_body(req.into_body()).await;
            Response::new(full(n.to_string()))
        },
    )
    .await;
    let proxy = start_proxy(&policy(server.addr, "http1"));
    let req = Request::put(format!("http://{}/upload", proxy.outbound))
        .header("host", "bulk")
        .body(ZeroBody::new(GIB).boxed())
        .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(90), send(&http1_client(), req))
        .await
        .expect("upload took too long");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body, Bytes::from(GIB.to_string()));
    let peak = proxy.peak_rss_kib();
    eprintln!("proxy peak RSS after 1 GiB: {peak} KiB");
    assert!(peak < PEAK_RSS_LIMIT_KIB, "proxy peak RSS {peak} KiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_download_over_http2_streams_with_flat_memory() {
    let server = Upstream::start(Proto::Http2, |_req| async move {
        Response::new(ZeroBody::new(GIB).boxed())
    })
    .await;
    let proxy = start_proxy(&policy(server.addr, "http2"));
    let outbound = proxy.outbound;
    let received = tokio::time::timeout(Duration::from_secs(90), async move {
        let stream = tokio::net::TcpStream::connect(outbound).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let res = sender
            .send_request(Request::get("http://bulk/download").body(empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        drain_body(res.into_body()).await
    })
    .await
    .expect("download took too long");
    assert_eq!(received, GIB);
    let peak = proxy.peak_rss_kib();
    eprintln!("proxy peak RSS after 1 GiB: {peak} KiB");
    assert!(peak < PEAK_RSS_LIMIT_KIB, "proxy peak RSS {peak} KiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_chunks_arrive_as_they_are_sent() {
    let (ack_tx, ack_rx) = tokio::sync::mpsc::channel::<()>(1);
    let ack_rx = std::sync::Arc::new(tokio::sync::Mutex::new(ack_rx));
    // Sends "first", then "second" only after the client confirmed it received "first": a
    // proxy that buffered the response would deadlock here.
    let server = Upstream::start(Proto::Http1, move |_req| {
        let ack_rx = std::sync::Arc::clone(&ack_rx);
        async move {
            let (tx, body) = channel_body();
            tokio::spawn(async move {
                tx.send(Bytes::from_static(b"first")).await.unwrap();
                ack_rx.lock().await.recv().await;
                tx.send(Bytes::from_static(b"second")).await.unwrap();
            });
            Response::new(body)
        }
    })
    .await;
    let proxy = start_proxy(&policy(server.addr, "http1"));
    let res = http1_client()
        .request(
            Request::get(format!("http://{}/", proxy.outbound))
                .header("host", "bulk")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = res.into_body();
    assert_eq!(&next_chunk(&mut body).await[..], b"first");
    ack_tx.send(()).await.unwrap();
    assert_eq!(&next_chunk(&mut body).await[..], b"second");
}

async fn next_chunk(body: &mut hyper::body::Incoming) -> Bytes {
    tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("chunk did not arrive")
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap()
}
