//! The admin port: `/` (the list of endpoints), `/live`, `/ready`, `/metrics`, `/config`,
//! `/identity`, `/log-level` (GET, PUT), `/app-health/<container>/<kind>` (the app's own probes,
//! performed by the proxy; see `app_probe`), and `POST /shutdown` when enabled.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::app_probe::{self, AppProbes};
use crate::http::forward::text_plain;
use crate::http::shared::Shared;
use crate::io::body::ProxyBody;
use crate::io::connection::{self, FirstHead, LogLimiter};
use crate::logging::LogLevelError;

/// Serves the admin endpoints until `stop` turns true. Connections past the admin cap are
/// closed at accept; each must send its first request head within the header-read timeout and
/// the next within the idle timeout.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    app_probes: Arc<AppProbes>,
    mut stop: watch::Receiver<bool>,
) {
    let budget = Arc::clone(&shared.connections.admin);
    let timeouts = shared.connections.timeouts;
    let mut refusals = LogLimiter::default();
    let mut accept_errors = LogLimiter::default();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors, most likely: back off instead of spinning.
                        if let Some(errors) = accept_errors.hit(Instant::now()) {
                            tracing::warn!(%error, errors, "admin accept failed");
                        }
                        tokio::time::sleep(connection::ACCEPT_ERROR_PAUSE).await;
                        continue;
                    }
                };
                let Some(slot) = budget.try_acquire() else {
                    drop(stream);
                    budget.log_refusal(&mut refusals);
                    continue;
                };
                let shared = Arc::clone(&shared);
                let app_probes = Arc::clone(&app_probes);
                let budget = Arc::clone(&budget);
                tokio::spawn(async move {
                    let mut stream = stream;
                    let deadline = connection::deadline_after(timeouts.header_read);
                    let first = connection::read_first_head(&mut stream, deadline).await;
                    match first.head {
                        FirstHead::Http1 | FirstHead::Http2 => {}
                        FirstHead::Closed => return,
                        FirstHead::TimedOut => {
                            budget.metrics.header_read_timeouts.inc();
                            if first.partial_http1() {
                                connection::answer_request_timeout(&mut stream).await;
                            }
                            return;
                        }
                    }
                    let service = service_fn(move |req: Request<Incoming>| {
                        let shared = Arc::clone(&shared);
                        let app_probes = Arc::clone(&app_probes);
                        async move {
                            if req.uri().path() == "/log-level" {
                                return Ok::<_, Infallible>(log_level(peer, req).await);
                            }
                            if let Some(name) = req.uri().path().strip_prefix(app_probe::PATH_PREFIX) {
                                return Ok(app_health(&app_probes, name, req.method()).await);
                            }
                            Ok::<_, Infallible>(respond(&shared, !app_probes.is_empty(), peer, &req))
                        }
                    });
                    let io = crate::io::rewind::Rewind::holding(first.bytes, stream, slot);
                    let served = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        // From the end of a response to the next complete head.
                        .header_read_timeout(timeouts.idle)
                        .serve_connection(TokioIo::new(io), service)
                        .await;
                    if served.is_err_and(|e| e.is_timeout()) {
                        budget.metrics.idle_timeouts.inc();
                    }
                });
            }
            () = crate::core::shutdown::stopped(&mut stop) => return,
        }
    }
}

fn respond(
    shared: &Shared,
    has_app_probes: bool,
    peer: SocketAddr,
    req: &Request<Incoming>,
) -> Response<ProxyBody> {
    let get = req.method() == Method::GET || req.method() == Method::HEAD;
    if req.uri().path() == "/shutdown" && shared.shutdown_endpoint {
        return shutdown(shared, peer, req.method());
    }
    match (get, req.uri().path()) {
        (true, "/live") => text(StatusCode::OK, "live\n"),
        (true, "/ready") => {
            let (status, state) = if shared.draining.load(Ordering::Acquire) {
                (StatusCode::SERVICE_UNAVAILABLE, "draining")
            } else if shared.mesh.as_ref().is_some_and(|mesh| !mesh.ready()) {
                // Mesh TLS is configured: without a certificate no peer can be reached or
                // accepted, so the pod must not get traffic yet.
                (StatusCode::SERVICE_UNAVAILABLE, "no workload certificate")
            } else if shared.ready.load(Ordering::Acquire) {
                (StatusCode::OK, "ready")
            } else {
                (StatusCode::SERVICE_UNAVAILABLE, "not ready")
            };
            let mut body = format!(
                "{state} source={} fresh={} version={}",
                shared.status.source().as_str(),
                shared.status.fresh(),
                shared.snapshot.load().version,
            );
            // Still ready (the policy in force serves), but a restart now would start from an
            // older file or none: said here, and counted in the metrics.
            if let Some(error) = shared.status.persist().error() {
                let _ = write!(body, " persisted=false persist_error={error:?}");
            }
            // Ready all the same (the defaults may be all a workload needs), but a misspelt
            // --workload shows here rather than as 404s.
            if shared.status.unselected() {
                body.push_str(" workload_named=false note=\"no policy document names this workload; it runs only the defaults\"");
            }
            body.push('\n');
            with_type(status, Bytes::from(body), text_plain())
        }
        (true, "/metrics") => with_type(
            StatusCode::OK,
            {
                shared.snapshot.load().refresh_breakers();
                Bytes::from(shared.metrics.encode())
            },
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        ),
        (true, "/config") => with_type(
            StatusCode::OK,
            config_json(shared),
            HeaderValue::from_static("application/json"),
        ),
        (true, "/identity") => with_type(
            StatusCode::OK,
            identity_json(shared),
            HeaderValue::from_static("application/json"),
        ),
        (true, "/") => {
            let mut index = String::from(INDEX);
            if has_app_probes {
                index.push_str(INDEX_APP_PROBES);
            }
            if shared.shutdown_endpoint {
                index.push_str(INDEX_SHUTDOWN);
            }
            with_type(StatusCode::OK, Bytes::from(index), text_plain())
        }
        (false, "/" | "/live" | "/ready" | "/metrics" | "/config" | "/identity") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// `GET /app-health/<container>/<kind>`: the app's original probe, performed now within its
/// own timeout: 200 if the kubelet would count it a success, else 503; the body says why.
async fn app_health(probes: &AppProbes, name: &str, method: &Method) -> Response<ProxyBody> {
    if method != Method::GET && method != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    let Some(verdict) = probes.check(name).await else {
        return text(StatusCode::NOT_FOUND, "no such app probe\n");
    };
    let status = if verdict.healthy {
        StatusCode::OK
    } else {
        tracing::debug!(probe = name, reason = %verdict.reason, "app probe failed");
        StatusCode::SERVICE_UNAVAILABLE
    };
    with_type(status, Bytes::from(app_probe::body(&verdict)), text_plain())
}

/// `GET /`: the endpoints of this port, one a line, so a first visit finds its way.
const INDEX: &str = "outrider-proxy admin endpoints:
GET  /live        200 while the process runs
GET  /ready       200 once a policy is in force (the body says its source and version)
GET  /metrics     Prometheus text
GET  /config      the policy in force, as JSON
GET  /identity    the workload certificate held (mesh TLS)
GET  /log-level   the log filter in force; PUT one (loopback callers only)
";

/// The index's line for `POST /shutdown`, listed when `--shutdown-endpoint` enables it.
const INDEX_SHUTDOWN: &str = "POST /shutdown    start draining and exit (loopback callers only)\n";

/// The index's line for the app probes, listed when the pod's probes were handed to the proxy.
const INDEX_APP_PROBES: &str =
    "GET  /app-health/<container>/<kind>  the app's own probe, performed by the proxy\n";

/// Longest `PUT /log-level` body read.
const LOG_LEVEL_BODY_LIMIT: usize = 1024;

/// `GET /log-level` shows the filter in force; `PUT /log-level` with a `tracing` filter as the
/// body (`debug`, `outrider_proxy=debug,info`) replaces it. Loopback callers only, like
/// `/shutdown`: a `trace` filter set from outside the pod could flood its logs.
async fn log_level(peer: SocketAddr, req: Request<Incoming>) -> Response<ProxyBody> {
    match *req.method() {
        Method::GET | Method::HEAD => {
            return match crate::logging::current_filter() {
                Some(filter) => with_type(
                    StatusCode::OK,
                    Bytes::from(format!("{filter}\n")),
                    text_plain(),
                ),
                None => text(StatusCode::NOT_IMPLEMENTED, "log level is not adjustable\n"),
            };
        }
        Method::PUT => {}
        _ => return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
    }
    if !is_loopback(peer) {
        tracing::warn!(%peer, "PUT /log-level refused: not a loopback caller");
        return text(StatusCode::FORBIDDEN, "loopback callers only\n");
    }
    let body = match Limited::new(req.into_body(), LOG_LEVEL_BODY_LIMIT)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(_) => return text(StatusCode::PAYLOAD_TOO_LARGE, "filter too long\n"),
    };
    let Ok(filter) = std::str::from_utf8(&body) else {
        return text(StatusCode::BAD_REQUEST, "filter is not UTF-8\n");
    };
    match crate::logging::set_filter(filter) {
        Ok(shown) => {
            tracing::info!(%peer, filter = %shown, "log filter changed");
            with_type(
                StatusCode::OK,
                Bytes::from(format!("{shown}\n")),
                text_plain(),
            )
        }
        Err(error @ LogLevelError::Invalid(_)) => with_type(
            StatusCode::BAD_REQUEST,
            Bytes::from(format!("{error}\n")),
            text_plain(),
        ),
        Err(LogLevelError::NotInstalled) => {
            text(StatusCode::NOT_IMPLEMENTED, "log level is not adjustable\n")
        }
    }
}

/// `POST /shutdown`: for Jobs on clusters without native sidecars, whose app tells its proxy
/// it is done. The admin port listens on every address in a pod (probes, scraping), so only
/// callers inside the pod's own network namespace, on loopback, may stop the proxy.
fn shutdown(shared: &Shared, peer: SocketAddr, method: &Method) -> Response<ProxyBody> {
    if method != Method::POST {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    if !is_loopback(peer) {
        tracing::warn!(%peer, "POST /shutdown refused: not a loopback caller");
        return text(StatusCode::FORBIDDEN, "loopback callers only\n");
    }
    tracing::info!(%peer, "shutdown requested on the admin port");
    shared.shutdown();
    text(StatusCode::ACCEPTED, "shutting down\n")
}

/// Whether `peer` is on loopback. An admin port bound to `[::]` sees IPv4 callers as
/// IPv4-mapped IPv6 addresses (`::ffff:127.0.0.1`), which `is_loopback` alone does not count.
fn is_loopback(peer: SocketAddr) -> bool {
    peer.ip().to_canonical().is_loopback()
}

/// The policy in force with where it came from, whether it is current, the control-plane
/// replica subscribed to, and the dedicated listeners as bound. Rendered per admin request: it holds live state, and admin is not the
/// request path.
fn config_json(shared: &Shared) -> Bytes {
    let snapshot = shared.snapshot.load();
    let listeners: serde_json::Map<String, serde_json::Value> = shared
        .dedicated
        .load()
        .iter()
        .map(|(service, addr)| (service.clone(), addr.to_string().into()))
        .collect();
    let body = serde_json::json!({
        "version": snapshot.version,
        "content_hash": snapshot.content_hash,
        "source": shared.status.source(),
        "fresh": shared.status.fresh(),
        "origin": shared.origin,
        "control_replica": shared.status.control_replica().map(|replica| serde_json::json!({
            "url": &*replica.url,
            "address": replica.address,
        })),
        "listeners": listeners,
        "policy": snapshot.policy,
    });
    serde_json::to_vec_pretty(&body)
        .map(Bytes::from)
        .unwrap_or_default()
}

/// The workload identity in force: `{"mesh": false}` without mesh TLS, `"identity": null`
/// until the first certificate arrives.
fn identity_json(shared: &Shared) -> Bytes {
    let body = match &shared.mesh {
        None => serde_json::json!({ "mesh": false }),
        Some(mesh) => match mesh.held() {
            None => serde_json::json!({ "mesh": true, "identity": null }),
            Some(held) => serde_json::json!({
                "mesh": true,
                "identity": &*held.identity,
                "not_before": held.not_before,
                "not_after": held.not_after,
            }),
        },
    };
    serde_json::to_vec_pretty(&body)
        .map(Bytes::from)
        .unwrap_or_default()
}

fn text(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    with_type(status, Bytes::from_static(body.as_bytes()), text_plain())
}

fn with_type(status: StatusCode, body: Bytes, content_type: HeaderValue) -> Response<ProxyBody> {
    let mut response = Response::new(ProxyBody::full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, content_type);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_recognised_in_every_form() {
        for local in [
            "127.0.0.1:1",
            "127.9.9.9:1",
            "[::1]:1",
            "[::ffff:127.0.0.1]:1",
        ] {
            assert!(is_loopback(local.parse().expect("addr")), "{local}");
        }
        for remote in [
            "10.0.0.1:1",
            "[::ffff:10.0.0.1]:1",
            "[2001:db8::1]:1",
            "[::]:1",
        ] {
            assert!(!is_loopback(remote.parse().expect("addr")), "{remote}");
        }
    }
}
