//! The control plane's Prometheus metrics (`GET /metrics` on the API port).
//!
//! Two kinds: counters and histograms the engine and the server update as things happen
//! ([`ControlMetrics`]), and gauges read from the engine's state at each scrape ([`encode`]),
//! built afresh every time so a proxy or workload that is gone leaves no stale series.
//! Every label value is one of a fixed set, except `workload`, whose values are the workloads
//! the registry holds (forgotten `--registry-expiry` after their last proxy left), and
//! `service`, whose values are the services with a registered address (bounded by the
//! service registry's own cap, [`crate::discovery::MAX_REGISTRATIONS`]).

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::discovery::ServiceRegistry;
use crate::engine::{Engine, EngineError};
use crate::store::Source;

/// Push latency buckets: a push on a healthy fleet takes milliseconds; a proxy that is slow
/// to reload, or to reconnect, takes seconds to minutes.
const PUSH_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// State directory buckets: an fsync on a local disk takes about a millisecond, on network
/// storage tens of milliseconds; a stalled disk seconds.
const STORE_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Why a change was refused: the `reason` label of `outrider_control_rejections_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// The document does not parse or validate.
    Invalid,
    /// It conflicts with another document of the same tier.
    Conflict,
    /// A workload's merged policy would not validate.
    MergedInvalid,
    /// A workload's merged policy would be larger than a proxy accepts.
    TooLarge,
    /// An unforced apply of a document read from the policy directory.
    OverridesFile,
    /// A delete of a document read from the policy directory.
    FileBacked,
    /// The client's deadline passed before the change could be committed.
    Deadline,
    /// The store did not take the new version.
    StoreFailed,
    /// etcd is unreachable or without quorum: the replica is read-only.
    StoreUnavailable,
    /// Other replicas kept committing first.
    Contended,
}

impl RejectReason {
    const ALL: [Self; 10] = [
        Self::Invalid,
        Self::Conflict,
        Self::MergedInvalid,
        Self::TooLarge,
        Self::OverridesFile,
        Self::FileBacked,
        Self::Deadline,
        Self::StoreFailed,
        Self::StoreUnavailable,
        Self::Contended,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Invalid => "invalid",
            Self::Conflict => "conflict",
            Self::MergedInvalid => "merged_invalid",
            Self::TooLarge => "too_large",
            Self::OverridesFile => "overrides_file",
            Self::FileBacked => "file_backed",
            Self::Deadline => "deadline",
            Self::StoreFailed => "store_failed",
            Self::StoreUnavailable => "store_unavailable",
            Self::Contended => "contended",
        }
    }

    /// The reason of a request-level failure; `None` for failures that refuse no change
    /// (nothing to delete or roll back to, a stored version that no longer loads).
    pub fn of(error: &EngineError) -> Option<Self> {
        match error {
            EngineError::OverridesFile(_) => Some(Self::OverridesFile),
            EngineError::FileBacked(_) => Some(Self::FileBacked),
            EngineError::Expired => Some(Self::Deadline),
            EngineError::Store { .. } => Some(Self::StoreFailed),
            EngineError::Unavailable(_) => Some(Self::StoreUnavailable),
            EngineError::Contended => Some(Self::Contended),
            // Internal: the change is redone on the newer state, not refused.
            EngineError::Conflict => None,
            // An import by a replica that lost its leadership: the new leader imports it.
            EngineError::NotLeader => None,
            EngineError::Load(_)
            | EngineError::NotKept(_)
            | EngineError::UnknownDocument(_)
            | EngineError::Stored { .. } => None,
        }
    }
}

/// What became of one document of a change: the `result` label of
/// `outrider_control_applies_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyResult {
    /// Part of a new version.
    Accepted,
    /// Identical to the document in force.
    Unchanged,
    /// Refused; the previous version stays in force.
    Rejected,
}

impl ApplyResult {
    const ALL: [Self; 3] = [Self::Accepted, Self::Unchanged, Self::Rejected];

    fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Unchanged => "unchanged",
            Self::Rejected => "rejected",
        }
    }
}

/// What made a version: the `cause` label of `outrider_control_versions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionCause {
    /// `outriderctl apply`.
    Apply,
    /// A change of the policy directory.
    Files,
    /// `outriderctl delete`.
    Delete,
    /// `outriderctl rollback`.
    Rollback,
}

impl VersionCause {
    const ALL: [Self; 4] = [Self::Apply, Self::Files, Self::Delete, Self::Rollback];

    fn as_str(self) -> &'static str {
        match self {
            Self::Apply => "apply",
            Self::Files => "files",
            Self::Delete => "delete",
            Self::Rollback => "rollback",
        }
    }
}

/// Why a certificate was not issued: the `reason` label of
/// `outrider_control_certificate_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertFailure {
    /// The request body was unreadable or not a certificate request.
    Malformed,
    /// The service-account token did not prove the identity asked for.
    Unauthorized,
    /// The namespace or service account is not a valid name.
    Identity,
    /// The CSR does not parse or is not signed by its own key.
    Csr,
    /// Signing failed, or the check could not run.
    Internal,
}

impl CertFailure {
    const ALL: [Self; 5] = [
        Self::Malformed,
        Self::Unauthorized,
        Self::Identity,
        Self::Csr,
        Self::Internal,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Unauthorized => "unauthorized",
            Self::Identity => "identity",
            Self::Csr => "csr",
            Self::Internal => "internal",
        }
    }

    /// The reason of a CA refusal.
    pub fn of(error: &crate::ca::CaError) -> Self {
        use crate::ca::CaError;
        match error {
            CaError::Identity(_) | CaError::TrustDomain(_) => Self::Identity,
            CaError::Csr(_) => Self::Csr,
            CaError::Io { .. }
            | CaError::Half(_)
            | CaError::Load { .. }
            | CaError::Sign(_)
            | CaError::File(_)
            | CaError::Store(_) => Self::Internal,
        }
    }
}

/// An operation on the state directory: the `op` label of
/// `outrider_control_store_operation_duration_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOp {
    /// Reading the state at start.
    Load,
    /// Writing a new version durably.
    Save,
}

impl StoreOp {
    fn as_str(self) -> &'static str {
        match self {
            Self::Load => "load",
            Self::Save => "save",
        }
    }
}

fn source_label(source: Source) -> &'static str {
    match source {
        Source::File => "file",
        Source::Api => "api",
    }
}

/// The counters and histograms updated as things happen.
pub struct ControlMetrics {
    registry: Registry,
    applies: IntCounterVec,
    rejections: IntCounterVec,
    versions: IntCounterVec,
    acks: IntCounterVec,
    push_latency: Histogram,
    certificates_issued: IntCounter,
    certificate_failures: IntCounterVec,
    store_duration: HistogramVec,
}

impl std::fmt::Debug for ControlMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlMetrics").finish_non_exhaustive()
    }
}

impl Default for ControlMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ControlMetrics {
    /// Creates every metric, with each bounded label combination at zero so a dashboard's
    /// query has a series before the first event.
    pub fn new() -> Self {
        // Names and labels are constants checked by the tests: registration cannot fail.
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let vec = IntCounterVec::new(Opts::new(name, help), labels)
                .unwrap_or_else(|e| unreachable!("metric {name}: {e}"));
            register(&registry, Box::new(vec.clone()));
            vec
        };
        let applies = counter_vec(
            "outrider_control_applies_total",
            "Documents of changes (apply, delete, policy-directory changes), by source (api, file) and result (accepted, unchanged, rejected).",
            &["source", "result"],
        );
        let rejections = counter_vec(
            "outrider_control_rejections_total",
            "Changes refused, by source (api, file) and reason; the version in force stays.",
            &["source", "reason"],
        );
        let versions = counter_vec(
            "outrider_control_versions_total",
            "Versions committed, by cause (apply, files, delete, rollback).",
            &["cause"],
        );
        let acks = counter_vec(
            "outrider_control_acks_total",
            "Proxy reports accepted, by result (ack: applied, nack: refused, previous policy kept).",
            &["result"],
        );
        let certificate_failures = counter_vec(
            "outrider_control_certificate_failures_total",
            "Certificate requests refused, by reason.",
            &["reason"],
        );
        let certificates_issued = IntCounter::new(
            "outrider_control_certificates_issued_total",
            "Workload certificates issued.",
        )
        .unwrap_or_else(|e| unreachable!("{e}"));
        register(&registry, Box::new(certificates_issued.clone()));
        let push_latency = Histogram::with_opts(
            HistogramOpts::new(
                "outrider_control_push_latency_seconds",
                "Time from a version's commit to each proxy's ACK of it, for proxies subscribed when it was committed.",
            )
            .buckets(PUSH_BUCKETS.to_vec()),
        )
        .unwrap_or_else(|e| unreachable!("{e}"));
        register(&registry, Box::new(push_latency.clone()));
        let store_duration = HistogramVec::new(
            HistogramOpts::new(
                "outrider_control_store_operation_duration_seconds",
                "Time of operations on the state directory, by op (load, save), failed ones included.",
            )
            .buckets(STORE_BUCKETS.to_vec()),
            &["op"],
        )
        .unwrap_or_else(|e| unreachable!("{e}"));
        register(&registry, Box::new(store_duration.clone()));
        for source in ["api", "file"] {
            for result in ApplyResult::ALL {
                applies.with_label_values(&[source, result.as_str()]);
            }
            for reason in RejectReason::ALL {
                rejections.with_label_values(&[source, reason.as_str()]);
            }
        }
        for cause in VersionCause::ALL {
            versions.with_label_values(&[cause.as_str()]);
        }
        for result in ["ack", "nack"] {
            acks.with_label_values(&[result]);
        }
        for reason in CertFailure::ALL {
            certificate_failures.with_label_values(&[reason.as_str()]);
        }
        for op in [StoreOp::Load, StoreOp::Save] {
            store_duration.with_label_values(&[op.as_str()]);
        }
        Self {
            registry,
            applies,
            rejections,
            versions,
            acks,
            push_latency,
            certificates_issued,
            certificate_failures,
            store_duration,
        }
    }

    /// Counts a document of a committed (or refused) change.
    pub fn applied(&self, source: Source, result: ApplyResult) {
        self.applies
            .with_label_values(&[source_label(source), result.as_str()])
            .inc();
    }

    /// Counts a refused change.
    pub fn rejected(&self, source: Source, reason: RejectReason) {
        self.rejections
            .with_label_values(&[source_label(source), reason.as_str()])
            .inc();
    }

    /// Counts a committed version.
    pub fn version(&self, cause: VersionCause) {
        self.versions.with_label_values(&[cause.as_str()]).inc();
    }

    /// Counts an ACK, with the time since its version was committed when known.
    pub fn ack(&self, latency: Option<std::time::Duration>) {
        self.acks.with_label_values(&["ack"]).inc();
        if let Some(latency) = latency {
            self.push_latency.observe(latency.as_secs_f64());
        }
    }

    /// Counts a NACK.
    pub fn nack(&self) {
        self.acks.with_label_values(&["nack"]).inc();
    }

    /// Counts an issued certificate.
    pub fn certificate_issued(&self) {
        self.certificates_issued.inc();
    }

    /// Counts a refused certificate request.
    pub fn certificate_failed(&self, reason: CertFailure) {
        self.certificate_failures
            .with_label_values(&[reason.as_str()])
            .inc();
    }

    /// Records how long an operation on the state directory took.
    pub fn store_operation(&self, op: StoreOp, took: std::time::Duration) {
        self.store_duration
            .with_label_values(&[op.as_str()])
            .observe(took.as_secs_f64());
    }
}

fn register(registry: &Registry, collector: Box<dyn prometheus::core::Collector>) {
    if let Err(e) = registry.register(collector) {
        unreachable!("metric registered twice: {e}");
    }
}

/// What the scrape-time gauges read from the engine.
#[derive(Debug, Default)]
pub struct Fleet {
    /// Proxies by (workload, state): `in-sync`, `pending`, `nack`, `disconnected`, as in
    /// `outriderctl status`.
    pub proxies: std::collections::BTreeMap<(String, &'static str), i64>,
    /// Per published workload: the version of its merged policy in force, and the oldest
    /// version a connected proxy of it has applied (0 for one that applied none yet; `None`
    /// without connected proxies).
    pub workloads: std::collections::BTreeMap<String, (u64, Option<u64>)>,
}

/// The states of `outrider_control_proxies`, all present for each workload with a proxy.
pub const PROXY_STATES: [&str; 4] = ["in-sync", "pending", "nack", "disconnected"];

/// The Prometheus text exposition: the counters, and gauges read from `engine` and the
/// service registry (and the CA's expiry when it runs one).
pub fn encode(engine: &Engine, services: &ServiceRegistry, ca_not_after: Option<u64>) -> Vec<u8> {
    let mut families = engine.metrics().registry.gather();
    families.extend(snapshot(engine, ca_not_after).gather());
    families.extend(registry_snapshot(services).gather());
    let mut out = Vec::with_capacity(8 * 1024);
    // Encoding into a Vec fails only for a malformed family, which registration rules out.
    let _ = TextEncoder::new().encode(&families, &mut out);
    out
}

/// A registry of gauges built from the engine's state now.
fn snapshot(engine: &Engine, ca_not_after: Option<u64>) -> Registry {
    let registry = Registry::new();
    let gauge = |name: &str, help: &str, value: i64| {
        let gauge = IntGauge::new(name, help).unwrap_or_else(|e| unreachable!("{e}"));
        gauge.set(value);
        register(&registry, Box::new(gauge));
    };
    let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
        let vec =
            IntGaugeVec::new(Opts::new(name, help), labels).unwrap_or_else(|e| unreachable!("{e}"));
        register(&registry, Box::new(vec.clone()));
        vec
    };
    let to_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let store = engine.store_status();
    gauge(
        "outrider_control_store_healthy",
        "1 while writes of the state directory succeed, 0 from a failed write to the next successful one.",
        i64::from(store.healthy),
    );
    let write_failures = IntCounter::new(
        "outrider_control_store_write_failures_total",
        "Writes of the state directory that failed; the change they carried was not made.",
    )
    .unwrap_or_else(|e| unreachable!("{e}"));
    write_failures.inc_by(store.write_failures);
    register(&registry, Box::new(write_failures));
    gauge(
        "outrider_control_store_pending_changes",
        "1 while policy-file changes wait for the state directory to take them (retried).",
        i64::from(store.pending.is_some()),
    );
    gauge(
        "outrider_control_version",
        "The version in force.",
        to_i64(engine.version()),
    );
    if let Some(not_after) = ca_not_after {
        gauge(
            "outrider_control_ca_expiry_timestamp_seconds",
            "Unix time at which the mesh CA's issuing certificate expires (0: unreadable).",
            to_i64(not_after),
        );
    }
    let fleet = engine.fleet();
    let proxies = gauge_vec(
        "outrider_control_proxies",
        "Proxies the control plane knows, by workload and state (in-sync: applied the workload's policy in force; pending: sent, not yet applied; nack: refused it; disconnected: stream closed, forgotten after --registry-expiry).",
        &["workload", "state"],
    );
    for ((workload, state), count) in &fleet.proxies {
        for s in PROXY_STATES {
            proxies.with_label_values(&[workload.as_str(), s]);
        }
        proxies
            .with_label_values(&[workload.as_str(), state])
            .set(*count);
    }
    let version = gauge_vec(
        "outrider_control_workload_version",
        "Version of each workload's merged policy in force (the version at which it last changed).",
        &["workload"],
    );
    let applied = gauge_vec(
        "outrider_control_workload_applied_version_min",
        "Oldest version a connected proxy of the workload has applied (0: one has applied none yet); equal to outrider_control_workload_version once all have converged.",
        &["workload"],
    );
    for (workload, (current, oldest)) in &fleet.workloads {
        version.with_label_values(&[workload]).set(to_i64(*current));
        if let Some(oldest) = oldest {
            applied.with_label_values(&[workload]).set(to_i64(*oldest));
        }
    }
    registry
}

/// The service registry's series, read from it now: addresses by service (registered with any
/// replica), and what this replica's registrations went through.
fn registry_snapshot(services: &ServiceRegistry) -> Registry {
    let registry = Registry::new();
    let counter = |name: &str, help: &str, value: u64| {
        let counter = IntCounter::new(name, help).unwrap_or_else(|e| unreachable!("{e}"));
        counter.inc_by(value);
        register(&registry, Box::new(counter));
    };
    let counts = services.counts();
    counter(
        "outrider_control_registrations_total",
        "Service registrations taken by this replica, new or changed (renewals not counted).",
        counts.registered,
    );
    counter(
        "outrider_control_deregistrations_total",
        "Registrations removed by their proxy as it drains, through this replica.",
        counts.deregistered,
    );
    counter(
        "outrider_control_registration_expiries_total",
        "Registrations held by this replica that expired: their proxy stopped renewing them (it died or lost the control plane).",
        counts.expired,
    );
    let endpoints = IntGaugeVec::new(
        Opts::new(
            "outrider_control_registered_endpoints",
            "Addresses registered for each service with any replica, as pushed to callers (discovery: registry).",
        ),
        &["service"],
    )
    .unwrap_or_else(|e| unreachable!("{e}"));
    register(&registry, Box::new(endpoints.clone()));
    for (service, entry) in services.view().iter() {
        endpoints
            .with_label_values(&[service.as_str()])
            .set(i64::try_from(entry.addresses.len()).unwrap_or(i64::MAX));
    }
    registry
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bounded_series_exists_from_the_start() {
        let metrics = ControlMetrics::new();
        let families = metrics.registry.gather();
        let count = |name: &str| {
            families
                .iter()
                .find(|f| f.name() == name)
                .map_or(0, |f| f.get_metric().len())
        };
        assert_eq!(count("outrider_control_applies_total"), 6);
        assert_eq!(count("outrider_control_rejections_total"), 20);
        assert_eq!(count("outrider_control_versions_total"), 4);
        assert_eq!(count("outrider_control_acks_total"), 2);
        assert_eq!(count("outrider_control_certificate_failures_total"), 5);
        assert_eq!(
            count("outrider_control_store_operation_duration_seconds"),
            2
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_registry_series_follow_registrations() {
        let services = ServiceRegistry::new(std::time::Duration::from_secs(10));
        let register = |proxy: &str, port: u16| {
            services
                .register(outrider_config::wire::Registration {
                    proxy: proxy.into(),
                    services: vec!["pay".into()],
                    address: ([127, 0, 0, 1], port).into(),
                })
                .expect("registered");
        };
        let text = || {
            let mut out = Vec::new();
            TextEncoder::new()
                .encode(&registry_snapshot(&services).gather(), &mut out)
                .expect("encoded");
            String::from_utf8(out).expect("utf-8")
        };
        assert!(text().contains("outrider_control_registrations_total 0\n"));
        register("a", 1);
        register("b", 2);
        register("c", 3);
        // A renewal is no new registration.
        register("a", 1);
        services.deregister("b");
        tokio::time::advance(std::time::Duration::from_secs(6)).await;
        register("a", 1);
        tokio::time::advance(std::time::Duration::from_secs(6)).await;
        assert_eq!(services.expire(tokio::time::Instant::now()), 1);
        let text = text();
        for line in [
            "outrider_control_registrations_total 3\n",
            "outrider_control_deregistrations_total 1\n",
            "outrider_control_registration_expiries_total 1\n",
            "outrider_control_registered_endpoints{service=\"pay\"} 1\n",
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
    }
}
