//! `--demo`: the embedded example policy plus tiny echo upstreams on the addresses it names,
//! so the proxy can be tried with nothing else running.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use outrider_config::Policy;
use tokio::net::TcpListener;

use crate::io::body::ProxyBody;

/// The example policy the demo serves.
pub const DEMO_POLICY: &str = include_str!("../../deploy/examples/demo.yaml");

/// Starts an echo server on every endpoint of `policy` and on its inbound app. Each answers
/// with JSON naming the service, the endpoint and what it received.
pub async fn start_upstreams(policy: &Policy) -> std::io::Result<()> {
    let mut servers: Vec<(String, SocketAddr)> = Vec::new();
    for (name, service) in &policy.services {
        for addr in service.endpoints.iter().flatten() {
            servers.push((name.clone(), *addr));
        }
    }
    if let Some(inbound) = &policy.inbound {
        servers.push(("app".into(), inbound.app));
    }
    for (name, addr) in servers {
        let listener = TcpListener::bind(addr).await?;
        tracing::info!(service = %name, %addr, "demo upstream listening");
        tokio::spawn(serve_echo(listener, name, addr));
    }
    Ok(())
}

async fn serve_echo(listener: TcpListener, name: String, addr: SocketAddr) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let name = name.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            let body = serde_json::json!({
                "service": name,
                "endpoint": addr.to_string(),
                "method": req.method().as_str(),
                "path": req.uri().path(),
                "version": format!("{:?}", req.version()),
                "x-request-id": req.headers().get("x-request-id").and_then(|v| v.to_str().ok()),
                "x-forwarded-for": req.headers().get("x-forwarded-for").and_then(|v| v.to_str().ok()),
            });
            let mut text = body.to_string();
            text.push('\n');
            async move { Ok::<_, Infallible>(Response::new(ProxyBody::full(Bytes::from(text)))) }
        });
        tokio::spawn(async move {
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
