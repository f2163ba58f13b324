//! HTTP/1.1 exchanges for requests without a body, run by the request's own task.
//!
//! Most requests through a sidecar carry no body (GET, HEAD, DELETE). For them hyper's client
//! connection costs a task of its own and a hand-off each way: the request is queued to the
//! connection task, which writes it, reads the response, and passes the head and then each body
//! chunk back over channels, waking the request's task every time. Here the request's task
//! writes the head and reads the response from the socket itself: one task, no channels, and
//! the body comes out of the same read buffer as the head.
//!
//! Requests with a body still go through hyper, whose connection task streams an upload and its
//! response independently (an upstream may answer before the upload ends, or echo it as it
//! arrives); so do upgrades, whose connection becomes the tunnel.

use std::io;
use std::mem::{self, MaybeUninit};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{request, Method, Response, StatusCode, Version};
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::contract::{Progress, MAX_HEADERS, MAX_HEAD_BYTES, MAX_TRAILERS, MAX_TRAILER_BYTES};
use crate::core::headers::{check_transfer_codings, TransferCodingError};
use crate::io::connect::CountedStream;

pub(crate) mod fuzzing;

/// Longest chunk-size line (size and extensions) accepted.
const MAX_CHUNK_LINE: usize = 1024;
/// Room made for a read: a whole small response fits in one.
const READ_SIZE: usize = 8 * 1024;
/// Largest read while a long body streams; bounds what one frame holds.
const MAX_READ: usize = 64 * 1024;

/// Why an exchange on a direct connection failed.
#[derive(Debug, thiserror::Error)]
pub enum DirectError {
    /// Writing the request failed: the upstream got at most part of its head.
    #[error("connection failed while sending the request: {0}")]
    Send(#[source] io::Error),
    /// The connection closed before any byte of the response.
    #[error("connection closed before the response")]
    Closed,
    /// The connection was reset before any byte of the response.
    #[error("connection failed before the response: {0}")]
    Reset(#[source] io::Error),
    /// The connection failed while the response was arriving.
    #[error("connection failed mid-response: {0}")]
    Receive(#[source] io::Error),
    /// The connection closed before the response was complete.
    #[error("connection closed before the end of the response")]
    Truncated,
    /// The upstream sent something that is not a valid HTTP/1.1 response.
    #[error("invalid response: {0}")]
    Invalid(&'static str),
    /// The response head does not parse.
    #[error("invalid response: {0}")]
    Parse(#[from] httparse::Error),
    /// The response's body carries a transfer coding the proxy does not pass on.
    #[error(transparent)]
    TransferCoding(#[from] TransferCodingError),
}

impl DirectError {
    /// The upstream sent something that is not HTTP/1.1 (as opposed to the connection failing).
    pub fn is_invalid(&self) -> bool {
        matches!(
            self,
            Self::Invalid(_) | Self::Parse(_) | Self::TransferCoding(_)
        )
    }

    /// How far the exchange got, for [`super::contract::may_resend`].
    pub(super) fn progress(&self) -> Progress {
        match self {
            Self::Send(_) => Progress::Unsent,
            Self::Closed | Self::Reset(_) => Progress::Unanswered,
            _ => Progress::Answered,
        }
    }
}

/// How a response body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body: HEAD, 204, 304, or `content-length: 0`.
    Empty,
    /// `content-length`.
    Length(u64),
    /// `transfer-encoding: chunked`.
    Chunked,
    /// Neither: the body runs until the upstream closes the connection.
    UntilClose,
}

/// A response head, with how its body is delimited and whether the connection stays open.
pub struct ResponseHead {
    /// Status, version and header fields as received (names lowercased).
    pub response: Response<()>,
    framing: Framing,
    /// The connection can take another request once the body is read.
    pub keep_alive: bool,
}

/// What a look at the read buffer found.
enum Parsed {
    Complete(ResponseHead),
    /// An interim (1xx) response, consumed: the final one follows.
    Interim,
    /// Not all of the head is there yet.
    Partial,
}

/// An HTTP/1.1 connection to an upstream, used one exchange at a time by whoever holds it.
pub struct DirectConnection {
    io: CountedStream,
    /// Bytes read and not yet handed out. Head and body chunks are split off it without copying.
    read_buf: BytesMut,
    /// The request head being written; kept to reuse its allocation.
    write_buf: Vec<u8>,
    /// Where the last response head's fields lay; kept to reuse its allocation.
    spans: Vec<FieldSpan>,
}

impl DirectConnection {
    /// A connection over `io`, just opened. Boxed once here, so that the request's future, the
    /// response body and the idle list move a pointer rather than the socket and its buffers.
    pub fn new(io: CountedStream) -> Box<Self> {
        Box::new(Self {
            io,
            read_buf: BytesMut::new(),
            write_buf: Vec::new(),
            spans: Vec::new(),
        })
    }

    /// The socket, for hyper to run the connection from now on; `None` if bytes are left
    /// unread on it (never the case for an idle connection).
    pub fn into_io(self) -> Option<CountedStream> {
        self.read_buf.is_empty().then_some(self.io)
    }

    /// Whether an idle connection can take a request: the upstream has neither closed it nor
    /// sent anything since. Never waits, and makes a system call only when the runtime has seen
    /// the socket become readable (the socket's readiness is cached).
    pub fn is_reusable(&mut self) -> bool {
        self.read_buf.is_empty() && self.io.is_quiet()
    }

    /// Sends a request without a body (`parts` in origin form, with `Host`) and reads the
    /// response head, skipping interim responses. The body follows through [`DirectBody`].
    ///
    /// The response's header fields go into the request's map, emptied, once the whole head is
    /// there (until then the request may still have to go out again elsewhere). hyper's server
    /// keeps the map of each response it writes for the next request it reads, so one map's
    /// allocation serves request after request, already grown to fit what the proxy adds.
    pub async fn exchange(
        &mut self,
        parts: &mut request::Parts,
    ) -> Result<ResponseHead, DirectError> {
        encode_head(&mut self.write_buf, parts);
        self.io
            .write_all(&self.write_buf)
            .await
            .map_err(DirectError::Send)?;
        // A no-op on TCP; TLS may hold the last record until flushed.
        self.io.flush().await.map_err(DirectError::Send)?;
        let head_request = parts.method == Method::HEAD;
        let mut received = false;
        loop {
            if !self.read_buf.is_empty() {
                received = true;
                let recycled = &mut parts.headers;
                if let Some(head) =
                    take_head(&mut self.read_buf, head_request, recycled, &mut self.spans)?
                {
                    return Ok(head);
                }
            }
            self.read_buf.reserve(READ_SIZE);
            match self.io.read_buf(&mut self.read_buf).await {
                Ok(0) if received => return Err(DirectError::Truncated),
                Ok(0) => return Err(DirectError::Closed),
                Ok(_) => {}
                Err(error) if received => return Err(DirectError::Receive(error)),
                Err(error) => return Err(DirectError::Reset(error)),
            }
        }
    }
}

/// Where a response body's bytes come from: the connection's socket, or scripted reads from
/// memory for the fuzz targets ([`fuzzing`]), which so drive the same state machine.
trait Fill {
    /// Reads more of the response into `buf`, making room for about `want` bytes (within
    /// bounds). `Ok(0)`: the upstream closed the connection.
    fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        want: u64,
    ) -> Poll<io::Result<usize>>;
}

impl Fill for CountedStream {
    fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        want: u64,
    ) -> Poll<io::Result<usize>> {
        buf.reserve(read_room(want));
        tokio_util::io::poll_read_buf(Pin::new(self), cx, buf)
    }
}

/// The room made for a read that needs about `want` more bytes.
fn read_room(want: u64) -> usize {
    want.clamp(READ_SIZE as u64, MAX_READ as u64) as usize
}

/// Writes the request line and header fields. The caller's body framing headers are gone
/// (hop-by-hop stripping removed `transfer-encoding`) and there is no body to frame.
fn encode_head(out: &mut Vec<u8>, parts: &request::Parts) {
    out.clear();
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Takes the final response head off the front of `buf` once it is all there, skipping interim
/// responses; `None` while more must be read.
fn take_head(
    buf: &mut BytesMut,
    head_request: bool,
    recycled: &mut HeaderMap,
    spans: &mut Vec<FieldSpan>,
) -> Result<Option<ResponseHead>, DirectError> {
    while !buf.is_empty() {
        match parse_head(buf, head_request, recycled, spans)? {
            Parsed::Complete(head) => return Ok(Some(head)),
            Parsed::Interim => {}
            // As hyper does: a partial head as long as the limit is over it.
            Parsed::Partial if buf.len() >= MAX_HEAD_BYTES => {
                return Err(DirectError::Invalid("response head too large"))
            }
            Parsed::Partial => return Ok(None),
        }
    }
    Ok(None)
}

/// Where a header field lies in the head: name start and end, value start and end, and the
/// name's index in [`KNOWN_NAMES`] (past its end for any other name).
type FieldSpan = [u32; 5];

/// Parses a response head at the front of `buf`, and takes it off the buffer once complete;
/// its header fields replace the contents of `recycled`, whose map the response takes. `spans`
/// is scratch space, kept by the caller so that its allocation serves head after head (a
/// fresh array for `MAX_HEADERS` fields would be 2 KB to zero per response).
fn parse_head(
    buf: &mut BytesMut,
    head_request: bool,
    recycled: &mut HeaderMap,
    spans: &mut Vec<FieldSpan>,
) -> Result<Parsed, DirectError> {
    // Where each field lies in the buffer, so names and values can be cut from it without
    // copying once the parser's borrow ends.
    spans.clear();
    // Left uninitialized: the parser writes the fields it finds (the array is 3 KiB).
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut parsed,
        buf,
        &mut fields,
    )? {
        // One read may bring a head past the limit whole: the limit holds all the same.
        httparse::Status::Complete(len) if len > MAX_HEAD_BYTES => {
            return Err(DirectError::Invalid("response head too large"))
        }
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial => return Ok(Parsed::Partial),
    };
    let status = parsed
        .code
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or(DirectError::Invalid("status code"))?;
    if status.is_informational() {
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(DirectError::Invalid(
                "101 to a request that asked no upgrade",
            ));
        }
        buf.advance(len);
        return Ok(Parsed::Interim);
    }
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let base = buf.as_ptr() as usize;
    let mut length: Option<u64> = None;
    let mut transfer_encoding = false;
    let mut close = false;
    let mut keep_alive = false;
    let count = parsed.headers.len();
    for field in parsed.headers.iter() {
        let name = field.name.as_bytes();
        // Offsets within the head, which is at most MAX_HEAD_BYTES: they fit in u32.
        let name_at = field.name.as_ptr() as usize - base;
        let value_at = field.value.as_ptr() as usize - base;
        spans.push([
            name_at as u32,
            (name_at + name.len()) as u32,
            value_at as u32,
            (value_at + field.value.len()) as u32,
            known_name(name),
        ]);
        match name.len() {
            14 if name.eq_ignore_ascii_case(b"content-length") => {
                let n = parse_content_length(field.value)
                    .ok_or(DirectError::Invalid("content-length"))?;
                if length.is_some_and(|seen| seen != n) {
                    return Err(DirectError::Invalid("conflicting content-length"));
                }
                length = Some(n);
            }
            17 if name.eq_ignore_ascii_case(b"transfer-encoding") => transfer_encoding = true,
            10 if name.eq_ignore_ascii_case(b"connection") => {
                for token in field.value.split(|&b| b == b',') {
                    let token = token.trim_ascii();
                    close |= token.eq_ignore_ascii_case(b"close");
                    keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
                }
            }
            _ => {}
        }
    }
    let framing =
        if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            Framing::Empty
        } else if transfer_encoding {
            // Transfer-Encoding overrides Content-Length. Its codings are checked below, once
            // the fields are in a map: anything but a single `chunked` is refused (502). RFC 9112
            // §6.3 reads a body whose final coding is not chunked to the close, and that would be
            // legal to pass on only with its Transfer-Encoding intact; but the proxy re-frames
            // every body for its caller (HTTP/2 callers cannot even be sent the header), so the
            // coding would be dropped and its encoded bytes taken for content. Upstreams compress
            // with Content-Encoding, which passes through untouched.
            Framing::Chunked
        } else {
            match length {
                Some(0) => Framing::Empty,
                Some(n) => Framing::Length(n),
                None => Framing::UntilClose,
            }
        };
    let keep_alive = framing != Framing::UntilClose
        // Both headers at once is how responses get smuggled: do not trust the connection after.
        && !(transfer_encoding && length.is_some())
        && !close
        && (version == Version::HTTP_11 || keep_alive);

    let head = buf.split_to(len).freeze();
    let mut headers = mem::take(recycled);
    headers.clear();
    headers.reserve(count);
    for &[name_start, name_end, value_start, value_end, known] in spans.iter() {
        let name = match KNOWN_NAMES.get(known as usize) {
            Some(name) => name.clone(),
            None => HeaderName::from_bytes(&head[name_start as usize..name_end as usize])
                .map_err(|_| DirectError::Invalid("header name"))?,
        };
        let value =
            HeaderValue::from_maybe_shared(head.slice(value_start as usize..value_end as usize))
                .map_err(|_| DirectError::Invalid("header value"))?;
        headers.append(name, value);
    }
    if transfer_encoding && framing == Framing::Chunked {
        check_transfer_codings(&headers)?;
    }
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.version_mut() = version;
    *response.headers_mut() = headers;
    Ok(Parsed::Complete(ResponseHead {
        response,
        framing,
        keep_alive,
    }))
}

/// Names most responses carry, recognised without `HeaderName::from_bytes` (which lowercases
/// the name into a buffer and then looks it up among all the standard ones).
static KNOWN_NAMES: [HeaderName; 12] = [
    header::CONTENT_LENGTH,
    header::CONTENT_TYPE,
    header::DATE,
    header::SERVER,
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::CACHE_CONTROL,
    header::VARY,
    header::ETAG,
    header::LAST_MODIFIED,
    header::SET_COOKIE,
    header::CONTENT_ENCODING,
];

/// The index of `name` in [`KNOWN_NAMES`], or past its end if it is not one of them.
fn known_name(name: &[u8]) -> u32 {
    let candidates: &[usize] = match name.len() {
        4 => &[2, 7, 8],
        6 => &[3],
        10 => &[4, 10],
        12 => &[1],
        13 => &[6, 9],
        14 => &[0],
        16 => &[11],
        17 => &[5],
        _ => &[],
    };
    candidates
        .iter()
        .find(|&&i| name.eq_ignore_ascii_case(KNOWN_NAMES[i].as_str().as_bytes()))
        .map_or(u32::MAX, |&i| i as u32)
}

/// A `content-length` value: digits, or a list of the same digits repeated (RFC 9110 §8.6).
fn parse_content_length(value: &[u8]) -> Option<u64> {
    let mut length = None;
    for item in value.split(|&b| b == b',') {
        let item = item.trim_ascii();
        if item.is_empty() || item.len() > 19 || !item.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n = item
            .iter()
            .fold(0u64, |n, &digit| n * 10 + u64::from(digit - b'0'));
        if length.is_some_and(|seen| seen != n) {
            return None;
        }
        length = Some(n);
    }
    length
}

/// A chunk-size line without its LF: hex digits, optional extensions, CR.
fn parse_chunk_size(line: &[u8]) -> Result<u64, DirectError> {
    let line = line
        .strip_suffix(b"\r")
        .ok_or(DirectError::Invalid("chunk size line not ended by CRLF"))?;
    let digits = line
        .iter()
        .position(|&b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    // Extensions (`;name=value`) after optional whitespace are allowed and ignored, and so is
    // whitespace alone (hyper's client accepts it too).
    let rest = line[digits..].trim_ascii_start();
    if digits == 0 || digits > 15 || !(rest.is_empty() || rest.starts_with(b";")) {
        return Err(DirectError::Invalid("chunk size"));
    }
    Ok(line[..digits].iter().fold(0u64, |n, &b| {
        // Hex digits only, checked above.
        n << 4 | u64::from((b as char).to_digit(16).unwrap_or(0))
    }))
}

/// Where a response body's reading stands.
enum BodyState {
    /// `content-length` bytes still to come.
    Length(u64),
    /// Inside a chunked body.
    Chunked(Chunk),
    /// Data until the upstream closes.
    UntilClose,
    /// All of it read.
    Done,
}

impl BodyState {
    /// Where the reading of a body delimited by `framing` starts.
    fn new(framing: Framing) -> Self {
        match framing {
            Framing::Empty => Self::Done,
            Framing::Length(n) => Self::Length(n),
            Framing::Chunked => Self::Chunked(Chunk::Size),
            Framing::UntilClose => Self::UntilClose,
        }
    }
}

/// Where a chunked body's reading stands.
enum Chunk {
    /// Before a chunk-size line.
    Size,
    /// Chunk data still to come.
    Data(u64),
    /// After chunk data: its CRLF.
    DataEnd,
    /// After the last chunk: the trailer section and the final CRLF.
    Trailers,
}

/// A response body read from a [`DirectConnection`], which it holds until the body has been
/// read to its end and then gives back with [`DirectBody::take_reusable`].
pub struct DirectBody {
    /// `None` once given back or broken.
    connection: Option<Box<DirectConnection>>,
    state: BodyState,
    keep_alive: bool,
}

impl DirectBody {
    /// The body of the response `head` that `connection` just read.
    pub fn new(connection: Box<DirectConnection>, head: &ResponseHead) -> Self {
        Self {
            connection: Some(connection),
            state: BodyState::new(head.framing),
            keep_alive: head.keep_alive,
        }
    }

    /// The connection, once the body is read to its end, if it can take another request.
    pub fn take_reusable(&mut self) -> Option<Box<DirectConnection>> {
        if !(self.keep_alive && matches!(self.state, BodyState::Done)) {
            return None;
        }
        // Bytes past the end of the response: the upstream is out of step with us.
        self.connection.take().filter(|c| c.read_buf.is_empty())
    }

    /// The next data or trailers frame; `None` at the end.
    pub fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, DirectError>>> {
        if matches!(self.state, BodyState::Done) {
            return Poll::Ready(None);
        }
        let Some(connection) = self.connection.as_mut() else {
            return Poll::Ready(None);
        };
        match ready!(read_frame(
            &mut connection.read_buf,
            &mut connection.io,
            &mut self.state,
            cx
        )) {
            Ok(frame) => Poll::Ready(frame.map(Ok)),
            Err(error) => {
                // A broken body leaves a connection out of step: it closes.
                self.connection = None;
                self.state = BodyState::Done;
                Poll::Ready(Some(Err(error)))
            }
        }
    }

    /// Whether the whole body has been read.
    pub fn is_end_stream(&self) -> bool {
        matches!(self.state, BodyState::Done)
    }

    /// The exact length left when the response declared one.
    pub fn size_hint(&self) -> SizeHint {
        match self.state {
            BodyState::Length(n) => SizeHint::with_exact(n),
            BodyState::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

/// Reads the body's next frame, advancing `state`.
fn read_frame(
    read_buf: &mut BytesMut,
    io: &mut impl Fill,
    state: &mut BodyState,
    cx: &mut Context<'_>,
) -> Poll<Result<Option<Frame<Bytes>>, DirectError>> {
    loop {
        // How much more the current step needs; `None` when the buffer holds enough.
        let want: u64 = match state {
            BodyState::Done => return Poll::Ready(Ok(None)),
            BodyState::Length(remaining) => {
                if read_buf.is_empty() {
                    *remaining
                } else {
                    let data = split_data(read_buf, remaining);
                    if *remaining == 0 {
                        *state = BodyState::Done;
                    }
                    return Poll::Ready(Ok(Some(Frame::data(data))));
                }
            }
            BodyState::UntilClose => {
                if read_buf.is_empty() {
                    match ready!(io.poll_fill(cx, read_buf, MAX_READ as u64)) {
                        Ok(0) => {
                            *state = BodyState::Done;
                            return Poll::Ready(Ok(None));
                        }
                        Ok(_) => continue,
                        Err(error) => return Poll::Ready(Err(DirectError::Receive(error))),
                    }
                }
                let data = read_buf.split().freeze();
                return Poll::Ready(Ok(Some(Frame::data(data))));
            }
            BodyState::Chunked(chunk) => {
                let buf = &mut *read_buf;
                match chunk {
                    Chunk::Size => match buf.iter().position(|&b| b == b'\n') {
                        // The limit holds however the line arrived, in one read or several.
                        Some(end) if end > MAX_CHUNK_LINE => {
                            return Poll::Ready(Err(DirectError::Invalid(
                                "chunk size line too long",
                            )))
                        }
                        Some(end) => {
                            let size = parse_chunk_size(&buf[..end])?;
                            buf.advance(end + 1);
                            *chunk = if size == 0 {
                                Chunk::Trailers
                            } else {
                                Chunk::Data(size)
                            };
                            continue;
                        }
                        None if buf.len() > MAX_CHUNK_LINE => {
                            return Poll::Ready(Err(DirectError::Invalid(
                                "chunk size line too long",
                            )))
                        }
                        None => 0,
                    },
                    Chunk::Data(remaining) => {
                        if buf.is_empty() {
                            *remaining
                        } else {
                            let data = split_data(buf, remaining);
                            if *remaining == 0 {
                                *chunk = Chunk::DataEnd;
                            }
                            return Poll::Ready(Ok(Some(Frame::data(data))));
                        }
                    }
                    Chunk::DataEnd => {
                        if buf.len() >= 2 {
                            if &buf[..2] != b"\r\n" {
                                return Poll::Ready(Err(DirectError::Invalid(
                                    "chunk data not ended by CRLF",
                                )));
                            }
                            buf.advance(2);
                            *chunk = Chunk::Size;
                            continue;
                        }
                        0
                    }
                    Chunk::Trailers => match take_trailers(buf)? {
                        Some(trailers) => {
                            *state = BodyState::Done;
                            return Poll::Ready(Ok(trailers.map(Frame::trailers)));
                        }
                        None => 0,
                    },
                }
            }
        };
        match ready!(io.poll_fill(cx, read_buf, want)) {
            Ok(0) => return Poll::Ready(Err(DirectError::Truncated)),
            Ok(_) => {}
            Err(error) => return Poll::Ready(Err(DirectError::Receive(error))),
        }
    }
}

/// Takes up to `remaining` bytes off the front of `buf` as one frame's data.
fn split_data(buf: &mut BytesMut, remaining: &mut u64) -> Bytes {
    let take = usize::try_from(*remaining).map_or(buf.len(), |r| r.min(buf.len()));
    *remaining -= take as u64;
    buf.split_to(take).freeze()
}

/// The trailer section and final CRLF off the front of `buf` once all there (`Some`, holding
/// the fields if there are any); `None` while more must be read. Out of line: its field array
/// would otherwise enlarge the stack frame of every body read.
#[inline(never)]
fn take_trailers(buf: &mut BytesMut) -> Result<Option<Option<HeaderMap>>, DirectError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_TRAILERS];
    match httparse::parse_headers(buf, &mut fields)? {
        // As for chunk-size lines: the same limit for a section that arrived whole.
        httparse::Status::Complete((len, _)) if len > MAX_TRAILER_BYTES => {
            Err(DirectError::Invalid("trailer section too large"))
        }
        httparse::Status::Complete((len, fields)) => {
            let trailers = trailer_map(fields)?;
            buf.advance(len);
            Ok(Some(trailers))
        }
        httparse::Status::Partial if buf.len() > MAX_TRAILER_BYTES => {
            Err(DirectError::Invalid("trailer section too large"))
        }
        httparse::Status::Partial => Ok(None),
    }
}

/// The trailer fields, if there are any. Rare, so copied rather than cut from the buffer.
fn trailer_map(fields: &[httparse::Header<'_>]) -> Result<Option<HeaderMap>, DirectError> {
    if fields.is_empty() {
        return Ok(None);
    }
    let mut trailers = HeaderMap::with_capacity(fields.len());
    for field in fields {
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|_| DirectError::Invalid("trailer name"))?;
        let value = HeaderValue::from_bytes(field.value)
            .map_err(|_| DirectError::Invalid("trailer value"))?;
        trailers.append(name, value);
    }
    Ok(Some(trailers))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8], head_request: bool) -> Result<Parsed, DirectError> {
        parse_head(
            &mut BytesMut::from(bytes),
            head_request,
            &mut HeaderMap::new(),
            &mut Vec::new(),
        )
    }

    fn complete(bytes: &[u8]) -> ResponseHead {
        match parse(bytes, false) {
            Ok(Parsed::Complete(head)) => head,
            Ok(_) => panic!("incomplete"),
            Err(error) => panic!("{error}"),
        }
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let head = complete(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nX-A: b\r\n\r\n");
        assert_eq!(head.framing, Framing::Length(12));
        assert!(head.keep_alive);
        assert_eq!(head.response.headers()["x-a"], "b");
        let head = complete(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(head.framing, Framing::Chunked);
        assert!(head.keep_alive);
        let head =
            complete(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n");
        assert_eq!(head.framing, Framing::Chunked);
        assert!(
            !head.keep_alive,
            "both framings: the connection is not trusted after"
        );
        let head = complete(b"HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(head.framing, Framing::UntilClose);
        let head = complete(b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n");
        assert_eq!(head.framing, Framing::Empty);
        let head = complete(b"HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\n");
        assert_eq!(head.framing, Framing::Length(5));
        match parse(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n", true) {
            Ok(Parsed::Complete(head)) => assert_eq!(head.framing, Framing::Empty),
            _ => panic!("HEAD response"),
        }
    }

    #[test]
    fn transfer_codings_other_than_one_chunked_are_refused() {
        for (bad, reason) in [
            (
                &b"transfer-encoding: gzip, chunked\r\n"[..],
                "unsupported transfer coding gzip",
            ),
            (
                b"transfer-encoding: gzip\r\ntransfer-encoding: chunked\r\n",
                "unsupported transfer coding gzip",
            ),
            (
                b"transfer-encoding: chunked, gzip\r\n",
                "unsupported transfer coding gzip",
            ),
            (
                b"transfer-encoding: chunked, chunked\r\n",
                "chunked transfer coding applied more than once",
            ),
            (
                b"transfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n",
                "chunked transfer coding applied more than once",
            ),
            (
                b"transfer-encoding: \r\n",
                "chunked is not the final transfer coding",
            ),
        ] {
            let head = [&b"HTTP/1.1 200 OK\r\n"[..], bad, b"\r\n"].concat();
            match parse(&head, false) {
                Err(error) => {
                    assert!(error.is_invalid());
                    assert_eq!(error.to_string(), reason);
                }
                Ok(_) => panic!("accepted {}", String::from_utf8_lossy(&head)),
            }
        }
        // No body, nothing to decode: the header only describes what a GET would get.
        let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n";
        assert!(matches!(parse(head, true), Ok(Parsed::Complete(_))));
    }

    #[test]
    fn known_names_are_found_in_any_case_and_others_are_not() {
        for name in &KNOWN_NAMES {
            let index = known_name(name.as_str().as_bytes()) as usize;
            assert_eq!(KNOWN_NAMES[index], name, "{name}");
            let upper = name.as_str().to_ascii_uppercase();
            assert_eq!(known_name(upper.as_bytes()) as usize, index, "{upper}");
        }
        for other in ["x-date", "dat", "content-lengths", "keep-alive", "location"] {
            assert_eq!(known_name(other.as_bytes()), u32::MAX, "{other}");
        }
        let head = complete(b"HTTP/1.1 200 OK\r\nContent-Type: a/b\r\nX-Other: 1\r\nDATE: d\r\ncontent-length: 0\r\n\r\n");
        let names: Vec<_> = head.response.headers().keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["content-type", "x-other", "date", "content-length"]);
    }

    #[test]
    fn connection_reuse_follows_version_and_connection_header() {
        assert!(
            !complete(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .keep_alive
        );
        assert!(!complete(b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n").keep_alive);
        let head =
            complete(b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\nConnection: Keep-Alive\r\n\r\n");
        assert!(head.keep_alive);
        assert_eq!(head.response.version(), Version::HTTP_10);
    }

    #[test]
    fn invalid_heads_are_refused() {
        for bad in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 1x\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 1, 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
            b"HTXP/1.1 200 OK\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        ] {
            assert!(
                parse(bad, false).is_err_and(|e| e.is_invalid()),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn interim_responses_are_consumed() {
        let mut buf = BytesMut::from(&b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"[..]);
        let mut map = HeaderMap::new();
        assert!(matches!(
            parse_head(&mut buf, false, &mut map, &mut Vec::new()),
            Ok(Parsed::Interim)
        ));
        assert!(matches!(
            parse_head(&mut buf, false, &mut map, &mut Vec::new()),
            Ok(Parsed::Complete(_))
        ));
        assert!(buf.is_empty());
    }

    #[test]
    fn the_response_takes_the_request_map_only_when_complete() {
        let mut map = HeaderMap::with_capacity(32);
        map.insert("x-request", HeaderValue::from_static("kept"));
        let capacity = map.capacity();
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\ncontent-le"[..]);
        assert!(matches!(
            parse_head(&mut buf, false, &mut map, &mut Vec::new()),
            Ok(Parsed::Partial)
        ));
        assert_eq!(
            map["x-request"], "kept",
            "a partial head leaves the request whole"
        );
        buf.extend_from_slice(b"ngth: 0\r\n\r\n");
        let Ok(Parsed::Complete(head)) = parse_head(&mut buf, false, &mut map, &mut Vec::new())
        else {
            panic!("complete head");
        };
        assert!(map.is_empty(), "the request's map went to the response");
        assert_eq!(
            head.response.headers().capacity(),
            capacity,
            "its allocation too"
        );
        assert_eq!(head.response.headers().len(), 1);
        assert!(!head.response.headers().contains_key("x-request"));
    }

    #[test]
    fn a_head_over_the_limit_is_refused_even_when_it_arrived_whole() {
        let head = |len: usize| {
            let start = "HTTP/1.1 200 OK\r\nx-pad: ";
            let pad = "a".repeat(len - start.len() - 4);
            format!("{start}{pad}\r\n\r\n")
        };
        let at_limit = head(MAX_HEAD_BYTES);
        assert!(matches!(
            parse(at_limit.as_bytes(), false),
            Ok(Parsed::Complete(_))
        ));
        let over = head(MAX_HEAD_BYTES + 1);
        assert!(parse(over.as_bytes(), false).is_err_and(|e| e.is_invalid()));
        let mut buf = BytesMut::from(&over.as_bytes()[..MAX_HEAD_BYTES]);
        assert!(
            take_head(&mut buf, false, &mut HeaderMap::new(), &mut Vec::new())
                .is_err_and(|e| e.is_invalid())
        );
    }

    #[test]
    fn trailers_meet_the_head_limits() {
        let section = |count: usize| {
            let fields: String = (0..count).map(|i| format!("t-{i}: v\r\n")).collect();
            BytesMut::from(format!("{fields}\r\n").as_bytes())
        };
        let taken = take_trailers(&mut section(MAX_TRAILERS));
        assert!(matches!(taken, Ok(Some(Some(map))) if map.len() == MAX_TRAILERS));
        assert!(take_trailers(&mut section(MAX_TRAILERS + 1)).is_err());
        let big = format!("t: {}\r\n\r\n", "v".repeat(MAX_TRAILER_BYTES));
        assert!(take_trailers(&mut BytesMut::from(big.as_bytes())).is_err());
        assert!(matches!(
            take_trailers(&mut section(1).split_to(3)),
            Ok(None)
        ));
    }

    #[test]
    fn partial_heads_wait_for_more() {
        assert!(matches!(
            parse(b"HTTP/1.1 200 OK\r\ncontent-le", false),
            Ok(Parsed::Partial)
        ));
    }

    #[test]
    fn chunk_size_lines() {
        assert_eq!(parse_chunk_size(b"1a\r").ok(), Some(26));
        assert_eq!(parse_chunk_size(b"5;ext=1\r").ok(), Some(5));
        assert_eq!(parse_chunk_size(b"5 ;ext\r").ok(), Some(5));
        assert_eq!(parse_chunk_size(b"6 \r").ok(), Some(6));
        assert_eq!(parse_chunk_size(b"0\r").ok(), Some(0));
        assert!(parse_chunk_size(b"\r").is_err());
        assert!(parse_chunk_size(b"5").is_err(), "bare LF");
        assert!(parse_chunk_size(b"5x\r").is_err());
        assert!(parse_chunk_size(b"1000000000000000\r").is_err(), "overflow");
    }
}
