//! A failed send, as the proxy's typed failure: a [`ProxyError`] that keeps the connect, TLS,
//! hyper or codec error as its source, its kind decided by the errors' types, never their
//! text. (A response body that broke is classified beside it, `io::body::failure_kind`.)

use std::net::SocketAddr;

use crate::core::errors::{BoxError, ErrorKind, ProxyError, TlsFailure};
use crate::io::connect::ConnectError;
use crate::io::pool::{DirectError, SendError, Unsent};

/// The failure of a send to the endpoint at `addr`, and the request back when it never left
/// because its TCP connection could not be opened (it may go to another endpoint). A TLS
/// handshake that failed also sent nothing, but its peer answered: trying another endpoint at
/// once is for dead ones, so it is left to the retry policy.
pub fn send_error(error: SendError, addr: SocketAddr) -> (ProxyError, Option<Unsent>) {
    match error {
        SendError::Connect { error, unsent } => {
            let error = connect_error(error);
            let tcp = matches!(
                error.kind(),
                ErrorKind::ConnectRefused | ErrorKind::ConnectTimeout | ErrorKind::ConnectFailed
            );
            (error, tcp.then_some(unsent))
        }
        SendError::Http(source) if source.is_parse() => (protocol(addr, source), None),
        SendError::Http(source) => (reset(addr, source), None),
        SendError::TransferCoding(source)
        | SendError::Direct(DirectError::TransferCoding(source)) => (protocol(addr, source), None),
        SendError::Direct(source) if source.is_invalid() => (protocol(addr, source), None),
        SendError::Direct(source) => (reset(addr, source), None),
    }
}

/// A connection that could not be opened (or secured), as the proxy's failure.
pub fn connect_error(error: ConnectError) -> ProxyError {
    match error {
        ConnectError::Refused(addr) => ProxyError::ConnectRefused(addr),
        ConnectError::Timeout { addr, after } => ProxyError::ConnectTimeout { addr, after },
        ConnectError::Io { addr, source } => ProxyError::Connect { addr, source },
        ConnectError::PendingLimit(service) => ProxyError::PendingLimit(service),
        ConnectError::Tls {
            addr,
            reason,
            message,
            source,
        } => ProxyError::TlsHandshake(Box::new(TlsFailure {
            addr,
            mesh: Some(reason),
            message,
            source,
        })),
        ConnectError::OriginationTls {
            addr,
            message,
            source,
        } => ProxyError::TlsHandshake(Box::new(TlsFailure {
            addr,
            mesh: None,
            message,
            source,
        })),
    }
}

fn protocol(addr: SocketAddr, source: impl Into<BoxError>) -> ProxyError {
    ProxyError::UpstreamProtocol {
        addr,
        source: source.into(),
    }
}

fn reset(addr: SocketAddr, source: impl Into<BoxError>) -> ProxyError {
    ProxyError::UpstreamReset {
        addr,
        source: source.into(),
    }
}

#[cfg(test)]
mod tests {
    //! Each failure produced for real, on 127.0.0.1, through the pool and connector the
    //! request path uses.

    use std::sync::Arc;
    use std::time::Duration;

    use http::Request;
    use outrider_config::{OriginationTls, Protocol};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::core::errors::{RetrySafety, Side};
    use crate::io::connect::EndpointConnector;
    use crate::io::pool::EndpointPool;
    use crate::io::request_body::RequestBody;
    use crate::io::tls::UpstreamTls;
    use crate::telemetry::metrics::Metrics;

    fn pool(addr: SocketAddr, tls: Option<UpstreamTls>) -> Arc<EndpointPool> {
        let metrics = Metrics::new("test").expect("metrics");
        let connector = EndpointConnector::new(
            addr,
            Duration::from_secs(5),
            metrics.connections("svc", &addr.to_string()),
            None,
        )
        .with_tls(tls);
        EndpointPool::new(connector, Protocol::Http1)
    }

    /// Sends a GET to `addr` and classifies how it failed.
    async fn failed_get(addr: SocketAddr, tls: Option<UpstreamTls>) -> (ProxyError, bool) {
        let req = Request::get("/")
            .header("host", "svc")
            .body(RequestBody::Empty)
            .expect("request");
        let Err(error) = pool(addr, tls).send(req).await else {
            panic!("the send succeeded");
        };
        let (error, unsent) = send_error(error, addr);
        (error, unsent.is_some())
    }

    /// An upstream that answers every connection with `answer`, once the request head is in
    /// (`None`: closes without a byte).
    async fn upstream(answer: Option<&'static [u8]>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
                if let Some(answer) = answer {
                    let _ = stream.write_all(answer).await;
                }
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_closed_port_is_a_refused_connect_that_sent_nothing() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let (error, unsent) = failed_get(addr, None).await;
        assert_eq!(error.kind(), ErrorKind::ConnectRefused, "{error}");
        assert!(unsent, "the request comes back for another endpoint");
        assert_eq!(error.kind().retry_safety(), RetrySafety::Safe);
        assert_eq!(error.flag().code(), "UF");
        assert_eq!(error.status(), http::StatusCode::BAD_GATEWAY);
        assert!(error.kind().is_upstream_failure());
    }

    #[tokio::test]
    async fn a_connection_closed_before_the_response_is_a_reset_with_its_cause() {
        let addr = upstream(None).await;
        let (error, unsent) = failed_get(addr, None).await;
        assert_eq!(
            error.kind(),
            ErrorKind::UpstreamResetBeforeHeaders,
            "{error}"
        );
        assert!(!unsent);
        assert_eq!(
            error.to_string(),
            format!("upstream {addr} reset the connection")
        );
        let source = std::error::Error::source(&error).expect("a source");
        assert!(source.downcast_ref::<DirectError>().is_some(), "{source:?}");
        assert_eq!(error.kind().retry_safety(), RetrySafety::IfIdempotent);
        assert_eq!(error.flag().code(), "UC");
    }

    #[tokio::test]
    async fn a_response_that_is_not_http_is_a_protocol_error_through_either_client() {
        let addr = upstream(Some(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")).await;
        // Bodiless: the direct codec reads it.
        let (error, _) = failed_get(addr, None).await;
        assert_eq!(error.kind(), ErrorKind::UpstreamProtocol, "{error}");
        assert_eq!(
            error.to_string(),
            format!("upstream {addr} failed: invalid response")
        );
        assert_eq!(error.flag().code(), "UPE");
        // With a body: hyper reads it, and its error is the source.
        let req = Request::post("/")
            .header("host", "svc")
            .header("content-length", "2")
            .body(RequestBody::Buffered(Some(bytes::Bytes::from_static(
                b"hi",
            ))))
            .expect("request");
        let Err(sent) = pool(addr, None).send(req).await else {
            panic!("the send succeeded");
        };
        let (error, _) = send_error(sent, addr);
        assert_eq!(error.kind(), ErrorKind::UpstreamProtocol, "{error}");
        let source = std::error::Error::source(&error).expect("a source");
        assert!(
            source
                .downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_parse),
            "{source:?}"
        );
    }

    /// A CA named `ca_name` and a server certificate for `name` signed by it: (CA PEM, leaf,
    /// key).
    fn issued(
        ca_name: &str,
        name: &str,
    ) -> (String, rustls::pki_types::CertificateDer<'static>, Vec<u8>) {
        let (ca_cert, ca) = crate::io::identity::test_ca(ca_name);
        let key = rcgen::KeyPair::generate().expect("key");
        let leaf = rcgen::CertificateParams::new(vec![name.to_string()])
            .expect("params")
            .signed_by(&key, &ca)
            .expect("leaf");
        (ca_cert.pem(), leaf.der().clone(), key.serialize_der())
    }

    #[tokio::test]
    async fn a_server_from_another_ca_is_a_tls_handshake_failure_like_a_connect_failure() {
        let name = "ext.example.test";
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let (_, leaf, key) = issued("real CA", name);
        let server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.into()),
            )
            .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = acceptor.accept(stream).await;
            }
        });
        // The proxy trusts another CA than the one that signed the server's certificate.
        let (other_ca, _, _) = issued("another CA", name);
        let ca_file = std::env::temp_dir().join(format!("outrider-classify-{}.pem", addr.port()));
        std::fs::write(&ca_file, other_ca).expect("write CA");
        let config = OriginationTls {
            sni: name.to_string(),
            ca: Some(ca_file.display().to_string()),
        };
        let tls = crate::io::tls::origination(&config, Protocol::Http1, provider);
        let _ = std::fs::remove_file(&ca_file);
        let (error, unsent) = failed_get(addr, Some(tls.expect("origination config"))).await;

        assert_eq!(error.kind(), ErrorKind::TlsHandshake, "{error}");
        assert!(
            error
                .to_string()
                .starts_with(&format!("tls handshake with {addr} failed: ")),
            "{error}"
        );
        // rustls's own error, kept as the source.
        let source = std::error::Error::source(&error).expect("a source");
        let tls_error = source
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        assert!(
            matches!(
                tls_error,
                Some(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::UnknownIssuer
                ))
            ),
            "{source:?}"
        );
        // Connect-class: UF, nothing sent, a failure for the breaker and outlier detection;
        // the peer answered, so it is not sent elsewhere at once.
        assert_eq!(error.flag().code(), "UF");
        assert_eq!(error.kind().retry_safety(), RetrySafety::Safe);
        assert!(error.kind().is_connect_failure() && error.kind().is_upstream_failure());
        assert_eq!(error.kind().side(), Side::Upstream);
        assert!(!unsent);
    }
}
