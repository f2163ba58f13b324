//! Applying a policy while the proxy runs: the one place a [`Snapshot`] is built and stored.
//!
//! A reload builds the whole new snapshot, binds the dedicated `listen:` ports the new policy
//! adds, and only then stores the snapshot with one `ArcSwap` store; ports the policy no longer
//! names stop accepting and drain. If anything fails first (a port is taken), nothing changes:
//! the old snapshot stays in force and the caller gets the reason (a NACK for the control
//! plane, a log line for a file). Requests already routed hold an `Arc` of their target, so
//! they finish under the policy they started with.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use outrider_config::{LoadedPolicy, PolicyError};
use tokio::sync::{watch, Mutex};
use tokio::task::JoinHandle;

use crate::http::forward::ListenerKind;
use crate::http::server;
use crate::http::shared::{PolicySource, Shared};
use crate::http::snapshot::Snapshot;
use crate::io::identity::Mesh;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::AccessLog;

/// A policy to put in force.
pub struct Update {
    /// The validated policy.
    pub loaded: LoadedPolicy,
    /// Its version: the control plane's, or `None` for the next local one.
    pub version: Option<u64>,
    /// Where it came from.
    pub source: PolicySource,
}

/// Why a policy was not put in force. The previous one stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The policy text is invalid (every diagnostic names file, line and column).
    #[error("invalid policy:\n{0}")]
    Invalid(#[from] PolicyError),
    /// A dedicated port of the new policy could not be bound.
    #[error("cannot listen on {addr} for service `{service}`: {source}")]
    Bind {
        /// The service that names the port.
        service: String,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The proxy is draining; no policy changes any more.
    #[error("the proxy is shutting down")]
    ShuttingDown,
    /// The policy turns the access log on and its writer thread could not start.
    #[error("cannot start the access-log writer: {0}")]
    AccessLog(std::io::Error),
    /// The blocking thread parsing or building the policy failed.
    #[error("the policy build did not finish: {0}")]
    Worker(String),
}

/// What a successful [`Reloader::apply`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The version now in force.
    pub version: u64,
    /// Its content hash.
    pub content_hash: String,
    /// False when the policy was already in force (nothing was rebuilt).
    pub changed: bool,
}

struct Dedicated {
    service: String,
    bound: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct Listeners {
    /// By the address the policy names (port 0 stays port 0 here; `bound` has the real one).
    by_config: HashMap<SocketAddr, Dedicated>,
    closed: bool,
}

/// Puts policies in force, one at a time.
pub struct Reloader {
    shared: Arc<Shared>,
    drain_timeout: Duration,
    /// Held for a whole reload, so two sources can never interleave their steps.
    listeners: Mutex<Listeners>,
}

/// Compiles `loaded` as `version`: the one place a snapshot is built. Services whose settings
/// did not change keep `previous`'s pools, breakers and limiters.
fn build(
    loaded: LoadedPolicy,
    version: u64,
    metrics: &Metrics,
    previous: Option<&Snapshot>,
    mesh: Option<&Arc<Mesh>>,
) -> Snapshot {
    Snapshot::build_with_mesh(loaded, version, metrics, previous, mesh)
}

/// The snapshot of a proxy that has no policy yet: nothing routes, version 0.
pub(crate) fn empty_snapshot(metrics: &Metrics) -> Snapshot {
    let empty = LoadedPolicy {
        policy: outrider_config::Policy::default(),
        content_hash: String::new(),
    };
    build(empty, 0, metrics, None, None)
}

impl Reloader {
    /// A reloader for the proxy sharing `shared`; removed ports drain for at most
    /// `drain_timeout`.
    pub fn new(shared: Arc<Shared>, drain_timeout: Duration) -> Self {
        Self {
            shared,
            drain_timeout,
            listeners: Mutex::new(Listeners::default()),
        }
    }

    /// The shared state the reloader swaps policies into.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Validates `text` (named `file` in diagnostics) and applies it; an invalid text is
    /// counted as a failed reload. Parsing is CPU work proportional to the text: it runs on a
    /// blocking thread, so a large or hostile policy never stalls the requests being served.
    pub async fn apply_text(
        &self,
        file: &str,
        text: &str,
        version: Option<u64>,
        source: PolicySource,
    ) -> Result<Applied, ReloadError> {
        let (owned_file, owned_text) = (file.to_string(), text.to_string());
        let parsed =
            tokio::task::spawn_blocking(move || outrider_config::load(&owned_file, &owned_text))
                .await
                .map_err(|e| ReloadError::Worker(e.to_string()));
        match parsed {
            Ok(Ok(loaded)) => {
                self.apply(Update {
                    loaded,
                    version,
                    source,
                })
                .await
            }
            Ok(Err(e)) => {
                self.shared.metrics.policy_reloads.error.inc();
                Err(e.into())
            }
            Err(e) => {
                self.shared.metrics.policy_reloads.error.inc();
                Err(e)
            }
        }
    }

    /// Builds `update` into a snapshot, binds the ports it adds, swaps it in with one store and
    /// retires the ports it removes. On error nothing changed.
    pub async fn apply(&self, update: Update) -> Result<Applied, ReloadError> {
        let result = self.apply_inner(update).await;
        let metrics = &self.shared.metrics.policy_reloads;
        match &result {
            Ok(applied) if applied.changed => metrics.ok.inc(),
            Ok(_) => {}
            Err(_) => metrics.error.inc(),
        }
        result
    }

    async fn apply_inner(&self, update: Update) -> Result<Applied, ReloadError> {
        let mut listeners = self.listeners.lock().await;
        if listeners.closed {
            return Err(ReloadError::ShuttingDown);
        }
        let current = self.shared.snapshot.load_full();
        let Update {
            loaded,
            version,
            source,
        } = update;
        let status = &self.shared.status;
        if current.version > 0
            && current.content_hash == loaded.content_hash
            && version.is_none_or(|v| v == current.version)
        {
            // Already in force (an editor touched the file, or the control plane re-sent it):
            // rebuilding would only cost fresh connection pools.
            status.set_source(source);
            return Ok(Applied {
                version: current.version,
                content_hash: current.content_hash.clone(),
                changed: false,
            });
        }
        let version = version.unwrap_or(current.version.saturating_add(1));
        // Compiling a policy is CPU work proportional to its size: off the serving threads.
        let shared = Arc::clone(&self.shared);
        let mut snapshot = tokio::task::spawn_blocking(move || {
            build(
                loaded,
                version,
                &shared.metrics,
                Some(&current),
                shared.mesh.as_ref(),
            )
        })
        .await
        .map_err(|e| ReloadError::Worker(e.to_string()))?;

        // Bind what is new before anything is swapped, so a taken port changes nothing.
        let wanted = snapshot.dedicated_listeners();
        let mut added = Vec::new();
        for (service, addr) in &wanted {
            if listeners.by_config.contains_key(addr) {
                continue;
            }
            match crate::io::connection::listen(*addr) {
                Ok(listener) => added.push((service.clone(), *addr, listener)),
                Err(source) => {
                    return Err(ReloadError::Bind {
                        service: service.clone(),
                        addr: *addr,
                        source,
                    })
                }
            }
        }

        if snapshot.policy.access_log.is_on() {
            // One writer for every snapshot that logs: reused while one lives (an old snapshot
            // may still be finishing requests), started otherwise. When a policy turns the log
            // off, the writer ends with the last request logged under the old one.
            let mut slot = self.shared.access_log();
            let log = match slot.upgrade() {
                Some(log) => log,
                None => {
                    let log = Arc::new(
                        AccessLog::start(self.shared.metrics.telemetry.clone())
                            .map_err(ReloadError::AccessLog)?,
                    );
                    *slot = Arc::downgrade(&log);
                    log
                }
            };
            snapshot.access_log = Some(log);
        }

        let content_hash = snapshot.content_hash.clone();
        // A new collector (or none) takes over from here; the old one is flushed aside.
        self.shared.spans.configure(
            snapshot
                .policy
                .tracing
                .as_ref()
                .and_then(|t| t.otlp.as_ref()),
        );
        self.shared.snapshot.store(Arc::new(snapshot));
        self.shared.metrics.policy_version.set(
            i64::try_from(version).unwrap_or(i64::MAX), // a gauge is an i64; versions never get there
        );
        status.set_source(source);

        // A port that stays may now lead to another service: keep the name current.
        for (service, addr) in &wanted {
            if let Some(d) = listeners.by_config.get_mut(addr) {
                d.service.clone_from(service);
            }
        }
        for (service, addr, listener) in added {
            let bound = listener.local_addr().unwrap_or(addr);
            let (stop, stop_rx) = watch::channel(false);
            let task = tokio::spawn(server::serve(
                listener,
                ListenerKind::Dedicated(addr),
                Arc::clone(&self.shared),
                stop_rx,
            ));
            tracing::info!(%service, listen = %bound, "service listener bound");
            listeners.by_config.insert(
                addr,
                Dedicated {
                    service,
                    bound,
                    stop,
                    task,
                },
            );
        }
        let removed: Vec<SocketAddr> = listeners
            .by_config
            .keys()
            .filter(|addr| !wanted.iter().any(|(_, a)| a == *addr))
            .copied()
            .collect();
        for addr in removed {
            if let Some(d) = listeners.by_config.remove(&addr) {
                tracing::info!(service = %d.service, listen = %d.bound, "service listener closed");
                self.retire(d);
            }
        }
        self.publish(&listeners);
        self.shared.ready.store(true, Ordering::Release);
        tracing::info!(version, %content_hash, source = source.as_str(), "policy applied");
        Ok(Applied {
            version,
            content_hash,
            changed: true,
        })
    }

    /// Stops accepting on a removed port; its connections finish their requests (bounded by
    /// the drain timeout), then the task is gone.
    fn retire(&self, d: Dedicated) {
        let _ = d.stop.send(true);
        let drain = self.drain_timeout;
        let Dedicated {
            mut task, bound, ..
        } = d;
        tokio::spawn(async move {
            if tokio::time::timeout(drain, &mut task).await.is_err() {
                tracing::warn!(listen = %bound, "removed listener did not drain in time; closing its connections");
                task.abort();
            }
        });
    }

    fn publish(&self, listeners: &Listeners) {
        let mut bound: Vec<(String, SocketAddr)> = listeners
            .by_config
            .values()
            .map(|d| (d.service.clone(), d.bound))
            .collect();
        bound.sort();
        self.shared.dedicated.store(Arc::new(bound));
    }

    /// Refuses every later reload and stops every dedicated listener; returns their tasks,
    /// which end once their connections have drained.
    pub async fn close(&self) -> Vec<JoinHandle<()>> {
        let mut listeners = self.listeners.lock().await;
        listeners.closed = true;
        listeners
            .by_config
            .drain()
            .map(|(_, d)| {
                let _ = d.stop.send(true);
                d.task
            })
            .collect()
    }
}
