//! Opaque TCP: a captured connection the proxy does not speak (TLS the app originates, a
//! database protocol, anything undetected) copied both ways to its original destination, with
//! the bytes counted, each side's end passed on as a half-close, and an idle timeout.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::io::original_dst::{OwnSocket, OwnSockets};
use crate::telemetry::metrics::RelayCounters;

/// Bytes read per copy step (one buffer per direction per connection).
const COPY_BUFFER: usize = 16 * 1024;

/// Why a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both sides closed their end.
    Closed,
    /// Nothing moved either way for the idle timeout.
    Idle,
    /// A read or write failed (a reset, most likely).
    Error,
}

impl RelayEnd {
    /// `closed`, `idle` or `error`, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Idle => "idle",
            Self::Error => "error",
        }
    }
}

/// Why the original destination could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// No answer within the connect timeout.
    #[error("connect to {addr} timed out after {after:?}")]
    Timeout {
        /// The destination.
        addr: SocketAddr,
        /// The timeout.
        after: Duration,
    },
    /// The OS refused (nothing listens there, unreachable...).
    #[error("connect to {addr} failed: {source}")]
    Io {
        /// The destination.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Opens a TCP connection to `addr` within `timeout`, recorded as the proxy's own (see
/// [`OwnSockets`]) while it lives.
pub async fn dial(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<(TcpStream, Option<OwnSocket>), DialError> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Err(_) => {
            return Err(DialError::Timeout {
                addr,
                after: timeout,
            })
        }
        Ok(Err(source)) => return Err(DialError::Io { addr, source }),
        Ok(Ok(stream)) => stream,
    };
    let own = OwnSockets::global().record(&stream);
    let _ = stream.set_nodelay(true);
    crate::io::connection::set_keepalive(&stream);
    Ok((stream, own))
}

/// Copies `prefix` (bytes already read from the client) and then everything both ways between
/// `client` and `server` until both sides have closed, one side fails, or nothing moved for
/// `idle`. A side's end (EOF) is passed on as a write shutdown of the other, so a client that
/// half-closes still gets the rest of its answer.
pub async fn relay<C, S>(
    client: C,
    mut server: S,
    prefix: &[u8],
    idle: Duration,
    counters: &RelayCounters,
) -> RelayEnd
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    if !prefix.is_empty() {
        if server.write_all(prefix).await.is_err() {
            return RelayEnd::Error;
        }
        counters.to_upstream.inc_by(prefix.len() as u64);
    }
    let activity = AtomicU64::new(0);
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut server_read, mut server_write) = tokio::io::split(server);
    let up = copy(
        &mut client_read,
        &mut server_write,
        &counters.to_upstream,
        &activity,
    );
    let down = copy(
        &mut server_read,
        &mut client_write,
        &counters.to_downstream,
        &activity,
    );
    // A failure either way ends both: the other side's reader may wait forever otherwise
    // (a reset or a TLS peer gone without close_notify says nothing to the app); dropping the
    // streams closes them.
    let both = async {
        match tokio::try_join!(up, down) {
            Ok(((), ())) => RelayEnd::Closed,
            Err(_) => RelayEnd::Error,
        }
    };
    tokio::select! {
        end = both => end,
        () = idle_for(&activity, idle) => RelayEnd::Idle,
    }
}

/// One direction: reads until EOF, then shuts the writer down (the half-close).
async fn copy<R, W>(
    reader: &mut R,
    writer: &mut W,
    counter: &IntCounter,
    activity: &AtomicU64,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; COPY_BUFFER];
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            // A peer that has gone already may refuse the shutdown; the other way still runs.
            let _ = writer.shutdown().await;
            return Ok(());
        }
        writer.write_all(&buf[..n]).await?;
        counter.inc_by(n as u64);
        // Relaxed: a progress count read by the idle check only.
        activity.fetch_add(1, Ordering::Relaxed);
    }
}

/// Resolves once `activity` has not moved for `idle`, checked every quarter of it: the relay
/// ends between 1 and 1.25 idle timeouts after the last byte.
async fn idle_for(activity: &AtomicU64, idle: Duration) {
    let period = (idle / 4).max(Duration::from_millis(1));
    let mut seen = activity.load(Ordering::Relaxed);
    let mut quiet = Duration::ZERO;
    loop {
        tokio::time::sleep(period).await;
        let now = activity.load(Ordering::Relaxed);
        if now == seen {
            quiet = quiet.saturating_add(period);
            if quiet >= idle {
                return;
            }
        } else {
            seen = now;
            quiet = Duration::ZERO;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn counters() -> RelayCounters {
        RelayCounters {
            to_upstream: IntCounter::new("up", "up").unwrap(),
            to_downstream: IntCounter::new("down", "down").unwrap(),
        }
    }

    #[tokio::test]
    async fn copies_both_ways_counts_and_passes_a_half_close_on() {
        let (client, mut app) = tokio::io::duplex(64);
        let (server, mut upstream) = tokio::io::duplex(64);
        let counters = counters();
        let relay = tokio::spawn(async move {
            let counters = counters;
            let end = relay(client, server, b"PING ", Duration::from_secs(60), &counters).await;
            (end, counters)
        });
        app.write_all(b"hello").await.unwrap();
        // The client is done sending: the destination sees EOF after the prefix and data...
        app.shutdown().await.unwrap();
        let mut got = Vec::new();
        upstream.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"PING hello");
        // ...and can still answer.
        upstream.write_all(b"PONG").await.unwrap();
        upstream.shutdown().await.unwrap();
        let mut answer = Vec::new();
        app.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"PONG");
        let (end, counters) = relay.await.unwrap();
        assert_eq!(end, RelayEnd::Closed);
        assert_eq!(counters.to_upstream.get(), 10);
        assert_eq!(counters.to_downstream.get(), 4);
    }

    /// A server whose reads fail (a reset).
    struct Failing;

    impl AsyncRead for Failing {
        fn poll_read(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Err(std::io::ErrorKind::ConnectionReset.into()))
        }
    }

    impl AsyncWrite for Failing {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::task::Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    /// A failing server ends the relay at once, though the client is still open and silent:
    /// the client then sees its connection end rather than waiting for the idle timeout.
    #[tokio::test(start_paused = true)]
    async fn a_failure_one_way_ends_both_at_once() {
        let (client, mut app) = tokio::io::duplex(64);
        let start = tokio::time::Instant::now();
        let end = relay(client, Failing, b"", Duration::from_secs(60), &counters()).await;
        assert_eq!(end, RelayEnd::Error);
        assert_eq!(start.elapsed(), Duration::ZERO);
        let mut rest = Vec::new();
        app.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn ends_after_the_idle_timeout_and_not_before() {
        let (client, mut app) = tokio::io::duplex(64);
        let (server, _upstream) = tokio::io::duplex(64);
        let counters = counters();
        let idle = Duration::from_secs(60);
        let start = tokio::time::Instant::now();
        let talk = tokio::spawn(async move {
            // Traffic at 50 s keeps it open past the first 60 s.
            tokio::time::sleep(Duration::from_secs(50)).await;
            app.write_all(b"x").await.unwrap();
            app
        });
        let end = relay(client, server, b"", idle, &counters).await;
        assert_eq!(end, RelayEnd::Idle);
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_secs(110) && elapsed <= Duration::from_secs(125),
            "{elapsed:?}"
        );
        drop(talk.await.unwrap());
    }
}
