//! A handshake failure as a short label (metrics) and in words (logs, error headers).

use rustls::CertificateError;

use super::WrongIdentity;

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
