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

use crate::forward::{self, ListenerKind};
use crate::Shared;

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
                    let service = service_fn(move |req| {
                        forward::handle(Arc::clone(&shared), kind, peer, req)
                    });
                    let conn = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .into_owned();
                    let conn = graceful.watch(conn);
                    tokio::spawn(async move {
                        if let Err(error) = conn.await {
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
