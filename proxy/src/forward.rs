//! The request path: pick the target from the policy in force, rewrite the request for the
//! upstream, send it through the endpoint's pool, stream the response back. Failures become
//! responses in one place ([`crate::errors::rescue`]).

use std::convert::Infallible;
use std::error::Error as _;
use std::net::SocketAddr;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use outrider_config::Protocol;
use tokio::time::Instant;

use crate::body::ProxyBody;
use crate::connect::ConnectError;
use crate::errors::{rescue, ProxyError};
use crate::headers;
use crate::snapshot::{Snapshot, Target};
use crate::Shared;

/// Which listener a request arrived on; decides how its target is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// The shared outbound port: routed by authority and path.
    Outbound,
    /// A service's dedicated port, identified by the `listen:` address in the policy.
    Dedicated(SocketAddr),
    /// The inbound port: to the local app.
    Inbound,
}

/// Serves one request that arrived on a listener of `kind` from `peer`.
pub async fn handle(
    shared: Arc<Shared>,
    kind: ListenerKind,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    let grpc = headers::is_grpc(&req);
    let routed = {
        let snapshot = shared.snapshot.load();
        match select_target(&snapshot, kind, &req) {
            Ok((target, authority)) => Ok((Arc::clone(target), authority)),
            Err(error) => {
                let response = rescue(&error, grpc);
                snapshot
                    .unrouted
                    .record(response.status(), started.elapsed().as_secs_f64());
                Err(response)
            }
        }
    };
    let (target, authority) = match routed {
        Ok(routed) => routed,
        Err(response) => return Ok(response),
    };
    let response = match forward(&target, authority, peer, req).await {
        Ok(response) => response,
        Err(error) => {
            tracing::debug!(service = %target.upstream.spec.name, %error, "request failed");
            rescue(&error, grpc)
        }
    };
    target
        .metrics
        .record(response.status(), started.elapsed().as_secs_f64());
    Ok(response)
}

/// Checks the request and finds its target and authority in the policy in force.
fn select_target<'s>(
    snapshot: &'s Snapshot,
    kind: ListenerKind,
    req: &Request<Incoming>,
) -> Result<(&'s Arc<Target>, Option<Authority>), ProxyError> {
    headers::check_request(req)?;
    let authority = headers::request_authority(req)?;
    let target = match kind {
        ListenerKind::Outbound => {
            let host = authority.as_ref().map_or("", Authority::host);
            snapshot
                .route(host, req.uri().path())
                .ok_or_else(|| ProxyError::NoRoute(host.to_string()))?
        }
        ListenerKind::Dedicated(listen) => snapshot.dedicated(listen).ok_or_else(|| {
            ProxyError::NotConfigured(format!("no service listens on {listen} in the policy"))
        })?,
        ListenerKind::Inbound => snapshot
            .inbound()
            .ok_or_else(|| ProxyError::NotConfigured("no inbound app in the policy".into()))?,
    };
    Ok((target, authority))
}

async fn forward(
    target: &Target,
    authority: Option<Authority>,
    peer: SocketAddr,
    mut req: Request<Incoming>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let upstream = &target.upstream;
    let endpoint = upstream.pick()?;
    let upgrade = headers::is_upgrade(&req);
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

    let (mut parts, body) = req.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers, upgrade);
    // The downstream's 100-continue is answered by our server when the body is first read;
    // passing Expect on would make the upstream wait for an interim response we never relay.
    parts.headers.remove(header::EXPECT);
    headers::append_forwarded(&mut parts.headers, peer.ip());
    headers::ensure_request_id(&mut parts.headers);

    let authority = match authority {
        Some(a) => a,
        // HTTP/1.0 without Host on a dedicated or inbound port: name the service.
        None => Authority::try_from(upstream.spec.name.as_bytes())
            .map_err(|_| ProxyError::BadRequest("request has no authority"))?,
    };
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(Scheme::HTTP);
    uri.authority = Some(authority);
    uri.path_and_query = Some(
        parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    parts.uri =
        Uri::from_parts(uri).map_err(|_| ProxyError::BadRequest("invalid request target"))?;
    match upstream.spec.protocol {
        Protocol::Http1 => parts.version = Version::HTTP_11,
        Protocol::Http2 => {
            parts.version = Version::HTTP_2;
            // HTTP/2 carries the authority in :authority (RFC 9113 §8.3.1).
            parts.headers.remove(header::HOST);
        }
    }

    let _in_flight = endpoint.start_request();
    let mut response = endpoint
        .client
        .request(Request::from_parts(parts, body))
        .await
        .map_err(|e| classify(&e, endpoint.addr))?;

    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(downstream) = downstream_upgrade {
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            tokio::spawn(tunnel(downstream, upstream_upgrade));
        }
    } else {
        headers::strip_hop_by_hop(response.headers_mut(), false);
    }
    Ok(response.map(ProxyBody::Upstream))
}

/// Copies bytes both ways between an upgraded downstream and upstream connection.
async fn tunnel(downstream: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (downstream, upstream) = match tokio::try_join!(downstream, upstream) {
        Ok(pair) => pair,
        Err(error) => {
            tracing::debug!(%error, "upgrade failed");
            return;
        }
    };
    let mut downstream = TokioIo::new(downstream);
    let mut upstream = TokioIo::new(upstream);
    if let Err(error) = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await {
        tracing::debug!(%error, "upgraded connection ended with an error");
    }
}

/// Maps a client error to the proxy's own failure kinds.
fn classify(error: &hyper_util::client::legacy::Error, addr: SocketAddr) -> ProxyError {
    let mut source = error.source();
    while let Some(cause) = source {
        if let Some(connect) = cause.downcast_ref::<ConnectError>() {
            return match connect {
                ConnectError::Refused(addr) => ProxyError::ConnectRefused(*addr),
                ConnectError::Timeout { addr, after } => ProxyError::ConnectTimeout {
                    addr: *addr,
                    after: *after,
                },
                ConnectError::Io { addr, source } => ProxyError::Connect {
                    addr: *addr,
                    reason: std::io::Error::new(source.kind(), source.to_string()),
                },
            };
        }
        if let Some(hyper_error) = cause.downcast_ref::<hyper::Error>() {
            if hyper_error.is_parse() {
                return ProxyError::Upstream {
                    addr,
                    reason: "invalid response".into(),
                };
            }
            return ProxyError::UpstreamReset(addr);
        }
        source = cause.source();
    }
    ProxyError::Upstream {
        addr,
        reason: error.to_string(),
    }
}

/// A static header value for responses the admin port and demo produce.
pub(crate) fn text_plain() -> HeaderValue {
    HeaderValue::from_static("text/plain; charset=utf-8")
}
