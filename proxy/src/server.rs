//! Accept loops for the data-plane listeners (HTTP/1.1 and prior-knowledge HTTP/2 on the same
//! port) and their graceful drain.

use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::errors::{self, ProxyError};
use crate::forward::{self, ListenerKind};
use crate::identity::PEER_IDENTITY_HEADER;
use crate::{headers, tls, Shared};

/// Largest request head accepted; larger ones are answered 431 (HTTP/1.1) or refused by
/// HTTP/2 with 431. Envoy's default is 60 KiB.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// A client must send its request head within this time (slowloris guard).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `listener` until `stop` turns true, then stops accepting and drains: HTTP/1.1
/// connections close after their in-flight request (`Connection: close`), HTTP/2 ones get
/// GOAWAY. Returns when every connection has ended; the caller bounds that by the drain timeout.
pub async fn serve(
    listener: TcpListener,
    kind: ListenerKind,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    // The app's outbound connections tell a shutdown when the app has gone.
                    let app_connection = (kind != ListenerKind::Inbound).then(|| shared.app.open());
                    let shared = Arc::clone(&shared);
                    let builder = builder.clone();
                    let watcher = graceful.watcher();
                    tokio::spawn(async move {
                        // Inbound: sniff plaintext from mTLS and handshake, off the accept loop.
                        let accepted = if kind == ListenerKind::Inbound {
                            let mode = shared
                                .snapshot
                                .load()
                                .policy
                                .inbound
                                .as_ref()
                                .map(|i| i.mtls)
                                .unwrap_or_default();
                            tls::accept_inbound(stream, peer, shared.mesh.as_ref(), mode).await
                        } else {
                            Some(tls::Accepted { io: tls::Io::Plain(stream), peer_identity: None })
                        };
                        let Some(tls::Accepted { io, peer_identity }) = accepted else {
                            return;
                        };
                        let caller = headers::Caller::new(peer);
                        let service = service_fn(move |mut req| {
                            let shared = Arc::clone(&shared);
                            let caller = caller.clone();
                            let denied = (kind == ListenerKind::Inbound)
                                .then(|| inbound_identity(&shared, &mut req, peer_identity.as_ref()))
                                .flatten();
                            async move {
                                match denied {
                                    Some(error) => Ok(errors::rescue(&error, headers::is_grpc(&req))),
                                    None => forward::handle(shared, kind, caller, req).await,
                                }
                            }
                        });
                        let conn = builder
                            .serve_connection_with_upgrades(TokioIo::new(io), service)
                            .into_owned();
                        if let Err(error) = watcher.watch(conn).await {
                            tracing::debug!(%error, "connection ended with an error");
                        }
                        drop(app_connection);
                    });
                }
                Err(error) => {
                    // Out of file descriptors, most likely: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = crate::stopped(&mut stop) => break,
        }
    }
    drop(listener);
    graceful.shutdown().await;
}

/// On the inbound port: replaces any caller-sent identity header with the verified one (none
/// for plaintext callers) and applies `inbound.authorization`; `Some` is the refusal.
fn inbound_identity<B>(
    shared: &Shared,
    req: &mut http::Request<B>,
    verified: Option<&http::HeaderValue>,
) -> Option<ProxyError> {
    let headers = req.headers_mut();
    headers.remove(PEER_IDENTITY_HEADER);
    if let Some(id) = verified {
        headers.insert(PEER_IDENTITY_HEADER, id.clone());
    }
    let snapshot = shared.snapshot.load();
    let allow = &snapshot
        .policy
        .inbound
        .as_ref()?
        .authorization
        .as_ref()?
        .allow;
    let caller = verified.map(http::HeaderValue::as_bytes);
    if caller.is_some_and(|c| allow.iter().any(|a| a.as_bytes() == c)) {
        return None;
    }
    let caller = caller.map(|c| String::from_utf8_lossy(c).into_owned());
    tracing::debug!(
        caller = caller.as_deref().unwrap_or("plaintext"),
        "inbound request refused by authorization"
    );
    Some(ProxyError::Forbidden(caller))
}
