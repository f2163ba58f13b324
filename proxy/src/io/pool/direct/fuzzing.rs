//! The upstream codec driven from memory, for the fuzz targets ([`crate::fuzzing`]): a response
//! head read as [`DirectConnection::exchange`] reads it ([`take_head`]) and a body read by the
//! same state machine as [`DirectBody`] ([`read_frame`]), fed by scripted reads instead of a
//! socket. Nothing here parses on its own.

use std::task::Waker;

use super::*;

/// How a response body is delimited, as the fuzz targets see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyFraming {
    /// No body.
    Empty,
    /// `content-length`.
    Length(u64),
    /// `transfer-encoding: chunked`.
    Chunked,
    /// Until the upstream closes.
    UntilClose,
}

/// Reads served from memory. Each entry of the plan is the most bytes one read returns (0: the
/// read is not ready, and is polled again as a woken task would be); once the plan is used up,
/// each read returns as much as the connection would make room for.
pub(crate) struct ScriptedReads<'a> {
    rest: &'a [u8],
    plan: std::slice::Iter<'a, u8>,
}

impl<'a> ScriptedReads<'a> {
    /// Reads of `input` following `plan`.
    pub(crate) fn new(input: &'a [u8], plan: &'a [u8]) -> Self {
        Self {
            rest: input,
            plan: plan.iter(),
        }
    }

    /// Bytes never read.
    pub(crate) fn unread(&self) -> usize {
        self.rest.len()
    }

    /// One read of at most `room` bytes (unless the plan says otherwise) into `buf`.
    fn read(&mut self, buf: &mut BytesMut, room: usize) -> Poll<usize> {
        let size = match self.plan.next() {
            Some(0) => return Poll::Pending,
            Some(&size) => usize::from(size),
            None => room,
        };
        let (read, rest) = self.rest.split_at(size.min(self.rest.len()));
        buf.extend_from_slice(read);
        self.rest = rest;
        Poll::Ready(read.len())
    }
}

impl Fill for ScriptedReads<'_> {
    fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        want: u64,
    ) -> Poll<io::Result<usize>> {
        let read = self.read(buf, read_room(want));
        if read.is_pending() {
            cx.waker().wake_by_ref();
        }
        read.map(Ok)
    }
}

/// A response head read from memory.
pub(crate) struct Head {
    /// Status, version and header fields.
    pub(crate) response: Response<()>,
    /// How its body is delimited.
    pub(crate) framing: BodyFraming,
    /// Whether the connection could take another request after the body.
    pub(crate) keep_alive: bool,
    state: BodyState,
}

/// Reads a response head as [`DirectConnection::exchange`] does: whatever has arrived is
/// parsed, interim responses are skipped, more is read until the head is complete.
pub(crate) fn read_head(
    read_buf: &mut BytesMut,
    reads: &mut ScriptedReads<'_>,
    head_request: bool,
) -> Result<Head, DirectError> {
    let mut received = false;
    loop {
        if !read_buf.is_empty() {
            received = true;
            if let Some(head) = take_head(
                read_buf,
                head_request,
                &mut HeaderMap::new(),
                &mut Vec::new(),
            )? {
                let framing = match head.framing {
                    Framing::Empty => BodyFraming::Empty,
                    Framing::Length(n) => BodyFraming::Length(n),
                    Framing::Chunked => BodyFraming::Chunked,
                    Framing::UntilClose => BodyFraming::UntilClose,
                };
                return Ok(Head {
                    response: head.response,
                    framing,
                    keep_alive: head.keep_alive,
                    state: BodyState::new(head.framing),
                });
            }
        }
        match reads.read(read_buf, READ_SIZE) {
            Poll::Pending => {}
            Poll::Ready(0) if received => return Err(DirectError::Truncated),
            Poll::Ready(0) => return Err(DirectError::Closed),
            Poll::Ready(_) => {}
        }
    }
}

/// A response body read to its end.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Body {
    /// The data frames, concatenated (how many frames depends on the reads).
    pub(crate) data: Vec<u8>,
    /// The trailers frame, if any.
    pub(crate) trailers: Option<HeaderMap>,
}

/// Reads the body of `head` to its end (or its first error), frame by frame as
/// [`DirectBody::poll_frame`] does.
pub(crate) fn read_body(
    read_buf: &mut BytesMut,
    reads: &mut ScriptedReads<'_>,
    head: Head,
) -> Result<Body, DirectError> {
    drain(read_buf, reads, head.state)
}

/// Reads a chunked body from its first chunk-size line to its end (or its first error).
pub(crate) fn read_chunked(
    read_buf: &mut BytesMut,
    reads: &mut ScriptedReads<'_>,
) -> Result<Body, DirectError> {
    drain(read_buf, reads, BodyState::Chunked(Chunk::Size))
}

fn drain(
    read_buf: &mut BytesMut,
    reads: &mut ScriptedReads<'_>,
    mut state: BodyState,
) -> Result<Body, DirectError> {
    let mut cx = Context::from_waker(Waker::noop());
    let mut body = Body::default();
    loop {
        // Pending: a scripted read was not ready; each one is used once, so this ends.
        let Poll::Ready(frame) = read_frame(read_buf, reads, &mut state, &mut cx) else {
            continue;
        };
        match frame?.map(Frame::into_data) {
            None => return Ok(body),
            Some(Ok(data)) => body.data.extend_from_slice(&data),
            Some(Err(frame)) => body.trailers = frame.into_trailers().ok(),
        }
    }
}
