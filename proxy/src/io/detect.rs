//! Protocol detection on captured connections: the first bytes a client sends tell HTTP/1.x
//! (a request line), HTTP/2 with prior knowledge (the preface) and TLS (a ClientHello, whose
//! SNI and ALPN are read) from anything else. Detection waits for those bytes only up to a
//! deadline: a server-speaks-first protocol sends nothing until greeted. The bytes read are
//! handed on, to be replayed to whatever serves the connection.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

pub use crate::io::identity::{ALPN_OUTRIDER, ALPN_OUTRIDER_TCP};

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// A TLS record of content type handshake.
const TLS_HANDSHAKE: u8 = 0x16;
/// Largest TLS record (2^14 plus the 5-byte header and the expansion TLS 1.2 allows).
const MAX_TLS_RECORD: usize = 5 + 16_384 + 2_048;
/// Longest request line looked at for an HTTP/1.x version (the head limit hyper applies).
const MAX_REQUEST_LINE: usize = crate::core::headers::MAX_HEADER_BYTES;

/// What the first bytes were.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Protocol {
    /// An HTTP/1.x request line.
    Http1,
    /// The HTTP/2 preface.
    Http2,
    /// A TLS ClientHello.
    Tls(ClientHello),
    /// Something else.
    Opaque,
    /// Nothing decisive arrived by the deadline.
    TimedOut,
    /// The peer closed (or the read failed) before anything decisive.
    Closed,
}

impl Protocol {
    /// The `protocol` label of the detection metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Http1 => "http1",
            Self::Http2 => "h2",
            Self::Tls(_) => "tls",
            Self::Opaque => "opaque",
            Self::TimedOut => "timeout",
            Self::Closed => "closed",
        }
    }
}

/// What a ClientHello says, as far as the proxy cares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientHello {
    /// The server name asked for.
    pub sni: Option<String>,
    /// Whether [`ALPN_OUTRIDER`] is offered: a sidecar's mesh connection.
    pub mesh: bool,
    /// Whether [`ALPN_OUTRIDER_TCP`] is offered: a sidecar's mesh-wrapped opaque TCP stream.
    pub mesh_tcp: bool,
}

/// The outcome of detection: the protocol, every byte read (to replay), how long it took.
pub struct Detection {
    /// What the bytes were.
    pub protocol: Protocol,
    /// Everything read, in order.
    pub bytes: BytesMut,
    /// From the start of detection to its decision.
    pub elapsed: Duration,
}

/// Reads from `io` until its first bytes decide the protocol, for at most `timeout`.
pub async fn detect<T: AsyncRead + Unpin>(io: &mut T, timeout: Duration) -> Detection {
    let started = Instant::now();
    let mut bytes = BytesMut::new();
    let protocol = match tokio::time::timeout(timeout, read_until_decided(io, &mut bytes)).await {
        Ok(protocol) => protocol,
        Err(_) => Protocol::TimedOut,
    };
    Detection {
        protocol,
        bytes,
        elapsed: started.elapsed(),
    }
}

async fn read_until_decided<T: AsyncRead + Unpin>(io: &mut T, buf: &mut BytesMut) -> Protocol {
    loop {
        buf.reserve(2048);
        match io.read_buf(buf).await {
            Ok(0) | Err(_) => return Protocol::Closed,
            Ok(_) => {}
        }
        if let Some(protocol) = classify(buf) {
            return protocol;
        }
    }
}

/// What `buf` is, when its bytes so far decide it.
pub fn classify(buf: &[u8]) -> Option<Protocol> {
    let first = *buf.first()?;
    if first == TLS_HANDSHAKE {
        return classify_tls(buf);
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(Protocol::Http2);
    }
    classify_http1(buf)
}

/// A request line is a method token, a space, a target, a space and `HTTP/1.0` or `HTTP/1.1`.
/// Decided as soon as a byte rules it out, so a binary protocol waits for nothing.
fn classify_http1(buf: &[u8]) -> Option<Protocol> {
    let method = buf.iter().position(|&b| !is_token(b)).unwrap_or(buf.len());
    match buf.get(method) {
        None if method < 32 => return None,
        Some(b' ') if method > 0 => {}
        _ => return Some(Protocol::Opaque),
    }
    let Some(end) = buf.iter().position(|&b| b == b'\n') else {
        return (buf.len() >= MAX_REQUEST_LINE).then_some(Protocol::Opaque);
    };
    let line = buf[..end].strip_suffix(b"\r").unwrap_or(&buf[..end]);
    let http1 = line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0");
    Some(if http1 {
        Protocol::Http1
    } else {
        Protocol::Opaque
    })
}

/// RFC 9110 token characters.
fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A TLS record with a ClientHello in it, read whole before deciding (its SNI and ALPN are
/// needed). A record that is not a ClientHello is opaque.
fn classify_tls(buf: &[u8]) -> Option<Protocol> {
    if buf.len() < 5 {
        return None;
    }
    let length = usize::from(u16::from_be_bytes([buf[3], buf[4]]));
    let end = 5usize.saturating_add(length);
    if end > MAX_TLS_RECORD {
        return Some(Protocol::Opaque);
    }
    let record = buf.get(5..end)?;
    Some(match parse_client_hello(record) {
        Some(hello) => Protocol::Tls(hello),
        None => Protocol::Opaque,
    })
}

/// Bounds-checked reads over a byte slice.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
    }

    /// A vector with a one- or two-byte length prefix.
    fn vec8(&mut self) -> Option<Cursor<'a>> {
        let n = usize::from(self.u8()?);
        self.take(n).map(Cursor)
    }

    fn vec16(&mut self) -> Option<Cursor<'a>> {
        let n = self.u16()?;
        self.take(n).map(Cursor)
    }
}

/// The SNI and ALPN of a ClientHello in `record` (RFC 8446 §4.1.2). A hello longer than the
/// record is read as far as the record goes: its extensions may then be missing (no SNI, not
/// mesh), which is the safe reading.
fn parse_client_hello(record: &[u8]) -> Option<ClientHello> {
    let mut r = Cursor(record);
    if r.u8()? != 1 {
        return None;
    }
    r.take(3)?; // handshake length
    r.take(2 + 32)?; // legacy_version, random
    r.vec8()?; // legacy_session_id
    r.vec16()?; // cipher_suites
    r.vec8()?; // legacy_compression_methods
    let mut hello = ClientHello::default();
    let Some(mut extensions) = r.vec16() else {
        return Some(hello);
    };
    while let (Some(kind), Some(mut data)) = (extensions.u16(), extensions.vec16()) {
        match kind {
            0 => {
                let mut names = data.vec16()?;
                while let (Some(name_type), Some(name)) = (names.u8(), names.vec16()) {
                    if name_type == 0 {
                        hello.sni = std::str::from_utf8(name.0).ok().map(str::to_owned);
                        break;
                    }
                }
            }
            16 => {
                let mut protocols = data.vec16()?;
                while let Some(protocol) = protocols.vec8() {
                    hello.mesh |= protocol.0 == ALPN_OUTRIDER;
                    hello.mesh_tcp |= protocol.0 == ALPN_OUTRIDER_TCP;
                }
            }
            _ => {}
        }
    }
    Some(hello)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A real ClientHello from rustls, offering `alpn`, for `sni`.
    fn client_hello(sni: &str, alpn: &[&[u8]]) -> Vec<u8> {
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let name = rustls::pki_types::ServerName::try_from(sni.to_owned()).unwrap();
        let mut conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn reads_sni_and_the_outrider_alpn_from_a_real_client_hello() {
        let hello = client_hello("db.example.com", &[ALPN_OUTRIDER, b"h2"]);
        assert_eq!(
            classify(&hello),
            Some(Protocol::Tls(ClientHello {
                sni: Some("db.example.com".into()),
                mesh: true,
                mesh_tcp: false,
            }))
        );
        let Some(Protocol::Tls(wrapped)) =
            classify(&client_hello("db.example.com", &[ALPN_OUTRIDER_TCP]))
        else {
            panic!("not TLS");
        };
        assert!(wrapped.mesh_tcp && !wrapped.mesh);
        let app = client_hello("db.example.com", &[b"h2", b"http/1.1"]);
        let Some(Protocol::Tls(hello)) = classify(&app) else {
            panic!("not TLS");
        };
        assert!(!hello.mesh && !hello.mesh_tcp);
        // Every proper prefix waits for more.
        for n in 1..app.len() {
            assert_eq!(classify(&app[..n]), None, "{n} bytes");
        }
    }

    #[test]
    fn tells_http_versions_from_anything_else() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(
            classify(b"POST /a?b=c HTTP/1.0\nHost: x\n"),
            Some(Protocol::Http1)
        );
        assert_eq!(classify(b"GET / HT"), None);
        assert_eq!(classify(b"GET"), None);
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(classify(&H2_PREFACE[..10]), None);
        // Redis, a binary protocol, an HTTP/2 request line without the preface, a bare word.
        assert_eq!(classify(b"*1\r\n$4\r\nPING\r\n"), Some(Protocol::Opaque));
        assert_eq!(
            classify(&[0, 0, 0, 8, 4, 210, 22, 47]),
            Some(Protocol::Opaque)
        );
        assert_eq!(classify(b"GET / HTTP/2\r\n"), Some(Protocol::Opaque));
        assert_eq!(classify(b"PING\r\n"), Some(Protocol::Opaque));
        // A TLS record that is no ClientHello, and one too long to be TLS.
        assert_eq!(
            classify(&[0x16, 3, 1, 0, 4, 2, 0, 0, 0]),
            Some(Protocol::Opaque)
        );
        assert_eq!(classify(&[0x16, 3, 1, 0xff, 0xff]), Some(Protocol::Opaque));
    }

    #[test]
    fn a_truncated_or_garbled_hello_never_panics() {
        let hello = client_hello("a.example", &[ALPN_OUTRIDER]);
        let mut garbled = hello.clone();
        for i in 5..garbled.len() {
            garbled[i] = garbled[i].wrapping_mul(31).wrapping_add(7);
            let _ = classify(&garbled);
            let _ = parse_client_hello(&garbled[5..i]);
        }
    }

    /// A sidecar's ClientHello, read whole by detection, is mesh; the handshake then runs over
    /// the bytes read (replayed) and the rest of the stream, negotiates the service's protocol
    /// (servers do not list `outrider/1`) and yields the caller's identity.
    #[tokio::test]
    async fn a_sidecar_hello_is_mesh_and_its_handshake_completes_after_detection() {
        use crate::io::identity::{test_pair, ALPN_H2};
        let ((client, client_id), (server, server_id)) = test_pair();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = client
            .client_config(
                Some(std::sync::Arc::from(server_id)),
                vec![ALPN_OUTRIDER.to_vec(), ALPN_H2.to_vec()],
            )
            .unwrap();
        let dialing = tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
            let mut tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, stream)
                .await
                .unwrap();
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(ALPN_H2));
            tls.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
            tls
        });
        let (mut stream, peer) = listener.accept().await.unwrap();
        let detection = detect(&mut stream, Duration::from_secs(5)).await;
        let Protocol::Tls(hello) = detection.protocol else {
            panic!("not TLS: {:?}", detection.protocol);
        };
        assert!(hello.mesh);
        let rewound = crate::io::rewind::Rewind::new(detection.bytes.freeze(), stream);
        let deadline = Instant::now() + Duration::from_secs(5);
        let accepted = crate::io::tls::handshake(rewound, peer, &server, deadline)
            .await
            .unwrap();
        assert_eq!(
            accepted.peer_identity.as_ref().map(|v| v.to_str().unwrap()),
            Some(client_id)
        );
        let mut io = accepted.io;
        let mut request = [0u8; 18];
        io.read_exact(&mut request).await.unwrap();
        assert_eq!(&request, b"GET / HTTP/1.1\r\n\r\n");
        drop(dialing.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn silence_times_out_and_keeps_what_came() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        let detection = detect(&mut server, Duration::from_secs(1)).await;
        assert_eq!(detection.protocol, Protocol::TimedOut);
        assert_eq!(detection.elapsed, Duration::from_secs(1));
        client.write_all(b"GET / HT").await.unwrap();
        let detection = detect(&mut server, Duration::from_secs(1)).await;
        assert_eq!(detection.protocol, Protocol::TimedOut);
        assert_eq!(&detection.bytes[..], b"GET / HT");
        client.write_all(b"*3\r\n").await.unwrap();
        let detection = detect(&mut server, Duration::from_secs(1)).await;
        assert_eq!(detection.protocol, Protocol::Opaque);
        assert_eq!(detection.elapsed, Duration::ZERO);
        drop(client);
        let detection = detect(&mut server, Duration::from_secs(1)).await;
        assert_eq!(detection.protocol, Protocol::Closed);
    }
}
