//! TLS on the wire: the one stream type for plaintext and TLS connections (both directions),
//! the inbound side's first-byte sniffing and handshake, and the outbound handshake done by the
//! endpoint connector (mesh mTLS, or TLS origination to an external HTTPS service).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use http::HeaderValue;
use outrider_config::{InboundMtls, OriginationTls, Protocol};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::io::identity::{self, Mesh, ALPN_H2, ALPN_HTTP1};
use crate::io::rewind::Rewind;

/// First byte of a TLS record carrying a handshake (a ClientHello starts with it).
const TLS_HANDSHAKE: u8 = 0x16;
/// Longest wait for an outbound TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A data-plane connection: plaintext, or TLS as client or server.
pub enum Io {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS to an upstream sidecar.
    Client(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// TLS from a peer sidecar.
    Server(Box<tokio_rustls::server::TlsStream<Rewind<TcpStream>>>),
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Io::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            Io::Client($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
            Io::Server($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
        }
    };
}

impl Io {
    /// The protocol agreed by ALPN in the TLS handshake; `None` on plain TCP.
    pub fn alpn(&self) -> Option<&[u8]> {
        match self {
            Self::Plain(_) => None,
            Self::Client(tls) => tls.get_ref().1.alpn_protocol(),
            Self::Server(tls) => tls.get_ref().1.alpn_protocol(),
        }
    }

    /// Whether an idle connection is still open with nothing unread: the peer has neither
    /// closed it nor sent anything. Never waits. On plain TCP it asks the runtime's cached
    /// readiness, making a system call only if the socket became readable; TLS reads through
    /// its session (a close_notify or a stray record counts as activity).
    pub fn is_quiet(&mut self) -> bool {
        let mut probe = [0u8; 1];
        match self {
            Self::Plain(stream) => {
                matches!(stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
            _ => {
                let mut probe = ReadBuf::new(&mut probe);
                let mut cx = Context::from_waker(std::task::Waker::noop());
                Pin::new(self).poll_read(&mut cx, &mut probe).is_pending()
            }
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf))
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Client(s) => s.is_write_vectored(),
            Io::Server(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx))
    }
}

/// How a service's connections are secured.
#[derive(Clone)]
pub enum UpstreamTls {
    /// Mesh mTLS with this config (built once per policy load).
    Mesh {
        /// Client certificate, peer verification, ALPN.
        config: Arc<ClientConfig>,
        /// The same, offering only [`identity::ALPN_OUTRIDER_TCP`]: for opaque TCP streams
        /// wrapped in mesh mTLS (see [`connect_opaque`]).
        opaque: Arc<ClientConfig>,
        /// For handshake-failure metrics.
        mesh: Arc<Mesh>,
        /// The SPIFFE id the peer must present, when the policy names one (the access log's
        /// `peer_identity`, as a header value made once per policy load).
        identity: Option<HeaderValue>,
    },
    /// The policy asks for mesh TLS but this proxy has no identity configured: every
    /// connection fails rather than going out in plaintext.
    NoIdentity,
    /// TLS origination to an external HTTPS service (built once per policy load).
    Origination {
        /// Trust roots, TLS 1.3/1.2, ALPN of the service's protocol; no client certificate.
        config: Arc<ClientConfig>,
        /// Sent as SNI; the server certificate must be valid for it.
        name: ServerName<'static>,
    },
    /// TLS origination whose config could not be built (unreadable CA bundle...): every
    /// connection fails with this reason rather than going out unverified or in plaintext.
    Unusable(Arc<str>),
}

impl UpstreamTls {
    /// The identity every endpoint of the service is verified to have, if one is required.
    pub fn identity(&self) -> Option<HeaderValue> {
        match self {
            Self::Mesh { identity, .. } => identity.clone(),
            _ => None,
        }
    }
}

/// Why an outbound TLS handshake failed.
#[derive(Debug)]
pub struct HandshakeError {
    /// Short label (metrics).
    pub reason: &'static str,
    /// The full error.
    pub message: String,
    /// TLS origination (an external service) rather than mesh mTLS.
    pub origination: bool,
    /// The handshake's own error (rustls's, inside an `io::Error`), when the handshake ran.
    pub source: Option<io::Error>,
}

/// Why an origination config could not be built.
#[derive(Debug, thiserror::Error)]
pub enum OriginationError {
    /// The CA bundle could not be read.
    #[error("cannot read CA bundle {path}: {source}")]
    ReadCa {
        /// The file.
        path: String,
        /// The OS error.
        source: io::Error,
    },
    /// The CA bundle holds no usable certificate.
    #[error("CA bundle {0} holds no usable certificate")]
    EmptyCa(String),
    /// Neither a bundle was given nor the system has roots.
    #[error("no system trust roots found (set `ca`, or SSL_CERT_FILE)")]
    NoSystemRoots,
    /// `sni` is not a name rustls accepts (validation should have caught it).
    #[error("invalid sni {0:?}")]
    Name(String),
    /// rustls refused the settings.
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
}

/// The system's trust roots, read once per process: the OS store changes with the image, not
/// with the policy, and reading it costs milliseconds per call.
fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    Arc::clone(ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for error in &found.errors {
            tracing::warn!(%error, "error reading a system trust root");
        }
        let mut roots = RootCertStore::empty();
        let (added, ignored) = roots.add_parsable_certificates(found.certs);
        tracing::debug!(added, ignored, "system trust roots loaded");
        Arc::new(roots)
    }))
}

/// The TLS of a service with `tls: { sni, ca }`: verified against `ca` (read now, once per
/// policy load) or the system roots, TLS 1.3 or 1.2, ALPN offering the service's protocol.
pub fn origination(
    tls: &OriginationTls,
    protocol: Protocol,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<UpstreamTls, OriginationError> {
    let name = ServerName::try_from(tls.sni.clone())
        .map_err(|_| OriginationError::Name(tls.sni.clone()))?;
    let roots = match &tls.ca {
        Some(path) => {
            let read = |source| OriginationError::ReadCa {
                path: path.clone(),
                source,
            };
            let pem = std::fs::read(path).map_err(read)?;
            let mut roots = RootCertStore::empty();
            let certs =
                rustls::pki_types::CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok);
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(OriginationError::EmptyCa(path.clone()));
            }
            Arc::new(roots)
        }
        None => {
            let roots = system_roots();
            if roots.is_empty() {
                return Err(OriginationError::NoSystemRoots);
            }
            roots
        }
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = match protocol {
        Protocol::Http2 => vec![ALPN_H2.to_vec()],
        Protocol::Http1 => vec![ALPN_HTTP1.to_vec()],
    };
    Ok(UpstreamTls::Origination {
        config: Arc::new(config),
        name,
    })
}

/// Runs the client handshake over `stream` to `addr`.
pub async fn connect(
    tls: &UpstreamTls,
    addr: SocketAddr,
    stream: TcpStream,
) -> Result<Io, HandshakeError> {
    let (config, mesh) = match tls {
        UpstreamTls::Mesh { config, mesh, .. } => (config, mesh),
        UpstreamTls::NoIdentity => {
            return Err(HandshakeError {
                reason: "no_identity",
                message: "the policy asks for mesh TLS but this proxy has no workload identity (--service-account)".into(),
                origination: false,
                source: None,
            })
        }
        UpstreamTls::Origination { config, name } => {
            return originate(config, name, addr, stream).await
        }
        UpstreamTls::Unusable(why) => {
            return Err(HandshakeError {
                reason: "config",
                message: why.to_string(),
                origination: true,
                source: None,
            })
        }
    };
    mesh_handshake(config, mesh, addr, stream).await
}

/// Wraps the opaque TCP stream `stream` to `addr` in mesh mTLS, offering only
/// [`identity::ALPN_OUTRIDER_TCP`]: the peer is verified as for HTTP mesh traffic and must
/// agree to that protocol (a sidecar's captured inbound side does), so the stream is never
/// handed to something that would read it as HTTP. Errors as [`connect`]'s.
pub async fn connect_opaque(
    tls: &UpstreamTls,
    addr: SocketAddr,
    stream: TcpStream,
) -> Result<Io, HandshakeError> {
    let (opaque, mesh) = match tls {
        UpstreamTls::Mesh { opaque, mesh, .. } => (opaque, mesh),
        // Only mesh services are wrapped; anything else fails like an identity-less mesh.
        _ => return connect(&UpstreamTls::NoIdentity, addr, stream).await,
    };
    let io = mesh_handshake(opaque, mesh, addr, stream).await?;
    let agreed = match &io {
        Io::Client(tls) => tls.get_ref().1.alpn_protocol() == Some(identity::ALPN_OUTRIDER_TCP),
        _ => false,
    };
    if !agreed {
        mesh.metrics.handshake_failed("outbound", "alpn");
        return Err(HandshakeError {
            reason: "alpn",
            message: "the peer did not agree to outrider-tcp/1 (not a sidecar's captured port?)"
                .into(),
            origination: false,
            source: None,
        });
    }
    Ok(io)
}

/// The client side of mesh mTLS with `config` over `stream` to `addr`.
async fn mesh_handshake(
    config: &Arc<ClientConfig>,
    mesh: &Arc<Mesh>,
    addr: SocketAddr,
    stream: TcpStream,
) -> Result<Io, HandshakeError> {
    // The peer is checked by SPIFFE id, not by name: the address only keys the (disabled)
    // session cache and SNI, which is not sent for IP addresses.
    let name = ServerName::IpAddress(addr.ip().into());
    let handshake = TlsConnector::from(Arc::clone(config)).connect(name, stream);
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(stream)) => Ok(Io::Client(Box::new(stream))),
        Ok(Err(error)) => {
            let reason = identity::failure_reason(&error);
            let message = identity::describe(&error);
            mesh.metrics.handshake_failed("outbound", reason);
            tracing::warn!(%addr, reason, error = %message, "mesh TLS handshake to upstream failed");
            Err(HandshakeError {
                reason,
                message,
                origination: false,
                source: Some(error),
            })
        }
        Err(_) => {
            mesh.metrics.handshake_failed("outbound", "timeout");
            Err(HandshakeError {
                reason: "timeout",
                message: format!(
                    "no TLS handshake within {}",
                    outrider_config::Duration(HANDSHAKE_TIMEOUT)
                ),
                origination: false,
                source: None,
            })
        }
    }
}

/// The client handshake to an external HTTPS server, verified by name.
async fn originate(
    config: &Arc<ClientConfig>,
    name: &ServerName<'static>,
    addr: SocketAddr,
    stream: TcpStream,
) -> Result<Io, HandshakeError> {
    let handshake = TlsConnector::from(Arc::clone(config)).connect(name.clone(), stream);
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(stream)) => Ok(Io::Client(Box::new(stream))),
        Ok(Err(error)) => {
            let reason = identity::failure_reason(&error);
            let message = error.to_string();
            tracing::warn!(%addr, sni = %name.to_str(), reason, error = %message, "TLS handshake to external service failed");
            Err(HandshakeError {
                reason,
                message,
                origination: true,
                source: Some(error),
            })
        }
        Err(_) => Err(HandshakeError {
            reason: "timeout",
            message: format!(
                "no TLS handshake within {}",
                outrider_config::Duration(HANDSHAKE_TIMEOUT)
            ),
            origination: true,
            source: None,
        }),
    }
}

/// An accepted inbound connection, ready to serve.
pub struct Accepted {
    /// The stream.
    pub io: Io,
    /// The verified caller identity as the header value given to the app (mTLS only).
    pub peer_identity: Option<HeaderValue>,
}

/// Decides what an inbound connection is. Without a mesh identity everything is plaintext
/// (and refused under `strict`).
/// With one: a first byte of 0x16 is a TLS ClientHello and gets the mTLS handshake (client
/// certificate required); anything else is plaintext, served when `mode` is permissive and
/// closed when strict. `None`: the connection is to be closed (the reason is logged here).
/// The first byte and the handshake must be in by `deadline` (the connection's header-read
/// deadline).
pub async fn accept_inbound(
    stream: TcpStream,
    peer: SocketAddr,
    mesh: Option<&Arc<Mesh>>,
    mode: InboundMtls,
    deadline: tokio::time::Instant,
) -> Option<Accepted> {
    let Some(mesh) = mesh else {
        if mode == InboundMtls::Strict {
            // Strict without an identity cannot accept mTLS either; serving plaintext would
            // silently ignore the policy.
            tracing::warn!(%peer, "connection refused: inbound mTLS is strict but this proxy has no workload identity (--service-account)");
            return None;
        }
        return Some(Accepted {
            io: Io::Plain(stream),
            peer_identity: None,
        });
    };
    let mut first = [0u8; 1];
    let is_tls = match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
        Ok(Ok(1)) => first[0] == TLS_HANDSHAKE,
        // Closed before a byte, an error, or silence: nothing to serve.
        _ => return None,
    };
    if !is_tls {
        if mode == InboundMtls::Strict {
            mesh.metrics
                .handshake_failed("inbound", "plaintext_refused");
            tracing::warn!(%peer, "plaintext connection refused: inbound mTLS is strict");
            return None;
        }
        return Some(Accepted {
            io: Io::Plain(stream),
            peer_identity: None,
        });
    }
    handshake(
        Rewind::new(bytes::Bytes::new(), stream),
        peer,
        mesh,
        deadline,
    )
    .await
}

/// The server side of mesh mTLS over `stream` (client certificate required, a SPIFFE id in
/// it), by `deadline`. `None`: refused (the reason is logged and counted here).
pub async fn handshake(
    stream: Rewind<TcpStream>,
    peer: SocketAddr,
    mesh: &Arc<Mesh>,
    deadline: tokio::time::Instant,
) -> Option<Accepted> {
    let Some(held) = mesh.held() else {
        mesh.metrics
            .handshake_failed("inbound", "no_certificate_held");
        tracing::warn!(%peer, "mTLS connection refused: no workload certificate held yet");
        return None;
    };
    let acceptor = TlsAcceptor::from(Arc::clone(&held.server));
    let stream = match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            let reason = identity::failure_reason(&error);
            mesh.metrics.handshake_failed("inbound", reason);
            tracing::warn!(%peer, reason, error = %identity::describe(&error), "mesh TLS handshake from peer failed");
            return None;
        }
        Err(_) => {
            mesh.metrics.handshake_failed("inbound", "timeout");
            tracing::warn!(%peer, "mesh TLS handshake from peer timed out");
            return None;
        }
    };
    let peer_identity = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(identity::spiffe_id_of)
        .and_then(|id| HeaderValue::from_str(&id).ok());
    if peer_identity.is_none() {
        // Chained to our CA but carries no SPIFFE id: not a workload of this mesh.
        mesh.metrics.handshake_failed("inbound", "no_identity");
        tracing::warn!(%peer, "mTLS peer certificate has no SPIFFE id; closed");
        return None;
    }
    Some(Accepted {
        io: Io::Server(Box::new(stream)),
        peer_identity,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::io::identity::{test_pair, ALPN_OUTRIDER_TCP};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn wrapping(mesh: &Arc<Mesh>, expected: &str) -> UpstreamTls {
        let expected: Arc<str> = Arc::from(expected);
        UpstreamTls::Mesh {
            config: mesh
                .client_config(Some(Arc::clone(&expected)), vec![ALPN_H2.to_vec()])
                .unwrap(),
            opaque: mesh
                .client_config(Some(expected), vec![ALPN_OUTRIDER_TCP.to_vec()])
                .unwrap(),
            mesh: Arc::clone(mesh),
            identity: None,
        }
    }

    /// A wrapped opaque stream negotiates `outrider-tcp/1` with a sidecar's server side, which
    /// sees the caller's identity; bytes then flow. A peer with another identity than the
    /// service's is refused.
    #[tokio::test]
    async fn opaque_streams_are_wrapped_in_verified_mesh_tls() {
        let ((client, client_id), (server, server_id)) = test_pair();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let serving = tokio::spawn(async move {
            let (stream, peer) = listener.accept().await.unwrap();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            let accepted = handshake(
                Rewind::new(bytes::Bytes::new(), stream),
                peer,
                &server,
                deadline,
            )
            .await
            .unwrap();
            let mut io = accepted.io;
            let mut ping = [0u8; 4];
            io.read_exact(&mut ping).await.unwrap();
            io.write_all(b"PONG").await.unwrap();
            io.flush().await.unwrap();
            (accepted.peer_identity, ping, listener, server)
        });
        let stream = TcpStream::connect(addr).await.unwrap();
        let mut io = connect_opaque(&wrapping(&client, server_id), addr, stream)
            .await
            .unwrap();
        let Io::Client(tls) = &io else {
            panic!("not a TLS client stream");
        };
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(ALPN_OUTRIDER_TCP));
        io.write_all(b"PING").await.unwrap();
        io.flush().await.unwrap();
        let mut pong = [0u8; 4];
        io.read_exact(&mut pong).await.unwrap();
        assert_eq!(&pong, b"PONG");
        let (identity, ping, listener, server) = serving.await.unwrap();
        assert_eq!(identity.unwrap().to_str().unwrap(), client_id);
        assert_eq!(&ping, b"PING");

        // The service expects another identity: the handshake fails, nothing is relayed.
        let refusing = tokio::spawn(async move {
            let (stream, peer) = listener.accept().await.unwrap();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            let rewound = Rewind::new(bytes::Bytes::new(), stream);
            handshake(rewound, peer, &server, deadline).await.is_some()
        });
        let stream = TcpStream::connect(addr).await.unwrap();
        let wrong = wrapping(&client, "spiffe://td/ns/a/sa/other");
        assert!(connect_opaque(&wrong, addr, stream).await.is_err());
        assert!(!refusing.await.unwrap());
    }
}
