//! Outrider's data plane: a sidecar proxy that routes an app's outbound HTTP calls to named
//! upstream services and fronts the app's inbound traffic, by a YAML policy.
//!
//! [`run`] binds every listener and serves until [`Running::shutdown`]; `main.rs` is a thin
//! wrapper that parses flags, loads the policy and waits for SIGTERM. Tests start the proxy
//! either as the binary or in-process through [`run`].

pub mod admin;
pub mod app_probe;
pub mod capture;
pub mod cli;
pub mod control;
pub mod core;
pub mod demo;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod io;
pub mod logging;
pub mod policy;
pub mod telemetry;
pub mod trace;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use outrider_config::LoadedPolicy;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::control::reload::{ReloadError, Reloader, Update};
use crate::http::forward::ListenerKind;
use crate::http::lifecycle::{AppActivity, APP_QUIET_PERIOD};
use crate::http::shared::{PolicySource, PolicyStatus};
use crate::telemetry::metrics::{Metrics, MetricsError};
use crate::telemetry::{ExporterError, Spans};

/// The state the listeners and the admin port share, as [`Running::shared`] hands it out.
pub use crate::http::shared::Shared;

/// The longest a shutdown waits for queued spans to reach the collector.
const SPAN_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long shutdown waits for the access log's last lines to reach stdout.
const ACCESS_LOG_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Settings that are not policy: where to listen and how to stop. From flags or env vars.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    /// The shared outbound port.
    pub outbound: SocketAddr,
    /// The inbound port.
    pub inbound: SocketAddr,
    /// The admin port.
    pub admin: SocketAddr,
    /// The longest a shutdown waits for in-flight requests.
    pub drain_timeout: Duration,
    /// This workload's name (metrics label; control-plane subscription later).
    pub workload: String,
    /// Where the policy came from (a path or a URL), for `/config`.
    pub policy_source: String,
    /// Serve `POST /shutdown` on the admin port (loopback callers only).
    pub shutdown_endpoint: bool,
    /// The workload identity to get from the control plane, for mesh mTLS.
    pub identity: Option<control::certificate::IdentityConfig>,
    /// Deadlines of downstream connections' phases.
    pub timeouts: io::connection::ConnectionTimeouts,
    /// The most connections each listener holds.
    pub limits: io::connection::ConnectionLimits,
    /// The app's probes the admin port performs (`/app-health/...`).
    pub app_probes: Arc<app_probe::AppProbes>,
    /// The CA that `https://` OTLP collectors are verified against; the system's trust roots
    /// without it.
    pub otlp_ca_file: Option<std::path::PathBuf>,
    /// Most endpoints of one service labelled by address in the connection metrics at once;
    /// the others are counted as `endpoint="other"`.
    pub metrics_endpoint_cap: usize,
    /// Register this workload in the control plane's service registry while ready
    /// (`--register`); on drain it deregisters before the inbound listener stops.
    pub registration: Option<control::register::RegistrationConfig>,
}

/// The policy a proxy starts with.
pub struct Initial {
    /// The validated policy.
    pub loaded: LoadedPolicy,
    /// Its version (the control plane's, for a persisted one).
    pub version: u64,
    /// Where it came from.
    pub source: PolicySource,
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The address to register could not be derived from the inbound listener.
    #[error("{0}")]
    Advertise(String),
    /// A listener could not bind.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// Which listener.
        what: String,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// Metrics could not be registered.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// The initial policy could not be put in force.
    #[error(transparent)]
    Policy(ReloadError),
    /// The span exporter could not be built.
    #[error(transparent)]
    Exporter(#[from] ExporterError),
}

/// A started proxy: its bound addresses and a handle to stop it.
pub struct Running {
    /// The shared outbound port as bound (useful with port 0).
    pub outbound: SocketAddr,
    /// The inbound port as bound.
    pub inbound: SocketAddr,
    /// The admin port as bound.
    pub admin: SocketAddr,
    /// Dedicated service ports as bound, by service name.
    pub dedicated: Vec<(String, SocketAddr)>,
    /// The shared state (policy, metrics, flags).
    pub shared: Arc<Shared>,
    /// Puts new policies in force.
    pub reloader: Arc<Reloader>,
    done: tokio::task::JoinHandle<DrainOutcome>,
}

/// How a shutdown ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainOutcome {
    /// Every connection finished.
    Drained,
    /// The drain timeout ended first; remaining connections were cut.
    TimedOut,
}

impl DrainOutcome {
    /// `drained` or `timed_out`, for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Drained => "drained",
            Self::TimedOut => "timed_out",
        }
    }
}

impl Running {
    /// Begins a graceful shutdown: `/ready` turns 503, the inbound listener stops accepting
    /// and drains, outbound listeners serve the app until it has gone, then drain.
    pub fn shutdown(&self) {
        self.shared.shutdown();
    }

    /// Waits until the shutdown has finished.
    pub async fn wait(self) -> DrainOutcome {
        self.done.await.unwrap_or(DrainOutcome::TimedOut)
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn bind(what: &str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    crate::io::connection::listen(addr).map_err(|source| StartError::Bind {
        what: what.to_string(),
        addr,
        source,
    })
}

/// The IPv6 twin of an IPv4 data listener on a fixed port: `[::1]` for `127.0.0.1`, `[::]`
/// (IPv6 only) for `0.0.0.0`. `None` for other addresses, port 0, or where IPv6 cannot be bound
/// (a host without it): the IPv4 listener serves alone, as before.
fn bind_ipv6_twin(addr: SocketAddr) -> Option<TcpListener> {
    let SocketAddr::V4(v4) = addr else {
        return None;
    };
    let ip = match *v4.ip() {
        ip if ip.is_loopback() => std::net::Ipv6Addr::LOCALHOST,
        ip if ip.is_unspecified() => std::net::Ipv6Addr::UNSPECIFIED,
        _ => return None,
    };
    if v4.port() == 0 {
        return None;
    }
    let twin = std::net::SocketAddrV6::new(ip, v4.port(), 0, 0);
    match crate::io::connection::listen_v6_only(twin) {
        Ok(listener) => {
            tracing::debug!(%twin, "listening on IPv6 too");
            Some(listener)
        }
        Err(error) => {
            tracing::debug!(%twin, %error, "no IPv6 twin listener");
            None
        }
    }
}

/// Binds every listener for `policy` (from a file) and starts serving. Must be called inside a
/// Tokio runtime.
pub async fn run(bootstrap: Bootstrap, policy: LoadedPolicy) -> Result<Running, StartError> {
    let initial = Initial {
        loaded: policy,
        version: 1,
        source: PolicySource::File,
    };
    start(bootstrap, Some(initial)).await
}

/// Binds every listener and starts serving `initial`; without one, the proxy serves an empty
/// policy (nothing routes) and `/ready` stays 503 until a policy is applied through
/// [`Running::reloader`]. Must be called inside a Tokio runtime.
pub async fn start(bootstrap: Bootstrap, initial: Option<Initial>) -> Result<Running, StartError> {
    let metrics =
        Metrics::new(&bootstrap.workload)?.with_endpoint_cap(bootstrap.metrics_endpoint_cap);
    let mesh = match &bootstrap.identity {
        Some(_) => Some(io::identity::Mesh::new(&metrics)?),
        None => None,
    };
    let snapshot = control::reload::empty_snapshot(&metrics);
    let (stop, stop_rx) = watch::channel(false);
    let spans = Spans::new(
        &bootstrap.workload,
        metrics.telemetry.clone(),
        bootstrap.otlp_ca_file.clone(),
    );
    let connections =
        io::connection::Connections::new(bootstrap.timeouts, bootstrap.limits, &metrics);
    let shared = Arc::new(Shared {
        snapshot: ArcSwap::from_pointee(snapshot),
        metrics,
        ready: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        app: Arc::new(AppActivity::default()),
        shutdown_endpoint: bootstrap.shutdown_endpoint,
        status: PolicyStatus::default(),
        dedicated: ArcSwap::from_pointee(Vec::new()),
        origin: bootstrap.policy_source.clone(),
        mesh,
        connections,
        listener_ports: std::sync::OnceLock::new(),
        stop,
        spans,
        access_log: Mutex::new(Weak::new()),
        malformed_lines: Mutex::new(io::connection::LogLimiter::new()),
    });
    if let (Some(config), Some(mesh)) = (bootstrap.identity.clone(), &shared.mesh) {
        control::certificate::spawn(config, Arc::clone(mesh));
    }

    let admin = bind("admin", bootstrap.admin).await?;
    let outbound = bind("outbound", bootstrap.outbound).await?;
    let inbound = bind("inbound", bootstrap.inbound).await?;
    let reloader = Arc::new(Reloader::new(Arc::clone(&shared), bootstrap.drain_timeout));
    if let Some(initial) = initial {
        // A file or embedded policy is its own truth; a persisted one is stale until the
        // control plane confirms it.
        let fresh = matches!(initial.source, PolicySource::File | PolicySource::Embedded);
        let update = Update {
            loaded: initial.loaded,
            version: Some(initial.version),
            source: initial.source,
        };
        match reloader.apply(update).await {
            Ok(_) => shared.status.set_fresh(fresh),
            Err(ReloadError::Bind {
                service,
                addr,
                source,
            }) => {
                return Err(StartError::Bind {
                    what: format!("service {service}"),
                    addr,
                    source,
                })
            }
            Err(e) => return Err(StartError::Policy(e)),
        }
    }

    // Outbound listeners stop later than inbound: once the app has gone.
    let (outbound_stop, outbound_stop_rx) = watch::channel(false);
    let (admin_stop, admin_stop_rx) = watch::channel(false);
    let addr_of = |l: &TcpListener, fallback| l.local_addr().unwrap_or(fallback);
    let mut data = JoinSet::new();
    let outbound_addr = addr_of(&outbound, bootstrap.outbound);
    let inbound_addr = addr_of(&inbound, bootstrap.inbound);
    let admin_addr = addr_of(&admin, bootstrap.admin);
    let _ = shared.listener_ports.set(vec![
        outbound_addr.port(),
        inbound_addr.port(),
        admin_addr.port(),
    ]);
    data.spawn(http::server::serve(
        outbound,
        ListenerKind::Outbound,
        Arc::clone(&shared),
        outbound_stop_rx.clone(),
    ));
    // The inbound listeners stop on their own signal: a registered proxy deregisters and
    // lets callers hear of it before they stop accepting.
    let (inbound_stop, inbound_stop_rx) = watch::channel(false);
    let registrar = match bootstrap.registration.clone() {
        Some(config) => {
            let address = control::register::advertised(config.advertise, inbound_addr)
                .map_err(StartError::Advertise)?;
            Some(control::register::Registrar::spawn(
                config,
                address,
                Arc::clone(&shared),
            ))
        }
        None => None,
    };
    data.spawn(http::server::serve(
        inbound,
        ListenerKind::Inbound,
        Arc::clone(&shared),
        inbound_stop_rx.clone(),
    ));
    // Capture redirects IPv6 connections to the same ports on IPv6: the default IPv4
    // listeners get IPv6 twins where the host has IPv6.
    for (listener, kind, stop) in [
        (
            bootstrap.outbound,
            ListenerKind::Outbound,
            &outbound_stop_rx,
        ),
        (bootstrap.inbound, ListenerKind::Inbound, &inbound_stop_rx),
    ] {
        if let Some(twin) = bind_ipv6_twin(listener) {
            data.spawn(http::server::serve(
                twin,
                kind,
                Arc::clone(&shared),
                stop.clone(),
            ));
        }
    }
    let admin_task = tokio::spawn(admin::serve(
        admin,
        Arc::clone(&shared),
        Arc::clone(&bootstrap.app_probes),
        admin_stop_rx,
    ));
    tracing::info!(
        outbound = %outbound_addr,
        inbound = %inbound_addr,
        admin = %admin_addr,
        workload = %bootstrap.workload,
        "listening"
    );

    let supervisor_shared = Arc::clone(&shared);
    let supervisor_reloader = Arc::clone(&reloader);
    let mut stop_signal = stop_rx;
    let drain_timeout = bootstrap.drain_timeout;
    let done = tokio::spawn(async move {
        core::shutdown::stopped(&mut stop_signal).await;
        supervisor_shared.draining.store(true, Ordering::Release);
        tracing::info!(drain_timeout = %outrider_config::Duration(drain_timeout), "draining");
        let deadline = policy::timeout::deadline_after(tokio::time::Instant::now(), drain_timeout);
        if let Some(registrar) = registrar {
            // Deregistered first; the inbound port keeps serving for the delay, in which the
            // control plane pushes the endpoint set without this proxy and callers stop picking
            // it, so no caller's request meets a closed port.
            let left = tokio::time::timeout_at(deadline, registrar.leave()).await;
            if matches!(left, Ok(true)) {
                let until = policy::timeout::deadline_after(
                    tokio::time::Instant::now(),
                    registrar.deregister_delay(),
                )
                .min(deadline);
                tracing::info!(delay = %outrider_config::Duration(registrar.deregister_delay()), "deregistered; inbound listener open for the deregister delay");
                tokio::time::sleep_until(until).await;
            }
        }
        let _ = inbound_stop.send(true);
        let app = Arc::clone(&supervisor_shared.app);
        let gone = tokio::time::timeout_at(deadline, app.gone(APP_QUIET_PERIOD)).await;
        tracing::info!(
            app_gone = gone.is_ok(),
            open_connections = app.open_connections(),
            "closing outbound listeners"
        );
        let _ = outbound_stop.send(true);
        // Dedicated ports are outbound listeners too: they close with the others.
        for task in supervisor_reloader.close().await {
            // Aborting the waiter (drain timeout) must abort the listener's task too.
            let mut task = AbortOnDrop(task);
            data.spawn(async move {
                let _ = (&mut task.0).await;
            });
        }
        let drained = tokio::time::timeout_at(deadline, async {
            while data.join_next().await.is_some() {}
        })
        .await;
        let outcome = if drained.is_ok() {
            DrainOutcome::Drained
        } else {
            data.abort_all();
            DrainOutcome::TimedOut
        };
        // Flush what the drained requests produced; bounded so a dead collector cannot hold
        // the exit.
        supervisor_shared.spans.shutdown(SPAN_FLUSH_TIMEOUT).await;
        let access_log = supervisor_shared.access_log().upgrade();
        if let Some(log) = access_log {
            if !log.flushed(ACCESS_LOG_FLUSH_TIMEOUT).await {
                tracing::warn!("access log not flushed before shutdown");
            }
        }
        tracing::info!(outcome = outcome.as_str(), "shutdown complete");
        let _ = admin_stop.send(true);
        let _ = admin_task.await;
        outcome
    });

    let dedicated = shared.dedicated.load_full().to_vec();
    Ok(Running {
        outbound: outbound_addr,
        inbound: inbound_addr,
        admin: admin_addr,
        dedicated,
        shared,
        reloader,
        done,
    })
}
