//! TLS origination end to end: the app speaks plain HTTP to the real `outrider-proxy`, which
//! reaches an external HTTPS server (a real rustls server on 127.0.0.1 with a CA made here)
//! over TLS with the configured SNI, verifying the certificate by name against the given CA,
//! and negotiating h2 or http/1.1 with ALPN per the service's protocol.

#![allow(clippy::unwrap_used, missing_docs)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use outrider_e2e::{full, get, start_proxy, TempDir};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

const NAME: &str = "api.example.test";

/// A CA: its PEM and the issuer that signs server certificates.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(common_name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

/// An HTTPS server on 127.0.0.1 with a certificate for `NAME` signed by `ca`. Each response
/// says which HTTP version, ALPN and SNI the connection used.
async fn https_upstream(ca: &Ca) -> SocketAddr {
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec![NAME.to_string()])
        .unwrap()
        .signed_by(&key, &ca.issuer)
        .unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // A failed handshake (the proxy refusing our certificate) ends here.
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let (_, conn) = tls.get_ref();
                let alpn =
                    String::from_utf8_lossy(conn.alpn_protocol().unwrap_or(b"none")).into_owned();
                let sni = conn.server_name().unwrap_or("none").to_string();
                let service = service_fn(move |req: Request<Incoming>| {
                    let body = serde_json::json!({
                        "version": format!("{:?}", req.version()),
                        "alpn": alpn,
                        "sni": sni,
                        "path": req.uri().path(),
                    });
                    async move { Ok::<_, Infallible>(Response::new(full(body.to_string()))) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}

/// A policy routing authority `ext` to `upstream` over TLS with `sni`, trusting `ca_file`.
fn policy(upstream: SocketAddr, protocol: &str, sni: &str, ca_file: &std::path::Path) -> String {
    format!(
        "services:\n  ext:\n    endpoints: [{upstream}]\n    protocol: {protocol}\n    tls: {{ sni: {sni}, ca: {} }}\nroutes:\n  - match: {{ authority: ext }}\n    service: ext\n",
        ca_file.display()
    )
}

fn write_ca(dir: &TempDir, ca: &Ca) -> std::path::PathBuf {
    let path = dir.path.join("ca.pem");
    std::fs::write(&path, &ca.pem).unwrap();
    path
}

#[tokio::test]
async fn plain_http_from_the_app_goes_out_over_tls_with_sni_and_alpn_h1_and_h2() {
    let ca = ca("test CA");
    let upstream = https_upstream(&ca).await;
    let dir = TempDir::new();
    let ca_file = write_ca(&dir, &ca);
    for (protocol, version, alpn) in [
        ("http1", "HTTP/1.1", "http/1.1"),
        ("http2", "HTTP/2.0", "h2"),
    ] {
        let proxy = start_proxy(&policy(upstream, protocol, NAME, &ca_file));
        for _ in 0..3 {
            let reply = get(proxy.outbound, "ext", "/v1/things").await;
            assert_eq!(
                reply.status,
                200,
                "{protocol}: {:?}",
                reply.header("x-outrider-error")
            );
            let json = reply.json();
            assert_eq!(json["version"], version, "{json}");
            assert_eq!(json["alpn"], alpn, "{json}");
            assert_eq!(json["sni"], NAME, "{json}");
            assert_eq!(json["path"], "/v1/things");
        }
    }
}

#[tokio::test]
async fn a_certificate_not_valid_for_the_sni_is_a_502_with_the_reason() {
    let ca = ca("test CA");
    let upstream = https_upstream(&ca).await;
    let dir = TempDir::new();
    let ca_file = write_ca(&dir, &ca);
    let proxy = start_proxy(&policy(upstream, "http1", "other.example.test", &ca_file));
    let reply = get(proxy.outbound, "ext", "/").await;
    assert_eq!(reply.status, 502);
    let error = reply.header("x-outrider-error").unwrap();
    assert!(
        error.starts_with(&format!("tls handshake with {upstream} failed: "))
            && error.contains("certificate not valid for name \"other.example.test\""),
        "{error}"
    );
}

#[tokio::test]
async fn a_server_from_an_untrusted_ca_is_a_502_with_the_reason() {
    let real = ca("real CA");
    let upstream = https_upstream(&real).await;
    let dir = TempDir::new();
    // The proxy trusts another CA, not the one that signed the server's certificate.
    let ca_file = write_ca(&dir, &ca("another CA"));
    let proxy = start_proxy(&policy(upstream, "http2", NAME, &ca_file));
    let reply = get(proxy.outbound, "ext", "/").await;
    assert_eq!(reply.status, 502);
    let error = reply.header("x-outrider-error").unwrap();
    assert!(
        error.starts_with(&format!("tls handshake with {upstream} failed: "))
            && error.contains("UnknownIssuer"),
        "{error}"
    );
}

#[tokio::test]
async fn an_unreadable_ca_bundle_fails_the_service_rather_than_going_out_unverified() {
    let ca = ca("test CA");
    let upstream = https_upstream(&ca).await;
    let dir = TempDir::new();
    let missing = dir.path.join("missing.pem");
    let proxy = start_proxy(&policy(upstream, "http1", NAME, &missing));
    let reply = get(proxy.outbound, "ext", "/").await;
    assert_eq!(reply.status, 502);
    let error = reply.header("x-outrider-error").unwrap();
    assert!(
        error.contains("tls origination for service ext unusable: cannot read CA bundle"),
        "{error}"
    );
}
