//! Prometheus metrics. Label sets are resolved once per reload into [`RouteMetrics`] handles,
//! so the request path only touches atomics: no label hashing, no registry lock.

use std::sync::{Arc, OnceLock};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::policy::breaker::{BreakerMetrics, STATE_LABELS};

/// Latency buckets for a sidecar hop: sub-millisecond up to ten seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The `method` label values: the standard methods, and `other` for any extension method, so
/// a caller cannot grow the series count with made-up methods.
const METHODS: [&str; 10] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "other",
];

/// Status codes `http` accepts: 100 to 999.
const FIRST_CODE: u16 = 100;
const CODES: usize = 900;

fn method_index(method: &http::Method) -> usize {
    match method.as_str() {
        "GET" => 0,
        "HEAD" => 1,
        "POST" => 2,
        "PUT" => 3,
        "DELETE" => 4,
        "CONNECT" => 5,
        "OPTIONS" => 6,
        "TRACE" => 7,
        "PATCH" => 8,
        _ => 9,
    }
}

/// Request counters of one direction, service and route, by method and status code.
///
/// The children are made lazily (a route sees few methods and codes, and eager series for all
/// of them would be thousands of zeros) and then cached: a table per method, a slot per code,
/// so after the first request with a given method and code, counting is one atomic add with no
/// label hashing and no lock of the metric family.
struct RequestCounters {
    family: IntCounterVec,
    labels: RouteLabels,
    by_method: [OnceLock<Box<[OnceLock<IntCounter>]>>; METHODS.len()],
}

impl RequestCounters {
    fn inc(&self, method: &http::Method, status: http::StatusCode) {
        let m = method_index(method);
        let codes = self.by_method[m].get_or_init(|| (0..CODES).map(|_| OnceLock::new()).collect());
        let slot = usize::from(status.as_u16().saturating_sub(FIRST_CODE)).min(CODES - 1);
        codes[slot]
            .get_or_init(|| {
                let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
                self.family.with_label_values(&[
                    &self.labels.direction,
                    &self.labels.service,
                    &self.labels.route,
                    METHODS[m],
                    STATUS_CLASSES[class],
                    status.as_str(),
                ])
            })
            .inc();
    }
}

/// Every metric the proxy exports, registered in one registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    connections_opened: IntCounterVec,
    connections_active: IntGaugeVec,
    retries: IntCounterVec,
    rate_limit: IntCounterVec,
    breaker_state: IntGaugeVec,
    breaker_transitions: IntCounterVec,
    ejections: IntCounterVec,
    listeners: ListenerVecs,
    hold_outs: IntCounterVec,
    malformed: IntCounterVec,
    traffic: TrafficVecs,
    /// Span export and access-log counters.
    pub telemetry: TelemetryMetrics,
    process: ProcessGauges,
    /// The version of the policy in force.
    pub policy_version: IntGauge,
    /// Policy reloads, by result (`ok` or `error`).
    pub policy_reloads: PolicyReloadMetrics,
    /// Transparent capture: captured connections, their bytes, protocol detection, loops.
    pub capture: CaptureMetrics,
}

/// Detection time buckets: most clients write at once (microseconds); a timeout is the longest.
const DETECTION_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Where an opaque relay's bytes are counted.
pub struct RelayCounters {
    /// Bytes from the client towards the destination.
    pub to_upstream: IntCounter,
    /// Bytes from the destination back to the client.
    pub to_downstream: IntCounter,
}

/// Metrics of captured connections. Destinations are labelled by class (a service name or
/// `passthrough`), never by raw address: a pod may call any number of addresses.
#[derive(Clone)]
pub struct CaptureMetrics {
    connections: IntCounterVec,
    bytes: IntCounterVec,
    detections: IntCounterVec,
    detection_seconds: HistogramVec,
    loops: IntCounterVec,
}

impl CaptureMetrics {
    fn new(registry: &Registry) -> Result<Self, MetricsError> {
        let metrics = Self {
            connections: IntCounterVec::new(
                Opts::new(
                    "outrider_tcp_connections_total",
                    "Captured connections accepted, by direction, destination (a service, \
                     `passthrough`, or `app` inbound) and how they were proxied (http, opaque).",
                ),
                &["direction", "destination", "mode"],
            )?,
            bytes: IntCounterVec::new(
                Opts::new(
                    "outrider_tcp_bytes_total",
                    "Bytes of captured connections proxied as opaque TCP, by direction, \
                     destination and way (to_upstream, to_downstream).",
                ),
                &["direction", "destination", "way"],
            )?,
            detections: IntCounterVec::new(
                Opts::new(
                    "outrider_protocol_detections_total",
                    "Protocol detection on captured connections, by direction and outcome \
                     (http1, h2, tls, opaque, timeout, closed, opaque_port: not detected).",
                ),
                &["direction", "protocol"],
            )?,
            detection_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "outrider_protocol_detection_seconds",
                    "Time from accept to the detection decision on captured connections.",
                )
                .buckets(DETECTION_BUCKETS.to_vec()),
                &["direction"],
            )?,
            loops: IntCounterVec::new(
                Opts::new(
                    "outrider_capture_loops_total",
                    "Captured connections refused as loops back into this proxy, by reason \
                     (own_listener, own_connection).",
                ),
                &["reason"],
            )?,
        };
        registry.register(Box::new(metrics.connections.clone()))?;
        registry.register(Box::new(metrics.bytes.clone()))?;
        registry.register(Box::new(metrics.detections.clone()))?;
        registry.register(Box::new(metrics.detection_seconds.clone()))?;
        registry.register(Box::new(metrics.loops.clone()))?;
        Ok(metrics)
    }

    /// Counts one captured connection (once per connection).
    pub fn connection(&self, direction: &str, destination: &str, mode: &str) {
        self.connections
            .with_label_values(&[direction, destination, mode])
            .inc();
    }

    /// The byte counters of one opaque relay.
    pub fn relay(&self, direction: &str, destination: &str) -> RelayCounters {
        RelayCounters {
            to_upstream: self
                .bytes
                .with_label_values(&[direction, destination, "to_upstream"]),
            to_downstream: self
                .bytes
                .with_label_values(&[direction, destination, "to_downstream"]),
        }
    }

    /// Records a detection outcome and how long it took.
    pub fn detected(&self, direction: &str, protocol: &str, seconds: f64) {
        self.detections
            .with_label_values(&[direction, protocol])
            .inc();
        self.detection_seconds
            .with_label_values(&[direction])
            .observe(seconds);
    }

    /// Counts a refused loop.
    pub fn looped(&self, reason: &str) {
        self.loops.with_label_values(&[reason]).inc();
    }
}

/// Counters of policy reloads (file changes and control-plane updates).
#[derive(Clone)]
pub struct PolicyReloadMetrics {
    /// A new policy was built and swapped in.
    pub ok: IntCounter,
    /// A new policy was refused (invalid, or a listener could not bind); the old one stayed.
    pub error: IntCounter,
}

/// Where a request was counted: by direction, service and route.
pub struct RouteMetrics {
    requests: RequestCounters,
    duration: Histogram,
    /// Retry outcomes of this route and service.
    pub retries: RetryMetrics,
    /// Rate-limit decisions on requests of this route and service.
    pub rate_limit: RateLimitMetrics,
    /// Bytes, requests in flight, time to end of stream.
    pub traffic: TrafficMetrics,
    /// The labels these handles were made for (access log and span attributes).
    pub labels: RouteLabels,
}

/// Direction, service and route of a target, as in its metric labels.
#[derive(Debug, Clone)]
pub struct RouteLabels {
    /// `inbound` or `outbound`.
    pub direction: Arc<str>,
    /// The service (`app` for inbound).
    pub service: Arc<str>,
    /// The route name.
    pub route: Arc<str>,
}

/// Traffic of one direction, service and route beyond request counts.
pub struct TrafficMetrics {
    /// Request body bytes received from callers and forwarded, once per request (not per
    /// retry attempt); added when the request body ends.
    pub request_bytes: IntCounter,
    /// Response body bytes sent to callers, counted frame by frame.
    pub response_bytes: IntCounter,
    /// Requests in flight (until their response body ends).
    pub active: IntGauge,
    /// Requests waiting for their response headers (from the upstream or the proxy).
    pub pending: IntGauge,
    /// Time from request received to the end of the response body.
    pub stream_duration: Histogram,
}

#[derive(Clone)]
struct TrafficVecs {
    request_bytes: IntCounterVec,
    response_bytes: IntCounterVec,
    active: IntGaugeVec,
    pending: IntGaugeVec,
    stream_duration: HistogramVec,
    connections_closed: IntCounterVec,
}

/// Counters of the telemetry pipelines themselves.
#[derive(Clone)]
pub struct TelemetryMetrics {
    /// Spans the collector accepted.
    pub spans_exported: IntCounter,
    /// Spans dropped: queue full, or the collector failed or was unreachable.
    pub spans_dropped: IntCounter,
    /// Access-log lines written.
    pub access_log_lines: IntCounter,
    /// Access-log lines dropped because the writer fell behind.
    pub access_log_dropped: IntCounter,
}

#[derive(Clone)]
struct ProcessGauges {
    resident_memory: IntGauge,
    open_fds: IntGauge,
}

impl ProcessGauges {
    /// Reads the process's resident memory and open descriptors from /proc (Linux); on a
    /// scrape only, never on the request path.
    fn update(&self) {
        if let Ok(statm) = std::fs::read_to_string("/proc/self/statm") {
            if let Some(pages) = statm
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<i64>().ok())
            {
                // The kernel's page size is 4 KiB on every platform this proxy targets.
                self.resident_memory.set(pages * 4096);
            }
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(fds.count() as i64);
        }
    }
}

impl TrafficVecs {
    fn new(registry: &Registry) -> Result<Self, MetricsError> {
        let labels = &["direction", "service", "route"];
        let vecs = Self {
            request_bytes: IntCounterVec::new(
                Opts::new(
                    "outrider_request_bytes_total",
                    "Request body bytes received from callers and forwarded upstream, counted as they pass (any framing), once per request however many retry attempts replay them.",
                ),
                labels,
            )?,
            response_bytes: IntCounterVec::new(
                Opts::new(
                    "outrider_response_bytes_total",
                    "Response body bytes sent to callers.",
                ),
                labels,
            )?,
            active: IntGaugeVec::new(
                Opts::new(
                    "outrider_requests_active",
                    "Requests in flight, until their response body ends.",
                ),
                labels,
            )?,
            pending: IntGaugeVec::new(
                Opts::new(
                    "outrider_requests_pending",
                    "Requests waiting for their response headers.",
                ),
                labels,
            )?,
            connections_closed: IntCounterVec::new(
                Opts::new(
                    "outrider_upstream_connections_closed_total",
                    "TCP connections to upstream endpoints closed.",
                ),
                &["service", "endpoint"],
            )?,
            stream_duration: HistogramVec::new(
                HistogramOpts::new(
                    "outrider_response_stream_duration_seconds",
                    "Time from request received to the end of the response body.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                labels,
            )?,
        };
        registry.register(Box::new(vecs.request_bytes.clone()))?;
        registry.register(Box::new(vecs.response_bytes.clone()))?;
        registry.register(Box::new(vecs.active.clone()))?;
        registry.register(Box::new(vecs.pending.clone()))?;
        registry.register(Box::new(vecs.connections_closed.clone()))?;
        registry.register(Box::new(vecs.stream_duration.clone()))?;
        Ok(vecs)
    }

    fn handles(&self, direction: &str, service: &str, route: &str) -> TrafficMetrics {
        let labels = [direction, service, route];
        TrafficMetrics {
            request_bytes: self.request_bytes.with_label_values(&labels),
            response_bytes: self.response_bytes.with_label_values(&labels),
            active: self.active.with_label_values(&labels),
            pending: self.pending.with_label_values(&labels),
            stream_duration: self.stream_duration.with_label_values(&labels),
        }
    }
}

impl TelemetryMetrics {
    fn new(registry: &Registry) -> Result<Self, MetricsError> {
        let counter = |name: &str, help: &str| -> Result<IntCounter, MetricsError> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        Ok(Self {
            spans_exported: counter(
                "outrider_spans_exported_total",
                "Spans the OTLP collector accepted.",
            )?,
            spans_dropped: counter(
                "outrider_spans_dropped_total",
                "Spans dropped: export queue full, or the collector failed or was unreachable.",
            )?,
            access_log_lines: counter(
                "outrider_access_log_lines_total",
                "Access-log lines written to stdout.",
            )?,
            access_log_dropped: counter(
                "outrider_access_log_dropped_total",
                "Access-log lines dropped because the writer fell behind.",
            )?,
        })
    }
}

impl ProcessGauges {
    fn new(registry: &Registry) -> Result<Self, MetricsError> {
        let resident_memory = IntGauge::new(
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
        )?;
        let open_fds = IntGauge::new("process_open_fds", "Number of open file descriptors.")?;
        registry.register(Box::new(resident_memory.clone()))?;
        registry.register(Box::new(open_fds.clone()))?;
        Ok(Self {
            resident_memory,
            open_fds,
        })
    }
}

/// What rate limits decided.
pub struct RateLimitMetrics {
    /// Under the limit.
    pub allowed: IntCounter,
    /// Over the limit: answered 429.
    pub rejected: IntCounter,
    /// Over a `mode: shadow` limit: counted and let through.
    pub shadow_rejected: IntCounter,
}

/// How requests that met a retryable failure ended.
pub struct RetryMetrics {
    /// A retry produced the final, successful response.
    pub success: IntCounter,
    /// Every attempt was used and the last one failed.
    pub exhausted: IntCounter,
    /// The retry budget refused a retry.
    pub budget_denied: IntCounter,
    /// The failure was retryable but the method or body size forbade a retry.
    pub not_retryable: IntCounter,
}

impl RouteMetrics {
    /// Counts one response to a `method` request with `status` that took `seconds` to its
    /// headers.
    pub fn record(&self, method: &http::Method, status: http::StatusCode, seconds: f64) {
        self.requests.inc(method, status);
        self.duration.observe(seconds);
    }
}

/// Connection counters of one upstream endpoint.
#[derive(Clone)]
pub struct ConnectionMetrics {
    opened: IntCounter,
    closed: IntCounter,
    active: IntGauge,
}

impl ConnectionMetrics {
    /// Counts a new connection; the returned guard counts it closed when dropped.
    pub fn opened(&self) -> ConnectionGuard {
        self.opened.inc();
        self.active.inc();
        ConnectionGuard {
            active: self.active.clone(),
            closed: self.closed.clone(),
        }
    }
}

/// Connection counters of one listener (`inbound`, `outbound`, `admin`).
#[derive(Clone)]
pub struct ListenerMetrics {
    /// Connections open now.
    pub active: IntGauge,
    /// Connections closed at accept because the listener was at its cap.
    pub rejected: IntCounter,
    /// Closed for want of a complete first request head within the header-read timeout.
    pub header_read_timeouts: IntCounter,
    /// Closed after the idle timeout with no request in progress.
    pub idle_timeouts: IntCounter,
}

#[derive(Clone)]
struct ListenerVecs {
    active: IntGaugeVec,
    rejected: IntCounterVec,
    timeouts: IntCounterVec,
}

impl ListenerVecs {
    fn new(registry: &Registry) -> Result<Self, MetricsError> {
        let vecs = Self {
            active: IntGaugeVec::new(
                Opts::new(
                    "outrider_connections_active",
                    "Downstream connections open, by listener.",
                ),
                &["listener"],
            )?,
            rejected: IntCounterVec::new(
                Opts::new(
                    "outrider_connections_rejected_total",
                    "Downstream connections closed at accept: the listener was at its cap.",
                ),
                &["listener"],
            )?,
            timeouts: IntCounterVec::new(
                Opts::new(
                    "outrider_connection_timeouts_total",
                    "Downstream connections closed by a deadline, by listener and phase \
                     (header_read, idle).",
                ),
                &["listener", "phase"],
            )?,
        };
        registry.register(Box::new(vecs.active.clone()))?;
        registry.register(Box::new(vecs.rejected.clone()))?;
        registry.register(Box::new(vecs.timeouts.clone()))?;
        Ok(vecs)
    }
}

/// Decrements the active-connection gauge when the connection is dropped.
pub struct ConnectionGuard {
    active: IntGauge,
    closed: IntCounter,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.closed.inc();
        self.active.dec();
    }
}

/// A metric could not be registered (a programming error: duplicate or invalid name).
#[derive(Debug, thiserror::Error)]
#[error("metrics: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

impl Metrics {
    /// Creates and registers every metric.
    pub fn new(workload: &str) -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "outrider_requests_total",
                "Requests answered, by direction, service, route, method, status class and code.",
            ),
            &[
                "direction",
                "service",
                "route",
                "method",
                "status_class",
                "code",
            ],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "outrider_response_duration_seconds",
                "Time from request received to response headers sent.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["direction", "service", "route"],
        )?;
        let connections_opened = IntCounterVec::new(
            Opts::new(
                "outrider_upstream_connections_opened_total",
                "TCP connections opened to upstream endpoints.",
            ),
            &["service", "endpoint"],
        )?;
        let connections_active = IntGaugeVec::new(
            Opts::new(
                "outrider_upstream_connections_active",
                "TCP connections to upstream endpoints currently open.",
            ),
            &["service", "endpoint"],
        )?;
        let retries = IntCounterVec::new(
            Opts::new(
                "outrider_retries_total",
                "Requests that met a retryable failure, by how they ended.",
            ),
            &["service", "route", "outcome"],
        )?;
        let rate_limit = IntCounterVec::new(
            Opts::new(
                "outrider_rate_limit_decisions_total",
                "Rate-limit decisions, by service, route and decision (allowed, rejected, \
                 shadow-rejected: over a shadow-mode limit and let through).",
            ),
            &["service", "route", "decision"],
        )?;
        let breaker_state = IntGaugeVec::new(
            Opts::new(
                "outrider_circuit_breaker_state",
                "1 for the state each service's circuit breaker is in (closed, open, half_open).",
            ),
            &["service", "state"],
        )?;
        let breaker_transitions = IntCounterVec::new(
            Opts::new(
                "outrider_circuit_breaker_transitions_total",
                "Circuit breaker state changes, by service and the state entered.",
            ),
            &["service", "to"],
        )?;
        let ejections = IntCounterVec::new(
            Opts::new(
                "outrider_outlier_ejections_total",
                "Endpoints ejected by outlier detection, by service.",
            ),
            &["service"],
        )?;
        let hold_outs = IntCounterVec::new(
            Opts::new(
                "outrider_endpoint_unavailable_total",
                "Endpoints held out of the balancer after a failed connect, by service.",
            ),
            &["service"],
        )?;
        let malformed = IntCounterVec::new(
            Opts::new(
                "outrider_http_malformed_requests_total",
                "Requests refused as malformed (400, 414, 431, 501) before any routing, by \
                 direction and status code; never forwarded.",
            ),
            &["direction", "code"],
        )?;
        let policy_version =
            IntGauge::new("outrider_policy_version", "Version of the policy in force.")?;
        let policy_reloads = IntCounterVec::new(
            Opts::new(
                "outrider_policy_reloads_total",
                "Policy reloads, by result; an error keeps the policy in force.",
            ),
            &["result"],
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new("outrider_build_info", "Build information; always 1."),
            &["version", "workload"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), workload])
            .set(1);
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(connections_opened.clone()))?;
        registry.register(Box::new(connections_active.clone()))?;
        registry.register(Box::new(retries.clone()))?;
        registry.register(Box::new(rate_limit.clone()))?;
        registry.register(Box::new(breaker_state.clone()))?;
        registry.register(Box::new(breaker_transitions.clone()))?;
        registry.register(Box::new(ejections.clone()))?;
        registry.register(Box::new(hold_outs.clone()))?;
        registry.register(Box::new(malformed.clone()))?;
        registry.register(Box::new(policy_version.clone()))?;
        registry.register(Box::new(policy_reloads.clone()))?;
        registry.register(Box::new(build_info))?;
        let traffic = TrafficVecs::new(&registry)?;
        let listeners = ListenerVecs::new(&registry)?;
        let telemetry = TelemetryMetrics::new(&registry)?;
        let process = ProcessGauges::new(&registry)?;
        let capture = CaptureMetrics::new(&registry)?;
        Ok(Self {
            capture,
            traffic,
            listeners,
            telemetry,
            process,
            registry,
            requests,
            duration,
            connections_opened,
            connections_active,
            retries,
            rate_limit,
            breaker_state,
            breaker_transitions,
            ejections,
            hold_outs,
            malformed,
            policy_version,
            policy_reloads: PolicyReloadMetrics {
                ok: policy_reloads.with_label_values(&["ok"]),
                error: policy_reloads.with_label_values(&["error"]),
            },
        })
    }

    /// Registers a collector owned by another module (mesh TLS) in the one registry.
    pub fn register(
        &self,
        collector: Box<dyn prometheus::core::Collector>,
    ) -> Result<(), MetricsError> {
        Ok(self.registry.register(collector)?)
    }

    /// Handles for requests in `direction` to `service` through `route`.
    pub fn route(&self, direction: &str, service: &str, route: &str) -> RouteMetrics {
        RouteMetrics {
            requests: RequestCounters {
                family: self.requests.clone(),
                labels: RouteLabels {
                    direction: direction.into(),
                    service: service.into(),
                    route: route.into(),
                },
                by_method: Default::default(),
            },
            duration: self
                .duration
                .with_label_values(&[direction, service, route]),
            retries: RetryMetrics {
                success: self.retries.with_label_values(&[service, route, "success"]),
                exhausted: self
                    .retries
                    .with_label_values(&[service, route, "exhausted"]),
                budget_denied: self
                    .retries
                    .with_label_values(&[service, route, "budget-denied"]),
                not_retryable: self
                    .retries
                    .with_label_values(&[service, route, "not-retryable"]),
            },
            rate_limit: RateLimitMetrics {
                allowed: self
                    .rate_limit
                    .with_label_values(&[service, route, "allowed"]),
                rejected: self
                    .rate_limit
                    .with_label_values(&[service, route, "rejected"]),
                shadow_rejected: self.rate_limit.with_label_values(&[
                    service,
                    route,
                    "shadow-rejected",
                ]),
            },
            traffic: self.traffic.handles(direction, service, route),
            labels: RouteLabels {
                direction: Arc::from(direction),
                service: Arc::from(service),
                route: Arc::from(route),
            },
        }
    }

    /// The ejection counter of `service`.
    pub fn ejections(&self, service: &str) -> IntCounter {
        self.ejections.with_label_values(&[service])
    }

    /// Counts a malformed request from `direction` answered `code` (the error path only: the
    /// series is looked up each time).
    pub fn malformed(&self, direction: &str, code: http::StatusCode) {
        self.malformed
            .with_label_values(&[direction, code.as_str()])
            .inc();
    }

    /// The counter of `service`'s endpoints held out after a failed connect.
    pub fn hold_outs(&self, service: &str) -> IntCounter {
        self.hold_outs.with_label_values(&[service])
    }

    /// Handles for the circuit breaker of `service`.
    pub fn breaker(&self, service: &str) -> BreakerMetrics {
        BreakerMetrics::new(
            STATE_LABELS.map(|s| self.breaker_state.with_label_values(&[service, s])),
            STATE_LABELS.map(|s| self.breaker_transitions.with_label_values(&[service, s])),
        )
    }

    /// Handles for the downstream connections of `listener`.
    pub fn listener(&self, listener: &str) -> ListenerMetrics {
        let timeouts = |phase| {
            self.listeners
                .timeouts
                .with_label_values(&[listener, phase])
        };
        ListenerMetrics {
            active: self.listeners.active.with_label_values(&[listener]),
            rejected: self.listeners.rejected.with_label_values(&[listener]),
            header_read_timeouts: timeouts("header_read"),
            idle_timeouts: timeouts("idle"),
        }
    }

    /// Handles for connections to `endpoint` of `service`.
    pub fn connections(&self, service: &str, endpoint: &str) -> ConnectionMetrics {
        ConnectionMetrics {
            opened: self
                .connections_opened
                .with_label_values(&[service, endpoint]),
            closed: self
                .traffic
                .connections_closed
                .with_label_values(&[service, endpoint]),
            active: self
                .connections_active
                .with_label_values(&[service, endpoint]),
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> Vec<u8> {
        self.process.update();
        let mut out = Vec::with_capacity(8 * 1024);
        // Encoding into a Vec cannot fail for I/O reasons; an error would mean a malformed
        // metric, which registration already rules out.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}
