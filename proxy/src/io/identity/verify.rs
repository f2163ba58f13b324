//! Judging peers' certificates (the SPIFFE id a sidecar must present, or any certificate for
//! app probes) and choosing the certificate each side presents.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, SignatureScheme};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use super::Mesh;

/// The server side's certificate: the one the config was built with.
#[derive(Debug)]
pub(super) struct Fixed(pub(super) Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

/// The client side's certificate: whichever is in force when the handshake starts.
pub(super) struct ClientCert(pub(super) Arc<Mesh>);

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
pub(super) enum ServerCheck {
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
pub(super) struct ServerVerifier {
    pub(super) provider: Arc<CryptoProvider>,
    pub(super) check: ServerCheck,
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
