//! An upstream service at run time: its endpoints (static or re-resolved from DNS), one
//! connection pool per endpoint, and the load balancer that picks an endpoint per request.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use outrider_config::{LoadBalancing, OutlierDetection, Protocol};

use crate::connect::{EndpointConnector, PendingLimit};
use crate::errors::ProxyError;
use crate::metrics::Metrics;
use crate::policy::breaker::Outcome;
use crate::policy::outlier::{EndpointHealth, OutlierDetector};
use crate::pool::EndpointPool;
use crate::tls::UpstreamTls;

/// How often a `dns:` service is resolved again.
const DNS_REFRESH: Duration = Duration::from_secs(5);
/// One address of a service, with its pool and load.
pub struct Endpoint {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its connections.
    pub pool: Arc<EndpointPool>,
    in_flight: AtomicUsize,
    /// Its record for outlier detection.
    health: EndpointHealth,
}

impl Endpoint {
    /// Marks a request in flight until the guard drops (for least-request balancing).
    pub fn start_request(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(&self.in_flight)
    }
}

/// A request counted against an endpoint's load.
pub struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Settings an [`Upstream`] is built from.
pub struct UpstreamSpec {
    /// Service name (also the metrics label).
    pub name: Arc<str>,
    /// Protocol spoken to the endpoints.
    pub protocol: Protocol,
    /// Endpoint selection.
    pub balancing: LoadBalancing,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Ejection of failing endpoints, when configured.
    pub outlier: Option<OutlierDetection>,
    /// Bound on connections being opened at once, service-wide.
    pub max_pending: Option<u32>,
    /// Mesh mTLS to the endpoints, when the policy asks for it.
    pub tls: Option<UpstreamTls>,
}

/// A service's endpoints and balancer.
pub struct Upstream {
    /// Settings it was built from.
    pub spec: UpstreamSpec,
    endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
    next: AtomicUsize,
    metrics: Metrics,
    outlier: Option<OutlierDetector>,
    pending: Option<PendingLimit>,
}

impl Upstream {
    /// An upstream with the given static endpoints.
    pub fn new(spec: UpstreamSpec, addrs: &[SocketAddr], metrics: &Metrics) -> Arc<Self> {
        let outlier = spec
            .outlier
            .as_ref()
            .map(|config| OutlierDetector::new(config, Some(metrics.ejections(&spec.name))));
        let upstream = Arc::new(Self {
            endpoints: ArcSwap::from_pointee(Vec::new()),
            next: AtomicUsize::new(0),
            metrics: metrics.clone(),
            outlier,
            pending: spec
                .max_pending
                .map(|max| PendingLimit::new(spec.name.clone(), max)),
            spec,
        });
        upstream.set_endpoints(addrs);
        upstream
    }

    /// Replaces the endpoint set; endpoints that stay keep their pools and load counters.
    pub fn set_endpoints(&self, addrs: &[SocketAddr]) {
        let current = self.endpoints.load();
        let next: Vec<Arc<Endpoint>> = addrs
            .iter()
            .map(|addr| {
                current
                    .iter()
                    .find(|e| e.addr == *addr)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(self.new_endpoint(*addr)))
            })
            .collect();
        self.endpoints.store(Arc::new(next));
    }

    fn new_endpoint(&self, addr: SocketAddr) -> Endpoint {
        let connector = EndpointConnector::new(
            addr,
            self.spec.connect_timeout,
            self.metrics.connections(&self.spec.name, &addr.to_string()),
            self.pending.clone(),
        )
        .with_tls(self.spec.tls.clone());
        Endpoint {
            addr,
            pool: EndpointPool::new(connector, self.spec.protocol),
            in_flight: AtomicUsize::new(0),
            health: EndpointHealth::default(),
        }
    }

    /// The addresses currently in the set.
    pub fn endpoint_addrs(&self) -> Vec<SocketAddr> {
        self.endpoints.load().iter().map(|e| e.addr).collect()
    }

    /// Picks the endpoint for one attempt; a retry passes the endpoint that just failed, and
    /// gets a different one whenever there is one. Ejected endpoints are skipped; when every
    /// endpoint is ejected the request fails with 503.
    pub fn pick(&self, avoid: Option<SocketAddr>) -> Result<Arc<Endpoint>, ProxyError> {
        let endpoints = self.endpoints.load();
        let n = endpoints.len();
        if n == 0 {
            return Err(ProxyError::NoEndpoints(self.spec.name.clone()));
        }
        let now = self.outlier.as_ref().map(OutlierDetector::now);
        let usable = |i: usize| match (&self.outlier, now) {
            (Some(outlier), Some(now)) => outlier.available(&endpoints[i].health, now),
            _ => true,
        };
        let avoided = |i: usize| n > 1 && avoid == Some(endpoints[i].addr);
        let first = match (n, self.spec.balancing) {
            (1, _) => 0,
            (_, LoadBalancing::RoundRobin) => {
                // A skipped endpoint uses up its turn, so the others share its traffic evenly
                // rather than all of it going to the next one in line.
                let mut i = self.next.fetch_add(1, Ordering::Relaxed) % n;
                for _ in 1..n {
                    if usable(i) && !avoided(i) {
                        break;
                    }
                    i = self.next.fetch_add(1, Ordering::Relaxed) % n;
                }
                i
            }
            (_, LoadBalancing::LeastRequest) => {
                // Power of two choices: two distinct random endpoints, the less loaded wins.
                let a = fastrand::usize(..n);
                let b = (a + 1 + fastrand::usize(..n - 1)) % n;
                let load = |i: usize| endpoints[i].in_flight.load(Ordering::Relaxed);
                match (usable(a), usable(b)) {
                    (true, true) if load(b) < load(a) => b,
                    (false, true) => b,
                    _ => a,
                }
            }
        };
        // From the balancer's choice on, the first usable endpoint that is not the one to avoid;
        // failing that, the avoided one if it is usable.
        let index = (0..n)
            .map(|k| (first + k) % n)
            .find(|&i| usable(i) && !avoided(i))
            .or_else(|| (0..n).find(|&i| usable(i)))
            .ok_or_else(|| ProxyError::AllEjected(self.spec.name.clone()))?;
        Ok(Arc::clone(&endpoints[index]))
    }

    /// Whether outcomes should be reported (outlier detection is on).
    pub fn detects_outliers(&self) -> bool {
        self.outlier.is_some()
    }

    /// Records an attempt's outcome on `endpoint`; may eject it.
    pub fn report(&self, endpoint: &Endpoint, outcome: Outcome) {
        let Some(outlier) = &self.outlier else {
            return;
        };
        let endpoints = self.endpoints.load();
        let all = endpoints.iter().map(|e| &e.health);
        if let Some(length) = outlier.record(&endpoint.health, outcome, all) {
            tracing::info!(service = %self.spec.name, endpoint = %endpoint.addr, ejected_for = ?length, "endpoint ejected");
        }
    }

    /// Resolves `target` (host:port) now and every few seconds while the upstream lives.
    /// A failed lookup keeps the previous endpoints: a DNS blip must not empty a service.
    pub fn spawn_dns_refresh(self: &Arc<Self>, target: String) {
        let weak: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let result = tokio::net::lookup_host(target.as_str()).await;
                let Some(upstream) = weak.upgrade() else {
                    return;
                };
                match result {
                    Ok(addrs) => {
                        let mut addrs: Vec<SocketAddr> = addrs.collect();
                        addrs.sort();
                        addrs.dedup();
                        if addrs != upstream.endpoint_addrs() {
                            tracing::info!(service = %upstream.spec.name, endpoints = ?addrs, "dns endpoints changed");
                            upstream.set_endpoints(&addrs);
                        }
                    }
                    Err(error) => {
                        tracing::warn!(service = %upstream.spec.name, %target, %error, "dns lookup failed; keeping previous endpoints");
                    }
                }
                drop(upstream);
                tokio::time::sleep(DNS_REFRESH).await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use outrider_config::Duration as ConfigDuration;

    use super::*;

    fn upstream(balancing: LoadBalancing, addrs: &[SocketAddr]) -> Arc<Upstream> {
        let metrics = Metrics::new("test").expect("metrics");
        let spec = UpstreamSpec {
            name: Arc::from("svc"),
            protocol: Protocol::Http1,
            balancing,
            connect_timeout: Duration::from_secs(1),
            outlier: Some(OutlierDetection {
                consecutive_failures: 1,
                base_ejection: ConfigDuration::from_secs(60),
                max_ejection: ConfigDuration::from_secs(60),
                max_ejected_percent: 100,
            }),
            max_pending: None,
            tls: None,
        };
        Upstream::new(spec, addrs, &metrics)
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[tokio::test(start_paused = true)]
    async fn both_balancers_skip_ejected_endpoints_and_fail_when_all_are_out() {
        let addrs = [addr(1), addr(2), addr(3)];
        for balancing in [LoadBalancing::RoundRobin, LoadBalancing::LeastRequest] {
            let u = upstream(balancing, &addrs);
            let first = u.pick(None).expect("pick");
            u.report(&first, Outcome::Failure);
            for _ in 0..100 {
                let picked = u.pick(None).expect("pick");
                assert_ne!(
                    picked.addr, first.addr,
                    "{balancing:?} picked an ejected endpoint"
                );
                // Avoiding the only other healthy endpoint still never yields the ejected one.
                let again = u.pick(Some(picked.addr)).expect("pick");
                assert_ne!(again.addr, first.addr);
            }
            for a in addrs {
                if let Some(e) = u.endpoints.load().iter().find(|e| e.addr == a) {
                    u.report(e, Outcome::Failure);
                }
            }
            assert!(matches!(u.pick(None), Err(ProxyError::AllEjected(_))));
            // Ejections end: traffic comes back.
            tokio::time::advance(Duration::from_secs(60)).await;
            assert!(u.pick(None).is_ok());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn round_robin_shares_an_ejected_endpoints_turns_evenly() {
        let addrs = [addr(1), addr(2), addr(3)];
        let u = upstream(LoadBalancing::RoundRobin, &addrs);
        if let Some(e) = u.endpoints.load().first() {
            u.report(e, Outcome::Failure);
        }
        let mut counts = std::collections::HashMap::new();
        for _ in 0..300 {
            *counts.entry(u.pick(None).expect("pick").addr).or_insert(0) += 1;
        }
        assert_eq!(counts.get(&addr(1)), None);
        assert_eq!(counts.get(&addr(2)), Some(&150));
        assert_eq!(counts.get(&addr(3)), Some(&150));
    }
}
