//! The state every listener and the admin port share: the policy in force (one
//! `ArcSwap<Snapshot>`), metrics, the lifecycle flags and the stop signal, and, for the admin
//! port only, where the policy came from and whether it is current.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use arc_swap::ArcSwap;
use http::StatusCode;
use serde::Serialize;
use tokio::sync::watch;

use crate::http::lifecycle::AppActivity;
use crate::http::snapshot::Snapshot;
use crate::io::connection::{Connections, LogLimiter};
use crate::io::identity::Mesh;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::{AccessLog, AccessRecord, Spans};

/// State shared by every listener: the policy in force and the proxy's lifecycle flags.
pub struct Shared {
    /// The compiled policy; replaced whole on reload.
    pub snapshot: ArcSwap<Snapshot>,
    /// Every exported metric.
    pub metrics: Metrics,
    /// Every listener is bound and a policy is loaded.
    pub ready: AtomicBool,
    /// A shutdown has begun.
    pub draining: AtomicBool,
    /// The app's open outbound connections: a shutdown serves them until the app has gone.
    pub app: Arc<AppActivity>,
    /// `POST /shutdown` is enabled.
    pub shutdown_endpoint: bool,
    /// Where the policy in force came from and whether it is current (admin only).
    pub status: PolicyStatus,
    /// Dedicated listeners as bound, by service name (admin only).
    pub dedicated: ArcSwap<Vec<(String, SocketAddr)>>,
    /// Where the policy came from (a path or a URL), for `/config`.
    pub origin: String,
    /// This proxy's mesh identity, when it has one configured.
    pub mesh: Option<Arc<Mesh>>,
    /// Connection deadlines and each listener's connection budget.
    pub connections: Connections,
    /// The ports of the outbound, inbound and admin listeners as bound: a captured connection
    /// whose original destination is one of them is a loop (set once at start).
    pub listener_ports: std::sync::OnceLock<Vec<u16>>,
    /// Set once by a shutdown; every long-lived task selects on a receiver of it.
    pub(crate) stop: watch::Sender<bool>,
    /// The span exporter for the policy's `tracing.otlp`, if any.
    pub spans: Spans,
    /// The access-log writer the logging snapshots share, while any of them lives (most
    /// proxies never log; the writer is a thread and a queue). A reload that logs reuses it.
    pub access_log: Mutex<Weak<AccessLog>>,
    /// Bounds the access-log lines of requests the HTTP/1 parser refused: a flood of garbage
    /// must not flood the log (one line a second, saying how many it stands for).
    pub malformed_lines: Mutex<LogLimiter>,
}

impl Shared {
    /// The access-log writer slot; a poisoned lock still holds a valid `Weak`.
    pub fn access_log(&self) -> MutexGuard<'_, Weak<AccessLog>> {
        self.access_log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a request hyper's HTTP/1 parser refused and answered itself (`status`), and
    /// logs it when the access log is on, at most one line a second.
    pub fn malformed(
        &self,
        direction: &'static str,
        peer: SocketAddr,
        status: StatusCode,
        error: &hyper::Error,
    ) {
        self.metrics.malformed(direction, status);
        let snapshot = self.snapshot.load();
        let Some(log) = &snapshot.access_log else {
            return;
        };
        let due = self
            .malformed_lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .hit(tokio::time::Instant::now());
        let Some(count) = due else {
            return;
        };
        let reason = match count {
            0 | 1 => format!("malformed request: {error}"),
            n => format!("malformed request: {error} ({n} malformed requests since the last line)"),
        };
        let mut record = AccessRecord::malformed(direction, peer, status.as_u16(), reason);
        record.style = snapshot.access_log_style;
        log.record(record);
    }

    /// Begins a graceful shutdown (SIGTERM, `POST /shutdown`,
    /// [`Running::shutdown`](crate::Running::shutdown)).
    pub fn shutdown(&self) {
        let _ = self.stop.send(true);
    }
}

/// Where the policy in force came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicySource {
    /// No policy yet (waiting for the control plane).
    None,
    /// Pushed by the control plane, or confirmed by it.
    Control,
    /// The last good control-plane policy, persisted in the state directory.
    Disk,
    /// A `--policy` file.
    File,
    /// The policy compiled into the binary (`--demo`).
    Embedded,
}

impl PolicySource {
    /// The lowercase name used in `/ready`, `/config` and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Control => "control",
            Self::Disk => "disk",
            Self::File => "file",
            Self::Embedded => "embedded",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Control,
            2 => Self::Disk,
            3 => Self::File,
            4 => Self::Embedded,
            _ => Self::None,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            Self::None => 0,
            Self::Control => 1,
            Self::Disk => 2,
            Self::File => 3,
            Self::Embedded => 4,
        }
    }
}

/// Where the policy in force came from and whether it is known to be current. Admin data only:
/// the request path never reads it.
#[derive(Debug, Default)]
pub struct PolicyStatus {
    source: AtomicU8,
    fresh: AtomicBool,
    unselected: AtomicBool,
    persist: Arc<PersistHealth>,
    control_replica: Mutex<Option<ControlReplica>>,
}

/// The control-plane replica a subscription is connected to, as `/config` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlReplica {
    /// The `--control` URL it was configured by.
    pub url: Arc<str>,
    /// The address connected to.
    pub address: SocketAddr,
}

impl PolicyStatus {
    /// The source of the policy in force.
    pub fn source(&self) -> PolicySource {
        PolicySource::from_u8(self.source.load(Ordering::Acquire))
    }

    /// Whether the policy is known to be current: a watched file or the embedded policy always
    /// is; a control-plane or disk policy is while the subscription is connected.
    pub fn fresh(&self) -> bool {
        self.fresh.load(Ordering::Acquire)
    }

    /// Records the source of a policy just put in force.
    pub fn set_source(&self, source: PolicySource) {
        self.source.store(source.to_u8(), Ordering::Release);
    }

    /// Records whether the policy in force is known to be current.
    pub fn set_fresh(&self, fresh: bool) {
        self.fresh.store(fresh, Ordering::Release);
    }

    /// Whether the control plane said no policy document names this proxy's workload.
    pub fn unselected(&self) -> bool {
        self.unselected.load(Ordering::Acquire)
    }

    /// Records what the control plane said about the workload being named.
    pub fn set_unselected(&self, unselected: bool) {
        self.unselected.store(unselected, Ordering::Release);
    }

    /// The control-plane replica the subscription is connected to, if it is.
    pub fn control_replica(&self) -> Option<ControlReplica> {
        self.control_replica
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Records the replica the subscription is connected to (`None` once it is not).
    pub fn set_control_replica(&self, replica: Option<ControlReplica>) {
        *self
            .control_replica
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = replica;
    }

    /// Whether `--state-dir` holds the control-plane policy in force (written by the
    /// subscriber's `control::persist::Persister`).
    pub fn persist(&self) -> &Arc<PersistHealth> {
        &self.persist
    }
}

/// Whether the last good control-plane policy's file is current: the error of the last failed
/// write while the file lags behind the policy in force, `None` when it holds it. Lives here,
/// beside [`PolicyStatus`] which `/ready` reads, and is written by the control layer's persister.
#[derive(Debug, Default)]
pub struct PersistHealth(Mutex<Option<String>>);

impl PersistHealth {
    /// The last write's error while the file lags behind the policy in force.
    pub fn error(&self) -> Option<String> {
        self.lock().clone()
    }

    /// Records the outcome of the latest write: `None` once the file holds the newest policy.
    pub(crate) fn set(&self, error: Option<String>) {
        *self.lock() = error;
    }

    fn lock(&self) -> MutexGuard<'_, Option<String>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}
