//! An upstream service at run time: its endpoints (static or re-resolved from DNS), one
//! connection pool per endpoint, and the load balancer that picks an endpoint per request.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use outrider_config::{LoadBalancing, OutlierDetection, Protocol};

use crate::core::errors::ProxyError;
use crate::io::connect::{EndpointConnector, PendingLimit};
use crate::io::pool::EndpointPool;
use crate::io::tls::UpstreamTls;
use crate::policy::breaker::Outcome;
use crate::policy::hash::{HashKey, Maglev};
use crate::policy::holdout::{HoldOut, HoldOuts};
use crate::policy::outlier::{EndpointHealth, OutlierDetector};
use crate::telemetry::metrics::{Metrics, ServiceMetrics};

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
    /// Its connect record: held out of the balancer after a failed connect.
    hold_out: Arc<HoldOut>,
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

/// The endpoints in force and, for a hashing balancer, their lookup table: one value behind one
/// `ArcSwap`, so a request never sees a table of another endpoint set. Derefs to the endpoints.
#[derive(Default)]
struct EndpointSet {
    endpoints: Vec<Arc<Endpoint>>,
    /// Built with the set (a reload or a DNS change), never per request; ejections and
    /// hold-outs do not rebuild it: `pick` skips such endpoints (see `pick_hashed`).
    table: Option<Maglev>,
}

impl EndpointSet {
    fn new(endpoints: Vec<Arc<Endpoint>>, hashed: bool) -> Self {
        let table = hashed
            .then(|| {
                // Named by address, so every proxy with the same endpoints builds the same table.
                let names: Vec<String> = endpoints.iter().map(|e| e.addr.to_string()).collect();
                Maglev::build(&names)
            })
            .flatten();
        Self { endpoints, table }
    }
}

impl std::ops::Deref for EndpointSet {
    type Target = [Arc<Endpoint>];

    fn deref(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
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
    endpoints: ArcSwap<EndpointSet>,
    /// Where a hashing balancer reads a request's key.
    hash_key: Option<HashKey>,
    next: AtomicUsize,
    metrics: Metrics,
    /// The service's own series (ejections, hold-outs), kept while the upstream lives; none
    /// for a captured destination's.
    _series: Option<Arc<ServiceMetrics>>,
    outlier: Option<OutlierDetector>,
    hold_outs: Arc<HoldOuts>,
    pending: Option<PendingLimit>,
    /// The `endpoint` label of its connection metrics, when not the address (passthrough
    /// destinations are not labelled by raw address).
    endpoint_label: Option<&'static str>,
}

impl Upstream {
    /// An upstream with the given static endpoints. When it replaces `previous` (the same
    /// service before a reload changed its settings), endpoints that stay keep their
    /// hold-outs: a dead endpoint stays out of the rotation across the reload.
    pub fn new(
        spec: UpstreamSpec,
        addrs: &[SocketAddr],
        metrics: &Metrics,
        previous: Option<&Upstream>,
    ) -> Arc<Self> {
        let series = metrics.service(&spec.name);
        let outlier = spec
            .outlier
            .as_ref()
            .map(|config| OutlierDetector::new(config, series.ejections()));
        let hold_outs = match previous {
            Some(previous) => Arc::clone(&previous.hold_outs),
            None => HoldOuts::new(
                spec.name.clone(),
                spec.connect_timeout,
                Some(series.hold_outs.clone()),
            ),
        };
        let upstream = Arc::new(Self {
            endpoints: ArcSwap::from_pointee(EndpointSet::default()),
            hash_key: hash_key(&spec.balancing),
            next: AtomicUsize::new(0),
            metrics: metrics.clone(),
            _series: Some(series),
            outlier,
            hold_outs,
            pending: spec
                .max_pending
                .map(|max| PendingLimit::new(spec.name.clone(), max)),
            endpoint_label: None,
            spec,
        });
        let before = previous.map(|p| p.endpoints.load_full());
        let addrs: Vec<Arc<Endpoint>> = addrs
            .iter()
            .map(|addr| {
                let kept = before
                    .iter()
                    .flat_map(|endpoints| endpoints.iter())
                    .find(|e| e.addr == *addr)
                    .map(|e| Arc::clone(&e.hold_out));
                Arc::new(upstream.new_endpoint(*addr, kept))
            })
            .collect();
        let hashed = upstream.hash_key.is_some();
        upstream
            .endpoints
            .store(Arc::new(EndpointSet::new(addrs, hashed)));
        upstream
    }

    /// An upstream of the one endpoint `addr`, whose connections are counted with the endpoint
    /// label `label` (a captured connection's original destination: any address at all).
    pub fn single(
        spec: UpstreamSpec,
        addr: SocketAddr,
        label: &'static str,
        metrics: &Metrics,
    ) -> Arc<Self> {
        let hold_outs = HoldOuts::new(spec.name.clone(), spec.connect_timeout, None);
        let mut upstream = Self {
            endpoints: ArcSwap::from_pointee(EndpointSet::default()),
            hash_key: hash_key(&spec.balancing),
            next: AtomicUsize::new(0),
            metrics: metrics.clone(),
            _series: None,
            outlier: None,
            hold_outs,
            pending: None,
            endpoint_label: Some(label),
            spec,
        };
        let endpoint = Arc::new(upstream.new_endpoint(addr, None));
        upstream.endpoints = ArcSwap::from_pointee(EndpointSet::new(vec![endpoint], false));
        Arc::new(upstream)
    }

    /// Whether `addr` is one of the endpoints in the set now (a `dns:` service's resolved
    /// addresses change between reloads).
    pub fn has_endpoint(&self, addr: SocketAddr) -> bool {
        self.endpoints.load().iter().any(|e| e.addr == addr)
    }

    /// Replaces the endpoint set; endpoints that stay keep their pools, load counters and
    /// health and connect records.
    pub fn set_endpoints(&self, addrs: &[SocketAddr]) {
        let current = self.endpoints.load();
        let next: Vec<Arc<Endpoint>> = addrs
            .iter()
            .map(|addr| {
                current
                    .iter()
                    .find(|e| e.addr == *addr)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(self.new_endpoint(*addr, None)))
            })
            .collect();
        let hashed = self.hash_key.is_some();
        self.endpoints
            .store(Arc::new(EndpointSet::new(next, hashed)));
    }

    fn new_endpoint(&self, addr: SocketAddr, hold_out: Option<Arc<HoldOut>>) -> Endpoint {
        let hold_out = hold_out.unwrap_or_else(|| self.hold_outs.endpoint(addr));
        let connector = EndpointConnector::new(
            addr,
            self.spec.connect_timeout,
            match self.endpoint_label {
                Some(label) => self.metrics.connections(&self.spec.name, label),
                None => self.metrics.connections(&self.spec.name, &addr.to_string()),
            },
            self.pending.clone(),
        )
        .with_tls(self.spec.tls.clone())
        .with_hold_out(Arc::clone(&hold_out));
        Endpoint {
            addr,
            pool: EndpointPool::new(connector, self.spec.protocol),
            in_flight: AtomicUsize::new(0),
            health: EndpointHealth::default(),
            hold_out,
        }
    }

    /// The addresses currently in the set.
    pub fn endpoint_addrs(&self) -> Vec<SocketAddr> {
        self.endpoints.load().iter().map(|e| e.addr).collect()
    }

    /// Picks the endpoint for one attempt; a retry passes the endpoint that just failed, and
    /// gets a different one whenever there is one. Ejected endpoints and endpoints held out
    /// after a failed connect are skipped; when every endpoint is ejected the request fails
    /// with 503 (`AllEjected`). When every endpoint that is not ejected is held out, a first
    /// attempt goes to the one whose hold-out ends first, while a retry gets `AllUnreachable`
    /// (it never goes where a connect just failed).
    pub fn pick(&self, avoid: Option<SocketAddr>) -> Result<Arc<Endpoint>, ProxyError> {
        self.pick_for(None, avoid)
    }

    /// The hash of a request's key ([`Self::pick_for`]), when the service balances by one and
    /// the request carries it. Reads the header in place.
    pub fn affinity(&self, headers: &http::HeaderMap) -> Option<u64> {
        self.hash_key.as_ref()?.of(headers)
    }

    /// [`Self::pick`] for a request whose key hashes to `affinity` (see [`Self::affinity`]):
    /// the endpoint its slot of the lookup table names. When that endpoint cannot take it
    /// (ejected, held out, or the one a retry avoids), the next slots of the table are tried
    /// in order, as Envoy does, so the key lands on the same other endpoint every time and an
    /// unusable endpoint's keys spread over the rest; they come back when it does. Without an
    /// affinity, the request is balanced round robin.
    pub fn pick_for(
        &self,
        affinity: Option<u64>,
        avoid: Option<SocketAddr>,
    ) -> Result<Arc<Endpoint>, ProxyError> {
        let endpoints = self.endpoints.load();
        let n = endpoints.len();
        if n == 0 {
            return Err(ProxyError::NoEndpoints(self.spec.name.clone()));
        }
        let now = self.outlier.as_ref().map(OutlierDetector::now);
        let not_ejected = |i: usize| match (&self.outlier, now) {
            (Some(outlier), Some(now)) => outlier.available(&endpoints[i].health, now),
            _ => true,
        };
        // A clock reading only while some endpoint is held out.
        let held_now = self.hold_outs.now_if_any();
        let usable = |i: usize| {
            not_ejected(i) && held_now.is_none_or(|now| !endpoints[i].hold_out.is_held_out(now))
        };
        let avoided = |i: usize| n > 1 && avoid == Some(endpoints[i].addr);
        let hashed = endpoints.table.as_ref().zip(affinity);
        let first = match (n, &self.spec.balancing, hashed) {
            (1, _, _) => 0,
            (_, _, Some((table, hash))) => {
                // Past the probed slots (most endpoints out), the index order below takes
                // over from the key's own endpoint: still the same answer for the same key.
                let mut candidates = table.candidates(hash);
                let own = table.lookup(hash);
                candidates
                    .find(|&i| i < n && usable(i) && !avoided(i))
                    .unwrap_or(own % n)
            }
            // A hashing balancer's requests without a key go round robin.
            (_, LoadBalancing::RoundRobin | LoadBalancing::Hash(_), None) => {
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
            (_, LoadBalancing::LeastRequest, None) => {
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
            .or_else(|| (0..n).find(|&i| usable(i)));
        if let Some(index) = index {
            if endpoints[index].hold_out.try_probe() {
                return Ok(Arc::clone(&endpoints[index]));
            }
            // Another request is probing it after its hold-out: any other usable endpoint,
            // else this one after all.
            let other = (1..n)
                .map(|k| (index + k) % n)
                .find(|&i| usable(i) && !avoided(i));
            return Ok(Arc::clone(&endpoints[other.unwrap_or(index)]));
        }
        // Every endpoint is ejected or held out. Held out only means a connect failed lately:
        // like Envoy's panic threshold, failing open beats answering 503 to everyone when the
        // endpoints may be back (every pod restarted, a network blip). The one whose hold-out
        // ends first is the likeliest to be back, and if it is not, the caller gets the connect
        // error it would have got anyway. A retry does not fail open: it would only repeat a
        // connect that just failed.
        let first_back = (0..n)
            .filter(|&i| not_ejected(i))
            .min_by_key(|&i| endpoints[i].hold_out.until());
        let Some(index) = first_back else {
            return Err(ProxyError::AllEjected(self.spec.name.clone()));
        };
        if avoid.is_some() {
            return Err(ProxyError::AllUnreachable(self.spec.name.clone()));
        }
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
            tracing::info!(service = %self.spec.name, endpoint = %endpoint.addr, ejected_for = %outrider_config::Duration(length), "endpoint ejected");
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
                            tracing::info!(service = %upstream.spec.name, endpoints = %crate::core::DisplayList(&addrs), "dns endpoints changed");
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

/// The key a hashing balancer reads; `None` for the others.
fn hash_key(balancing: &LoadBalancing) -> Option<HashKey> {
    match balancing {
        LoadBalancing::Hash(on) => HashKey::compile(on),
        LoadBalancing::RoundRobin | LoadBalancing::LeastRequest => None,
    }
}

#[cfg(test)]
mod tests {
    use outrider_config::Duration as ConfigDuration;

    use super::*;

    fn spec(balancing: LoadBalancing, outlier: Option<OutlierDetection>) -> UpstreamSpec {
        UpstreamSpec {
            name: Arc::from("svc"),
            protocol: Protocol::Http1,
            balancing,
            connect_timeout: Duration::from_secs(1),
            outlier,
            max_pending: None,
            tls: None,
        }
    }

    /// With outlier detection that ejects at the first failure.
    fn upstream(balancing: LoadBalancing, addrs: &[SocketAddr]) -> Arc<Upstream> {
        let metrics = Metrics::new("test").expect("metrics");
        let outlier = OutlierDetection {
            consecutive_failures: 1,
            base_ejection: ConfigDuration::from_secs(60),
            max_ejection: ConfigDuration::from_secs(60),
            max_ejected_percent: 100,
        };
        Upstream::new(spec(balancing, Some(outlier)), addrs, &metrics, None)
    }

    /// Without any policy.
    fn plain(balancing: LoadBalancing, addrs: &[SocketAddr]) -> Arc<Upstream> {
        let metrics = Metrics::new("test").expect("metrics");
        Upstream::new(spec(balancing, None), addrs, &metrics, None)
    }

    fn endpoint(u: &Upstream, addr: SocketAddr) -> Arc<Endpoint> {
        let endpoints = u.endpoints.load();
        let found = endpoints.iter().find(|e| e.addr == addr);
        Arc::clone(found.expect("endpoint"))
    }

    /// Holds `addr` out as a failed connect would; returns for how long.
    fn refuse(u: &Upstream, addr: SocketAddr) -> Duration {
        let e = endpoint(u, addr);
        e.hold_out.connect_failed(&"refused").expect("held out")
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[tokio::test(start_paused = true)]
    async fn both_balancers_skip_ejected_endpoints_and_fail_when_all_are_out() {
        let addrs = [addr(1), addr(2), addr(3)];
        for balancing in [LoadBalancing::RoundRobin, LoadBalancing::LeastRequest] {
            let u = upstream(balancing.clone(), &addrs);
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

    const BALANCERS: [LoadBalancing; 2] = [LoadBalancing::RoundRobin, LoadBalancing::LeastRequest];

    #[tokio::test(start_paused = true)]
    async fn both_balancers_skip_held_out_endpoints_until_their_time_is_up() {
        let addrs = [addr(1), addr(2), addr(3)];
        for balancing in BALANCERS {
            let u = plain(balancing.clone(), &addrs);
            let length = refuse(&u, addr(1));
            for _ in 0..100 {
                let picked = u.pick(None).expect("pick");
                assert_ne!(picked.addr, addr(1), "{balancing:?} picked a dead endpoint");
                // A retry never goes there either, even avoiding the only other one.
                let retry = u.pick(Some(picked.addr)).expect("pick");
                assert_ne!(retry.addr, addr(1));
                assert_ne!(retry.addr, picked.addr);
            }
            // The hold-out ends: one request probes it, the others keep away meanwhile.
            tokio::time::advance(length).await;
            let probes = (0..100)
                .filter(|_| u.pick(None).is_ok_and(|e| e.addr == addr(1)))
                .count();
            assert_eq!(probes, 1, "{balancing:?}");
            // Its connect succeeds: traffic comes back.
            endpoint(&u, addr(1)).hold_out.connected();
            let back = (0..100)
                .filter(|_| u.pick(None).is_ok_and(|e| e.addr == addr(1)))
                .count();
            assert!(back > 10, "{balancing:?}: {back} of 100");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn round_robin_shares_a_held_out_endpoints_turns_evenly() {
        let addrs = [addr(1), addr(2), addr(3)];
        let u = plain(LoadBalancing::RoundRobin, &addrs);
        refuse(&u, addr(2));
        let mut counts = std::collections::HashMap::new();
        for _ in 0..300 {
            *counts.entry(u.pick(None).expect("pick").addr).or_insert(0) += 1;
        }
        assert_eq!(counts.get(&addr(2)), None);
        assert_eq!(counts.get(&addr(1)), Some(&150));
        assert_eq!(counts.get(&addr(3)), Some(&150));
    }

    #[tokio::test(start_paused = true)]
    async fn when_all_are_held_out_a_first_try_goes_to_the_first_back_and_a_retry_nowhere() {
        let addrs = [addr(1), addr(2), addr(3)];
        for balancing in BALANCERS {
            let u = plain(balancing, &addrs);
            for a in addrs {
                refuse(&u, a);
            }
            // The hold-outs are jittered: which one ends first is for the clock to say.
            let first_back = addrs
                .into_iter()
                .min_by_key(|a| endpoint(&u, *a).hold_out.until());
            for _ in 0..20 {
                assert_eq!(u.pick(None).ok().map(|e| e.addr), first_back);
                for avoid in addrs {
                    assert!(matches!(
                        u.pick(Some(avoid)),
                        Err(ProxyError::AllUnreachable(_))
                    ));
                }
            }
        }
        // One endpoint alone: the first try still goes there, its retry does not.
        let u = plain(LoadBalancing::RoundRobin, &[addr(1)]);
        refuse(&u, addr(1));
        assert_eq!(u.pick(None).expect("fail open").addr, addr(1));
        assert!(matches!(
            u.pick(Some(addr(1))),
            Err(ProxyError::AllUnreachable(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_hashed_key_sticks_to_its_endpoint_and_only_an_ejected_ones_keys_move() {
        use crate::policy::hash::key_hash;
        let addrs = [addr(1), addr(2), addr(3), addr(4), addr(5)];
        let on = outrider_config::HashOn::Header("x-user-id".into());
        let u = upstream(LoadBalancing::Hash(on), &addrs);
        let keys: Vec<u64> = (0..500)
            .map(|i| key_hash(format!("u{i}").as_bytes()))
            .collect();
        let pick = |key: u64, avoid| u.pick_for(Some(key), avoid).expect("pick").addr;
        let home: Vec<SocketAddr> = keys.iter().map(|&k| pick(k, None)).collect();
        for (&key, &at) in keys.iter().zip(&home) {
            assert_eq!(pick(key, None), at, "the same key, the same endpoint");
            // A retry goes elsewhere, and always to the same other endpoint.
            let retry = pick(key, Some(at));
            assert_ne!(retry, at);
            assert_eq!(pick(key, Some(at)), retry);
        }
        // Requests without a key still reach every endpoint (round robin).
        let keyless: std::collections::HashSet<_> =
            (0..10).map(|_| u.pick(None).expect("pick").addr).collect();
        assert_eq!(keyless.len(), 5);
        // Eject endpoint 3: its keys spread over the others, nobody else's move.
        u.report(&endpoint(&u, addr(3)), Outcome::Failure);
        let mut heirs = std::collections::HashSet::new();
        for (&key, &at) in keys.iter().zip(&home) {
            let now = pick(key, None);
            if at == addr(3) {
                assert_ne!(now, addr(3));
                heirs.insert(now);
            } else {
                assert_eq!(now, at);
            }
        }
        assert_eq!(
            heirs.len(),
            4,
            "an ejected endpoint's keys go to all the others"
        );
        // The ejection ends: every key is home again.
        tokio::time::advance(Duration::from_secs(60)).await;
        for (&key, &at) in keys.iter().zip(&home) {
            assert_eq!(pick(key, None), at);
        }
        // A DNS change rebuilds the table: endpoint 5's keys move, the others' (nearly) stay.
        u.set_endpoints(&addrs[..4]);
        let stayed = keys
            .iter()
            .zip(&home)
            .filter(|(_, &at)| at != addr(5))
            .filter(|(&key, &at)| pick(key, None) == at)
            .count();
        let others = home.iter().filter(|&&at| at != addr(5)).count();
        assert!(stayed + 5 >= others, "{stayed} of {others} stayed");
    }

    #[tokio::test(start_paused = true)]
    async fn ejected_endpoints_are_never_the_fallback_for_held_out_ones() {
        let addrs = [addr(1), addr(2)];
        let u = upstream(LoadBalancing::RoundRobin, &addrs);
        u.report(&endpoint(&u, addr(1)), Outcome::Failure);
        refuse(&u, addr(2));
        for _ in 0..10 {
            assert_eq!(u.pick(None).expect("fail open").addr, addr(2));
        }
        u.report(&endpoint(&u, addr(2)), Outcome::Failure);
        assert!(matches!(u.pick(None), Err(ProxyError::AllEjected(_))));
    }

    #[tokio::test(start_paused = true)]
    async fn endpoints_that_stay_keep_their_hold_out_across_a_rebuild_and_a_dns_change() {
        let metrics = Metrics::new("test").expect("metrics");
        let before = plain(LoadBalancing::RoundRobin, &[addr(1), addr(2)]);
        let length = refuse(&before, addr(1));
        // A reload that changed the service's settings builds a new upstream from the old.
        let spec = spec(LoadBalancing::LeastRequest, None);
        let after = Upstream::new(spec, &[addr(1), addr(2), addr(3)], &metrics, Some(&before));
        // A DNS change keeps the endpoints that stay.
        after.set_endpoints(&[addr(3), addr(1)]);
        for _ in 0..50 {
            assert_eq!(after.pick(None).expect("pick").addr, addr(3));
        }
        tokio::time::advance(length).await;
        let probes = (0..50).filter(|_| after.pick(None).is_ok_and(|e| e.addr == addr(1)));
        assert_eq!(probes.count(), 1, "probed once its hold-out ended");
    }

    /// A real refused connect, through the endpoint's pool: the request comes back unsent,
    /// the endpoint is held out (and counted), and a successful connect brings it back.
    #[tokio::test]
    async fn a_refused_connect_holds_the_endpoint_out_until_a_connect_succeeds() {
        use crate::io::pool::SendError;
        use crate::io::request_body::RequestBody;

        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let dead = listener.local_addr().expect("addr");
        drop(listener);
        let metrics = Metrics::new("test").expect("metrics");
        let spec = spec(LoadBalancing::RoundRobin, None);
        let u = Upstream::new(spec, &[dead, addr(1)], &metrics, None);
        let req = http::Request::get("/ping")
            .header("host", "svc")
            .body(RequestBody::Empty)
            .expect("request");
        let sent = endpoint(&u, dead).pool.send(req).await;
        let Err(SendError::Connect { unsent, .. }) = sent else {
            panic!("expected a refused connect");
        };
        assert_eq!(unsent.0.uri().path(), "/ping", "the request comes back");
        for _ in 0..10 {
            assert_eq!(u.pick(None).expect("pick").addr, addr(1));
        }
        assert_eq!(metrics.service("svc").hold_outs.get(), 1);
        // Something listens there again: the first connect that succeeds ends the hold-out.
        let listener = std::net::TcpListener::bind(dead).expect("bind again");
        let connector = EndpointConnector::new(
            dead,
            Duration::from_secs(1),
            metrics.connections("svc", &dead.to_string()),
            None,
        )
        .with_hold_out(Arc::clone(&endpoint(&u, dead).hold_out));
        connector.connect().await.expect("connect");
        drop(listener);
        assert!((0..10).any(|_| u.pick(None).is_ok_and(|e| e.addr == dead)));
    }
}
