//! The proxy's workload identity for mesh mTLS: the short-lived certificate and its key, which
//! `control::certificate` gets from the control plane and renews without a restart.
//!
//! The certificate in force is one [`Held`] in an `ArcSwap`. New handshakes read it; a
//! connection already established keeps the certificate it was made with, so a renewal never
//! disturbs traffic. Peers are verified against the trust bundle of the certificate in force,
//! and a peer's identity is the SPIFFE URI SAN of its certificate.
//!
//! Here: the mesh configuration ([`Mesh`]: the certificate in force, the TLS configs built on
//! it, the TLS metrics). `verify`: how peers' certificates are judged and which certificate
//! each side presents. `failure`: a handshake failure as a label and in words. Renewal is the
//! control layer's (`control::certificate`).

mod failure;
mod verify;

pub use failure::{describe, failure_reason};
pub use verify::{spiffe_id_of, unverified_client_config, WrongIdentity};
use verify::{ClientCert, Fixed, ServerCheck, ServerVerifier};

use std::sync::Arc;

use arc_swap::ArcSwapOption;
use http::StatusCode;
use outrider_config::wire::CertificateResponse;
use prometheus::{IntCounterVec, IntGauge, Opts};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

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

/// A test identity and its SPIFFE id.
#[cfg(test)]
pub(crate) type TestIdentity = (Arc<Mesh>, &'static str);

/// A fresh self-signed CA named `name`, for tests: its certificate, and the issuer that signs
/// with it.
#[cfg(test)]
pub(crate) fn test_ca(name: &str) -> (rcgen::Certificate, rcgen::Issuer<'static, rcgen::KeyPair>) {
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca");
    (ca_cert, rcgen::Issuer::new(ca_params, ca_key))
}

/// Two mesh identities certified by one fresh CA, for tests of the layers that use them:
/// (client, server).
#[cfg(test)]
pub(crate) fn test_pair() -> (TestIdentity, TestIdentity) {
    let (ca_cert, ca) = test_ca("test CA");
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
mod tests;
