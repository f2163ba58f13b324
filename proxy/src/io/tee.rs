//! A copy of the caller's request body, up to a bound, for request mirrors: [`Tee`] sits in the
//! primary exchange's [`Counted`](crate::io::request_body::Counted) and sees each data frame as
//! the primary upstream reads it (it never reads ahead, so the primary is never held up);
//! when the body ends it hands the whole copy to each mirror's task. Only a request taking a
//! route with a mirror filter has one.

use bytes::{Bytes, BytesMut};
use tokio::sync::oneshot;

/// What a mirror gets of the caller's body.
#[derive(Debug)]
pub enum Teed {
    /// The whole body (trailers are not copied).
    Body(Bytes),
    /// It grew past the bound; nothing was kept.
    TooLarge,
}

/// Copies a body's data frames for the mirrors subscribed, up to `limit` bytes.
#[derive(Debug)]
pub struct Tee {
    chunks: Vec<Bytes>,
    len: u64,
    limit: u64,
    subscribers: Vec<oneshot::Sender<Teed>>,
}

impl Tee {
    /// A tee keeping up to `limit` bytes.
    pub fn new(limit: u64) -> Self {
        Self {
            chunks: Vec::new(),
            len: 0,
            limit,
            subscribers: Vec::new(),
        }
    }

    /// Where a mirror waits for the copy. A receiver whose tee is dropped before the body ended
    /// (the caller left, the primary upstream answered without reading it) gets an error.
    pub fn subscribe(&mut self, limit: u64) -> oneshot::Receiver<Teed> {
        self.limit = self.limit.max(limit);
        let (sender, receiver) = oneshot::channel();
        self.subscribers.push(sender);
        receiver
    }

    /// A data frame went by.
    pub fn data(&mut self, data: &Bytes) {
        if self.subscribers.is_empty() {
            return;
        }
        self.len = self.len.saturating_add(data.len() as u64);
        if self.len > self.limit {
            self.chunks = Vec::new();
            for subscriber in self.subscribers.drain(..) {
                let _ = subscriber.send(Teed::TooLarge);
            }
        } else if !data.is_empty() {
            // A reference to the frame's buffer, not a copy.
            self.chunks.push(data.clone());
        }
    }

    /// The body ended cleanly: each subscriber gets the copy.
    pub fn end(&mut self) {
        if self.subscribers.is_empty() {
            return;
        }
        let body = match self.chunks.len() {
            0 => Bytes::new(),
            1 => self.chunks.swap_remove(0),
            _ => {
                let mut joined = BytesMut::with_capacity(usize::try_from(self.len).unwrap_or(0));
                for chunk in self.chunks.drain(..) {
                    joined.extend_from_slice(&chunk);
                }
                joined.freeze()
            }
        };
        for subscriber in self.subscribers.drain(..) {
            let _ = subscriber.send(Teed::Body(body.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribers_get_the_whole_body_or_learn_it_was_too_large() {
        let mut tee = Tee::new(0);
        let mut small = tee.subscribe(8);
        let mut other = tee.subscribe(4);
        tee.data(&Bytes::from_static(b"abcd"));
        tee.data(&Bytes::from_static(b"efgh"));
        tee.end();
        // Each gets the whole body; a mirror with a smaller bound checks its own.
        assert!(matches!(small.try_recv(), Ok(Teed::Body(b)) if &b[..] == b"abcdefgh"));
        assert!(matches!(other.try_recv(), Ok(Teed::Body(b)) if b.len() == 8));

        let mut tee = Tee::new(0);
        let mut large = tee.subscribe(4);
        tee.data(&Bytes::from_static(b"abc"));
        tee.data(&Bytes::from_static(b"de"));
        assert!(matches!(large.try_recv(), Ok(Teed::TooLarge)));
        tee.end();

        let mut tee = Tee::new(0);
        let mut cut = tee.subscribe(4);
        tee.data(&Bytes::from_static(b"ab"));
        drop(tee);
        assert!(
            cut.try_recv().is_err(),
            "a body that never ended is never mirrored"
        );
    }
}
