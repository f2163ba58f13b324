//! Getting the workload certificate the mesh identity ([`Mesh`]) serves: a key made here (it
//! never leaves the process), a CSR sent to the control plane with the proxy's token, and the
//! short-lived certificate that comes back, renewed at about 70% of its lifetime without a
//! restart. The CSR goes to the control-plane replica the subscription is connected to, and to
//! the next one while a replica cannot be reached or does not answer: any replica answers for
//! the one CA they share. Failures are retried with backoff while the certificate in force
//! stays.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::HeaderName;
use http::StatusCode;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use outrider_config::wire::{self, CertificateRequest, CertificateResponse, CERTIFICATE_PATH};

use crate::control::client::{ControlClient, ControlPost};
use crate::control::replicas;
use crate::control::subscribe::{
    read_service_account_token, Backoff, ControlConfig, CONNECT_TIMEOUT,
};
use crate::io::identity::{IdentityError, Mesh};

/// Percentage of a certificate's lifetime after which it is renewed.
const RENEW_AT_PERCENT: u64 = 70;
/// Shortest wait before the next fetch after a certificate is installed.
pub const MIN_RENEW_IN: Duration = Duration::from_secs(1);
/// Longest wait for a replica's answer to a CSR, connection included: past it, the next
/// replica is asked.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest certificate response accepted.
const MAX_RESPONSE: usize = 256 * 1024;

/// When to renew a certificate valid from `not_before` to `not_after` (Unix seconds), counted
/// from `now`, the moment it arrived: at 70% of the time it is usable here, and never sooner
/// than [`MIN_RENEW_IN`].
///
/// The lifetime counts from `now`, not from `not_before`: the CA backdates `not_before` for
/// peers whose clocks lag, and counting that slack as lifetime renewed short certificates
/// early (a 1 min one after 24 s) and put the renewal point of any shorter than ~26 s in the
/// past, so the proxy re-fetched in a tight loop (over 2,000 certificates in 8 s with a 3 s
/// TTL). The floor keeps a certificate that arrives nearly or already expired (clocks apart)
/// from doing the same.
pub fn renew_in(now: u64, not_before: u64, not_after: u64) -> Duration {
    let start = not_before.max(now);
    let usable_ms = not_after.saturating_sub(start).saturating_mul(1000);
    // Saturating: the times come from a certificate (a far-future `not_before` must not wrap).
    let wait_ms = (start - now)
        .saturating_mul(1000)
        .saturating_add(usable_ms / 100 * RENEW_AT_PERCENT);
    Duration::from_millis(wait_ms).max(MIN_RENEW_IN)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Who this proxy asks to be.
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    /// The control plane (URL, token and service-account token).
    pub control: ControlConfig,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
}

/// Fetches the first certificate and renews it at ~70% of each lifetime, forever; failures are
/// retried with backoff while the certificate in force stays.
pub fn spawn(config: IdentityConfig, mesh: Arc<Mesh>) {
    tokio::spawn(async move {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let client: ControlClient = Client::builder(TokioExecutor::new()).build(connector);
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        loop {
            match fetch(&client, &config).await {
                Ok((issued, key)) => match mesh.install(&issued, key) {
                    Ok(held) => {
                        backoff.reset();
                        mesh.metrics.renewals.with_label_values(&["ok"]).inc();
                        let wait = renew_in(unix_now(), held.not_before, held.not_after);
                        tracing::info!(identity = %held.identity, not_after = held.not_after, renew_in = %outrider_config::Duration(wait), "workload certificate in force");
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                    Err(error) => {
                        mesh.metrics.renewals.with_label_values(&["error"]).inc();
                        tracing::error!(%error, "issued certificate unusable");
                    }
                },
                Err(error) => {
                    mesh.metrics.renewals.with_label_values(&["error"]).inc();
                    tracing::warn!(%error, "cannot get a workload certificate; retrying");
                }
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    });
}

/// One CSR round trip: a fresh key (kept here), its CSR, and the answer of the first replica
/// that gives one, starting with the one the subscription is connected to.
async fn fetch(
    client: &ControlClient,
    config: &IdentityConfig,
) -> Result<(CertificateResponse, Vec<u8>), IdentityError> {
    let key = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)?
        .pem()?;
    let request = CertificateRequest {
        csr,
        namespace: config.namespace.clone(),
        service_account: config.service_account.clone(),
    };
    let token = config.control.token.read().map_err(IdentityError::Token)?;
    let sa_token = match &config.control.service_account_token {
        Some(path) => {
            Some(read_service_account_token(path).map_err(IdentityError::ServiceAccountToken)?)
        }
        None => None,
    };
    let body = Bytes::from(
        serde_json::to_vec(&request).map_err(|e| IdentityError::Response(e.to_string()))?,
    );
    let replicas = &config.control.replicas;
    let candidates = replicas
        .resolve()
        .await
        .map_err(|e| IdentityError::Control(e.to_string()))?;
    let post = ControlPost {
        path: CERTIFICATE_PATH,
        token: &token,
        extra_header: sa_token.map(|t| {
            (
                HeaderName::from_static(wire::SERVICE_ACCOUNT_TOKEN_HEADER),
                t,
            )
        }),
        timeout: FETCH_TIMEOUT,
        max_response: MAX_RESPONSE,
    };
    let mut unreachable = Vec::new();
    for replica in replicas::connected_first(candidates, replicas.connected().as_ref()) {
        let answer = post.send(client, &replica, body.clone()).await;
        let (status, body) = match answer {
            Ok(answer) => answer,
            Err(reason) => {
                tracing::debug!(%replica, %reason, "certificate request: replica unavailable");
                unreachable.push(format!("{replica}: {reason}"));
                continue;
            }
        };
        if status != StatusCode::OK {
            return Err(IdentityError::Refused {
                status,
                body: String::from_utf8_lossy(&body).into_owned(),
            });
        }
        let issued: CertificateResponse =
            serde_json::from_slice(&body).map_err(|e| IdentityError::Response(e.to_string()))?;
        return Ok((issued, key.serialize_der()));
    }
    Err(IdentityError::Control(unreachable.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_at_seventy_percent_of_the_lifetime() {
        // A 24 h certificate issued (backdated 60 s) at t=1000: 70% of the 24 h ahead.
        let (nb, na) = (940, 1000 + 86_400);
        assert_eq!(renew_in(1000, nb, na), Duration::from_secs(60_480));
        // A 10 s certificate: renewed 7 s after its start.
        assert_eq!(renew_in(100, 100, 110), Duration::from_secs(7));
        // A 3 s certificate backdated 60 s: the backdate is not lifetime to spend.
        assert_eq!(renew_in(1000, 940, 1003), Duration::from_millis(2100));
        // Arriving nearly or already expired (clocks apart): a pause, never a tight loop.
        assert_eq!(renew_in(109, 100, 110), MIN_RENEW_IN);
        assert_eq!(renew_in(500, 100, 110), MIN_RENEW_IN);
        // A certificate valid only from the far future saturates rather than overflows.
        assert_eq!(
            renew_in(0, u64::MAX, u64::MAX),
            Duration::from_millis(u64::MAX)
        );
    }
}
