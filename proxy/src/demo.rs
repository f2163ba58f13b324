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

/// What to try once the demo is up, with the addresses as bound: printed once to stderr, so a
/// first run says more than JSON log lines.
pub fn try_these(
    outbound: SocketAddr,
    inbound: SocketAddr,
    admin: SocketAddr,
    dedicated: &[(String, SocketAddr)],
) -> String {
    let out = reachable(outbound);
    let mut lines = vec![
        format!("curl -H 'Host: payments' http://{out}/v1/charge|routed by Host, round robin over 2 endpoints"),
        format!("curl -x http://{out} http://reviews/r|as HTTP_PROXY (absolute-form), 90/10 split"),
        format!("curl --http2-prior-knowledge -H 'Host: payments' http://{out}/v1/x|HTTP/2 from the app"),
    ];
    for (name, addr) in dedicated {
        lines.push(format!(
            "curl http://{}/anything|the `listen` port of {name}",
            reachable(*addr)
        ));
    }
    lines.push(format!(
        "curl http://{}/hello|inbound, to the local app",
        reachable(inbound)
    ));
    lines.push(format!(
        "curl -i -H 'Host: nope' http://{out}/|404 with x-outrider-error"
    ));
    lines.push(format!(
        "curl http://{}/|the admin endpoints (metrics, config, ready, ...)",
        reachable(admin)
    ));
    let width = lines
        .iter()
        .filter_map(|l| l.split_once('|'))
        .map(|(c, _)| c.len())
        .max()
        .unwrap_or(0);
    let mut text = String::from("\noutrider-proxy --demo is up. Try, from another shell:\n\n");
    for line in &lines {
        if let Some((command, what)) = line.split_once('|') {
            text.push_str(&format!("  {command:<width$}   # {what}\n"));
        }
    }
    text.push_str("\nCtrl-C stops it.\n\n");
    text
}

/// A listener's address as a client on this machine reaches it (0.0.0.0 is not an address to
/// send to).
fn reachable(addr: SocketAddr) -> SocketAddr {
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    addr
}

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
