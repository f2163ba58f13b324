//! The proxy's workload identity for mesh mTLS: the short-lived certificate and its key, which
//! `control::certificate` gets from the control plane and renews without a restart.
//!
//! The certificate in force is one [`Held`] in an `ArcSwap`. New handshakes read it; a
//! connection already established keeps the certificate it was made with, so a renewal never
//! disturbs traffic. Peers are verified against the trust bundle of the certificate in force,
//! and a peer's identity is the SPIFFE URI SAN of its certificate.

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use http::StatusCode;
use outrider_config::wire::CertificateResponse;
use prometheus::{IntCounterVec, IntGauge, Opts};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme,
};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::telemetry::metrics::{Metrics, MetricsError};

/// Header carrying the verified caller identity to the local app; removed from every request
/// arriving on the inbound port first, so a caller cannot claim one.
pub const PEER_IDENTITY_HEADER: &str = "x-outrider-peer-identity";

/// The ALPN id sidecars offer first on mesh connections: how a sidecar's ClientHello is told
/// apart from an app's own TLS on a captured inbound port. Servers do not list it (they pick
/// `h2` or `http/1.1`), so a peer that predates it negotiates as before.
pub const ALPN_OUTRIDER: &[u8] = b"outrider/1";
/// The ALPN id a sidecar offers (alone) when it wraps an opaque TCP stream in mesh mTLS: the
/// peer's captured inbound side terminates it and relays the plaintext to the app's port.
/// Servers list it last, so HTTP mesh connections (which do not offer it) never pick it.
pub const ALPN_OUTRIDER_TCP: &[u8] = b"outrider-tcp/1";
/// ALPN ids offered on mesh connections, preferred first.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN id of HTTP/1.1.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Why a certificate could not be obtained or installed.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The token file could not be read.
    #[error("cannot read the token file: {0}")]
    Token(std::io::Error),
    /// The service-account token file could not be read, or is not a header value.
    #[error("cannot read the service-account token file: {0}")]
    ServiceAccountToken(std::io::Error),
    /// The key or CSR could not be made.
    #[error("cannot make the key or CSR: {0}")]
    Key(#[from] rcgen::Error),
    /// The request could not be sent or the answer read.
    #[error("cannot reach the control plane: {0}")]
    Control(String),
    /// The control plane refused.
    #[error("the control plane answered {status}: {body}")]
    Refused {
        /// Its status.
        status: StatusCode,
        /// Its reason.
        body: String,
    },
    /// The answer was not usable.
    #[error("bad certificate response: {0}")]
    Response(String),
    /// rustls refused the certificate, key or bundle.
    #[error("cannot use the certificate: {0}")]
    Tls(#[from] rustls::Error),
}

/// The certificate in force, with everything built from it once.
pub struct Held {
    /// This proxy's SPIFFE id.
    pub identity: Arc<str>,
    /// Chain and signing key, for client and server handshakes.
    pub certified: Arc<CertifiedKey>,
    /// The trust bundle peers must chain to.
    pub roots: Arc<RootCertStore>,
    /// The inbound listener's TLS config (client certificates required, TLS 1.3).
    pub server: Arc<ServerConfig>,
    /// Validity start, Unix seconds.
    pub not_before: u64,
    /// Validity end, Unix seconds.
    pub not_after: u64,
}

/// Metrics of mesh TLS.
#[derive(Clone)]
pub struct TlsMetrics {
    expiry: IntGauge,
    handshake_failures: IntCounterVec,
    /// Certificate fetches by result (`ok`, `error`), counted by `control::certificate`.
    pub(crate) renewals: IntCounterVec,
}

impl TlsMetrics {
    fn new(metrics: &Metrics) -> Result<Self, MetricsError> {
        let expiry = IntGauge::new(
            "outrider_mesh_certificate_expiry_timestamp_seconds",
            "Unix time at which the workload certificate in force expires (0: none held).",
        )
        .map_err(MetricsError::from)?;
        let handshake_failures = IntCounterVec::new(
            Opts::new(
                "outrider_tls_handshake_failures_total",
                "Failed mesh TLS handshakes, by direction and reason.",
            ),
            &["direction", "reason"],
        )
        .map_err(MetricsError::from)?;
        let renewals = IntCounterVec::new(
            Opts::new(
                "outrider_mesh_certificate_fetches_total",
                "Workload certificate requests to the control plane, by result.",
            ),
            &["result"],
        )
        .map_err(MetricsError::from)?;
        metrics.register(Box::new(expiry.clone()))?;
        metrics.register(Box::new(handshake_failures.clone()))?;
        metrics.register(Box::new(renewals.clone()))?;
        Ok(Self {
            expiry,
            handshake_failures,
            renewals,
        })
    }

    /// Counts a failed handshake.
    pub fn handshake_failed(&self, direction: &str, reason: &str) {
        self.handshake_failures
            .with_label_values(&[direction, reason])
            .inc();
    }
}

/// This proxy's mesh identity: the certificate in force and how to get the next one.
pub struct Mesh {
    held: ArcSwapOption<Held>,
    provider: Arc<CryptoProvider>,
    /// Its metrics.
    pub metrics: TlsMetrics,
}

impl Mesh {
    /// A mesh identity with no certificate yet.
    pub fn new(metrics: &Metrics) -> Result<Arc<Self>, MetricsError> {
        Self::with_provider(metrics, rustls::crypto::aws_lc_rs::default_provider())
    }

    /// Like [`Self::new`] with another crypto provider (the benchmarks compare key-exchange
    /// groups with it).
    pub fn with_provider(
        metrics: &Metrics,
        provider: CryptoProvider,
    ) -> Result<Arc<Self>, MetricsError> {
        Ok(Arc::new(Self {
            held: ArcSwapOption::empty(),
            provider: Arc::new(provider),
            metrics: TlsMetrics::new(metrics)?,
        }))
    }

    /// The certificate in force, if one is held.
    pub fn held(&self) -> Option<Arc<Held>> {
        self.held.load_full()
    }

    /// Whether a certificate is held (readiness).
    pub fn ready(&self) -> bool {
        self.held.load().is_some()
    }

    /// The crypto provider (aws-lc-rs; X25519MLKEM768 offered first).
    pub fn provider(&self) -> &Arc<CryptoProvider> {
        &self.provider
    }

    /// Puts an issued certificate in force with the key it was issued for.
    pub fn install(
        &self,
        issued: &CertificateResponse,
        key_der: Vec<u8>,
    ) -> Result<Arc<Held>, IdentityError> {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(issued.chain.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| IdentityError::Response(format!("chain: {e}")))?;
        let Some(leaf) = chain.first() else {
            return Err(IdentityError::Response("empty chain".into()));
        };
        let identity = spiffe_id_of(leaf)
            .ok_or_else(|| IdentityError::Response("no SPIFFE URI in the certificate".into()))?;
        if identity != issued.identity {
            return Err(IdentityError::Response(format!(
                "certificate names {identity}, response says {}",
                issued.identity
            )));
        }
        let mut roots = RootCertStore::empty();
        for root in CertificateDer::pem_slice_iter(issued.trust_bundle.as_bytes()) {
            let root = root.map_err(|e| IdentityError::Response(format!("bundle: {e}")))?;
            roots.add(root)?;
        }
        if roots.is_empty() {
            return Err(IdentityError::Response("empty trust bundle".into()));
        }
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der));
        let certified = Arc::new(CertifiedKey::from_der(chain, key, &self.provider)?);
        let roots = Arc::new(roots);
        let verifier = WebPkiClientVerifier::builder_with_provider(
            Arc::clone(&roots),
            Arc::clone(&self.provider),
        )
        .build()
        .map_err(|e| IdentityError::Response(format!("client verifier: {e}")))?;
        let mut server = ServerConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(Fixed(Arc::clone(&certified))));
        server.alpn_protocols = vec![
            ALPN_H2.to_vec(),
            ALPN_HTTP1.to_vec(),
            ALPN_OUTRIDER_TCP.to_vec(),
        ];
        let held = Arc::new(Held {
            identity: Arc::from(identity.as_str()),
            certified,
            roots,
            server: Arc::new(server),
            not_before: issued.not_before,
            not_after: issued.not_after,
        });
        self.held.store(Some(Arc::clone(&held)));
        self.metrics
            .expiry
            .set(i64::try_from(issued.not_after).unwrap_or(i64::MAX));
        Ok(held)
    }

    /// The client config for one upstream service: this proxy's certificate, TLS 1.3, the peer
    /// verified against the trust bundle and, when given, `expected` as its SPIFFE id. Built
    /// once per policy load; renewals are picked up without rebuilding it.
    pub fn client_config(
        self: &Arc<Self>,
        expected: Option<Arc<str>>,
        alpn: Vec<Vec<u8>>,
    ) -> Result<Arc<ClientConfig>, rustls::Error> {
        let verifier = Arc::new(ServerVerifier {
            provider: Arc::clone(&self.provider),
            check: ServerCheck::Peer {
                mesh: Arc::clone(self),
                expected,
            },
        });
        let mut config = ClientConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(ClientCert(Arc::clone(self))));
        config.alpn_protocols = alpn;
        // Every connection verifies the peer against the bundle and identity in force now;
        // a resumed session would skip that.
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(config))
    }
}

/// The server side's certificate: the one the config was built with.
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

/// The client side's certificate: whichever is in force when the handshake starts.
struct ClientCert(Arc<Mesh>);

impl std::fmt::Debug for ClientCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientCert")
    }
}

impl rustls::client::ResolvesClientCert for ClientCert {
    fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.held().map(|h| Arc::clone(&h.certified))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The peer presented a certificate for another workload.
#[derive(Debug, thiserror::Error)]
#[error("peer identity {presented} is not the expected {expected}")]
pub struct WrongIdentity {
    /// Whom the policy expects.
    pub expected: Arc<str>,
    /// Whom the certificate names (`none` without a SPIFFE URI).
    pub presented: String,
}

/// How a server's certificate is judged. The handshake's signatures are checked the same way
/// whatever the judgement ([`ServerVerifier`]).
enum ServerCheck {
    /// An upstream sidecar: chained to the bundle in force, then its SPIFFE id (`expected`,
    /// when given).
    Peer {
        mesh: Arc<Mesh>,
        expected: Option<Arc<str>>,
    },
    /// Any certificate: the caller checks that the server answers, not who it is (app
    /// probes, as the kubelet's).
    Any,
}

/// Verifies a server's certificate as its [`ServerCheck`] says, and the handshake's signatures
/// with `provider`'s algorithms.
struct ServerVerifier {
    provider: Arc<CryptoProvider>,
    check: ServerCheck,
}

impl std::fmt::Debug for ServerVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.check {
            ServerCheck::Peer { expected, .. } => f
                .debug_struct("PeerVerifier")
                .field("expected", expected)
                .finish_non_exhaustive(),
            ServerCheck::Any => f.write_str("AnyCertificate"),
        }
    }
}

/// A client configuration that accepts any server certificate (TLS 1.3 or 1.2, no client
/// certificate): for HTTPS app probes, which check that the app answers, not who it is (the
/// kubelet skips verification too). `None` if the built-in provider refuses the default
/// protocol versions (it does not).
pub fn unverified_client_config() -> Option<Arc<ClientConfig>> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = Arc::new(ServerVerifier {
        provider: Arc::clone(&provider),
        check: ServerCheck::Any,
    });
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()?;
    Some(Arc::new(
        builder
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth(),
    ))
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ServerCheck::Peer { mesh, expected } = &self.check else {
            return Ok(ServerCertVerified::assertion());
        };
        let held = mesh
            .held()
            .ok_or_else(|| rustls::Error::General("no mesh certificate held yet".into()))?;
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &held.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        // The peer's names are SPIFFE URIs, not DNS names: the identity check replaces the
        // hostname check.
        let presented = spiffe_id_of(end_entity);
        match (expected, presented) {
            (None, Some(_)) => Ok(ServerCertVerified::assertion()),
            (Some(expected), Some(presented)) if **expected == *presented => {
                Ok(ServerCertVerified::assertion())
            }
            (expected, presented) => Err(rustls::Error::InvalidCertificate(
                CertificateError::Other(rustls::OtherError(Arc::new(WrongIdentity {
                    expected: expected.clone().unwrap_or_else(|| Arc::from("a SPIFFE id")),
                    presented: presented.unwrap_or_else(|| "none".into()),
                }))),
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The SPIFFE id in a certificate's URI SANs.
pub fn spiffe_id_of(der: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        GeneralName::URI(uri) if uri.starts_with("spiffe://") => Some((*uri).to_string()),
        _ => None,
    })
}

/// A short label for a handshake failure, for metrics and logs.
pub fn failure_reason(error: &std::io::Error) -> &'static str {
    let Some(tls) = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return match error.kind() {
            std::io::ErrorKind::UnexpectedEof => "peer_closed",
            std::io::ErrorKind::TimedOut => "timeout",
            _ => "io",
        };
    };
    match tls {
        rustls::Error::InvalidCertificate(e) => match e {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            CertificateError::UnknownIssuer | CertificateError::BadSignature => "untrusted",
            CertificateError::Other(other) if other.0.downcast_ref::<WrongIdentity>().is_some() => {
                "wrong_identity"
            }
            _ => "bad_certificate",
        },
        rustls::Error::NoCertificatesPresented => "no_client_certificate",
        rustls::Error::AlertReceived(_) => "alert_received",
        rustls::Error::General(_) => "no_certificate_held",
        _ => "protocol",
    }
}

/// A handshake failure in words: rustls shows a custom verifier's error with `Debug`, so a
/// wrong identity is spelled out here instead.
pub fn describe(error: &std::io::Error) -> String {
    let wrong = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .and_then(|e| match e {
            rustls::Error::InvalidCertificate(CertificateError::Other(other)) => {
                other.0.downcast_ref::<WrongIdentity>()
            }
            _ => None,
        });
    match wrong {
        Some(wrong) => format!("invalid peer certificate: {wrong}"),
        None => error.to_string(),
    }
}

/// A test identity and its SPIFFE id.
#[cfg(test)]
pub(crate) type TestIdentity = (Arc<Mesh>, &'static str);

/// Two mesh identities certified by one fresh CA, for tests of the layers that use them:
/// (client, server).
#[cfg(test)]
pub(crate) fn test_pair() -> (TestIdentity, TestIdentity) {
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca");
    let ca = rcgen::Issuer::new(ca_params, ca_key);
    let (client_id, server_id) = ("spiffe://td/ns/a/sa/client", "spiffe://td/ns/a/sa/server");
    let mesh = |id: &str| {
        let mesh = Mesh::new(&Metrics::new("test").expect("metrics")).expect("mesh");
        let (issued, key) = tests::issue(&ca, &ca_cert.pem(), id);
        mesh.install(&issued, key).expect("install");
        mesh
    };
    ((mesh(client_id), client_id), (mesh(server_id), server_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_exchange_offers_the_hybrid_post_quantum_group_first() {
        let metrics = Metrics::new("test").expect("metrics");
        let mesh = Mesh::new(&metrics).expect("mesh");
        let groups: Vec<_> = mesh.provider().kx_groups.iter().map(|g| g.name()).collect();
        assert_eq!(groups.first(), Some(&rustls::NamedGroup::X25519MLKEM768));
        assert!(groups.contains(&rustls::NamedGroup::X25519));
    }

    /// A CA and a leaf for `id` signed by it, as the control plane would answer.
    pub(super) fn issue(
        ca: &rcgen::Issuer<'_, rcgen::KeyPair>,
        ca_pem: &str,
        id: &str,
    ) -> (CertificateResponse, Vec<u8>) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().expect("ia5"))];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + time::Duration::hours(1);
        let cert = params.signed_by(&key, ca).expect("leaf");
        let response = CertificateResponse {
            identity: id.to_string(),
            chain: cert.pem(),
            trust_bundle: ca_pem.to_string(),
            not_before: 0,
            not_after: 1,
        };
        (response, key.serialize_der())
    }

    #[tokio::test]
    async fn mesh_handshake_negotiates_x25519mlkem768_and_both_sides_see_the_peer_identity() {
        let ca_key = rcgen::KeyPair::generate().expect("ca key");
        let mut ca_params = rcgen::CertificateParams::default();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).expect("ca");
        let ca = rcgen::Issuer::new(ca_params, ca_key);
        let (client_id, server_id) = ("spiffe://td/ns/a/sa/client", "spiffe://td/ns/a/sa/server");

        let client = Mesh::new(&Metrics::new("client").expect("metrics")).expect("mesh");
        let (issued, key) = issue(&ca, &ca_cert.pem(), client_id);
        client.install(&issued, key).expect("install client");
        let server = Mesh::new(&Metrics::new("server").expect("metrics")).expect("mesh");
        let (issued, key) = issue(&ca, &ca_cert.pem(), server_id);
        let held = server.install(&issued, key).expect("install server");

        let config = client
            .client_config(Some(Arc::from(server_id)), vec![ALPN_H2.to_vec()])
            .expect("client config");
        let (a, b) = tokio::io::duplex(64 * 1024);
        let name = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
        let (client_side, server_side) = tokio::join!(
            tokio_rustls::TlsConnector::from(config).connect(name, a),
            tokio_rustls::TlsAcceptor::from(Arc::clone(&held.server)).accept(b),
        );
        let (client_side, server_side) =
            (client_side.expect("client"), server_side.expect("server"));
        let (_, conn) = client_side.get_ref();
        assert_eq!(
            conn.negotiated_key_exchange_group().map(|g| g.name()),
            Some(rustls::NamedGroup::X25519MLKEM768)
        );
        assert_eq!(
            conn.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        assert_eq!(conn.alpn_protocol(), Some(ALPN_H2));
        let peer = |certs: Option<&[CertificateDer<'static>]>| {
            certs.and_then(|c| c.first()).and_then(spiffe_id_of)
        };
        assert_eq!(peer(conn.peer_certificates()).as_deref(), Some(server_id));
        let (_, conn) = server_side.get_ref();
        assert_eq!(peer(conn.peer_certificates()).as_deref(), Some(client_id));
    }

    #[test]
    fn spiffe_id_is_read_from_the_uri_san() {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params =
            rcgen::CertificateParams::new(vec!["example.com".to_string()]).expect("params");
        params.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://td/ns/a/sa/b".try_into().expect("ia5"),
        ));
        let cert = params.self_signed(&key).expect("cert");
        assert_eq!(
            spiffe_id_of(cert.der()).as_deref(),
            Some("spiffe://td/ns/a/sa/b")
        );
        let plain = rcgen::CertificateParams::new(vec!["example.com".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        assert_eq!(spiffe_id_of(plain.der()), None);
    }
}
