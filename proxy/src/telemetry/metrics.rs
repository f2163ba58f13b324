//! Prometheus metrics. Label sets are resolved once per reload into [`RouteMetrics`] handles,
//! so the request path only touches atomics: no label hashing, no registry lock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};

use prometheus::{
    Counter, Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::core::errors::ResponseFlag;
use crate::policy::breaker::{BreakerMetrics, STATE_LABELS};

/// Latency buckets for a sidecar hop: sub-millisecond up to five minutes, so long streams
/// (downloads, server-streaming gRPC, long polls) land in a bucket rather than all in +Inf;
/// 18 buckets, four of them past ten seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0,
];

const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The `method` label values: the standard methods, and `other` for any extension method, so
/// a caller cannot grow the series count with made-up methods.
const METHODS: [&str; 10] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "other",
];

/// Endpoints of one service labelled by address at once, by default
/// (`--metrics-endpoint-cap`).
pub const DEFAULT_ENDPOINT_CAP: usize = 16;

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

const FLAGS: usize = ResponseFlag::ALL.len();

/// Slots per method and flag for the responses the proxy makes: a flag comes with one or two
/// statuses (a fault injection's is the policy's), so a few suffice; a status past them is
/// looked up in the family each time.
const PROXY_MADE_SLOTS: usize = 4;

/// Counters of one method and flag the proxy made responses for, each with its status (0 for
/// a cancelled request, which has none).
type ProxyMadeSlots = [OnceLock<(u16, IntCounter)>; PROXY_MADE_SLOTS];

/// Request counters of one direction, service and route, by method, status code and response
/// flag.
///
/// The children are made lazily (a route sees few methods and codes, and eager series for all
/// of them would be thousands of zeros) and then cached: for the upstream's responses a table
/// per method with a slot per code, for the proxy's own a few slots per method and flag; so
/// after the first request with a given method, code and flag, counting is one atomic add with
/// no label hashing and no lock of the metric family.
struct RequestCounters {
    family: IntCounterVec,
    labels: RouteLabels,
    by_method: [OnceLock<Box<[OnceLock<IntCounter>]>>; METHODS.len()],
    proxy_made: [OnceLock<Box<[ProxyMadeSlots; FLAGS]>>; METHODS.len()],
    /// Series of the proxy's responses past their flag's slots (method, status, flag), to
    /// remove them with the route's; pushed to only on that rare path.
    uncached: Mutex<Vec<(usize, http::StatusCode, ResponseFlag)>>,
}

/// `status_class` and `code` of a request the caller abandoned before its response ended (a
/// gRPC deadline or cancel, a closed connection); also its span's `error.type`.
pub const CANCELLED: &str = "cancelled";

impl RequestCounters {
    /// The series of `method`'s request ended with `status` and `flag` (`cancelled` for
    /// [`ResponseFlag::DownstreamCancelled`], whatever the status).
    fn series(&self, m: usize, status: http::StatusCode, flag: ResponseFlag) -> IntCounter {
        self.family
            .with_label_values(&self.label_values(m, &status, flag))
    }

    /// The label values of a series, in the family's order.
    fn label_values<'a>(
        &'a self,
        m: usize,
        status: &'a http::StatusCode,
        flag: ResponseFlag,
    ) -> [&'a str; 7] {
        let (class, code) = match flag {
            ResponseFlag::DownstreamCancelled => (CANCELLED, CANCELLED),
            _ => {
                let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
                (STATUS_CLASSES[class], status.as_str())
            }
        };
        [
            &self.labels.direction,
            &self.labels.service,
            &self.labels.route,
            METHODS[m],
            class,
            code,
            flag.code(),
        ]
    }

    /// Removes every series these counters made (when the route's last handle goes).
    fn remove_all(&self) {
        let remove = |m: usize, status: http::StatusCode, flag: ResponseFlag| {
            let _ = self
                .family
                .remove_label_values(&self.label_values(m, &status, flag));
        };
        for (m, codes) in self.by_method.iter().enumerate() {
            let made = codes.get().map(|c| c.iter()).into_iter().flatten();
            for (slot, counter) in made.enumerate() {
                let code = u16::try_from(slot)
                    .ok()
                    .and_then(|slot| FIRST_CODE.checked_add(slot));
                let status = code.and_then(|code| http::StatusCode::from_u16(code).ok());
                if let (Some(_), Some(status)) = (counter.get(), status) {
                    remove(m, status, ResponseFlag::Upstream);
                }
            }
        }
        for (m, flags) in self.proxy_made.iter().enumerate() {
            let Some(flags) = flags.get() else {
                continue;
            };
            for (flag, slots) in ResponseFlag::ALL.iter().zip(flags.iter()) {
                for (key, _) in slots.iter().filter_map(OnceLock::get) {
                    // A cancelled request's key (0) is no status: any does for its labels.
                    let status = http::StatusCode::from_u16(*key).unwrap_or(http::StatusCode::OK);
                    remove(m, status, *flag);
                }
            }
        }
        let uncached = self.uncached.lock().unwrap_or_else(PoisonError::into_inner);
        for (m, status, flag) in uncached.iter() {
            remove(*m, *status, *flag);
        }
    }

    fn inc(&self, method: &http::Method, status: http::StatusCode, flag: ResponseFlag) {
        let m = method_index(method);
        if flag == ResponseFlag::Upstream {
            let codes =
                self.by_method[m].get_or_init(|| (0..CODES).map(|_| OnceLock::new()).collect());
            let slot = usize::from(status.as_u16().saturating_sub(FIRST_CODE)).min(CODES - 1);
            codes[slot]
                .get_or_init(|| self.series(m, status, flag))
                .inc();
            return;
        }
        let key = match flag {
            ResponseFlag::DownstreamCancelled => 0,
            _ => status.as_u16(),
        };
        let flags = self.proxy_made[m].get_or_init(Box::default);
        for slot in &flags[flag.index()] {
            let (slot_key, counter) = slot.get_or_init(|| (key, self.series(m, status, flag)));
            if *slot_key == key {
                counter.inc();
                return;
            }
        }
        let mut uncached = self.uncached.lock().unwrap_or_else(PoisonError::into_inner);
        if !uncached.contains(&(m, status, flag)) {
            uncached.push((m, status, flag));
        }
        drop(uncached);
        self.series(m, status, flag).inc();
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
    retried_requests: IntCounterVec,
    rate_limit: IntCounterVec,
    breaker_state: IntGaugeVec,
    breaker_transitions: IntCounterVec,
    ejections: IntCounterVec,
    listeners: ListenerVecs,
    hold_outs: IntCounterVec,
    malformed: IntCounterVec,
    mirror_requests: IntCounterVec,
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
    /// `inbound.authorization`'s decisions.
    pub authz: AuthzMetrics,
    /// Route and route-filter decisions, by route name.
    pub routing: crate::telemetry::routing::RoutingMetrics,
    /// The route, service and endpoint handles alive now, by labels: shared by every snapshot
    /// that uses them.
    live: Arc<LiveSeries>,
    /// Most endpoints of one service labelled by address at once; the rest are `other`.
    endpoint_cap: usize,
}

/// `outrider_mirror_requests_total` of one route's mirror, by result.
#[derive(Debug, Clone)]
pub struct MirrorCounters {
    /// The mirror answered (whatever its status); its response was discarded.
    pub sent: IntCounter,
    /// No response: the connect failed, or the connection was reset.
    pub failed: IntCounter,
    /// No whole exchange within the mirror's timeout (the wait for the caller's body included).
    pub timeout: IntCounter,
    /// Not sent: the body was over `body_limit`, or the caller's body never ended.
    pub skipped_body: IntCounter,
    /// Not sent: `max_in_flight` copies were already in flight.
    pub overflow: IntCounter,
}

/// Labels of a route handle: direction, service, route.
type RouteKey = (Arc<str>, Arc<str>, Arc<str>);

/// Endpoint handles of one service, by `endpoint` label.
type ServiceEndpoints = HashMap<Arc<str>, Weak<ConnectionMetrics>>;

/// The `endpoint` label of a service's endpoints past the cap.
pub const OTHER_ENDPOINTS: &str = "other";

/// Route, service and endpoint handles in use, so a reload reuses the handles of those that
/// stayed, and the last holder of one that left the policy (its old snapshot, the requests
/// still in flight on it, an endpoint's open connections) removes its series. Locked at
/// reloads, when an endpoint appears and when a handle goes, never per request.
#[derive(Default)]
struct LiveSeries {
    routes: Mutex<HashMap<RouteKey, Weak<RouteMetrics>>>,
    services: Mutex<HashMap<Arc<str>, Weak<ServiceMetrics>>>,
    /// By service, then endpoint: looked up by `&str` without building a key.
    endpoints: Mutex<HashMap<Arc<str>, ServiceEndpoints>>,
}

/// Whether `live` holds a handle still in use for `key`: a reload that brought a route,
/// service or endpoint back after its last handle's holder let go made new handles on the same
/// series, and those stay.
fn in_use<K: std::hash::Hash + Eq, V>(live: &HashMap<K, Weak<V>>, key: &K) -> bool {
    live.get(key).is_some_and(|h| h.strong_count() > 0)
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
    refused: IntCounterVec,
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
            refused: IntCounterVec::new(
                Opts::new(
                    "outrider_tcp_refused_total",
                    "Captured connections (and mesh-wrapped TCP on the inbound port) closed \
                     before being served or relayed, by direction and reason (unverified, \
                     unauthorized, no_identity, no_destination).",
                ),
                &["direction", "reason"],
            )?,
        };
        registry.register(Box::new(metrics.connections.clone()))?;
        registry.register(Box::new(metrics.bytes.clone()))?;
        registry.register(Box::new(metrics.detections.clone()))?;
        registry.register(Box::new(metrics.detection_seconds.clone()))?;
        registry.register(Box::new(metrics.loops.clone()))?;
        registry.register(Box::new(metrics.refused.clone()))?;
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

    /// Counts a connection closed before it was served or relayed, and why.
    pub fn refused(&self, direction: &str, reason: &str) {
        self.refused.with_label_values(&[direction, reason]).inc();
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

/// Where a request was counted: by direction, service and route. Shared by every snapshot
/// with this route; when the last holder drops it, its series leave the exposition.
pub struct RouteMetrics {
    /// The families its series belong to, to remove them from.
    owner: Option<RouteOwner>,
    requests: RequestCounters,
    /// Time to response headers, by flag.
    duration: [OnceLock<Histogram>; FLAGS],
    duration_family: HistogramVec,
    /// Retry outcomes of this route and service.
    pub retries: RetryMetrics,
    /// Rate-limit decisions on requests of this route and service.
    pub rate_limit: RateLimitMetrics,
    /// Bytes, requests in flight, time to end of stream.
    pub traffic: TrafficMetrics,
    /// The labels these handles were made for (access log and span attributes).
    pub labels: RouteLabels,
}

/// What removes a route's series when its handles go.
struct RouteOwner {
    metrics: Metrics,
    key: RouteKey,
}

impl Drop for RouteMetrics {
    fn drop(&mut self) {
        let Some(owner) = self.owner.take() else {
            return;
        };
        let metrics = &owner.metrics;
        let mut live = metrics
            .live
            .routes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if in_use(&live, &owner.key) {
            return;
        }
        live.remove(&owner.key);
        let (direction, service, route) = (&*owner.key.0, &*owner.key.1, &*owner.key.2);
        self.requests.remove_all();
        for flag in ResponseFlag::ALL {
            let _ = metrics
                .duration
                .remove_label_values(&[direction, service, route, flag.code()]);
        }
        let traffic = &metrics.traffic;
        let three = [direction, service, route];
        let _ = traffic.request_bytes.remove_label_values(&three);
        let _ = traffic.response_bytes.remove_label_values(&three);
        let _ = traffic.active.remove_label_values(&three);
        let _ = traffic.pending.remove_label_values(&three);
        let _ = traffic.stream_duration.remove_label_values(&three);
        let _ = metrics.retries.remove_label_values(&[service, route]);
        for outcome in ["success", "exhausted", "budget-denied", "not-retryable"] {
            let _ = metrics
                .retried_requests
                .remove_label_values(&[service, route, outcome]);
        }
        for decision in ["allowed", "rejected", "shadow-rejected"] {
            let _ = metrics
                .rate_limit
                .remove_label_values(&[service, route, decision]);
        }
    }
}

/// The series of one service beyond its routes' (circuit breaker, outlier ejections,
/// hold-outs), registered while a handle lives: its upstream and its breaker hold one, so they
/// go after the last snapshot with the service and the last request on it.
pub struct ServiceMetrics {
    owner: Option<(Metrics, Arc<str>)>,
    /// Endpoints held out after a failed connect.
    pub hold_outs: IntCounter,
}

impl ServiceMetrics {
    /// The counter of endpoints ejected by outlier detection (made for services that have it).
    pub fn ejections(&self) -> Option<IntCounter> {
        let (metrics, service) = self.owner.as_ref()?;
        Some(metrics.ejections.with_label_values(&[service]))
    }
}

impl Drop for ServiceMetrics {
    fn drop(&mut self) {
        let Some((metrics, service)) = self.owner.take() else {
            return;
        };
        let mut live = metrics
            .live
            .services
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if in_use(&live, &service) {
            return;
        }
        live.remove(&service);
        let _ = metrics.ejections.remove_label_values(&[&service]);
        let _ = metrics.hold_outs.remove_label_values(&[&service]);
        for state in STATE_LABELS {
            let _ = metrics
                .breaker_state
                .remove_label_values(&[&service, state]);
            let _ = metrics
                .breaker_transitions
                .remove_label_values(&[&service, state]);
        }
    }
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
    cpu_seconds: Counter,
    /// The CPU seconds already added to `cpu_seconds` (the kernel gives a total; the counter
    /// takes increments). Scrapes may run concurrently; the lock is never on the request path.
    cpu_seen: Arc<Mutex<f64>>,
}

/// Clock ticks per second of the times in `/proc/<pid>/stat`: the kernel reports them in
/// USER_HZ, which is 100 on every architecture this proxy targets (x86-64, arm64).
const USER_HZ: f64 = 100.0;

/// User plus system CPU time and the start time (seconds after boot) from the text of
/// `/proc/self/stat`.
fn parse_proc_stat(stat: &str) -> Option<(f64, f64)> {
    // The command name (field 2) may hold spaces and parentheses: fields are counted from
    // the last ')'. Field 3 (state) is then index 0, utime (14) index 11, stime (15) index
    // 12, starttime (22) index 19.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<u64>().ok();
    let cpu = ticks(11)?.saturating_add(ticks(12)?);
    Some((cpu as f64 / USER_HZ, ticks(19)? as f64 / USER_HZ))
}

/// The boot time (`btime`, seconds since the epoch) from the text of `/proc/stat`.
fn parse_boot_time(stat: &str) -> Option<f64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|v| v as f64)
}

impl ProcessGauges {
    /// Reads the process's resident memory, open descriptors and CPU time from /proc (Linux);
    /// on a scrape only, never on the request path.
    fn update(&self) {
        if let Some((cpu, _)) = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|stat| parse_proc_stat(&stat))
        {
            if let Ok(mut seen) = self.cpu_seen.lock() {
                if cpu > *seen {
                    self.cpu_seconds.inc_by(cpu - *seen);
                    *seen = cpu;
                }
            }
        }
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
        let cpu_seconds = Counter::new(
            "process_cpu_seconds_total",
            "Total user and system CPU time spent in seconds.",
        )?;
        let start_time = Gauge::new(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
        )?;
        // Once: the process's start (ticks after boot) plus the boot time; if /proc cannot
        // tell, the registry's creation (moments after start) stands in.
        let started = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|stat| parse_proc_stat(&stat))
            .zip(
                std::fs::read_to_string("/proc/stat")
                    .ok()
                    .and_then(|stat| parse_boot_time(&stat)),
            )
            .map(|((_, after_boot), boot)| boot + after_boot)
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs_f64()
            });
        start_time.set(started);
        registry.register(Box::new(resident_memory.clone()))?;
        registry.register(Box::new(open_fds.clone()))?;
        registry.register(Box::new(cpu_seconds.clone()))?;
        registry.register(Box::new(start_time))?;
        Ok(Self {
            resident_memory,
            open_fds,
            cpu_seconds,
            cpu_seen: Arc::new(Mutex::new(0.0)),
        })
    }
}

/// `outrider_authz_decisions_total{rule,action,mode}`: one series per rule of the policies in
/// force (and the default), so its cardinality is the policy's.
#[derive(Clone)]
pub struct AuthzMetrics {
    decisions: IntCounterVec,
    /// How many handles of each series live: the last one to go removes its series, so a
    /// rule that left the policy leaves the scrape once no snapshot counts in it. Locked when
    /// a policy is compiled or dropped, never per request.
    live: Arc<Mutex<HashMap<AuthzKey, usize>>>,
}

/// Labels of a decision series: rule, action, mode.
type AuthzKey = (Arc<str>, &'static str, &'static str);

/// A handle on one decision series; the series goes with the last handle.
pub struct AuthzSeries {
    owner: AuthzMetrics,
    key: AuthzKey,
    /// The counter.
    pub count: IntCounter,
}

impl std::fmt::Debug for AuthzSeries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("AuthzSeries").field(&self.key).finish()
    }
}

impl AuthzMetrics {
    fn new(registry: &Registry) -> Result<Self, MetricsError> {
        let decisions = IntCounterVec::new(
            Opts::new(
                "outrider_authz_decisions_total",
                "Inbound authorization decisions, by the rule that decided (`:default` when none \
                 matched, `:allow` for the `allow` list), action (allow, deny, would_deny: a \
                 denial under `mode: audit`, let through) and mode (enforce, audit).",
            ),
            &["rule", "action", "mode"],
        )?;
        registry.register(Box::new(decisions.clone()))?;
        Ok(Self {
            decisions,
            live: Arc::default(),
        })
    }

    /// A handle on the series of `rule`'s decisions: resolved once per reload.
    pub fn decisions(&self, rule: &str, action: &'static str, mode: &'static str) -> AuthzSeries {
        let key: AuthzKey = (Arc::from(rule), action, mode);
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        *live.entry(key.clone()).or_default() += 1;
        let count = self.decisions.with_label_values(&[rule, action, mode]);
        drop(live);
        AuthzSeries {
            owner: self.clone(),
            key,
            count,
        }
    }
}

impl Drop for AuthzSeries {
    fn drop(&mut self) {
        let mut live = self
            .owner
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(handles) = live.get_mut(&self.key) else {
            return;
        };
        *handles = handles.saturating_sub(1);
        if *handles == 0 {
            live.remove(&self.key);
            let (rule, action, mode) = &self.key;
            let _ = self
                .owner
                .decisions
                .remove_label_values(&[&**rule, action, mode]);
        }
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

/// Retry attempts sent, and how requests that met a retryable failure ended.
pub struct RetryMetrics {
    /// Attempts after the first: one per retry actually sent.
    pub attempts: IntCounter,
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
    /// Counts one response to a `method` request with `status` and `flag` that took `seconds`
    /// to its headers.
    pub fn record(
        &self,
        method: &http::Method,
        status: http::StatusCode,
        flag: ResponseFlag,
        seconds: f64,
    ) {
        self.requests.inc(method, status, flag);
        self.observe_headers(flag, seconds);
    }

    /// Observes the time to the response headers (made as `flag` says) of a request counted
    /// when it ends.
    pub fn observe_headers(&self, flag: ResponseFlag, seconds: f64) {
        self.duration[flag.index()]
            .get_or_init(|| {
                let labels = &self.labels;
                self.duration_family.with_label_values(&[
                    &labels.direction,
                    &labels.service,
                    &labels.route,
                    flag.code(),
                ])
            })
            .observe(seconds);
    }

    /// Counts a request that ended: with its status and flag, or as `cancelled` (status class
    /// and code) when the flag is [`ResponseFlag::DownstreamCancelled`]: the caller left before
    /// its response ended (a gRPC deadline or cancel, a closed connection).
    pub fn count_ended(&self, method: &http::Method, status: http::StatusCode, flag: ResponseFlag) {
        self.requests.inc(method, status, flag);
    }
}

/// Connection counters of one upstream endpoint (or of a service's endpoints past the cap),
/// registered while a handle lives: the endpoint's connector holds one, and each open
/// connection, so an endpoint that left goes once its last connection closed.
pub struct ConnectionMetrics {
    opened: IntCounter,
    closed: IntCounter,
    active: IntGauge,
    /// The service and `endpoint` label.
    owner: Option<(Metrics, Arc<str>, Arc<str>)>,
}

impl ConnectionMetrics {
    /// Counts a new connection; the returned guard counts it closed when dropped.
    pub fn opened(self: &Arc<Self>) -> ConnectionGuard {
        self.opened.inc();
        self.active.inc();
        ConnectionGuard(Arc::clone(self))
    }
}

impl Drop for ConnectionMetrics {
    fn drop(&mut self) {
        let Some((metrics, service, endpoint)) = self.owner.take() else {
            return;
        };
        let mut live = metrics
            .live
            .endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(endpoints) = live.get_mut(&service) {
            if in_use(endpoints, &endpoint) {
                return;
            }
            endpoints.remove(&endpoint);
            if endpoints.is_empty() {
                live.remove(&service);
            }
        }
        let labels = [&*service, &*endpoint];
        let _ = metrics.connections_opened.remove_label_values(&labels);
        let _ = metrics.connections_active.remove_label_values(&labels);
        let _ = metrics
            .traffic
            .connections_closed
            .remove_label_values(&labels);
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
pub struct ConnectionGuard(Arc<ConnectionMetrics>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.closed.inc();
        self.0.active.dec();
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
                "Requests, by direction, service, route, method, status class, code and response flag (`-`: the upstream's response; otherwise why the proxy made it); counted when the response ends (`cancelled`, flag `DC`, when the caller left first).",
            ),
            &[
                "direction",
                "service",
                "route",
                "method",
                "status_class",
                "code",
                "flags",
            ],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "outrider_response_duration_seconds",
                "Time from request received to response headers sent, by response flag.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["direction", "service", "route", "flags"],
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
                "Retry attempts sent (attempts after a request's first).",
            ),
            &["service", "route"],
        )?;
        let retried_requests = IntCounterVec::new(
            Opts::new(
                "outrider_retried_requests_total",
                "Requests that met a retryable failure, by how they ended (success, exhausted, \
                 budget-denied, not-retryable).",
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
        let mirror_requests = IntCounterVec::new(
            Opts::new(
                "outrider_mirror_requests_total",
                "Request copies of a route's request_mirror filter, by mirror service, route and \
                 result (sent, failed, timeout, skipped_body, overflow).",
            ),
            &["service", "route", "result"],
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
        registry.register(Box::new(retried_requests.clone()))?;
        registry.register(Box::new(rate_limit.clone()))?;
        registry.register(Box::new(breaker_state.clone()))?;
        registry.register(Box::new(breaker_transitions.clone()))?;
        registry.register(Box::new(ejections.clone()))?;
        registry.register(Box::new(hold_outs.clone()))?;
        registry.register(Box::new(malformed.clone()))?;
        registry.register(Box::new(mirror_requests.clone()))?;
        registry.register(Box::new(policy_version.clone()))?;
        registry.register(Box::new(policy_reloads.clone()))?;
        registry.register(Box::new(build_info))?;
        let traffic = TrafficVecs::new(&registry)?;
        let listeners = ListenerVecs::new(&registry)?;
        let telemetry = TelemetryMetrics::new(&registry)?;
        let process = ProcessGauges::new(&registry)?;
        let capture = CaptureMetrics::new(&registry)?;
        let authz = AuthzMetrics::new(&registry)?;
        let routing = crate::telemetry::routing::RoutingMetrics::new(&registry)?;
        Ok(Self {
            capture,
            authz,
            routing,
            live: Arc::default(),
            endpoint_cap: DEFAULT_ENDPOINT_CAP,
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
            retried_requests,
            rate_limit,
            breaker_state,
            breaker_transitions,
            ejections,
            hold_outs,
            malformed,
            mirror_requests,
            policy_version,
            policy_reloads: PolicyReloadMetrics {
                ok: policy_reloads.with_label_values(&["ok"]),
                error: policy_reloads.with_label_values(&["error"]),
            },
        })
    }

    /// Labels at most `cap` endpoints of one service by address at once in the connection
    /// metrics; the others are counted as `endpoint="other"` (0: all of them).
    pub fn with_endpoint_cap(mut self, cap: usize) -> Self {
        self.endpoint_cap = cap;
        self
    }

    /// The counters of a route's mirror to `service`, one per result, resolved once per load
    /// and removed with the route's series.
    pub fn mirror(
        &self,
        service: &str,
        route: &crate::telemetry::routing::RouteSeries,
    ) -> MirrorCounters {
        let counter =
            |result| route.counter(&self.mirror_requests, &[service, &route.name, result]);
        MirrorCounters {
            sent: counter("sent"),
            failed: counter("failed"),
            timeout: counter("timeout"),
            skipped_body: counter("skipped_body"),
            overflow: counter("overflow"),
        }
    }

    /// Registers a collector owned by another module (mesh TLS) in the one registry.
    pub fn register(
        &self,
        collector: Box<dyn prometheus::core::Collector>,
    ) -> Result<(), MetricsError> {
        Ok(self.registry.register(collector)?)
    }

    /// Handles for requests in `direction` to `service` through `route`: the live ones if a
    /// snapshot already uses them, else new ones.
    pub fn route(&self, direction: &str, service: &str, route: &str) -> Arc<RouteMetrics> {
        let key: RouteKey = (direction.into(), service.into(), route.into());
        let mut live = self
            .live
            .routes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(handles) = live.get(&key).and_then(Weak::upgrade) {
            return handles;
        }
        let mut handles = self.route_handles(direction, service, route);
        handles.owner = Some(RouteOwner {
            metrics: self.clone(),
            key: key.clone(),
        });
        let handles = Arc::new(handles);
        live.insert(key, Arc::downgrade(&handles));
        handles
    }

    fn route_handles(&self, direction: &str, service: &str, route: &str) -> RouteMetrics {
        // The upstream's series from the start, as every route has them; the proxy's own when
        // first seen.
        let duration: [OnceLock<Histogram>; FLAGS] = Default::default();
        let upstream = ResponseFlag::Upstream;
        let _ = duration[upstream.index()].set(self.duration.with_label_values(&[
            direction,
            service,
            route,
            upstream.code(),
        ]));
        RouteMetrics {
            owner: None,
            requests: RequestCounters {
                family: self.requests.clone(),
                labels: RouteLabels {
                    direction: direction.into(),
                    service: service.into(),
                    route: route.into(),
                },
                by_method: Default::default(),
                proxy_made: Default::default(),
                uncached: Mutex::default(),
            },
            duration,
            duration_family: self.duration.clone(),
            retries: RetryMetrics {
                attempts: self.retries.with_label_values(&[service, route]),
                success: self
                    .retried_requests
                    .with_label_values(&[service, route, "success"]),
                exhausted: self
                    .retried_requests
                    .with_label_values(&[service, route, "exhausted"]),
                budget_denied: self.retried_requests.with_label_values(&[
                    service,
                    route,
                    "budget-denied",
                ]),
                not_retryable: self.retried_requests.with_label_values(&[
                    service,
                    route,
                    "not-retryable",
                ]),
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

    /// The handles of `service`'s own series: the live ones if a snapshot already uses them,
    /// else new ones.
    pub fn service(&self, service: &str) -> Arc<ServiceMetrics> {
        let mut live = self
            .live
            .services
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(handles) = live.get(service).and_then(Weak::upgrade) {
            return handles;
        }
        let name: Arc<str> = Arc::from(service);
        let handles = Arc::new(ServiceMetrics {
            owner: Some((self.clone(), Arc::clone(&name))),
            hold_outs: self.hold_outs.with_label_values(&[service]),
        });
        live.insert(name, Arc::downgrade(&handles));
        handles
    }

    /// Counts a malformed request from `direction` answered `code` (the error path only: the
    /// series is looked up each time).
    pub fn malformed(&self, direction: &str, code: http::StatusCode) {
        self.malformed
            .with_label_values(&[direction, code.as_str()])
            .inc();
    }

    /// Handles for the circuit breaker of `service`; they keep the service's series while the
    /// breaker lives.
    pub fn breaker(&self, service: &str) -> BreakerMetrics {
        // The service's handles first: made after them, the series cannot be removed by the
        // last handle of an earlier version of the service going at the same time.
        let series = self.service(service);
        BreakerMetrics::new(
            STATE_LABELS.map(|s| self.breaker_state.with_label_values(&[service, s])),
            STATE_LABELS.map(|s| self.breaker_transitions.with_label_values(&[service, s])),
        )
        .holding(series)
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

    /// Handles for connections to `endpoint` of `service`: the live ones if the endpoint has
    /// them already; else new ones, labelled `endpoint` while the service has fewer than the
    /// cap labelled, `other` past it. Called when an endpoint joins a service (a reload, a DNS
    /// answer), never per request.
    pub fn connections(&self, service: &str, endpoint: &str) -> Arc<ConnectionMetrics> {
        let mut live = self
            .live
            .endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let known = live
            .get(service)
            .and_then(|endpoints| endpoints.get(endpoint));
        if let Some(handles) = known.and_then(Weak::upgrade) {
            return handles;
        }
        let endpoints = live.entry(Arc::from(service)).or_default();
        let labelled = endpoints
            .iter()
            .filter(|(label, h)| &***label != OTHER_ENDPOINTS && h.strong_count() > 0)
            .count();
        let label = if labelled < self.endpoint_cap {
            endpoint
        } else {
            OTHER_ENDPOINTS
        };
        if let Some(handles) = endpoints.get(label).and_then(Weak::upgrade) {
            return handles;
        }
        let labels = [service, label];
        let label: Arc<str> = Arc::from(label);
        let handles = Arc::new(ConnectionMetrics {
            opened: self.connections_opened.with_label_values(&labels),
            closed: self.traffic.connections_closed.with_label_values(&labels),
            active: self.connections_active.with_label_values(&labels),
            owner: Some((self.clone(), Arc::from(service), Arc::clone(&label))),
        });
        endpoints.insert(label, Arc::downgrade(&handles));
        handles
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use ResponseFlag::{ConnectFailure, DownstreamCancelled, FaultInjected, Upstream};

    #[test]
    fn proc_stat_is_read_past_a_command_name_with_spaces_and_parentheses() {
        // Fields 14 and 15 (utime, stime) are 250 and 50 ticks, field 22 (starttime) 12345.
        let stat = "4242 (we(ird) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 \
                    5 0 12345 1000000 500 18446744073709551615";
        assert_eq!(parse_proc_stat(stat), Some((3.0, 123.45)));
        assert_eq!(parse_proc_stat("4242 (short) S 1"), None);
        assert_eq!(
            parse_boot_time("cpu  1 2 3\nintr 5\nbtime 1700000000\nprocesses 9\n"),
            Some(1_700_000_000.0)
        );
    }

    #[test]
    fn a_routes_series_go_with_its_last_handle_and_stay_while_one_is_alive() {
        let metrics = Metrics::new("w").unwrap();
        let text = || String::from_utf8(metrics.encode()).unwrap();
        let first = metrics.route("outbound", "gone", "r");
        first.record(&http::Method::GET, http::StatusCode::OK, Upstream, 0.01);
        first.record(
            &http::Method::GET,
            http::StatusCode::BAD_GATEWAY,
            ConnectFailure,
            0.01,
        );
        first.count_ended(
            &http::Method::POST,
            http::StatusCode::OK,
            DownstreamCancelled,
        );
        // A second snapshot with the same route shares the handles.
        let second = metrics.route("outbound", "gone", "r");
        assert!(Arc::ptr_eq(&first, &second));
        drop(first);
        assert!(text().contains("service=\"gone\""));
        drop(second);
        assert!(!text().contains("service=\"gone\""), "{}", text());
        // Back in a later policy: new series from zero.
        let again = metrics.route("outbound", "gone", "r");
        again.record(&http::Method::GET, http::StatusCode::OK, Upstream, 0.01);
        assert!(text().contains("outrider_requests_total{code=\"200\",direction=\"outbound\",flags=\"-\",method=\"GET\",route=\"r\",service=\"gone\",status_class=\"2xx\"} 1"));
        assert!(!text().contains("flags=\"UF\""), "{}", text());
    }

    #[test]
    fn a_proxy_made_response_and_the_upstreams_with_the_same_code_are_apart() {
        let metrics = Metrics::new("w").unwrap();
        let route = metrics.route("outbound", "svc", "r");
        let get = http::Method::GET;
        route.count_ended(&get, http::StatusCode::BAD_GATEWAY, Upstream);
        for _ in 0..2 {
            route.count_ended(&get, http::StatusCode::BAD_GATEWAY, ConnectFailure);
        }
        route.count_ended(&get, http::StatusCode::GATEWAY_TIMEOUT, ConnectFailure);
        route.count_ended(&get, http::StatusCode::OK, DownstreamCancelled);
        // More statuses under one flag than it has slots: still each in its own series.
        for code in [500, 501, 502, 503, 504, 418] {
            let status = http::StatusCode::from_u16(code).unwrap();
            route.count_ended(&get, status, FaultInjected);
            route.count_ended(&get, status, FaultInjected);
        }
        let text = String::from_utf8(metrics.encode()).unwrap();
        let series = |code: &str, flag: &str, class: &str| {
            format!("outrider_requests_total{{code=\"{code}\",direction=\"outbound\",flags=\"{flag}\",method=\"GET\",route=\"r\",service=\"svc\",status_class=\"{class}\"}}")
        };
        assert!(
            text.contains(&format!("{} 1\n", series("502", "-", "5xx"))),
            "{text}"
        );
        assert!(
            text.contains(&format!("{} 2\n", series("502", "UF", "5xx"))),
            "{text}"
        );
        assert!(
            text.contains(&format!("{} 1\n", series("504", "UF", "5xx"))),
            "{text}"
        );
        assert!(
            text.contains(&format!("{} 1\n", series("cancelled", "DC", "cancelled"))),
            "{text}"
        );
        for (code, class) in [("500", "5xx"), ("503", "5xx"), ("418", "4xx")] {
            assert!(
                text.contains(&format!("{} 2\n", series(code, "FI", class))),
                "{text}"
            );
        }
        // Gone with the route, those past the slots too.
        drop(route);
        let text = String::from_utf8(metrics.encode()).unwrap();
        assert!(!text.contains("route=\"r\""), "{text}");
    }

    #[test]
    fn every_flag_has_its_index_and_a_distinct_code() {
        let codes: std::collections::HashSet<&str> =
            ResponseFlag::ALL.iter().map(|f| f.code()).collect();
        assert_eq!(codes.len(), FLAGS);
        for (i, flag) in ResponseFlag::ALL.iter().enumerate() {
            assert_eq!(flag.index(), i);
        }
    }

    #[test]
    fn a_services_series_go_with_its_last_handle() {
        let metrics = Metrics::new("w").unwrap();
        let text = || String::from_utf8(metrics.encode()).unwrap();
        let service = metrics.service("gone");
        let breaker = metrics.breaker("gone");
        service.hold_outs.inc();
        drop(service);
        assert!(text().contains("outrider_endpoint_unavailable_total{service=\"gone\"} 1"));
        assert!(text().contains("outrider_circuit_breaker_state{service=\"gone\""));
        // The breaker outlived the upstream (a response still streaming): the series stay.
        drop(breaker);
        assert!(!text().contains("service=\"gone\""), "{}", text());
    }

    #[test]
    fn endpoints_past_the_cap_share_one_series_and_a_gone_ones_slot_is_free_again() {
        let metrics = Metrics::new("w").unwrap().with_endpoint_cap(2);
        let text = || String::from_utf8(metrics.encode()).unwrap();
        let opened = |endpoint: &str| {
            format!("outrider_upstream_connections_opened_total{{endpoint=\"{endpoint}\",service=\"svc\"}}")
        };
        let a = metrics.connections("svc", "10.0.0.1:80");
        let b = metrics.connections("svc", "10.0.0.2:80");
        let c = metrics.connections("svc", "10.0.0.3:80");
        let d = metrics.connections("svc", "10.0.0.4:80");
        assert!(Arc::ptr_eq(&c, &d), "past the cap: one `other` handle");
        let other = metrics.connections("other-service", "10.0.0.9:80");
        drop((c.opened(), d.opened(), a.opened(), other));
        assert!(
            text().contains(&format!("{} 2\n", opened("other"))),
            "{}",
            text()
        );
        assert!(text().contains(&format!("{} 1\n", opened("10.0.0.1:80"))));
        assert!(!text().contains("10.0.0.3:80"));
        // An open connection keeps its endpoint's series after the endpoint left.
        let connection = a.opened();
        drop(a);
        assert!(text().contains(&opened("10.0.0.1:80")));
        drop(connection);
        assert!(!text().contains("10.0.0.1:80"), "{}", text());
        // Its slot is free: a new endpoint gets its own label again.
        let e = metrics.connections("svc", "10.0.0.5:80");
        drop(e.opened());
        assert!(text().contains(&opened("10.0.0.5:80")));
        drop((b, c, d, e));
        assert!(!text().contains("service=\"svc\""), "{}", text());
    }

    #[test]
    fn a_long_stream_lands_in_a_bucket_below_inf() {
        let metrics = Metrics::new("w").unwrap();
        let route = metrics.route("outbound", "svc", "r");
        route.traffic.stream_duration.observe(45.0);
        let text = String::from_utf8(metrics.encode()).unwrap();
        let bucket = |le: &str| {
            format!("outrider_response_stream_duration_seconds_bucket{{direction=\"outbound\",route=\"r\",service=\"svc\",le=\"{le}\"}}")
        };
        assert!(text.contains(&format!("{} 0\n", bucket("30"))), "{text}");
        assert!(text.contains(&format!("{} 1\n", bucket("60"))), "{text}");
        assert!(text.contains(&format!("{} 1\n", bucket("300"))), "{text}");
    }
}
