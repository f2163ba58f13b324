//! [`Rewind`]: a stream whose first bytes were read already (protocol detection, a first request
//! head, a peeked ClientHello) and are read again first, holding whatever must live as long as
//! the stream (a listener slot, a connection count). The one pass-through wrapper of the data
//! plane's streams.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// `io` after `prefix`: reads hand out `prefix` first, then go to `io`; writes go to `io`.
/// `held` is dropped with the stream.
pub struct Rewind<T, H = ()> {
    prefix: Bytes,
    io: T,
    _held: H,
}

impl<T> Rewind<T> {
    /// `io`, whose first bytes `prefix` were already read from it.
    pub fn new(prefix: Bytes, io: T) -> Self {
        Self::holding(prefix, io, ())
    }
}

impl<T, H> Rewind<T, H> {
    /// `io` after `prefix`, holding `held` while it lives.
    pub fn holding(prefix: Bytes, io: T, held: H) -> Self {
        Self {
            prefix,
            io,
            _held: held,
        }
    }

    /// Bytes still to be replayed.
    pub fn unread(&self) -> &[u8] {
        &self.prefix
    }

    /// The stream itself (bytes still to be replayed are not read from it).
    pub fn get_mut(&mut self) -> &mut T {
        &mut self.io
    }

    /// Hands out replayed bytes (once or twice per connection: out of the hot path). Advancing
    /// never allocates, whatever the `Bytes` was made from.
    #[cold]
    #[inline(never)]
    fn replay(&mut self, buf: &mut ReadBuf<'_>) {
        let n = self.prefix.len().min(buf.remaining());
        buf.put_slice(&self.prefix[..n]);
        self.prefix.advance(n);
        if self.prefix.is_empty() {
            // Free the buffer now rather than with the connection.
            self.prefix = Bytes::new();
        }
    }
}

impl<T: AsyncRead + Unpin, H: Unpin> AsyncRead for Rewind<T, H> {
    // Inline: every read of a served or pooled connection passes here, and after the replay
    // it is one length check in front of the stream's own read.
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.prefix.is_empty() {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        this.replay(buf);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin, H: Unpin> AsyncWrite for Rewind<T, H> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The prefix comes first, split over reads smaller than it; then the stream; writes pass.
    #[tokio::test]
    async fn replays_the_prefix_then_reads_the_stream() {
        let (mut peer, stream) = tokio::io::duplex(64);
        let mut rewound = Rewind::new(Bytes::from_static(b"abcde"), stream);
        peer.write_all(b"fg").await.unwrap();
        let mut three = [0u8; 3];
        rewound.read_exact(&mut three).await.unwrap();
        assert_eq!(&three, b"abc");
        assert_eq!(rewound.unread(), b"de");
        let mut four = [0u8; 4];
        rewound.read_exact(&mut four).await.unwrap();
        assert_eq!(&four, b"defg");
        assert!(rewound.unread().is_empty());
        rewound.write_all(b"back").await.unwrap();
        let mut back = [0u8; 4];
        peer.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"back");
    }

    /// What it holds lives exactly as long as the stream.
    #[tokio::test]
    async fn holds_until_dropped() {
        let held = std::sync::Arc::new(());
        let (_peer, stream) = tokio::io::duplex(8);
        let rewound = Rewind::holding(Bytes::new(), stream, std::sync::Arc::clone(&held));
        assert_eq!(std::sync::Arc::strong_count(&held), 2);
        drop(rewound);
        assert_eq!(std::sync::Arc::strong_count(&held), 1);
    }
}
