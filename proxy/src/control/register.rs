//! Registration of this proxy's workload in the control plane's service registry
//! (`--register SERVICE --advertise ADDR`), so callers with `discovery: registry` for the
//! service send to it ([`outrider_config::wire::REGISTER_PATH`]).
//!
//! While the proxy is ready (and not draining) it posts its [`Registration`] to the replica the
//! subscription is connected to (the others in turn when that one cannot be reached) and
//! posts it again at a third of the TTL the control plane answers, so one lost renewal does not
//! drop it, and at once whenever the subscription connects (to a replica that may not know
//! it). When it stops being ready it deregisters. On drain, [`Registrar::leave`]
//! deregisters first; the caller then waits the deregister delay, during which callers are
//! pushed the endpoint set without this proxy and stop sending, before the inbound listener
//! stops accepting.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderName;
use http::StatusCode;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use outrider_config::wire::{
    Deregistration, Registration, RegistrationLease, DEREGISTER_PATH, REGISTER_PATH,
    SERVICE_ACCOUNT_TOKEN_HEADER,
};
use tokio::sync::Notify;

use crate::control::client::{ControlClient, ControlPost};
use crate::control::replicas;
use crate::control::subscribe::{read_service_account_token, ControlConfig, CONNECT_TIMEOUT};
use crate::http::shared::Shared;

/// Longest wait for one registration or deregistration round trip.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest answer read.
const MAX_RESPONSE: usize = 64 * 1024;
/// How often readiness is looked at while not registered, and the pause after a failed
/// registration.
const NOT_REGISTERED_PERIOD: Duration = Duration::from_millis(250);
/// Bounds on the renewal period (a third of the TTL the control plane answers).
const RENEW_RANGE: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(60));
/// Default `--deregister-delay`.
pub const DEFAULT_DEREGISTER_DELAY: Duration = Duration::from_secs(2);

/// What to register.
#[derive(Debug, Clone)]
pub struct RegistrationConfig {
    /// How to reach the control plane (its replicas, the token, this proxy's id).
    pub control: ControlConfig,
    /// The services this workload serves.
    pub services: Vec<String>,
    /// The address callers reach this proxy's inbound listener at (`--advertise`); `None`:
    /// the inbound listener's address as bound, which must not be a wildcard.
    pub advertise: Option<SocketAddr>,
    /// On drain, how long the inbound listener keeps accepting after deregistering.
    pub deregister_delay: Duration,
}

/// Why a registration or deregistration did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// The token file could not be read.
    #[error("cannot read the token file: {0}")]
    Token(std::io::Error),
    /// No replica answered.
    #[error("no control-plane replica answered: {0}")]
    Unreachable(String),
    /// A replica refused it.
    #[error("the control plane answered {status}: {body}")]
    Refused {
        /// Its status.
        status: StatusCode,
        /// Its body.
        body: String,
    },
    /// A replica's answer was not a [`RegistrationLease`].
    #[error("bad answer: {0}")]
    Answer(String),
}

/// Keeps the registration while the proxy is ready; [`Registrar::leave`] ends it.
pub struct Registrar {
    config: RegistrationConfig,
    /// The address registered.
    address: SocketAddr,
    client: ControlClient,
    /// Set by [`Registrar::leave`]: no registration is posted after it.
    leaving: AtomicBool,
    wake: Notify,
    /// Held across each round trip, so a deregistration cannot overtake a registration
    /// still in flight.
    exchange: tokio::sync::Mutex<bool>,
}

impl Registrar {
    /// Starts registering `address` while `shared` says the proxy is ready.
    pub fn spawn(
        config: RegistrationConfig,
        address: SocketAddr,
        shared: Arc<Shared>,
    ) -> Arc<Self> {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build(connector);
        let registrar = Arc::new(Self {
            config,
            address,
            client,
            leaving: AtomicBool::new(false),
            wake: Notify::new(),
            exchange: tokio::sync::Mutex::new(false),
        });
        tokio::spawn(Arc::clone(&registrar).run(shared));
        registrar
    }

    /// How long the inbound listener keeps accepting after [`Registrar::leave`].
    pub fn deregister_delay(&self) -> Duration {
        self.config.deregister_delay
    }

    async fn run(self: Arc<Self>, shared: Arc<Shared>) {
        loop {
            let period = {
                let mut registered = self.exchange.lock().await;
                if self.leaving.load(Ordering::Acquire) {
                    return;
                }
                let ready = shared.ready.load(Ordering::Acquire)
                    && !shared.draining.load(Ordering::Acquire);
                if ready {
                    match self.register().await {
                        Ok(ttl) => {
                            if !*registered {
                                tracing::info!(services = ?self.config.services, advertise = %self.address, ttl = %outrider_config::Duration(ttl), "registered");
                            }
                            *registered = true;
                            (ttl / 3).clamp(RENEW_RANGE.0, RENEW_RANGE.1)
                        }
                        Err(error) => {
                            tracing::warn!(%error, "cannot register; retrying");
                            NOT_REGISTERED_PERIOD
                        }
                    }
                } else {
                    if *registered {
                        match self.deregister().await {
                            Ok(()) => tracing::info!("not ready: deregistered"),
                            Err(error) => {
                                tracing::warn!(%error, "not ready and cannot deregister; the registration expires after its TTL")
                            }
                        }
                        *registered = false;
                    }
                    NOT_REGISTERED_PERIOD
                }
            };
            tokio::select! {
                () = tokio::time::sleep(period) => {}
                () = self.wake.notified() => {}
                // A replica that just restarted, or one taking over from a stopped one, has
                // not got this registration: renew at once rather than at the next period.
                () = self.config.control.replicas.subscribed() => {}
            }
        }
    }

    /// On drain: stops registering and deregisters (bounded by the request timeout per
    /// replica tried); whether this proxy was registered.
    pub async fn leave(&self) -> bool {
        self.leaving.store(true, Ordering::Release);
        self.wake.notify_one();
        let mut registered = self.exchange.lock().await;
        if !*registered {
            return false;
        }
        match self.deregister().await {
            Ok(()) => tracing::info!("draining: deregistered"),
            Err(error) => {
                tracing::warn!(%error, "draining and cannot deregister; the registration expires after its TTL")
            }
        }
        *registered = false;
        true
    }

    async fn register(&self) -> Result<Duration, RegisterError> {
        let registration = Registration {
            proxy: self.config.control.proxy_id.clone(),
            services: self.config.services.clone(),
            address: self.address,
        };
        let body =
            serde_json::to_vec(&registration).map_err(|e| RegisterError::Answer(e.to_string()))?;
        let answer = self.post(REGISTER_PATH, body).await?;
        let lease: RegistrationLease =
            serde_json::from_slice(&answer).map_err(|e| RegisterError::Answer(e.to_string()))?;
        Ok(Duration::from_millis(lease.ttl_ms))
    }

    async fn deregister(&self) -> Result<(), RegisterError> {
        let body = serde_json::to_vec(&Deregistration {
            proxy: self.config.control.proxy_id.clone(),
        })
        .map_err(|e| RegisterError::Answer(e.to_string()))?;
        self.post(DEREGISTER_PATH, body).await.map(drop)
    }

    /// Posts `body` to `path` on the replica the subscription is connected to, or the next
    /// ones in turn when it cannot be reached; the answer of the first that answers.
    async fn post(&self, path: &str, body: Vec<u8>) -> Result<Bytes, RegisterError> {
        let control = &self.config.control;
        let token = control.token.read().map_err(RegisterError::Token)?;
        // With service-account binding on, the control plane takes a registration only as
        // the workload the pod's token proves, as it does a subscription.
        let sa_token = match &control.service_account_token {
            Some(path) => Some(read_service_account_token(path).map_err(RegisterError::Token)?),
            None => None,
        };
        let candidates = control
            .replicas
            .resolve()
            .await
            .map_err(|e| RegisterError::Unreachable(e.to_string()))?;
        let body = Bytes::from(body);
        let post = ControlPost {
            path,
            token: &token,
            extra_header: sa_token
                .map(|t| (HeaderName::from_static(SERVICE_ACCOUNT_TOKEN_HEADER), t)),
            timeout: REQUEST_TIMEOUT,
            max_response: MAX_RESPONSE,
        };
        let mut unreachable = Vec::new();
        for replica in replicas::connected_first(candidates, control.replicas.connected().as_ref())
        {
            match post.send(&self.client, &replica, body.clone()).await {
                Ok((status, answer)) if status.is_success() => return Ok(answer),
                Ok((status, answer)) => {
                    return Err(RegisterError::Refused {
                        status,
                        body: String::from_utf8_lossy(&answer).into_owned(),
                    })
                }
                Err(reason) => unreachable.push(format!("{replica}: {reason}")),
            }
        }
        Err(RegisterError::Unreachable(unreachable.join("; ")))
    }
}

/// The address to advertise: `--advertise`, or the inbound listener's when it is a specific
/// address (not a wildcard, not port 0).
pub fn advertised(
    advertise: Option<SocketAddr>,
    inbound: SocketAddr,
) -> Result<SocketAddr, String> {
    match advertise {
        Some(addr) if addr.ip().is_unspecified() || addr.port() == 0 => Err(format!(
            "--advertise {addr}: callers cannot reach a wildcard address or port 0"
        )),
        Some(addr) => Ok(addr),
        None if inbound.ip().is_unspecified() || inbound.port() == 0 => Err(format!(
            "--register needs --advertise ADDR (the address callers reach this proxy's inbound port at): the inbound listener {inbound} is a wildcard or port 0"
        )),
        None => Ok(inbound),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_advertised_address_is_given_or_a_specific_inbound_one() {
        let addr = |s: &str| s.parse::<SocketAddr>().expect("addr");
        assert_eq!(
            advertised(None, addr("10.0.0.5:15006")),
            Ok(addr("10.0.0.5:15006"))
        );
        assert_eq!(
            advertised(Some(addr("10.0.0.5:15006")), addr("0.0.0.0:15006")),
            Ok(addr("10.0.0.5:15006"))
        );
        assert!(advertised(None, addr("0.0.0.0:15006"))
            .expect_err("wildcard")
            .contains("--advertise"));
        assert!(advertised(None, addr("127.0.0.1:0")).is_err());
        assert!(advertised(Some(addr("[::]:80")), addr("127.0.0.1:1")).is_err());
    }
}
